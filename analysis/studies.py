"""The report's section of each study on the test images: a paper's study (a preset) or the search's confirmation.

Each section shows what the paper (or the sweep) claims, the study's table (`arms.accuracy_values`: per arm the
mean certified accuracy over seeds, its spread, and a 95% interval whose unit is the test image), its figure
(one panel per level), and the epochs and data each arm used. A preset that tests a claim of the paper shows
the claim and its verdict (`analysis.verdicts`: the seed-level tests the claim declares). The search's
confirmation shows paired image-level tests (`stats.paired_outcomes`) with a sentence each, in two families,
each Holm-adjusted on its own:

- *against the baseline*: every DE-CROP configuration against the baseline, per radius;
- *best against defaults*: `stats.paired_radii` over the profile's radii, as the sweep computes it
  (``confirm/best_vs_default.csv``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tuning.presets import PRESETS, SAME_LEVEL

from .arms import CONFIRMATION, PRESET, Arm, StudyArms, accuracy_values, budget_frame, certifiable
from .figures import FigureOut, arms_figure
from .stats import format_p, holm, holm_verdict, paired_outcomes, paired_radii
from .tables import method_name, radius_column
from .budget import TOLERANCE, budget_figure, certified_by_budget, convergence_table, off_plateau
from .verdicts import Verdict, degenerate_arms, verdict

# The studies whose claim compares the levels with each other (the others compare DE-CROP with the baseline at
# each level: sigma changes what is certified, data the budget, denoiser the architecture).
VS_BASELINE, BEST_VS_DEFAULT = "against the baseline", "best against defaults"
TESTS_CAPTION = (
    "Paired tests on the test images ({family}; {n} tests, one Holm family). The unit is the image: for each "
    "image, d = the fraction of seeds in which the first arm certifies it at r minus the same fraction for the "
    "second; the test is the exact sign-flip permutation test of the sum of d (with one seed, the exact McNemar "
    "test), the difference the mean of d in percentage points with its 95% paired bootstrap interval over images. "
    "favour: images with d > 0 / d < 0.")
TABLE_CAPTION = (
    "Certified accuracy (%) on the test images at each l2 radius r: mean ± standard deviation over the seeds "
    "[95% interval with the test image as the unit: Clopper-Pearson when every image has the same outcome in "
    "every seed, else a percentile bootstrap over images of the per-image mean over seeds]; images: those every "
    "seed certified (the same in every run); epochs: stage 1 + stage 2; ACR: average certified radius.")


@dataclass
class StudySection:
    """One study's part of the report: heading, render items, its display tables (headline first) and the
    numeric frames written as CSV."""

    heading: str
    items: list[tuple[str, object]]
    tables: dict[str, pd.DataFrame]
    csvs: dict[str, pd.DataFrame] = field(default_factory=dict)
    preset: str = ""  # the preset's name ("search" for a confirmation)
    claim: object = None  # the preset's `tuning.presets.Claim`, when it tests one
    verdict: Verdict | None = None
    values: pd.DataFrame = field(default_factory=pd.DataFrame)  # `arms.accuracy_values`
    resume: str = ""  # the command that continues the study, while it is not finished
    off_plateau: list[str] = field(default_factory=list)  # `analysis.budget.off_plateau`, in words


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "study"


# ---------------------------------------------------------------------------------------------------------
# Tests


def _pairs(study: StudyArms, notes: list[str]) -> list[tuple[str, Arm, Arm]]:
    """(family, arm, reference) of every test the study's claims call for; a note for an arm without baseline."""
    pairs = []
    for level in study.levels:
        for arm in study.decrop_arms(level):
            base = study.reference(level, "baseline")
            if base is not None:
                pairs.append((VS_BASELINE, arm, base))
            else:
                notes.append(f"{_arm_text(study, arm)}: no baseline certified at this level (nor one shared by "
                             f"the levels); not tested against it")
    best, default = study.arms.get((None, "decrop_best")), study.arms.get((None, "decrop_default"))
    if study.kind == CONFIRMATION and best is not None and default is not None:
        pairs.append((BEST_VS_DEFAULT, best, default))
    return pairs


def study_tests(study: StudyArms) -> tuple[pd.DataFrame, list[str]]:
    """Every test of `_pairs` at each radius (the profile's for best against defaults, as the sweep tests; the
    table's otherwise): family, level, level_name, method, reference_level, reference_level_name, reference,
    radius, n_seeds, n_images, favour_method, favour_reference, difference_pp, ci_low_pp, ci_high_pp, p_value,
    p_holm (Holm within the family), n_tests, sentence; and notes on arms that could not be paired."""
    frames, notes, beyond = [], [], set()
    for family, arm, ref in _pairs(study, notes):
        radii = study.profile_radii if family == BEST_VS_DEFAULT else study.radii
        limit = max(certifiable(arm), certifiable(ref))  # a radius neither can certify is no test: left out of
        beyond.update(r for r in radii if r > limit)  # the family (decided by n, alpha and sigma, not the data)
        radii = [r for r in radii if r <= limit]
        try:
            frame = paired_outcomes(arm.seeds, ref.seeds, radii)
        except ValueError as err:
            notes.append(f"{_arm_text(study, arm)} against {_arm_text(study, ref)}: not tested ({err})")
            continue
        if set(arm.seeds) != set(ref.seeds):
            notes.append(f"{_arm_text(study, arm)} (seeds {sorted(arm.seeds)}) against {_arm_text(study, ref)} "
                         f"(seeds {sorted(ref.seeds)}): only the seeds both have are paired")
        most = max(len(arm.images()), len(ref.images()))
        if frame["n_images"].iloc[0] < most:
            notes.append(f"{_arm_text(study, arm)} against {_arm_text(study, ref)}: {frame['n_images'].iloc[0]} of "
                         f"{most} test images are certified in every paired run; only those are paired")
        frames.append(frame.assign(family=family, level=arm.level, level_name=study.level_name(arm.level),
                                   method=arm.method, reference_level=ref.level,
                                   reference_level_name=study.level_name(ref.level), reference=ref.method))
    if beyond:
        notes.append(f"not tested at r = {', '.join(f'{r:g}' for r in sorted(beyond))} where no run of either side "
                     f"can certify it (its n, alpha and sigma: decrop.bounds.max_certifiable_radius)")
    if not frames:
        return pd.DataFrame(), notes
    tests = pd.concat(frames, ignore_index=True)
    for column in ("difference", "ci_low", "ci_high"):
        tests[f"{column}_pp"] = 100 * tests.pop(column)
    for _, family in tests.groupby("family", sort=False):
        tests.loc[family.index, "p_holm"] = holm(family["p_value"])
        tests.loc[family.index, "n_tests"] = len(family)
    tests["n_tests"] = tests["n_tests"].astype(int)
    tests["sentence"] = [_sentence(row) for row in tests.to_dict("records")]
    return tests, notes


def _arm_text(study: StudyArms, arm: Arm) -> str:
    where = study.level_name(arm.level)
    return f"{method_name(arm.method)} at {where}" if where else method_name(arm.method)


def _sentence(row: dict) -> str:
    name, ref = method_name(row["method"]), method_name(row["reference"])
    more = "more" if row["difference_pp"] >= 0 else "fewer"
    tie = "no image favours either" if row["favour_method"] + row["favour_reference"] == 0 else None
    seeds = "1 seed" if row["n_seeds"] == 1 else f"{row['n_seeds']} seeds"
    return (f"{name} certifies {abs(row['difference_pp']):.1f} points {more} than {ref} at "
            f"r={row['radius']:.2f}, over {seeds} of the same {row['n_images']} test images (95% CI "
            f"{row['ci_low_pp']:+.1f} to {row['ci_high_pp']:+.1f}); {row['favour_method']} images favour the "
            f"first, {row['favour_reference']} the second; p={format_p(row['p_value'])}, "
            f"{holm_verdict(row['p_holm'], row['n_tests'], tie)}.")


def tests_display(tests: pd.DataFrame, family: str) -> pd.DataFrame:
    """One family's tests as the report shows them."""
    rows = tests[tests["family"] == family]
    return pd.DataFrame({
        "arm": [f"{method_name(m)}{f' at {lv}' if lv else ''}" for m, lv in zip(rows["method"], rows["level_name"])],
        "against": [f"{method_name(m)}{f' at {lv}' if lv else ''}" for m, lv in
                    zip(rows["reference"], rows["reference_level_name"])],
        "radius": rows["radius"].map("{:.2f}".format), "seeds": rows["n_seeds"], "images": rows["n_images"],
        "favour arm": rows["favour_method"], "favour other": rows["favour_reference"],
        "difference (pp) [95% CI]": [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in
                                     zip(rows["difference_pp"], rows["ci_low_pp"], rows["ci_high_pp"])],
        "p": rows["p_value"].map(format_p), "p (Holm)": rows["p_holm"].map(format_p), "in words": rows["sentence"],
    }).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Tables


def _cell(mean: float, sd: float, lo: float, hi: float) -> str:
    spread = "-" if np.isnan(sd) else f"{100 * sd:.1f}"
    return f"{100 * mean:.1f} ± {spread} [{100 * lo:.1f}, {100 * hi:.1f}]"


def accuracy_display(values: pd.DataFrame, confirmation: bool) -> pd.DataFrame:
    """The study's table: one row per arm (level, method, seeds, images, epochs), a cell per radius
    (`TABLE_CAPTION`) and the ACR (mean ± sd over seeds)."""
    records = []
    for (_, _), arm in values.groupby(["level_name", "method"], sort=False, dropna=False):
        first = arm.iloc[0]
        record = {"level": first["level_name"], "method": method_name(first["method"]),
                  "seeds": first["seeds"], "images": int(first["n_images"]), "epochs": first["epochs"]}
        for row in arm.itertuples():
            record[radius_column(row.radius)] = _cell(row.mean, row.sd, row.ci_low, row.ci_high)
        sd = "-" if np.isnan(first["acr_sd"]) else f"{first['acr_sd']:.3f}"
        record["ACR"] = f"{first['acr_mean']:.3f} ± {sd}"
        records.append(record)
    frame = pd.DataFrame(records)
    return frame.drop(columns="level") if confirmation else frame


# ---------------------------------------------------------------------------------------------------------
# The claim and its verdict

VERDICT_CAPTION = (
    "The tests the verdict rests on (one Holm family: {n} tests, the same in every report that shows this claim). "
    "Seed level: the seed is the unit (arms paired by seed, every image under every seed), the mean difference "
    "of certified accuracy with its standard error from the crossed random-effects model of seeds and images "
    "(ANOVA estimates of the variance components, Satterthwaite degrees of freedom; analysis/inference.py); "
    "'better': two-sided t test and its 95% interval; 'similar': two one-sided tests against the margin and their "
    "90% interval (equivalence shown when it lies inside the margin); 'trend': the per-seed slope of the gain "
    "against log10 of the level, t test over seeds. Intervals are not adjusted; p (Holm) is. per seed: the "
    "difference in each seed (points). The image-level p (exact sign-flip test over images, unadjusted) describes "
    "only these trained models. Seeds for 80% power: how many seeds the seed-level test needs to detect a "
    "5-point difference at Holm's first-step level (0.05 / tests), with the variance components estimated here "
    "and the same test images.")


def _claim_text(claim) -> str:
    parts = [f"{c.kind} ({method_name(c.arm)} vs {method_name(c.reference)}"
             + (f" at {c.reference_level}" if c.reference_level != SAME_LEVEL else "")
             + f"; levels {', '.join(map(str, c.levels))}; r = {', '.join(f'{r:g}' for r in c.radii)}"
             + (f"; margin {100 * c.margin:.0f} points" if c.kind == "similar" else "") + ")"
             for c in claim.comparisons]
    return (f"The claim ({claim.source}), declared before the runs: \"{claim.quote}\" Tested: " + "; ".join(parts)
            + "." + (f" {claim.note}" if claim.note else ""))


def verdict_display(tests: pd.DataFrame) -> pd.DataFrame:
    """The claim's tests as the report shows them."""
    if tests.empty:
        return tests
    def cell(row) -> str:
        if pd.isna(row.get("difference")):
            return "-"
        unit = " per decade" if row["comparison"] == "trend" else ""  # a slope against log10 of the level
        return (f"{100 * row['difference']:+.1f}{unit} [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}] "
                f"({row['interval']})")
    rows = tests.to_dict("records")
    return pd.DataFrame({
        "comparison": [r["comparison"] for r in rows], "arm": [r["arm"] for r in rows],
        "against": [r["reference"] for r in rows], "radius": [f"{r['radius']:.2f}" for r in rows],
        "seeds": [r["n_seeds"] for r in rows],
        "per seed (points)": [r.get("per_seed") if isinstance(r.get("per_seed"), str) else "-" for r in rows],
        "difference (points) [interval]": [cell(r) for r in rows],
        "p": [format_p(r["p"]) if pd.notna(r.get("p")) else "-" for r in rows],
        "p (Holm)": [format_p(r["p_holm"]) if pd.notna(r.get("p_holm")) else "-" for r in rows],
        "outcome": [r["outcome"] + (f" ({r['why']})" if isinstance(r.get("why"), str) else "") for r in rows],
        "image-level p, for these trained models": [format_p(r["image_p"]) if pd.notna(r.get("image_p")) else "-"
                                                    for r in rows],
        "seeds for 80% power (5 points)": [_needed(r.get("seeds_needed")) for r in rows],
    })


def _needed(value) -> str:
    if value is None or pd.isna(value):
        return "-"
    return "more than 100" if math.isinf(value) else str(int(value))


def verdict_items(claim, judged: Verdict) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = [("text", _claim_text(claim)),
                                       ("text", f"Verdict: **{judged.word}** ({judged.reason}).")]
    if judged.degenerate:
        items.append(("list", [f"degenerate arm (its comparisons are not interpretable): {d}"
                               for d in judged.degenerate]))
    if not judged.tests.empty:
        n = int(judged.tests["n_tests"].iloc[0])
        items += [("text", VERDICT_CAPTION.format(n=n)), ("table", verdict_display(judged.tests))]
    if judged.notes:
        items.append(("list", judged.notes))
    return items


def budget_items(converged: pd.DataFrame, figure: FigureOut) -> list[tuple[str, object]]:
    """The learning curves, where each method reaches its plateau, and the budget that follows."""
    shown = pd.DataFrame({
        "method": converged["method"].map(method_name), "epochs": converged["epochs"], "seeds": converged["seeds"],
        "plateau (%)": (100 * converged["plateau"]).round(1),
        f"within {100 * TOLERANCE:.0f} point from epoch": converged["converged_at"],
        "at epoch 20 (%)": (100 * converged["at_epoch_20"]).round(1)})
    at_end = converged["converged_at"] >= converged["epochs"]
    budget = int(converged["converged_at"].max())
    words = (f"Both methods are within {100 * TOLERANCE:.0f} point of their plateau of the validation agreement "
             f"(seed mean, {SMOOTHING_TEXT}) from epoch {budget}: the smallest budget at which both have converged."
             if not at_end.any() else
             "At least one method is still rising at the end of its longest budget: no budget here is converged "
             "for it; train longer.")
    return [("figure", figure), ("text", words), ("table", shown)]


SMOOTHING_TEXT = "5-epoch trailing mean; plateau: the mean of the curve's last tenth"


# ---------------------------------------------------------------------------------------------------------
# Sections


BUDGET_WORDS = {"train_images": "training images", "percent": "% of the training split",
                "split_size": "images in the training split", "val_images": "validation images",
                "val_source": "validation source", "labels_outside": "labels used outside the limited data",
                "classifier": "classifier"}


def _budget_items(budget: pd.DataFrame) -> list[tuple[str, object]]:
    """The epochs and data budget: what every arm shares as one sentence, what differs as a table."""
    fixed = ["level", "method", "seeds", "epochs"]
    same = [c for c in budget.columns if c not in fixed and budget[c].nunique() == 1]
    shared = "; ".join(f"{BUDGET_WORDS.get(c, c)}: {budget[c].iloc[0]}" for c in same)
    shown = budget.drop(columns=same).assign(method=budget["method"].map(method_name))
    return [("text", "Epochs each arm trained (stage 1 + stage 2; the baseline trains as many epochs in one stage "
                     "unless train.baseline_epochs says otherwise) and the data it used (the runs' budget.* params)"
                     + (f"; the same in every run: {shared}." if shared else ".")), ("table", shown)]



def _intro(study: StudyArms, values: pd.DataFrame) -> list[tuple[str, object]]:
    seeds = sorted({s for arm in study.arms.values() for s in arm.seeds})
    images = int(values["n_images"].max())
    if study.kind == CONFIRMATION:
        best = "decrop_best" in set(values["method"])
        return [("text", f"Does tuning help? The search's best trial was chosen on a noisy validation objective, so "
                         f"its own score is biased upward; the sweep therefore retrained "
                         f"{'the best configuration and ' if best else ''}the profile's defaults, the baseline and "
                         f"the reference on seeds the search never used ({', '.join(map(str, seeds))}) and "
                         f"certified them on the same {images} test images. This, not the search's score, is the "
                         f"study's result."
                         + ("" if best else " The search's best configuration is the profile's defaults: there is "
                                           "nothing to confirm beyond the defaults against the baseline."))]
    preset = PRESETS.get(study.preset)
    claim = f"{preset.summary} " if preset else ""
    shared = any(lv is None for lv, _ in study.arms)
    return [("text", f"{claim}Factor {study.factor}, levels "
                     f"{', '.join(study.level_name(lv) for lv in study.levels)}; seeds {', '.join(map(str, seeds))}; "
                     f"every run certifies the same {images} test images."
                     + (" The baseline and the no-denoiser reference do not read the factor: one run per seed "
                        "serves every level ('(all levels)')." if shared else ""))]


def study_section(study: StudyArms, out: Path, curves: pd.DataFrame | None = None) -> StudySection:
    """Compute and lay out one study (figures written into `out`); `curves`: the per-epoch validation agreement
    of its runs (`analysis.budget.load_curves`): every arm is checked for ending off its plateau, and the
    training-budget study shows them."""
    confirmation = study.kind == CONFIRMATION
    slug = _slug(f"{study.study}_confirmation" if confirmation else study.study)
    values = accuracy_values(study)
    table = accuracy_display(values, confirmation)
    tests, notes = study_tests(study) if study.kind == CONFIRMATION else (pd.DataFrame(), [])
    budget = budget_frame(study)
    figure: FigureOut = arms_figure(study, out, f"{slug}_certified_accuracy")
    items: list[tuple[str, object]] = [*_intro(study, values), ("text", TABLE_CAPTION), ("table", table),
                                       ("figure", figure)]
    csvs = {f"{slug}_accuracy_values": values, f"{slug}_tests": tests, f"{slug}_epochs_budget": budget}
    claim = PRESETS[study.preset].claim if study.kind == PRESET and study.preset in PRESETS else None
    judged = None
    if claim is not None:
        judged = verdict(study, claim)
        items += verdict_items(claim, judged)
        csvs[f"{slug}_verdict_tests"] = judged.tests
    elif study.kind == PRESET:
        degenerate = degenerate_arms(study)
        if degenerate:
            items.append(("list", [f"degenerate arm: {why}" for why in degenerate.values()]))
    has_curves = curves is not None and not curves.empty
    late = list(off_plateau(study, curves).values()) if has_curves else []
    if late:
        items.append(("list", [f"off its plateau: {why}" for why in late]))
    if has_curves and study.preset == "budget":
        converged = convergence_table(curves)
        certified = certified_by_budget(study)
        items += budget_items(converged, budget_figure(curves, certified, out, f"{slug}_learning_curves"))
        csvs.update({f"{slug}_learning_curves": curves, f"{slug}_convergence": converged,
                     f"{slug}_certified_by_budget": certified})
    for family in (BEST_VS_DEFAULT, VS_BASELINE):  # the confirmation's tests (a preset's are its claim's)
        shown = tests_display(tests, family) if len(tests) else pd.DataFrame()
        if not shown.empty:
            items += [("text", TESTS_CAPTION.format(family=family, n=len(shown))), ("table", shown)]
    if confirmation and (None, "decrop_best") in study.arms:
        csvs[f"{_slug(study.study)}_best_vs_default"] = paired_radii(
            study.arms[(None, "decrop_best")].seeds, study.arms[(None, "decrop_default")].seeds, study.profile_radii)
    items += _budget_items(budget)
    if study.notes or notes:
        items.append(("list", study.notes + notes))
    heading = (f"The search {study.study}: confirmation on fresh seeds" if confirmation else
               f"Study {study.study}: preset {study.preset}"
               + (f" ({PRESETS[study.preset].source})" if study.preset in PRESETS else ""))
    return StudySection(heading, items, {slug: table}, csvs, study.preset, claim, judged, values, study.resume,
                        late)
