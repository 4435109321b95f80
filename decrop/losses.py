"""DE-CROP's losses beyond label consistency (Nayak et al., WACV 2023, Sec. 3; docs/architecture.md).

- `label_consistency_loss` (L_lc): Salman et al.'s stability objective, the baseline's only loss.
- `cosine_loss` (L_cs): 1 - cos(f(D(x_g + delta)), f(x)) in logit space, batch mean; pulls the denoised
  generated samples' logits towards the clean image's, in direction rather than magnitude.
- `mmd_loss` (L_mmd): biased multi-kernel Gaussian MMD between two feature sets (L2-normalised penultimate
  features of clean images and of denoised generated samples): aligns the two distributions as a whole.
- `GradientReversal` and `beta_schedule`: the domain-adversarial part (Ganin & Lempitsky 2015). The
  discriminator learns to tell clean features from denoised ones; the reversed gradient teaches the denoiser
  to make them indistinguishable, ramped in by beta(p) so the discriminator is trained before it steers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def label_consistency_loss(logits: Tensor, clean_logits: Tensor, reduction: str = "mean") -> Tensor:
    """L_lc = CE(f(D(x + delta)), argmax f(x)) given both logits (B, K); `reduction` "mean" or "sum" over B.

    The target is the classifier's own prediction on the clean image, not the true label: the denoiser
    must make the smoothed classifier agree with the base classifier, whatever that says.
    """
    return F.cross_entropy(logits, clean_logits.argmax(dim=1), reduction=reduction)


def cosine_loss(logits: Tensor, target_logits: Tensor, reduction: str = "mean") -> Tensor:
    """L_cs = 1 - cos(logits_i, target_i) per image, (B, K) each, averaged (or summed) over B; in [0, 2]."""
    per_image = 1 - F.cosine_similarity(logits, target_logits, dim=1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def mmd_loss(a: Tensor, b: Tensor, num_kernels: int = 5) -> Tensor:
    """Biased multi-kernel Gaussian MMD^2 between samples `a` (N, d) and `b` (M, d).

    Kernels exp(-||u - v||^2 / h_k) with bandwidths h_k = h * 2^(k - 2), k = 0..num_kernels-1, where h is the
    mean pairwise squared distance of the pooled batch, detached (a data-driven scale that the loss cannot
    shrink to cheat). Zero for identical sets; >= 0 always for the biased estimator.
    """
    pooled = torch.cat([a, b])
    sq = torch.cdist(pooled, pooled).pow(2)
    n = len(pooled)
    h = (sq.sum() / max(n * n - n, 1)).detach().clamp_min(1e-12)
    kernel = sum(torch.exp(-sq / (h * 2.0 ** (k - num_kernels // 2))) for k in range(num_kernels))
    na = len(a)
    return kernel[:na, :na].mean() + kernel[na:, na:].mean() - 2 * kernel[:na, na:].mean()


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


def reverse_gradient(x: Tensor, coeff: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-coeff`` in the backward pass."""
    return _ReverseGrad.apply(x, coeff)


def beta_schedule(progress: float, scale: float = 2.0, gamma: float = 10.0) -> float:
    """beta(p) = scale * (2 / (1 + exp(-gamma p)) - 1) for training progress p in [0, 1]: 0 at p = 0, rising to
    ~scale (scale * tanh(gamma / 2)) at p = 1. DANN's ramp, with the paper's w_beta = 2 and gamma = 10."""
    if not 0 <= progress <= 1:
        raise ValueError(f"training progress must be in [0, 1], got {progress}")
    return scale * (2 / (1 + math.exp(-gamma * progress)) - 1)
