"""The denoiser training loop: one loop, pluggable objectives, the paper's Adam-then-SGD schedule.

``train_denoiser`` runs the epochs of one training stage over a DataLoader, asks the objective for a loss,
steps the optimiser chosen by `AdamThenSGD` for that epoch, measures the validation metric and reports both
through a `MetricSink`. Each stage has a schedule of its own (DE-CROP's stage 2 restarts Adam-then-SGD, as the
released code's second script does), unless it continues the previous stage's (``decrop.stage2_schedule``).
The classifier stays frozen: gradients off, eval mode (BatchNorm statistics untouched), restored afterwards.
The loop knows nothing of Ray or MLflow; `tuning/` passes a DDP-wrapped denoiser, its own sink and an
``on_epoch_end`` hook that checkpoints; every worker iterates the same global batches (`decrop.distributed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .metrics import MetricSink
from .objectives import Objective
from .runtime import eval_mode


class AdamThenSGD:
    """Adam(lr) for ``adam_epochs`` epochs, then SGD(lr, momentum) decayed by ``lr_gamma`` every ``lr_step``
    epochs counted from the switch (the paper's supplementary; Salman et al.'s ``adamThenSgd``).

    The released code compared the optimiser name against a string with a trailing space, so it never
    switched; here the switch is keyed on the epoch number alone. Call `for_epoch` at the start of every
    epoch of a stage; it returns the optimiser to step and sets its learning rate. ``offset`` is the number of
    epochs of this schedule run before the stage's epoch 0 (a stage that continues the previous stage's
    schedule sets it to that stage's epochs; 0 for a schedule of its own).
    """

    def __init__(self, params, cfg: TrainConfig, offset: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.cfg = cfg
        self.offset = offset
        self.kind: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def kind_at(self, epoch: int) -> str:
        return "adam" if epoch + self.offset < self.cfg.adam_epochs else "sgd"

    def lr_at(self, epoch: int) -> float:
        if self.kind_at(epoch) == "adam":
            return self.cfg.lr
        return self.cfg.lr * self.cfg.lr_gamma ** ((epoch + self.offset - self.cfg.adam_epochs) // self.cfg.lr_step)

    def for_epoch(self, epoch: int) -> torch.optim.Optimizer:
        kind = self.kind_at(epoch)
        if kind != self.kind:
            self.kind = kind
            if kind == "adam":
                self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.lr)
            else:
                self.optimizer = torch.optim.SGD(self.params, lr=self.cfg.lr, momentum=self.cfg.momentum)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        return self.optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict[str, Any], epoch: int) -> None:
        """Restore the optimiser saved at the end of epoch ``epoch - 1`` to continue at `epoch`."""
        self.kind = None
        optimizer = self.for_epoch(epoch)
        if state["kind"] == self.kind and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
            self.for_epoch(epoch)  # the saved state holds the old epoch's learning rate


@torch.no_grad()
def agreement(denoiser: nn.Module, classifier: nn.Module, images: Tensor, sigma: float, seed: int,
              batch_size: int = 100) -> float:
    """Validation metric: fraction of images with argmax f(D(x + delta)) == argmax f(x), read no label.

    In batches of 100: all validation images at once would grow each training worker's heap (kept by
    `tune_allocator`) beyond what training itself needs. The noise does not depend on the batch size (the generator's stream is
    drawn in order).

    `images` (N, C, H, W) in [0, 1]. The noise is drawn from a generator seeded with `seed`, so every epoch
    sees the same draws and the curve moves only because the denoiser does. Runs both models in eval mode
    and restores their modes.
    """
    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    agree = 0
    with eval_mode(denoiser, classifier):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            noise = torch.randn(x.shape, generator=generator, device=device) * sigma
            agree += (classifier(denoiser(x + noise)).argmax(1) == classifier(x).argmax(1)).sum().item()
    return agree / max(len(images), 1)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch, as reported

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def train_denoiser(denoiser: nn.Module, classifier: nn.Module, loader: DataLoader, objective: Objective,
                   cfg: TrainConfig, *, epochs: int, val_images: Tensor, sigma: float, seed: int,
                   sink: MetricSink | None = None, schedule: AdamThenSGD | None = None, start_epoch: int = 0,
                   epoch_offset: int = 0,
                   on_epoch_end: Callable[[int, AdamThenSGD, dict[str, float]], None] | None = None,
                   ) -> TrainResult:
    """Train `denoiser` in front of the frozen `classifier` for the `epochs` of one stage.

    `loader` yields ``(images_tuple, labels)`` global batches (see `decrop.data.AugmentedTensorDataset`); images
    are moved to the device of `val_images`. Before every step the objective learns the stage's progress
    p = steps done / steps of the stage. Every epoch reports ``train/loss``, ``train/<part>`` for each part the
    objective returns, ``train/lr``, ``train/epoch_time`` and ``val/agreement`` to `sink` at step
    ``epoch_offset + epoch + 1`` (epochs are counted over all stages). To resume, pass the stage's restored
    `schedule` and `start_epoch` (epochs of this stage already done). ``on_epoch_end(epoch, schedule, metrics)``
    runs after each epoch with the epoch counted over all stages (checkpointing). The classifier is frozen (eval
    mode, no gradients) throughout and restored afterwards; the denoiser is left in eval mode.
    """
    device = val_images.device
    schedule = schedule or AdamThenSGD(denoiser.parameters(), cfg)
    steps = len(loader)
    result = TrainResult()
    with eval_mode(classifier, frozen=True):
        for epoch in range(start_epoch, epochs):
            tic = time.perf_counter()
            optimizer = schedule.for_epoch(epoch)
            denoiser.train()
            sums: dict[str, float] = {}
            seen = 0
            for step, (images, labels) in enumerate(loader):
                objective.set_progress((epoch * steps + step) / (epochs * steps))
                images = tuple(im.to(device, non_blocking=True) for im in images)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    loss, parts = objective(denoiser, classifier, images, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                objective.after_backward()
                optimizer.step()
                seen += len(labels)
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value * len(labels)
            metrics = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
            metrics["train/lr"] = optimizer.param_groups[0]["lr"]
            metrics["train/epoch_time"] = time.perf_counter() - tic
            metrics["val/agreement"] = agreement(denoiser, classifier, val_images, sigma, seed)
            result.history.append({"epoch": epoch_offset + epoch + 1, **metrics})
            if sink is not None:
                sink.log_metrics(metrics, step=epoch_offset + epoch + 1)
            if on_epoch_end is not None:
                on_epoch_end(epoch_offset + epoch, schedule, metrics)
    denoiser.eval()
    return result
