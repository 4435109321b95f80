"""The Tune trainable on its own: one trial of tiny settings run by a plain `Tuner` (no searcher, no scheduler).

Starts a local Ray instance and a real `TorchTrainer` (~1 min on 2 cores): marked ray, kept in the default
selection so CI runs one real Ray Train + Ray Tune + Ray task + MLflow round trip.
"""

from pathlib import Path

import mlflow
import pytest
import ray
import ray.tune

from helpers import TINY_SWEEP
from decrop.rows import read_rows
from decrop.config import load_config, to_flat
from decrop.prepare import prepare
from tuning.space import default_point
from tuning.schema import default_tracking_uri
from tuning.tracking import MlflowStatusCallback, StudyTracker
from tuning.trainable import StudySettings, load_denoiser_state, tune_trainable

REPO = Path(__file__).resolve().parents[2]

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
                      [*TINY_SWEEP, f"cache_dir={tmp_path / 'cache'}"])
    uri = default_tracking_uri(tmp_path)
    tracker = StudyTracker(uri, "direct")
    parent = tracker.start_sweep("direct", {}, resume=False)
    settings = StudySettings(base=to_flat(cfg), storage=str(tmp_path), tracking_uri=uri, experiment="direct",
                             parent_run_id=parent, cert_shards=2, checkpoint_every=1)
    tuner = ray.tune.Tuner(tune_trainable(settings), param_space=default_point(settings.base),
                           run_config=ray.tune.RunConfig(name="direct", storage_path=str(tmp_path), verbose=0,
                                                         callbacks=[MlflowStatusCallback(tracker, parent)]))
    result = tuner.fit()[0]
    assert result.error is None, result.error

    runs = tracker.trial_runs(parent)
    assert len(runs) == 1
    run_id = runs["run_id"].iloc[0]
    run = mlflow.MlflowClient(uri).get_run(run_id)
    # the objective is the one logged, computed from the logged validation rows
    assert result.metrics["objective"] == pytest.approx(run.data.metrics["certify/objective"])
    table = Path(mlflow.MlflowClient(uri).download_artifacts(run_id, "certify/validation.tsv", str(tmp_path)))
    rows = read_rows(table)
    # validation images by their dataset index: training-split images outside the limited subset, not test ones
    prep = prepare(cfg, log=lambda _: None, evaluate=False)
    assert [r.idx for r in rows] == [int(i) for i in prep.val_indices[:cfg.certify.val_images]]
    assert not {r.idx for r in rows} & set(prep.train_indices.tolist())
    targets = dict(zip(prep.val_indices.tolist(), prep.val_targets.tolist()))
    assert all(r.label == targets[r.idx] for r in rows)  # the classifier's own prediction, no label read
    # certified agreement averaged over the profile's radii, certified in the sequential mode (forward passes
    # per image below n0 + n for images decided early)
    per_radius = [sum(r.correct == 1 and r.radius >= radius for r in rows) / len(rows) for radius in cfg.certify.radii]
    assert sum(per_radius) / len(per_radius) == pytest.approx(result.metrics["objective"])
    assert all(r.samples <= cfg.certify.n0 + cfg.certify.n for r in rows)
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "val/agreement")
    epochs = cfg.train.epochs + cfg.decrop.stage2_epochs
    assert [m.step for m in history] == list(range(1, epochs + 1))  # one value per epoch, both stages
    assert run.data.params["decrop.mixing"] == str(cfg.decrop.mixing)

    # the weights the trial saved load into the profile's denoiser
    trial_id = run.data.tags["decrop.trial_id"]
    state = load_denoiser_state(tmp_path / "denoisers" / f"{trial_id}.pt")
    assert state and all(v.isfinite().all() for v in state.values())
