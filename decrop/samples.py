"""Generated training samples of DE-CROP: boundary samples and interpolated samples.

For every limited-data image `x` the method makes a boundary sample `x_b` (an attack, `decrop.attacks`) and
`n_interp` interpolated samples `x_int` between them: inputs whose logits match
``t = mixing f(x) + (1 - mixing) f(x_b)`` (`mixing` is the paper's alpha, named apart from the certificate's
failure probability). They are found by optimising the input with Adam (the paper's intent; the released code
takes a single 0.001 step by accident). Sample j > 0 starts from ``x + U(-eps, eps)`` so the
samples differ; sample 0 starts from ``x`` itself.

Generation is deterministic given the seed and is cached (``cache_dir/samples/<hash>.pt``) per classifier,
subset and sample setting, so a study's trials that share a setting generate it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import ATTACK_IMPLEMENTATION, get_attack
from .checkpoint import load_tensors, save_tensors
from .config import DecropConfig
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


def generate_samples(model: nn.Module, images: Tensor, labels: Tensor, cfg: DecropConfig, *, seed: int,
                     batch_size: int = 256, log: Callable[[str], None] | None = None) -> GeneratedSamples:
    """Boundary and interpolated samples for `images` (N, C, H, W) in [0, 1] with true `labels` (N,).

    Runs on the device of `model`; returns CPU tensors. Batches are independent, each seeded from
    ``(seed, batch index)``. The `none` attack pairs images within the whole class, not per batch.
    """
    device = next(model.parameters()).device
    attack = get_attack(cfg.attack)
    if cfg.attack == "none":  # the partner must be of the same class among all N images
        order = [torch.arange(len(images))]
    else:
        order = list(torch.arange(len(images)).split(batch_size))
    boundary, interpolated = torch.empty_like(images), torch.empty(cfg.n_interp, *images.shape)
    for b, idx in enumerate(order):
        generator = torch.Generator(device=device).manual_seed(seed * 7919 + b)
        x, y = images[idx].to(device), labels[idx].to(device)
        kwargs = {"steps": cfg.attack_steps} if cfg.attack in ("pgd", "apgd_ce") else {}
        if cfg.attack == "pgd":
            kwargs["step_size"] = cfg.attack_step_size
        x_b = attack(model, x, y, eps=cfg.eps, generator=generator, **kwargs)
        boundary[idx] = x_b.cpu()
        for j in range(0, len(idx), batch_size):  # `none` is one batch for pairing, interpolate in chunks
            sl = slice(j, j + batch_size)
            interpolated[:, idx[sl]] = interpolate(model, x[sl], x_b[sl], mixing=cfg.mixing, n_interp=cfg.n_interp,
                                                   steps=cfg.interp_steps, lr=cfg.interp_lr, eps=cfg.eps,
                                                   generator=generator).cpu()
        if log:
            log(f"samples: {min((b + 1) * batch_size, len(images)) if cfg.attack != 'none' else len(images)}"
                f"/{len(images)} images done")
    return GeneratedSamples(boundary, interpolated)


def sample_settings(cfg: DecropConfig) -> dict:
    """The fields of `cfg` that change the generated samples (the cache key), nothing else, and the attacks'
    implementation: samples cached by an older one (same names, other algorithms) must not be reused."""
    keys = ("attack", "eps", "attack_steps", "attack_step_size", "mixing", "n_interp", "interp_steps", "interp_lr")
    return {**{k: getattr(cfg, k) for k in keys}, "attack_implementation": ATTACK_IMPLEMENTATION}


def load_or_generate_samples(path: Path, model: nn.Module, images: Tensor, labels: Tensor, cfg: DecropConfig, *,
                             seed: int, key: str, log: Callable[[str], None] = print) -> GeneratedSamples:
    """Cached `generate_samples`: `key` identifies classifier + subset + settings; a file for another key is
    an error, not silently reused."""
    if path.exists():
        tensors, _ = load_tensors(path, {"kind": "samples", "key": key})
        log(f"samples: reusing {path}")
        return GeneratedSamples(tensors["boundary"], tensors["interpolated"])
    log(f"samples: generating {cfg.attack} boundary samples and {cfg.n_interp} interpolated sample(s) for "
        f"{len(images)} images (cached at {path})")
    samples = generate_samples(model, images, labels, cfg, seed=seed, log=log)
    save_tensors(path, {"boundary": samples.boundary, "interpolated": samples.interpolated},
                 {"kind": "samples", "key": key, **sample_settings(cfg)})
    return samples
