"""The schema module: the search space declared once (what Optuna samples, what the report casts back), and the
dependency rule between the packages (tuning/ never imports analysis/; analysis/ imports only the schema and the
study declarations of tuning/)."""

import ast
from pathlib import Path

import optuna
import pytest

from decrop.config import load_config, to_flat
from tuning.schema import PARAMS, SEARCHED, SPACE, Param, metric_key
from tuning.space import default_point, define_space, trial_overrides

REPO = Path(__file__).resolve().parents[2]


def _ask(sampler, n):
    study = optuna.create_study(sampler=sampler, direction="maximize")
    trials = []
    for i in range(n):
        trial = study.ask()
        define_space(trial)
        study.tell(trial, float(i % 3))
        trials.append(trial)
    return trials


def test_the_space_is_suggested_in_its_declared_order_with_its_distributions():
    for trial in _ask(optuna.samplers.RandomSampler(seed=0), 30):
        names = list(trial.params)
        assert names == [p.name for p in SPACE if p.only_if is None or trial.params[p.only_if]]
        for name, dist in trial.distributions.items():
            p = PARAMS[name]
            if p.choices is not None:
                assert isinstance(dist, optuna.distributions.CategoricalDistribution)
                assert tuple(dist.choices) == p.choices
            else:
                assert (dist.low, dist.high, dist.log) == (p.low, p.high, p.log)
    assert {p.name for p in SPACE if p.only_if == "stage2"} == {"decrop.beta_scale", "decrop.beta_gamma"}


def test_a_searched_value_survives_the_trip_through_mlflow_as_text():
    """Optuna value -> MLflow param (a string) -> the report's cast: the same value and type."""
    for trial in _ask(optuna.samplers.RandomSampler(seed=1), 20):
        for name, value in trial.params.items():
            cast = PARAMS[name].cast(str(value))
            assert cast == value and type(cast) is type(value), (name, value, cast)
    assert PARAMS["decrop.n_interp"].cast("2.0") == 2  # an int column that pandas made float
    assert PARAMS["stage2"].cast("False") is False
    assert PARAMS["decrop.n_interp"].cast("3") == 3  # outside the searched choices: a study may set it
    assert PARAMS["stage2"].cast("yes") is None and PARAMS["decrop.mixing"].cast("x") is None
    assert Param("a", choices=(1, 2)).cast(None) is None
    assert SEARCHED == {"decrop.mixing": "linear", "decrop.w_cs": "log", "decrop.w_mmd": "log",
                        "decrop.n_interp": "category", "decrop.attack": "category", "stage2": "category",
                        "decrop.beta_scale": "log", "decrop.beta_gamma": "log"}


@pytest.mark.parametrize("profile", ["quick", "paper", "studies"])
def test_the_default_point_is_in_the_space_and_reproduces_the_profile(profile):
    base = to_flat(load_config(REPO / "configs" / f"{profile}.yaml"))
    point = default_point(base)
    assert list(point) == [p.name for p in SPACE if p.only_if is None or point[p.only_if]]
    for key, value in trial_overrides(point, base).items():
        assert base[key] == value


def test_metric_names():
    assert metric_key("validation", 0.25) == "certify/acc_r0.25"
    assert metric_key("test_decrop", 0.5) == "certify_test_decrop/acc_r0.50"


def _imports(path: Path) -> set[str]:
    """Top-level package names of every import in `path`, at any depth (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_tuning_never_imports_analysis_and_analysis_reads_only_the_schema_and_the_presets():
    for path in sorted((REPO / "tuning").rglob("*.py")):
        found = {name for name in _imports(path) if name.split(".")[0] == "analysis"}
        allowed = {"analysis.report"} if path.name == "sweep.py" else set()  # the entry point's final report
        assert found <= allowed, f"{path.relative_to(REPO)} imports {sorted(found - allowed)}"
    for path in sorted((REPO / "analysis").rglob("*.py")):
        found = {name for name in _imports(path) if name.split(".")[0] == "tuning"}
        assert found <= {"tuning.schema", "tuning.presets"}, \
            f"{path.relative_to(REPO)} imports {sorted(found)}"
