"""Training objectives for the denoiser, all with one call shape so one training loop serves every method.

An objective is called as ``objective(denoiser, classifier, images, labels) -> (loss, metrics)`` where
``images`` is the tuple of aligned image batches of one step (just ``(x,)`` for the baseline; DE-CROP adds
``x_b, x_int_0, ...``), each (B, C, H, W) in [0, 1] on the training device. The classifier `f` is frozen (the
loop turns its gradients off and keeps it in eval mode) but differentiable, so gradients reach the denoiser `D`
through it. One noise draw ``delta ~ N(0, sigma^2 I)`` is shared by all branches of a batch.

Two optional hooks let an objective carry state of its own: ``set_progress(p)`` (p in [0, 1] over the stage,
called at the start of each epoch) and ``after_backward()`` (called after the backward pass, before the
denoiser's optimiser steps: DE-CROP's discriminator steps there).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecropConfig
from .losses import beta_schedule, cosine_loss, label_consistency_loss, mmd_loss, reverse_gradient
from .models import DomainDiscriminator


class Objective(Protocol):
    name: str

    def __call__(self, denoiser: nn.Module, classifier: nn.Module, images: tuple[Tensor, ...],
                 labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Return the scalar loss to minimise and the named parts to log (``train/<name>``)."""


class StabilityObjective:
    """Salman et al. (2020) baseline: L_lc only."""

    name = "stability"

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, denoiser, classifier, images, labels):
        x = images[0]
        with torch.no_grad():
            clean_logits = classifier(x)
        loss = label_consistency_loss(classifier(denoiser(x + torch.randn_like(x) * self.sigma)), clean_logits)
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


def _unit_features(classifier: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(L2-normalised penultimate features, logits) of `x` with one pass through the classifier."""
    features = classifier.features(x)
    return F.normalize(features, dim=1), classifier.head(features)


class DecropObjective:
    """DE-CROP: w_lc L_lc + w_cs (L_cs_b + L_cs_int) + w_mmd (L_mmd_b + L_mmd_int) [+ L_dd in stage 2].

    `images` = ``(x, x_b, x_int_0, ..., x_int_{n-1})``. With a `discriminator` (stage 2) it adds the domain loss
    on clean features (domain 0) vs features of D(x + delta) (domain 1) behind a gradient-reversal layer with
    coefficient beta(progress), and steps the discriminator's own Adam in `after_backward`.
    """

    name = "decrop"

    def __init__(self, sigma: float, cfg: DecropConfig, discriminator: DomainDiscriminator | None = None):
        self.sigma, self.cfg = sigma, cfg
        self.discriminator = discriminator
        self.disc_optimizer = (torch.optim.Adam(discriminator.parameters(), lr=cfg.disc_lr)
                               if discriminator is not None else None)
        self.beta = 0.0

    def set_progress(self, progress: float) -> None:
        self.beta = beta_schedule(progress, self.cfg.beta_scale, self.cfg.beta_gamma)

    def __call__(self, denoiser, classifier, images, labels):
        x, x_b, *x_ints = images
        cfg = self.cfg
        delta = torch.randn_like(x) * self.sigma
        with torch.no_grad():
            phi_clean, clean_logits = _unit_features(classifier, x)
        phi_den, logits = _unit_features(classifier, denoiser(x + delta))
        parts = {"loss_lc": label_consistency_loss(logits, clean_logits)}
        for kind, batch in (("b", [x_b]), ("int", x_ints)):
            generated = torch.cat(batch)
            phi_g, logits_g = _unit_features(classifier, denoiser(generated + delta.repeat(len(batch), 1, 1, 1)))
            parts[f"loss_cs_{kind}"] = cosine_loss(logits_g, clean_logits.repeat(len(batch), 1))
            parts[f"loss_mmd_{kind}"] = mmd_loss(phi_clean, phi_g)
        loss = (cfg.w_lc * parts["loss_lc"] + cfg.w_cs * (parts["loss_cs_b"] + parts["loss_cs_int"])
                + cfg.w_mmd * (parts["loss_mmd_b"] + parts["loss_mmd_int"]))
        if self.discriminator is not None:
            self.discriminator.train()
            domains = torch.cat([torch.zeros(len(x)), torch.ones(len(x))]).long().to(x.device)
            z = reverse_gradient(torch.cat([phi_clean, phi_den]), self.beta)
            parts["loss_dd"] = F.cross_entropy(self.discriminator(z), domains)
            loss = loss + parts["loss_dd"]
            self.disc_optimizer.zero_grad(set_to_none=True)
        metrics = {k: v.item() for k, v in parts.items()}
        if self.discriminator is not None:
            metrics["beta"] = self.beta
        return loss, metrics

    def state_dict(self) -> dict:
        """The discriminator and its optimiser (stage 2), for checkpoints; empty in stage 1."""
        if self.discriminator is None:
            return {}
        module = getattr(self.discriminator, "module", self.discriminator)
        return {"discriminator": module.state_dict(), "optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.discriminator is not None and state:
            getattr(self.discriminator, "module", self.discriminator).load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["optimizer"])

    def after_backward(self) -> None:
        """Discriminator step first (its gradient is the plain domain loss), then the loop steps the denoiser
        (whose gradient holds the reversed, beta-scaled domain gradient)."""
        if self.disc_optimizer is not None:
            self.disc_optimizer.step()
