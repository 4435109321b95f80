"""The base classifier: the pretrained, non-robust model DE-CROP protects.

``classifier.source=train`` (the default) stands in for a user's model: it is trained once per dataset and
classifier config on the full training split with the paper's SGD schedule (lr 0.1, momentum 0.9, weight decay
5e-4, x0.1 every 100 epochs), saved under ``cache_dir/classifiers/`` with the config hash in its metadata, and
reused by every later run, seed and trial of a study. Every other source is the user's own file
(`decrop.user_model`). `get_classifier` is the one entry point for both; either way the run logs the sha256 of
the file the classifier came from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ClassifierConfig, ExperimentConfig, config_hash, expand_path
from .data import AugmentedTensorDataset, DatasetInfo, augmentation_policy, dataset_info
from .errors import CheckpointError
from .metrics import MetricSink
from .models import create_model
from .runtime import eval_mode
from .user_model import file_sha256, load_user_classifier

# The fields that change a trained classifier: its cache key hashes exactly these, so that keys (and the cached
# classifiers) stay valid when ClassifierConfig gains fields that do not train anything.
_TRAINING_FIELDS = ("arch", "epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_step", "lr_gamma", "seed")


def build_classifier(dataset: str | DatasetInfo, arch: str) -> nn.Module:
    """A fresh classifier for `dataset` (a name or its `DatasetInfo`) with normalisation as its first layer
    (inputs in [0, 1])."""
    info = dataset_info(dataset) if isinstance(dataset, str) else dataset
    return create_model(arch, in_channels=info.channels, num_classes=info.num_classes,
                        mean=info.mean, std=info.std)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Clean top-1 accuracy of `model` on (N, C, H, W) images in [0, 1]; restores the model's mode."""
    device = next(model.parameters()).device
    correct = 0
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            correct += (model(x).argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / max(len(images), 1)


def train_classifier(model: nn.Module, images: Tensor, labels: Tensor, cfg: ClassifierConfig, *,
                     image_size: int, sink: MetricSink | None = None) -> nn.Module:
    """Train `model` (on its current device) with SGD and step decay; crop + flip augmentation (policy 1).

    `images` (N, C, H, W) float in [0, 1] on the CPU, `labels` (N,) int64. Reports ``classifier/loss`` and
    ``classifier/train_acc`` per epoch. Returns the model in eval mode.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    dataset = AugmentedTensorDataset((images,), labels, augmentation_policy(1, image_size))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    for epoch in range(cfg.epochs):
        model.train()
        tic, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for (x,), y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        scheduler.step()
        if sink is not None:
            sink.log_metrics({"classifier/loss": loss_sum / seen, "classifier/train_acc": correct / seen,
                              "classifier/epoch_time": time.perf_counter() - tic}, step=epoch + 1)
    return model.eval()


def classifier_key(cfg: ExperimentConfig) -> str:
    """Cache key of the classifier's function (keys samples generated through it): for ``source=train``
    everything that changes the trained classifier (dataset and training config); for the user's model its
    file's sha256 and how it is read (source, architecture, normalisation)."""
    c = cfg.classifier
    if c.source == "train":
        return config_hash(cfg.data.dataset, {k: getattr(c, k) for k in _TRAINING_FIELDS})
    return config_hash("user", c.source, file_sha256(c.path), c.arch if c.source == "state_dict" else "",
                       c.torchvision_arch, list(c.mean), list(c.std))


def classifier_path(cfg: ExperimentConfig) -> Path:
    return (expand_path(cfg.cache_dir) / "classifiers"
            / f"{cfg.data.dataset}-{cfg.classifier.arch}-{classifier_key(cfg)}.pt")


def load_or_train_classifier(cfg: ExperimentConfig, images: Tensor, labels: Tensor, device: torch.device, *,
                             sink_factory: Callable[[int], MetricSink | None] = lambda epochs: None,
                             log: Callable[[str], None] = print) -> nn.Module:
    """The cached classifier for this config, trained (and cached) first if there is none.

    A cached file for another config, or a corrupt one, raises `CheckpointError` with the fix; it is never
    silently overwritten. The returned model is on `device`, in eval mode, with gradients on (attacks and
    losses differentiate through it; training loops freeze it themselves).
    """
    model = build_classifier(cfg.data.dataset, cfg.classifier.arch)
    path = classifier_path(cfg)
    expect = {"kind": "classifier", "dataset": cfg.data.dataset, "arch": cfg.classifier.arch,
              "key": classifier_key(cfg)}
    if path.exists():
        meta = load_checkpoint(path, model, expect)
        log(f"classifier: reusing {path} (trained {meta['epochs']} epochs)")
        return model.to(device).eval()
    log(f"classifier: training {cfg.classifier.arch} on {len(images)} {cfg.data.dataset} images for "
        f"{cfg.classifier.epochs} epochs (cached afterwards at {path})")
    torch.manual_seed(cfg.classifier.seed)
    model = build_classifier(cfg.data.dataset, cfg.classifier.arch).to(device)
    tic = time.perf_counter()
    train_classifier(model, images, labels, cfg.classifier, image_size=dataset_info(cfg.data.dataset).image_size,
                     sink=sink_factory(cfg.classifier.epochs))
    save_checkpoint(path, model, {**expect, "epochs": cfg.classifier.epochs,
                                  "train_seconds": time.perf_counter() - tic})
    return model.eval()


def get_classifier(cfg: ExperimentConfig, info: DatasetInfo, images: Tensor, labels: Tensor, device: torch.device,
                   *, sink_factory: Callable[[int], MetricSink | None] = lambda epochs: None,
                   log: Callable[[str], None] = print, data: str = "the data") -> tuple[nn.Module, str]:
    """The frozen classifier of this run and the sha256 of the file it came from.

    ``classifier.source=train``: `load_or_train_classifier` on the full training split `images`/`labels`;
    otherwise the user's file (`decrop.user_model.load_user_classifier`), checked against the first images of
    `images` (described by `data` in its errors) before any compute. On `device`, eval mode.
    """
    if cfg.classifier.source == "train":
        model = load_or_train_classifier(cfg, images, labels, device, sink_factory=sink_factory, log=log)
        return model, file_sha256(classifier_path(cfg))
    model = load_user_classifier(cfg.classifier, info, images[:2], device, data=data, log=log)
    return model, file_sha256(cfg.classifier.path)


def load_classifier(cfg: ExperimentConfig, info: DatasetInfo, example: Tensor, device: torch.device,
                    log: Callable[[str], None] = print) -> tuple[nn.Module, str]:
    """Like `get_classifier`, but never trains: a ``source=train`` classifier must be in the cache
    (CheckpointError with the fix otherwise). `example` (B, C, H, W) in [0, 1] probes a user's model."""
    if cfg.classifier.source != "train":
        return load_user_classifier(cfg.classifier, info, example, device, log=log), file_sha256(cfg.classifier.path)
    path = classifier_path(cfg)
    if not path.exists():
        raise CheckpointError(f"the run's classifier {path} is not in the cache (cache_dir={cfg.cache_dir}); run "
                              f"`python -m decrop run` with this config once to train it again")
    model = build_classifier(info, cfg.classifier.arch)
    load_checkpoint(path, model, {"kind": "classifier", "dataset": cfg.data.dataset, "arch": cfg.classifier.arch,
                                  "key": classifier_key(cfg)})
    return model.to(device).eval(), file_sha256(path)
