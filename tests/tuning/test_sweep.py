"""The sweep command: errors before any compute, the search space, and (slow) a real sweep with resume."""

import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import ray

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from conftest import TINY_SWEEP as TINY  # noqa: E402  tests/conftest.py
from tuning import sweep  # noqa: E402
from tuning.space import default_point, define_space, trial_overrides  # noqa: E402
from tuning.tracking import StudyTracker, default_tracking_uri  # noqa: E402


def test_config_error_stops_the_sweep_before_ray_starts(tmp_path, capsys):
    code = sweep.main(["--storage", str(tmp_path), "--set", "train.epoch=3"])
    assert code == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not any(tmp_path.iterdir())  # nothing written, no MLflow store created


def test_an_existing_study_needs_resume(tmp_path, capsys):
    storage = tmp_path / "quick-study"
    storage.mkdir()
    StudyTracker(default_tracking_uri(storage), "quick-study").start_sweep("quick-study", {}, resume=False)
    assert sweep.main(["--storage", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_search_space_samples_every_knob_and_maps_stage2():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        define_space(trial)
        seen |= set(trial.params)
        overrides = trial_overrides(trial.params, {"train.epochs": 20, "decrop.stage2_epochs": 0})
        assert "stage2" not in overrides
        assert overrides["decrop.stage2_epochs"] == (5 if trial.params["stage2"] else 0)
        assert overrides["train.epochs"] + overrides["decrop.stage2_epochs"] == 20  # the same budget either way
        assert ("decrop.beta_scale" in trial.params) == trial.params["stage2"]  # conditional on stage 2
        study.tell(trial, 0.0)
    assert {"decrop.mixing", "decrop.w_cs", "decrop.w_mmd", "decrop.n_interp", "decrop.attack", "stage2",
            "decrop.beta_scale", "decrop.beta_gamma"} <= seen


@pytest.mark.parametrize("epochs", [2, 3, 20, 600])
def test_asha_never_stops_a_trial_at_or_after_its_last_epoch(epochs):
    scheduler = sweep.asha(epochs)
    rungs = [milestone for bracket in scheduler._brackets for milestone, _ in bracket._rungs]
    assert rungs and all(rung < epochs for rung in rungs)
    assert not scheduler._stop_last_trials  # reaching max_t is no reason to stop


def test_default_point_is_in_the_space_and_reproduces_the_profile():
    from decrop.config import from_flat, load_config, to_flat
    for profile in ("quick", "paper"):
        base = to_flat(load_config(REPO / "configs" / f"{profile}.yaml"))
        point = default_point(base)
        study = optuna.create_study()
        study.enqueue_trial(point)
        trial = study.ask()
        define_space(trial)
        assert trial.params == point  # every default lies inside the searched ranges
        assert to_flat(from_flat({**base, **trial_overrides(point, base)})) == base
    off = {**base, "decrop.stage2_epochs": 0}
    assert default_point(off)["stage2"] is False
    on = trial_overrides({"stage2": True}, off)
    assert on["decrop.stage2_epochs"] == round(0.25 * base["train.epochs"])
    assert on["train.epochs"] + on["decrop.stage2_epochs"] == base["train.epochs"]


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_sweep_logs_every_trial_and_resume_duplicates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    args = ["--num-trials", "2", "--study", "tiny", "--storage", str(tmp_path), "--cert-shards", "2"]
    for item in TINY:
        args += ["--set", item]
    assert sweep.main(args) == 0
    ray.shutdown()
    out = capsys.readouterr().out
    assert "decrop_best" in out and "baseline" in out and "objective (val ACR)" in out

    client = mlflow.MlflowClient(default_tracking_uri(tmp_path / "tiny"))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["decrop.attack"] in {"pgd", "autoattack", "apgd_ce", "deepfool", "none"}
        assert "train/loss" in child.data.metrics
        if "certify/acr" in child.data.metrics:  # trials ASHA stopped early have no certification
            paths = {a.path for a in client.list_artifacts(child.info.run_id, "certify")}
            assert {"certify/validation.tsv", "certify/validation_curve.png"} <= paths
    parent = parents[0]
    for label in ("none", "baseline", "decrop_default", "decrop_best"):
        assert f"certify_test_{label}/acr" in parent.data.metrics
    assert parent.data.tags["decrop.best_trial_id"] in {c.data.tags["decrop.trial_id"] for c in children}
    # one trial ran the profile's own values (the search's first point): the defaults are always measured
    assert any(all(c.data.params[k] == parent.data.params[f"base.{k}"] for k in ("decrop.mixing", "decrop.w_cs",
                                                                               "decrop.attack"))
               for c in children)

    # --resume of a finished sweep reruns no trial and creates no MLflow run
    assert sweep.main(args + ["--resume"]) == 0
    ray.shutdown()
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)
