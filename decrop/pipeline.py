"""One experiment end to end, top to bottom: prepare -> train each method -> certify -> table.

`run_experiment` is what ``python -m decrop run`` calls, and reads as the run does: `decrop.prepare.prepare` (the
data, the frozen classifier, the image sets and the data budget), for every method `decrop.stages.train_method`
(its training stages, resumable) and `decrop.models.smoothed_model` (the model smoothing certifies), then
`certify_model` and the table (`summarize`). `tuning/` runs the same phases in Ray workers and tasks. Everything a
run writes goes into its output folder: the resolved config, the training indices, one certification file per
method (``certify_<method>.tsv``, Cohen's columns), the denoiser weights, ``summary.csv`` and ``run.json`` (with
the run's data budget).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .certify import certify_indices
from .checkpoint import save_checkpoint
from .config import NO_DENOISER, ExperimentConfig, config_hash, to_yaml
from .data import save_indices
from .metrics import PrintSink
from .models import smoothed_model
from .prepare import Log, Prepared, prepare
from .rows import CertRow, average_certified_radius, certified_accuracy, write_rows
from .runtime import Progress
from .stages import train_method


def certify_model(model: nn.Module, prep: Prepared, label: str, indices: np.ndarray | None = None,
                  log: Log = print) -> list[CertRow]:
    """Certify `model` under noise ``cfg.sigma`` on the test images at `indices` (default: the test subset)."""
    indices = prep.test_indices if indices is None else indices
    progress = Progress(f"certify [{label}]", len(indices))
    return certify_indices(model, prep.test_set, [int(i) for i in indices], prep.cfg.certify,
                           num_classes=prep.info.num_classes, sigma=prep.cfg.sigma, seed=prep.cfg.seed,
                           device=prep.device, progress=lambda done, total, row: progress.update(done))


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
