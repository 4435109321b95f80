"""Paired tests on the test images: DE-CROP against the baseline, one configuration against another, and the
interval of one arm's certified accuracy with the image as its unit.

Paired tests: both methods certify the SAME test images (matched on ``idx``), and every seed of a setting
certifies those same images again, so the unit of every test is the image. Per seed (one run): the exact
McNemar test, a sign test on the images that one method certifies at r and the other does not. Over the S
seeds of a setting: the image-level test, the exact sign-flip permutation test of the per-image differences
d_i = (1/S) sum_s (c^M_is - c^B_is) (c = certified at r); summing discordant pairs over seeds instead would
count one hard image S times as if it were S independent images, and gives p-values far too small. Each family
of tests shown together (the image-level tests; the per-seed tests) is Holm-adjusted. `paired_outcomes` runs
the image-level test of two arms given as seed -> rows (a preset's levels, the confirmation's configurations),
`paired_radii` adds the Holm adjustment over the radii and the sweep's wording. `accuracy_interval`: the 95%
interval of an arm's seed-averaged accuracy, resampling images. The regression of the search's objective and
the hyperparameter importance live in `analysis.objective`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import binom, bootstrap
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from decrop.rows import CertRow

from .objective import importance, regression
from .tables import method_name, method_rank

IMAGE_LEVEL, PER_SEED = "image-level", "per seed"  # the two families of paired tests (the ``scope`` column)


@dataclass
class Statistics:
    """Paired tests (image-level over seeds, and per seed), the regression table and Optuna's importance of the
    search's parameters, each row with a plain-words ``sentence``; the notes say what could not be computed and
    why (for the regression its fit, for the importance how many trials it rests on)."""

    paired: pd.DataFrame
    regression: pd.DataFrame
    paired_notes: list[str] = field(default_factory=list)
    regression_notes: list[str] = field(default_factory=list)
    importance: pd.DataFrame = field(default_factory=pd.DataFrame)
    importance_notes: list[str] = field(default_factory=list)


def format_p(p: float) -> str:
    return f"{p:.2g}"


# ---------------------------------------------------------------------------------------------------------
# The tests, on plain arrays


class ImageLevelTest(NamedTuple):
    """``p_value``: exact two-sided sign-flip p; ``difference``: mean over images of d_i in [-1, 1] (x100 for
    percentage points); ``interval``: its 95% paired bootstrap interval over images."""

    p_value: float
    difference: float
    interval: tuple[float, float]


def sign_flip_distribution(weights: Sequence[int] | np.ndarray) -> np.ndarray:
    """Exact null distribution of sum_i eps_i * w_i for integer weights w_i >= 0 and independent fair signs
    eps_i = +-1: entry k is P(sum = k - W), W = sum(w); length 2W + 1, symmetric, sums to 1. The images of
    weight v (there are k of them) add v * (2 Binomial(k, 1/2) - k); one convolution per distinct weight, of
    non-negative terms only, so small tail probabilities keep their relative precision."""
    w = np.asarray(weights)
    if w.ndim != 1 or (w.size and (not np.issubdtype(w.dtype, np.integer) or w.min() < 0)):
        raise ValueError(f"sign_flip_distribution needs a 1-D array of integers >= 0, got {w.dtype} {w.shape}")
    pmf = np.ones(1)
    for value, count in zip(*np.unique(w[w > 0], return_counts=True)):
        group = np.zeros(2 * int(value) * int(count) + 1)
        group[::2 * int(value)] = binom.pmf(np.arange(count + 1), count, 0.5)
        pmf = np.convolve(pmf, group)
    return pmf


def sign_flip_p(weights: Sequence[int] | np.ndarray, observed: int) -> float:
    """Two-sided p = P(|sum_i eps_i w_i| >= |observed|) under fair signs (`sign_flip_distribution`)."""
    pmf = sign_flip_distribution(weights)
    half = (len(pmf) - 1) // 2
    return float(min(1.0, pmf[np.abs(np.arange(-half, half + 1)) >= abs(int(observed))].sum()))


def image_level_test(method: np.ndarray, baseline: np.ndarray, *, n_resamples: int = 10_000,
                     seed: int = 0) -> ImageLevelTest:
    """Paired test of two methods on the same images over S seeds: `method` and `baseline` are (images, S)
    arrays of 0/1 (or bool) outcomes, row i the same image in both, column s the same seed. d_i = mean over
    seeds of method - baseline; H0: within each image the two methods' labels are exchangeable, tested with the
    exact sign-flip permutation test of T = sum_i d_i (each image's S*d_i keeps or flips its sign; no Monte
    Carlo). With S = 1 it is the exact McNemar test. The interval is a percentile bootstrap of mean(d) over
    images (`n_resamples` draws, generator seeded with `seed`). ValueError on arrays of other shapes or values."""
    m, b = np.asarray(method), np.asarray(baseline)
    if m.shape != b.shape or m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"image_level_test needs two (images, seeds) arrays of the same shape with at least one "
                         f"image and one seed, got {m.shape} and {b.shape}")
    if not (np.isin(m, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("image_level_test needs 0/1 outcomes (certified at r or not); got other values")
    per_image = m.astype(np.int64).sum(axis=1) - b.astype(np.int64).sum(axis=1)  # S * d_i, integers
    p = sign_flip_p(np.abs(per_image), int(per_image.sum()))
    d = per_image / m.shape[1]
    if np.ptp(d) == 0:  # every resample has the same mean
        interval = (float(d[0]), float(d[0]))
    else:
        ci = bootstrap((d,), np.mean, n_resamples=n_resamples, method="percentile", batch=1000,
                       rng=np.random.default_rng(seed)).confidence_interval
        interval = (float(ci.low), float(ci.high))
    return ImageLevelTest(p, float(d.mean()), interval)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of tests (statsmodels ``multipletests``): comparing them
    with alpha keeps the chance of any false rejection in the family <= alpha under any dependence."""
    p = np.asarray(p_values, dtype=float)
    return multipletests(p, method="holm")[1] if p.size else p


def mcnemar_counts(method_rows: Sequence[CertRow], baseline_rows: Sequence[CertRow],
                   radius: float) -> dict[str, int]:
    """Counts of the paired certified-at-r outcomes on the images both tables hold: n_pairs, both,
    only_method, only_baseline, neither."""
    a = {r.idx: r.correct == 1 and r.radius >= radius for r in method_rows}
    b = {r.idx: r.correct == 1 and r.radius >= radius for r in baseline_rows}
    common = a.keys() & b.keys()
    pairs = [(a[i], b[i]) for i in common]
    return {"n_pairs": len(common), "both": sum(x and y for x, y in pairs),
            "only_method": sum(x and not y for x, y in pairs), "only_baseline": sum(y and not x for x, y in pairs),
            "neither": sum(not (x or y) for x, y in pairs)}


def mcnemar_p(counts: dict[str, int]) -> float:
    """Exact McNemar p-value (two-sided binomial test on the discordant pairs); 1 without discordant pairs."""
    if counts["only_method"] + counts["only_baseline"] == 0:
        return 1.0
    table = [[counts["both"], counts["only_method"]], [counts["only_baseline"], counts["neither"]]]
    return float(mcnemar(table, exact=True).pvalue)


def shared_images(tables: Sequence[Sequence[CertRow]]) -> list[int]:
    """The image indices (``idx``) present in every table, sorted."""
    common = set.intersection(*({r.idx for r in rows} for rows in tables)) if tables else set()
    return sorted(common)


def certified_matrix(tables: Sequence[Sequence[CertRow]], images: Sequence[int], radius: float) -> np.ndarray:
    """(len(images), len(tables)) bool: image ``images[i]`` is certified correct with radius >= `radius` in
    table s (the definition of ``decrop.rows.certified_counts``). Every image must be in every table."""
    out = np.zeros((len(images), len(tables)), dtype=bool)
    for s, rows in enumerate(tables):
        hit = {r.idx: r.correct == 1 and r.radius >= radius for r in rows}
        out[:, s] = [hit[i] for i in images]
    return out


# ---------------------------------------------------------------------------------------------------------
# Two arms over seeds: a preset's levels and methods, the confirmation's configurations

SeedRows = Mapping[int, Sequence[CertRow]] | Sequence[Sequence[CertRow]]


def _by_seed(runs: SeedRows) -> dict:
    return dict(runs) if isinstance(runs, Mapping) else dict(enumerate(runs))


def paired_outcomes(method: SeedRows, reference: SeedRows, radii: Sequence[float]) -> pd.DataFrame:
    """`image_level_test` of `method` against `reference` at each radius. An arm maps seed -> its certification
    rows (a sequence pairs by position: give both in the same seed order); the seeds both have are paired, on
    the images that all their tables hold. Columns: radius, n_seeds, n_images, favour_method /
    favour_reference (images with d > 0 / d < 0), difference (mean of d, in [-1, 1]), ci_low, ci_high (95%
    paired bootstrap over images), p_value (exact sign-flip; with one seed the exact McNemar test).
    ValueError when the arms share no seed or no image."""
    m, r = _by_seed(method), _by_seed(reference)
    seeds = [s for s in m if s in r]
    if not seeds:
        raise ValueError(f"paired_outcomes: the arms share no seed (method {sorted(m)}, reference {sorted(r)})")
    images = shared_images([*(m[s] for s in seeds), *(r[s] for s in seeds)])
    if not images:
        raise ValueError("paired_outcomes: no image is certified in every table of both arms")
    records = []
    for radius in radii:
        a = certified_matrix([m[s] for s in seeds], images, radius)
        b = certified_matrix([r[s] for s in seeds], images, radius)
        test = image_level_test(a, b)
        d = a.sum(axis=1).astype(int) - b.sum(axis=1).astype(int)
        records.append({"radius": float(radius), "n_seeds": len(seeds), "n_images": len(images),
                        "favour_method": int((d > 0).sum()), "favour_reference": int((d < 0).sum()),
                        "difference": test.difference, "ci_low": test.interval[0], "ci_high": test.interval[1],
                        "p_value": test.p_value})
    return pd.DataFrame(records)


def paired_radii(method: SeedRows, reference: SeedRows, radii: Sequence[float],
                 names: tuple[str, str] = ("tuned", "defaults")) -> pd.DataFrame:
    """`paired_outcomes` Holm-adjusted over the radii, as the sweep prints and logs the search's best
    configuration against the profile's defaults on the confirmation's fresh seeds (``confirm/
    best_vs_default.csv``): radius, difference (points) with its 95% interval, p, p (Holm over radii) and a
    verdict ("tuned better", "defaults better" or "no difference shown" at the 5% level; `names` words it)."""
    tests = paired_outcomes(method, reference, radii)
    frame = pd.DataFrame({"radius": tests["radius"],
                          "difference (points)": [round(100 * d, 1) for d in tests["difference"]],
                          "95% interval": [f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" for lo, hi in
                                           zip(tests["ci_low"], tests["ci_high"])],
                          "p": tests["p_value"]})
    frame["p (Holm over radii)"] = holm(frame["p"].to_numpy())
    frame["verdict"] = [f"{names[0]} better" if p < 0.05 and d > 0 else f"{names[1]} better" if p < 0.05 else
                        "no difference shown" for p, d in zip(frame["p (Holm over radii)"],
                                                              frame["difference (points)"])]
    return frame


def accuracy_interval(outcomes: np.ndarray, *, n_resamples: int = 10_000, seed: int = 0
                      ) -> tuple[float, float, str]:
    """95% interval of one arm's certified accuracy with the test image as the unit. `outcomes`: (images,
    seeds) 0/1, certified at r by seed s; a_i = its mean over seeds, the accuracy = mean(a). When every image
    has the same outcome in every seed (one seed, or seeds that agree), the a_i are 0/1 and the interval is
    the exact Clopper-Pearson interval of k of n images; otherwise a percentile bootstrap of mean(a) over
    images (`n_resamples`, generator seeded with `seed`). Returns (low, high, "Clopper-Pearson" | "bootstrap")."""
    o = np.asarray(outcomes)
    if o.ndim != 2 or 0 in o.shape or not np.isin(o, (0, 1)).all():
        raise ValueError(f"accuracy_interval needs an (images, seeds) array of 0/1 outcomes, got {o.shape}")
    a = o.mean(axis=1)
    if np.isin(a, (0.0, 1.0)).all():
        lo, hi = proportion_confint(int(a.sum()), len(a), alpha=0.05, method="beta")
        return float(lo), float(hi), "Clopper-Pearson"
    ci = bootstrap((a,), np.mean, n_resamples=n_resamples, method="percentile", batch=1000,
                   rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high), "bootstrap"


# ---------------------------------------------------------------------------------------------------------
# The report's paired tests


def holm_verdict(p_holm: float, n_tests: int, tie: str | None) -> str:
    adjusted = f"Holm-adjusted over {n_tests} tests p={format_p(p_holm)}"
    if tie:
        return f"{adjusted}: {tie}"
    if p_holm < 0.001:
        return f"{adjusted}: a difference this large is very unlikely under equal performance"
    if p_holm < 0.05:
        return f"{adjusted}: unlikely under equal performance (significant at the 5% level)"
    return f"{adjusted}: compatible with equal performance"


def _sentence(row: dict) -> str:
    name, r = method_name(row["method"]), f"r={row['radius']:.2f}"
    if row["scope"] == PER_SEED:
        head = (f"{name} certifies {row['only_method']} images at {r} that the baseline misses, the baseline "
                f"{row['only_baseline']} that {name} misses (of {row['n_pairs']} paired images)")
        tie = "the two certify exactly the same images"
    else:
        more = "more" if row["difference_pp"] >= 0 else "fewer"
        head = (f"Over {row['n_seeds']} seeds of the same {row['n_pairs']} images, {name} certifies "
                f"{abs(row['difference_pp']):.1f} points {more} at {r} than the baseline (95% CI "
                f"{row['ci_low_pp']:+.1f} to {row['ci_high_pp']:+.1f}); {row['only_method']} images favour {name}, "
                f"{row['only_baseline']} the baseline")
        tie = "no image favours either method"
    tie = tie if row["only_method"] + row["only_baseline"] == 0 else None
    return f"{head}; p={format_p(row['p_value'])}, {holm_verdict(row['p_holm'], row['n_tests'], tie)}."


def _per_seed(cert: pd.DataFrame, rows: dict[tuple[str, str], Sequence[CertRow]]
              ) -> tuple[list[dict], list[str], dict[tuple[str, str], list]]:
    """Per-seed McNemar records, notes, and per (setting, method) the runs to test at image level: a list of
    (run name, seed, method table, baseline table, radii)."""
    test = cert[cert["split"] == "test"] if len(cert) else cert
    records, notes, groups = [], [], {}
    for run_id, group in (test.groupby("run_id", sort=False) if len(test) else []):
        if (run_id, "test_baseline") not in rows:
            continue
        base = rows[(run_id, "test_baseline")]
        for label, at_label in group[group["method"].str.startswith("decrop")].groupby("label", sort=False):
            first, own = at_label.iloc[0], rows[(run_id, label)]
            n_common = len(shared_images([own, base]))
            if n_common < max(len(own), len(base)):
                notes.append(f"run {first['run_name']}: {label} and test_baseline share {n_common} of their images; "
                             f"only those are paired")
            radii = sorted(at_label["radius"].unique())
            for radius in radii:
                counts = mcnemar_counts(own, base, radius)
                records.append({"scope": PER_SEED, "setting": first["setting"], "seed": first["seed"],
                                "run": first["run_name"], "method": first["method"], "radius": radius,
                                "n_seeds": 1, **counts, "p_value": mcnemar_p(counts),
                                "difference_pp": 100 * (counts["only_method"] - counts["only_baseline"])
                                / max(counts["n_pairs"], 1)})
            groups.setdefault((first["setting"], first["method"]), []).append(
                (first["run_name"], first["seed"], own, base, radii))
    return records, notes, groups


def _image_level(setting: str, method: str, runs: list, notes: list[str]) -> list[dict]:
    """Image-level records of one setting and method over its runs (seeds), one per radius all runs report."""
    tables = [t for _, _, own, base, _ in runs for t in (own, base)]
    images = shared_images(tables)
    left_out = len(set().union(*({r.idx for r in t} for t in tables))) - len(images)
    if left_out:
        notes.append(f"{setting}, {method_name(method)}: {left_out} images are not certified by both methods in "
                     f"all {len(runs)} seeds; the image-level test uses the {len(images)} present everywhere")
    if not images:
        return []
    seeds = ", ".join(str(s) for _, s, *_ in runs)
    records = []
    for radius in sorted(set.intersection(*(set(radii) for *_, radii in runs))):
        m = certified_matrix([own for _, _, own, _, _ in runs], images, radius)
        b = certified_matrix([base for _, _, _, base, _ in runs], images, radius)
        p, diff, (lo, hi) = image_level_test(m, b)
        d = m.sum(axis=1).astype(int) - b.sum(axis=1).astype(int)
        records.append({"scope": IMAGE_LEVEL, "setting": setting, "seed": pd.NA, "run": f"seeds {seeds}",
                        "method": method, "radius": radius, "n_seeds": len(runs), "n_pairs": len(images),
                        "only_method": int((d > 0).sum()), "only_baseline": int((d < 0).sum()), "p_value": p,
                        "difference_pp": 100 * diff, "ci_low_pp": 100 * lo, "ci_high_pp": 100 * hi})
    return records


def paired_tests(cert: pd.DataFrame, rows: dict[tuple[str, str], Sequence[CertRow]]) -> tuple[pd.DataFrame,
                                                                                                 list[str]]:
    """Every DE-CROP test label against ``test_baseline`` of the same run at each reported radius: the exact
    McNemar test per run (scope ``per seed``), and over the runs (seeds) of a setting the image-level
    sign-flip test (scope ``image-level``, only with several seeds). Columns: scope, setting, seed, run, method,
    radius, n_seeds, n_pairs (paired images), only_method / only_baseline (images the method certifies and
    the baseline not, or the reverse; image-level: images with d_i > 0 / < 0), difference_pp (mean paired
    difference in percentage points) with ci_low_pp / ci_high_pp (image-level), p_value, p_holm (Holm within
    the scope's family), n_tests (its size) and sentence."""
    records, notes, groups = _per_seed(cert, rows)
    for (setting, method), runs in groups.items():
        if len(runs) > 1:
            records += _image_level(setting, method, runs, notes)
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame, notes
    for _, family in frame.groupby("scope"):
        frame.loc[family.index, "p_holm"] = holm(family["p_value"])
        frame.loc[family.index, "n_tests"] = len(family)
    counts = ["n_seeds", "n_pairs", "both", "only_method", "only_baseline", "neither", "n_tests"]
    frame = frame.reindex(columns=[*frame.columns, *(c for c in counts if c not in frame)])
    frame[counts] = frame[counts].astype("Int64")  # image-level rows have no both/neither: <NA>, not 3.0
    frame["sentence"] = [_sentence(r) for r in frame.to_dict("records")]
    frame["seed"] = frame["seed"].astype("Int64")
    order = frame["scope"].map({IMAGE_LEVEL: 0, PER_SEED: 1})
    frame = frame.assign(_s=order, _r=frame["method"].map(method_rank))
    frame = frame.sort_values(["_s", "setting", "_r", "seed", "radius"]).drop(columns=["_s", "_r"])
    columns = ["scope", "setting", "seed", "run", "method", "radius", "n_seeds", "n_pairs", "both", "only_method",
               "only_baseline", "neither", "difference_pp", "ci_low_pp", "ci_high_pp", "p_value", "p_holm",
               "n_tests", "sentence"]
    return frame.reindex(columns=columns).reset_index(drop=True), notes


def statistics(cert: pd.DataFrame, rows: dict[tuple[str, str], Sequence[CertRow]],
               trials: pd.DataFrame) -> Statistics:
    """Paired tests of each DE-CROP label against the baseline of the same run (`paired_tests`), the
    objective's regression and Optuna's importance (`analysis.objective`)."""
    tests, notes = paired_tests(cert, rows)
    table, regression_notes = regression(trials)
    weights, importance_notes = importance(trials)
    return Statistics(tests, table, notes, regression_notes, weights, importance_notes)
