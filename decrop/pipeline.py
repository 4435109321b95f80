"""One experiment end to end: classifier -> limited subset -> denoisers -> certification -> table.

`run_experiment` is what ``python -m decrop run`` calls. Each phase is also a function of its own
(`prepare`, `train_method`, `certify_model`) so `tuning/` can run the same steps in Ray workers and tasks.
Everything a run writes goes into its output folder: the resolved config, the training indices, one
certification file per method (``certify_<method>.tsv``, Cohen's columns), the denoiser weights,
``summary.csv`` and ``run.json`` (with the run's data budget).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .blackbox import BlackBox, distill_surrogate
from .certify import certify_indices
from .checkpoint import restore_rng_state, rng_state, save_checkpoint
from .classifier import accuracy, build_classifier, classifier_key, get_classifier
from .config import NO_DENOISER, DenoiserConfig, ExperimentConfig, config_hash, expand_path, to_yaml
from .data import (AugmentedTensorDataset, DatasetInfo, as_tensors, augmentation_policy, dataset_info,
                   load_dataset, load_indices, save_indices, stratified_subset, test_indices, unlabeled_indices,
                   validation_indices)
from .distributed import Shard
from .errors import ConfigError, FolderDataError
from .folders import load_image_folder, read_images
from .metrics import MetricSink, PrintSink
from .models import DomainDiscriminator, create_model, fold_batchnorm
from .objectives import DecropObjective, Objective, baseline_objective
from .rows import CertRow, average_certified_radius, certified_accuracy, write_rows
from .runtime import Progress, eval_mode, release_memory, resolve_device, seed_everything, tune_allocator
from .samples import GeneratedSamples, load_or_generate_samples
from .training import AdamThenSGD, TrainResult, train_denoiser

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


def build_denoiser(cfg: DenoiserConfig, in_channels: int) -> nn.Module:
    """A fresh denoiser from its config (identity at initialisation)."""
    if cfg.arch == "dncnn":
        return create_model("dncnn", in_channels=in_channels, depth=cfg.depth, width=cfg.width)
    return create_model("memnet", in_channels=in_channels, width=cfg.width,
                        num_memblocks=cfg.num_memblocks, num_resblocks=cfg.num_resblocks)


@dataclass
class TrainHooks:
    """How `tuning/` runs the same training under Ray Train; the defaults are a plain single-process run.

    `wrap` wraps the trained denoiser (e.g. in DistributedDataParallel, after `convert_global_batchnorm`);
    `shard` is this worker's share of every global batch (`decrop.distributed`); `resume` is a state dict
    produced by `on_epoch_end`'s ``state()``; ``on_epoch_end(epoch, metrics, state)`` runs after every epoch
    (counted over all stages), ``state()`` returning what a resumed run needs (plain tensors and numbers, for
    ``torch.save``). Every worker iterates the same global batches: the loader is never sharded.
    """

    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    shard: Shard = field(default_factory=Shard)
    resume: dict | None = None
    on_epoch_end: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None


@dataclass(frozen=True)
class Stage:
    """One training stage: its name, its epochs (with an Adam-then-SGD schedule of its own) and its objective."""

    name: str
    epochs: int
    make_objective: Callable[[], Objective]


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _restore_rng(rng: dict, loader: DataLoader, device: torch.device) -> None:
    """The CPU, CUDA (the noise on a GPU) and shuffle generators as `rng_state` saved them."""
    restore_rng_state(rng, device, loader.generator)


def run_stages(prep: Prepared, classifier: nn.Module, images: tuple[Tensor, ...], stages: list[Stage],
               sink: MetricSink | None = None, hooks: TrainHooks | None = None) -> tuple[nn.Module, TrainResult]:
    """Train a fresh denoiser on `images` (aligned tuples, one augmentation per sample) through consecutive
    stages; each stage starts from the previous stage's denoiser with a fresh optimiser schedule. Returns the
    (unwrapped) denoiser in eval mode and the per-epoch history (epochs counted over all stages)."""
    cfg, hooks = prep.cfg, hooks or TrainHooks()
    torch.manual_seed(cfg.seed)
    # channels_last weights: the training step runs 1.15x faster than NCHW (benchmarks/train_speed.py).
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device, memory_format=torch.channels_last)
    dataset = AugmentedTensorDataset(images, prep.train_labels,
                                     augmentation_policy(cfg.data.augment, prep.info.image_size))
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    resume = hooks.resume
    done = resume["epoch"] if resume is not None else 0  # epochs over all stages already trained
    if resume is not None:
        denoiser.load_state_dict(resume["denoiser"])
    model = hooks.wrap(denoiser)
    result, offset = TrainResult(), 0
    for stage in stages:
        if done < offset + stage.epochs:
            in_stage = max(done - offset, 0)
            # The global RNG drives weight init, augmentation and noise, the loader's generator the shuffle.
            # Restoring both where the interrupted run saved them (before building a stage that begins at the
            # resume point; after rebuilding one that was under way) continues it exactly.
            if resume is not None and done == offset:
                _restore_rng(resume["rng"], loader, prep.device)
            objective = stage.make_objective()
            schedule = AdamThenSGD(model.parameters(), cfg.train)
            if resume is not None and in_stage > 0:
                schedule.load_state_dict(resume["schedule"], in_stage)
                objective.load_state_dict(resume["objective"] or {})
                _restore_rng(resume["rng"], loader, prep.device)

            def on_epoch_end(epoch, schedule, metrics, objective=objective):
                if hooks.on_epoch_end is not None:
                    # A deep copy: state dicts hold the live tensors, which the next epoch changes in place.
                    hooks.on_epoch_end(epoch, metrics, lambda: copy.deepcopy({
                        "epoch": epoch + 1, "denoiser": _unwrap(model).state_dict(),
                        "schedule": schedule.state_dict(), "objective": objective.state_dict(),
                        "rng": rng_state(prep.device, loader.generator)}))

            part = train_denoiser(model, classifier, loader, objective, cfg.train, epochs=stage.epochs,
                                  val_images=prep.val_images, sigma=cfg.sigma, seed=cfg.seed, sink=sink,
                                  schedule=schedule, start_epoch=in_stage, epoch_offset=offset,
                                  on_epoch_end=on_epoch_end)
            result.history += part.history
        offset += stage.epochs
    return denoiser.eval(), result


def samples_for(prep: Prepared, model: nn.Module, model_key: str, log: Log = print) -> GeneratedSamples:
    """Boundary + interpolated samples of the training images through `model`, cached per model, images and
    setting."""
    cfg = prep.cfg
    images = [prep.budget["train_sha256"]] if "train_sha256" in prep.budget else []  # folders: positions only
    key = config_hash(model_key, prep.train_indices.tolist(), cfg.seed, *images)
    return load_or_generate_samples(expand_path(cfg.cache_dir) / "samples", model, prep.train_images,
                                    prep.train_labels, cfg.decrop, seed=cfg.seed, key=key, log=log)


def method_stages(method: str, prep: Prepared, classifier: nn.Module, hooks: TrainHooks | None = None
                  ) -> list[Stage]:
    """The training stages of `method` (`ExperimentConfig.stage_epochs`): the baseline's one stage of L_lc;
    DE-CROP's stage 1 (L_lc + L_cs + L_mmd) and, when ``decrop.stage2_epochs`` > 0, stage 2, a run of its own
    that adds the domain discriminator (its own Adam) to the stage-1 denoiser."""
    cfg, shard = prep.cfg, (hooks or TrainHooks()).shard
    epochs = cfg.stage_epochs(method)
    if method == "baseline":
        return [Stage("baseline", epochs[0], lambda: baseline_objective(cfg.train.objective, cfg.sigma, shard))]
    stages = [Stage("stage1", epochs[0], lambda: DecropObjective(cfg.sigma, cfg.decrop, shard=shard))]
    if len(epochs) > 1:
        stages.append(Stage("stage2", epochs[1], lambda: DecropObjective(
            cfg.sigma, cfg.decrop, DomainDiscriminator(classifier.feature_dim).to(prep.device), shard=shard)))
    return stages


def train_method(method: str, prep: Prepared, sink: MetricSink | None = None, log: Log = print,
                 hooks: TrainHooks | None = None) -> tuple[nn.Module, TrainResult]:
    """Train the denoiser of `method` on the limited data; returns it in eval mode with its history.

    ``baseline``: Salman et al. (L_lc). ``decrop``: white-box DE-CROP through the classifier.
    ``decrop_blackbox``: DE-CROP through a surrogate distilled from the classifier's outputs.
    """
    if method == "baseline":
        return run_stages(prep, prep.classifier, (prep.train_images,),
                          method_stages(method, prep, prep.classifier, hooks), sink, hooks)
    if method == "decrop":
        samples = samples_for(prep, prep.classifier, classifier_key(prep.cfg), log)
        return run_stages(prep, prep.classifier, (prep.train_images, *samples.as_images()),
                          method_stages(method, prep, prep.classifier, hooks), sink, hooks)
    if method == "decrop_blackbox":
        surrogate, samples = distilled_surrogate(prep, log)
        return run_stages(prep, surrogate, (prep.train_images, *samples.as_images()),
                          method_stages(method, prep, surrogate, hooks), sink, hooks)
    raise ValueError(f"unknown method {method!r}")


def distilled_surrogate(prep: Prepared, log: Log = print) -> tuple[nn.Module, GeneratedSamples]:
    """The black-box setting's surrogate (distilled from the classifier's outputs on the subset, then on the
    subset plus the samples generated through it) and those samples."""
    cfg = prep.cfg
    blackbox = BlackBox(prep.classifier)
    torch.manual_seed(cfg.seed)
    surrogate = build_classifier(prep.info, cfg.blackbox.arch).to(prep.device)
    common = dict(image_size=prep.info.image_size, seed=cfg.seed, log=log)
    distill_surrogate(blackbox, surrogate, prep.train_images, cfg.blackbox, **common)
    surrogate_key = config_hash(classifier_key(cfg), "surrogate", cfg.blackbox, cfg.seed)
    samples = samples_for(prep, surrogate, surrogate_key, log)
    # Second round: the generated samples lie near the boundary, where the surrogate must match best.
    distill_surrogate(blackbox, surrogate, torch.cat([prep.train_images, *samples.as_images()]),
                      cfg.blackbox, **common)
    return surrogate, samples


def smoothed_model(classifier: nn.Module, denoiser: nn.Module | None, fold_bn: bool = False) -> nn.Module:
    """The base model that randomized smoothing wraps: f, or f(D(.)) (Salman et al.'s composition).

    Converted to channels_last in place: convolutions run faster in that layout on CPUs and GPUs (measured
    1.2x on top of the allocator setting), and the weights' values are unchanged. With `fold_bn`, a copy with
    BatchNorm folded into the convs (`decrop.models.fold_batchnorm`)."""
    model = classifier if denoiser is None else nn.Sequential(denoiser, classifier)
    model = model.to(memory_format=torch.channels_last).eval()
    return fold_batchnorm(model) if fold_bn else model


def certify_model(model: nn.Module, prep: Prepared, label: str, indices: np.ndarray | None = None,
                  log: Log = print) -> list[CertRow]:
    """Certify `model` under noise ``cfg.sigma`` on the test images at `indices` (default: the test subset)."""
    c = prep.cfg.certify
    indices = prep.test_indices if indices is None else indices
    progress = Progress(f"certify [{label}]", len(indices))
    return certify_indices(model, prep.test_set, [int(i) for i in indices], num_classes=prep.info.num_classes,
                           sigma=prep.cfg.sigma, n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch_size,
                           seed=prep.cfg.seed, device=prep.device, mode=c.mode, memory_mb=c.memory_mb,
                           radii=c.radii, precision=c.precision,
                           progress=lambda done, total, row: progress.update(done))


def epochs_text(cfg: ExperimentConfig, method: str) -> str:
    """Epochs `method` trained, stage by stage ("15+5" for DE-CROP with stage 2); "" for no denoiser."""
    return "" if method == NO_DENOISER else "+".join(map(str, cfg.stage_epochs(method.removeprefix("test_"))))


def summarize(rows_by_method: dict[str, list[CertRow]], cfg: ExperimentConfig, clean_accuracy: float,
              epochs: dict[str, str] | None = None) -> pd.DataFrame:
    """Method x radius table of certified accuracy plus ACR and the epochs each method trained (`epochs_text`
    under `cfg`, unless `epochs` gives a label's own); the classifier's clean accuracy as a reference."""
    radii, epochs = cfg.certify.radii, epochs or {}
    records = [{"method": "classifier (clean, no noise)", **{f"r={r:.2f}": np.nan for r in radii},
                "ACR": np.nan, "epochs": "", "clean_acc": clean_accuracy}]
    for method, rows in rows_by_method.items():
        acc = certified_accuracy(rows, radii)
        records.append({"method": method, **{f"r={r:.2f}": acc[r] for r in radii},
                        "ACR": average_certified_radius(rows), "epochs": epochs.get(method, epochs_text(cfg, method)),
                        "clean_acc": np.nan})
    return pd.DataFrame.from_records(records).set_index("method")


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, log: Log = print) -> pd.DataFrame:
    """Train and certify every method of `cfg` on one subset; write everything to `out_dir`; return the table.

    Everything is written into a private folder beside `out_dir` that is renamed to `out_dir` only when the run
    has finished: a failed or interrupted run leaves no folder that looks finished, and an existing `out_dir`
    is never modified (FileExistsError before any compute)."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new --out (finished results are "
                              f"never overwritten)")
    started = time.perf_counter()
    prep = prepare(cfg, log)  # bad data or model files fail here, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (work / "config.yaml").write_text(to_yaml(cfg))
    save_indices(work / "train_indices.json", prep.train_indices, dataset=cfg.data.dataset,
                 percent=cfg.data.percent, seed=cfg.seed, val_source=cfg.data.val_source)

    rows_by_method: dict[str, list[CertRow]] = {}
    report: dict[str, dict] = {}
    for method in (NO_DENOISER, *cfg.methods):
        denoiser = None
        if method != NO_DENOISER:
            total = sum(cfg.stage_epochs(method))
            log(f"[{method}] training {cfg.denoiser.arch} on {len(prep.train_labels)} images, "
                f"{epochs_text(cfg, method)} epochs")
            tic = time.perf_counter()
            denoiser, result = train_method(method, prep, PrintSink(f"[{method}] ", total=total), log)
            prep.timings[f"train_{method}"] = time.perf_counter() - tic
            save_checkpoint(work / f"denoiser_{method}.pt", denoiser,
                            {"kind": "denoiser", "method": method, "arch": cfg.denoiser.arch,
                             "key": config_hash(cfg.denoiser), "dataset": cfg.data.dataset, "sigma": cfg.sigma})
            report[method] = {"final": result.final, "epochs": list(cfg.stage_epochs(method))}
        tic = time.perf_counter()
        rows = certify_model(smoothed_model(prep.classifier, denoiser, cfg.certify.fold_bn), prep, method, log=log)
        prep.timings[f"certify_{method}"] = time.perf_counter() - tic
        write_rows(rows, work / f"certify_{method}.tsv")
        rows_by_method[method] = rows

    table = summarize(rows_by_method, cfg, prep.clean_accuracy)
    table.to_csv(work / "summary.csv")
    prep.timings["total"] = time.perf_counter() - started
    (work / "run.json").write_text(json.dumps({"clean_accuracy": prep.clean_accuracy, "budget": prep.budget,
                                               "timings": prep.timings, "methods": report}, indent=2))
    work.rename(out)
    return table


def format_table(table: pd.DataFrame) -> str:
    """The table as text, percentages with one decimal, blanks for what does not apply."""
    shown = table.copy()
    for col in shown.columns:
        if col == "epochs":
            continue
        scale = 1 if col == "ACR" else 100
        shown[col] = [("" if pd.isna(v) else f"{v * scale:.1f}" if scale == 100 else f"{v:.3f}")
                      for v in table[col]]
    return shown.rename(columns={"clean_acc": "clean %"}).to_string()
