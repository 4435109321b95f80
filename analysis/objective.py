"""What drives the search's objective: an OLS regression of the validation objective on the searched hyperparameters,
and Optuna's own hyperparameter importance on the same trials.

OLS: the validation objective on the searched hyperparameters (log10 for log-scaled ones, categorical for attack,
n_interp, stage2) with HC3 standard errors, which do not assume equal noise: an effect size with an interval
per parameter. Importance: the trials rebuilt as an in-memory Optuna study (`search_study`: each trial's
parameters with the distributions `tuning.space.define_space` gives them, its objective as value), evaluated
with PED-ANOVA (Optuna's default: how differently a parameter is distributed among the best trials than among
all) and fANOVA (the share of the objective's variance that a random forest attributes to the parameter alone).
Both are relative (they sum to 1) and need many trials to be stable; the report says how many they rest on.
"""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pandas as pd
import statsmodels.formula.api as smf
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from tuning.schema import PARAMS, SEARCHED, SPACE

from .runs import level_text

PED_ANOVA_QUANTILE = 0.1  # Optuna's default target_quantile: the best 10% of the trials


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
    return (f"{what} goes with a validation objective {direction} by {abs(scale * coef):.3f}{where} (95% CI "
            f"{scale * lo:+.3f} to {scale * hi:+.3f}); {verdict}.")


def regression(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """OLS of the objective on the varying searched hyperparameters with HC3 errors: one row per coefficient
    (term, parameter, coef, ci_low, ci_high, p_value, sentence); empty with a note when there are fewer trials
    than coefficients + 2."""
    if trials.empty:
        return pd.DataFrame(), ["these runs contain no sweep trials: no regression of the objective"]
    scored = trials[trials["objective"].notna()]
    if scored.empty:
        return pd.DataFrame(), [f"none of the {len(trials)} trials has an objective (validation): no regression"]
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


# ---------------------------------------------------------------------------------------------------------
# Optuna's importance


def _trial_params(trial: pd.Series) -> dict[str, object]:
    """The searched parameters of one trial as Optuna saw them (typed; absent ones left out)."""
    params = {}
    for key in SEARCHED:
        value = trial.get(key)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        params[key] = PARAMS[key].cast(level_text(value))
    return params


def _distributions(params: dict[str, object]) -> dict[str, BaseDistribution]:
    """The Optuna distributions of a trial's parameters as the search sampled them (`tuning.schema.SPACE`, as
    `tuning.space.define_space` suggests it); ValueError naming a parameter the space asks for that is missing."""
    out: dict[str, BaseDistribution] = {}
    for p in SPACE:
        if p.only_if is not None and not params.get(p.only_if):
            continue
        if p.name not in params:
            raise ValueError(f"parameter {p.name} missing")
        out[p.name] = (CategoricalDistribution(p.choices) if p.choices is not None else
                       FloatDistribution(p.low, p.high, log=p.log))
    return out


def search_study(trials: pd.DataFrame) -> tuple[optuna.Study, list[str]]:
    """An in-memory Optuna study (maximize) holding the search trials that have an objective, each with its
    parameters under the distributions the search sampled them from; notes name the trials left out (a parameter
    missing, or a value outside today's search space)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study created in memory
    try:
        study = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    notes = []
    for _, trial in trials[trials["objective"].notna()].iterrows():
        params = _trial_params(trial)
        try:
            study.add_trial(create_trial(params=params, distributions=_distributions(params),
                                         value=float(trial["objective"])))
        except ValueError as err:
            name = trial["trial_id"] if isinstance(trial["trial_id"], str) else trial["run_name"]
            notes.append(f"trial {name} left out of the importance: {str(err).splitlines()[0]}")
    return study, notes


def _varying(study: optuna.Study) -> tuple[list[str], list[str]]:
    """The parameters that take two values or more over the study's trials, and those among them present in
    every trial (conditional ones, such as the stage-2 schedule, are not)."""
    trials = study.get_trials(deepcopy=False)
    names = [k for k in SEARCHED if len({level_text(t.params[k]) for t in trials if k in t.params}) > 1]
    return names, [k for k in names if all(k in t.params for t in trials)]


def importance(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Relative importance of each varying searched parameter by PED-ANOVA and fANOVA (seeded) on
    `search_study(trials)`: columns parameter, ped_anova, fanova (NaN: not assessed), sentence; and notes
    (how many trials it rests on, what was left out)."""
    scored = trials[trials["objective"].notna()] if len(trials) else trials
    if scored.empty:
        return pd.DataFrame(), []  # the regression's notes already say why
    study, notes = search_study(trials)
    n = len(study.trials)
    every, complete = _varying(study) if n else ([], [])
    if n < 3 or not every:
        return pd.DataFrame(), notes + [f"No hyperparameter importance: Optuna's evaluators need at least 3 search "
                                        f"trials with an objective and a parameter that varies; here {n} trial"
                                        f"{'s' if n != 1 else ''} and {len(every)} varying parameters."]
    values = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values["ped_anova"] = get_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(target_quantile=PED_ANOVA_QUANTILE), params=every)
        values["fanova"] = (get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                  params=complete) if complete else {})
    notes += sorted({f"Optuna: {w.message}" for w in caught if issubclass(w.category, UserWarning)
                     and not issubclass(w.category, optuna.exceptions.ExperimentalWarning)})
    frame = pd.DataFrame({"parameter": every})
    for name, found in values.items():
        frame[name] = [float(found[k]) if k in found else np.nan for k in every]
    frame = frame.sort_values("ped_anova", ascending=False).reset_index(drop=True)
    frame["sentence"] = [_importance_sentence(row, len(frame)) for row in frame.to_dict("records")]
    left = len(trials) - n
    top = max(1, int(np.ceil(PED_ANOVA_QUANTILE * n)))
    notes.insert(0, f"Optuna's importance rests on {n} search trials with an objective"
                    + (f" ({left} without one, or outside the search space, left out)" if left else "")
                    + f". PED-ANOVA compares the best {top} of them ({PED_ANOVA_QUANTILE:.0%}) with all; Optuna "
                    f"advises at least 5 trials in that top group, so with {n} trials read it as a rough ranking. "
                    f"fANOVA (64 trees, seed 0) assesses the parameters every trial has"
                    + (f" (not {', '.join(k.removeprefix('decrop.') for k in every if k not in complete)}, "
                       f"which only some trials have)" if len(complete) < len(every) else "") + ".")
    return frame, notes


def _importance_sentence(row: dict, n_params: int) -> str:
    name = row["parameter"].removeprefix("decrop.")
    fanova = "not assessed by fANOVA" if np.isnan(row["fanova"]) else f"fANOVA {100 * row['fanova']:.0f}%"
    return (f"{name}: PED-ANOVA {100 * row['ped_anova']:.0f}% of the importance of the {n_params} varying "
            f"parameters, {fanova}.")
