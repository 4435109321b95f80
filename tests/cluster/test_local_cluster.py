"""cluster/local.sh brings up a token-protected Ray head (and an MLflow server) on 127.0.0.1 that runs submitted
jobs, the sweep among them, and `down` stops everything it started. Starts real Ray processes (~1-2 min on 2 busy
cores, plus ~5 min for the sweep job): slow, ray.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import ray  # noqa: F401  (before psutil: Ray's bundled copy is importable once ray is)
import psutil

from helpers import TINY_SWEEP as TINY

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "cluster" / "local.sh"
VENV_BIN = REPO / ".venv" / "bin"

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _exposed_listeners(cluster_dir: str) -> list[str]:
    """Listening sockets beyond loopback of every process whose command line names `cluster_dir` (the head's
    daemons, the MLflow server) and of their descendants (agents, workers)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(cluster_dir in arg for arg in proc.info["cmdline"] or []):
            roots.append(proc)
    exposed = set()
    for proc in {p for root in roots for p in [root, *root.children(recursive=True)]}:
        try:
            for conn in proc.net_connections(kind="inet"):
                addr = conn.laddr.ip.removeprefix("::ffff:")
                if conn.status == psutil.CONN_LISTEN and addr not in ("127.0.0.1", "::1"):
                    exposed.add(f"{conn.laddr.ip}:{conn.laddr.port} ({' '.join(proc.cmdline())[:60]})")
        except psutil.Error:
            continue
    return sorted(exposed)


def _run(args, env, timeout=300, check=True, cwd=REPO):
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture
def local_cluster():
    busy = [p for p in (6379, 8265, 10001, 5000) if _port_busy(p)]
    if busy:
        pytest.skip(f"ports {busy} are taken: another Ray cluster runs on this machine")
    # Short, unique state dir: Ray's socket paths under it must stay < 108 chars, which a checkout's own .cluster/
    # exceeds when the checkout lies a few folders deep.
    cluster_dir = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))
    env = {**os.environ, "DECROP_CLUSTER_DIR": str(cluster_dir), "DECROP_HEAD_CPUS": "2",
           "RAY_ADDRESS": "http://127.0.0.1:8265", "RAY_AUTH_MODE": "token"}
    if VENV_BIN.is_dir():
        env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    try:
        _run(["bash", str(LOCAL_SH), "up", "--with-mlflow"], env)
        yield env
    finally:
        down = _run(["bash", str(LOCAL_SH), "down"], env, check=False)
        leftovers = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
        shutil.rmtree(cluster_dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert str(cluster_dir) not in leftovers, "down left processes of this cluster running"


def test_local_cluster_runs_a_job(local_cluster, tmp_path):
    env = local_cluster
    for _ in range(30):  # `ray status` has nothing to say until the autoscaler monitor's first report
        status = _run(["bash", str(LOCAL_SH), "status"], env)
        assert "head: running" in status.stdout
        if "Active:" in status.stdout:
            break
        time.sleep(1)
    else:
        pytest.fail(f"ray status never listed an active node:\n{status.stdout}")

    # The job server answers on 127.0.0.1 only with the token, and not on the machine's other addresses.
    anon = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8265/api/version"],
                          capture_output=True, text=True, timeout=30)
    assert anon.stdout == "401"
    sockets = _run(["ss", "-Hltn", "sport = :8265"], env).stdout.splitlines()
    assert [line.split()[3] for line in sockets] == ["127.0.0.1:8265"]  # local address column
    # Nothing of the head (GCS, raylet, agents, metrics exporters) or of MLflow listens beyond loopback.
    assert _exposed_listeners(env["DECROP_CLUSTER_DIR"]) == []
    token = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    assert token.stat().st_mode & 0o077 == 0, "the token file is readable by this user only"

    (tmp_path / "script.py").write_text(
        "import ray\n"
        "ray.init()\n"
        "print('answer', sum(ray.get([ray.remote(lambda x: x * x).remote(i) for i in range(4)])))\n"
    )
    submit = _run(["ray", "job", "submit", "--working-dir", str(tmp_path),
                   "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", "python", "script.py"], env)
    assert "answer 14" in submit.stdout
    assert "succeeded" in submit.stdout + submit.stderr
    jobs = _run(["ray", "job", "list"], env).stdout
    assert "SUCCEEDED" in jobs


def test_sweep_submitted_as_a_job_logs_to_the_tracking_server(local_cluster, tmp_path):
    """The README's cluster command, at tiny scale: `ray job submit --working-dir . -- python tuning/sweep.py`
    against the local head, logging to the MLflow server that `up --with-mlflow` started."""
    env, study = local_cluster, f"job-{uuid.uuid4().hex[:6]}"
    args = ["--num-trials", "2", "--study", study, "--storage", str(tmp_path), "--cert-shards", "2",
            "--mlflow-uri", "http://127.0.0.1:5000"]
    for item in TINY:
        args += ["--set", item]
    submit = _run(["ray", "job", "submit", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
                   "--", "python", "tuning/sweep.py", *args], env, timeout=1500)
    assert "succeeded" in submit.stdout + submit.stderr
    assert "decrop_best" in submit.stdout and "baseline" in submit.stdout  # the final table reached the job log

    client = mlflow.MlflowClient("http://127.0.0.1:5000")
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("decrop.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for label in ("none", "baseline", "decrop_default", "decrop_best"):
        assert f"certify_test_{label}/acr" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "certify")} >= {
        "certify/test_baseline.tsv", "certify/test_decrop_best.tsv"}
