"""Paired tests of DE-CROP against the baseline, and a regression of the sweep's objective on its hyperparameters.

McNemar: both methods certify the SAME test images (matched on ``idx``), so at radius r each image gives a
pair of certified-at-r outcomes; only the discordant pairs (one method certifies it, the other not) carry
information, and the exact test is a sign test on them. Per run, and pooled over the seeds of a setting by
summing discordant pairs. OLS: validation ACR on the searched hyperparameters (log10 for log-scaled ones,
categorical for attack, n_interp, stage2) with HC3 standard errors, which do not assume equal noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.stats.contingency_tables import mcnemar

from decrop.rows import CertRow

from .runs import SEARCHED, level_text
from .tables import method_name, method_rank


@dataclass
class Statistics:
    """McNemar rows (per run and pooled) and the regression table, each row with a plain-words ``sentence``;
    the notes say what could not be computed and why (and, for the regression, its fit)."""

    mcnemar: pd.DataFrame
    regression: pd.DataFrame
    mcnemar_notes: list[str] = field(default_factory=list)
    regression_notes: list[str] = field(default_factory=list)


def format_p(p: float) -> str:
    return f"{p:.2g}"


def _verdict(only_method: int, only_baseline: int, p: float) -> str:
    if only_method + only_baseline == 0:
        return "the two certify exactly the same images"
    if p < 0.001:
        return "a difference this large is very unlikely under equal performance"
    if p < 0.05:
        return "unlikely under equal performance (significant at the 5% level)"
    return "compatible with equal performance"


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


def _sentence(row: dict) -> str:
    name = method_name(row["method"])
    return (f"{name} certifies {row['only_method']} images at r={row['radius']:.2f} that the baseline misses, "
            f"the baseline {row['only_baseline']} that {name} misses (of {row['n_pairs']} paired images); "
            f"p={format_p(row['p_value'])}: {_verdict(row['only_method'], row['only_baseline'], row['p_value'])}.")


def mcnemar_tests(cert: pd.DataFrame, rows: dict[tuple[str, str], Sequence[CertRow]]) -> tuple[pd.DataFrame,
                                                                                                  list[str]]:
    """Every DE-CROP test label against ``test_baseline`` of the same run at each reported radius (scope
    ``run``), and pooled over the runs (seeds) of a setting (scope ``pooled``, only with several runs)."""
    test = cert[cert["split"] == "test"] if len(cert) else cert
    records, notes = [], []
    for run_id, group in (test.groupby("run_id", sort=False) if len(test) else []):
        if (run_id, "test_baseline") not in rows:
            continue
        base = rows[(run_id, "test_baseline")]
        for label, at_label in group[group["method"].str.startswith("decrop")].groupby("label", sort=False):
            first = at_label.iloc[0]
            n_common = len({r.idx for r in rows[(run_id, label)]} & {r.idx for r in base})
            if n_common < max(len(rows[(run_id, label)]), len(base)):
                notes.append(f"run {first['run_name']}: {label} and test_baseline share {n_common} of their images; "
                             f"only those are paired")
            for radius in sorted(at_label["radius"].unique()):
                counts = mcnemar_counts(rows[(run_id, label)], base, radius)
                records.append({"scope": "run", "setting": first["setting"], "seed": first["seed"],
                                "run": first["run_name"], "method": first["method"], "radius": radius, **counts})
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame, notes
    pooled = []
    for (setting, method, radius), group in frame.groupby(["setting", "method", "radius"], sort=False):
        if len(group) > 1:
            counts = group[["n_pairs", "both", "only_method", "only_baseline", "neither"]].sum().astype(int)
            pooled.append({"scope": "pooled", "setting": setting, "seed": np.nan, "run": f"{len(group)} runs",
                           "method": method, "radius": radius, **counts.to_dict()})
    frame = pd.concat([frame, pd.DataFrame(pooled)], ignore_index=True) if pooled else frame
    frame["p_value"] = [mcnemar_p(r) for r in frame.to_dict("records")]
    frame["sentence"] = [_sentence(r) for r in frame.to_dict("records")]
    frame["seed"] = frame["seed"].astype("Int64")
    rank = frame["method"].map(method_rank)
    frame = frame.assign(_r=rank).sort_values(["setting", "scope", "_r", "seed", "radius"]).drop(columns="_r")
    return frame.reset_index(drop=True), notes


# ---------------------------------------------------------------------------------------------------------
# Regression of the objective


def _design(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str], dict[str, str], list[str]]:
    """The regression data (objective + one column per varying hyperparameter), formula terms, column ->
    searched key, and notes on hyperparameters left out."""
    data = pd.DataFrame({"objective": trials["objective"].astype(float)})
    terms, keys, notes = [], {}, []
    for key, scale in SEARCHED.items():
        values = trials[key]
        present = values.dropna()
        if present.empty:
            continue
        name = key.removeprefix("decrop.")
        if present.map(level_text).nunique() < 2:
            notes.append(f"{name} did not vary over the trials with an objective ({present.iloc[0]}); left out of "
                         f"the regression")
            continue
        if scale == "category":
            data[name] = values.map(level_text)
            terms.append(f"C({name})")
        else:
            column = np.log10(values.astype(float)) if scale == "log" else values.astype(float)
            name = f"log10_{name}" if scale == "log" else name
            # beta_* exist only with stage 2: the others get the mean, so the coefficient is the effect among
            # stage-2 trials and the stage2 term compares the two groups at the average schedule.
            data[name] = column.fillna(column.mean())
            terms.append(name)
        keys[name] = key
    return data, terms, keys, notes


def _coefficient_sentence(term: str, key: str, coef: float, lo: float, hi: float, level: str, ref: str) -> str:
    if np.isnan(lo) or np.isnan(hi):
        verdict = "no interval (a trial has leverage 1, so HC3 errors are undefined)"
    elif lo > 0 or hi < 0:
        verdict = "the interval excludes 0: a clear effect in these trials"
    else:
        verdict = "the interval includes 0: no clear effect"
    name = key.removeprefix("decrop.")
    scale = 0.1 if SEARCHED[key] == "linear" else 1.0
    what = {"log": f"{name} 10 times larger", "linear": f"{name} larger by 0.1",
            "category": f"{name} = {level} instead of {ref}"}[SEARCHED[key]]
    where = " (among trials with stage 2)" if key in ("decrop.beta_scale", "decrop.beta_gamma") else ""
    direction = "higher" if coef >= 0 else "lower"
    return (f"{what} goes with a validation ACR {direction} by {abs(scale * coef):.3f}{where} (95% CI "
            f"{scale * lo:+.3f} to {scale * hi:+.3f}); {verdict}.")


def regression(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """OLS of the objective on the varying searched hyperparameters with HC3 errors: one row per coefficient
    (term, parameter, coef, ci_low, ci_high, p_value, sentence); empty with a note when there are fewer trials
    than coefficients + 2."""
    if trials.empty:
        return pd.DataFrame(), ["these runs contain no sweep trials: no regression of the objective"]
    scored = trials[trials["objective"].notna()]
    if scored.empty:
        return pd.DataFrame(), [f"none of the {len(trials)} trials has an objective (validation ACR): no regression"]
    data, terms, keys, notes = _design(scored)
    n_coef = sum(data[t[2:-1]].nunique() - 1 if t.startswith("C(") else 1 for t in terms)
    if not terms:
        return pd.DataFrame(), notes + ["no searched hyperparameter varies: no regression"]
    if len(data) < n_coef + 2:
        return pd.DataFrame(), notes + [
            f"{len(data)} trials have an objective, but a regression on the {len(terms)} varying hyperparameters "
            f"has {n_coef} coefficients plus an intercept and needs at least {n_coef + 2} trials: not fitted"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample warnings; the notes say how many trials there are
        fit = smf.ols("objective ~ " + " + ".join(terms), data=data).fit(cov_type="HC3")
        ci = fit.conf_int(0.05)
    records = []
    for term in fit.params.index:
        if term == "Intercept":
            continue
        name = term[2:term.index(")")] if term.startswith("C(") else term
        level = term.split("[T.")[1].rstrip("]") if "[T." in term else ""
        ref = sorted(data[name].unique())[0] if term.startswith("C(") else ""
        lo, hi = float(ci.loc[term, 0]), float(ci.loc[term, 1])
        records.append({"term": term, "parameter": keys[name], "coef": float(fit.params[term]), "ci_low": lo,
                        "ci_high": hi, "p_value": float(fit.pvalues[term]),
                        "sentence": _coefficient_sentence(term, keys[name], float(fit.params[term]), lo, hi,
                                                          level, ref)})
    notes.append(f"OLS of the validation ACR on {len(terms)} hyperparameters over {len(data)} trials, R² "
                 f"{fit.rsquared:.2f}, HC3 standard errors. Exploratory: TPE chose these points adaptively, so the "
                 f"coefficients describe these trials, not a designed experiment.")
    return pd.DataFrame(records), notes


def statistics(cert: pd.DataFrame, rows: dict[tuple[str, str], Sequence[CertRow]],
               trials: pd.DataFrame) -> Statistics:
    """McNemar tests of each DE-CROP label against the baseline and the objective's regression."""
    tests, notes = mcnemar_tests(cert, rows)
    table, regression_notes = regression(trials)
    return Statistics(tests, table, notes, regression_notes)
