"""Per-image certification results: ``CertRow``, Cohen's tab-separated files, and the summaries of rows.

A file has Cohen et al.'s columns ``idx label predict radius correct time`` plus ``samples`` (forward passes
used). Radii are written at full precision (shortest repr that reads back to the same float): a rounded radius
could be rounded *up*, e.g. 0.24996 written as 0.2500 would count as certified at r = 0.25. Files written by
Cohen's own ``code/certify.py`` (six columns, radius as ``{:.3}``, time as ``str(datetime.timedelta)``, e.g.
``0:00:13.736080``) are read too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HEADER = ("idx", "label", "predict", "radius", "correct", "time", "samples")  # Cohen's six + samples used
# str(datetime.timedelta): "[D day[s], ]H:MM:SS[.ffffff]"
_TIMEDELTA = re.compile(r"^(?:(\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)$")


@dataclass(frozen=True)
class CertRow:
    """One certified image, Cohen's output columns.

    ``predict`` is ABSTAIN (-1) or a class, ``radius`` is 0.0 on abstain, ``correct`` is 1 iff
    ``predict == label``, ``time`` is the wall-clock seconds spent certifying this image, ``samples`` the
    noisy forward passes it used (n0 + n in the exact mode, fewer when the sequential mode stops early).
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float
    samples: int = 0


def write_rows(rows: Iterable[CertRow], path: str | Path) -> None:
    """Write rows as Cohen's tab-separated table plus ``samples``; radius at full precision (never rounded)."""
    lines = ["\t".join(HEADER)]
    for r in rows:
        lines.append(f"{r.idx}\t{r.label}\t{r.predict}\t{float(r.radius)!r}\t{r.correct}\t{r.time:.6f}\t{r.samples}")
    Path(path).write_text("\n".join(lines) + "\n")


def parse_seconds(text: str) -> float:
    """Seconds from ``"13.7"`` or from ``str(datetime.timedelta)`` such as ``"0:00:13.736080"`` or
    ``"1 day, 2:03:04"``; ValueError otherwise."""
    match = _TIMEDELTA.match(text.strip())
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)


def read_rows(path: str | Path) -> list[CertRow]:
    """Read a table written by ``write_rows`` or by Cohen et al.'s ``certify.py``; ValueError naming the file
    and line if it is malformed."""
    lines = Path(path).read_text().splitlines()
    header = tuple(lines[0].split("\t")) if lines else ()
    if header not in (HEADER, HEADER[:6]):  # Cohen's original six columns are read too
        expected = "\t".join(HEADER)
        raise ValueError(f"{path}: expected header {expected!r}")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}: line {lineno}: expected {len(header)} fields, got {len(fields)}")
        try:
            idx, label, predict, correct = (int(fields[i]) for i in (0, 1, 2, 4))
            radius, elapsed = float(fields[3]), parse_seconds(fields[5])
            samples = int(fields[6]) if len(fields) > 6 else 0
        except ValueError as err:
            raise ValueError(f"{path}: line {lineno}: {err}") from None
        rows.append(CertRow(idx, label, predict, radius, correct, elapsed, samples))
    return rows


def certified_counts(rows: Sequence[CertRow], radii: Sequence[float]) -> dict[float, int]:
    """For each r in radii, how many rows are certified correct with radius >= r (at r = 0: correct and not
    abstained). Compares the exact stored radius: nothing is rounded."""
    return {float(r): sum(row.correct == 1 and row.radius >= r for row in rows) for r in radii}


def certified_accuracy(rows: Sequence[CertRow], radii: Sequence[float]) -> dict[float, float]:
    """For each r in radii, the fraction of rows certified correct with radius >= r (`certified_counts` / rows)."""
    if not rows:
        raise ValueError("certified_accuracy needs at least one row")
    return {r: k / len(rows) for r, k in certified_counts(rows, radii).items()}


def average_certified_radius(rows: Sequence[CertRow]) -> float:
    """ACR: mean over rows of the radius if certified correct, else 0."""
    if not rows:
        raise ValueError("average_certified_radius needs at least one row")
    return math.fsum(row.radius if row.correct == 1 else 0.0 for row in rows) / len(rows)


def merge_rows(shards: Iterable[Sequence[CertRow]]) -> list[CertRow]:
    """Concatenate shards' rows sorted by idx; ValueError if an idx appears twice."""
    rows = sorted((row for shard in shards for row in shard), key=lambda row: row.idx)
    for prev, row in zip(rows, rows[1:]):
        if prev.idx == row.idx:
            raise ValueError(f"duplicate idx {row.idx} across shards")
    return rows
