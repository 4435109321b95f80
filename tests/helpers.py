"""Helpers shared by test modules: `from helpers import ...` (tests/ is on pytest's `pythonpath`, pyproject.toml).

Fixtures stay in conftest.py; what tests import by name lives here, so no test imports conftest.
"""

import torch

# Overrides that shrink the quick profile's sweep to seconds per trial (tests/tuning, tests/cluster).
TINY_SWEEP = ["train.epochs=2", "decrop.stage2_epochs=1", "decrop.attack_steps=2", "decrop.interp_steps=2",
              "certify.val_images=8", "certify.n=100", "certify.n0=20", "data.test_every=1000", "denoiser.depth=3",
              "denoiser.width=8", "classifier.epochs=1"]


def quadrant_images(n: int, seed: int, size: int, num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable toy data: images (n, 1, size, size) of noise in [0, 0.5] with the quadrant of the class
    (labels (n,) cycling through 0..3) raised by 0.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    half = size // 2
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, r * half:(r + 1) * half, s * half:(s + 1) * half] += 0.5
    return x, y
