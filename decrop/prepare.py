"""Preparing one experiment: the data, the frozen classifier and the three disjoint image sets, with the run's
data budget.

`prepare` is the first phase of every run (``python -m decrop run``, each Ray task and Train worker of a study):
it loads the dataset (a built-in one, or the user's folder), gets the classifier (trained and cached on first use,
or the user's own, frozen), draws the limited training subset, the validation images (read without labels) and
the certified test images, and states the data budget. Bad folders, model files and sizes fail here, before any
training or certification.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .classifier import accuracy, get_classifier
from .config import ExperimentConfig, config_hash, expand_path
from .data import (DatasetInfo, as_tensors, dataset_info, load_dataset, load_indices, save_indices,
                   stratified_subset, test_indices, unlabeled_indices, validation_indices)
from .errors import ConfigError, FolderDataError
from .folders import load_image_folder, read_images
from .metrics import PrintSink
from .runtime import eval_mode, release_memory, resolve_device, seed_everything, tune_allocator

Log = Callable[[str], None]


@dataclass
class Prepared:
    """What every method of one experiment shares: the frozen classifier and the three disjoint image sets.

    Indices are dataset indices (into the training split for ``train_*`` and ``val_*``, the test split for
    ``test_indices``), so every certification row can be traced to its image. ``val_targets`` are the
    classifier's own predictions on the validation images: validation reads no label (`budget` says so).
    """

    cfg: ExperimentConfig
    device: torch.device
    info: DatasetInfo
    classifier: nn.Module
    train_images: Tensor  # (k, C, H, W) in [0, 1], CPU: the limited data the denoisers train on
    train_labels: Tensor
    train_indices: np.ndarray  # into the training split
    val_images: Tensor  # (V, C, H, W) on `device`: model selection, the per-epoch metric, the tuning objective
    val_targets: Tensor  # (V,) the classifier's predictions on val_images (labels are never read)
    val_indices: np.ndarray  # into the training split, disjoint from train_indices
    test_set: TensorDataset  # the test split; certified at `test_indices` for reporting only
    test_indices: np.ndarray
    clean_accuracy: float  # of the classifier on the whole test split
    budget: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def val_dataset(self) -> "IndexedImages":
        """The validation images addressed by their dataset index, with the classifier's predictions as
        targets (what `certify_indices` reads for the label-free validation objective)."""
        return IndexedImages(self.val_indices, self.val_images.cpu(), self.val_targets)


class IndexedImages(torch.utils.data.Dataset):
    """Images addressed by their dataset index: ``ds[idx] = (image, target)`` for idx in `indices`."""

    def __init__(self, indices: np.ndarray, images: Tensor, targets: Tensor) -> None:
        self.position = {int(i): k for k, i in enumerate(indices)}
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.position)

    def __getitem__(self, idx: int) -> tuple[Tensor, int]:
        k = self.position[int(idx)]
        return self.images[k], int(self.targets[k])


def subset_for(cfg: ExperimentConfig, labels: Tensor) -> np.ndarray:
    """The limited subset for (dataset, percent, seed), persisted in the cache so that every method and every
    later run of this setting trains on exactly the same images."""
    check_percent(cfg.data.percent, labels)
    meta = {"dataset": cfg.data.dataset, "percent": cfg.data.percent, "seed": cfg.seed}
    path = expand_path(cfg.cache_dir) / "subsets" / f"{config_hash(meta)}.json"
    if path.exists():
        return load_indices(path, **meta)
    indices = stratified_subset(labels.numpy(), cfg.data.percent, cfg.seed)
    save_indices(path, indices, **meta)
    return indices


def check_percent(percent: float, labels: Tensor) -> None:
    """ConfigError unless `percent` % of the smallest class of `labels` is at least one image: below that,
    `stratified_subset` would still take one image per class and the run would train on more than it reports."""
    counts = np.bincount(labels.numpy())
    smallest = int(counts[counts > 0].min())
    if percent / 100 * smallest < 1 - 1e-9:
        lowest = math.ceil(100 / smallest * 1e4) / 1e4  # one image of the smallest class, rounded up
        raise ConfigError(f"config key 'data.percent' = {percent} is less than one image per class (the smallest "
                          f"class has {smallest} of {len(labels)} training images): use data.percent >= {lowest:g}")


def split_validation(cfg: ExperimentConfig, subset: np.ndarray, labels: Tensor,
                     num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices), both into the training split, disjoint.

    ``data.val_source=unlabeled``: the whole subset trains and the validation images are drawn from the rest of
    the split without reading a label. ``holdout``: a stratified part of the subset (its labels are inside the
    budget) validates and the rest trains; at least one image per class must stay for training.
    """
    if cfg.data.val_source == "unlabeled":
        return subset, unlabeled_indices(num_images, subset, cfg.data.val_size, cfg.seed)
    subset_labels = labels[subset].numpy()
    held = subset[validation_indices(subset_labels, [], cfg.data.val_size, cfg.seed)]
    train = np.setdiff1d(subset, held)
    if len(np.unique(labels[train].numpy())) < len(np.unique(subset_labels)):
        raise ConfigError(f"data.val_source=holdout with data.val_size={cfg.data.val_size} leaves a class without "
                          f"training images (the subset has {len(subset)}): lower data.val_size or raise "
                          f"data.percent")
    return train, held


def describe_budget(budget: dict[str, object]) -> str:
    """The data budget of a run in one line (printed by every run, logged with every trial). A folder dataset's
    says that all of train/ is the budget and how much of it trains and validates (a profile's
    data.val_source=holdout, configs/folder.yaml's, keeps that part from training)."""
    if "train_sha256" in budget:  # a folder dataset: every image of train/ is the budget
        place = str(budget["dataset"]).removeprefix("folder ")
        use = (f"{budget['train_images']} trained on, {budget['val_images']} held out for validation (holdout, "
               f"their labels not read)" if budget["val_source"] == "holdout" else
               f"all trained on; {budget['val_images']} validation images from unlabeled/ (labels not read)")
        return (f"budget: all {budget['split_size']} labelled images of {place}/train (data.percent=100): {use}; labels read "
                f"outside train/: {budget['labels_outside']}; classifier: {budget['classifier']}; test labels read "
                f"for reporting only")
    return (f"budget: {budget['train_images']} labelled training images ({budget['percent']}% of "
            f"{budget['split_size']}), {budget['val_images']} validation images ({budget['val_source']}, labels "
            f"not read), labels read outside the limited data: {budget['labels_outside']}; classifier: "
            f"{budget['classifier']}; test labels read for reporting only")


@dataclass
class _Images:
    """What `prepare` reads before drawing its image sets: the training split (a folder's train/), the test split,
    the data's part of the budget and, for a folder, the files of unlabeled/ (validation images are drawn there)."""

    info: DatasetInfo
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    budget: dict[str, object]
    unlabeled_files: tuple | None = None  # folder datasets: the files of unlabeled/


def _load_images(cfg: ExperimentConfig) -> _Images:
    """A built-in dataset through torchvision, or the user's folder (`decrop.folders.load_image_folder`)."""
    root = expand_path(cfg.data.root)
    if cfg.data.dataset == "folder":
        folder = load_image_folder(root, cfg.data.classes, shape=lambda: _classifier_input_shape(cfg))
        budget = {"dataset": f"folder {root}", "train_sha256": folder.train_sha256}
        return _Images(folder.info, folder.train_images, folder.train_labels, folder.test_images,
                       folder.test_labels, budget, folder.unlabeled)
    train_images, train_labels = as_tensors(load_dataset(cfg.data.dataset, root, train=True,
                                                         download=cfg.data.download))
    test_images, test_labels = as_tensors(load_dataset(cfg.data.dataset, root, train=False,
                                                       download=cfg.data.download))
    return _Images(dataset_info(cfg.data.dataset), train_images, train_labels, test_images, test_labels,
                   {"dataset": cfg.data.dataset})


def _classifier_input_shape(cfg: ExperimentConfig) -> tuple[int | None, ...] | None:
    """The (C, H, W) an exported classifier takes (None for a dynamic size), which tells the odd images of a
    folder whose images disagree in shape (`decrop.folders.check_shapes` asks only then). None for the other
    sources, or for a file that cannot be read here: loading the classifier reports that problem afterwards."""
    if cfg.classifier.source != "export":
        return None
    from .archive import load_export
    from .user_model import detect_format

    try:
        path = Path(cfg.classifier.path)
        if detect_format(path) != "export":
            return None
        program = load_export(path)
        (name,) = program.graph_signature.user_inputs
        spec = next(n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    except Exception:
        return None
    return tuple(None if isinstance(s, torch.SymInt) else int(s) for s in spec[1:]) if len(spec) == 4 else None


def _draw_images(cfg: ExperimentConfig, data: _Images) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """(training indices, validation indices, validation images) of `data` (`split_validation`). A folder
    trains on all of train/ and validates on unlabeled/ (indices into its files) or a holdout of train/."""
    count = len(data.train_labels)
    try:
        if data.unlabeled_files is None:  # a built-in dataset
            subset = subset_for(cfg, data.train_labels)
            train, val = split_validation(cfg, subset, data.train_labels, count)
            return train, val, data.train_images[val]
        if cfg.data.val_source == "holdout":
            train, val = split_validation(cfg, np.arange(count), data.train_labels, count)
            return train, val, data.train_images[val]
        root = expand_path(cfg.data.root)
        if not data.unlabeled_files:
            raise FolderDataError(f"data.val_source=unlabeled reads {root / 'unlabeled'}, which is missing or holds "
                                  f"no image: put unlabelled images there (any layout; their labels are never read), "
                                  f"or set data.val_source=holdout to validate on a part of train/ (which is then "
                                  f"not trained on; configs/folder.yaml does)")
        val = unlabeled_indices(len(data.unlabeled_files), [], cfg.data.val_size, cfg.seed)
    except ValueError as err:
        if isinstance(err, (ConfigError, FolderDataError)):
            raise
        raise ConfigError(f"config key 'data.val_size' = {cfg.data.val_size}: {err}; lower data.val_size") from None
    images = read_images([data.unlabeled_files[i] for i in val], data.train_images.shape[1:])
    return np.arange(count), val, images


def prepare(cfg: ExperimentConfig, log: Log = print, evaluate: bool = True) -> Prepared:
    """Load the data, get the classifier (trained and cached on first use, or the user's own) and draw the image
    sets. Bad folders, model files and sizes fail here, before any training or certification.

    `evaluate` measures the classifier's clean test accuracy (NaN without it: workers that only train or
    certify skip it)."""
    seed_everything(cfg.seed)
    tune_allocator()
    device = resolve_device(cfg.device)
    tic = time.perf_counter()
    data = _load_images(cfg)
    info, train_images, train_labels = data.info, data.train_images, data.train_labels
    train, val, val_images = _draw_images(cfg, data)
    tests = test_indices(len(data.test_labels), cfg.data.test_every)
    timings = {"data": time.perf_counter() - tic}

    tic = time.perf_counter()
    where = f"{expand_path(cfg.data.root) / 'train'}" if cfg.data.dataset == "folder" else cfg.data.dataset
    classifier, sha256 = get_classifier(
        cfg, info, train_images, train_labels, device, log=log, data=where,
        sink_factory=lambda epochs: PrintSink("classifier: ", total=epochs))
    timings["classifier"] = time.perf_counter() - tic
    clean = accuracy(classifier, data.test_images, data.test_labels) if evaluate else float("nan")
    if evaluate:
        log(f"classifier: clean test accuracy {clean:.4f}")

    val_images = val_images.to(device)
    with torch.no_grad(), eval_mode(classifier):
        val_targets = torch.cat([classifier(chunk).argmax(1).cpu() for chunk in val_images.split(1000)])
    c = cfg.classifier
    described = (f"pretrained {c.arch} (trained here on the full training split, standing in for the user's model)"
                 if c.source == "train" else f"your {c.source} model {c.path}, frozen")
    budget = {"train_images": len(train), "percent": cfg.data.percent, "split_size": len(train_labels),
              "val_images": len(val), "val_source": cfg.data.val_source, "labels_outside": 0,
              "classifier": f"{described} (sha256 {sha256[:16]})", "classifier_sha256": sha256, **data.budget}
    if cfg.data.dataset == "folder":
        log(f"data: all {len(train_labels)} images of {expand_path(cfg.data.root) / 'train'} ({info.num_classes} "
            f"classes, {info.channels}x{info.image_size}x{info.image_size}), {len(tests)} certified test images")
    else:
        log(f"data: {len(train) + (len(val) if cfg.data.val_source == 'holdout' else 0)} images in the limited "
            f"subset ({cfg.data.percent}% of {len(train_labels)}, stratified, seed {cfg.seed}), {len(tests)} "
            f"certified test images")
    log(describe_budget(budget))
    prepared = Prepared(cfg=cfg, device=device, info=info, classifier=classifier,
                        train_images=train_images[train], train_labels=train_labels[train], train_indices=train,
                        val_images=val_images, val_targets=val_targets, val_indices=val,
                        test_set=TensorDataset(data.test_images, data.test_labels), test_indices=tests,
                        clean_accuracy=clean, budget=budget, timings=timings)
    del data, train_images, train_labels  # the full training split: only the drawn subsets are kept
    release_memory()
    return prepared
