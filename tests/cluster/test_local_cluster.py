"""cluster/local.sh brings up a token-protected Ray head on 127.0.0.1 that runs a submitted job, and `down`
stops everything it started. Starts real Ray processes (~1-2 min on 2 busy cores): slow, ray.
"""

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "cluster" / "local.sh"
VENV_BIN = REPO / ".venv" / "bin"

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(args, env, timeout=300, check=True, cwd=REPO):
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture
def local_cluster():
    busy = [p for p in (6379, 8265, 10001) if _port_busy(p)]
    if busy:
        pytest.skip(f"ports {busy} are taken: another Ray cluster runs on this machine")
    # Short, unique state dir inside the repo (git-ignored .cluster/); Ray's socket paths must stay < 108 chars.
    cluster_dir = REPO / ".cluster" / f"t-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DECROP_CLUSTER_DIR": str(cluster_dir), "DECROP_HEAD_CPUS": "2",
           "RAY_ADDRESS": "http://127.0.0.1:8265", "RAY_AUTH_MODE": "token"}
    if VENV_BIN.is_dir():
        env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    try:
        _run(["bash", str(LOCAL_SH), "up"], env)
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
