"""Certification throughput: a reference CERTIFY written the standard way against decrop's engine.

    .venv/bin/python benchmarks/certify.py [--rounds 5] [--n 1000] [--images 2] [--threads T] [--out FILE.md]
    .venv/bin/python benchmarks/certify.py --quick          # tiny sizes: checks the script end to end

Same models, images, n0, n and batch size for both. The reference is Cohen et al.'s loop as usually written
(per image ``x.repeat``, noise added, argmax, counts moved to the host after every batch, NCHW, fp32, the
default allocator). The engine is `decrop.certify.certify_indices` (noise and counts on the device, one host
sync per image group, channels_last, the glibc allocator setting of `decrop.runtime.tune_allocator`) in fp32
and in bf16 autocast. Reported per case: samples/s, the ratio to the reference, the fraction of the machine's
conv peak (DnCNN's 64->64 3x3 channels_last conv at the case's image size, per precision), peak resident
memory, and the CPU accounting of every measurement.

**Method (why it looks like this).** The allocator setting is process-wide and cannot be undone, and the
reference is defined by the default allocator while the engine and the peak probe run with the setting. So
each lives in a child process of its own, started once: the *reference* child never touches the allocator;
the *engine* child calls `tune_allocator` first and runs the engine and the conv peak probe (so the peak is
measured on the allocator the engine uses). The parent drives them one at a time (the idle child only waits
on its pipe) in R interleaved rounds: reference, engine fp32, engine bf16, peak fp32, peak bf16 per case, the
order reversed every other round so slow drift cannot favour one side. Each (measurement, case) is warmed up
once, untimed. Reported numbers are medians over the rounds, with the min-max spread; ratios and % of peak are
paired per round (same round's reference and peak), then the median is taken.

**Contention.** Every measurement records its process's CPU share (CPU seconds over wall seconds x threads)
and how many cores' worth of other work ran meanwhile (`benchmarks.contention`). A run whose medians show
contention (CPU share below --min-cpu-share, others above --max-others-cores), or whose machine is busy before
it starts, is refused: exit code 3, nothing written. ``--force`` records it anyway, flagged CONTENDED. (On
CUDA only the other processes are judged: a process waiting for the GPU has a low CPU share by nature.)

Cases: DnCNN-17x64 with the small CNN at 1x28x28, and DnCNN-17x64 with ResNet-20 at 3x32x32 (on CUDA also
ResNet-110, the paper's classifier). For the GPU check see ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.contention import Window, idle_probe, verdict  # noqa: E402
from decrop.certify import certify_indices  # noqa: E402
from decrop.config import CertifyConfig  # noqa: E402
from decrop.models import create_model  # noqa: E402
from decrop.runtime import tune_allocator  # noqa: E402

CONTENDED_EXIT = 3
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 5 ms from /proc."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        page = os.sysconf("SC_PAGE_SIZE")
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


# ------------------------------------------------------------------------------------------- child processes

@dataclass
class _Case:
    model: nn.Module
    shape: tuple[int, int, int]
    images: list[tuple[torch.Tensor, int]]
    macs: float  # multiply-accumulates per sample


class _Bench:
    """What one child measures, its cases built on first use. The engine child converts its models to
    channels_last (the engine's layout); the reference child keeps NCHW."""

    def __init__(self, settings: dict, channels_last: bool):
        self.s, self.device, self.channels_last = settings, torch.device(settings["device"]), channels_last
        self.cases: dict[str, _Case] = {}
        self.warm: set[tuple[str, str, str]] = set()

    def case(self, name: str) -> _Case:
        if name not in self.cases:
            model, shape = make_case(name, self.device)
            macs = conv_macs_per_sample(model, shape, self.device)
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            images = [(torch.rand(shape, generator=torch.Generator().manual_seed(i)), i % 10)
                      for i in range(self.s["images"])]
            self.cases[name] = _Case(model, shape, images, macs)
        return self.cases[name]

    def job(self, kind: str, name: str, precision: str, images: list) -> tuple[Callable[[], object], int]:
        """The callable timed for (kind, case, precision) on `images`, and the noisy samples it classifies."""
        s, device, case = self.s, self.device, self.case(name)
        samples = len(images) * (s["n0"] + s["n"])
        if kind == "reference":
            return (lambda: [reference_certify(case.model, x.to(device), s["n0"], s["n"], s["batch_size"], 0.25,
                                               10) for x, _ in images]), samples
        if kind == "engine":
            cfg = CertifyConfig(n0=s["n0"], n=s["n"], alpha=0.001, batch_size=s["batch_size"], precision=precision)
            return (lambda: certify_indices(case.model, images, range(len(images)), cfg, num_classes=10, sigma=0.25,
                                            seed=0, device=device)), samples
        batch = min(s["batch_size"], 256)
        return (lambda: conv_peak_flops(device, _PRECISIONS[precision], batch=batch, size=case.shape[-1],
                                        seconds=s["peak_seconds"])), 0

    def measure(self, kind: str, name: str, precision: str) -> dict:
        """One timed run with its CPU accounting; ``rate`` is samples/s, or FLOP/s for the peak probe."""
        case = self.case(name)
        if (kind, name, precision) not in self.warm:  # first calls build kernels and grow the heap: untimed
            self.job(kind, name, precision, case.images[:1])[0]()
            self.warm.add((kind, name, precision))
        fn, samples = self.job(kind, name, precision, case.images)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        with PeakRSS() as mem, Window(self.s["threads"]) as window:
            value = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        rate = value if kind == "peak" else samples / window.wall
        return {"kind": kind, "case": name, "precision": precision, "rate": rate, "mib": mem.mib,
                "gflop_per_sample": 2 * case.macs / 1e9, **window.as_dict()}


def _serve(conn, role: str, settings: dict) -> None:
    """Child main loop: answer (kind, case, precision) requests with `_Bench.measure` until None arrives."""
    torch.set_num_threads(settings["threads"])
    if role == "engine" and not tune_allocator():
        print("certify benchmark: the allocator setting did not take effect (not glibc?)", file=sys.stderr)
    bench = _Bench(settings, channels_last=role == "engine")
    while (request := conn.recv()) is not None:
        try:
            conn.send(bench.measure(*request))
        except Exception as err:  # reported by the parent, which stops the run
            conn.send({"error": f"{role} child: {err!r}"})


class Child:
    """A measuring child process (spawned: a fresh interpreter whose allocator nobody has touched)."""

    def __init__(self, role: str, settings: dict):
        self.role = role
        self.conn, child_conn = mp.Pipe()
        self.process = mp.get_context("spawn").Process(target=_serve, args=(child_conn, role, settings),
                                                       name=f"certify-{role}", daemon=True)
        self.process.start()

    def measure(self, kind: str, case: str, precision: str = "fp32") -> dict:
        self.conn.send((kind, case, precision))
        try:
            result = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.role} child exited (exit code {self.process.exitcode}; killed for "
                               f"memory?) while measuring {kind} {precision} on {case}") from None
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=30)


# ------------------------------------------------------------------------------------------------- the parent

def run_rounds(cases: list[str], settings: dict, rounds: int) -> list[dict]:
    """Every measurement of R interleaved rounds (see the module doc), each a dict with its round number."""
    reference, engine = Child("reference", settings), Child("engine", settings)
    steps = [(reference, "reference", "fp32"), (engine, "engine", "fp32"), (engine, "engine", "bf16"),
             (engine, "peak", "fp32"), (engine, "peak", "bf16")]
    records = []
    try:
        for r in range(rounds):
            for case in cases:
                for child, kind, precision in (steps if r % 2 == 0 else steps[::-1]):
                    record = {"round": r, **child.measure(kind, case, precision)}
                    print(json.dumps(record), flush=True)
                    records.append(record)
    finally:
        reference.close()
        engine.close()
    return records


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(records: list[dict]) -> list[dict]:
    """Per case: medians and spreads of samples/s, per-round ratios and % of peak, CPU accounting."""
    out = []
    for case in dict.fromkeys(r["case"] for r in records):
        by = {}
        for r in records:
            if r["case"] == case:
                by.setdefault(f"{r['kind']}_{r['precision']}", {})[r["round"]] = r
        rounds = sorted(by["reference_fp32"])
        row = {"case": case, "gflop_per_sample": by["reference_fp32"][rounds[0]]["gflop_per_sample"]}
        flop = row["gflop_per_sample"] * 1e9
        for key, series in by.items():
            row[key] = {"rate": _median_spread([series[i]["rate"] for i in rounds]),
                        "mib": statistics.median(series[i]["mib"] for i in rounds),
                        "windows": [{k: series[i][k] for k in ("wall_s", "cpu_share", "others_cores", "load1")}
                                    for i in rounds]}
        ref = by["reference_fp32"]
        for precision in ("fp32", "bf16"):
            eng, peak = by[f"engine_{precision}"], by[f"peak_{precision}"]
            row[f"{precision}_ratio"] = _median_spread([eng[i]["rate"] / ref[i]["rate"] for i in rounds])
            row[f"{precision}_of_peak"] = _median_spread([eng[i]["rate"] * flop / peak[i]["rate"] for i in rounds])
        row["reference_of_peak"] = _median_spread([ref[i]["rate"] * flop / by["peak_fp32"][i]["rate"]
                                                   for i in rounds])
        out.append(row)
    return out


def _fmt(triple: tuple[float, float, float], scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    med, lo, hi = (v * scale for v in triple)
    return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def _median_of(row: dict, key: str, field: str) -> float:
    return statistics.median(w[field] for w in row[key]["windows"])


def render(rows: list[dict], settings: dict, meta: dict, problem: str | None) -> str:
    """The Markdown section of one run: heading with date, device, threads, torch, load; status; table."""
    s = settings
    status = (f"> **CONTENDED**{' (recorded with --force)' if s['force'] else ''}: {problem}. These numbers "
              f"understate the machine."
              if problem else f"quiet: every series' median CPU share >= {s['min_cpu_share']:.2f} and other "
                              f"processes <= {s['max_others_cores']:.2f} cores")
    keys = ["reference_fp32", "engine_fp32", "engine_bf16", "peak_fp32", "peak_bf16"]
    lines = [f"\n## {'CONTENDED: ' if problem else ''}{meta['date']} on {s['device']} ({s['threads']} threads of "
             f"{meta['cpus']} CPUs), torch {meta['torch']}; n0 {s['n0']}, n {s['n']}, {s['images']} images, "
             f"batch {s['batch_size']}, {s['rounds']} interleaved rounds",
             f"load average (1 min) {meta['load_before']:.2f} before, {meta['load_after']:.2f} after; other "
             f"processes used {meta['others_before']:.2f} cores just before the run. Medians over the rounds, "
             f"min-max in brackets; ratios and % of peak paired per round.\n", status + "\n",
             "| case | GFLOP/sample | reference samples/s | fp32 samples/s | fp32 ratio | fp32 % of peak | "
             "bf16 samples/s | bf16 ratio | bf16 % of bf16 peak | reference % of peak | peak GFLOP/s fp32 / bf16 | "
             "CPU share ref / fp32 / bf16 / peak | other processes (cores) | load (1 min) | "
             "peak MiB ref / fp32 / bf16 |", "|" + "---|" * 15]
    for r in rows:
        shares = " / ".join(f"{_median_of(r, k, 'cpu_share'):.2f}" for k in keys[:4])
        others = max(_median_of(r, k, "others_cores") for k in keys)
        load = statistics.median(w["load1"] for k in keys for w in r[k]["windows"])
        lines.append(
            f"| {r['case']} | {r['gflop_per_sample']:.3f} | {_fmt(r['reference_fp32']['rate'])} | "
            f"{_fmt(r['engine_fp32']['rate'])} | {_fmt(r['fp32_ratio'], digits=2, unit='x')} | "
            f"{_fmt(r['fp32_of_peak'], 100, unit='%')} | {_fmt(r['engine_bf16']['rate'])} | "
            f"{_fmt(r['bf16_ratio'], digits=2, unit='x')} | {_fmt(r['bf16_of_peak'], 100, unit='%')} | "
            f"{_fmt(r['reference_of_peak'], 100, unit='%')} | {r['peak_fp32']['rate'][0] / 1e9:.0f} / "
            f"{r['peak_bf16']['rate'][0] / 1e9:.0f} | {shares} | {others:.2f} | {load:.2f} | "
            f"{r['reference_fp32']['mib']:.0f} / {r['engine_fp32']['mib']:.0f} / {r['engine_bf16']['mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--images", type=int, default=2, help="images per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--peak-seconds", type=float, default=1.0, help="duration of each conv peak probe")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads per child")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", nargs="+", default=None, choices=["small_cnn_28", "resnet20_32", "resnet110_32"])
    p.add_argument("--min-cpu-share", type=float, default=0.8, help="refuse below this median CPU share")
    p.add_argument("--max-others-cores", type=float, default=0.2,
                   help="refuse when other processes use more cores than this (median) while measuring")
    p.add_argument("--force", action="store_true", help="record a contended run, flagged CONTENDED")
    p.add_argument("--quick", action="store_true", help="tiny sizes (n0 20, n 200, 1 image, 2 rounds): a check "
                                                        "that the script runs, not a measurement")
    p.add_argument("--out", type=Path, default=None, help="append the results as Markdown to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.n0, args.n, args.images, args.rounds, args.batch_size, args.peak_seconds = 20, 200, 1, 2, 100, 0.2
    for name in ("n0", "n", "images", "rounds", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = args.cases or (["small_cnn_28", "resnet20_32"] + (["resnet110_32"] if args.device != "cpu" else []))
    settings = {k: getattr(args, k) for k in ("n0", "n", "images", "rounds", "batch_size", "peak_seconds",
                                              "threads", "device", "min_cpu_share", "max_others_cores", "force")}
    before = idle_probe()
    if before.others_cores > args.max_others_cores and not args.force:
        print(f"certify benchmark: refused before starting: other processes are using {before.others_cores:.2f} "
              f"cores (> {args.max_others_cores:.2f}). Nothing was measured or written; rerun on a quiet "
              f"machine, or pass --force to record a run flagged CONTENDED.", file=sys.stderr)
        return CONTENDED_EXIT
    try:
        records = run_rounds(cases, settings, args.rounds)
    except RuntimeError as err:
        print(f"certify benchmark: failed: {err}", file=sys.stderr)
        return 1
    rows = summarize(records)
    series = {f"{r['kind']} {r['precision']} on {r['case']}": [] for r in records}
    for r in records:
        series[f"{r['kind']} {r['precision']} on {r['case']}"].append(r)
    # On a GPU the measuring process mostly waits for the device, so its CPU share says nothing there.
    problem = verdict(series, args.min_cpu_share if args.device == "cpu" else 0.0, args.max_others_cores)
    if before.others_cores > args.max_others_cores:
        problem = f"other processes used {before.others_cores:.2f} cores before the run" + (
            f"; {problem}" if problem else "")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_before": before.load, "load_after": os.getloadavg()[0], "others_before": before.others_cores}
    text = render(rows, settings, meta, problem)
    print(text)
    if problem and not args.force:
        print(f"certify benchmark: refused: {problem}. Nothing was written; rerun on a quiet machine, or pass "
              f"--force to record it flagged CONTENDED.", file=sys.stderr)
        return CONTENDED_EXIT
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
