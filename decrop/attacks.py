"""Boundary samples: attacks that push each limited-data image to (or across) the classifier's decision boundary.

Every attack has one call shape, torchattacks-style: ``attack(model, x, y, *, eps, generator, **kwargs) -> x_b``
with `x` (B, C, H, W) in [0, 1] on the model's device, `y` (B,) the labels to move away from (the limited data's
true labels), and `x_b` a new, detached tensor of the same shape and device in [0, 1]. `generator` (CPU or on the
model's device) seeds every random draw, so cached samples are reproducible. Every attack runs inside
``eval_mode(model, frozen=True)``: the model is in eval mode throughout, every submodule's mode and every
parameter's ``requires_grad`` come back as found, and no ``.grad`` appears on the parameters.

`pgd`, `apgd_ce` and `autoattack` are torchattacks' (as in the authors' code). torchattacks alone would flatten a
model's mixed submodule modes with ``model.train()`` afterwards, and draws its random starts from the global RNG
(APGD, APGD-T and FAB even reseed it), so each call also runs in ``torch.random.fork_rng`` seeded from
`generator`: the caller's global RNG is left as it was.

- `pgd`: Madry et al. untargeted L-inf PGD on CE, uniform random start in the eps-ball (the paper's default: eps
  8/255, step 2/255, 20 steps; `torchattacks.PGD`). Returns the last iterate, fooling or not.
- `autoattack`: the standard AutoAttack ensemble of Croce & Hein (2020) as torchattacks builds it (the paper's
  Table 1): APGD-CE, then APGD-T, FAB-T and Square on the images still classified as `y`, in the L-inf eps-ball,
  with torchattacks' budgets, not the reference code's: 10 iterations per APGD/FAB run, 5,000 Square queries
  (`attack_steps` does not apply). An image that none of the four fools comes back **unchanged** (torchattacks'
  MultiAttack keeps the clean image, and so does each APGD run), as does one the model already misclassifies.
  That is what the paper's code got too: for those images the "boundary sample" is the image itself.
- `apgd_ce`: AutoAttack's first component alone (`torchattacks.APGD`, loss CE, one restart, `steps` iterations),
  the cheaper choice. Like the ensemble it returns the clean image where it does not fool the model.
- `deepfool`: Moosavi-Dezfooli et al. (2016) minimal L2 perturbation to the nearest class boundary (overshoot
  0.02 on the accumulated perturbation, <= 50 iterations, as in DeepFool's reference code, LTS4/DeepFool): it
  stops just past the boundary, clamped to [0, 1] only; `eps` does not bound it. Ours, not torchattacks': that
  one applies the overshoot to each step and clamps each step to [0, 1], so where clamping shortens the steps it
  converges onto the boundary without crossing it. Measured: it left 65% of the quick profile's correctly
  classified Fashion-MNIST images (15 of 32 toy images in tests/decrop/test_attacks.py) on the boundary, still
  classified as `y`; this one crossed for all of them.
- `none`: the paper's ablation without boundary samples: the partner of each image is a random *other* image of
  the same class from the batch (itself only when it is alone in its class). The supplementary (table 2) uses
  the pair only for the interpolated logits, so DE-CROP's objective has no boundary branch then
  (`decrop.objectives.DecropObjective`); `same_class` is the same partner trained as if it were a boundary sample
  (through L_cs and L_mmd), a variant kept for comparison.
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor, nn

from .runtime import eval_mode

if TYPE_CHECKING:
    import torchattacks

Attack = Callable[..., Tensor]
# Part of the boundary samples' cache key (decrop.samples.boundary_settings): another implementation makes other samples.
# Bump the leading number when an attack of ours (deepfool, none) changes.
ATTACK_IMPLEMENTATION = f"2+torchattacks-{metadata.version('torchattacks')}"


def _torchattacks():
    """torchattacks, imported where an attack runs: its import costs memory in every process that imports it, and
    the training and certification workers never attack."""
    import torchattacks

    return torchattacks


def _seed_from(generator: torch.Generator | None) -> int:
    """A seed for torchattacks drawn from `generator` (from the global RNG when None, as unseeded torch does)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


@contextmanager
def _attacking(model: nn.Module, generator: torch.Generator | None) -> Iterator[int]:
    """`model` frozen in eval mode and the global RNG seeded from `generator`; both restored afterwards.

    Yields the seed, for the attacks that take one (APGD, APGD-T and FAB reseed the global RNG with it)."""
    seed = _seed_from(generator)
    # torch.manual_seed also seeds every CUDA device, so fork all of them (only once CUDA is up: forking would
    # otherwise initialise it for a CPU-only run).
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with eval_mode(model, frozen=True), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield seed


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, step_size: float = 2 / 255,
        steps: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """Untargeted L-inf PGD on CE with a uniform random start (Madry et al. 2018; `torchattacks.PGD`).

    Returns the last iterate, inside the `eps`-ball around `x` and in [0, 1]."""
    with _attacking(model, generator):
        attack = _torchattacks().PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
        return attack(x, y).detach()


def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, steps: int = 20,
            generator: torch.Generator | None = None) -> Tensor:
    """APGD-CE (Croce & Hein 2020; `torchattacks.APGD`, one restart): AutoAttack's first component alone.

    Inside the `eps`-ball and [0, 1]; images it does not fool (or the model already misclassifies) come back
    unchanged."""
    with _attacking(model, generator) as seed:
        attack = _torchattacks().APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")
        return attack(x, y).detach()


def build_autoattack(model: nn.Module, *, eps: float, num_classes: int, seed: int) -> torchattacks.AutoAttack:
    """torchattacks' standard L-inf AutoAttack (APGD-CE, APGD-T, FAB-T, Square) for a `num_classes` model."""
    return _torchattacks().AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes,
                                      seed=seed)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255,
               generator: torch.Generator | None = None) -> Tensor:
    """The standard AutoAttack ensemble (Croce & Hein 2020) in the L-inf `eps`-ball, as torchattacks runs it.

    Inside the `eps`-ball and [0, 1]; images none of its attacks fools (or the model already misclassifies)
    come back unchanged, as in the paper's code."""
    with _attacking(model, generator) as seed:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]  # APGD-T and FAB-T target every other class
        return build_autoattack(model, eps=eps, num_classes=num_classes, seed=seed)(x, y).detach()


def deepfool(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, steps: int = 50,
             overshoot: float = 0.02, generator: torch.Generator | None = None) -> Tensor:
    """DeepFool (L2, Moosavi-Dezfooli et al. 2016) to the nearest class boundary, as its reference code does it.

    Per image: linearise every logit difference f_k - f_y at the current point, step to the nearest linearised
    boundary (|f_k - f_y| / ||grad (f_k - f_y)|| + 1e-4 along that gradient), accumulate the steps in r, and stop
    once ``x + (1 + overshoot) r`` (clamped to [0, 1]) is no longer classified as `y` (or after `steps`). Returns
    that point: just past the boundary, clamped to [0, 1] only. `eps` and `generator` are accepted for the common
    call shape and ignored: a minimal-perturbation attack has no budget, and it is deterministic.
    """
    view = (-1,) + (1,) * (x.dim() - 1)
    r_total = torch.zeros_like(x)
    active = torch.arange(len(x), device=x.device)  # images still classified as y: only these are computed
    with eval_mode(model, frozen=True):
        for _ in range(steps):
            x_cur = (x[active] + (1 + overshoot) * r_total[active]).clamp(0, 1).detach().requires_grad_(True)
            logits = model(x_cur)
            still = logits.argmax(1) == y[active]
            if not still.any():
                break
            logits, y_cur, active = logits[still], y[active][still], active[still]
            rows, num_classes = torch.arange(len(active), device=x.device), logits.shape[1]
            grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), x_cur, retain_graph=k < num_classes - 1)[0]
                                 [still] for k in range(num_classes)], dim=1)  # (B', K, C, H, W)
            w = grads - grads[rows, y_cur].unsqueeze(1)
            f = (logits - logits[rows, y_cur].unsqueeze(1)).detach()
            w_norm = w.flatten(2).norm(dim=2) + 1e-8  # a zero gradient gives a zero step, not 0/0
            distance = f.abs() / w_norm
            distance[rows, y_cur] = float("inf")
            k = distance.argmin(1)
            r_total[active] += (distance[rows, k] + 1e-4).view(view) * w[rows, k] / w_norm[rows, k].view(view)
    return (x + (1 + overshoot) * r_total).clamp(0, 1).detach()


def same_class_partner(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """No attack (the paper's ablation): each image's partner is a random other image of its class `y`."""
    partner = torch.arange(len(x), device=x.device)
    for cls in y.unique():
        members = (y == cls).nonzero().view(-1)
        if len(members) > 1:  # a random derangement-free shuffle: shift a random permutation by one
            # drawn on the generator's device: a CUDA generator cannot drive a CPU randperm
            gen_device = generator.device if generator is not None else "cpu"
            perm = members[torch.randperm(len(members), generator=generator, device=gen_device).to(x.device)]
            partner[perm] = perm.roll(1)
    return x[partner].clone()


SAME_CLASS = ("none", "same_class")  # partners drawn from the image's own class: no attack, the same samples
ATTACKS: dict[str, Attack] = {"pgd": pgd, "autoattack": autoattack, "apgd_ce": apgd_ce, "deepfool": deepfool,
                              "none": same_class_partner, "same_class": same_class_partner}


def get_attack(name: str) -> Attack:
    """The attack registered as `name`; an unknown name fails with the list of valid ones."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name]
