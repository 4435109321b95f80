"""Wall time and peak memory of a whole sweep: `tuning/sweep.py` run as a child, its process tree sampled.

    python benchmarks/sweep.py [--out FILE] -- [sweep.py arguments]

The sweep runs exactly as a user would start it. Every second this samples two things, because a Ray sweep is
many processes (driver, GCS, raylet, workers, Train workers, certification tasks) and shared memory (Ray's object
store) would be counted once per process by a plain sum of RSS:

- the machine's used memory (MemTotal - MemAvailable) above what it was before the sweep started: what the sweep
  really takes from the machine, page cache excluded, shared memory counted once;
- the sum of the RSS of every process descending from the sweep: an upper bound that double-counts shared pages.

It prints the wall time, both peaks and the number of processes at the peak, and appends a Markdown line to
``--out`` with the sweep's own phase lines (data and classifier, search, confirmation, report); the study's
report (``Where the time went``) breaks the trials down further. Nothing else should run on the machine while
it measures.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def machine_used() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def tree_rss(root: int) -> tuple[int, int]:
    """Sum of RSS over `root` and all its descendants, and how many processes that is."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * PAGE
    total, count, stack = 0, 0, [root]
    while stack:
        pid = stack.pop()
        total, count = total + rss.get(pid, 0), count + 1
        stack.extend(children.get(pid, []))
    return total, count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sweep_cpu.md")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("sweep_args", nargs=argparse.REMAINDER, help="arguments for tuning/sweep.py, after --")
    args = p.parse_args()
    sweep_args = args.sweep_args[1:] if args.sweep_args[:1] == ["--"] else args.sweep_args

    idle = machine_used()
    command = [sys.executable, str(REPO / "tuning" / "sweep.py"), *sweep_args]
    print(f"benchmark: {' '.join(command)} (machine memory in use before: {idle / 2**30:.2f} GiB)", flush=True)
    tic = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, bufsize=1)
    phases: list[str] = []

    def relay() -> None:  # the sweep's output as it comes, keeping its phase lines ("... done in 300s")
        for text in child.stdout:
            print(text, end="", flush=True)
            if re.search(r"(ready|done|written) in \d+s", text):
                phases.append(text.strip())

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    peak = {"used": 0, "rss": 0, "procs": 0}

    def sample() -> None:
        while child.poll() is None:
            used = machine_used() - idle
            rss, procs = tree_rss(child.pid)
            if used > peak["used"]:
                peak["used"] = used
            if rss > peak["rss"]:
                peak["rss"], peak["procs"] = rss, procs
            time.sleep(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = child.wait()
    wall = time.perf_counter() - tic
    sampler.join(timeout=5)
    relay_thread.join(timeout=5)
    line = (f"| {time.strftime('%Y-%m-%d')} | `{' '.join(sweep_args) or '(defaults)'}` | {os.cpu_count()} | "
            f"{wall / 60:.1f} min | {peak['used'] / 2**30:.2f} GiB | {peak['rss'] / 2**30:.2f} GiB "
            f"({peak['procs']} processes) | {rc} |")
    print(f"benchmark: exit {rc}, wall {wall:.0f} s, peak machine memory above idle {peak['used'] / 2**30:.2f} GiB, "
          f"peak summed RSS {peak['rss'] / 2**30:.2f} GiB over {peak['procs']} processes", flush=True)
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Whole-sweep wall time and peak memory (`python benchmarks/sweep.py -- ARGS`)\n\n"
                            "| date | sweep arguments | CPUs | wall | peak memory above idle | peak summed RSS | exit |\n"
                            "|---|---|---|---|---|---|---|\n")
    with args.out.open("a") as fh:
        fh.write(line + "\n")
        if phases:
            fh.write("\nPhases: " + "; ".join(phases) + "\n\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
