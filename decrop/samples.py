"""Generated training samples of DE-CROP: boundary samples and interpolated samples.

For every limited-data image `x` the method makes a boundary sample `x_b` (an attack, `decrop.attacks`) and
`n_interp` interpolated samples `x_int` between them: inputs whose logits match
``t = mixing f(x) + (1 - mixing) f(x_b)`` (`mixing` is the paper's alpha, named apart from the certificate's
failure probability). They are found by optimising the input with Adam (the paper's intent; the released code
takes a single 0.001 step by accident). Sample j > 0 starts from ``x + U(-eps, eps)`` so the
samples differ; sample 0 starts from ``x`` itself.

Generation is deterministic given the seed and cached under ``cache_dir/samples/`` in two files: the boundary
samples per classifier, images, seed and attack setting, and the interpolated samples per boundary file and
interpolation setting. A study's trials that differ only in the mixing coefficient, the loss weights or the
interpolation count share one boundary file (the attack is the expensive part: seconds for PGD, a minute for
AutoAttack on 600 images on one core).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import ATTACK_IMPLEMENTATION, SAME_CLASS, get_attack
from .checkpoint import load_tensors, save_tensors
from .config import DecropConfig, config_hash
from .runtime import eval_mode


@dataclass
class GeneratedSamples:
    boundary: Tensor  # (N, C, H, W) in [0, 1]
    interpolated: Tensor  # (n_interp, N, C, H, W) in [0, 1]

    def as_images(self) -> tuple[Tensor, ...]:
        """``(x_b, x_int_0, ..., x_int_{n-1})``, each (N, C, H, W): the order the DE-CROP objective expects."""
        return (self.boundary, *self.interpolated.unbind(0))


def interpolate(model: nn.Module, x: Tensor, x_b: Tensor, *, mixing: float, n_interp: int = 1, steps: int = 50,
                lr: float = 1e-2, eps: float = 8 / 255, generator: torch.Generator | None = None) -> Tensor:
    """Interpolated samples between `x` and `x_b` (both (B, C, H, W) in [0, 1]) in the classifier's logit space.

    Minimises MSE(f(x_int), mixing f(x) + (1 - mixing) f(x_b)) over the input with Adam (`mixing` is the
    paper's alpha), clamping to [0, 1] after each step. Returns (n_interp, B, C, H, W). The model is in eval mode throughout and left as found.
    """
    with eval_mode(model, frozen=True):
        with torch.no_grad():
            target = mixing * model(x) + (1 - mixing) * model(x_b)
        starts = [x] + [(x + (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps).clamp(0, 1)
                        for _ in range(n_interp - 1)]
        x_int = torch.cat(starts).clone().requires_grad_(True)
        target = target.repeat(n_interp, 1)
        optimizer = torch.optim.Adam([x_int], lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(model(x_int), target, reduction="sum") / len(x_int)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x_int.clamp_(0, 1)
    return x_int.detach().view(n_interp, *x.shape)


def generate_boundary(model: nn.Module, images: Tensor, labels: Tensor, cfg: DecropConfig, *, seed: int,
                      batch_size: int = 256) -> Tensor:
    """Boundary samples (N, C, H, W) in [0, 1] of `images` (N, C, H, W) with true `labels` (N,), by ``cfg.attack``.

    Runs on the device of `model`; returns a CPU tensor. Batches are independent, each seeded from
    ``(seed, batch index)``. The `none` and `same_class` partners pair images within the whole class, so they run as one batch.
    """
    device = next(model.parameters()).device
    attack = get_attack(cfg.attack)
    order = [torch.arange(len(images))] if cfg.attack in SAME_CLASS else list(torch.arange(len(images)).split(batch_size))
    kwargs = {"steps": cfg.attack_steps} if cfg.attack in ("pgd", "apgd_ce") else {}
    if cfg.attack == "pgd":
        kwargs["step_size"] = cfg.attack_step_size
    boundary = torch.empty_like(images)
    for b, idx in enumerate(order):
        generator = torch.Generator(device=device).manual_seed(seed * 7919 + b)
        boundary[idx] = attack(model, images[idx].to(device), labels[idx].to(device), eps=cfg.eps,
                               generator=generator, **kwargs).cpu()
    return boundary


def generate_interpolated(model: nn.Module, images: Tensor, boundary: Tensor, cfg: DecropConfig, *, seed: int,
                          batch_size: int = 256) -> Tensor:
    """Interpolated samples (n_interp, N, C, H, W) between `images` and their `boundary` samples (`interpolate`
    with ``cfg.mixing``), batch b seeded from ``(seed, b)`` on a stream apart from the attacks'."""
    device = next(model.parameters()).device
    out = torch.empty(cfg.n_interp, *images.shape)
    for b, idx in enumerate(torch.arange(len(images)).split(batch_size)):
        generator = torch.Generator(device=device).manual_seed(seed * 7919 + 104_729 + b)
        out[:, idx] = interpolate(model, images[idx].to(device), boundary[idx].to(device), mixing=cfg.mixing,
                                  n_interp=cfg.n_interp, steps=cfg.interp_steps, lr=cfg.interp_lr, eps=cfg.eps,
                                  generator=generator).cpu()
    return out


def generate_samples(model: nn.Module, images: Tensor, labels: Tensor, cfg: DecropConfig, *, seed: int,
                     batch_size: int = 256) -> GeneratedSamples:
    """Boundary and interpolated samples for `images` (N, C, H, W) in [0, 1] with true `labels` (N,), uncached."""
    boundary = generate_boundary(model, images, labels, cfg, seed=seed, batch_size=batch_size)
    return GeneratedSamples(boundary, generate_interpolated(model, images, boundary, cfg, seed=seed,
                                                            batch_size=batch_size))


def boundary_settings(cfg: DecropConfig) -> dict:
    """What changes the boundary samples (their cache key), and the attacks' implementation: samples cached by
    an older one (same names, other algorithms) must not be reused. The mixing coefficient, the loss weights
    and n_interp do not: trials that differ only in those share one boundary file."""
    keys = ("attack", "eps", "attack_steps", "attack_step_size")
    settings = {k: getattr(cfg, k) for k in keys}
    if cfg.attack in SAME_CLASS:  # the same partners whichever way the objective uses them
        settings["attack"] = SAME_CLASS[0]
    return {**settings, "attack_implementation": ATTACK_IMPLEMENTATION}


def interpolation_settings(cfg: DecropConfig) -> dict:
    """What changes the interpolated samples beyond their boundary samples (their cache key)."""
    return {k: getattr(cfg, k) for k in ("mixing", "n_interp", "interp_steps", "interp_lr", "eps")}


def _cached(path: Path, key: str, make: Callable[[], Tensor], what: str, log: Callable[[str], None]) -> Tensor:
    """The tensor cached at `path` for `key`, else `make()` saved there (a file for another key is an error)."""
    if path.exists():
        tensors, _ = load_tensors(path, {"kind": "samples", "key": key})
        log(f"samples: reusing {what} from {path}")
        return tensors["samples"]
    tic = time.perf_counter()
    tensor = make()
    save_tensors(path, {"samples": tensor}, {"kind": "samples", "key": key})
    log(f"samples: {what} generated in {time.perf_counter() - tic:.0f}s (cached at {path})")
    return tensor


def load_or_generate_samples(folder: Path, model: nn.Module, images: Tensor, labels: Tensor, cfg: DecropConfig, *,
                             seed: int, key: str, log: Callable[[str], None] = print) -> GeneratedSamples:
    """Cached `generate_samples` under `folder`: the boundary samples keyed by `key` (classifier + images +
    seed) and `boundary_settings`, the interpolated ones additionally by `interpolation_settings`."""
    boundary_key = config_hash(key, boundary_settings(cfg))
    boundary = _cached(folder / f"boundary-{boundary_key}.pt", boundary_key,
                       lambda: generate_boundary(model, images, labels, cfg, seed=seed),
                       f"{cfg.attack} boundary samples of {len(images)} images", log)
    interp_key = config_hash(boundary_key, interpolation_settings(cfg))
    interpolated = _cached(folder / f"interpolated-{interp_key}.pt", interp_key,
                           lambda: generate_interpolated(model, images, boundary, cfg, seed=seed),
                           f"{cfg.n_interp} interpolated sample(s) per image", log)
    return GeneratedSamples(boundary, interpolated)
