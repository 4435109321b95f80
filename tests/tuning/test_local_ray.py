"""The local Ray cluster that the sweep starts (tuning/sweep.py: connect()) listens on loopback only, with token
auth and a private token file. Starts a real Ray head in a subprocess (~15-30 s on 2 busy cores): marked ray."""

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (before psutil: Ray's bundled copy is importable once ray is)
import psutil

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray

# What the driver subprocess runs: what the sweep's main() does first (set_environment(), then connect()), then
# it reports the node's ports and waits for stdin.
DRIVER = """
import json, sys
from tuning.sweep import connect, set_environment
set_environment()
connect()
import ray
(node,) = ray.nodes()
print("PORTS " + json.dumps({"metrics_export": node["MetricsExportPort"], "node_manager": node["NodeManagerPort"],
                             "address": node["NodeManagerAddress"]}), flush=True)
sys.stdin.read()
ray.shutdown()
"""
# Listeners that Ray 2.60 cannot bind to loopback on a head started by connect(). Empty: with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every one of them follows the node address 127.0.0.1 (cluster/README.md).
UNBINDABLE: set[str] = set()


def _listeners(root: psutil.Process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name of every listening TCP socket of `root` and its descendants."""
    found = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline())[:80]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = name
        except psutil.Error:  # a worker that exited meanwhile
            continue
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _other_ray_running() -> bool:
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if "gcs_server" in (proc.info["name"] or "") or any("gcs_server" in a for a in proc.info["cmdline"] or []):
                return True
        except psutil.Error:
            continue
    return False


def test_connect_starts_a_loopback_cluster_with_a_private_token():
    if _other_ray_running():
        pytest.skip("another Ray cluster runs on this machine: connect() would join it instead of starting one")
    # Short temp dir (Ray's socket paths must stay under 108 characters) and a home of its own for the token.
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(HOME=str(tmp / "home"), RAY_TMPDIR=str(tmp / "ray"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # until the driver reports its ports (connect() returned)
            lines.append(line)
            if line.startswith("PORTS "):
                break
        else:
            pytest.fail("the driver exited before connecting:\n" + "".join(lines[-30:]))
        ports = json.loads(line.removeprefix("PORTS "))
        output = "".join(lines)
        assert "sweep: local Ray on 127.0.0.1 only" in output, output[-3000:]
        assert ports["address"] == "127.0.0.1"

        # The dashboard agent starts its Prometheus exporter a little after ray.init returns: wait for it.
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 40
        while True:
            listening = _listeners(root)
            if any(port == ports["metrics_export"] for _, port in listening) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        metric_ports = {ports["metrics_export"], 44217, 44227}  # node exporter, autoscaler, dashboard (Ray defaults)
        assert metric_ports <= {port for _, port in listening}, f"metrics exporters not all up: {listening}"
        assert (("127.0.0.1", 8265) in listening), "the dashboard and job server on 127.0.0.1:8265"
        exposed = {f"{addr}:{port} ({name})" for (addr, port), name in listening.items() if not _loopback(addr)}
        assert exposed == UNBINDABLE, f"listening beyond loopback: {sorted(exposed)}"

        token = tmp / "home" / ".ray" / "auth_token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert len(token.read_text().strip()) == 64  # 256 bits as hex, like Ray's own generator
    finally:
        try:
            proc.communicate(input="", timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        shutil.rmtree(tmp, ignore_errors=True)
