"""Black-box setting: the protected classifier is only queried for its outputs, never differentiated.

A surrogate classifier is distilled from the black box's softmax outputs (Hinton et al. 2015) on the limited
data, then again on the limited data plus the samples generated through the surrogate. Every gradient of
DE-CROP (attacks, interpolation, L_lc/L_cs/L_mmd, the discriminator) flows through the surrogate; certification
uses the black box itself. `BlackBox` makes the "outputs only" rule a property of the object rather than a
convention: its forward pass runs without autograd, so nothing can backpropagate into it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .config import BlackBoxConfig
from .data import augmentation_policy
from .metrics import MetricSink
from .runtime import eval_mode


class BlackBox(nn.Module):
    """Wraps a classifier so it can only be queried: logits without a graph, in eval mode, and a query count."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.queries = 0

    def forward(self, x: Tensor) -> Tensor:
        with eval_mode(self.model), torch.no_grad():
            out = self.model(x)
        self.queries += len(x)
        return out


def distill_surrogate(blackbox: BlackBox, surrogate: nn.Module, images: Tensor, cfg: BlackBoxConfig, *,
                      image_size: int, seed: int, sink: MetricSink | None = None,
                      log: Callable[[str], None] | None = None) -> nn.Module:
    """Train `surrogate` (on its device) to match the black box's tempered softmax on `images` (N, C, H, W).

    Crop + flip augmentation (policy 1) is applied and the black box is queried on each augmented batch, so
    the surrogate learns the black box's function around the data rather than on N points. Returns the
    surrogate in eval mode.
    """
    device = next(surrogate.parameters()).device
    augment = augmentation_policy(1, image_size)
    loader = DataLoader(TensorDataset(images), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=cfg.lr)
    t = cfg.temperature
    surrogate.train()
    for epoch in range(cfg.epochs):
        total, agree, seen = 0.0, 0, 0
        for (x,) in loader:
            x = augment(x).to(device)  # one random transform per batch: cheap, and varied across batches
            target = F.softmax(blackbox(x) / t, dim=1)
            logits = surrogate(x)
            loss = F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean") * t * t
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
            agree += (logits.argmax(1) == target.argmax(1)).sum().item()
            seen += len(x)
        if sink is not None:
            sink.log_metrics({"surrogate/kl": total / seen, "surrogate/agreement": agree / seen}, step=epoch + 1)
    if log:
        log(f"surrogate: distilled on {len(images)} images with {blackbox.queries} black-box queries so far")
    return surrogate.eval()
