"""Was the machine quiet while we timed? CPU accounting around one measurement, and the gate on it.

A throughput number taken while other work shares the CPU reads low (on the shared 2-core machine the conv peak
read 208 GFLOP/s instead of ~450), and nothing in the number says so. Two signals do, both cheap:

- **CPU share** of the measuring process: its user + system CPU seconds (every thread, `resource.getrusage`)
  over wall seconds times the threads it runs. Threads that were descheduled because another process held
  their core lower it (a busy loop on one of two cores brings two threads to ~0.5-0.7).
- **Others' cores**: the machine's busy CPU seconds from ``/proc/stat`` (user, nice, system, irq, softirq and
  the hypervisor's steal) minus our own, over wall seconds: how many cores' worth of *other* work ran meanwhile.
  On a quiet machine it is a few hundredths.

`Window` measures both around a block; `verdict` turns medians of them into a one-line reason, or None.
Linux only (``/proc/stat``); elsewhere the machine-wide figure is NaN and only the CPU share is judged.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; steal included), NaN without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Window:
    """CPU accounting of the block it wraps: ``with Window(threads) as w: ...`` then ``w.cpu_share``,
    ``w.others_cores``, ``w.wall`` (seconds) and ``w.load`` (1-minute load average at the end)."""

    threads: int
    wall: float = math.nan
    cpu_share: float = math.nan
    others_cores: float = math.nan
    load: float = math.nan

    def __enter__(self) -> Window:
        self._start = (time.perf_counter(), own_cpu_seconds(), machine_busy_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall0, own0, busy0 = self._start
        self.wall = time.perf_counter() - wall0
        own = own_cpu_seconds() - own0
        self.cpu_share = own / (self.wall * self.threads)
        self.others_cores = max(0.0, (machine_busy_seconds() - busy0 - own) / self.wall)
        self.load = os.getloadavg()[0]

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_share": self.cpu_share, "others_cores": self.others_cores,
                "load1": self.load}


def idle_probe(seconds: float = 1.0) -> Window:
    """How busy the rest of the machine is right now: a window of `seconds` in which this process sleeps."""
    with Window(threads=1) as window:
        time.sleep(seconds)
    return window


def verdict(series: dict[str, list[dict[str, float]]], min_cpu_share: float, max_others_cores: float
            ) -> str | None:
    """None when every series' median CPU share is >= `min_cpu_share` and its median others' cores is
    <= `max_others_cores`; otherwise a one-line reason naming the worst series. `series` maps a label
    (e.g. ``"reference small_cnn_28"``) to the `Window.as_dict` of each repetition."""
    problems = []
    for label, windows in series.items():
        share = statistics.median(w["cpu_share"] for w in windows)
        others = statistics.median(w["others_cores"] for w in windows)
        if share < min_cpu_share:
            problems.append((min_cpu_share - share, f"{label} had a median CPU share of {share:.2f} "
                                                    f"(< {min_cpu_share:.2f})"))
        if not math.isnan(others) and others > max_others_cores:
            problems.append((others - max_others_cores, f"other processes used {others:.2f} cores during "
                                                         f"{label} (> {max_others_cores:.2f})"))
    if not problems:
        return None
    worst = max(problems)[1]
    return worst + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")
