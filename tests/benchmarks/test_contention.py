"""The contention gate of the benchmarks: CPU accounting of a window, the verdict, and certify.py's refusal."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import certify as bench
from benchmarks.contention import Window, verdict


def _window(share: float, others: float) -> dict:
    return {"wall_s": 1.0, "cpu_share": share, "others_cores": others, "load1": 0.5}


def test_a_sleeping_window_uses_no_cpu_and_a_busy_one_does():
    with Window(threads=1) as idle:
        time.sleep(0.3)
    with Window(threads=1) as busy:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    assert idle.cpu_share < 0.1
    assert busy.cpu_share > 0.3  # a core's worth, less whatever other work took from it


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat")
def test_a_busy_loop_in_another_process_counts_as_others():
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        with Window(threads=1) as window:
            time.sleep(1.0)
    finally:
        loop.kill()
        loop.wait()
    assert window.others_cores > 0.5


def test_verdict_passes_quiet_series_and_names_the_contended_one():
    quiet = {"reference on a": [_window(0.97, 0.02)] * 3, "engine on a": [_window(0.95, 0.05)] * 3}
    assert verdict(quiet, min_cpu_share=0.8, max_others_cores=0.2) is None
    # one contended repetition out of three does not move the medians
    assert verdict({"x": [_window(0.97, 0.0), _window(0.4, 1.5), _window(0.96, 0.1)]}, 0.8, 0.2) is None
    starved = {**quiet, "engine on b": [_window(0.55, 0.1)] * 3}
    assert "engine on b had a median CPU share of 0.55" in verdict(starved, 0.8, 0.2)
    crowded = {**quiet, "peak on b": [_window(0.9, 1.2)] * 3}
    assert "other processes used 1.20 cores during peak on b" in verdict(crowded, 0.8, 0.2)


def _records(share: float, others: float) -> list[dict]:
    """Two rounds of every measurement of one case, engine 2x (fp32) and 4x (bf16) the reference."""
    rates = {("reference", "fp32"): 100.0, ("engine", "fp32"): 200.0, ("engine", "bf16"): 400.0,
             ("peak", "fp32"): 2e11, ("peak", "bf16"): 4e11}
    return [{"round": r, "kind": kind, "case": "small_cnn_28", "precision": precision,
             "rate": rate * (1 + 0.1 * r), "mib": 700.0, "gflop_per_sample": 0.87, **_window(share, others)}
            for r in range(2) for (kind, precision), rate in rates.items()]


@pytest.fixture
def no_measuring(monkeypatch):
    """certify.py's main with the machine probe and the measuring children replaced by fixed numbers."""
    state = {"idle": 0.0, "records": _records(0.95, 0.05)}

    class Idle:
        load, others_cores = 0.3, 0.0

    def probe():
        Idle.others_cores = state["idle"]
        return Idle
    monkeypatch.setattr(bench, "idle_probe", probe)
    monkeypatch.setattr(bench, "run_rounds", lambda cases, settings, rounds: state["records"])
    return state


def test_a_busy_machine_is_refused_before_anything_runs(no_measuring, tmp_path, capsys, monkeypatch):
    no_measuring["idle"] = 1.5
    monkeypatch.setattr(bench, "run_rounds", lambda *a: pytest.fail("measured on a busy machine"))
    out = tmp_path / "certify.md"
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == bench.CONTENDED_EXIT
    assert "refused before starting: other processes are using 1.50 cores" in capsys.readouterr().err
    assert not out.exists()


def test_contended_measurements_are_refused_or_recorded_flagged(no_measuring, tmp_path, capsys):
    out = tmp_path / "certify.md"
    no_measuring["records"] = _records(0.5, 1.0)
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == bench.CONTENDED_EXIT
    assert "refused" in capsys.readouterr().err and not out.exists()
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out), "--force"]) == 0
    text = out.read_text()
    assert "## CONTENDED" in text and "> **CONTENDED** (recorded with --force)" in text


def test_a_quiet_run_is_recorded_with_paired_medians_and_its_cpu_accounting(no_measuring, tmp_path):
    out = tmp_path / "certify.md"
    assert bench.main(["--quick", "--device", "cpu", "--threads", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "CONTENDED" not in text and "quiet:" in text and "2 threads" in text
    row = next(line for line in text.splitlines() if line.startswith("| small_cnn_28"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "105 (100-110)"  # reference samples/s: median (min-max) over the rounds
    assert cells[4] == "2.00x (2.00-2.00)" and cells[7] == "4.00x (4.00-4.00)"  # paired per round
    assert cells[5] == "87% (87-87)"  # 200 samples/s x 0.87 GFLOP over the same round's 200 GFLOP/s peak
    assert cells[11] == "0.95 / 0.95 / 0.95 / 0.95" and cells[12] == "0.05"  # CPU share, others' cores
