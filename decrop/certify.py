"""Certify a dataset, or a shard of it: seeded per-image noise, rows, and the forward batch that fits memory.

``certify_indices`` certifies ``dataset[i]`` for the given indices with `decrop.smooth.Smooth` (Cohen's fixed-n
CERTIFY, or its sequential early-stopping form), as the run's `decrop.config.CertifyConfig` section says, and
returns one `decrop.rows.CertRow` per image. It seeds every image from ``(seed, idx)``, so a dataset can be split
into shards (e.g. one per Ray task), certified anywhere, and merged with `decrop.rows.merge_rows` into exactly the
unsharded result. ``fit_batch_size`` picks the largest forward batch whose activations fit a memory budget.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import CertifyConfig
from .rows import CertRow
from .runtime import eval_mode
from .sequential import thresholds
from .smooth import AUTOCAST_DTYPES, Smooth


def image_seed(seed: int, idx: int) -> int:
    """Seed of image idx's noise: depends only on (seed, idx), so shards reproduce the unsharded run."""
    return (seed * 1_000_003 + idx) % 2**63


def certify_indices(
    model: nn.Module,
    dataset: Dataset | Sequence[tuple[torch.Tensor, int]],
    indices: Iterable[int],
    cfg: CertifyConfig,
    *,
    num_classes: int,
    sigma: float,
    seed: int,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, CertRow], None] | None = None,
) -> list[CertRow]:
    """CERTIFY ``dataset[i]`` for every i in ``indices`` (in that order) and return one row per image.

    ``cfg`` is the run's certification section: ``n0``, ``n``, ``alpha``, ``batch_size``, ``mode``, ``radii``,
    ``precision`` and ``memory_mb`` are read from it (``fold_bn`` is applied to the model beforehand, by
    `decrop.models.smoothed_model`; ``val_images`` chooses the indices). To vary one of them, build the section
    with ``dataclasses.replace(cfg, n=...)`` or ``CertifyConfig(n=...)``.
    ``dataset[i]`` is ``(image (C, H, W) in [0, 1], label)``; images are moved to ``device`` (default: the
    device of the model's parameters, CPU if it has none), where the model must already live. Image i's
    noise comes from its own generator seeded by ``(seed, i)``, so any sharding of ``indices`` yields the
    same rows. ``progress(done, total, row)`` is called after each image. Model modes are restored.
    In the exact mode, ``batch_size // max(n0, n)`` images share each forward batch when that is >= 2 (their
    ``time`` is the group's time divided evenly). ``mode="sequential"`` stops sampling an image once its
    certified-at-r outcome is settled for every r in `radii`, with the same alpha guarantee
    (`decrop.sequential`): ``n`` is then the most it may draw and ``samples`` says how many it drew; an image
    that stopped early reports the largest r in `radii` it is certified at as its radius. ``precision``
    "bf16"/"fp16" autocasts the model and certifies the reduced-precision model. ``memory_mb`` > 0 lowers
    ``batch_size`` to what fits that many MiB of activations (`fit_batch_size`). Noise is drawn per forward
    batch, so rows are reproducible for a given seed *and* batch size: keep the batch size fixed (or the budget
    and machine) to reproduce a run.
    """
    n0, n, alpha, batch_size, mode = cfg.n0, cfg.n, cfg.alpha, cfg.batch_size, cfg.mode
    radii, precision, memory_mb = cfg.radii, cfg.precision, cfg.memory_mb
    if mode not in ("exact", "sequential"):
        raise ValueError(f"unknown certification mode {mode!r}; choose 'exact' or 'sequential'")
    if mode == "sequential":
        thresholds(radii, sigma)  # bad radii fail here, before any compute
    indices = list(indices)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    smooth = Smooth(model, num_classes, sigma, precision)
    if memory_mb > 0 and indices:
        batch_size = fit_batch_size(model, dataset[indices[0]][0].shape, device, memory_mb, batch_size, precision)
    group_size = max(1, batch_size // max(n0, n)) if mode == "exact" else 1
    rows: list[CertRow] = []
    for start in range(0, len(indices), group_size):
        group = indices[start:start + group_size]
        images, labels = zip(*(dataset[idx] for idx in group))
        xs = torch.stack([image.to(device) for image in images])
        generators = [torch.Generator(device=device).manual_seed(image_seed(seed, idx)) for idx in group]
        tic = time.perf_counter()
        if mode == "exact":
            results = [(*result, n0 + n) for result in smooth.certify_many(xs, n0, n, alpha, batch_size, generators)]
        else:
            results = [smooth.certify_sequential(xs[0], n0, n, alpha, batch_size, radii, generators[0])]
        elapsed = (time.perf_counter() - tic) / len(group)
        for idx, label, (prediction, radius, samples) in zip(group, labels, results):
            row = CertRow(idx, int(label), prediction, radius, int(prediction == int(label)), elapsed, samples)
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(indices), row)
    return rows


def fit_batch_size(model: nn.Module, image_shape: Sequence[int], device: torch.device | str, budget_mb: float,
                   upper: int, precision: str = "fp32", probe: int = 4) -> int:
    """The largest forward batch (<= `upper`) whose activations fit `budget_mb` MiB, measured on `probe` images.

    On CUDA the probe's peak allocation is measured by the caching allocator. On the CPU, where torch keeps no
    such count, forward hooks record every leaf module's input and output; inference frees a layer's input once
    its output exists, so the peak is the largest input + output of one layer, plus the noisy batch itself,
    with a 1.5x margin for the allocator's rounding and temporaries. The model is run in eval mode under the
    certification's precision and left in the modes it was in.
    """
    if budget_mb <= 0 or upper < 1:
        raise ValueError(f"need budget_mb > 0 and upper >= 1, got {budget_mb} and {upper}")
    device = torch.device(device)
    x = torch.rand(probe, *image_shape, device=device)
    dtype = AUTOCAST_DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with eval_mode(model), torch.inference_mode(), autocast:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            model(x)
            torch.cuda.synchronize(device)
            used = torch.cuda.max_memory_allocated(device) - start + x.numel() * x.element_size()
        else:
            peak = [0]

            def record(module, inputs, output):
                size = sum(t.numel() * t.element_size() for t in (*inputs, output) if torch.is_tensor(t))
                peak[0] = max(peak[0], size)

            handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
            try:
                model(x)
            finally:
                for handle in handles:
                    handle.remove()
            used = 1.5 * (peak[0] + x.numel() * x.element_size())
    per_sample = max(used / probe, 1.0)
    return int(max(1, min(upper, budget_mb * 2**20 // per_sample)))
