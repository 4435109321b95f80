"""GPU certification throughput of the paper's smoothed model, one variant family per process.

    python benchmarks/gpu_certify.py --family eager   --out OUT/certify.jsonl [--device cuda] [--quick]
    python benchmarks/gpu_certify.py --family compile --mode max-autotune-no-cudagraphs --out OUT/certify.jsonl
    python benchmarks/gpu_certify.py --family compile --mode reduce-overhead          --out OUT/certify.jsonl

The model is ``nn.Sequential(DnCNN-17x64, ResNet-110)`` at 3x32x32 with random weights (throughput does not
depend on them), channels_last, in eval mode; it is certified by the engine (`decrop.certify.certify_indices`,
which drives `Smooth`) with n0 100, n 10,000, alpha 0.001 on `--images` random images, and timed from the first
image to the last host sync. ``cudnn.benchmark`` is on; every (variant, batch) is warmed up untimed on one
image group first (cuDNN's algorithm search, compilation, CUDA-graph recording), so the timing is steady state.

- ``--family eager``: bf16 autocast, bf16 with BatchNorm folded into the convs (`decrop.models.fold_batchnorm`,
  i.e. ``certify.fold_bn``), tf32 (``torch.backends.cuda.matmul.allow_tf32`` and ``cudnn.allow_tf32`` True)
  and fp32 (both False), each at every batch of `--batches`, in that order.
- ``--family compile``: bf16, BN folded, ``torch.compile(mode=--mode, dynamic=False)`` applied to the model
  before it is handed to the engine, at two batches (``--batch best``: the fastest eager bf16 batch in `--out`
  and twice it) or the one given. ``reduce-overhead`` is Inductor plus CUDA graphs (graph trees; the engine uses
  each output at once, before the next replay overwrites it). Every new shape compiles anew (~35 s each on an
  H200), so few batches keep the compile time bounded.

Each measurement is appended to `--out` as one JSON line as soon as it is taken, so a run cut off by its
`timeout` keeps what it measured; a variant that fails is recorded with its error and the next one runs.
``--deadline-s`` stops starting new measurements after that many seconds (recorded as skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.certify import conv_macs_per_sample  # noqa: E402
from decrop.certify import certify_indices  # noqa: E402
from decrop.config import CertifyConfig  # noqa: E402
from decrop.models import create_model, fold_batchnorm  # noqa: E402

PAPER_IMAGES, PAPER_N0, PAPER_N = 500, 100, 10_000
EAGER = {  # variant -> (precision, TF32 on, fold BN); the target's precision first, in case the deadline comes
    "bf16": ("bf16", True, False),
    "bf16-foldbn": ("bf16", True, True),
    "tf32": ("fp32", True, False),
    "fp32": ("fp32", False, False),
}


def build_model(device: torch.device, quick: bool, fold_bn: bool) -> nn.Module:
    """DnCNN-17x64 + ResNet-110 for 3x32x32 (quick: DnCNN-5x16 + ResNet-20), eval mode, channels_last."""
    torch.manual_seed(0)
    depth, width, classifier = (5, 16, "resnet20") if quick else (17, 64, "resnet110")
    model = nn.Sequential(create_model("dncnn", in_channels=3, depth=depth, width=width),
                          create_model(classifier, in_channels=3, num_classes=10)).to(device).eval()
    if fold_bn:
        model = fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last)


def set_tf32(enabled: bool) -> None:
    """TF32 for cuBLAS matmuls and cuDNN convs (the legacy flags; the new per-backend API must not be mixed)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def time_certification(model: nn.Module, device: torch.device, precision: str, batch: int, args,
                       warmups: int = 1) -> dict:
    """Certify `args.images` images (a multiple of the engine's group); samples/s and peak GPU memory."""
    group = max(1, batch // max(args.n0, args.n))  # images the engine packs into one forward batch
    count = math.ceil(max(args.images, group) / group) * group  # whole groups: the same shapes every time
    images = [(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 10) for i in range(count)]

    cfg = CertifyConfig(n0=args.n0, n=args.n, alpha=0.001, batch_size=batch, precision=precision)

    def certify(subset):
        return certify_indices(model, subset, range(len(subset)), cfg, num_classes=10, sigma=0.25, seed=0,
                               device=device)
    for _ in range(warmups):  # cuDNN algorithm search, compilation, CUDA-graph recording: untimed
        certify(images[:group])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    certify(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - tic
    samples = count * (args.n0 + args.n)
    return {"images": count, "samples": samples, "wall_s": wall, "samples_per_s": samples / wall,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


class Recorder:
    """Appends one JSON line per measurement to `path` (and prints it); stops new work after the deadline."""

    def __init__(self, path: Path, deadline_s: float, common: dict):
        self.path, self.deadline, self.common = path, time.monotonic() + deadline_s, common
        path.parent.mkdir(parents=True, exist_ok=True)

    def run(self, variant: str, batch: int, measure) -> dict | None:
        record = {"part": "certify", **self.common, "variant": variant, "batch": batch}
        if time.monotonic() > self.deadline:
            record.update(status="skipped", message="deadline reached before it started")
        else:
            try:
                record.update(status="ok", **measure())
                gflop = self.common["gflop_per_sample"]
                record["tflop_per_s"] = record["samples_per_s"] * gflop / 1e3
                record["paper_protocol_s"] = PAPER_IMAGES * (PAPER_N0 + PAPER_N) / record["samples_per_s"]
            except Exception as err:  # recorded; the next variant still runs
                record.update(status="error", message=f"{type(err).__name__}: {err}"[:500])
                traceback.print_exc()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        return record if record["status"] == "ok" else None


def best_eager_batch(path: Path, default: int) -> int:
    """The batch of the fastest eager bf16 record in `path` (BN folded or not), else `default`."""
    best = (0.0, default)
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("status") == "ok" and r.get("variant", "").startswith("bf16") and "compile" not in r["variant"]:
                best = max(best, (r["samples_per_s"], r["batch"]))
    return best[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["eager", "compile"], required=True)
    p.add_argument("--mode", default="max-autotune-no-cudagraphs",
                   choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file the records are appended to")
    p.add_argument("--images", type=int, default=None,
                   help="images certified per measurement (default 4 for eager, whose sweep is long; 40 for compile: "
                        "at 4 the n0 pass and host syncs weigh, the H200 read 84k samples/s at 4 and 100k at 40)")
    p.add_argument("--n0", type=int, default=PAPER_N0)
    p.add_argument("--n", type=int, default=PAPER_N)
    p.add_argument("--batches", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    p.add_argument("--batch", default="best",
                   help="compile family: a batch size, or 'best' (see module doc: the best eager batch and twice it)")
    p.add_argument("--deadline-s", type=float, default=math.inf)
    p.add_argument("--quick", action="store_true", help="tiny models and sizes: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 4 if args.family == "eager" else 40
    if args.quick:
        args.images, args.n0, args.n, args.batches = 2, 10, 100, [50, 200]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch {torch.__version__} sees no CUDA device; "
                "use --device cpu (with --quick) to check the script on a CPU")
    if args.batch != "best" and not args.batch.isdigit():
        p.error(f"--batch must be a positive integer or 'best', got {args.batch!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    gflop = 2 * conv_macs_per_sample(build_model(device, args.quick, False), (3, 32, 32), device) / 1e9
    common = {"device": str(device), "n0": args.n0, "n": args.n, "quick": args.quick, "gflop_per_sample": gflop,
              "torch": torch.__version__}
    recorder = Recorder(args.out, args.deadline_s, common)
    if args.family == "eager":
        for variant, (precision, tf32, fold) in EAGER.items():
            set_tf32(tf32)
            model = build_model(device, args.quick, fold)
            for batch in args.batches:
                recorder.run(variant, batch, lambda: {"precision": precision, "tf32": tf32, "fold_bn": fold,
                                                      **time_certification(model, device, precision, batch, args)})
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next variant (fp32 last, the largest) starts unfragmented
        return 0
    if args.batch == "best":  # compiled graphs gain from batches larger than eager's best (H200: 100k -> 103k)
        best = best_eager_batch(args.out, max(args.batches))
        batches = [best, 2 * best]
    else:
        batches = [int(args.batch)]
    set_tf32(True)

    def measure(batch):
        tic = time.perf_counter()
        model = torch.compile(build_model(device, args.quick, True), mode=args.mode, dynamic=False)
        # Two warm-ups: CUDA graph trees record on the call after the first one of each shape.
        result = time_certification(model, device, "bf16", batch, args, warmups=2)
        return {"precision": "bf16", "tf32": True, "fold_bn": True, "compile_mode": args.mode,
                "setup_s": time.perf_counter() - tic - result["wall_s"], **result}
    for batch in batches:  # each shape compiles anew
        recorder.run(f"bf16-foldbn-compile[{args.mode}]", batch, lambda: measure(batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
