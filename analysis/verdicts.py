"""From a study's arms and its declared claim to a verdict word, by one rule.

A preset's `tuning.presets.Claim` says, before any run, which comparisons its verdict rests on. Each comparison
is tested at each of its levels and radii by the seed-level test (`analysis.inference.crossed_test`: the seed is
the unit of replication, arms paired by seed, images crossed with seeds); the tests of one claim are one Holm
family, whatever report shows them. Per test:

- ``better``: *supported* when the Holm-adjusted two-sided p < 0.05 and the difference is positive,
  *contradicted* when it is significant and negative;
- ``similar``: *supported* when the Holm-adjusted TOST p < 0.05 (the 90% interval inside +-margin),
  *contradicted* when the Holm-adjusted test of "outside the margin" is (the 95% interval beyond it);
- ``trend``: the per-seed slope of the gain against log10 of the level, t test over seeds; *supported* when
  significant and negative (the gain falls as the level grows), *contradicted* when significant and positive;
- otherwise *open*. A test whose arm (or reference) is *degenerate* (certifies less than no denoiser at all at
  r = 0) is *not interpretable* and leaves the family; so is a test on fewer than 3 paired seeds (with 2, the
  seed-level test rejects a true null too often: `analysis/inference.py`).

The verdict: *reproduced* when every test is supported; *partly reproduced* when some are; *contradicted* when
some are contradicted and none supported; *not reproduced* when none is either way but every ``better`` or
``trend`` interval excludes the smallest effect worth detecting (5 points); *inconclusive* otherwise; *not
tested* when no test could run. A claim whose declared comparisons did not all run (a study still under way, or
run on fewer levels) is never *reproduced* nor *not reproduced*: those words speak for every comparison, so it is
*inconclusive* until they have run (its Holm family is also smaller than the claim's); what ran can still support
or contradict it. Beside each seed-level test, the image-level test (`analysis.stats.image_level_test`)
describes only the trained models at hand ("for these trained models"). An arm whose learning curve (the
label-free validation agreement, mean over its seeds) ends more than 1 point below its own best is marked *off
its plateau* (`analysis.budget.off_plateau`): its numbers may understate the method; the verdict is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from tuning.presets import BETTER, SAME_LEVEL, SIMILAR, SMALLEST_EFFECT, TREND, Claim, Comparison

from .arms import Arm, StudyArms, certifiable
from .inference import MIN_SEEDS, Components, crossed_test, seeds_for_power
from .runs import level_text
from .stats import certified_matrix, holm, image_level_test, shared_images
from .tables import method_name

SUPPORTED, CONTRADICTED, OPEN, NOT_INTERPRETABLE = "supported", "contradicted", "open", "not interpretable"
NOT_RUN = "not run"  # the end of a note on a declared comparison (or trend level) that has no runs
REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly reproduced", "not reproduced"
CONTRADICTED_CLAIM, INCONCLUSIVE, NOT_TESTED = "contradicted", "inconclusive", "not tested"


COLUMNS = ["comparison", "arm", "reference", "radius", "n_seeds", "n_images", "seeds", "per_seed", "difference",
           "se", "df", "ci_low", "ci_high", "interval", "margin", "p", "p_against", "p_holm", "p_against_holm",
           "n_tests", "outcome", "why", "image_p", "image_difference", "s2_seed", "s2_image", "s2_resid",
           "seeds_needed"]


@dataclass
class Verdict:
    """A claim's verdict: the word, why, the tests it rests on (one row each) and notes."""

    word: str
    reason: str
    tests: pd.DataFrame
    degenerate: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _mean_at(arm: Arm, radius: float) -> float:
    images = arm.images()
    return float(certified_matrix(arm.tables(), images, radius).mean()) if images else math.nan


def degenerate_arms(study: StudyArms) -> dict[tuple[str | None, str], str]:
    """(level, method) -> why, for every denoiser arm whose certified accuracy at r = 0 (mean over its seeds) is
    below the no-denoiser reference of its level: training made the smoothed classifier worse than no denoiser,
    so comparisons with it say nothing about the method."""
    out = {}
    for (level, method), arm in study.arms.items():
        reference = study.reference(level, "none")
        if method == "none" or reference is None:
            continue
        own, none = _mean_at(arm, 0.0), _mean_at(reference, 0.0)
        if own < none:
            where = study.level_name(level)
            out[(level, method)] = (f"{method_name(method)}{f' at {where}' if where else ''} certifies "
                                    f"{100 * own:.1f}% at r = 0, below no denoiser's {100 * none:.1f}%")
    return out


def _arms(study: StudyArms, comparison: Comparison, level: object) -> tuple[Arm | None, Arm | None, str]:
    own = level_text(level)
    ref_level = own if comparison.reference_level == SAME_LEVEL else level_text(comparison.reference_level)
    arm = study.arms.get((own, comparison.arm))
    reference = study.reference(ref_level, comparison.reference)
    return arm, reference, ref_level


def _pair(arm: Arm, reference: Arm, radius: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    seeds = sorted(set(arm.seeds) & set(reference.seeds))
    images = shared_images([*(arm.seeds[s] for s in seeds), *(reference.seeds[s] for s in seeds)])
    return (certified_matrix([arm.seeds[s] for s in seeds], images, radius).astype(int),
            certified_matrix([reference.seeds[s] for s in seeds], images, radius).astype(int), seeds)


def _describe(study: StudyArms, method: str, level: str | None) -> str:
    where = study.level_name(level) if level is not None else ""
    return f"{method_name(method)}{f' at {where}' if where else ''}"


def _pairwise(study: StudyArms, comparison: Comparison, degenerate: dict, notes: list[str]) -> list[dict]:
    records = []
    for level in comparison.levels:
        arm, reference, ref_level = _arms(study, comparison, level)
        if arm is None or reference is None:
            notes.append(f"{comparison.kind} {comparison.arm} vs {comparison.reference} at {level}: {NOT_RUN}")
            continue
        limit = max(certifiable(arm), certifiable(reference))
        for radius in comparison.radii:
            base = {"comparison": comparison.kind, "arm": _describe(study, arm.method, arm.level),
                    "reference": _describe(study, reference.method, reference.level), "radius": radius}
            if radius > limit:
                notes.append(f"{base['arm']} vs {base['reference']} at r = {radius:g}: beyond what n, alpha and "
                             f"sigma can certify; not tested")
                continue
            bad = [degenerate[k] for k in ((arm.level, arm.method), (reference.level, reference.method))
                   if k in degenerate]
            m, r, seeds = _pair(arm, reference, radius)
            record = {**base, "n_seeds": len(seeds), "n_images": m.shape[0], "seeds": ", ".join(map(str, seeds))}
            if bad:
                records.append({**record, "outcome": NOT_INTERPRETABLE, "why": "; ".join(bad)})
                continue
            if len(seeds) < MIN_SEEDS or m.shape[0] < 2:
                records.append({**record, "outcome": NOT_INTERPRETABLE,
                                "why": f"{len(seeds)} paired seed(s): a verdict rests on {MIN_SEEDS} or more"})
                continue
            test = crossed_test(m, r)
            image = image_level_test(m, r)
            record.update(s2_seed=test.components.seed, s2_image=test.components.image,
                          s2_resid=test.components.resid)
            record.update(difference=test.difference, se=test.se, df=test.df,
                          per_seed=" / ".join(f"{100 * d:+.1f}" for d in test.per_seed),
                          image_p=image.p_value, image_difference=image.difference)
            if comparison.kind == BETTER:
                record.update(p=test.p_value, p_against=test.p_value, ci_low=test.interval[0],
                              ci_high=test.interval[1], interval="95%")
            else:
                p_tost, (lo, hi) = test.equivalence(comparison.margin)
                # "beyond the margin": the 95% interval lies wholly outside +-margin
                outside = (abs(test.difference) - comparison.margin) / test.se if test.se > 0 else (
                    math.inf if abs(test.difference) > comparison.margin else -math.inf)
                record.update(p=p_tost, p_against=float(min(1.0, 2 * student_t.sf(outside, test.df))),
                              ci_low=lo, ci_high=hi, interval="90%", margin=comparison.margin)
            records.append(record)
    return records


def _trend(study: StudyArms, comparison: Comparison, degenerate: dict, notes: list[str]) -> list[dict]:
    """One test: the per-seed slope of the gain (arm - reference at the same level, mean over images) against
    log10 of the level, over the seeds every level has."""
    radius = comparison.radii[0]
    gains, levels = {}, []
    for level in comparison.levels:
        arm, reference, _ = _arms(study, comparison, level)
        if arm is None or reference is None:
            notes.append(f"trend: level {level} {NOT_RUN}")
            continue
        if (arm.level, arm.method) in degenerate or (reference.level, reference.method) in degenerate:
            notes.append(f"trend: level {level} left out (a degenerate arm)")
            continue
        m, r, seeds = _pair(arm, reference, radius)
        gains[float(level)] = dict(zip(seeds, (m - r).mean(axis=0)))
        levels.append(float(level))
    base = {"comparison": TREND, "arm": f"gain of {method_name(comparison.arm)} over "
            f"{method_name(comparison.reference)}", "reference": f"slope over log10 {study.factor}",
            "radius": radius}
    seeds = sorted(set.intersection(*(set(g) for g in gains.values()))) if gains else []
    if len(levels) < 3 or len(seeds) < MIN_SEEDS:
        notes.append(f"trend of the gain over {study.factor}: needs 3 or more levels and {MIN_SEEDS} or more seeds "
                     f"run at every level (have {len(levels)} levels, {len(seeds)} seeds); not tested")
        return []
    x = np.log10(levels)
    slopes = np.array([np.polyfit(x, [gains[lv][s] for lv in levels], 1)[0] for s in seeds])
    mean, se = float(slopes.mean()), float(slopes.std(ddof=1) / math.sqrt(len(slopes)))
    df = len(slopes) - 1
    p = float(2 * student_t.sf(abs(mean) / se, df)) if se > 0 else (1.0 if mean == 0 else 0.0)
    half = float(student_t.ppf(0.975, df)) * se
    return [{**base, "n_seeds": len(seeds), "n_images": math.nan, "seeds": ", ".join(map(str, seeds)),
             "difference": mean, "se": se, "df": float(df), "p": p, "p_against": p, "ci_low": mean - half,
             "ci_high": mean + half, "interval": "95%",
             "per_seed": " / ".join(f"{100 * s:+.1f}" for s in slopes)}]


def _outcome(row: dict) -> str:
    if row.get("outcome") == NOT_INTERPRETABLE:
        return NOT_INTERPRETABLE
    sign = -1 if row["comparison"] == TREND else 1  # a trend is claimed negative
    if row["comparison"] == SIMILAR:
        if row["p_holm"] < 0.05:
            return SUPPORTED
        return CONTRADICTED if row["p_against_holm"] < 0.05 else OPEN
    if row["p_holm"] < 0.05:
        return SUPPORTED if sign * row["difference"] > 0 else CONTRADICTED
    return OPEN


def _rule(tests: pd.DataFrame, not_run: int = 0) -> tuple[str, str]:
    """The verdict word and why, from the tests' outcomes; `not_run`: declared comparisons without runs."""
    word, reason = _word(tests)
    if not_run and word in (REPRODUCED, NOT_REPRODUCED):
        return INCONCLUSIVE, (f"{reason}, but {not_run} declared comparison(s) not run yet: {word} only once "
                              f"every one has run")
    if not_run and word != NOT_TESTED:
        return word, f"{reason}; {not_run} declared comparison(s) not run yet"
    return word, reason


def _word(tests: pd.DataFrame) -> tuple[str, str]:
    live = tests[tests["outcome"] != NOT_INTERPRETABLE] if len(tests) else tests
    if live.empty:
        return NOT_TESTED, ("no comparison could be tested" if tests.empty else
                            "every comparison involves a degenerate arm or too few seeds")
    supported, against = (live["outcome"] == SUPPORTED).sum(), (live["outcome"] == CONTRADICTED).sum()
    counts = f"{supported} of {len(live)} tests support the claim, {against} contradict it"
    if supported == len(live):
        return REPRODUCED, counts
    if supported:
        return PARTLY, counts
    if against:
        return CONTRADICTED_CLAIM, counts
    directional = live[live["comparison"] != SIMILAR]
    if len(directional) == len(live):
        excluded = np.where(directional["comparison"] == TREND, directional["ci_low"] > -SMALLEST_EFFECT,
                            directional["ci_high"] < SMALLEST_EFFECT)
        if excluded.all():
            return NOT_REPRODUCED, (f"{counts}; every interval excludes an effect of "
                                    f"{100 * SMALLEST_EFFECT:.0f} points in the claimed direction")
    return INCONCLUSIVE, f"{counts}; the intervals are too wide to rule the claimed effect in or out"


def _seeds_needed(row: dict, family: int) -> float:
    """Seeds for 80% power to detect a `SMALLEST_EFFECT` difference with this test's estimated variance
    components and images, at the level of Holm's first step (0.05 / family size); NaN where not estimable."""
    if pd.isna(row.get("s2_resid")) or pd.isna(row.get("n_images")) or family < 1:
        return math.nan
    components = Components(row["s2_seed"], row["s2_image"], row["s2_resid"])
    needed = seeds_for_power(components, int(row["n_images"]), SMALLEST_EFFECT, alpha=0.05 / family)
    return math.inf if needed is None else float(needed)


def verdict(study: StudyArms, claim: Claim) -> Verdict:
    """Test `claim`'s comparisons on `study` and apply the rule (module doc)."""
    degenerate = degenerate_arms(study)
    notes: list[str] = []
    records = []
    for comparison in claim.comparisons:
        test = _trend if comparison.kind == TREND else _pairwise
        records += test(study, comparison, degenerate, notes)
    tests = pd.DataFrame(records)
    if not tests.empty:
        tests = tests.reindex(columns=list(dict.fromkeys([*tests.columns, *COLUMNS])))
        live = tests["outcome"] != NOT_INTERPRETABLE
        tests.loc[live, "p_holm"] = holm(tests.loc[live, "p"].to_numpy())
        tests.loc[live, "p_against_holm"] = holm(tests.loc[live, "p_against"].to_numpy())
        tests["n_tests"] = int(live.sum())
        tests["outcome"] = [_outcome(row) for row in tests.to_dict("records")]
        tests["seeds_needed"] = [_seeds_needed(row, int(live.sum())) for row in tests.to_dict("records")]
        tests = tests[COLUMNS]
    word, reason = _rule(tests, sum(note.endswith(NOT_RUN) for note in notes))
    return Verdict(word, reason, tests, list(degenerate.values()), notes)
