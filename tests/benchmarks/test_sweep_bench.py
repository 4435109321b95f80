"""The whole-sweep benchmark's accounting: process kinds, and the process tree it sums."""

import os
import subprocess
import sys
import time

from benchmarks.sweep import process_kind, tree


def test_process_kinds_name_what_holds_memory():
    assert process_kind(["ray::RayTrainWorker"]) == "ray::RayTrainWorker"
    assert process_kind(["ray-dashboard-NodeHead-0 (/venv/bin/python -B -c from x)"]) == "ray-dashboard-NodeHead-0"
    assert process_kind(["/venv/bin/python", "tuning/sweep.py", "--preset", "sigma"]) == "sweep.py"
    assert process_kind(["/venv/bin/python", "-B", "-m", "pytest", "-q"]) == "pytest"
    assert process_kind(["/venv/bin/python", "-c", "print(1)"]) == "python -c"
    assert process_kind(["/usr/lib/ray/gcs_server", "--port=1"]) == "gcs_server"


def test_tree_counts_descendants_and_their_cpu_time():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; t = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\n"
                              "subprocess.run([sys.executable, '-c', 'import time; time.sleep(3)'])"])
    try:
        time.sleep(1.5)
        found = tree(child.pid)
        assert child.pid in found and len(found) == 2  # the child and its grandchild
        assert found[child.pid][1] >= 0.2  # its CPU seconds
        assert found[child.pid][0] > 0  # its RSS
    finally:
        child.kill()
        child.wait()
    assert os.getpid() not in found
