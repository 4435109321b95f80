"""The GPU check's pieces that run without a GPU: the synthetic CIFAR-10, the report, the refusal without CUDA.

The whole check on a CPU (``DECROP_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --quick``, ~3 min with a
Ray Train run and a whole ``python -m decrop run``) is marked slow and ray.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_train
from benchmarks.gpu_report import TARGET_SPS, write
from benchmarks.gpu_train import write_synthetic_cifar
from decrop.data import as_tensors, load_dataset

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_cifar_loads_through_decrops_own_loader(tmp_path):
    write_synthetic_cifar(tmp_path, per_batch=20, test=10)
    train, test = load_dataset("cifar10", tmp_path, train=True), load_dataset("cifar10", tmp_path, train=False)
    images, labels = as_tensors(train)
    assert images.shape == (100, 3, 32, 32) and len(test) == 10
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.2  # random pixels
    assert torch.bincount(labels, minlength=10).tolist() == [10] * 10  # balanced: stratified subsets work


def test_report_names_the_best_variant_and_the_paper_protocols_time(tmp_path, capsys):
    common = {"part": "certify", "device": "cuda", "quick": False, "n0": 100, "n": 10000}
    records = [{**common, "variant": "fp32", "batch": 5000, "status": "ok", "precision": "fp32",
                "samples_per_s": 20_000.0, "tflop_per_s": 34.0, "gpu_peak_gib": 20.0, "paper_protocol_s": 252.5},
               {**common, "variant": "bf16", "batch": 10000, "status": "ok", "precision": "bf16",
                "samples_per_s": 101_000.0, "tflop_per_s": 170.0, "gpu_peak_gib": 12.0, "paper_protocol_s": 50.0},
               {**common, "variant": "bf16-foldbn-compile[reduce-overhead]", "status": "timeout",
                "message": "killed after its 150s limit"}]
    (tmp_path / "certify.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "train.jsonl").write_text(json.dumps(
        {"part": "train", "step": "ray_train", "status": "error", "message": "RuntimeError: no GPU"}) + "\n")
    assert write(tmp_path) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "**Best: bf16 at batch 10000, 101,000 samples/s: the paper protocol" in text
    assert "would take 50 s.**" in text and f"{TARGET_SPS:,} samples/s in bf16: met" in text
    assert "| timeout: killed after its 150s limit |" in text and "| ray_train | - | error | - |" in text
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert raw["summary"]["target_met"] and len(raw["certify"]) == 3


def test_report_shows_what_each_training_step_measured(tmp_path):
    common = {"part": "train", "device": "cuda", "quick": False, "status": "ok", "wall_s": 12.0}
    records = [
        {**common, "step": "train_step", "batch": 32, "denoiser": "dncnn-7x32", "classifier": "small_cnn",
         "stage1_ms": 4.0, "stage1_images_per_s": 8000.0, "stage2_ms": 5.0, "stage2_images_per_s": 6400.0,
         "baseline_ms": 2.0, "baseline_images_per_s": 16000.0},
        {**common, "step": "kseed_step", **{f"k{k}_{part}": value for k in (1, 3, 10) for part, value in (
            ("grouped_ms", 2.0), ("separate_ms", 2.0 * k), ("separate_over_grouped", k))}},
        {**common, "step": "decrop_run", "run_s": 50.0, "export_s": 20.0, "phases_s": {"classifier": 9.0},
         "trained": ["baseline", "decrop"], "export_bytes": 8 * 2 ** 20},
        {**common, "step": "resume", "denoiser": "dncnn-17x64", "classifier": "resnet110", "epochs": 3,
         "resumed_max_diff": 1e-7, "noise_restarted_max_diff": 3e-3},
        {**common, "step": "decrop_run", "status": "skipped", "message": "torchattacks is not installed"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert write(tmp_path) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "stage 1 4.0 ms/step (8,000 images/s)" in text and "baseline 2.0 ms/step (16,000 images/s)" in text
    assert "K=10: grouped 2.0 ms, separate 20.0 ms (10.00x)" in text
    assert "`run` 50 s (classifier 9 s), `export` 20 s (8.0 MiB); trained baseline, decrop" in text
    assert "max weight difference 1.0e-07; with the CUDA noise restarted 3.0e-03" in text
    assert "| decrop_run | - | skipped | 12 | torchattacks is not installed |" in text


def test_without_ray_the_train_step_is_recorded_as_skipped_with_its_reason(tmp_path, monkeypatch):
    # the GPU image's own python3 has torch but neither ray nor mlflow
    monkeypatch.setattr(gpu_train, "missing_modules", lambda *names: ["ray", "mlflow"])
    out = tmp_path / "train.jsonl"
    gpu_train.record(out, "ray_train", {}, lambda: gpu_train.ray_train({}, tmp_path, gpu=False))
    entry = json.loads(out.read_text())
    assert entry["status"] == "skipped" and "ray, mlflow not installed" in entry["message"]
    assert "nccl_step" in entry["message"]  # says what stands in for it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_without_cuda_the_check_stops_at_once_with_a_clear_message(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("DECROP_GPU_CHECK_DEVICE", None)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout.startswith("gpu_check: ") and "torch " in done.stdout.splitlines()[0]
    assert "no CUDA device is visible" in done.stderr and "DECROP_GPU_CHECK_DEVICE=cpu" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "certify.jsonl").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_the_whole_check_runs_on_a_cpu_with_quick_sizes(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DECROP_GPU_CHECK_DEVICE": "cpu"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["variant"] for r in raw["certify"] if r["status"] == "ok"} >= {"fp32", "tf32", "bf16", "bf16-foldbn"}
    assert [(r["step"], r["status"]) for r in raw["train"]] == [(step, "ok") for step in gpu_train.STEPS]
    resume = next(r for r in raw["train"] if r["step"] == "resume")
    assert resume["resumed_max_diff"] == 0.0  # on a CPU, the resumed run is the uninterrupted one, bit for bit
    assert "QUICK VALIDATION RUN" in (tmp_path / "gpu_check.md").read_text()
