"""analysis/objective.py's hyperparameter importance on hand-made search trials: the in-memory Optuna study holds
each trial with the distributions of tuning/space.py, trials outside the space are left out with a note, and a
parameter that alone determines the objective gets the largest importance from both of Optuna's evaluators."""

import numpy as np
import pandas as pd
import pytest

from analysis.objective import importance, search_study
from tuning.schema import SEARCHED


def trials(n: int, seed: int = 0, objective: str = "decrop.mixing") -> pd.DataFrame:
    """`n` search trials as `analysis.runs.trials_frame` gives them; the objective is one parameter's value.
    Every other trial runs stage 2 (beta_* only there)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        stage2 = i % 2 == 1
        row = {"trial_id": f"t{i:02d}", "run_name": f"trial {i}", "decrop.mixing": rng.uniform(0.2, 0.95),
               "decrop.w_cs": float(np.exp(rng.uniform(-1.3, 2.7))),
               "decrop.w_mmd": float(np.exp(rng.uniform(-1.3, 2.7))),
               "decrop.n_interp": [1, 2, 5][i % 3], "decrop.attack": ["pgd", "none"][(i // 2) % 2], "stage2": stage2,
               "decrop.beta_scale": float(np.exp(rng.uniform(-1, 1))) if stage2 else None,
               "decrop.beta_gamma": float(np.exp(rng.uniform(0.8, 2.9))) if stage2 else None}
        row["objective"] = row[objective]
        rows.append(row)
    return pd.DataFrame(rows)


def test_the_rebuilt_study_has_every_trial_with_the_search_space_distributions():
    frame = trials(10)
    frame.loc[3, "objective"] = np.nan  # stopped by ASHA: not in the study
    frame.loc[4, "decrop.attack"] = "fgsm"  # not in today's space
    study, notes = search_study(frame)
    assert [t.value for t in study.trials] == pytest.approx(list(frame["objective"].drop([3, 4])))
    assert notes == ["trial t04 left out of the importance: 'fgsm' not in ('pgd', 'autoattack', 'deepfool', 'none')."]
    first, second = study.trials[0], study.trials[1]
    assert set(first.params) == set(SEARCHED) - {"decrop.beta_scale", "decrop.beta_gamma"}  # no stage 2
    assert set(second.params) == set(SEARCHED)
    assert second.distributions["decrop.w_cs"].log and second.distributions["decrop.w_cs"].high == 16.0
    assert second.distributions["decrop.n_interp"].choices == (1, 2, 5)


@pytest.mark.parametrize("parameter", ["decrop.mixing", "decrop.w_cs"])
def test_the_parameter_that_sets_the_objective_is_the_most_important(parameter):
    table, notes = importance(trials(50, objective=parameter))
    assert table.iloc[0]["parameter"] == parameter  # PED-ANOVA, by which the table is sorted
    assert table.set_index("parameter")["fanova"].idxmax() == parameter
    assert table["ped_anova"].sum() == pytest.approx(1.0) and table["fanova"].sum() == pytest.approx(1.0)
    assert table.set_index("parameter").loc[["decrop.beta_scale", "decrop.beta_gamma"], "fanova"].isna().all()
    assert notes[0].startswith("Optuna's importance rests on 50 search trials with an objective. PED-ANOVA "
                               "compares the best 5 of them (10%) with all")
    assert "(not beta_scale, beta_gamma, which only some trials have)" in notes[0]
    assert table["sentence"].iloc[0].startswith(f"{parameter.removeprefix('decrop.')}: PED-ANOVA ")


def test_too_few_trials_give_a_note_and_no_table():
    table, notes = importance(trials(2))
    assert table.empty and notes == ["No hyperparameter importance: Optuna's evaluators need at least 3 search "
                                     "trials with an objective and a parameter that varies; here 2 trials and 5 "
                                     "varying parameters."]  # attack and the stage-2 schedule do not vary
    table, notes = importance(trials(3).assign(objective=np.nan))
    assert table.empty and notes == []  # no objective at all: the regression's notes say so
