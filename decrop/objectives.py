"""Training objectives for the denoiser, all with one call shape so one training loop serves every method.

An objective is called as ``objective(denoiser, classifier, images, labels) -> (loss, metrics)`` where
``images`` is the tuple of aligned image batches of one step (just ``(x,)`` for the baseline; DE-CROP adds
boundary and interpolated samples), each (B, C, H, W) in [0, 1] on the training device. The classifier `f` is
frozen (the loop turns its gradients off and keeps it in eval mode) but differentiable, so gradients reach the
denoiser `D` through it. One noise draw ``delta ~ N(0, sigma^2 I)`` is shared by all branches of a batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Objective(Protocol):
    name: str

    def __call__(self, denoiser: nn.Module, classifier: nn.Module, images: tuple[Tensor, ...],
                 labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Return the scalar loss to minimise and the named parts to log (``train/<name>``)."""


def label_consistency_loss(classifier: nn.Module, denoised: Tensor, clean_logits: Tensor) -> Tensor:
    """L_lc, Salman et al.'s stability objective: CE(f(D(x + delta)), argmax f(x)).

    The target is the classifier's own prediction on the clean image, not the true label: the denoiser
    must make the smoothed classifier agree with the base classifier, whatever that says.
    """
    return F.cross_entropy(classifier(denoised), clean_logits.argmax(dim=1))


class StabilityObjective:
    """Salman et al. (2020) baseline: L_lc only."""

    name = "stability"

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, denoiser, classifier, images, labels):
        x = images[0]
        with torch.no_grad():
            clean_logits = classifier(x)
        denoised = denoiser(x + torch.randn_like(x) * self.sigma)
        loss = label_consistency_loss(classifier, denoised, clean_logits)
        return loss, {"loss_lc": loss.item()}


class MSEObjective:
    """Salman et al.'s denoising objective: mean squared error ||D(x + delta) - x||^2 (per pixel)."""

    name = "mse"

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, denoiser, classifier, images, labels):
        x = images[0]
        loss = F.mse_loss(denoiser(x + torch.randn_like(x) * self.sigma), x)
        return loss, {"loss_mse": loss.item()}


def baseline_objective(kind: str, sigma: float) -> Objective:
    """The baseline's objective by its config name (``train.objective``)."""
    objectives = {"stability": StabilityObjective, "mse": MSEObjective}
    if kind not in objectives:
        raise ValueError(f"unknown baseline objective {kind!r}; choose one of {sorted(objectives)}")
    return objectives[kind](sigma)
