"""Training throughput of the denoiser step, against the machine's measured peak, and what the candidates buy.

    .venv/bin/python benchmarks/train_speed.py [--profile quick] [--rounds 5] [--steps 10] [--out FILE.md]
    .venv/bin/python benchmarks/train_speed.py --quick        # tiny sizes: checks the script end to end

One process, one thread (the studies run one trial per core), everything in one run on one machine. The steps
are the library's own: `decrop.objectives` (DE-CROP stage 1, stage 2 with the domain discriminator, the
baseline's stability objective) on the profile's denoiser, classifier, batch size and interpolation count,
stepped by Adam as `decrop.training.train_denoiser` does. Images are uniform noise in the profile's shape: the
work of a step does not depend on pixel values.

Measured, per objective, in R interleaved rounds (order reversed every other round), medians reported:

- **today**: the step as `decrop.stages.run_stages` runs it: eager, fp32, the denoiser's weights in
  channels-last memory, the loader's images as they come (NCHW);
- **NCHW**: the denoiser's weights in the default layout too;
- **channels_last inputs**: today, with the images converted to channels-last as well;
- **compile**: today with ``torch.compile`` of the denoiser (inductor, CPU); compile time reported apart.

Each variant is also checked for equal results: from the same initial weights and random state, the
denoiser's weights after ``--steps`` steps, as the largest absolute difference from today's.

**Machine peak** is measured, not looked up: a 1024x1024 fp32 matrix product (the best the BLAS reaches on one
core) and the DnCNN's own 3x3 conv (width -> width at the image size and batch, forward + backward). The share
of peak is the step's FLOPs (counted by ``torch.utils.flop_counter`` on one step) over its time, over the GEMM
peak.

**Seeds that share the work**: K replicates of the denoiser as one network with grouped convolutions (the
channels of seed k are group k; BatchNorm's per-channel statistics are then per seed, as in K separate runs),
forward + backward of the stage-1 branches, against K separate denoisers stepped one after another, for K = 1,
3, 10. ``torch.func.vmap`` over stacked parameters batches a conv with batched weights into the same grouped
convolution (PyTorch's batching rule), so the grouped case measures what vmap would run.

Every measurement records its CPU share (`benchmarks.contention`); a busy machine is refused (exit 3) unless
--force, which flags the record CONTENDED. Results are appended to ``--out`` as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.contention import Window, idle_probe, verdict  # noqa: E402
from decrop.config import load_config  # noqa: E402
from decrop.models import DomainDiscriminator, create_model  # noqa: E402
from decrop.objectives import DecropObjective, StabilityObjective  # noqa: E402

CONTENDED_EXIT = 3
VARIANTS = ("today", "NCHW", "channels_last inputs", "compile")


def _objective(kind: str, cfg, classifier, device: torch.device):
    if kind == "baseline":
        return StabilityObjective(cfg.sigma)
    disc = DomainDiscriminator(classifier.feature_dim).to(device) if kind == "decrop stage 2" else None
    return DecropObjective(cfg.sigma, cfg.decrop, disc)


class Case:
    """One objective's step in one variant: fixed images, a denoiser copy, its Adam, on `device` (the classifier
    is there already; benchmarks/gpu_train.py times the same step on a GPU)."""

    def __init__(self, kind: str, variant: str, cfg, classifier, base_denoiser, images, labels,
                 device: torch.device = torch.device("cpu")):
        self.kind, self.variant = kind, variant
        torch.manual_seed(1)
        self.objective = _objective(kind, cfg, classifier, device)
        weights = torch.contiguous_format if variant == "NCHW" else torch.channels_last
        self.denoiser = copy.deepcopy(base_denoiser).to(device, memory_format=weights)
        self.model = torch.compile(self.denoiser) if variant == "compile" else self.denoiser
        inputs = torch.channels_last if variant == "channels_last inputs" else torch.contiguous_format
        self.images = tuple(im.to(device).contiguous(memory_format=inputs) for im in
                            (images[:1] if kind == "baseline" else images))
        self.labels = labels.to(device)
        self.classifier = classifier
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=cfg.train.lr)
        self.compile_s = 0.0
        if variant == "compile":  # compile outside the timed steps
            state = self.snapshot()
            tic = time.perf_counter()
            self.step()
            self.compile_s = time.perf_counter() - tic
            self.restore(state)

    def snapshot(self) -> tuple:
        return tuple(copy.deepcopy(m.state_dict()) for m in (self.denoiser, self.optimizer, self.objective))

    def restore(self, state: tuple) -> None:
        for m, s in zip((self.denoiser, self.optimizer, self.objective), state):
            m.load_state_dict(s)

    def step(self) -> None:
        self.denoiser.train()
        self.objective.set_progress(0.5)
        loss, _ = self.objective(self.model, self.classifier, self.images, self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.objective.after_backward()
        self.optimizer.step()

    def weights_after(self, steps: int) -> list[torch.Tensor]:
        """The denoiser's weights after `steps` steps from the current state and random state 7 (then restored)."""
        state = self.snapshot()
        torch.manual_seed(7)
        for _ in range(steps):
            self.step()
        out = [p.detach().clone().contiguous() for p in self.denoiser.parameters()]
        self.restore(state)
        return out


def step_flops(case: Case) -> int:
    state = case.snapshot()
    with FlopCounterMode(display=False) as counter:
        case.step()
    case.restore(state)
    return counter.get_total_flops()


def timed(fn, repeats: int) -> tuple[float, dict]:
    fn()  # warm
    with Window(threads=1) as window:
        for _ in range(repeats):
            fn()
    return window.wall / repeats, window.as_dict()


def gemm_peak(size: int) -> callable:
    a, b = torch.rand(size, size), torch.rand(size, size)
    return (lambda: a @ b), 2 * size ** 3


def conv_peak(batch: int, width: int, image: int):
    x = torch.rand(batch, width, image, image, requires_grad=True)
    conv = nn.Conv2d(width, width, 3, padding=1, bias=False)

    def run():
        conv(x).sum().backward()
    return run, 3 * 2 * batch * width * width * 9 * image * image


def grouped_dncnn(channels: int, depth: int, width: int, k: int) -> nn.Sequential:
    """K DnCNN bodies as one network with grouped convolutions (seed k = group k)."""
    layers = [nn.Conv2d(channels * k, width * k, 3, padding=1, groups=k), nn.ReLU(inplace=True)]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width * k, width * k, 3, padding=1, bias=False, groups=k), nn.BatchNorm2d(width * k),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(width * k, channels * k, 3, padding=1, groups=k))
    return nn.Sequential(*layers)


def kseed_cases(cfg, channels: int, image: int, batches: int, device: torch.device = torch.device("cpu")):
    """(K, grouped step, separate steps) for K = 1, 3, 10: the stage-1 denoiser's forward + backward over its
    `batches` branches (each branch a call of its own, as the objective makes them), on `device`."""
    d = cfg.denoiser
    out = []
    for k in (1, 3, 10):
        grouped = grouped_dncnn(channels, d.depth, d.width, k).to(device, memory_format=torch.channels_last)
        xs = [torch.rand(cfg.train.batch_size, channels * k, image, image, device=device) for _ in range(batches)]
        separate = [create_model("dncnn", in_channels=channels, depth=d.depth, width=d.width)
                    .to(device, memory_format=torch.channels_last) for _ in range(k)]
        xs1 = [torch.rand(cfg.train.batch_size, channels, image, image, device=device) for _ in range(batches)]

        def run_grouped(grouped=grouped, xs=xs):
            sum(grouped(x).sum() for x in xs).backward()

        def run_separate(separate=separate, xs1=xs1):
            for model in separate:
                sum(model(x).sum() for x in xs1).backward()
        out.append((k, run_grouped, run_separate))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="steps per timed measurement")
    parser.add_argument("--steps", type=int, default=10, help="steps of the equal-results check")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script end to end")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--min-cpu-share", type=float, default=0.9)
    parser.add_argument("--max-others-cores", type=float, default=0.3)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    overrides = ["denoiser.depth=3", "denoiser.width=8", "train.batch_size=4"] if args.quick else []
    cfg = load_config(args.profile if "/" in args.profile else f"configs/{args.profile}.yaml", overrides)
    if args.quick:
        args.rounds, args.repeats, args.steps = 1, 1, 2
    probe = idle_probe()
    if probe.others_cores > args.max_others_cores and not args.force:
        print(f"train_speed: the machine is busy ({probe.others_cores:.2f} other cores); nothing measured",
              file=sys.stderr)
        return CONTENDED_EXIT
    channels, image = 1, 28  # the quick profile's Fashion-MNIST
    torch.manual_seed(0)
    classifier = create_model(cfg.classifier.arch, in_channels=channels).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    base = create_model(cfg.denoiser.arch, in_channels=channels, depth=cfg.denoiser.depth,
                        width=cfg.denoiser.width)
    batch = cfg.train.batch_size
    images = tuple(torch.rand(batch, channels, image, image) for _ in range(2 + cfg.decrop.n_interp))
    labels = torch.randint(0, 10, (batch,))

    kinds = ("decrop stage 1", "decrop stage 2", "baseline")
    cases = {(k, v): Case(k, v, cfg, classifier, base, images, labels) for k in kinds for v in VARIANTS}
    flops = {k: step_flops(cases[(k, "today")]) for k in kinds}
    diffs = {}
    for k in kinds:
        reference = cases[(k, "today")].weights_after(args.steps)
        for v in VARIANTS[1:]:
            other = cases[(k, v)].weights_after(args.steps)
            diffs[(k, v)] = max((a - b).abs().max().item() for a, b in zip(reference, other))
    peaks = {"gemm": gemm_peak(256 if args.quick else 1024),
             "conv": conv_peak(batch, cfg.denoiser.width, image)}
    kseed = kseed_cases(cfg, channels, image, 2 + cfg.decrop.n_interp)

    times: dict[str, list[float]] = {}
    windows: dict[str, list[dict]] = {}
    jobs = [(f"{k} / {v}", c.step) for (k, v), c in cases.items()]
    jobs += [(f"peak {name}", fn) for name, (fn, _) in peaks.items()]
    for k, grouped, separate in kseed:
        jobs += [(f"K={k} grouped", grouped), (f"K={k} separate", separate)]
    for r in range(args.rounds):
        for label, fn in (jobs if r % 2 == 0 else jobs[::-1]):
            seconds, window = timed(fn, args.repeats)
            times.setdefault(label, []).append(seconds)
            windows.setdefault(label, []).append(window)
        print(f"train_speed: round {r + 1}/{args.rounds} done", flush=True)
    med = {label: statistics.median(v) for label, v in times.items()}
    problem = verdict(windows, args.min_cpu_share, args.max_others_cores)
    if problem and not args.force:
        print(f"train_speed: contended ({problem}); nothing written. Rerun on a quiet machine or --force.",
              file=sys.stderr)
        return CONTENDED_EXIT

    gemm = peaks["gemm"][1] / med["peak gemm"]
    conv = peaks["conv"][1] / med["peak conv"]
    share = statistics.median(w["cpu_share"] for ws in windows.values() for w in ws)
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')}: profile {cfg.name}{' (--quick)' if args.quick else ''}, "
             f"1 thread, {platform.processor() or platform.machine()}, torch {torch.__version__}"
             f"{' CONTENDED: ' + problem if problem else ''}", "",
             f"{args.rounds} interleaved rounds x {args.repeats} steps, medians. Median CPU share of the "
             f"measurements {share:.2f}; load before the run {probe.load:.2f}. DnCNN {cfg.denoiser.depth}x"
             f"{cfg.denoiser.width}, {cfg.classifier.arch}, batch {batch}, n_interp {cfg.decrop.n_interp}.", "",
             f"Measured peak on one core: fp32 GEMM 1024^3 {gemm / 1e9:.1f} GFLOP/s; the DnCNN's 3x3 conv "
             f"{cfg.denoiser.width}->{cfg.denoiser.width} at {image}x{image}, batch {batch}, forward + "
             f"backward {conv / 1e9:.1f} GFLOP/s ({conv / gemm:.0%} of GEMM).", "",
             "| objective | variant | ms / step | images / s / core | x today | GFLOP/s | % of GEMM peak "
             "| compile (s) | max weight diff after steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (k, v), case in cases.items():
        t = med[f"{k} / {v}"]
        rate = flops[k] / t
        lines.append(f"| {k} | {v} | {t * 1e3:.0f} | {batch / t:.0f} | {med[f'{k} / today'] / t:.2f}x | "
                     f"{rate / 1e9:.1f} | {rate / gemm:.0%} | {case.compile_s:.0f} | "
                     f"{diffs.get((k, v), 0.0):.1e} |")
    lines += ["", "Seeds that share the work (stage-1 denoiser forward + backward of the branches, grouped "
              "convolutions vs K separate denoisers one after another):", "",
              "| K | grouped (ms) | K separate (ms) | separate / grouped |", "|---|---|---|---|"]
    for k, _, _ in kseed:
        g, s = med[f"K={k} grouped"], med[f"K={k} separate"]
        lines.append(f"| {k} | {g * 1e3:.0f} | {s * 1e3:.0f} | {s / g:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
