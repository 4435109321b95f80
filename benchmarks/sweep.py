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
report (``Where the time went``) breaks the trials down further. With them: what held the memory at the peak
(anonymous RSS by process kind, e.g. ``ray::RayTrainWorker``), the CPU share of the sweep's processes
(their CPU seconds over wall x cores) next to the load average before the start, so a run that shared the
machine shows it, and where the CPU seconds went by process kind. Nothing else should run on the machine while it measures.
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


TICK = os.sysconf("SC_CLK_TCK")


def tree(root: int) -> dict[int, tuple[int, float]]:
    """{pid: (RSS bytes, CPU seconds so far)} of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:  # the process ended while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        info[int(entry)] = (int(statm[1]) * PAGE, (int(fields[11]) + int(fields[12])) / TICK)
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in info:
            found[pid] = info[pid]
        stack.extend(children.get(pid, []))
    return found


def process_kind(argv: list[str]) -> str:
    """A process's kind from its command line: Ray's title (``ray::RayTrainWorker``, ``ray-dashboard-X-0``),
    ``python script.py`` -> the script, ``python -m mod`` -> mod, ``python -c ...`` -> ``python -c``."""
    if not argv:
        return "?"
    first = argv[0].split(" ")[0]  # titles set by setproctitle hold the whole line in one word
    if not Path(first).name.startswith("python") or len(argv) == 1:
        return Path(first).name if "/" in first else first
    for i, word in enumerate(argv[1:], 1):
        if word == "-m" and i + 1 < len(argv):
            return argv[i + 1]
        if word == "-c":
            return "python -c"
        if not word.startswith("-"):
            return Path(word).name
    return "python"


def kind_of(pid: int) -> str | None:
    """`process_kind` of a running process; None once it has ended."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return process_kind([w.decode(errors="replace") for w in words if w])


def holders(pids) -> str:
    """Anonymous RSS by process kind (`process_kind`, e.g. ``ray::RayTrainWorker``), largest first."""
    kinds: dict[str, list[int]] = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        name, anon = kind_of(pid), re.search(r"RssAnon:\s+(\d+)", status)
        if name is not None:
            kinds.setdefault(name, []).append(int(anon.group(1)) * 1024 if anon else 0)
    ranked = sorted(kinds.items(), key=lambda kv: -sum(kv[1]))
    return ", ".join(f"{name} {len(v)} x {sum(v) / len(v) / 2**20:.0f} MiB" for name, v in ranked if sum(v) > 50 * 2**20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sweep_cpu.md")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("sweep_args", nargs=argparse.REMAINDER, help="arguments for tuning/sweep.py, after --")
    args = p.parse_args()
    sweep_args = args.sweep_args[1:] if args.sweep_args[:1] == ["--"] else args.sweep_args

    idle, load = machine_used(), os.getloadavg()[0]
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
    peak = {"used": 0, "rss": 0, "procs": 0, "holders": ""}
    cpu: dict[int, float] = {}  # the last CPU seconds seen of every process of the sweep
    kind: dict[int, str] = {}  # and its kind, as last seen (a Ray worker takes its title once it has started)

    def sample() -> None:
        while child.poll() is None:
            used = machine_used() - idle
            procs = tree(child.pid)
            cpu.update({pid: seconds for pid, (_, seconds) in procs.items()})
            for pid in procs:
                name = kind_of(pid)
                if name is not None:
                    kind[pid] = name
            rss = sum(r for r, _ in procs.values())
            if used > peak["used"]:
                peak["used"], peak["holders"] = used, holders(procs)
            if rss > peak["rss"]:
                peak["rss"], peak["procs"] = rss, len(procs)
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
    share = sum(cpu.values()) / (wall * (os.cpu_count() or 1))
    by_kind: dict[str, list[float]] = {}
    for pid, seconds in cpu.items():
        by_kind.setdefault(kind.get(pid, "?"), []).append(seconds)
    ranked = sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))[:12]
    cpu_notes = ", ".join(f"{name} {len(v)} x {sum(v) / len(v):.0f} s" for name, v in ranked)
    notes = (f"CPU share of the sweep's processes {share:.0%} of {os.cpu_count()} cores (load average before the "
             f"start {load:.2f}); CPU seconds by process kind (processes x mean): {cpu_notes}; at the memory peak, "
             f"anonymous RSS: {peak['holders']}")
    print(f"benchmark: exit {rc}, wall {wall:.0f} s, peak machine memory above idle {peak['used'] / 2**30:.2f} GiB, "
          f"peak summed RSS {peak['rss'] / 2**30:.2f} GiB over {peak['procs']} processes; {notes}", flush=True)
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Whole-sweep wall time and peak memory (`python benchmarks/sweep.py -- ARGS`)\n\n"
                            "| date | sweep arguments | CPUs | wall | peak memory above idle | peak summed RSS | exit |\n"
                            "|---|---|---|---|---|---|---|\n")
    with args.out.open("a") as fh:
        fh.write(line + "\n")
        fh.write("\n" + notes + ".\n")
        if phases:
            fh.write("\nPhases: " + "; ".join(phases) + "\n")
        fh.write("\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
