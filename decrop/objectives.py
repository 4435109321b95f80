"""Training objectives for the denoiser, all with one call shape so one training loop serves every method.

An objective is called as ``objective(denoiser, classifier, images, labels) -> (loss, metrics)`` where ``images``
is the tuple of aligned image batches of one step (just ``(x,)`` for the baseline; DE-CROP adds
``x_b, x_int_0, ...``), each the **global** batch (B, C, H, W) in [0, 1] on the training device. The classifier
`f` is frozen (the loop turns its gradients off and keeps it in eval mode) but differentiable, so gradients
reach the denoiser `D` through it. One noise draw ``delta ~ N(0, sigma^2 I)`` is shared by all branches of a
batch. ``metrics`` holds the batch's value of every part and of the total (``loss``), over the global batch.

Data-parallel runs give the objective a `decrop.distributed.Shard`: every worker holds the same global batch
and the same noise, computes its own share of the images, and the objective is exactly the one-process
objective (see that module). With the default ``Shard()`` all of that is the identity.

The hooks of `Objective` are called by the loop unconditionally; `BaseObjective` gives them no-op defaults.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecropConfig
from .distributed import Shard
from .losses import beta_schedule, cosine_loss, label_consistency_loss, mmd_loss, reverse_gradient
from .models import DomainDiscriminator, logits_and_features


class Objective(Protocol):
    """What the training loop needs of an objective."""

    name: str

    def __call__(self, denoiser: nn.Module, classifier: nn.Module, images: tuple[Tensor, ...],
                 labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The loss to backpropagate and the named values to log (``train/<name>``, ``loss`` the total)."""

    def set_progress(self, progress: float) -> None:
        """Training progress p in [0, 1) of the stage, before every optimisation step."""

    def after_backward(self) -> None:
        """After the backward pass, before the denoiser's optimiser steps (DE-CROP's discriminator steps here)."""

    def state_dict(self) -> dict:
        """State of the objective's own (non-denoiser) parts for checkpoints; empty when it has none."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


class BaseObjective:
    """No-op hooks, the noise draw and the shard every objective shares."""

    name = "base"

    def __init__(self, sigma: float, shard: Shard | None = None) -> None:
        self.sigma = sigma
        self.shard = shard or Shard()

    def set_progress(self, progress: float) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def noise(self, x: Tensor) -> Tensor:
        """This worker's rows of one noise draw for the global batch `x` (from the global RNG, which every
        worker seeds alike, so the workers' rows together are the one-process draw)."""
        return self.shard.local(torch.randn_like(x) * self.sigma)


class StabilityObjective(BaseObjective):
    """Salman et al. (2020) baseline: L_lc = CE(f(D(x + delta)), argmax f(x)) only."""

    name = "stability"

    def __call__(self, denoiser, classifier, images, labels):
        x_all = images[0]
        x, delta = self.shard.local(x_all), self.noise(x_all)
        with torch.no_grad():
            clean_logits = classifier(x).float()
        lc = label_consistency_loss(classifier(denoiser(x + delta)).float(), clean_logits, reduction="sum")
        loss, value = self.shard.mean(lc, len(x_all))
        return loss, {"loss": value, "loss_lc": value}


class MSEObjective(BaseObjective):
    """Salman et al.'s denoising objective: mean squared error ||D(x + delta) - x||^2 (per pixel)."""

    name = "mse"

    def __call__(self, denoiser, classifier, images, labels):
        x_all = images[0]
        x, delta = self.shard.local(x_all), self.noise(x_all)
        per_image = (denoiser(x + delta).float() - x).pow(2).flatten(1).mean(1)
        loss, value = self.shard.mean(per_image.sum(), len(x_all))
        return loss, {"loss": value, "loss_mse": value}


def baseline_objective(kind: str, sigma: float, shard: Shard | None = None) -> Objective:
    """The baseline's objective by its config name (``train.objective``)."""
    objectives = {"stability": StabilityObjective, "mse": MSEObjective}
    if kind not in objectives:
        raise ValueError(f"unknown baseline objective {kind!r}; choose one of {sorted(objectives)}")
    return objectives[kind](sigma, shard)


def _unit_features(classifier: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(L2-normalised penultimate features, logits) of `x` with one pass through the classifier (the classifier
    contract of `decrop.models.logits_and_features`: registry models, surrogates and users' models alike), in
    fp32 (under bf16 autocast the passes run in bf16, the losses on their outputs in fp32)."""
    logits, features = logits_and_features(classifier, x)
    return F.normalize(features.float(), dim=1), logits.float()


class DecropObjective(BaseObjective):
    """DE-CROP: w_lc L_lc + w_cs (L_cs_b + L_cs_int) + w_mmd (L_mmd_b + L_mmd_int) [+ L_dd in stage 2].

    `images` = ``(x, x_b, x_int_0, ..., x_int_{n-1})``; with ``cfg.attack == "none"`` (no boundary samples)
    ``x_b`` is not trained on (its partner only made the interpolated samples). With a `discriminator` (stage 2)
    it adds the domain loss on clean features (domain 0) vs features of D(x + delta) (domain 1) behind a gradient-reversal layer with
    coefficient beta(p), p the stage's progress per iteration (Ganin & Lempitsky), and steps the
    discriminator's own Adam in `after_backward`. The MMD and the discriminator see the features of the whole
    global batch. With several workers the discriminator is a replica on every worker, kept identical by
    construction: rank 0's weights are broadcast here, and its gradients are averaged over the workers before
    its step (`decrop.distributed.Shard.average_gradients`). Every worker's gradient is that of the one-process
    domain loss, so the average is too: the objective stays that of one process (checked with 2 gloo workers in
    tests/decrop/test_distributed.py). Not wrapped in DDP, which would average the same gradients but prefix the
    checkpointed state dict with ``module.``: the explicit all-reduce sits where the step order needs it.
    """

    name = "decrop"

    def __init__(self, sigma: float, cfg: DecropConfig, discriminator: DomainDiscriminator | None = None,
                 shard: Shard | None = None) -> None:
        super().__init__(sigma, shard)
        self.cfg = cfg
        self.discriminator = self.shard.broadcast(discriminator) if discriminator is not None else None
        self.disc_optimizer = (torch.optim.Adam(discriminator.parameters(), lr=cfg.disc_lr)
                               if discriminator is not None else None)
        self.beta = 0.0

    def set_progress(self, progress: float) -> None:
        self.beta = beta_schedule(progress, self.cfg.beta_scale, self.cfg.beta_gamma)

    def __call__(self, denoiser, classifier, images, labels):
        cfg, shard, size = self.cfg, self.shard, len(images[0])
        x, x_b, *x_ints = (shard.local(batch) for batch in images)
        delta = self.noise(images[0])
        with torch.no_grad():
            phi_clean, clean_logits = _unit_features(classifier, x)
        phi_den, logits = _unit_features(classifier, denoiser(x + delta))
        lc = label_consistency_loss(logits, clean_logits, reduction="sum")
        losses, values = {}, {}
        losses["loss_lc"], values["loss_lc"] = shard.mean(lc, size)
        clean_all = shard.gather(phi_clean, size)
        # Without boundary samples (attack "none", the supplementary's table 2) the same-class partner x_b only
        # fed the interpolation: no boundary branch, its two terms are 0.
        kinds = (("b", [x_b]), ("int", x_ints)) if cfg.attack != "none" else (("int", x_ints),)
        if cfg.attack == "none":
            zero = x.new_zeros(())
            losses.update(loss_cs_b=zero, loss_mmd_b=zero)
            values.update(loss_cs_b=0.0, loss_mmd_b=0.0)
        for kind, batch in kinds:
            phi_g, logits_g = _unit_features(classifier, denoiser(torch.cat(batch) + delta.repeat(len(batch), 1, 1, 1)))
            cs = cosine_loss(logits_g, clean_logits.repeat(len(batch), 1), reduction="sum")
            losses[f"loss_cs_{kind}"], values[f"loss_cs_{kind}"] = shard.mean(cs, size * len(batch))
            # The generated samples of the global batch in one-process order: kind j of every worker, then j + 1.
            generated_all = torch.cat([shard.gather(chunk, size) for chunk in phi_g.chunk(len(batch))])
            losses[f"loss_mmd_{kind}"] = mmd_loss(clean_all, generated_all)
            values[f"loss_mmd_{kind}"] = losses[f"loss_mmd_{kind}"].item()
        loss = (cfg.w_lc * losses["loss_lc"] + cfg.w_cs * (losses["loss_cs_b"] + losses["loss_cs_int"])
                + cfg.w_mmd * (losses["loss_mmd_b"] + losses["loss_mmd_int"]))
        total = (cfg.w_lc * values["loss_lc"] + cfg.w_cs * (values["loss_cs_b"] + values["loss_cs_int"])
                 + cfg.w_mmd * (values["loss_mmd_b"] + values["loss_mmd_int"]))
        if self.discriminator is not None:
            self.discriminator.train()
            domains = torch.cat([torch.zeros(size), torch.ones(size)]).long().to(x.device)
            z = reverse_gradient(torch.cat([clean_all, shard.gather(phi_den, size)]), self.beta)
            dd = F.cross_entropy(self.discriminator(z), domains)
            loss, total = loss + dd, total + dd.item()
            values["loss_dd"], values["beta"] = dd.item(), self.beta
            self.disc_optimizer.zero_grad(set_to_none=True)
        return loss, {"loss": total, **values}

    def after_backward(self) -> None:
        """Discriminator step first (its gradient is the plain domain loss, averaged over the workers), then the
        loop steps the denoiser (whose gradient holds the reversed, beta-scaled domain gradient)."""
        if self.disc_optimizer is not None:
            self.shard.average_gradients(self.discriminator.parameters())
            self.disc_optimizer.step()

    def state_dict(self) -> dict:
        """The discriminator and its optimiser (stage 2), for checkpoints; empty in stage 1."""
        if self.discriminator is None:
            return {}
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.discriminator is not None and state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["optimizer"])
