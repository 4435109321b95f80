"""tuning.tracking against a real local MLflow store (SQLite in tmp_path): the run layout of docs/architecture.md,
resume without duplicates, certification metrics and artifacts, and the Tune status callback."""

import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from decrop.rows import CertRow, average_certified_radius, certified_accuracy, read_rows
from decrop.config import ExperimentConfig, to_flat
from tuning.schema import (ATTEMPTS_METRIC, FAILURE_TAG, FAILURES_METRIC, default_tracking_uri,
                           resolve_tracking_uri)
from tuning.tracking import MlflowStatusCallback, StudyTracker, git_commit, plot_certified_curve

ROWS = [  # idx label predict radius correct time samples: certified correct, wrong, abstain, small radius
    CertRow(0, 3, 3, 0.8125, 1, 0.5, 1100),
    CertRow(1, 5, 2, 0.4, 0, 0.25, 1100),
    CertRow(2, 1, -1, 0.0, 0, 0.125, 1100),
    CertRow(3, 7, 7, 0.1875, 1, 0.75, 1100),
]
RADII = (0.0, 0.25, 0.5)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty SQLite store, made once: creating one runs MLflow's migrations (~7 s here)."""
    root = tmp_path_factory.mktemp("template")
    MlflowClient(default_tracking_uri(root)).search_experiments()
    return root / "mlflow.db"


@pytest.fixture
def tracker(tmp_path, empty_store) -> StudyTracker:
    shutil.copy(empty_store, tmp_path / "mlflow.db")  # a fresh store per test, without the migration cost
    return StudyTracker(default_tracking_uri(tmp_path), "study-exp")


def count_runs(tracker: StudyTracker) -> int:
    return len(tracker.client.search_runs([tracker.experiment_id]))


def test_tracking_uris_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(Path("store"))
    assert uri == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    assert resolve_tracking_uri(None, Path("store")) == uri
    assert resolve_tracking_uri("http://127.0.0.1:5000", Path("x")) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///rel/m.db", Path("x")) == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", Path("x")) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("other.db", Path("x")) == f"sqlite:///{tmp_path.resolve()}/other.db"
    assert resolve_tracking_uri("mlruns", Path("x")) == (tmp_path.resolve() / "mlruns").as_uri()


def test_parent_and_children_layout(tracker, tmp_path):
    flat = to_flat(ExperimentConfig())
    parent = tracker.start_sweep("s1", {"num_samples": 4, "metric": "certify/acr"}, resume=False)
    children = {t: tracker.trial_run(parent, t, f"trial_{t}", {**flat, "train.lr": 0.01 * (i + 1)})
                for i, t in enumerate(["a0001", "a0002"])}

    p = tracker.client.get_run(parent)
    assert p.data.tags["decrop.study"] == "s1" and p.data.tags["decrop.role"] == "sweep"
    assert p.data.tags["mlflow.runName"] == "s1"
    assert p.data.params == {"num_samples": "4", "metric": "certify/acr"}
    for trial_id, run_id in children.items():
        run = tracker.client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["decrop.trial_id"] == trial_id and run.data.tags["decrop.role"] == "trial"
        assert run.data.tags["mlflow.runName"] == f"trial_{trial_id}"
        assert run.data.tags["decrop.git_commit"] == tracker.commit
        assert run.data.params.keys() == flat.keys()  # the flat config, dotted keys kept
        assert run.data.params["sigma"] == str(flat["sigma"])
        assert run.data.params["certify.radii"] == str(flat["certify.radii"])
    assert tracker.client.get_run(children["a0002"]).data.params["train.lr"] == "0.02"

    found = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(children.values())
    frame = tracker.trial_runs(parent)
    assert sorted(frame["trial_id"]) == ["a0001", "a0002"] and set(frame["status"]) == {"RUNNING"}
    assert sorted(frame["params.train.lr"]) == ["0.01", "0.02"]
    # Artifacts live next to the store, not in whatever directory the process happened to start in.
    assert tracker.client.get_run(parent).info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_metrics_keep_their_steps(tracker):
    parent = tracker.start_sweep("s", {}, resume=False)
    run = tracker.trial_run(parent, "t0", "t0", {})
    for epoch, loss in enumerate([1.0, 0.5, 0.25]):
        tracker.log_metrics(run, {"train/loss": loss, "val/agreement": 0.5 + 0.1 * epoch}, step=epoch)
    history = tracker.client.get_metric_history(run, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert tracker.trial_runs(parent)["metrics.val/agreement"].iloc[0] == pytest.approx(0.7)


def test_log_certification_metrics_and_artifacts(tracker, tmp_path):
    run = tracker.trial_run(tracker.start_sweep("s", {}, resume=False), "t0", "t0", {})
    logged = tracker.log_certification(run, ROWS, RADII, "validation")
    tracker.log_certification(run, ROWS[:2], RADII, "test")

    metrics = tracker.client.get_run(run).data.metrics
    expected = certified_accuracy(ROWS, RADII)
    assert metrics["certify/acc_r0.00"] == expected[0.0] == 0.5
    assert metrics["certify/acc_r0.25"] == expected[0.25] == 0.25
    assert metrics["certify/acc_r0.50"] == expected[0.5] == 0.25
    assert metrics["certify/acr"] == pytest.approx(average_certified_radius(ROWS)) == pytest.approx(1.0 / 4)
    assert logged == {k: metrics[k] for k in logged}
    assert metrics["certify_test/acc_r0.25"] == certified_accuracy(ROWS[:2], [0.25])[0.25]
    assert metrics["certify_test/acr"] == pytest.approx(average_certified_radius(ROWS[:2]))

    listed = {a.path for a in tracker.client.list_artifacts(run, "certify")}
    assert listed == {"certify/validation.tsv", "certify/validation_curve.png", "certify/test.tsv",
                      "certify/test_curve.png"}
    local = Path(tracker.client.download_artifacts(run, "certify", str(tmp_path / "dl")))
    assert read_rows(local / "validation.tsv") == ROWS
    assert (local / "validation_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_methods_test_curve_is_also_logged_under_one_name(tracker):
    """The chart view overlays runs' curves only under one metric name: a trial's test curve is logged as
    certify_test_<method>/curve and as certify_test/curve, step = radius in hundredths."""
    run = tracker.trial_run(tracker.start_sweep("s", {}, resume=False), "t0", "t0", {})
    tracker.log_certification(run, ROWS, RADII, "test_decrop")
    own, shared = (sorted((m.step, m.value) for m in tracker.client.get_metric_history(run, key))
                   for key in ("certify_test_decrop/curve", "certify_test/curve"))
    assert own == shared and own[0] == (0, certified_accuracy(ROWS, [0.0])[0.0])
    assert [s for s, _ in own] == list(range(len(own)))


def test_resume_reuses_parent_and_trial_runs(tracker):
    parent = tracker.start_sweep("s", {"num_samples": 4}, resume=False)
    child = tracker.trial_run(parent, "t0", "t0", {"sigma": 0.25})
    tracker.finish(parent, "KILLED")  # the driver was interrupted

    again = StudyTracker(tracker.tracking_uri, tracker.experiment)  # a new driver process
    assert again.start_sweep("s", {"num_samples": 8, "extra": 1}, resume=True) == parent
    assert again.run_status(parent) == "RUNNING"
    assert again.client.get_run(parent).data.params == {"num_samples": "4", "extra": "1"}  # immutable kept
    assert again.trial_run(parent, "t0", "t0", {"sigma": 0.25, "seed": 1}) == child
    assert again.client.get_run(child).data.params == {"sigma": "0.25", "seed": "1"}
    assert count_runs(again) == 2
    assert len(again.trial_runs(parent)) == 1


def test_start_sweep_twice_without_resume_raises(tracker):
    tracker.start_sweep("s", {}, resume=False)
    with pytest.raises(ValueError, match="--resume"):
        tracker.start_sweep("s", {}, resume=False)
    other = tracker.start_sweep("s2", {}, resume=False)  # another study in the same experiment is fine
    assert count_runs(tracker) == 2 and tracker.run_status(other) == "RUNNING"


def test_finish_sets_status(tracker):
    run = tracker.trial_run(tracker.start_sweep("s", {}, resume=False), "t0", "t0", {})
    tracker.finish(run, "FAILED")
    assert tracker.run_status(run) == "FAILED"
    with pytest.raises(ValueError, match="FINISHED"):
        tracker.finish(run, "DONE")


def test_git_commit(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit())
    assert git_commit(tmp_path) == "unknown"
    assert git_commit(tmp_path / "missing") == "unknown"


def test_status_callback_marks_trial_runs(tracker):
    parent = tracker.start_sweep("s", {}, resume=False)
    failed = tracker.trial_run(parent, "t_err", "t_err", {})
    done = tracker.trial_run(parent, "t_ok", "t_ok", {})
    callback = pickle.loads(pickle.dumps(MlflowStatusCallback(tracker, parent)))  # Tune may pickle it
    trial = lambda trial_id: SimpleNamespace(trial_id=trial_id, config={"sigma": 0.5})  # noqa: E731

    callback.on_trial_error(iteration=3, trials=[], trial=trial("t_err"))
    callback.on_trial_complete(iteration=3, trials=[], trial=trial("t_err"))  # must not hide the failure
    callback.on_trial_complete(iteration=4, trials=[], trial=trial("t_ok"))
    callback.on_trial_error(iteration=5, trials=[], trial=trial("t_early"))  # died before making its run
    assert tracker.run_status(failed) == "FAILED"
    assert tracker.run_status(done) == "FINISHED"
    early = tracker.find_trial_run(parent, "t_early")
    assert early is not None and tracker.run_status(early) == "FAILED"
    assert tracker.client.get_run(early).data.params == {"sigma": "0.5"}
    assert count_runs(tracker) == 4


def test_status_callback_logs_each_epoch_result_at_its_epoch(tracker):
    """Per-epoch results (rank 0's reports, forwarded to Tune) go to the trial's run at step = epoch; Tune's own
    fields and a trial's final result (no epoch: the trial logs it itself) do not."""
    parent = tracker.start_sweep("s", {}, resume=False)
    run = tracker.trial_run(parent, "t1", "t1", {})
    callback = MlflowStatusCallback(tracker, parent)
    trial = SimpleNamespace(trial_id="t1", config={})
    tune_fields = {"training_iteration": 1, "time_this_iter_s": 2.0, "done": False, "trial_id": "t1",
                   "config": {"seed": 0}, "checkpoint_path": "/x"}
    for epoch, agreement in ((1, 0.5), (2, 0.75)):
        callback.on_trial_result(iteration=epoch, trials=[], trial=trial, result={
            "train/loss": 1.0 / epoch, "val/agreement": agreement, "epoch": epoch, **tune_fields})
    callback.on_trial_result(iteration=3, trials=[], trial=trial, result={
        "train/resumed_from_epoch": 2, "train/loss": 0.25, "val/agreement": 0.8, "epoch": 3, **tune_fields})
    callback.on_trial_result(iteration=4, trials=[], trial=trial, result={"val/agreement": 0.1, **tune_fields})
    history = tracker.client.get_metric_history
    assert [(m.step, m.value) for m in history(run, "val/agreement")] == [(1, 0.5), (2, 0.75), (3, 0.8)]
    assert [(m.step, m.value) for m in history(run, "train/resumed_from_epoch")] == [(3, 2.0)]
    assert set(tracker.client.get_run(run).data.metrics) == {"train/loss", "val/agreement",
                                                               "train/resumed_from_epoch"}


def test_every_attempt_and_failure_of_a_trial_is_in_its_one_run(tracker, tmp_path):
    """A retried trial: attempt 1, its failure (metric and tag with the error's last line; the run stays RUNNING
    for the retry), attempt 2, its result; a later attempt finds the result (the trial is not redone)."""
    parent = tracker.start_sweep("s", {}, resume=False)
    run = tracker.trial_run(parent, "t1", "t1", {})
    assert tracker.start_attempt(run) == 1 and tracker.saved_result(run) is None
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1 (occurred at 2026-01-01)\nTraceback ...\nRuntimeError: injected\n")
    trial = SimpleNamespace(trial_id="t1", config={}, num_failures=1, error_file=str(error))
    MlflowStatusCallback(tracker, parent).on_trial_recover(iteration=1, trials=[], trial=trial)
    assert tracker.run_status(run) == "RUNNING"
    assert tracker.start_attempt(tracker.trial_run(parent, "t1", "t1", {})) == 2
    tracker.save_result(run, {"objective": 0.25, "val/agreement": float("nan")})
    data = tracker.client.get_run(run).data
    assert data.tags[f"{FAILURE_TAG}1"] == "RuntimeError: injected"
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run, FAILURES_METRIC)] == [(1, 1.0)]
    assert [m.step for m in tracker.client.get_metric_history(run, ATTEMPTS_METRIC)] == [1, 2]
    assert tracker.saved_result(run)["objective"] == 0.25 and count_runs(tracker) == 2


def test_plot_certified_curve_two_labels(tmp_path):
    path = plot_certified_curve({"validation": ROWS, "test": ROWS[:2]}, tmp_path / "sub" / "c.png", "curve")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    all_abstain = [CertRow(0, 1, -1, 0.0, 0, 0.1, 10)]  # no certified radius: still a valid plot
    assert plot_certified_curve({"x": all_abstain}, tmp_path / "a.png", "none").exists()


def test_child_runs_are_found_again_by_their_tags(tracker):
    parent = tracker.start_sweep("m", {}, resume=False, role="preset")
    seed0 = {"decrop.level": "0.5", "decrop.seed": "0"}
    first = tracker.child_run(parent, seed0, "sigma0.5/seed0", {"sigma": 0.5})
    assert tracker.child_run(parent, seed0, "sigma0.5/seed0", {"sigma": 0.5}) == first
    second = tracker.child_run(parent, {**seed0, "decrop.seed": "1"}, "sigma0.5/seed1", {})
    assert second != first and tracker.find_child(parent, {"decrop.seed": "1"}) == second
    assert tracker.find_child(parent, {"decrop.level": "0.25"}) is None
    assert tracker.client.get_run(first).data.tags["decrop.role"] == "trial"
    # a preset's parent and a sweep's parent of the same name are different runs
    assert tracker.start_sweep("m", {}, resume=False) != parent
    with pytest.raises(ValueError, match="role sweep or preset, not 'study'"):  # a role the report cannot read
        tracker.start_sweep("n", {}, resume=False, role="study")
