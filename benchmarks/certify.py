"""Certification throughput: a reference CERTIFY written the standard way against decrop's engine.

    .venv/bin/python benchmarks/certify.py [--n 1000] [--images 4] [--device cpu|cuda] [--out FILE.md]

One process, same model, images, n0, n and batch size for both. The reference is Cohen et al.'s loop as
usually written (per image ``x.repeat``, noise added, argmax, counts moved to the host after every batch,
NCHW, fp32, the default allocator); it runs first, before decrop touches the allocator. Then decrop's engine
(`decrop.certify.certify_indices`: noise drawn on the device, counts on the device, one host sync per image
group, channels_last, the glibc allocator setting) in fp32, and in bf16 autocast. Reported per case:
samples/s, the ratio to the reference, the fraction of the machine's conv peak (a large channels_last 3x3
conv timed in the same run, per precision) and the peak resident memory of each phase.

Cases: DnCNN-17x64 with the small CNN at 1x28x28, and DnCNN-17x64 with ResNet-20 at 3x32x32 (on CUDA also
ResNet-110, the paper's classifier).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from decrop.certify import certify_indices
from decrop.models import create_model
from decrop.runtime import tune_allocator


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 5 ms from /proc."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        page = 4096
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = self.peak / 2**20


def reference_certify(model: nn.Module, x: torch.Tensor, n0: int, n: int, batch_size: int, sigma: float,
                      num_classes: int) -> tuple[int, int]:
    """Cohen et al.'s sampling as commonly written: (top class from n0, its count among n)."""
    def sample(num: int) -> np.ndarray:
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        with torch.no_grad():
            while remaining > 0:
                this = min(batch_size, remaining)
                remaining -= this
                batch = x.repeat((this, 1, 1, 1))
                noise = torch.randn_like(batch) * sigma
                predictions = model(batch + noise).argmax(1)
                counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts
    c_a = int(sample(n0).argmax())
    return c_a, int(sample(n)[c_a])


def conv_macs_per_sample(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Multiply-accumulates of the convs and linears for one input of `shape` (C, H, W)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.in_channels // module.groups * np.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.rand(1, *shape, device=device))
    for h in handles:
        h.remove()
    return float(total)


def conv_peak_flops(device: torch.device, dtype: torch.dtype, batch: int = 64, size: int = 32,
                    seconds: float = 2.0) -> float:
    """FLOP/s of one 64->64 3x3 channels_last conv on (batch, 64, size, size): DnCNN's layer, alone."""
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 64, size, size, device=device).to(memory_format=torch.channels_last)
    flops = 2 * 64 * 64 * 9 * size * size * batch
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(3):
            conv(x)
        reps, tic = 0, time.perf_counter()
        while time.perf_counter() - tic < seconds:
            conv(x)
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return reps * flops / (time.perf_counter() - tic)


def make_case(name: str, device: torch.device) -> tuple[nn.Module, tuple[int, int, int]]:
    channels, size, classifier = {"small_cnn_28": (1, 28, "small_cnn"), "resnet20_32": (3, 32, "resnet20"),
                                  "resnet110_32": (3, 32, "resnet110")}[name]
    torch.manual_seed(0)
    model = nn.Sequential(create_model("dncnn", in_channels=channels, depth=17, width=64),
                          create_model(classifier, in_channels=channels, num_classes=10))
    return model.to(device).eval(), (channels, size, size)


def timed(fn, samples: int, device: torch.device) -> tuple[float, float]:
    """(samples/s, peak MiB) of running fn."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakRSS() as mem:
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - tic
    return samples / elapsed, mem.mib


def case_inputs(name: str, args, device: torch.device):
    model, shape = make_case(name, device)
    images = [(torch.rand(shape, generator=torch.Generator().manual_seed(i)), i % 10) for i in range(args.images)]
    return model, shape, images


def run_reference(name: str, args, device: torch.device) -> dict:
    model, shape, images = case_inputs(name, args, device)
    samples = args.images * (args.n0 + args.n)
    sps, mib = timed(lambda: [reference_certify(model, x.to(device), args.n0, args.n, args.batch_size, 0.25, 10)
                              for x, _ in images], samples, device)
    return {"case": name, "reference_sps": sps, "reference_mib": mib}


def run_engine(name: str, args, device: torch.device, peaks: dict[str, float], out: dict) -> dict:
    model, shape, images = case_inputs(name, args, device)
    macs = conv_macs_per_sample(model, shape, device)
    samples = args.images * (args.n0 + args.n)
    out.update({"n0": args.n0, "n": args.n, "images": args.images, "batch_size": args.batch_size,
                "gflop_per_sample": 2 * macs / 1e9})
    # The machine's peak on this work: the best of a generic probe and the case's own dominant layer
    # (DnCNN's 64->64 3x3 conv at this image size and a large batch), per precision.
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[f"{name}_{precision}"] = max(peaks[precision],
                                           conv_peak_flops(device, dtype, batch=min(args.batch_size, 256),
                                                           size=shape[-1]))
    fast = model.to(memory_format=torch.channels_last)
    for precision in ("fp32", "bf16"):
        out[f"{precision}_sps"], out[f"{precision}_mib"] = timed(lambda: certify_indices(
            fast, images, range(len(images)), num_classes=10, sigma=0.25, n0=args.n0, n=args.n, alpha=0.001,
            batch_size=args.batch_size, seed=0, device=device, precision=precision), samples, device)
        out[f"{precision}_ratio"] = out[f"{precision}_sps"] / out["reference_sps"]
        out[f"{precision}_fraction_of_peak"] = out[f"{precision}_sps"] * 2 * macs / peaks[f"{name}_{precision}"]
        out[f"{precision}_peak_gflops"] = peaks[f"{name}_{precision}"] / 1e9
    out["reference_fraction_of_peak"] = out["reference_sps"] * 2 * macs / peaks[f"{name}_fp32"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the results as Markdown to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = args.cases or (["small_cnn_28", "resnet20_32"] + (["resnet110_32"] if device.type == "cuda" else []))

    peaks = {"fp32": conv_peak_flops(device, torch.float32), "bf16": conv_peak_flops(device, torch.bfloat16)}
    print(f"device {device} ({torch.get_num_threads()} threads): conv peak fp32 {peaks['fp32'] / 1e9:.1f} "
          f"GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    # Every reference first: the allocator setting is process-wide and cannot be undone, and the reference
    # is defined with the default allocator.
    results = [run_reference(case, args, device) for case in cases]
    tune_allocator()
    for r in results:
        run_engine(r["case"], args, device, peaks, r)
        print(json.dumps(r), flush=True)
    lines = [f"\n## {time.strftime('%Y-%m-%d')} on {device} ({torch.get_num_threads()} threads), torch "
             f"{torch.__version__}; n0 {args.n0}, n {args.n}, {args.images} images, batch {args.batch_size}",
             f"conv peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s\n",
             "| case | GFLOP/sample | reference samples/s | fp32 samples/s | fp32 ratio | fp32 % of peak | "
             "bf16 samples/s | bf16 ratio | bf16 % of bf16 peak | reference % of peak | peak GFLOP/s fp32 / bf16 | "
             "peak MiB ref / fp32 / bf16 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['gflop_per_sample']:.3f} | {r['reference_sps']:.0f} | {r['fp32_sps']:.0f} | "
                     f"{r['fp32_ratio']:.2f}x | {100 * r['fp32_fraction_of_peak']:.0f}% | {r['bf16_sps']:.0f} | "
                     f"{r['bf16_ratio']:.2f}x | {100 * r['bf16_fraction_of_peak']:.0f}% | "
                     f"{100 * r['reference_fraction_of_peak']:.0f}% | {r['fp32_peak_gflops']:.0f} / "
                     f"{r['bf16_peak_gflops']:.0f} | {r['reference_mib']:.0f} / "
                     f"{r['fp32_mib']:.0f} / {r['bf16_mib']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
