"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)`` with ``delta ~ N(0, sigma^2 I)``.
``Smooth.certify`` is Cohen's CERTIFY: ``n0`` noisy copies pick the top class ``cA``, ``n`` *fresh* copies
count it, and a one-sided Clopper-Pearson bound ``pA_lower`` on ``P(f(x + delta) = cA)`` gives the l2 radius
``sigma * Phi^-1(pA_lower)``, valid with probability >= 1 - alpha. ``Smooth.predict`` is PREDICT.

``f`` is any module mapping images in [0, 1] to logits, e.g. ``nn.Sequential(denoiser, classifier)`` (the
denoised-smoothing composition used by DE-CROP); normalisation belongs inside ``f``.

Per-image results are ``CertRow`` s with Cohen's columns ``idx label predict radius correct time``.
``certify_indices`` seeds every image from ``(seed, idx)`` so a dataset can be split into shards (e.g. one
per Ray task), certified anywhere, and merged with ``merge_rows`` into exactly the unsharded result.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn
from torch.utils.data import Dataset

from . import sequential

ABSTAIN = -1
# precision -> autocast dtype (None: plain fp32). Reduced precision certifies the reduced-precision model:
# the guarantee is about the function actually evaluated, which is f in bf16/fp16, not the fp32 f.
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_HEADER = ("idx", "label", "predict", "radius", "correct", "time", "samples")  # Cohen's six + samples used


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n.

    Equals ``statsmodels proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``; 0.0 when k == 0.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """l2 radius ``sigma * Phi^-1(p_lower)`` given a lower bound p_lower on the top-class probability."""
    return float(sigma * norm.ppf(p_lower))


def max_certifiable_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius CERTIFY can return with `n` samples: all n votes for the top class give
    pA_lower = alpha^(1/n). Radii above it are never certified, whatever the model."""
    return certified_radius(lower_confidence_bound(n, n, alpha), sigma)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode afterwards (modes may be mixed)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Smooth:
    """Gaussian-smoothed version of a base classifier, with Cohen's CERTIFY and PREDICT.

    Args:
        base: maps images in [0, 1] of shape (B, C, H, W) to logits (B, num_classes). Put in eval mode
            during sampling; every submodule's mode is restored afterwards.
        num_classes: number of classes (the logits' width).
        sigma: standard deviation of the isotropic Gaussian noise, in [0, 1] pixel units.
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, precision: str = "fp32") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if precision not in _AUTOCAST:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST)}, got {precision!r}")
        self.base = base
        self.num_classes = num_classes
        self.sigma = sigma
        self.precision = precision

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """CERTIFY one image x of shape (C, H, W) in [0, 1], on any device (noise is drawn there).

        Returns ``(cA, radius)``, or ``(ABSTAIN, 0.0)`` when ``pA_lower < 0.5``. With probability >= 1 - alpha
        (over the noise) a non-abstaining answer is what the smoothed classifier predicts everywhere in the
        l2 ball of that radius. ``generator`` (on x's device) makes the noise reproducible.
        """
        return self.certify_many(x.unsqueeze(0), n0, n, alpha, batch_size, [generator])[0]

    def certify_many(self, xs: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                     generators: Sequence[torch.Generator | None]) -> list[tuple[int, float]]:
        """CERTIFY each of the K images ``xs`` (K, C, H, W), image k with noise from ``generators[k]``.

        When n0 and n are small, several images share one forward batch (``batch_size // n`` of them), which
        keeps the model busy; each image's noise is still drawn from its own generator in the chunks it would
        get alone, so the result of an image never depends on its neighbours. One host sync for all K.
        """
        _check_counts(n0=n0, n=n, batch_size=batch_size)
        with _eval_mode(self.base):
            # Selection and estimation use independent samples; reusing the n0 copies would bias the bound.
            c_a = self._count_many(xs, n0, batch_size, generators).argmax(dim=1)
            count_a = self._count_many(xs, n, batch_size, generators).gather(1, c_a.unsqueeze(1)).squeeze(1)
        results = []
        for c, k in torch.stack([c_a, count_a]).T.tolist():  # the one host sync
            p_lower = lower_confidence_bound(k, n, alpha)
            results.append((ABSTAIN, 0.0) if p_lower < 0.5 else (c, certified_radius(p_lower, self.sigma)))
        return results

    def certify_sequential(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                           radii: Sequence[float], generator: torch.Generator | None = None,
                           first_look: int = 100) -> tuple[int, float, int]:
        """CERTIFY with anytime-valid early stopping (`decrop.sequential`): ``(cA or ABSTAIN, radius, samples)``.

        Draws at most ``n`` samples after the ``n0`` selection samples, checking at a fixed doubling schedule
        of looks with alpha split across them, and stops once the certified-at-r outcome is settled for every
        r in `radii`. The guarantee is CERTIFY's: a non-abstaining answer holds with probability >= 1 - alpha.
        """
        _check_counts(n0=n0, n=n, batch_size=batch_size)
        levels = sequential.thresholds(radii, self.sigma)
        looks = sequential.look_schedule(n, first_look)
        count, drawn = 0, 0
        with _eval_mode(self.base):
            c_a = int(self._sample_noise(x, n0, batch_size, generator).argmax().item())
            for look, a_k in zip(looks, sequential.alpha_split(alpha, len(looks))):
                count += int(self._sample_noise(x, look - drawn, batch_size, generator)[c_a].item())
                drawn = look
                p_lower = lower_confidence_bound(count, drawn, a_k)
                p_upper = sequential.upper_confidence_bound(count, drawn, a_k)
                if look == n or sequential.decided(p_lower, p_upper, levels):
                    break
        if p_lower < 0.5:
            return ABSTAIN, 0.0, n0 + drawn
        return c_a, certified_radius(p_lower, self.sigma), n0 + drawn

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> int:
        """PREDICT for one image x of shape (C, H, W) in [0, 1]: the smoothed class, or ABSTAIN.

        Abstains when a two-sided binomial test of the top two counts cannot reject equality at level alpha;
        otherwise the answer differs from g(x) with probability <= alpha.
        """
        _check_counts(n0=1, n=n, batch_size=batch_size)
        with _eval_mode(self.base):
            counts = self._sample_noise(x, n, batch_size, generator)
        counts_host = counts.cpu()  # the one host sync
        top = counts_host.topk(min(2, self.num_classes)).indices.tolist()
        count1 = int(counts_host[top[0]])
        count2 = int(counts_host[top[1]]) if len(top) > 1 else 0
        if binomtest(count1, count1 + count2, 0.5).pvalue > alpha:
            return ABSTAIN
        return top[0]

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = _AUTOCAST[self.precision]
        with torch.autocast(batch.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = self.base(batch)
        if logits.shape != (len(batch), self.num_classes):
            raise ValueError(f"base returned logits of shape {tuple(logits.shape)}, "
                             f"expected ({len(batch)}, {self.num_classes})")
        return logits

    def _sample_noise(
        self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Classify ``num`` noisy copies of x (C, H, W); return class counts, shape (num_classes,), int64, on
        x's device. Noise is drawn in chunks of ``min(batch_size, remaining)``; counting stays on the device
        so there is no host sync per batch."""
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image in [0, 1], got dtype {x.dtype}")
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        with torch.inference_mode():
            remaining = num
            while remaining > 0:
                this_batch = min(batch_size, remaining)
                remaining -= this_batch
                noise = torch.randn(
                    (this_batch, *x.shape), generator=generator, device=x.device, dtype=x.dtype
                )
                # In place: noise becomes x + sigma * noise, x broadcast (never materialised by repeat).
                batch = noise.mul_(self.sigma).add_(x.unsqueeze(0))
                counts += torch.bincount(self._logits(batch).argmax(dim=1), minlength=self.num_classes)
        return counts

    def _count_many(self, xs: torch.Tensor, num: int, batch_size: int,
                    generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Counts (K, num_classes) of ``num`` noisy copies of each image in xs (K, C, H, W)."""
        k_total, per_batch = len(xs), batch_size // num
        if per_batch < 2 or k_total == 1:
            return torch.stack([self._sample_noise(x, num, batch_size, g) for x, g in zip(xs, generators)])
        if not xs.is_floating_point():
            raise TypeError(f"xs must be floating-point images in [0, 1], got dtype {xs.dtype}")
        counts = torch.zeros(k_total, self.num_classes, dtype=torch.long, device=xs.device)
        with torch.inference_mode():
            for start in range(0, k_total, per_batch):
                group = xs[start:start + per_batch]
                # Each image's whole phase is one draw from its own generator: what `_sample_noise` draws
                # for it alone (num <= batch_size), so packing does not change any image's noise.
                noise = torch.stack([torch.randn((num, *xs.shape[1:]), generator=g, device=xs.device,
                                                 dtype=xs.dtype) for g in generators[start:start + len(group)]])
                batch = noise.mul_(self.sigma).add_(group.unsqueeze(1)).flatten(0, 1)
                image = torch.arange(len(group), device=xs.device).repeat_interleave(num)
                flat = image * self.num_classes + self._logits(batch).argmax(dim=1)
                counts[start:start + len(group)] += torch.bincount(
                    flat, minlength=len(group) * self.num_classes).view(len(group), self.num_classes)
        return counts


def _check_counts(*, n0: int, n: int, batch_size: int) -> None:
    for name, value in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


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


def _image_seed(seed: int, idx: int) -> int:
    """Seed of image idx's noise: depends only on (seed, idx), so shards reproduce the unsharded run."""
    return (seed * 1_000_003 + idx) % 2**63


def certify_indices(
    model: nn.Module,
    dataset: Dataset | Sequence[tuple[torch.Tensor, int]],
    indices: Iterable[int],
    *,
    num_classes: int,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    seed: int,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, CertRow], None] | None = None,
    mode: str = "exact",
    radii: Sequence[float] = (0.0,),
    precision: str = "fp32",
    memory_mb: float = 0.0,
) -> list[CertRow]:
    """CERTIFY ``dataset[i]`` for every i in ``indices`` (in that order) and return one row per image.

    ``dataset[i]`` is ``(image (C, H, W) in [0, 1], label)``; images are moved to ``device`` (default: the
    device of the model's parameters, CPU if it has none), where the model must already live. Image i's
    noise comes from its own generator seeded by ``(seed, i)``, so any sharding of ``indices`` yields the
    same rows. ``progress(done, total, row)`` is called after each image. Model modes are restored.
    In the exact mode, ``batch_size // max(n0, n)`` images share each forward batch when that is >= 2 (their
    ``time`` is the group's time divided evenly). ``mode="sequential"`` stops sampling an image once its
    certified-at-r outcome is decided for every r in `radii`, with the same alpha guarantee
    (`decrop.sequential`); ``n`` is then the most it may draw. ``precision`` "bf16"/"fp16" autocasts the model
    and certifies the reduced-precision model. ``memory_mb`` > 0 lowers ``batch_size`` to what fits that many
    MiB of activations (`fit_batch_size`). Noise is drawn per forward batch, so rows are reproducible for a
    given seed *and* batch size: keep the batch size fixed (or the budget and machine) to reproduce a run.
    """
    if mode not in ("exact", "sequential"):
        raise ValueError(f"unknown certification mode {mode!r}; choose 'exact' or 'sequential'")
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
        generators = [torch.Generator(device=device).manual_seed(_image_seed(seed, idx)) for idx in group]
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
    dtype = _AUTOCAST[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with _eval_mode(model), torch.inference_mode(), autocast:
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


def merge_rows(shards: Iterable[Sequence[CertRow]]) -> list[CertRow]:
    """Concatenate shards' rows sorted by idx; ValueError if an idx appears twice."""
    rows = sorted((row for shard in shards for row in shard), key=lambda row: row.idx)
    for prev, row in zip(rows, rows[1:]):
        if prev.idx == row.idx:
            raise ValueError(f"duplicate idx {row.idx} across shards")
    return rows


def write_rows(rows: Iterable[CertRow], path: str | Path) -> None:
    """Write rows as Cohen's tab-separated table (header ``idx label predict radius correct time``)."""
    lines = ["\t".join(_HEADER)]
    for r in rows:
        lines.append(f"{r.idx}\t{r.label}\t{r.predict}\t{r.radius:.4f}\t{r.correct}\t{r.time:.4f}\t{r.samples}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_rows(path: str | Path) -> list[CertRow]:
    """Read a table written by ``write_rows``; ValueError naming the file and line if it is malformed."""
    lines = Path(path).read_text().splitlines()
    header = tuple(lines[0].split("\t")) if lines else ()
    if header not in (_HEADER, _HEADER[:6]):  # Cohen's original six columns are read too
        expected = "\t".join(_HEADER)
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
            radius, elapsed = float(fields[3]), float(fields[5])
            samples = int(fields[6]) if len(fields) > 6 else 0
        except ValueError as err:
            raise ValueError(f"{path}: line {lineno}: {err}") from None
        rows.append(CertRow(idx, label, predict, radius, correct, elapsed, samples))
    return rows


def certified_counts(rows: Sequence[CertRow], radii: Sequence[float]) -> dict[float, int]:
    """For each r in radii, how many rows are certified correct with radius >= r (at r = 0: correct and not
    abstained)."""
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
