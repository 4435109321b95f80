"""Boundary samples: attacks that push each limited-data image to (or across) the classifier's decision boundary.

Every attack has one call shape, torchattacks-style: ``attack(model, x, y, *, eps, generator) -> x_b`` with
`x` (B, C, H, W) in [0, 1], `y` (B,) the labels to move away from (the limited data's true labels), and `x_b` the same shape, inside the L-inf `eps`-ball around `x` (except `none`) and in [0, 1].
The model is put in eval mode for the attack and left in the mode it was found in; its parameters receive no
gradient. `generator` seeds the random parts (random start, partner choice) so cached samples are reproducible.

- `pgd`: Madry et al. untargeted L-inf PGD on CE, random start (the paper's default: eps 8/255, step 2/255,
  20 steps).
- `autoattack`: APGD-CE of Croce & Hein (2020), AutoAttack's first and main component: the same ball, a step
  size halved when progress stalls at checkpoints, momentum 0.75, restart from the best point.
- `deepfool`: Moosavi-Dezfooli et al. minimal L2 perturbation to the nearest boundary (overshoot 0.02, <= 50
  iterations), clipped to the eps-ball and [0, 1] like the others so all kinds share one budget.
- `none`: the paper's ablation without an attack: the partner of each image is a random *other* image of the
  same class from the batch (itself only when it is alone in its class).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Attack = Callable[..., Tensor]


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    mode, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(mode)


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)


def _uniform_like(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample CE losses (B,) and their gradient with respect to the input."""
    x = x.detach().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, step_size: float = 2 / 255,
        steps: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """Untargeted L-inf PGD with a random start (Madry et al. 2018)."""
    with _frozen_eval(model):
        x_adv = _project(x + _uniform_like(x, eps, generator), x, eps)
        for _ in range(steps):
            _, grad = _loss_grad(model, x_adv, y)
            x_adv = _project(x_adv + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, steps: int = 20,
            generator: torch.Generator | None = None, rho: float = 0.75, momentum: float = 0.75) -> Tensor:
    """APGD-CE (Croce & Hein 2020): step size 2 eps, halved per sample at checkpoints where fewer than a
    fraction `rho` of the steps since the last checkpoint improved its loss (or nothing improved), in which
    case it also restarts from its best point; momentum `momentum`. Returns the highest-loss point found."""
    # Checkpoints p_j of the paper: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    checkpoints = sorted({math.ceil(m * steps) for m in p if 0 < m <= 1})
    with _frozen_eval(model):
        b = len(x)
        view = (b,) + (1,) * (x.dim() - 1)
        step = torch.full(view, 2 * eps, device=x.device, dtype=x.dtype)
        x_cur = _project(x + _uniform_like(x, eps, generator), x, eps)
        loss, grad = _loss_grad(model, x_cur, y)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        x_prev = x_cur.clone()
        improved = torch.zeros(b, device=x.device)  # steps since the last checkpoint that raised the loss
        last_check = 0
        # Step size and best loss as they were at the previous checkpoint, before its decision.
        step_at_check, loss_best_at_check = step.clone(), loss_best.clone()
        for i in range(1, steps + 1):
            z = _project(x_cur + step * grad.sign(), x, eps)
            a = 1.0 if i == 1 else momentum
            x_next = _project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps)
            x_prev, x_cur, loss_prev = x_cur, x_next, loss
            loss, grad = _loss_grad(model, x_cur, y)
            improved += (loss > loss_prev).float()
            better = loss > loss_best
            x_best[better], loss_best[better], grad_best[better] = x_cur[better], loss[better], grad[better]
            if i in checkpoints:
                # Condition 1: too few of the recent steps made progress. Condition 2: the step size was not
                # reduced at the previous checkpoint and the best loss has not moved since.
                stalled = (improved < rho * (i - last_check)) | (
                    (step.view(-1) == step_at_check.view(-1)) & (loss_best <= loss_best_at_check))
                step_at_check, loss_best_at_check = step.clone(), loss_best.clone()
                step[stalled] /= 2
                x_cur[stalled], grad[stalled] = x_best[stalled], grad_best[stalled]
                improved.zero_()
                last_check = i
    return x_best.detach()


def deepfool(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, steps: int = 50,
             overshoot: float = 0.02, generator: torch.Generator | None = None) -> Tensor:
    """DeepFool (L2, Moosavi-Dezfooli et al. 2016) towards the nearest class boundary among all classes.

    Iterates per sample until its prediction leaves `y` (or `steps`), then applies the accumulated
    perturbation times (1 + overshoot), clipped to the eps-ball and [0, 1]."""
    with _frozen_eval(model):
        r_total = torch.zeros_like(x)
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(steps):
            x_cur = (x + (1 + overshoot) * r_total).clamp(0, 1).detach().requires_grad_(True)
            logits = model(x_cur)
            active &= logits.argmax(1) == y
            if not active.any():
                break
            num_classes = logits.shape[1]
            grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), x_cur, retain_graph=k < num_classes - 1)[0]
                                 for k in range(num_classes)], dim=1)  # (B, K, C, H, W)
            idx = torch.arange(len(x), device=x.device)
            w = grads - grads[idx, y].unsqueeze(1)
            f = (logits - logits[idx, y].unsqueeze(1)).detach()
            w_norm = w.flatten(2).norm(dim=2) + 1e-8
            ratio = f.abs() / w_norm
            ratio[idx, y] = float("inf")
            k = ratio.argmin(1)
            step = (ratio[idx, k] + 1e-4).view(-1, *([1] * (x.dim() - 1))) * w[idx, k] / w_norm[idx, k].view(
                -1, *([1] * (x.dim() - 1)))
            r_total = r_total + step * active.view(-1, *([1] * (x.dim() - 1)))
        x_adv = _project(x + (1 + overshoot) * r_total, x, eps)
    return x_adv.detach()


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


ATTACKS: dict[str, Attack] = {"pgd": pgd, "autoattack": apgd_ce, "deepfool": deepfool, "none": same_class_partner}


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name]
