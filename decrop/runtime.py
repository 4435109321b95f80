"""Process-level helpers: the device, seeding, progress lines for long phases, and model-mode guards."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .errors import ConfigError


def resolve_device(name: str, source: str = "config key 'device'") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a ConfigError naming `source` (the key
    or flag that asked for it) and the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"{source} = 'cuda' but no CUDA device is visible (torch {torch.__version__}, {build}): "
                          f"use cpu or auto, or run on a machine with a GPU")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Progress:
    """Prints ``label: done/total (pct) elapsed, eta`` at most every `every_s` seconds and at the end."""

    def __init__(self, label: str, total: int, every_s: float = 10.0, stream=None):
        self.label, self.total, self.every_s = label, total, every_s
        self.stream = stream or sys.stdout
        self.start = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        print(f"{self.label}: {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) "
              f"{elapsed:.0f}s elapsed, eta {eta:.0f}s {extra}".rstrip(), file=self.stream, flush=True)


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Stop glibc from returning large activation buffers to the OS after every forward pass.

    By default glibc serves allocations above 128 KiB-32 MiB with mmap and frees them with munmap, so a CPU
    forward pass over a batch of noisy images maps and unmaps (and page-faults) its activations anew every
    time, and certification can spend more time in the kernel than in convolutions. Raising the mmap and trim
    thresholds keeps those pages in the heap for reuse (`benchmarks/certify.py` measures what it buys).
    Process-wide, so entry points call it explicitly; a no-op off glibc. Returns whether
    the setting took effect.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))
    return _ALLOCATOR_TUNED


def release_memory() -> bool:
    """Hand the heap's free pages back to the OS (``gc.collect()``, then glibc's ``malloc_trim(0)``).

    `tune_allocator` keeps freed memory in the heap for the next forward pass; one-off peaks stay with it too:
    loading a dataset's full training split as float32 to draw a small subset leaves that much memory in every
    process that prepared the data (the sweep's driver, each training and certification worker) until it ends. Call it after such a peak, not in a loop (it walks the heap). Returns whether glibc took the call."""
    import gc

    gc.collect()
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None, frozen: bool = False) -> Iterator[None]:
    """Every submodule of `modules` in eval mode for the duration; each one's own mode restored afterwards.

    Modes may be mixed (a model in eval mode with one submodule in train mode comes back exactly so); calling
    ``module.train(flag)`` afterwards would flatten them. With ``frozen=True`` the parameters also stop
    requiring gradients for the duration (attacks and interpolation differentiate through a classifier that must
    not accumulate ``.grad``), and each parameter's flag is restored afterwards. ``None`` entries are skipped.
    """
    present = [m for m in modules if m is not None]
    modes = [(m, m.training) for module in present for m in module.modules()]
    flags = [(p, p.requires_grad) for module in present for p in module.parameters()] if frozen else []
    for module in present:
        module.eval()
        if frozen:
            module.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
