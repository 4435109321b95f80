"""One experiment end to end: classifier -> limited subset -> denoisers -> certification -> table.

`run_experiment` is what ``python -m decrop run`` calls. Each phase is also a function of its own
(`prepare`, `train_method`, `certify_model`) so `tuning/` can run the same steps in Ray workers and tasks.
Everything a run writes goes into its output folder: the resolved config, the subset indices, one
certification file per method (``certify_<method>.tsv``, Cohen's columns), the denoiser weights,
``summary.csv`` and ``run.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
from .checkpoint import save_checkpoint
from .classifier import accuracy, build_classifier, classifier_key, load_or_train_classifier
from .config import DenoiserConfig, ExperimentConfig, config_hash, expand_path, to_yaml
from .data import (AugmentedTensorDataset, DatasetInfo, as_tensors, augmentation_policy, dataset_info,
                   load_dataset, load_indices, save_indices, stratified_subset, test_indices,
                   validation_indices)
from .metrics import MetricSink, PrintSink
from .models import DomainDiscriminator, create_model, fold_batchnorm
from .objectives import DecropObjective, Objective, baseline_objective
from .rows import CertRow, average_certified_radius, certified_accuracy, write_rows
from .runtime import Progress, resolve_device, seed_everything, tune_allocator
from .samples import GeneratedSamples, load_or_generate_samples, sample_settings
from .training import AdamThenSGD, TrainResult, train_denoiser

Log = Callable[[str], None]
NO_DENOISER = "none"  # the smoothed classifier alone, the reference every table shows


@dataclass
class Prepared:
    """What every method of one experiment shares: the frozen classifier and the three disjoint image sets."""

    cfg: ExperimentConfig
    device: torch.device
    info: DatasetInfo
    classifier: nn.Module
    subset_images: Tensor  # (k, C, H, W) in [0, 1], CPU: the limited training data
    subset_labels: Tensor
    subset_indices: np.ndarray  # into the training split
    val_images: Tensor  # (V, C, H, W) on `device`: model selection and the per-epoch metric
    val_labels: Tensor
    test_set: TensorDataset  # the test split; certified at `test_indices` for reporting only
    test_indices: np.ndarray
    clean_accuracy: float  # of the classifier on the whole test split
    timings: dict[str, float] = field(default_factory=dict)


def subset_for(cfg: ExperimentConfig, labels: Tensor) -> np.ndarray:
    """The limited subset for (dataset, percent, seed), persisted in the cache so that every method and every
    later run of this setting trains on exactly the same images."""
    meta = {"dataset": cfg.data.dataset, "percent": cfg.data.percent, "seed": cfg.seed}
    path = expand_path(cfg.cache_dir) / "subsets" / f"{config_hash(meta)}.json"
    if path.exists():
        return load_indices(path, **meta)
    indices = stratified_subset(labels.numpy(), cfg.data.percent, cfg.seed)
    save_indices(path, indices, **meta)
    return indices


def prepare(cfg: ExperimentConfig, log: Log = print, evaluate: bool = True) -> Prepared:
    """Load the data, get the classifier (trained and cached on first use) and draw the subsets.

    `evaluate` measures the classifier's clean test accuracy (NaN without it: workers that only train or
    certify skip it)."""
    seed_everything(cfg.seed)
    tune_allocator()
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.data.dataset)
    root = expand_path(cfg.data.root)
    tic = time.perf_counter()
    train_images, train_labels = as_tensors(load_dataset(cfg.data.dataset, root, train=True,
                                                         download=cfg.data.download))
    test_images, test_labels = as_tensors(load_dataset(cfg.data.dataset, root, train=False,
                                                       download=cfg.data.download))
    timings = {"data": time.perf_counter() - tic}

    tic = time.perf_counter()
    classifier = load_or_train_classifier(
        cfg, train_images, train_labels, device, log=log,
        sink_factory=lambda epochs: PrintSink("classifier: ", total=epochs))
    timings["classifier"] = time.perf_counter() - tic
    clean = accuracy(classifier, test_images, test_labels) if evaluate else float("nan")
    if evaluate:
        log(f"classifier: clean test accuracy {clean:.4f}")

    subset = subset_for(cfg, train_labels)
    val = validation_indices(train_labels.numpy(), subset, cfg.data.val_size, cfg.seed)
    tests = test_indices(len(test_labels), cfg.data.test_every)
    log(f"data: {len(subset)} training images ({cfg.data.percent}% of {len(train_labels)}, stratified, "
        f"seed {cfg.seed}), {len(val)} validation images, {len(tests)} certified test images")
    return Prepared(cfg=cfg, device=device, info=info, classifier=classifier,
                    subset_images=train_images[subset], subset_labels=train_labels[subset],
                    subset_indices=subset, val_images=train_images[val].to(device),
                    val_labels=train_labels[val], test_set=TensorDataset(test_images, test_labels),
                    test_indices=tests, clean_accuracy=clean, timings=timings)


def build_denoiser(cfg: DenoiserConfig, in_channels: int) -> nn.Module:
    """A fresh denoiser from its config (identity at initialisation)."""
    if cfg.arch == "dncnn":
        return create_model("dncnn", in_channels=in_channels, depth=cfg.depth, width=cfg.width)
    return create_model("memnet", in_channels=in_channels, width=cfg.width,
                        num_memblocks=cfg.num_memblocks, num_resblocks=cfg.num_resblocks)


@dataclass
class TrainHooks:
    """How `tuning/` runs the same training under Ray Train; the defaults are a plain single-process run.

    `wrap` wraps every trained module (denoiser, discriminator), e.g. in DistributedDataParallel; `loader`
    adapts the DataLoader (a distributed sampler); `batch_size` is the per-process batch (default
    ``train.batch_size``); `resume` is a state dict produced by `on_epoch_end`'s ``state()``;
    ``on_epoch_end(epoch, metrics, state)`` runs after every epoch, ``state()`` returning what a resumed run
    needs (plain tensors and numbers, for ``torch.save``).
    """

    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    loader: Callable[[DataLoader], DataLoader] = lambda loader: loader
    batch_size: int | None = None
    resume: dict | None = None
    on_epoch_end: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None


Stage = tuple[int, Callable[[], Objective]]  # (epoch at which the stage ends, objective factory)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _restore_rng(rng: dict, loader: DataLoader) -> None:
    torch.set_rng_state(rng["torch"])
    if loader.generator is not None and rng["loader"] is not None:
        loader.generator.set_state(rng["loader"])


def run_stages(prep: Prepared, classifier: nn.Module, images: tuple[Tensor, ...], stages: list[Stage],
               sink: MetricSink | None = None, hooks: TrainHooks | None = None) -> tuple[nn.Module, TrainResult]:
    """Train a fresh denoiser on `images` (aligned tuples, one augmentation per sample) through consecutive
    stages that share the denoiser and the optimiser schedule; returns the (unwrapped) denoiser."""
    cfg, hooks = prep.cfg, hooks or TrainHooks()
    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device)
    dataset = AugmentedTensorDataset(images, prep.subset_labels,
                                     augmentation_policy(cfg.data.augment, prep.info.image_size))
    loader = hooks.loader(DataLoader(dataset, batch_size=hooks.batch_size or cfg.train.batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(cfg.seed)))
    start = 0
    if hooks.resume is not None:
        denoiser.load_state_dict(hooks.resume["denoiser"])
        start = hooks.resume["epoch"]
    model = hooks.wrap(denoiser)
    schedule = AdamThenSGD(model.parameters(), cfg.train)
    if hooks.resume is not None:
        schedule.load_state_dict(hooks.resume["schedule"], start)
    result, stage_start = TrainResult(), 0
    for end, make_objective in stages:
        if start < end:
            resuming = hooks.resume is not None and stage_start <= start  # the stage the run stopped in
            # The global RNG drives weight init, augmentation and noise, the loader's generator the shuffle.
            # Restoring both where the interrupted run saved them (before building a stage that begins at
            # the resume point; after rebuilding one that was under way) continues it exactly.
            if resuming and start == stage_start:
                _restore_rng(hooks.resume["rng"], loader)
            objective = make_objective()
            if resuming and start > stage_start:
                if hooks.resume.get("objective"):
                    objective.load_state_dict(hooks.resume["objective"])
                _restore_rng(hooks.resume["rng"], loader)

            def on_epoch_end(epoch, schedule, metrics, objective=objective):
                if hooks.on_epoch_end is not None:
                    # A deep copy: state dicts hold the live tensors, which the next epoch changes in place.
                    hooks.on_epoch_end(epoch, metrics, lambda: copy.deepcopy({
                        "epoch": epoch + 1, "denoiser": _unwrap(model).state_dict(),
                        "schedule": schedule.state_dict(),
                        "objective": objective.state_dict() if hasattr(objective, "state_dict") else None,
                        "rng": {"torch": torch.get_rng_state(),
                                "loader": loader.generator.get_state() if loader.generator is not None else None}}))

            part = train_denoiser(model, classifier, loader, objective, dataclasses.replace(cfg.train, epochs=end),
                                  val_images=prep.val_images, sigma=cfg.sigma, seed=cfg.seed, sink=sink,
                                  schedule=schedule, start_epoch=max(start, stage_start), stage_start=stage_start,
                                  on_epoch_end=on_epoch_end)
            result.history += part.history
        stage_start = end
    return denoiser.eval(), result


def samples_for(prep: Prepared, model: nn.Module, model_key: str, log: Log = print) -> GeneratedSamples:
    """Boundary + interpolated samples of the subset through `model`, cached per model, subset and setting."""
    cfg = prep.cfg
    key = config_hash(model_key, prep.subset_indices.tolist(), sample_settings(cfg.decrop), cfg.seed)
    path = expand_path(cfg.cache_dir) / "samples" / f"{key}.pt"
    return load_or_generate_samples(path, model, prep.subset_images, prep.subset_labels, cfg.decrop,
                                    seed=cfg.seed, key=key, log=log)


def decrop_stages(prep: Prepared, classifier: nn.Module, hooks: TrainHooks | None = None) -> list[Stage]:
    """DE-CROP's two stages in one budget: stage 1 (L_lc + L_cs + L_mmd) until ``train.epochs - stage2_epochs``,
    then stage 2 adds the domain discriminator (its own Adam) and continues the same denoiser and schedule."""
    cfg, wrap = prep.cfg, (hooks or TrainHooks()).wrap
    stage1_end = cfg.train.epochs - cfg.decrop.stage2_epochs
    stages: list[Stage] = [(stage1_end, lambda: DecropObjective(cfg.sigma, cfg.decrop))]
    if cfg.decrop.stage2_epochs:
        stages.append((cfg.train.epochs, lambda: DecropObjective(
            cfg.sigma, cfg.decrop, wrap(DomainDiscriminator(classifier.feature_dim).to(prep.device)))))
    return stages


def train_method(method: str, prep: Prepared, sink: MetricSink | None = None, log: Log = print,
                 hooks: TrainHooks | None = None) -> tuple[nn.Module, TrainResult]:
    """Train the denoiser of `method` on the limited subset; returns it in eval mode with its history.

    ``baseline``: Salman et al. (L_lc). ``decrop``: white-box DE-CROP through the classifier.
    ``decrop_blackbox``: DE-CROP through a surrogate distilled from the classifier's outputs.
    """
    cfg = prep.cfg
    if method == "baseline":
        stages = [(cfg.train.epochs, lambda: baseline_objective(cfg.train.objective, cfg.sigma))]
        return run_stages(prep, prep.classifier, (prep.subset_images,), stages, sink, hooks)
    if method == "decrop":
        samples = samples_for(prep, prep.classifier, classifier_key(cfg), log)
        return run_stages(prep, prep.classifier, (prep.subset_images, *samples.as_images()),
                          decrop_stages(prep, prep.classifier, hooks), sink, hooks)
    if method == "decrop_blackbox":
        surrogate, samples = distilled_surrogate(prep, log)
        return run_stages(prep, surrogate, (prep.subset_images, *samples.as_images()),
                          decrop_stages(prep, surrogate, hooks), sink, hooks)
    raise ValueError(f"unknown method {method!r}")


def distilled_surrogate(prep: Prepared, log: Log = print) -> tuple[nn.Module, GeneratedSamples]:
    """The black-box setting's surrogate (distilled from the classifier's outputs on the subset, then on the
    subset plus the samples generated through it) and those samples."""
    cfg = prep.cfg
    blackbox = BlackBox(prep.classifier)
    torch.manual_seed(cfg.seed)
    surrogate = build_classifier(cfg.data.dataset, cfg.blackbox.arch).to(prep.device)
    common = dict(image_size=prep.info.image_size, seed=cfg.seed, log=log)
    distill_surrogate(blackbox, surrogate, prep.subset_images, cfg.blackbox, **common)
    surrogate_key = config_hash(classifier_key(cfg), "surrogate", cfg.blackbox, cfg.seed)
    samples = samples_for(prep, surrogate, surrogate_key, log)
    # Second round: the generated samples lie near the boundary, where the surrogate must match best.
    distill_surrogate(blackbox, surrogate, torch.cat([prep.subset_images, *samples.as_images()]),
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


def summarize(rows_by_method: dict[str, list[CertRow]], radii: tuple[float, ...], clean_accuracy: float
              ) -> pd.DataFrame:
    """Method x radius table of certified accuracy plus ACR; the classifier's clean accuracy as a reference."""
    records = [{"method": "classifier (clean, no noise)", **{f"r={r:.2f}": np.nan for r in radii},
                "ACR": np.nan, "clean_acc": clean_accuracy}]
    for method, rows in rows_by_method.items():
        acc = certified_accuracy(rows, radii)
        records.append({"method": method, **{f"r={r:.2f}": acc[r] for r in radii},
                        "ACR": average_certified_radius(rows), "clean_acc": np.nan})
    return pd.DataFrame.from_records(records).set_index("method")


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, log: Log = print) -> pd.DataFrame:
    """Train and certify every method of `cfg` on one subset; write everything to `out_dir`; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    started = time.perf_counter()
    prep = prepare(cfg, log)
    save_indices(out / "subset_indices.json", prep.subset_indices, dataset=cfg.data.dataset,
                 percent=cfg.data.percent, seed=cfg.seed)

    rows_by_method: dict[str, list[CertRow]] = {}
    report: dict[str, dict] = {}
    for method in (NO_DENOISER, *cfg.methods):
        denoiser = None
        if method != NO_DENOISER:
            log(f"[{method}] training {cfg.denoiser.arch} on {len(prep.subset_labels)} images, "
                f"{cfg.train.epochs} epochs")
            tic = time.perf_counter()
            denoiser, result = train_method(method, prep, PrintSink(f"[{method}] ", total=cfg.train.epochs), log)
            prep.timings[f"train_{method}"] = time.perf_counter() - tic
            save_checkpoint(out / f"denoiser_{method}.pt", denoiser,
                            {"kind": "denoiser", "method": method, "arch": cfg.denoiser.arch,
                             "key": config_hash(cfg.denoiser), "dataset": cfg.data.dataset, "sigma": cfg.sigma})
            report[method] = {"final": result.final}
        tic = time.perf_counter()
        rows = certify_model(smoothed_model(prep.classifier, denoiser, cfg.certify.fold_bn), prep, method, log=log)
        prep.timings[f"certify_{method}"] = time.perf_counter() - tic
        write_rows(rows, out / f"certify_{method}.tsv")
        rows_by_method[method] = rows

    table = summarize(rows_by_method, cfg.certify.radii, prep.clean_accuracy)
    table.to_csv(out / "summary.csv")
    prep.timings["total"] = time.perf_counter() - started
    (out / "run.json").write_text(json.dumps({"clean_accuracy": prep.clean_accuracy, "timings": prep.timings,
                                              "methods": report}, indent=2))
    return table


def format_table(table: pd.DataFrame) -> str:
    """The table as text, percentages with one decimal, blanks for what does not apply."""
    shown = table.copy()
    for col in shown.columns:
        scale = 1 if col == "ACR" else 100
        shown[col] = [("" if pd.isna(v) else f"{v * scale:.1f}" if scale == 100 else f"{v:.3f}")
                      for v in table[col]]
    return shown.rename(columns={"clean_acc": "clean %"}).to_string()
