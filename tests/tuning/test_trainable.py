"""The Tune trainable on its own: one trial of tiny settings run by a plain `Tuner` (no searcher, no scheduler).

Starts a local Ray instance and a real `TorchTrainer` (~1 min on 2 cores): marked ray, kept in the default
selection so CI runs one real Ray Train + Ray Tune + Ray task + MLflow round trip.
"""

import sys
from pathlib import Path

import mlflow
import pytest
import ray
import ray.tune

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from conftest import TINY_SWEEP  # noqa: E402  tests/conftest.py
from decrop.rows import read_rows  # noqa: E402
from decrop.config import load_config, to_flat  # noqa: E402
from tuning.space import default_point  # noqa: E402
from tuning.tracking import StudyTracker, default_tracking_uri  # noqa: E402
from tuning.trainable import StudySettings, load_denoiser_state, tune_trainable  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture
def local_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_trainable_trains_certifies_validation_images_and_logs_one_run(local_ray, tmp_path):
    # its own cache: the classifier (1 epoch) and the samples are made inside the trial, as on a fresh machine
    cfg = load_config(REPO / "configs" / "quick.yaml",
                      [*TINY_SWEEP, "classifier.epochs=1", f"cache_dir={tmp_path / 'cache'}"])
    uri = default_tracking_uri(tmp_path)
    tracker = StudyTracker(uri, "direct")
    parent = tracker.start_sweep("direct", {}, resume=False)
    settings = StudySettings(base=to_flat(cfg), storage=str(tmp_path), tracking_uri=uri, experiment="direct",
                             parent_run_id=parent, cert_shards=2, checkpoint_every=1)
    tuner = ray.tune.Tuner(tune_trainable(settings), param_space=default_point(settings.base),
                           run_config=ray.tune.RunConfig(name="direct", storage_path=str(tmp_path), verbose=0))
    result = tuner.fit()[0]
    assert result.error is None, result.error

    runs = tracker.trial_runs(parent)
    assert len(runs) == 1
    run_id = runs["run_id"].iloc[0]
    run = mlflow.MlflowClient(uri).get_run(run_id)
    # the objective is the validation ACR that was logged, computed from the logged validation rows
    assert result.metrics["objective"] == pytest.approx(run.data.metrics["certify/acr"])
    table = Path(mlflow.MlflowClient(uri).download_artifacts(run_id, "certify/validation.tsv", str(tmp_path)))
    rows = read_rows(table)
    assert [r.idx for r in rows] == list(range(cfg.certify.val_images))  # validation images, not test ones
    assert sum(r.radius for r in rows if r.correct) / len(rows) == pytest.approx(result.metrics["objective"],
                                                                                 abs=1e-4)
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "val/agreement")
    assert [m.step for m in history] == list(range(1, cfg.train.epochs + 1))  # one value per epoch
    assert run.data.params["decrop.alpha"] == str(cfg.decrop.alpha)

    # the weights the trial saved load into the profile's denoiser
    trial_id = run.data.tags["decrop.trial_id"]
    state = load_denoiser_state(tmp_path / "denoisers" / f"{trial_id}.pt")
    assert state and all(v.isfinite().all() for v in state.values())
