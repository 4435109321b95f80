"""Faults that take a study's machinery down, run as real processes: the sweep driver SIGKILLed mid-search and
resumed with --resume, and a second Ray node removed (SIGKILL of its whole process tree) mid-study.

Every Ray here is this test's own (its own temp folder, ports and token; never `ray stop`), and only processes
this test started, or their descendants, are killed. Tiny settings (``TINY_SWEEP``). Times measured on 2 cores
shared with other studies (load ~7): as the docstrings say.
"""

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import ray  # noqa: F401  (before psutil: Ray's bundled copy is importable once ray is)
import psutil

from helpers import TINY_SWEEP
from tuning.space import FinalObjectiveOptunaSearch, define_space
from tuning.sweep import RAY_ENV
from tuning.schema import ATTEMPTS_METRIC, default_tracking_uri

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SWEEP = str(REPO / "tuning" / "sweep.py")


def _env(**extra: str) -> dict[str, str]:
    """The environment of this test's processes: no injected faults, no other cluster, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DECROP_TEST_", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **RAY_ENV, **extra)
    return env


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _kill_all(procs: list[psutil.Process], grace: float = 30.0) -> None:
    """Wait up to `grace` s for `procs` (ours) to exit, then SIGKILL the ones left, by pid."""
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Lines(threading.Thread):
    """Collects a process's output lines; `wait_for(text)` blocks until a line holds `text`."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines, self.changed = stream, [], threading.Condition()
        self.start()

    def run(self):
        for line in self.stream:
            with self.changed:
                self.lines.append(ANSI.sub("", line))  # `ray start` colours its output even into a pipe
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if line is not None and text in line:
                        return line
                if None in self.lines or time.monotonic() > deadline:
                    raise AssertionError(f"no line with {text!r}:\n{''.join(l for l in self.lines if l)[-4000:]}")
                self.changed.wait(timeout=1)

    def text(self) -> str:
        return "".join(line for line in self.lines if line)


def _sweep(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SWEEP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, lines: Lines, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(_tree(psutil.Process(proc.pid)), grace=0)
        pytest.fail(f"the sweep did not finish in {timeout:.0f} s:\n{lines.text()[-4000:]}")


def _runs(uri: str, experiment: str) -> tuple:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _sets(tmp: Path) -> list[str]:
    return [a for s in [*TINY_SWEEP, f"cache_dir={tmp / 'cache'}", f"data.root={tmp / 'data'}"]
            for a in ("--set", s)]


def test_a_killed_sweep_driver_resumes_without_rerunning_or_duplicating(tmp_path):
    """The driver of a 2-trial search SIGKILLed once its first trial finished (its Ray dies with it); then
    `--resume`: the finished trial is not trained again, no MLflow run is duplicated, the Optuna study holds
    exactly the 2 trials, all finished, and the confirmation runs. ~8-12 min (two Ray starts, 5-6 trials)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths
    env = _env(RAY_ADDRESS="local", RAY_TMPDIR=str(ray_tmp))
    args = ["--num-trials", "2", "--max-concurrent", "1", "--study", "killed", "--storage", str(tmp_path),
            "--cert-shards", "1", "--confirm-seeds", "1", *_sets(tmp_path)]
    uri = default_tracking_uri(tmp_path / "killed")
    driver = _sweep(args, env, tmp_path)
    lines = Lines(driver.stdout)
    try:
        lines.wait_for("  done   ", timeout=1800)  # Progress: the first search trial finished
        tree = _tree(psutil.Process(driver.pid))
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    _kill_all(tree[1:])  # its Ray fate-shares with it; whatever is left after 30 s is ours to end
    client, parent, runs = _runs(uri, "killed")
    finished = {r.data.tags["decrop.trial_id"]: r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert finished, "no trial had finished when the driver was killed"

    resumed = _sweep([*args, "--resume"], env, tmp_path)
    resumed_lines = Lines(resumed.stdout)
    code = _finish(resumed, resumed_lines, timeout=2400)
    assert code == 0, resumed_lines.text()[-4000:]
    assert "killed: resuming" in resumed_lines.text()

    client, parent, runs = _runs(uri, "killed")
    trial_ids = [r.data.tags["decrop.trial_id"] for r in runs]
    assert len(trial_ids) == len(set(trial_ids))  # one run per trial: none duplicated
    search = [r for r in runs if "decrop.variant" not in r.data.tags and r.data.tags["decrop.method"] == "decrop"
              and r.data.tags["decrop.seed"] == "0"]
    assert len(search) == 2 and all(r.info.status == "FINISHED" for r in search)
    for trial_id, run_id in finished.items():  # not trained (nor attempted) again
        assert [m.step for m in client.get_metric_history(run_id, ATTEMPTS_METRIC)] == [1]
        assert len(client.get_metric_history(run_id, "time/train")) <= 1
        assert len(client.get_metric_history(run_id, "certify/acr")) <= 1  # nor certified again
    assert {r.data.tags.get("decrop.variant") or r.data.tags["decrop.method"] for r in runs} >= {
        "default", "baseline", "none"}  # the confirmation ran after the resume
    searcher = FinalObjectiveOptunaSearch(space=define_space, metric="objective", mode="max")
    searcher.restore_from_dir(str(tmp_path / "killed" / "tune"))
    states = [t.state for t in searcher._ot_study.trials]
    assert len(states) == 2 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                    for s in states), states


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _node(args: list[str], env: dict) -> tuple[subprocess.Popen, Lines]:
    """`ray start --block` (its daemons stay its children); returns once the node is up."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc.stdout)
    lines.wait_for("Ray runtime started", timeout=300)
    return proc, lines


def test_a_study_finishes_when_a_node_is_removed(tmp_path):
    """A head (1 CPU) and a second node (1 CPU) on this machine, each with its own temp folder and ports; a
    3-trial preset grid; the second node's whole process tree SIGKILLed once it runs a Train worker or a
    certification task: the study still finishes (Train restarts the worker group, Ray reruns the tasks, Tune
    retries a trial), every trial FINISHED. ~6-10 min."""
    head_port, agent_port, agent_port2, client_port, metrics, metrics2, dashboard = _free_ports(7)
    temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    # Two nodes on one machine: they must reach each other on its address (cluster/local.sh --with-worker).
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    procs = []
    try:
        head, head_lines = _node(["--head", f"--port={head_port}", "--num-cpus=1", f"--temp-dir={temp / 'head'}",
                         "--include-dashboard=false", f"--dashboard-port={dashboard}",
                         f"--dashboard-agent-listen-port={agent_port}",
                         f"--ray-client-server-port={client_port}", f"--metrics-export-port={metrics}"], env)
        procs.append(head)
        address = f"{head_lines.wait_for('Local node IP:', 10).split('Local node IP:', 1)[1].strip()}:{head_port}"
        worker, _ = _node([f"--address={address}", "--num-cpus=1", f"--temp-dir={temp / 'worker'}",
                           f"--dashboard-agent-listen-port={agent_port2}", f"--metrics-export-port={metrics2}",
                           "--min-worker-port=21000", "--max-worker-port=21999"], env)
        procs.append(worker)
        args = ["--preset", "sigma", "--levels", "0.25", "--seeds", "0", "--storage", str(tmp_path),
                "--cert-shards", "2", *_sets(tmp_path)]
        driver = _sweep(args, {**env, "RAY_ADDRESS": address}, tmp_path)
        procs.append(driver)
        lines = Lines(driver.stdout)
        deadline, removed = time.monotonic() + 1800, False
        while not removed and driver.poll() is None and time.monotonic() < deadline:
            tree = _tree(psutil.Process(worker.pid))
            busy = [p for p in tree if any(n in " ".join(_cmdline(p)) for n in ("RayTrainWorker", "certify_shard"))]
            if busy:
                for proc in tree:  # the node is lost: its raylet, agents and workers at once
                    try:
                        proc.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        pass
                removed = True
            time.sleep(0.2)
        assert removed, f"the second node never ran a trial's work:\n{lines.text()[-4000:]}"
        code = _finish(driver, lines, timeout=2400)
        assert code == 0, lines.text()[-4000:]
        client, parent, runs = _runs(default_tracking_uri(tmp_path / "quick-sigma"), "quick-sigma")
        assert parent.info.status == "FINISHED" and len(runs) == 3
        assert all(r.info.status == "FINISHED" for r in runs)
        assert all(any(k.startswith("certify_test_") for k in r.data.metrics) for r in runs)
    finally:
        for proc in reversed(procs):
            tree = _tree(psutil.Process(proc.pid)) if proc.poll() is None else []
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
            _kill_all(tree, grace=30)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []
