"""Scaling on one machine: certification over 1 vs 2 Ray task shards, DDP training with 1 vs 2 Ray Train workers.

    python benchmarks/scaling.py [--profile quick] [--images 16] [--epochs 3] [--out FILE.md]

Everything in one run, on the profile's models and data, on a local Ray instance with as many CPUs as the
machine has:

- **Certification** of the same validation images with `tuning.certify_tasks.certify_parallel` over 1 shard
  (one task, one thread) and over 2 shards (two tasks, one thread each), and, as the non-Ray reference, the
  library's `certify_indices` in this process with all cores' threads. Reports wall time (task start-up, the
  data and classifier loading of each task included), images/s and the speed-up over one shard, and checks
  that the sharded rows equal the unsharded ones.
- **Training**: the profile's DE-CROP denoiser for a few epochs in a `TorchTrainer` with 1 worker (1 thread),
  1 worker (all threads) and 2 DDP workers (1 thread each, gloo, the global batch split between them).
  Reports the last epoch's time (steady state, no start-up) and the wall time of `fit()`.

A perfect 2-core machine would show 2.0x for both; the measured ratio says what sharding or DDP buys here.
Nothing else should run on the machine meanwhile. Results are appended to ``--out`` as Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh local instance, never someone's cluster

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from decrop.certify import certify_indices  # noqa: E402
from decrop.checkpoint import save_checkpoint  # noqa: E402
from decrop.classifier import classifier_key  # noqa: E402
from decrop.config import from_flat, load_config, to_flat  # noqa: E402
from decrop.models import build_denoiser, smoothed_model  # noqa: E402
from decrop.prepare import prepare  # noqa: E402
from decrop.stages import samples_for  # noqa: E402
from decrop.runtime import tune_allocator  # noqa: E402
from tuning.certify_tasks import certify_parallel  # noqa: E402
from tuning.train_loop import train_loop_per_worker  # noqa: E402


def certification(flat: dict, images: int) -> list[tuple[str, float, float]]:
    """(case, wall seconds, images/s) for the in-process reference, 1 shard and 2 shards."""
    cfg = from_flat(flat)
    prep = prepare(cfg, log=lambda _: None, evaluate=False)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels)  # throughput does not depend on the weights
    weights = save_checkpoint(Path("/tmp") / "decrop-scaling" / "denoiser.pt", denoiser, {"kind": "denoiser"})
    indices = [int(i) for i in prep.val_indices[:images]]
    c = cfg.certify

    results = []
    torch.set_num_threads(os.cpu_count())
    tune_allocator()
    model = smoothed_model(prep.classifier, denoiser.to(prep.device), c.fold_bn)
    tic = time.perf_counter()
    reference = certify_indices(model, prep.val_dataset(), indices, c, num_classes=prep.info.num_classes,
                                sigma=cfg.sigma, seed=cfg.seed, device=prep.device)
    wall = time.perf_counter() - tic
    results.append((f"in-process, {os.cpu_count()} threads (no Ray)", wall, images / wall))
    for shards in (1, 2):
        tic = time.perf_counter()
        rows = certify_parallel(flat, {"d": weights}, "val", indices, shards)["d"]
        wall = time.perf_counter() - tic
        same = [(r.idx, r.predict, r.radius) for r in rows] == [(r.idx, r.predict, r.radius) for r in reference]
        if not same:
            raise SystemExit(f"{shards} shard(s) certified differently from the in-process run")
        results.append((f"Ray tasks, {shards} shard(s) x 1 thread", wall, images / wall))
        print(f"scaling: certification over {shards} shard(s): {wall:.1f} s", flush=True)
    return results


def training(flat: dict, epochs: int) -> list[tuple[str, float, float]]:
    """(case, last epoch seconds, fit wall seconds) for 1 worker x 1 thread, 1 x all threads, 2 x 1 thread."""
    flat = {**flat, "train.epochs": epochs - 1, "decrop.stage2_epochs": 1, "methods": ["decrop"]}
    results = []
    for workers, threads in ((1, 1), (1, os.cpu_count()), (2, 1)):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": flat, "method": "decrop", "label": f"{workers}w{threads}t",
                               "checkpoint_every": epochs, "threads": threads},
            scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                   resources_per_worker={"CPU": os.cpu_count() // workers}),
            run_config=ray.train.RunConfig(name=f"scaling-{workers}w{threads}t-{time.time_ns()}",
                                           storage_path=str(Path("/tmp") / "decrop-scaling")))
        tic = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - tic
        epoch = result.metrics["train/epoch_time"]
        results.append((f"{workers} worker(s) x {threads} thread(s)", epoch, wall))
        print(f"scaling: {workers} worker(s) x {threads} thread(s): last epoch {epoch:.1f} s, fit {wall:.0f} s",
              flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick")
    p.add_argument("--images", type=int, default=16, help="validation images certified per case")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per case (the last one is timed)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scaling_cpu.md")
    args = p.parse_args()

    cfg = load_config(REPO / "configs" / f"{args.profile}.yaml")
    flat = to_flat(cfg)
    prep = prepare(cfg)  # classifier and samples cached before any timing, so no case pays for them
    samples_for(prep, prep.classifier, classifier_key(cfg))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    cert = certification(flat, args.images)
    train = training(flat, args.epochs)
    ray.shutdown()

    one_shard = next(wall for case, wall, _ in cert if case.startswith("Ray tasks, 1"))
    one_worker = train[0][1]
    lines = [f"## {time.strftime('%Y-%m-%d')}: {args.profile} profile, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, ray {ray.__version__}", "",
             f"Certification of {args.images} validation images (n0 {cfg.certify.n0}, n {cfg.certify.n}, "
             f"{cfg.denoiser.arch} {cfg.denoiser.depth}x{cfg.denoiser.width} + {cfg.classifier.arch}):", "",
             "| case | wall (s) | images/s | speed-up vs 1 shard |", "|---|---|---|---|"]
    lines += [f"| {case} | {wall:.1f} | {rate:.2f} | {one_shard / wall:.2f}x |" for case, wall, rate in cert]
    lines += ["", f"DE-CROP training, {args.epochs} epochs (batch {cfg.train.batch_size} in total, "
              f"n_interp {cfg.decrop.n_interp}), last epoch timed:", "",
              "| case | last epoch (s) | speed-up vs 1x1 | fit wall (s) |", "|---|---|---|---|"]
    lines += [f"| {case} | {epoch:.2f} | {one_worker / epoch:.2f}x | {wall:.0f} |" for case, epoch, wall in train]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(("\n" if args.out.exists() and args.out.stat().st_size else
                  "# Scaling with Ray task shards and DDP workers (`python benchmarks/scaling.py`)\n\n") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
