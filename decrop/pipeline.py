"""One experiment end to end: classifier -> limited subset -> denoisers -> certification -> table.

`run_experiment` is what ``python -m decrop run`` calls. Each phase is also a function of its own
(`prepare`, `train_method`, `certify_model`) so `tuning/` can run the same steps in Ray workers and tasks.
Everything a run writes goes into its output folder: the resolved config, the subset indices, one
certification file per method (``certify_<method>.tsv``, Cohen's columns), the denoiser weights,
``summary.csv`` and ``run.json``.
"""

from __future__ import annotations

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
from .certify import (CertRow, average_certified_radius, certified_accuracy, certify_indices, write_rows)
from .checkpoint import save_checkpoint
from .classifier import accuracy, build_classifier, classifier_key, load_or_train_classifier
from .config import DenoiserConfig, ExperimentConfig, config_hash, expand_path, to_yaml
from .data import (AugmentedTensorDataset, DatasetInfo, as_tensors, augmentation_policy, dataset_info,
                   load_dataset, load_indices, save_indices, stratified_subset, test_indices,
                   validation_indices)
from .metrics import MetricSink, PrintSink
from .models import DomainDiscriminator, create_model, fold_batchnorm
from .objectives import DecropObjective, baseline_objective
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


def prepare(cfg: ExperimentConfig, log: Log = print) -> Prepared:
    """Load the data, get the classifier (trained and cached on first use) and draw the subsets."""
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
    clean = accuracy(classifier, test_images, test_labels)
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


def _loader(prep: Prepared, images: tuple[Tensor, ...]) -> DataLoader:
    """Shuffled batches of aligned image tuples; one spatial augmentation per sample applied to all of them."""
    dataset = AugmentedTensorDataset(images, prep.subset_labels,
                                     augmentation_policy(prep.cfg.data.augment, prep.info.image_size))
    return DataLoader(dataset, batch_size=prep.cfg.train.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(prep.cfg.seed))


def samples_for(prep: Prepared, model: nn.Module, model_key: str, log: Log = print) -> GeneratedSamples:
    """Boundary + interpolated samples of the subset through `model`, cached per model, subset and setting."""
    cfg = prep.cfg
    key = config_hash(model_key, prep.subset_indices.tolist(), sample_settings(cfg.decrop), cfg.seed)
    path = expand_path(cfg.cache_dir) / "samples" / f"{key}.pt"
    return load_or_generate_samples(path, model, prep.subset_images, prep.subset_labels, cfg.decrop,
                                    seed=cfg.seed, key=key, log=log)


def train_decrop(prep: Prepared, classifier: nn.Module, samples: GeneratedSamples,
                 sink: MetricSink | None = None) -> tuple[nn.Module, TrainResult]:
    """DE-CROP's two stages in one budget: stage 1 (L_lc + L_cs + L_mmd) for ``train.epochs - stage2_epochs``
    epochs, then stage 2 (adds the domain discriminator) continues the same denoiser and optimiser schedule.
    `classifier` carries the gradients (the real classifier, or the black-box setting's surrogate)."""
    cfg = prep.cfg
    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device)
    loader = _loader(prep, (prep.subset_images, *samples.as_images()))
    schedule = AdamThenSGD(denoiser.parameters(), cfg.train)
    stage1_end = cfg.train.epochs - cfg.decrop.stage2_epochs
    common = dict(val_images=prep.val_images, sigma=cfg.sigma, seed=cfg.seed, sink=sink, schedule=schedule)
    result = train_denoiser(denoiser, classifier, loader, DecropObjective(cfg.sigma, cfg.decrop),
                            dataclasses.replace(cfg.train, epochs=stage1_end), **common)
    if cfg.decrop.stage2_epochs:
        discriminator = DomainDiscriminator(classifier.feature_dim).to(prep.device)
        stage2 = train_denoiser(denoiser, classifier, loader,
                                DecropObjective(cfg.sigma, cfg.decrop, discriminator), cfg.train,
                                start_epoch=stage1_end, **common)
        result.history += stage2.history
    return denoiser, result


def train_method(method: str, prep: Prepared, sink: MetricSink | None = None, log: Log = print
                 ) -> tuple[nn.Module, TrainResult]:
    """Train the denoiser of `method` on the limited subset; returns it in eval mode with its history.

    ``baseline``: Salman et al. (L_lc). ``decrop``: white-box DE-CROP through the classifier.
    ``decrop_blackbox``: DE-CROP through a surrogate distilled from the classifier's outputs.
    """
    cfg = prep.cfg
    if method == "baseline":
        torch.manual_seed(cfg.seed)
        denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device)
        result = train_denoiser(denoiser, prep.classifier, _loader(prep, (prep.subset_images,)),
                                baseline_objective(cfg.train.objective, cfg.sigma), cfg.train,
                                val_images=prep.val_images, sigma=cfg.sigma, seed=cfg.seed, sink=sink)
        return denoiser, result
    if method == "decrop":
        samples = samples_for(prep, prep.classifier, classifier_key(cfg), log)
        return train_decrop(prep, prep.classifier, samples, sink)
    if method == "decrop_blackbox":
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
        return train_decrop(prep, surrogate, samples, sink)
    raise ValueError(f"unknown method {method!r}")


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
                           seed=prep.cfg.seed, device=prep.device, mode=c.mode, radii=c.radii,
                           precision=c.precision,
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
