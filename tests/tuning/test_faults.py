"""Faults inside a study, injected and recovered from, on a Ray of this module's own (2 CPUs, its own temp folder):
a trial whose code raises (retried; a grid ends with "rerun with --resume" and the resume reruns only it; a search
goes on), a Ray Train worker killed mid-training (resumes from its checkpoint), a certification task killed (rerun,
identical rows). The driver killed, and a node removed, are in test_fault_restarts.py.

Injection: the test-only trainable `helpers.faulty_trainable` (``DECROP_TEST_FAIL_ONCE``, ``DECROP_TEST_FAIL_ALWAYS``,
set here for the whole Ray; the files they name switch failures on and off; the studies run it in place of
`tuning.trainable.tune_trainable`), and SIGKILL of processes found among this test
process's own descendants (never another Ray on the machine). Tiny settings (``TINY_SWEEP``). Times measured on 2
cores shared with other studies (load ~7): Ray start ~20 s, classifier ~30 s, the tests as their docstrings say.
"""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import ray.tune
import psutil  # Ray's bundled copy: importable once ray is imported

from helpers import FAIL_ALWAYS_ENV, FAIL_ONCE_ENV, TINY_SWEEP, faulty_trainable
from decrop.config import from_flat, load_config, to_flat
from decrop.prepare import prepare
from tuning import studies, sweep
from tuning.certify_tasks import certify_parallel
from tuning.schema import ATTEMPTS_METRIC, FAILURE_TAG, FAILURES_METRIC, default_tracking_uri
from tuning.tracking import MlflowStatusCallback, StudyTracker
from tuning.trainable import StudySettings, tune_trainable

REPO = Path(__file__).resolve().parents[2]

# The killed worker and the killed certification task (~2-3 min with the module's Ray) run in `make test` (CI);
# the two retried-trial tests (~2 and ~5 min) are slow: `make test-all`.
pytestmark = pytest.mark.ray
QUICK = REPO / "configs" / "quick.yaml"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The shared folders: data, a cache with the tiny classifier (trained once, here), the injection files."""
    root = tmp_path_factory.mktemp("faults")
    sets = [*TINY_SWEEP, f"cache_dir={root / 'cache'}", f"data.root={root / 'data'}"]
    prepare(load_config(QUICK, sets), log=lambda _: None, evaluate=False)
    once, always = root / "fail-once", root / "fail-always"
    once.touch()  # present: no injected failure until a test removes it
    return {"root": root, "sets": sets, "once": once, "always": always}


@pytest.fixture(autouse=True)
def injected(monkeypatch):
    """The studies run the test-only trainable, which raises where the injection files say."""
    monkeypatch.setattr(studies, "tune_trainable", faulty_trainable)


@pytest.fixture(scope="module")
def local_ray(faults):
    """This module's Ray: 2 CPUs, its own temp folder (short: Ray's socket paths), never another cluster. Its
    processes inherit the injection variables."""
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", FAIL_ONCE_ENV, FAIL_ALWAYS_ENV)}
    os.environ.update({"RAY_ADDRESS": "local", FAIL_ONCE_ENV: str(faults["once"]),
                       FAIL_ALWAYS_ENV: str(faults["always"])})
    temp = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level="ERROR", _temp_dir=temp)
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _children(uri: str, experiment: str) -> tuple:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _own(name: str) -> list[psutil.Process]:
    """This test process's descendants whose command line (Ray's process title) contains `name`."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if name in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class Killer(threading.Thread):
    """Polls `ready()` and then SIGKILLs the first own descendant named `name`; `killed` holds its pid."""

    def __init__(self, ready, name: str, timeout: float = 600):
        super().__init__(daemon=True)
        self.ready, self.name, self.timeout, self.killed, self.stop = ready, name, timeout, None, False

    def run(self):
        deadline = time.monotonic() + self.timeout
        while not self.stop and time.monotonic() < deadline:
            try:
                if self.ready():
                    victims = _own(self.name)
                    if victims:
                        victims[0].send_signal(signal.SIGKILL)
                        self.killed = victims[0].pid
                        return
            except Exception:  # noqa: BLE001  the store may be busy; try again
                pass
            time.sleep(0.05)


@pytest.mark.slow
def test_a_failing_grid_trial_is_retried_reported_and_rerun_alone_on_resume(faults, local_ray, tmp_path, capsys):
    """Every attempt of the baseline raises, and one other trial's first attempt: that one is retried
    (FailureConfig(max_failures=1)) and finishes, the grid finishes the others and ends with the "rerun with
    --resume" error, each failed attempt in its trial's run; the resume reruns the baseline alone. ~4-6 min."""
    faults["once"].unlink()
    faults["always"].write_text("baseline\n")
    args = ["--preset", "sigma", "--levels", "0.25", "--seeds", "0", "--storage", str(tmp_path), "--cert-shards", "1",
            *_args(faults["sets"])]
    try:
        assert sweep.main(args) == 1
    finally:
        faults["always"].unlink()
        faults["once"].touch()
    err = capsys.readouterr().err
    assert "1 of 3 trials of quick-sigma failed" in err and "rerun the same command with --resume" in err
    client, parent, runs = _children(default_tracking_uri(tmp_path / "quick-sigma"), "quick-sigma")
    assert parent.info.status == "FAILED" and len(runs) == 3
    by_method = {r.data.tags["decrop.method"]: r for r in runs}
    baseline = by_method.pop("baseline")
    assert baseline.info.status == "FAILED"
    assert _steps(client, baseline.info.run_id, ATTEMPTS_METRIC) == [1, 2]
    assert _steps(client, baseline.info.run_id, FAILURES_METRIC) == [1, 2]
    assert all("injected failure" in baseline.data.tags[f"{FAILURE_TAG}{n}"] for n in (1, 2))
    retried = [r for r in by_method.values() if _steps(client, r.info.run_id, FAILURES_METRIC)]
    assert len(retried) == 1  # the one DECROP_TEST_FAIL_ONCE hit: one failure, then a second attempt that finished
    assert _steps(client, retried[0].info.run_id, ATTEMPTS_METRIC) == [1, 2]
    assert "DECROP_TEST_FAIL_ONCE" in retried[0].data.tags[f"{FAILURE_TAG}1"]
    for run in by_method.values():
        assert run.info.status == "FINISHED"
        assert any(k.startswith("certify_test_") for k in run.data.metrics)
    attempts = {r.info.run_id: _steps(client, r.info.run_id, ATTEMPTS_METRIC) for r in by_method.values()}

    assert sweep.main([*args, "--resume"]) == 0, capsys.readouterr().err
    client, parent, runs = _children(default_tracking_uri(tmp_path / "quick-sigma"), "quick-sigma")
    assert parent.info.status == "FINISHED" and len(runs) == 3  # no run duplicated
    for run in runs:
        assert run.info.status == "FINISHED"
        if run.info.run_id == baseline.info.run_id:
            assert _steps(client, run.info.run_id, ATTEMPTS_METRIC) == [1, 2, 3]
            assert len(client.get_metric_history(run.info.run_id, "time/train")) == 1
        else:  # finished trials are not rerun
            assert _steps(client, run.info.run_id, ATTEMPTS_METRIC) == attempts[run.info.run_id]


@pytest.mark.slow
def test_a_search_goes_on_when_a_trial_fails_once(faults, local_ray, tmp_path):
    """Two search trials, the first attempt of one raises: it is retried and the search ends with both trials
    finished and a best trial. Runs the search alone (the confirmation is the grid above). ~3 min."""
    args = sweep.parse_args(["--num-trials", "2", "--study", "retry", "--storage", str(tmp_path), "--cert-shards",
                             "1", *_args(faults["sets"])])
    cfg = load_config(sweep.profile_path("quick"), args.overrides)
    study = sweep.open_study("search", args, to_flat(cfg), concurrent=2, classifier_sha256="0" * 64)
    faults["once"].unlink()
    try:
        best = studies.run_search(study, num_trials=2, seed=0)
    finally:
        faults["once"].touch()
    assert best and "decrop.mixing" in best
    client, parent, runs = _children(study.settings.tracking_uri, "retry")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    failed = {r.info.run_id: _steps(client, r.info.run_id, FAILURES_METRIC) for r in runs}
    assert sorted(failed.values()) == [[], [1]]
    for run in runs:
        assert _steps(client, run.info.run_id, ATTEMPTS_METRIC) == ([1, 2] if failed[run.info.run_id] else [1])
    assert parent.data.tags["decrop.best_trial_id"] in {r.data.tags["decrop.trial_id"] for r in runs}


def test_a_killed_train_worker_resumes_from_its_last_checkpoint(faults, local_ray, tmp_path):
    """A trial's Ray Train worker SIGKILLed after its third epoch: Train restarts the worker group, which resumes
    from the last checkpoint (one per epoch here), not from epoch 0; one MLflow run, continued, FINISHED. ~1-2 min."""
    cfg = load_config(QUICK, [*faults["sets"], "train.epochs=12", "decrop.stage2_epochs=0"])
    uri = default_tracking_uri(tmp_path)
    tracker = StudyTracker(uri, "killed-worker")
    parent = tracker.start_sweep("killed-worker", {}, resume=False)
    settings = StudySettings(base=to_flat(cfg), storage=str(tmp_path), tracking_uri=uri, experiment="killed-worker",
                             parent_run_id=parent, cert_shards=1, checkpoint_every=1, validate=False, test=False)
    point = {"method": "baseline", "seed": 0, "level": None, "overrides": {}, "name": "baseline killed"}
    watcher = StudyTracker(uri, "killed-worker")

    def third_epoch_logged() -> bool:
        runs = watcher.trial_runs(parent)
        return len(runs) == 1 and max(_steps(watcher.client, runs["run_id"].iloc[0], "val/agreement") or [0]) >= 3

    killer = Killer(third_epoch_logged, "RayTrainWorker")
    killer.start()
    tuner = ray.tune.Tuner(tune_trainable(settings), param_space={"point": point},
                           run_config=ray.tune.RunConfig(name="killed", storage_path=str(tmp_path), verbose=0,
                                                         callbacks=[MlflowStatusCallback(tracker, parent)]))
    try:
        result = tuner.fit()[0]
    finally:
        killer.stop = True
    assert killer.killed is not None, "no Train worker was killed"
    assert result.error is None, result.error
    runs = tracker.trial_runs(parent)
    assert len(runs) == 1 and runs["status"].iloc[0] == "FINISHED"
    run_id = runs["run_id"].iloc[0]
    (resumed,) = tracker.client.get_metric_history(run_id, "train/resumed_from_epoch")
    assert 1 <= resumed.value < 12
    steps = _steps(tracker.client, run_id, "val/agreement")
    assert set(steps) == set(range(1, 13)) and steps.count(1) == 1  # not from epoch 0
    assert all(steps.count(e) == 1 for e in range(1, int(resumed.value) + 1))  # epochs before the checkpoint once
    assert _steps(tracker.client, run_id, ATTEMPTS_METRIC) == [1]  # Train recovered it, not a Tune retry


def test_a_killed_certification_task_is_rerun_with_identical_rows(faults, local_ray):
    """A certification shard's worker SIGKILLed mid-task: Ray reruns the task and the merged rows equal those of
    an uninterrupted run (the noise is seeded per image). ~30 s."""
    flat = to_flat(load_config(QUICK, [*faults["sets"], "data.test_every=500", "certify.n=4000"]))
    indices = [int(i) for i in prepare(from_flat(flat), log=lambda _: None, evaluate=False).test_indices]
    reference = certify_parallel(flat, {"none": None}, "test", indices, 2)["none"]
    killer = Killer(lambda: True, "ray::certify_shard", timeout=120)
    killer.start()
    try:
        again = certify_parallel(flat, {"none": None}, "test", indices, 2)["none"]
    finally:
        killer.stop = True
    assert killer.killed is not None, "no certification task was killed"
    assert len(reference) == len(indices) == 20
    strip = lambda rows: [(r.idx, r.label, r.predict, r.radius, r.correct) for r in rows]  # noqa: E731
    assert strip(again) == strip(reference)
