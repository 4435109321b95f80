"""Sequential (early-stopping) certification against the fixed-n engine on a trained denoiser.

    .venv/bin/python benchmarks/sequential.py RUN_DIR [--method decrop] [--n 10000] [--images 100]
        [--radii 0 0.25 0.5 0.75] [--out FILE.md]

RUN_DIR is the output folder of ``python -m decrop run`` (its config.yaml and denoiser_<method>.pt). Both
modes certify the same test images with the same n0, n, alpha and seed; reported: mean forward passes per image
(n0 included), their ratio, wall time, and certified accuracy at every radius side by side. The sequential
mode keeps the certificate's guarantee (alpha split over looks), so any gap in accuracy is the price of
the split, not of a weaker guarantee.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from decrop.rows import average_certified_radius, certified_accuracy
from decrop.checkpoint import load_checkpoint
from decrop.config import load_config
from decrop.pipeline import build_denoiser, certify_model, prepare, smoothed_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="decrop")
    parser.add_argument("--n", type=int, default=None, help="samples per image (default: the run's certify.n)")
    parser.add_argument("--images", type=int, default=None, help="first N of the run's test subset")
    parser.add_argument("--radii", type=float, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    overrides = [f"certify.n={args.n}"] if args.n else []
    if args.radii:
        overrides.append(f"certify.radii={args.radii}")
    cfg = load_config(args.run_dir / "config.yaml", overrides)
    prep = prepare(cfg, log=lambda _: None, evaluate=False)
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device)
    load_checkpoint(args.run_dir / f"denoiser_{args.method}.pt", denoiser, {"method": args.method})
    model = smoothed_model(prep.classifier, denoiser)
    indices = prep.test_indices[: args.images] if args.images else prep.test_indices
    results = {}
    for mode in ("exact", "sequential"):
        prep.cfg = load_config(args.run_dir / "config.yaml", overrides + [f"certify.mode={mode}"])
        tic = time.perf_counter()
        rows = certify_model(model, prep, mode, indices, log=lambda _: None)
        results[mode] = (rows, time.perf_counter() - tic)
    radii = cfg.certify.radii
    lines = [f"\n## {args.run_dir} ({args.method}): sigma {cfg.sigma}, n0 {cfg.certify.n0}, n {cfg.certify.n}, "
             f"alpha {cfg.certify.alpha}, {len(indices)} test images",
             "", "| mode | mean forward passes / image | wall s | " + " | ".join(f"acc r={r:.2f}" for r in radii)
             + " | ACR |", "|---" * (4 + len(radii)) + "|"]
    for mode, (rows, seconds) in results.items():
        acc = certified_accuracy(rows, radii)
        mean = sum(r.samples for r in rows) / len(rows)
        lines.append(f"| {mode} | {mean:.0f} | {seconds:.0f} | " + " | ".join(f"{100 * acc[r]:.1f}" for r in radii)
                     + f" | {average_certified_radius(rows):.3f} |")
    exact, seq = (sum(r.samples for r in results[m][0]) for m in ("exact", "sequential"))
    lines.append(f"\nforward passes: exact / sequential = {exact / seq:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
