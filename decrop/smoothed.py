"""The model a user takes home: one ``torch.export`` program computing ``classifier(denoiser(x))`` for images
(B, C, H, W) in [0, 1] with a dynamic batch, the noise level sigma and the training settings in its metadata;
and Cohen's PREDICT and CERTIFY through it on a folder of new images.

`export_smoothed` writes the program (``torch.export.save`` with ``extra_files={"decrop.json": ...}``), from a
``python -m decrop run`` folder or a sweep trial's denoiser (`run_sources`, `trial_sources`, `export_run`).
`load_smoothed` reads it back through `decrop.archive.load_export` (which refuses an archive with a member that
would run code while torch loads it) and checks its metadata (`check_metadata`): a program without sigma is
refused, as a certificate is only valid for the noise level the denoiser was trained and the radius is computed
with, and so is metadata of the wrong types or ranges, or disagreeing with the config stored in it or with the
program's own input and output shapes. `predict_folder` and `certify_folder` use the certification engine
(`Smooth`, `certify_indices`) as the runs do.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .certify import CertRow, Smooth, certify_indices
from .checkpoint import load_checkpoint
from .classifier import load_classifier
from .config import CertifyConfig, ExperimentConfig, expand_path, load_config, to_flat
from .data import dataset_info
from .folders import folder_info, read_images, scan_class_folders, scan_images
from .archive import ArchiveRefused, load_export
from .errors import ConfigError, SmoothedModelError
from .models import build_denoiser
from .user_model import FrozenProgram, detect_format, exportable, file_sha256

METADATA_FILE = "decrop.json"
FORMAT = "decrop-smoothed-model/1"
UNLABELLED = -1  # label (and correct) of an image that came without a class folder
Log = Callable[[str], None]


@dataclass(frozen=True)
class SmoothedModel:
    """A loaded smoothed model: `module` maps images (B, C, H, W) in [0, 1] to logits (B, num_classes)."""

    module: nn.Module
    sigma: float
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    meta: dict


def export_smoothed(classifier: nn.Module, denoiser: nn.Module, input_shape: Sequence[int], path: str | Path,
                    metadata: dict) -> Path:
    """Write ``classifier(denoiser(x))`` (both in eval mode, on the CPU) as one ``torch.export`` program with a
    dynamic batch to `path`, `metadata` (JSON-able, must hold ``sigma``) beside it in the archive. The program
    is checked against the eager composition on batches of 3 and 1 before it is written."""
    model = nn.Sequential(denoiser.cpu().eval(), exportable(classifier.cpu().eval(), torch.rand(2, *input_shape)))
    example = torch.rand(2, *input_shape)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with torch.no_grad():
        for batch in (torch.rand(3, *input_shape), torch.rand(1, *input_shape)):
            gap = (program.module()(batch) - model(batch)).abs().max().item()
            if not gap <= 1e-4 * max(1.0, model(batch).abs().max().item()):
                raise SmoothedModelError(f"the exported program differs from the model by {gap:.3g} on a batch of "
                                         f"{len(batch)}; please report this with your classifier's source")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps({"format": FORMAT, **metadata})})
    return path


def run_sources(run_dir: str | Path, method: str = "decrop") -> tuple[Path, Path]:
    """(config, denoiser weights) of a ``python -m decrop run`` output folder for `method`."""
    run_dir = Path(run_dir)
    config, weights = run_dir / "config.yaml", run_dir / f"denoiser_{method}.pt"
    if not config.is_file():
        raise SmoothedModelError(f"{run_dir} is not a `python -m decrop run` output folder (no config.yaml)")
    if not weights.is_file():
        found = sorted(p.stem.removeprefix("denoiser_") for p in run_dir.glob("denoiser_*.pt"))
        raise SmoothedModelError(f"{run_dir} has no denoiser for method {method!r}; it has: {found or 'none'} "
                                 f"(choose one with --method)")
    return config, weights


def trial_sources(storage: str | Path, trial_id: str, config: str | Path | None = None) -> tuple[Path, Path]:
    """(config, denoiser weights) of a sweep trial: ``<storage>/denoisers/<trial_id>.pt`` (storage = the sweep's
    ``--storage``/<study> folder) and its config, ``<trial_id>.yaml`` beside it unless `config` is given."""
    weights = Path(storage) / "denoisers" / f"{trial_id}.pt"
    if not weights.is_file():
        found = sorted(p.stem for p in weights.parent.glob("*.pt"))[:10]
        raise SmoothedModelError(f"{weights} does not exist; trials with a denoiser there: {found or 'none'} "
                                 f"(--storage is the study's folder, e.g. ~/decrop-runs/quick-study)")
    config = Path(config) if config else weights.with_suffix(".yaml")
    if not config.is_file():
        raise SmoothedModelError(f"no config {config} for trial {trial_id}: pass --config with the trial's "
                                 f"config.yaml (an artifact of the trial's MLflow run)")
    return config, weights


def _run_info(cfg: ExperimentConfig):
    if cfg.data.dataset == "folder":
        return folder_info(expand_path(cfg.data.root), cfg.data.classes)
    return dataset_info(cfg.data.dataset)


def export_run(config_path: Path, weights: Path, out: str | Path, log: Log = print) -> Path:
    """Export the smoothed model of a run's (or trial's) config and denoiser to `out` (`export_smoothed`), with
    sigma, the classes, the method, both files' sha256 and the whole flat config as metadata."""
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        raise SmoothedModelError(f"{config_path}: {err}") from None
    info = _run_info(cfg)
    shape = (info.channels, info.image_size, info.image_size)
    classifier, classifier_sha = load_classifier(cfg, info, torch.rand(2, *shape), torch.device("cpu"), log=log)
    denoiser = build_denoiser(cfg.denoiser, info.channels)
    meta = load_checkpoint(weights, denoiser, {"kind": "denoiser"})
    if meta.get("sigma") != cfg.sigma:
        raise SmoothedModelError(f"{weights} was trained for sigma={meta.get('sigma')} but {config_path} says "
                                 f"sigma={cfg.sigma}: pair the denoiser with its own config")
    method = meta.get("method", "decrop")
    metadata = {"sigma": cfg.sigma, "num_classes": info.num_classes, "classes": list(info.classes),
                "input_shape": list(shape), "method": method, "epochs": list(cfg.stage_epochs(method)),
                "dataset": cfg.data.dataset, "classifier_sha256": classifier_sha,
                "denoiser_sha256": file_sha256(weights), "config": to_flat(cfg)}
    path = export_smoothed(classifier, denoiser, shape, out, metadata)
    log(f"export: {path} = classifier({method} denoiser(x)), sigma {cfg.sigma}, input (batch, "
        f"{', '.join(map(str, shape))}), {len(info.classes)} classes")
    return path


def load_smoothed(path: str | Path, device: torch.device | str = "cpu") -> SmoothedModel:
    """A smoothed model written by `export_smoothed`, on `device`; SmoothedModelError for a file that is not a
    ``torch.export`` program, an archive with a member that would run code while loading (`load_export`), or
    metadata without sigma, malformed or disagreeing with itself or the program (`check_metadata`)."""
    path, extra = Path(path), {METADATA_FILE: ""}
    if not path.is_file():
        raise SmoothedModelError(f"--model {path} does not exist")
    try:
        if detect_format(path) != "export":  # torch.export.load would first log a traceback of its own
            raise ValueError("no torch.export archive inside")
        program = load_export(path, extra_files=extra)
    except ArchiveRefused as err:
        raise SmoothedModelError(f"--model {path} is refused: {err}; decrop never loads a file that would run code "
                                 f"while loading (write smoothed models with `python -m decrop export`)") from None
    except Exception as err:
        raise SmoothedModelError(f"--model {path} is not a torch.export program ({type(err).__name__}): write it "
                                 f"with `python -m decrop export --run DIR --out {path.name}`") from None
    try:
        meta = json.loads(extra[METADATA_FILE] or "{}")
    except (json.JSONDecodeError, RecursionError):
        meta = {}
    if not isinstance(meta, dict) or "sigma" not in meta:
        raise SmoothedModelError(f"--model {path} carries no sigma in its metadata ({METADATA_FILE}): a certificate "
                                 f"is only valid for the noise level the denoiser was trained for; export the model "
                                 f"with `python -m decrop export --run DIR --out {path.name}`, which records it")
    check_metadata(meta, f"--model {path}", _program_shapes(program))
    device = torch.device(device)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass
        program = move_to_device_pass(program, device)
    return SmoothedModel(FrozenProgram(program.module()), float(meta["sigma"]), tuple(meta["classes"]),
                         tuple(meta["input_shape"]), meta)


REQUIRED = ("format", "sigma", "classes", "input_shape", "config")  # what `export_run` has always written
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_ints(value: object, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _program_shapes(program: torch.export.ExportedProgram) -> tuple[tuple | None, int | None]:
    """((C, H, W) of the program's image input, None where a dimension is dynamic; its number of logits), each
    None when the graph does not say."""
    try:
        nodes = {node.name: node for node in program.graph.nodes}
        signature = program.graph_signature
        image = nodes[signature.user_inputs[0]].meta["val"].shape
        logits = nodes[signature.user_outputs[0]].meta["val"].shape
        shape = tuple(s if isinstance(s, int) else None for s in image[1:])
        return shape, (logits[-1] if isinstance(logits[-1], int) else None)
    except Exception:
        return None, None


def check_metadata(meta: dict, where: str, shapes: tuple[tuple | None, int | None] = (None, None)) -> None:
    """SmoothedModelError, naming the field (and both values where two disagree), unless `meta` (the smoothed
    model's ``decrop.json``) has the keys `export_run` writes with the right types and ranges, and agrees with the
    flat config stored in it (sigma, dataset, classes) and with `shapes` (`_program_shapes` of the program)."""
    fix = "re-export the model with `python -m decrop export --run DIR --out FILE`"

    def refuse(problem: str) -> SmoothedModelError:
        return SmoothedModelError(f"{where}: its metadata ({METADATA_FILE}) {problem}; {fix}")

    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise refuse(f"has no {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise refuse(f"has format={meta['format']!r}, not {FORMAT!r} (a file of another program or version)")
    sigma = meta["sigma"]
    if not _number(sigma) or not math.isfinite(sigma) or sigma <= 0:
        raise refuse(f"has sigma={sigma!r}: the noise level must be a positive finite number")
    classes = meta["classes"]
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c and c.isprintable() for c in classes)):
        raise refuse(f"has classes={classes!r:.120}: they must be a non-empty list of class names (strings)")
    if len(set(classes)) != len(classes):
        raise refuse(f"names a class twice in classes={classes!r:.120}")
    if not _positive_ints(meta["input_shape"], 3):
        raise refuse(f"has input_shape={meta['input_shape']!r:.80}: it must be [channels, height, width], "
                     f"three positive integers")
    if not isinstance(meta["config"], dict):
        raise refuse(f"has config of type {type(meta['config']).__name__}: it must be the run's flat config")
    checks = {"num_classes": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "method": lambda v: isinstance(v, str) and bool(v), "dataset": lambda v: isinstance(v, str) and bool(v),
              "epochs": lambda v: isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool)
                                                               and e >= 0 for e in v),
              "classifier_sha256": lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)),
              "denoiser_sha256": lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v))}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise refuse(f"has {key}={meta[key]!r:.80}, not a valid value")

    def disagree(key: str, value: object, other: str) -> SmoothedModelError:
        return refuse(f"says {key}={value!r:.120} but {other:.160}: the file was edited or is corrupt")

    config = meta["config"]
    if "sigma" not in config:
        raise refuse("has a config without sigma, so the noise level cannot be checked")
    if config["sigma"] != sigma:
        raise disagree("sigma", sigma, f"the config stored with it says sigma={config['sigma']!r}")
    if "dataset" in meta and "data.dataset" in config and config["data.dataset"] != meta["dataset"]:
        raise disagree("dataset", meta["dataset"], f"the config stored with it says "
                                                   f"data.dataset={config['data.dataset']!r}")
    if isinstance(config.get("data.classes"), list) and config["data.classes"] and config["data.classes"] != classes:
        raise disagree("classes", classes, f"the config stored with it says data.classes={config['data.classes']!r}")
    if "num_classes" in meta and meta["num_classes"] != len(classes):
        raise disagree("num_classes", meta["num_classes"], f"it lists {len(classes)} classes")
    image, logits = shapes
    if image is not None and any(s is not None and s != m for s, m in zip(image, meta["input_shape"])):
        raise disagree("input_shape", meta["input_shape"], f"the program takes images of shape {list(image)}")
    if logits is not None and logits != len(classes):
        raise disagree("classes", classes, f"the program outputs {logits} logits")


def read_new_images(folder: str | Path, model: SmoothedModel) -> tuple[list[Path], Tensor, Tensor]:
    """(files, images (N, C, H, W) in [0, 1], labels (N,)) of a folder of images, or of class sub-folders named
    as the model's classes or by their indices, as a training folder may be (labels the class indices;
    UNLABELLED without sub-folders). Every image must have the model's input shape (FolderDataError naming the
    file otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmoothedModelError(f"--images {folder} is not a folder")
    if any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        files, labels, _ = scan_class_folders(folder, model.classes, listed_in="the model's classes")
    else:
        files = scan_images(folder)
        labels = torch.full((len(files),), UNLABELLED, dtype=torch.int64)
    if not files:
        raise SmoothedModelError(f"--images {folder} holds no PNG or JPEG image")
    return files, read_images(files, model.input_shape), labels


def _unlabelled(row: CertRow) -> CertRow:
    return replace(row, correct=UNLABELLED) if row.label == UNLABELLED else row


def certify_folder(model: SmoothedModel, folder: str | Path, cfg: CertifyConfig, *, seed: int,
                   device: torch.device) -> tuple[list[Path], list[CertRow]]:
    """Cohen's CERTIFY of every image of `folder` (`read_new_images`) under the model's sigma, as the section
    `cfg` says (n0, n, alpha, batch size, ...), through the engine's `certify_indices` (image i's noise seeded by
    (seed, i)). Rows of unlabelled images have label = correct = UNLABELLED."""
    files, images, labels = read_new_images(folder, model)
    rows = certify_indices(model.module, list(zip(images, labels.tolist())), range(len(files)), cfg,
                           num_classes=len(model.classes), sigma=model.sigma, seed=seed, device=device)
    return files, [_unlabelled(row) for row in rows]


def predict_folder(model: SmoothedModel, folder: str | Path, *, n: int, alpha: float, batch_size: int, seed: int,
                   device: torch.device) -> tuple[list[Path], list[CertRow]]:
    """Cohen's PREDICT (the smoothed class, or ABSTAIN = -1 when a binomial test of the top two counts cannot
    tell them apart at level alpha) of every image of `folder`. Rows as `certify_folder`'s, radius 0."""
    files, images, labels = read_new_images(folder, model)
    smooth = Smooth(model.module, len(model.classes), model.sigma)
    rows = []
    for idx, (image, label) in enumerate(zip(images, labels.tolist())):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + idx)
        tic = time.perf_counter()
        predicted = smooth.predict(image.to(device), n, alpha, batch_size, generator)
        rows.append(_unlabelled(CertRow(idx, label, predicted, 0.0, int(predicted == label),
                                        time.perf_counter() - tic, n)))
    return files, rows


def format_rows(files: Sequence[Path], rows: Sequence[CertRow], root: str | Path, classes: Sequence[str],
                radius: bool = True) -> str:
    """Tab-separated rows: Cohen's columns (``idx label predict [radius] correct time``), ``samples``, the
    predicted class's name (``abstain`` for -1) and the file (relative to `root`). The radius at full precision,
    as `decrop.rows` writes it: a rounded radius could read as a certificate it is not."""
    head = ["idx", "label", "predict", *(["radius"] if radius else []), "correct", "time", "samples", "class",
            "file"]
    lines = ["\t".join(head)]
    for path, r in zip(files, rows):
        name = classes[r.predict] if r.predict >= 0 else "abstain"
        cells = [r.idx, r.label, r.predict, *([repr(float(r.radius))] if radius else []), r.correct, f"{r.time:.4f}",
                 r.samples, name, Path(path).relative_to(root).as_posix()]
        lines.append("\t".join(map(str, cells)))
    return "\n".join(lines) + "\n"
