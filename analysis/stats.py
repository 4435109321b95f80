"""Paired tests on the test images: DE-CROP against the baseline, one configuration against another, and the
interval of one arm's certified accuracy with the image as its unit.

Paired tests: both methods certify the SAME test images (matched on ``idx``), and every seed certifies those same
images again, so the unit of every test is the image. Over the S seeds of two arms: the image-level test, the
exact sign-flip permutation test of the per-image differences d_i = (1/S) sum_s (c^M_is - c^B_is) (c = certified
at r; with one seed it is the exact McNemar test); summing discordant pairs over seeds instead would count one
hard image S times as if it were S independent images, and gives p-values far too small. Each family of tests
shown together is Holm-adjusted. `paired_outcomes` runs the image-level test of two arms given as seed -> rows (a
preset's levels, the confirmation's configurations), `paired_radii` adds the Holm adjustment over the radii and
the sweep's wording. `accuracy_interval`: the 95% interval of an arm's seed-averaged accuracy, resampling images.
The regression of the search's objective and the hyperparameter importance live in `analysis.objective`
(`statistics` gathers them for the report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import binom, bootstrap
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from decrop.rows import CertRow

from .objective import importance, regression


@dataclass
class Statistics:
    """The search's objective: the regression table and Optuna's importance of the searched parameters, each row
    with a plain-words ``sentence``; the notes say what could not be computed and why (for the regression its
    fit, for the importance how many trials it rests on)."""

    regression: pd.DataFrame
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
# The report's wording, and the search's statistics


def holm_verdict(p_holm: float, n_tests: int, tie: str | None) -> str:
    adjusted = f"Holm-adjusted over {n_tests} tests p={format_p(p_holm)}"
    if tie:
        return f"{adjusted}: {tie}"
    if p_holm < 0.001:
        return f"{adjusted}: a difference this large is very unlikely under equal performance"
    if p_holm < 0.05:
        return f"{adjusted}: unlikely under equal performance (significant at the 5% level)"
    return f"{adjusted}: compatible with equal performance"


def statistics(trials: pd.DataFrame) -> Statistics:
    """The search trials' objective: its regression and Optuna's importance (`analysis.objective`)."""
    table, regression_notes = regression(trials)
    weights, importance_notes = importance(trials)
    return Statistics(table, regression_notes, weights, importance_notes)
