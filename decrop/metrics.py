"""Metric sinks: how training loops report numbers without knowing who listens.

The library's loops call ``sink.log_metrics({"train/loss": ..., "val/agreement": ...}, step=epoch)``.
`tuning/` plugs in sinks that forward to Ray (``ray.train.report``) and MLflow; here live the ones a plain
run needs: a printer for progress, an in-memory history for tests and summaries, and a fan-out.
Keys are namespaced (``train/*``, ``val/*``, ``certify/*``) so MLflow groups them.
"""

from __future__ import annotations

import sys
from typing import Mapping, Protocol, TextIO


class MetricSink(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record `metrics` at `step` (the epoch for training loops)."""


class PrintSink:
    """Prints one line per step: ``[baseline] epoch 3/20  train/loss 0.412  val/agreement 0.930``."""

    def __init__(self, prefix: str = "", total: int | None = None, stream: TextIO | None = None):
        self.prefix, self.total, self.stream = prefix, total, stream

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        of = f"/{self.total}" if self.total else ""
        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{self.prefix}epoch {step}{of}  {values}", file=self.stream or sys.stdout, flush=True)


class MemorySink:
    """Keeps every reported row: ``history[i] = {"step": ..., **metrics}``."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.history.append({"step": step, **metrics})

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.history if key in row]


class MultiSink:
    """Forwards to several sinks in order."""

    def __init__(self, *sinks: MetricSink | None):
        self.sinks = [s for s in sinks if s is not None]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)
