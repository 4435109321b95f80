"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): the smoothed classifier, CERTIFY and PREDICT.

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)`` with ``delta ~ N(0, sigma^2 I)``.
``Smooth.certify`` is Cohen's CERTIFY: ``n0`` noisy copies pick the top class ``cA``, ``n`` *fresh* copies
count it, and a one-sided Clopper-Pearson bound ``pA_lower`` on ``P(f(x + delta) = cA)`` gives the l2 radius
``sigma * Phi^-1(pA_lower)``, valid with probability >= 1 - alpha. ``Smooth.certify_sequential`` is the same
certificate with anytime-valid early stopping (statistics in `decrop.sequential`); ``Smooth.predict`` is PREDICT.

``f`` is any module mapping images in [0, 1] to logits, e.g. ``nn.Sequential(denoiser, classifier)`` (the
denoised-smoothing composition used by DE-CROP); normalisation belongs inside ``f``. Built for throughput: noise
is drawn on the image's device, counts stay there (``bincount``) with one host sync per image (per batch in the
sequential mode), several images share a forward batch when n is small, and ``precision`` autocasts ``f``.
The dataset runner (seeds, shards, batch size from a memory budget) is `decrop.certify`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.stats import binomtest
from torch import nn

from . import sequential
from .bounds import certified_radius, lower_confidence_bound
from .runtime import eval_mode

ABSTAIN = -1
# precision -> autocast dtype (None: plain fp32). Reduced precision certifies the reduced-precision model:
# the guarantee is about the function actually evaluated, which is f in bf16/fp16, not the fp32 f.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Smooth:
    """Gaussian-smoothed version of a base classifier, with Cohen's CERTIFY and PREDICT.

    Args:
        base: maps images in [0, 1] of shape (B, C, H, W) to logits (B, num_classes). Put in eval mode
            during sampling; every submodule's mode is restored afterwards.
        num_classes: number of classes (the logits' width).
        sigma: standard deviation of the isotropic Gaussian noise, in [0, 1] pixel units.
        precision: "fp32", or "bf16"/"fp16" to autocast ``base`` (certifies the reduced-precision model).
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, precision: str = "fp32") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        self.base = base
        self.num_classes = num_classes
        self.sigma = sigma
        self.precision = precision

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> tuple[int, float]:
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
        with eval_mode(self.base):
            # Selection and estimation use independent samples; reusing the n0 copies would bias the bound.
            c_a = self._count_many(xs, n0, batch_size, generators).argmax(dim=1)
            count_a = self._count_many(xs, n, batch_size, generators).gather(1, c_a.unsqueeze(1)).squeeze(1)
        results = []
        for c, k in torch.stack([c_a, count_a]).T.tolist():  # the one host sync
            p_lower = lower_confidence_bound(k, n, alpha)
            results.append((ABSTAIN, 0.0) if p_lower < 0.5 else (c, certified_radius(p_lower, self.sigma)))
        return results

    def certify_sequential(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                           radii: Sequence[float], generator: torch.Generator | None = None
                           ) -> tuple[int, float, int]:
        """CERTIFY with anytime-valid early stopping: ``(cA or ABSTAIN, radius, samples drawn incl. n0)``.

        After the n0 selection samples, draws estimation samples in batches of at most ``batch_size`` (sized by
        `decrop.sequential.SequentialTest.next_draw`) and stops once pA's side of every threshold
        Phi(r / sigma), r in `radii`, is settled, or after n. The guarantee is CERTIFY's: with probability
        >= 1 - alpha the radius does not exceed the smoothed classifier's true radius at x. The radius is one
        of `radii` when the image stopped early, else Clopper-Pearson's at n (`decrop.sequential`).
        """
        _check_counts(n0=n0, n=n, batch_size=batch_size)
        with eval_mode(self.base):
            counts = self._sample_noise(x, n0, batch_size, generator).cpu()  # host sync: cA steers the draws
            c_a = int(counts.argmax())
            test = sequential.SequentialTest(radii, self.sigma, n, alpha, prior=(int(counts[c_a]), n0))
            while not test.done:
                draw = test.next_draw(batch_size)
                test.observe(int(self._sample_noise(x, draw, batch_size, generator)[c_a]), draw)  # one sync
        radius = test.radius
        return (ABSTAIN, 0.0, n0 + test.drawn) if radius is None else (c_a, radius, n0 + test.drawn)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """PREDICT for one image x of shape (C, H, W) in [0, 1]: the smoothed class, or ABSTAIN.

        Abstains when a two-sided binomial test of the top two counts cannot reject equality at level alpha;
        otherwise the answer differs from g(x) with probability <= alpha.
        """
        _check_counts(n0=1, n=n, batch_size=batch_size)
        with eval_mode(self.base):
            counts = self._sample_noise(x, n, batch_size, generator)
        counts_host = counts.cpu()  # the one host sync
        top = counts_host.topk(min(2, self.num_classes)).indices.tolist()
        count1 = int(counts_host[top[0]])
        count2 = int(counts_host[top[1]]) if len(top) > 1 else 0
        if binomtest(count1, count1 + count2, 0.5).pvalue > alpha:
            return ABSTAIN
        return top[0]

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: torch.Generator | None) -> torch.Tensor:
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
                noise = torch.randn((this_batch, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
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

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast(batch.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = self.base(batch)
        if logits.shape != (len(batch), self.num_classes):
            raise ValueError(f"base returned logits of shape {tuple(logits.shape)}, "
                             f"expected ({len(batch)}, {self.num_classes})")
        return logits


def _check_counts(*, n0: int, n: int, batch_size: int) -> None:
    for name, value in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
