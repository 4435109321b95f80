"""Sequential CERTIFY against Cohen's fixed n: forward passes, the oracle, certified accuracy.

    .venv/bin/python benchmarks/sequential.py simulate [--reps 50] [--batch 1000] [--sweep] [--out FILE.md]
    .venv/bin/python benchmarks/sequential.py engine RUN_DIR [--method decrop] [--n 10000] [--images 100]
        [--radii 0 0.25 0.5 0.75] [--out FILE.md]

``simulate`` replays Cohen et al.'s published CIFAR-10 results (ResNet-110, sigma 0.25, N = 100,000; the file
in benchmarks/data/): pA = Phi(radius / sigma) for certified images, 1/2 for abstentions (they sit on the
abstain line), ``correct`` from the file. Each image is certified `reps` times at the paper's n0 100, n 10,000,
alpha 0.001, by `decrop.sequential.SequentialTest` (the object `decrop.smooth.Smooth` drives) fed Bernoulli(pA)
counts in the draws it asks for (batch 1000, the engine's default), and by fixed-n Clopper-Pearson. Reported
per set of radii: mean forward passes per image (n0 included), the ratio to fixed n, the **oracle** ratio, ours
as % of it, and certified accuracy at each radius for both. The oracle is the fewest forward passes a level-alpha
sequential test that knew pA would need: per image min(n, max over the thresholds t it must settle of
ln(1/alpha) / KL(pA || t)), plus n0. It ignores the cap's own help (an image that cannot reach a threshold by n
is settled early), so a capped test can beat it. ``--sweep`` adds the alpha split and the futility level.
Deterministic for a seed: counts, not timings.

``engine`` certifies a trained run's test images in both modes (RUN_DIR: the output folder of
``python -m decrop run``, with its config.yaml and denoiser_<method>.pt) and reports the same columns.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decrop.bounds import certified_radius, lower_confidence_bound  # noqa: E402
from decrop.rows import certified_accuracy, read_rows  # noqa: E402
from decrop.sequential import FUTILITY, SEQUENTIAL_SHARE, SequentialTest  # noqa: E402

COHEN = Path(__file__).parent / "data" / "cohen2019_cifar10_resnet110_noise0.25_sigma0.25.tsv"
SIGMA, N0, N, ALPHA = 0.25, 100, 10_000, 0.001
RADIUS_SETS = [(0.0, 0.25, 0.5, 0.75), (0.0,), (0.25,), (0.5,), (0.75,)]


@dataclass
class Outcome:
    samples: float  # mean forward passes per image, n0 included
    accuracy: dict[float, float]  # certified accuracy (%) per radius
    fixed_accuracy: dict[float, float]


def cohen_images(path: Path = COHEN) -> tuple[np.ndarray, np.ndarray]:
    """(pA, correct) per image of Cohen's file: Phi(radius / sigma), or 1/2 where it abstained."""
    rows = read_rows(path)
    p_a = np.array([norm.cdf(r.radius / SIGMA) if r.predict >= 0 else 0.5 for r in rows])
    return p_a, np.array([r.correct == 1 for r in rows])


def kl(p: np.ndarray, t: float) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(t)), elementwise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.where(p > 0, p * np.log(p / t), 0.0)
        zero = np.where(p < 1, (1 - p) * np.log((1 - p) / (1 - t)), 0.0)
    return one + zero


def oracle_samples(p_a: np.ndarray, radii: tuple[float, ...]) -> float:
    """Mean over images of n0 + min(n, max_t ln(1/alpha) / KL(pA || t)) (n where pA sits on a threshold)."""
    need = np.zeros(len(p_a))
    for r in radii:
        divergence = kl(p_a, float(norm.cdf(r / SIGMA)))
        need = np.maximum(need, np.where(divergence > 0, math.log(1 / ALPHA) / np.maximum(divergence, 1e-300),
                                         np.inf))
    return float(np.mean(N0 + np.minimum(N, need)))


def simulate(p_a: np.ndarray, correct: np.ndarray, radii: tuple[float, ...], reps: int, batch: int,
             seed: int = 0, **test_options: float) -> Outcome:
    """Certify every image `reps` times with the sequential test and with fixed n, on Bernoulli(pA) counts."""
    rng = np.random.default_rng(seed)
    drawn, hits, fixed_hits = 0, np.zeros(len(radii)), np.zeros(len(radii))
    for p, right in zip(p_a, correct):
        for _ in range(reps):
            test = SequentialTest(radii, SIGMA, N, ALPHA, prior=(int(rng.binomial(N0, p)), N0), **test_options)
            while not test.done:
                draw = test.next_draw(batch)
                test.observe(int(rng.binomial(draw, p)), draw)
            drawn += N0 + test.drawn
            fixed = lower_confidence_bound(int(rng.binomial(N, p)), N, ALPHA)
            fixed_radius = certified_radius(fixed, SIGMA) if fixed >= 0.5 else None
            for j, r in enumerate(radii):  # certified correct at r, as `decrop.rows.certified_counts` counts
                hits[j] += right and test.radius is not None and test.radius >= r
                fixed_hits[j] += right and fixed_radius is not None and fixed_radius >= r
    total = len(p_a) * reps
    return Outcome(drawn / total, dict(zip(radii, 100 * hits / total)), dict(zip(radii, 100 * fixed_hits / total)))


def simulation_report(reps: int, batch: int, sweep: bool) -> str:
    p_a, correct = cohen_images()
    lines = [f"## Simulation on Cohen et al.'s CIFAR-10 ResNet-110 results (sigma {SIGMA}, {len(p_a)} images)",
             "", f"n0 {N0}, n {N:,}, alpha {ALPHA}, batch {batch}, {reps} repetitions per image; alpha split "
             f"{SEQUENTIAL_SHARE:g} sequential / {1 - SEQUENTIAL_SHARE:g} final look, futility level {FUTILITY:g}.",
             "Certified accuracy (%): sequential / fixed n.", "",
             "| radii | forward passes / image | fixed n | ratio | oracle ratio | % of oracle | certified accuracy |",
             "|---|---|---|---|---|---|---|"]
    for radii in RADIUS_SETS:
        out = simulate(p_a, correct, radii, reps, batch)
        oracle = oracle_samples(p_a, radii)
        accuracy = ", ".join(f"r={r:g}: {out.accuracy[r]:.1f} / {out.fixed_accuracy[r]:.1f}" for r in radii)
        lines.append(f"| {', '.join(f'{r:g}' for r in radii)} | {out.samples:.0f} | {N0 + N} | "
                     f"{(N0 + N) / out.samples:.2f}x | {(N0 + N) / oracle:.2f}x | {100 * oracle / out.samples:.0f}% "
                     f"| {accuracy} |")
    if sweep:
        lines += ["", "### Alpha split and futility level", "",
                  f"Ratio to fixed n and the largest loss of certified accuracy (points) against fixed n at any "
                  f"radius (negative: no loss, a gain within noise), {max(reps // 2, 1)} repetitions.", "",
                  "| sequential share of alpha | futility level | radii 0, 0.25, 0.5, 0.75: ratio | largest loss | "
                  "r = 0.25 alone: ratio | largest loss | r = 0.75 alone: ratio | largest loss |",
                  "|---|---|---|---|---|---|---|---|"]
        settings = [(s, FUTILITY) for s in (0.1, 0.2, 0.3, 0.5)] + [(SEQUENTIAL_SHARE, f) for f in (0.001, 0.05)]
        for share, futility in settings:
            cells = []
            for radii in [RADIUS_SETS[0], (0.25,), (0.75,)]:
                out = simulate(p_a, correct, radii, max(reps // 2, 1), batch, share=share, futility=futility)
                loss = max(out.fixed_accuracy[r] - out.accuracy[r] for r in radii)
                cells += [f"{(N0 + N) / out.samples:.2f}x", f"{loss:.1f}".replace("-0.0", "0.0")]
            lines.append(f"| {share:g} | {futility:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def engine_report(run_dir: Path, method: str, n: int | None, images: int | None, radii: list[float] | None) -> str:
    """Both modes of the real engine on a trained run's test images (imports the pipeline: torch, data)."""
    import torch

    from decrop.checkpoint import load_checkpoint
    from decrop.config import load_config
    from decrop.models import build_denoiser, smoothed_model
    from decrop.pipeline import certify_model
    from decrop.prepare import prepare
    from decrop.rows import average_certified_radius

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    overrides = [f"certify.n={n}"] if n else []
    if radii:
        overrides.append(f"certify.radii={radii}")
    cfg = load_config(run_dir / "config.yaml", overrides)
    prep = prepare(cfg, log=lambda _: None, evaluate=False)
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device)
    load_checkpoint(run_dir / f"denoiser_{method}.pt", denoiser, {"method": method})
    model = smoothed_model(prep.classifier, denoiser)
    indices = prep.test_indices[:images] if images else prep.test_indices
    c, rows = cfg.certify, {}
    for mode in ("exact", "sequential"):
        prep.cfg = load_config(run_dir / "config.yaml", overrides + [f"certify.mode={mode}"])
        rows[mode] = certify_model(model, prep, mode, indices, log=lambda _: None)
    lines = [f"## Engine: {run_dir.name} ({method}), sigma {cfg.sigma}, n0 {c.n0}, n {c.n}, alpha {c.alpha}, "
             f"batch {c.batch_size}, {len(indices)} test images", "",
             "| mode | forward passes / image | " + " | ".join(f"acc r={r:g}" for r in c.radii) + " | ACR |",
             "|---" * (3 + len(c.radii)) + "|"]
    for mode, mode_rows in rows.items():
        acc = certified_accuracy(mode_rows, c.radii)
        mean = sum(r.samples for r in mode_rows) / len(mode_rows)
        lines.append(f"| {mode} | {mean:.0f} | " + " | ".join(f"{100 * acc[r]:.1f}" for r in c.radii)
                     + f" | {average_certified_radius(mode_rows):.3f} |")
    exact, seq = (sum(r.samples for r in rows[m]) for m in ("exact", "sequential"))
    lines.append(f"\nforward passes: exact / sequential = {exact / seq:.2f}x (ACR is lower in the sequential mode: "
                 "an image that stops early reports the largest reported radius it is certified at)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="Cohen et al.'s published per-image results, simulated counts")
    sim.add_argument("--reps", type=int, default=50)
    sim.add_argument("--batch", type=int, default=1000, help="most samples per draw (the engine's batch size)")
    sim.add_argument("--sweep", action="store_true", help="also measure the alpha split and the futility level")
    eng = sub.add_parser("engine", help="the real engine on a trained run")
    eng.add_argument("run_dir", type=Path)
    eng.add_argument("--method", default="decrop")
    eng.add_argument("--n", type=int, default=None, help="samples per image (default: the run's certify.n)")
    eng.add_argument("--images", type=int, default=None, help="first N of the run's test subset")
    eng.add_argument("--radii", type=float, nargs="+", default=None)
    for p in (sim, eng):
        p.add_argument("--out", type=Path, default=None, help="append the Markdown to this file")
    args = parser.parse_args(argv)
    if args.command == "simulate":
        text = simulation_report(args.reps, args.batch, args.sweep)
    else:
        text = engine_report(args.run_dir, args.method, args.n, args.images, args.radii)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
