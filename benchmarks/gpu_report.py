"""The GPU check's first line and its report (see ``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_report.py env   --device cuda --out OUT   # one line: GPU, driver, torch, CUDA, cuDNN
    python benchmarks/gpu_report.py write --out OUT                 # OUT/*.jsonl -> gpu_check.md + gpu_check.json

``env`` writes ``OUT/env.json`` and exits 2, with a one-line reason, when the device is CUDA and torch sees no
GPU (set ``DECROP_GPU_CHECK_DEVICE=cpu`` to validate the scripts on a CPU). ``write`` reads the records that
`gpu_certify` and `gpu_train` appended to ``OUT/certify.jsonl`` and ``OUT/train.jsonl``, writes the Markdown
table and all raw records as one JSON file, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

PAPER_IMAGES, PAPER_SAMPLES = 500, 10_100  # every 20th CIFAR-10 test image; n0 100 + n 10,000 each
TARGET_SPS = 85_000  # bf16 samples/s at which the paper protocol takes under a minute


def missing_modules(*names: str) -> list[str]:
    """Those of `names` that cannot be imported here."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def nvidia_smi() -> str:
    """GPU name, driver and memory from nvidia-smi, or why it could not be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi unavailable ({type(err).__name__})"
    return out.stdout.strip().replace("\n", "; ") if out.returncode == 0 else f"nvidia-smi failed: {out.stderr.strip()}"


def env(device: str, out: Path) -> int:
    try:  # what decrop itself needs; ray and mlflow only the Ray Train step, which says so if they are missing
        import pandas  # noqa: F401
        import scipy  # noqa: F401
        import torch
        import torchvision  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as err:
        print(f"gpu_check: {sys.executable} lacks decrop's dependencies ({err}); use the project's venv "
              f"(PYTHON=/path/to/.venv/bin/python)", file=sys.stderr)
        return 2
    ray = not missing_modules("ray", "mlflow")

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "nvidia_smi": nvidia_smi(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device": device,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.executable, "ray_and_mlflow": ray}
    print(f"gpu_check: {info['nvidia_smi']} | torch {info['torch']}, CUDA build {info['cuda_build']}, cuDNN "
          f"{info['cudnn']}, CUDA available {info['cuda_available']}, checking on {device}; {sys.executable}"
          f"{'' if ray else ' (no ray/mlflow: the Ray Train step will be skipped)'}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible to torch {torch.__version__} (built for CUDA "
              f"{torch.version.cuda}); run it on a GPU machine, or set DECROP_GPU_CHECK_DEVICE=cpu (with --quick) "
              f"to check the scripts on a CPU.", file=sys.stderr)
        return 2
    return 0


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def certify_section(records: list[dict]) -> tuple[list[str], dict]:
    lines = ["## Certification throughput", "",
             "DnCNN-17x64 + ResNet-110 at 3x32x32 (random weights), channels_last, cudnn.benchmark, the engine's "
             "`certify_indices`, n0 + n samples per image. Paper protocol = 500 images x 10,100 samples.", "",
             "| variant | batch | samples/s | TFLOP/s | GPU peak GiB | compile/warm-up s | paper protocol | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") == "ok":
            peak = f"{r['gpu_peak_gib']:.1f}" if r.get("gpu_peak_gib") is not None else "-"
            setup = f"{r['setup_s']:.0f}" if "setup_s" in r else "-"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['samples_per_s']:,.0f} | {r['tflop_per_s']:.1f} | "
                         f"{peak} | {setup} | {r['paper_protocol_s']:.0f} s | ok |")
        else:
            lines.append(f"| {r.get('variant', '?')} | {r.get('batch', '-')} | - | - | - | - | - | "
                         f"{r.get('status')}: {r.get('message', '')} |")
    ok = [r for r in records if r.get("status") == "ok"]
    summary = {}
    if ok:
        best = max(ok, key=lambda r: r["samples_per_s"])
        bf16 = [r for r in ok if r.get("precision") == "bf16"]
        best_bf16 = max(bf16, key=lambda r: r["samples_per_s"]) if bf16 else None
        summary = {"best_variant": best["variant"], "best_batch": best["batch"],
                   "best_samples_per_s": best["samples_per_s"],
                   "paper_protocol_s": PAPER_IMAGES * PAPER_SAMPLES / best["samples_per_s"],
                   "best_bf16_samples_per_s": best_bf16["samples_per_s"] if best_bf16 else None,
                   "target_bf16_samples_per_s": TARGET_SPS,
                   "target_met": bool(best_bf16 and best_bf16["samples_per_s"] >= TARGET_SPS)}
        compile_note = f" (+ {best['setup_s']:.0f} s to compile, once)" if "setup_s" in best else ""
        lines += ["", f"**Best: {best['variant']} at batch {best['batch']}, {best['samples_per_s']:,.0f} samples/s: "
                      f"the paper protocol (500 images, n0 100 + n 10,000) would take "
                      f"{summary['paper_protocol_s']:.0f} s{compile_note}.** Target >= {TARGET_SPS:,} samples/s in bf16: "
                      f"{'met' if summary['target_met'] else 'NOT met'}."]
    return lines, summary


def _train_details(r: dict) -> str:
    """One table cell: what a training step's record measured."""
    step = r["step"]
    if step == "nccl_step":
        return (f"setup {r['setup_s']:.1f} s, first step {r['first_step_s']:.2f} s, then "
                f"{r['step_s'] * 1e3:.0f} ms/step (batch {r['batch']})")
    if step == "ray_train":
        return (f"{r['train_images']} images, {r['denoiser']} + {r['classifier']}: driver preparation "
                f"{r['prep_s']:.0f} s, ray.init {r['ray_init_s']:.0f} s, fit() {r['fit_s']:.1f} s, "
                f"epoch {r['epoch_s']:.2f} s")
    if step == "train_step":
        return ", ".join(f"{name} {r[f'{key}_ms']:.1f} ms/step ({r[f'{key}_images_per_s']:,.0f} images/s)"
                         for name, key in (("stage 1", "stage1"), ("stage 2", "stage2"), ("baseline", "baseline"))
                         ) + f"; {r['denoiser']} + {r['classifier']}, batch {r['batch']}"
    if step == "kseed_step":
        return "; ".join(f"K={k}: grouped {r[f'k{k}_grouped_ms']:.1f} ms, separate {r[f'k{k}_separate_ms']:.1f} ms "
                         f"({r[f'k{k}_separate_over_grouped']:.2f}x)" for k in (1, 3, 10))
    if step == "decrop_run":
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in r["phases_s"].items())
        return (f"`run` {r['run_s']:.0f} s ({phases}), `export` {r['export_s']:.0f} s "
                f"({r['export_bytes'] / 2 ** 20:.1f} MiB); trained {', '.join(r['trained'])}")
    if step == "resume":
        return (f"{r['denoiser']} + {r['classifier']}, {r['epochs']} epochs: resumed vs uninterrupted max weight "
                f"difference {r['resumed_max_diff']:.1e}; with the CUDA noise restarted "
                f"{r['noise_restarted_max_diff']:.1e}")
    return ""


def train_section(records: list[dict]) -> list[str]:
    lines = ["## Training", "",
             "`nccl_step`: world-size-1 torch.distributed + DDP, DE-CROP objective, DnCNN-17x64 through ResNet-110, "
             "batch 64. `ray_train`: one Ray Train `TorchTrainer` run (1 GPU worker) of "
             "`tuning.train_loop.train_loop_per_worker`, paper profile on a synthetic CIFAR-10, 1 epoch. "
             "`train_step`: the quick profile's steps (as `benchmarks/train_speed.py` times them on a CPU core). "
             "`kseed_step`: K seeds as one grouped-conv denoiser vs K separate ones. `decrop_run`: a whole "
             "`python -m decrop run` (paper model sizes, synthetic CIFAR-10, a few steps of each phase) and "
             "`python -m decrop export`. `resume`: a run resumed from its checkpoint against the uninterrupted one "
             "(see benchmarks/gpu_train.py).", "",
             "| step | backend | status | wall s | details |", "|---|---|---|---|---|"]
    for r in records:
        details = _train_details(r) if r.get("status") == "ok" else r.get("message", "")
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "-"
        lines.append(f"| {r['step']} | {r.get('backend', '-')} | {r['status']} | {wall} | {details} |")
    return lines


def write(out: Path) -> int:
    env_info = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    certify, train = _read(out / "certify.jsonl"), _read(out / "train.jsonl")
    quick = any(r.get("quick") for r in certify + train)
    cert_lines, summary = certify_section(certify)
    lines = [f"# GPU check, {env_info.get('date', '?')}", "",
             f"{env_info.get('nvidia_smi', '?')}; torch {env_info.get('torch', '?')}, CUDA build "
             f"{env_info.get('cuda_build', '?')}, cuDNN {env_info.get('cudnn', '?')}; device "
             f"{env_info.get('device', '?')}; {env_info.get('python', '?')}", ""]
    if quick:
        lines += ["> **QUICK VALIDATION RUN** (`--quick`): tiny models and sizes; the numbers measure nothing.", ""]
    lines += cert_lines + [""] + train_section(train)
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"env": env_info, "summary": summary, "certify": certify,
                                                    "train": train}, indent=2) + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["env", "write"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    return env(args.device, args.out) if args.command == "env" else write(args.out)


if __name__ == "__main__":
    sys.exit(main())
