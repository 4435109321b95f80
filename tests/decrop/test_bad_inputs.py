"""A catalogue of bad inputs to every entry point: `python -m decrop run|config|export|predict|certify`,
`tuning/sweep.py`, `analysis/report.py` and the checkpoint loaders.

Each case must end with exit code 2 and one line ``error: ...`` that names the problem and the fix (no
traceback), before any compute (training, sample generation, certification and export are replaced by functions
that fail the test if called) and before Ray starts (the sweep's `connect` fails the test too, and Ray must not
be initialised afterwards); nothing in the case's folder may be created, changed or deleted (every file's bytes
and mtime, every folder's name). Run: ``pytest -q tests/decrop/test_bad_inputs.py`` (~1-2 min on 2 busy cores: the
data-loading cases read Fashion-MNIST; no Ray, no training).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import decrop.classifier
import decrop.pipeline
import decrop.stages
import decrop.smoothed
from analysis import report
from decrop import cli
from decrop.checkpoint import load_checkpoint, save_checkpoint
from decrop.classifier import build_classifier, classifier_key, classifier_path
from decrop.config import load_config, to_yaml
from decrop.errors import CheckpointError
from decrop.models import create_model
from tuning import sweep
from tuning.schema import default_tracking_uri
from tuning.tracking import StudyTracker

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "configs" / "quick.yaml")
FMNIST = Path(os.environ.get("DECROP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """One bad input: `argv` of `tool` (placeholders {tmp}: the case's folder, {data}: Fashion-MNIST, {cache}: a
    shared cache holding no classifier, {ckcache}: a cache holding one, {port}: a closed port), the `setup`
    that fills {tmp} first, and the words the one-line error must contain (the problem, then the fix)."""

    tool: str  # decrop | sweep | report
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    setup: str = ""
    env: dict = field(default_factory=dict)
    data: bool = False  # reads Fashion-MNIST
    offline: bool = False  # no name resolves (this machine may have internet)
    skip: str = ""  # why the case does not apply here


RUN = ("run", "--config", QUICK, "--set", "cache_dir={cache}", "--set", "data.root={data}", "--out", "{tmp}/out")
SWEEP = ("--storage", "{tmp}/st", "--set", "cache_dir={cache}", "--set", "data.root={data}")
NO_GPU = "this machine has a CUDA device" if CUDA else ""
FOLDER_RUN = ("run", "--config", str(REPO / "configs" / "folder.yaml"), "--set", "cache_dir={cache}", "--set",
              "data.root={tmp}/images", "--set", "classifier.path={tmp}/m.pt2", "--out", "{tmp}/out")


def config(*sets: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("config", "--config", QUICK, *extra, *[a for s in sets for a in ("--set", s)])


def run(*sets: str) -> tuple[str, ...]:
    return (*RUN, *[a for s in sets for a in ("--set", s)])


CASES: dict[str, Case] = {
    # ---- the config, through `config` (and `run`: the same checks, before any data is read)
    "config-unknown-key": Case("decrop", config("train.epoch=3"), ("unknown config key 'train.epoch'",
                                                                   "did you mean 'train.epochs'")),
    "config-out-of-range": Case("decrop", config("sigma=0"), ("'sigma' = 0", "out of range", "> 0")),
    "config-not-an-integer": Case("decrop", config("train.epochs=ten"), ("'train.epochs'", "must be an integer")),
    "config-unknown-choice": Case("decrop", config("data.dataset=mnist"), ("'data.dataset' = 'mnist'",
                                                                          "choose one of", "'fashion_mnist'")),
    "config-not-a-boolean": Case("decrop", config("data.download=2"), ("'data.download'", "true or false")),
    "config-not-finite": Case("decrop", config("sigma=.nan"), ("'sigma'", "finite number")),
    "config-override-without-value": Case("decrop", config("train.epochs"), ("'train.epochs'", "key=value")),
    "config-override-bad-yaml": Case("decrop", config("methods=[baseline"), ("cannot parse the value",)),
    "config-section-given-a-value": Case("decrop", config("train=5"), ("'train' must be a mapping",)),
    "config-value-given-a-key": Case("decrop", config("sigma.x=1"), ("'sigma.x'", "'sigma' is a value",)),
    "config-file-missing": Case("decrop", ("config", "--config", "{tmp}/nope.yaml"),
                                ("nope.yaml' does not exist", "configs/quick.yaml")),
    "config-file-invalid-yaml": Case("decrop", ("config", "--config", "{tmp}/bad.yaml"), ("not valid YAML",),
                                     setup="bad_yaml"),
    "config-file-not-a-mapping": Case("decrop", ("config", "--config", "{tmp}/list.yaml"), ("mapping of keys",),
                                      setup="list_yaml"),
    "config-seed-beyond-2^32-1": Case("decrop", run("seed=4294967296"), ("'seed' = 4294967296", "<= 4294967295")),
    "config-classifier-seed-beyond-2^32-1": Case("decrop", run("classifier.seed=4294967296"),
                                                 ("'classifier.seed' = 4294967296", "<= 4294967295")),
    "config-seed-negative": Case("decrop", run("seed=-1"), ("'seed' = -1", ">= 0")),
    "config-name-with-dotdot": Case("decrop", run("name=../../outside"), ("'name' = '../../outside'",
                                                                         "not a valid name", "letters, digits")),
    "config-name-with-slash": Case("decrop", ("run", "--config", QUICK, "--set", "name=a/b"),
                                   ("'name' = 'a/b'", "letters, digits")),
    "config-val-images-beyond-val-size": Case("decrop", run("certify.val_images=600"),
                                              ("'certify.val_images' = 600", "data.val_size = 500")),
    "config-method-twice": Case("decrop", run("methods=[baseline, baseline]"), ("lists a method twice",)),
    "config-path-without-source": Case("decrop", run("classifier.path={tmp}/m.pt2"),
                                       ("'classifier.path' is set", "set classifier.source")),
    "config-folder-without-classifier": Case("decrop", run("data.dataset=folder", "data.percent=100"),
                                             ("data.dataset=folder needs your pretrained classifier",
                                              "classifier.source")),
    "config-name-given-a-float": Case("decrop", config("name=1.10"), ("'name' must be a string", "put it in quotes")),
    "config-file-is-a-folder": Case("decrop", ("config", "--config", "{tmp}"), ("is a folder, not a YAML file",
                                                                              "configs/quick.yaml")),
    "config-file-duplicate-key": Case("decrop", ("config", "--config", "{tmp}/dup.yaml"),
                                      ("duplicate key 'epochs'", "first on line 2", "keep one", "line 4"),
                                      setup="dup_yaml"),
    "config-n0-beyond-n": Case("decrop", run("certify.n0=200", "certify.n=100"),
                               ("'certify.n0' = 200 exceeds certify.n = 100", "lower certify.n0")),
    # ---- run: profile, output folder, device, data
    "run-empty-config": Case("decrop", ("run", "--config", "{tmp}/empty.yaml", "--out", "{tmp}/out"),
                             ("empty.yaml' is empty (no keys)", "configs/quick.yaml"), setup="empty_yaml"),
    "run-without-config": Case("decrop", ("run", "--set", "train.epochs=3", "--out", "{tmp}/out"),
                               ("run needs --config", "configs/quick.yaml")),
    "run-out-exists": Case("decrop", RUN, ("--out", "already exists", "choose a new folder"), setup="out_exists"),
    "run-out-under-a-file": Case("decrop", (*RUN[:-1], "{tmp}/afile/out"), ("afile is a file, not a folder",),
                                 setup="afile"),
    "run-cuda-without-gpu": Case("decrop", run("device=cuda"), ("'device' = 'cuda'", "no CUDA device",
                                                                "use cpu or auto"), skip=NO_GPU),
    "run-dataset-missing": Case("decrop", run("data.root={tmp}/data"),
                                ("Fashion-MNIST not found", "dataset-fashion-mnist"),
                                env={"DECROP_FASHION_MNIST_DIR": "{tmp}/nothing"}),
    "run-download-offline-cifar10": Case("decrop", run("data.dataset=cifar10", "data.download=true",
                                                       "data.root={scratch}/cifar"),
                                         ("cifar10 could not be downloaded", "offline", "data.download=false"),
                                         offline=True),
    "run-download-offline-fashion-mnist": Case("decrop", run("data.download=true", "data.root={scratch}/fmnist"),
                                               ("fashion_mnist could not be downloaded", "dataset-fashion-mnist"),
                                               env={"DECROP_FASHION_MNIST_DIR": "{tmp}/nothing"}, offline=True),
    "run-val-size-beyond-the-pool": Case("decrop", run("data.val_size=70000", "certify.val_images=10"),
                                         ("'data.val_size' = 70000", "59400 images", "lower data.val_size"),
                                         data=True),
    "run-percent-below-one-image-per-class": Case("decrop", run("data.percent=0.001"),
                                                  ("'data.percent' = 0.001", "less than one image per class",
                                                   "data.percent >= 0.0167"), data=True),
    "run-holdout-empties-a-class": Case("decrop", run("data.val_source=holdout", "data.percent=0.2",
                                                      "data.val_size=120", "certify.val_images=10"),
                                        ("leaves a class without training images", "lower data.val_size"),
                                        data=True),
    "run-classifier-file-missing": Case("decrop", run("classifier.source=export", "classifier.path={tmp}/gone.pt2"),
                                        ("gone.pt2",), data=True),
    "run-classifier-not-a-model": Case("decrop", run("classifier.source=export", "classifier.path={tmp}/model.pt2"),
                                       ("model.pt2", "classifier.source=export"), setup="garbage_model", data=True),
    "run-folder-dataset-missing": Case("decrop", run("data.dataset=folder", "data.percent=100",
                                                     "data.root={tmp}/images", "classifier.source=export",
                                                     "classifier.path={tmp}/m.pt2"),
                                       ("images/train does not exist", "<class>")),
    "run-folder-odd-image-sorts-first": Case("decrop", FOLDER_RUN,
                                             ("train/a/0000.png has shape (C, H, W) = (1, 20, 20)",
                                              "5 of the 6 images are (1, 16, 16)", "convert/resize it"),
                                             setup="folder_odd_first"),
    "run-folder-image-beyond-the-limit": Case("decrop", FOLDER_RUN, ("train/b/0001.png declares 225000000 pixels",
                                                                     "(4096x4096)", "resize it"),
                                              setup="folder_bomb"),
    "run-folder-class-file-without-the-folder": Case("decrop", FOLDER_RUN,
                                                     ("train/Sandal is neither a class of", "classes.txt",
                                                      "name it by its class's index"), setup="folder_classes"),
    # ---- export, predict, certify
    "export-without-source": Case("decrop", ("export", "--out", "{tmp}/s.pt2"), ("exactly one of --run",)),
    "export-trial-without-storage": Case("decrop", ("export", "--trial", "t1", "--out", "{tmp}/s.pt2"),
                                         ("--trial needs --storage",)),
    "export-denoiser-without-config": Case("decrop", ("export", "--denoiser", "{tmp}/d.pt", "--out", "{tmp}/s.pt2"),
                                           ("--denoiser needs --config",)),
    "export-run-not-a-run": Case("decrop", ("export", "--run", "{tmp}", "--out", "{tmp}/s.pt2"),
                                 ("is not a `python -m decrop run` output folder", "no config.yaml")),
    "export-trial-missing": Case("decrop", ("export", "--trial", "t1", "--storage", "{tmp}", "--out", "{tmp}/s.pt2"),
                                 ("t1.pt does not exist",)),
    "export-trial-outside-storage": Case("decrop", ("export", "--trial", "../..", "--storage", "{tmp}", "--out",
                                                    "{tmp}/s.pt2"), ("--trial = '../..' is not a valid name",)),
    "export-out-exists": Case("decrop", ("export", "--run", "{tmp}", "--out", "{tmp}/s.pt2"),
                              ("--out", "s.pt2 already exists", "choose a new file"), setup="export_out_exists"),
    "export-denoiser-corrupt": Case("decrop", ("export", "--denoiser", "{tmp}/d.pt", "--config", "{tmp}/cfg.yaml",
                                               "--out", "{tmp}/s.pt2"),
                                    ("d.pt' is corrupt or not a decrop checkpoint",), setup="export_corrupt"),
    "export-denoiser-another-architecture": Case("decrop", ("export", "--denoiser", "{tmp}/d.pt", "--config",
                                                            "{tmp}/cfg.yaml", "--out", "{tmp}/s.pt2"),
                                                 ("does not fit the model DnCNN", "another architecture"),
                                                 setup="export_wrong_arch"),
    "export-classifier-not-cached": Case("decrop", ("export", "--denoiser", "{tmp}/d.pt", "--config",
                                                    "{tmp}/nocache.yaml", "--out", "{tmp}/s.pt2"),
                                         ("is not in the cache", "python -m decrop run"), setup="export_corrupt"),
    "certify-n-zero": Case("decrop", ("certify", "--model", "{tmp}/m.pt2", "--images", "{tmp}", "--n", "0"),
                           ("--n must be >= 1",)),
    "certify-n0-zero": Case("decrop", ("certify", "--model", "{tmp}/m.pt2", "--images", "{tmp}", "--n0", "0"),
                            ("--n0 must be >= 1",)),
    "certify-n0-beyond-n": Case("decrop", ("certify", "--model", "{tmp}/m.pt2", "--images", "{tmp}", "--n", "50",
                                           "--n0", "100"), ("--n0 100 exceeds --n 50", "lower --n0")),
    "certify-alpha-above-one": Case("decrop", ("certify", "--model", "{tmp}/m.pt2", "--images", "{tmp}",
                                               "--alpha", "1.5"), ("--alpha must be in (0, 1)",)),
    "predict-seed-negative": Case("decrop", ("predict", "--model", "{tmp}/m.pt2", "--images", "{tmp}",
                                             "--seed", "-1"), ("--seed must be in 0..4294967295",)),
    "predict-images-missing": Case("decrop", ("predict", "--model", "{tmp}/m.pt2", "--images", "{tmp}/none"),
                                   ("--images", "is not a folder")),
    "predict-model-missing": Case("decrop", ("predict", "--model", "{tmp}/m.pt2", "--images", "{tmp}"),
                                  ("--model", "m.pt2 does not exist")),
    "predict-model-not-a-program": Case("decrop", ("predict", "--model", "{tmp}/model.pt2", "--images", "{tmp}"),
                                        ("is not a torch.export program", "decrop export"), setup="garbage_model"),
    "certify-out-exists": Case("decrop", ("certify", "--model", "{tmp}/model.pt2", "--images", "{tmp}", "--out",
                                          "{tmp}/afile"), ("--out", "afile already exists"), setup="afile"),
    "certify-cuda-without-gpu": Case("decrop", ("certify", "--model", "{tmp}/m.pt2", "--images", "{tmp}",
                                                "--device", "cuda"), ("--device = 'cuda'", "no CUDA device"),
                                     skip=NO_GPU),
    # ---- tuning/sweep.py: flags, then data, then the tracking store; all before Ray starts
    "sweep-num-trials-zero": Case("sweep", (*SWEEP, "--num-trials", "0"), ("--num-trials 0", "at least 1")),
    "sweep-num-trials-negative": Case("sweep", (*SWEEP, "--num-trials", "-1"), ("--num-trials -1", "at least 1")),
    "sweep-max-concurrent-zero": Case("sweep", (*SWEEP, "--max-concurrent", "0"), ("--max-concurrent 0",)),
    "sweep-workers-per-trial-zero": Case("sweep", (*SWEEP, "--workers-per-trial", "0"), ("--workers-per-trial 0",)),
    "sweep-cert-shards-zero": Case("sweep", (*SWEEP, "--cert-shards", "0"), ("--cert-shards 0", "at least 1")),
    "sweep-gpus-without-gpu": Case("sweep", (*SWEEP, "--gpus-per-worker", "1"), ("no CUDA device", "drop the flag"),
                                   env={"RAY_ADDRESS": ""}, skip=NO_GPU),
    "sweep-gpus-negative": Case("sweep", (*SWEEP, "--gpus-per-worker", "-1"), ("--gpus-per-worker -1", ">= 0")),
    "sweep-seed-negative": Case("sweep", (*SWEEP, "--seed", "-1"), ("--seed -1", "0 to 4294967295")),
    "sweep-seed-beyond-2^32-1": Case("sweep", (*SWEEP, "--seed", "4294967296"), ("--seed 4294967296",)),
    "sweep-seeds-repeated": Case("sweep", (*SWEEP, "--preset", "sigma", "--seeds", "1", "1"),
                                 ("--seeds lists a seed twice",)),
    "sweep-confirm-seed-is-the-search-seed": Case("sweep", (*SWEEP, "--confirm-seeds", "0"),
                                                  ("--confirm-seeds [0]", "seeds the search never used")),
    "sweep-unknown-preset": Case("sweep", (*SWEEP, "--preset", "sigmaa"), ("unknown preset 'sigmaa'", "sigma")),
    "sweep-unknown-level": Case("sweep", (*SWEEP, "--preset", "sigma", "--levels", "0.3"),
                                ("--levels 0.3 is not a level of preset 'sigma'", "0.25")),
    "sweep-levels-of-the-search": Case("sweep", (*SWEEP, "--levels", "0.25"), ("--levels applies to a single",)),
    "sweep-unknown-profile": Case("sweep", (*SWEEP, "--profile", "quik"), ("--profile 'quik'", "quick")),
    "sweep-study-with-dotdot": Case("sweep", (*SWEEP, "--study", "../escape"), ("--study = '../escape'",
                                                                              "not a valid name")),
    "sweep-config-typo": Case("sweep", (*SWEEP, "--set", "train.epoch=3"), ("'train.epoch'", "train.epochs")),
    "sweep-storage-is-a-file": Case("sweep", ("--storage", "{tmp}/afile"), ("afile is a file, not a folder",),
                                    setup="afile"),
    "sweep-mlflow-unreachable": Case("sweep", (*SWEEP, "--mlflow-uri", "http://127.0.0.1:{port}"),
                                     ("does not answer", "cluster/local.sh up --with-mlflow")),
    "sweep-mlflow-not-a-store": Case("sweep", (*SWEEP, "--mlflow-uri", "{tmp}/notes.db"),
                                     ("notes.db is not a SQLite database", "MLflow store"), setup="notes_db"),
    "sweep-study-exists": Case("sweep", SWEEP, ("study 'quick-study' already exists", "--resume"),
                               setup="study_exists"),
    "sweep-trials-exist": Case("sweep", SWEEP, ("already has trials", "--resume"), setup="trials_exist"),
    "sweep-dataset-missing": Case("sweep", (*SWEEP, "--set", "data.root={tmp}/data"),
                                  ("Fashion-MNIST not found", "dataset-fashion-mnist"),
                                  env={"DECROP_FASHION_MNIST_DIR": "{tmp}/nothing"}),
    "sweep-val-size-beyond-the-pool": Case("sweep", (*SWEEP, "--set", "data.val_size=70000", "--set",
                                                     "certify.val_images=10"),
                                           ("'data.val_size' = 70000", "lower data.val_size"), data=True),
    "sweep-percent-below-one-image-per-class": Case("sweep", (*SWEEP, "--set", "data.percent=0.01"),
                                                    ("'data.percent' = 0.01", "data.percent >= 0.0167"), data=True),
    "sweep-cuda-without-gpu": Case("sweep", (*SWEEP, "--set", "device=cuda"), ("'device' = 'cuda'",),
                                   data=True, skip=NO_GPU),
    # ---- analysis/report.py
    "report-store-missing": Case("report", ("--mlflow-uri", "{tmp}/mlflow.db", "--out", "{tmp}/rep"),
                                 ("no MLflow store at", "mlflow.db")),
    "report-empty-file": Case("report", ("--mlflow-uri", "{tmp}/mlflow.db", "--out", "{tmp}/rep"),
                              ("is an empty file (0 bytes), not an MLflow store",), setup="empty_db"),
    "report-text-file": Case("report", ("--mlflow-uri", "{tmp}/notes.db", "--out", "{tmp}/rep"),
                             ("not a SQLite database",), setup="notes_db"),
    "report-unknown-experiment": Case("report", ("--mlflow-uri", "{tmp}/st/quick-study/mlflow.db", "--experiment",
                                                 "nope", "--out", "{tmp}/rep"), ("'nope'",), setup="study_exists"),
    "report-nothing-certified": Case("report", ("--mlflow-uri", "{tmp}/st/quick-study/mlflow.db", "--out",
                                                "{tmp}/rep"), ("no certification results",), setup="study_exists"),
    "report-server-unreachable": Case("report", ("--mlflow-uri", "http://127.0.0.1:{port}", "--out", "{tmp}/rep"),
                                      ("cannot read the MLflow store http://127.0.0.1",)),
    "report-out-is-a-file": Case("report", ("--mlflow-uri", "{tmp}/st/quick-study/mlflow.db", "--out", "{tmp}/afile"),
                                 ("--out", "afile is a file, not a folder", "choose a folder"),
                                 setup="study_exists_and_afile"),
    "report-out-under-a-file": Case("report", ("--mlflow-uri", "{tmp}/st/quick-study/mlflow.db", "--out",
                                               "{tmp}/afile/rep"), ("afile is a file, not a folder",),
                                    setup="study_exists_and_afile"),
}


# ------------------------------------------------------------------------------------------------ fixtures

def _setup(name: str, tmp: Path, ctx: dict) -> None:
    """Fill the case's folder: files the case points at (what is there must still be there, unchanged)."""
    if name == "out_exists":
        (tmp / "out").mkdir()
        (tmp / "out" / "summary.csv").write_text("finished results\n")
    elif name == "afile":
        (tmp / "afile").write_text("a file\n")
    elif name == "bad_yaml":
        (tmp / "bad.yaml").write_text("train: {epochs: [1\n")
    elif name == "list_yaml":
        (tmp / "list.yaml").write_text("- 1\n- 2\n")
    elif name == "dup_yaml":
        (tmp / "dup.yaml").write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n")
    elif name == "empty_yaml":
        (tmp / "empty.yaml").write_text("# train:\n#   epochs: 3\n\n")
    elif name == "garbage_model":
        (tmp / "model.pt2").write_bytes(b"these are not the weights you are looking for")
    elif name == "notes_db":
        (tmp / "notes.db").write_text("my notes, not a database\n")
    elif name == "empty_db":
        (tmp / "mlflow.db").write_bytes(b"")
    elif name == "export_out_exists":
        (tmp / "s.pt2").write_bytes(b"an earlier export")
    elif name in ("export_corrupt", "export_wrong_arch"):
        (tmp / "cfg.yaml").write_text(to_yaml(load_config(QUICK, [f"cache_dir={ctx['ckcache']}"])))
        (tmp / "nocache.yaml").write_text(to_yaml(load_config(QUICK, [f"cache_dir={tmp / 'none'}"])))
        if name == "export_corrupt":
            (tmp / "d.pt").write_bytes(b"\x00" * 64)
        else:  # a DnCNN of another depth and width than the config's 7x32
            save_checkpoint(tmp / "d.pt", create_model("dncnn", in_channels=1, depth=3, width=8),
                            {"kind": "denoiser", "method": "decrop", "sigma": 0.25})
    elif name in ("study_exists", "trials_exist"):
        storage = tmp / "st" / "quick-study"
        storage.mkdir(parents=True)
        if name == "study_exists":
            StudyTracker(default_tracking_uri(storage), "quick-study").start_sweep("quick-study", {}, resume=False)
        else:
            (storage / "tune").mkdir()
            (storage / "tune" / "experiment_state.json").write_text("{}")
    elif name in ("folder_odd_first", "folder_bomb", "folder_classes"):
        _image_folder(tmp / "images", name)
    elif name == "study_exists_and_afile":  # a store the report could read, and a file where --out points
        _setup("study_exists", tmp, ctx)
        _setup("afile", tmp, ctx)
    elif name:
        raise ValueError(f"unknown setup {name!r}")


def _image_folder(root: Path, problem: str) -> None:
    """A folder dataset of 1x16x16 PNGs (train/a, train/b, test/a) with one `problem`: an odd 20x20 image that
    sorts first, a PNG whose header declares 15000x15000 pixels, or a classes.txt without a class folder's name."""
    import struct
    import zlib

    from torchvision.io import encode_png

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for rel in ("train/a/0000.png", "train/a/0001.png", "train/b/0000.png", "train/b/0001.png", "test/a/0000.png",
                "test/a/0001.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        side = 20 if problem == "folder_odd_first" and rel == "train/a/0000.png" else 16
        (root / rel).write_bytes(encode_png(torch.zeros(1, side, side, dtype=torch.uint8)).numpy().tobytes())
    if problem == "folder_bomb":
        (root / "train/b/0001.png").write_bytes(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    elif problem == "folder_classes":
        (root / "classes.txt").write_text("T-shirt/top\nTrouser\n")
        (root / "train" / "b").rename(root / "train" / "Sandal")


def _state(root: Path) -> dict[str, tuple]:
    """Every folder and file under `root`: files by (sha256, size, mtime_ns)."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file():
            st = path.stat()
            state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
        else:
            state[rel] = ("dir",)
    return state


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict:
    """Folders shared by the cases: Fashion-MNIST extracted once, a cache without and one with a classifier
    (an untrained small CNN: loading it is all a bad export needs), scratch space and a port nothing listens on."""
    root = tmp_path_factory.mktemp("shared")
    ckcache = root / "ckcache"
    cfg = load_config(QUICK, [f"cache_dir={ckcache}"])
    save_checkpoint(classifier_path(cfg), build_classifier("fashion_mnist", "small_cnn"),
                    {"kind": "classifier", "dataset": "fashion_mnist", "arch": "small_cnn",
                     "key": classifier_key(cfg), "epochs": 0})
    with socket.socket() as s:  # a port that was free a moment ago: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"data": str(root / "data"), "cache": str(root / "cache"), "ckcache": str(ckcache),
            "scratch": str(root / "scratch"), "port": str(port)}


class ComputeStarted(AssertionError):
    pass


@pytest.fixture
def no_compute(monkeypatch):
    """Training, sample generation, certification, export and Ray's start fail the test if they are reached."""
    def refuse(what):
        def fail(*args, **kwargs):
            raise ComputeStarted(f"{what} started: the bad input was not caught before compute")
        return fail
    for module, name in ((decrop.classifier, "train_classifier"), (decrop.stages, "run_stages"),
                         (decrop.stages, "load_or_generate_samples"), (decrop.pipeline, "certify_indices"),
                         (decrop.smoothed, "export_smoothed"), (decrop.smoothed, "certify_folder"),
                         (decrop.smoothed, "predict_folder"), (sweep, "connect")):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))


def _offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)


def _invoke(tool: str, argv: list[str]) -> int:
    main = {"decrop": cli.main, "sweep": sweep.main, "report": report.main}[tool]
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


# --------------------------------------------------------------------------------------------------- tests

def test_the_catalogue_is_large_and_covers_every_entry_point():
    tools = {case.tool for case in CASES.values()}
    assert len(CASES) >= 40 and tools == {"decrop", "sweep", "report"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_with_exit_code_2_before_any_compute(name, ctx, tmp_path, monkeypatch, capsys,
                                                                   no_compute):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    if case.data and not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST} (scripts/setup.sh installs it)")
    values = {**ctx, "tmp": str(tmp_path)}
    _setup(case.setup, tmp_path, ctx)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(**values))
    if case.offline:
        _offline(monkeypatch)
    capsys.readouterr()  # what the setup printed (MLflow creating a store)
    before = _state(tmp_path)
    code = _invoke(case.tool, [arg.format(**values) for arg in case.argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for words in case.expect:
        assert words.format(**values) in lines[0], f"{words!r} not in {lines[0]!r}"
    assert _state(tmp_path) == before, "the case's folder changed"
    assert not (Path(ctx["cache"]) / "classifiers").exists()  # no classifier was trained
    if case.tool == "sweep":
        import ray
        assert not ray.is_initialized()


@pytest.mark.parametrize("tool, argv, words", [
    ("sweep", ["--num-trials", "two"], "invalid int value: 'two'"),
    ("decrop", ["predict", "--model", "m.pt2", "--images", ".", "--device", "tpu"], "invalid choice: 'tpu'"),
    ("decrop", ["launch"], "invalid choice: 'launch'"),
])
def test_malformed_flags_are_argparse_errors_with_exit_code_2(tool, argv, words, capsys, no_compute):
    assert _invoke(tool, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and words in err and "Traceback" not in err


def test_a_corrupt_cached_classifier_is_refused_and_kept(ctx, tmp_path, capsys, no_compute):
    """A cached classifier that does not load is an error with the fix; it is never overwritten by a new one."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST}")
    cache = tmp_path / "cache"
    cfg = load_config(QUICK, [f"cache_dir={cache}"])
    path = classifier_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a checkpoint")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    argv = [*RUN, "--set", f"cache_dir={cache}"]
    assert cli.main([a.format(**ctx, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "is corrupt or not a decrop checkpoint" in err and "delete it and rerun" in err
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem, words", [
    ("missing", "does not exist"),
    ("random bytes", "is corrupt or not a decrop checkpoint"),
    ("pickled code", "is corrupt or not a decrop checkpoint"),
    ("other keys", "expected keys 'meta' and 'state_dict'"),
    ("other dataset", "written for dataset='cifar10', but this run needs dataset='fashion_mnist'"),
    ("other architecture", "does not fit the model Linear (shape differs"),
])
def test_checkpoint_loaders_name_the_file_and_leave_the_model_untouched(problem, words, tmp_path):
    path = tmp_path / "model.pt"
    marker = tmp_path / "ran"
    if problem == "random bytes":
        path.write_bytes(os.urandom(256))
    elif problem == "pickled code":
        torch.save({"meta": {}, "state_dict": {}, "hook": _Exec(f"open({str(marker)!r}, 'w').close()")}, path)
    elif problem == "other keys":
        torch.save({"weights": {}}, path)
    elif problem != "missing":
        shape = (4, 3) if problem == "other architecture" else (2, 3)
        save_checkpoint(path, nn.Linear(shape[1], shape[0]), {"dataset": "cifar10"})
    model = nn.Linear(3, 2)
    weights = model.weight.detach().clone()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model, {"dataset": "fashion_mnist"} if problem == "other dataset" else None)
    assert str(path) in str(err.value) and words in str(err.value)
    assert torch.equal(model.weight, weights) and not marker.exists()


class _Exec:
    """An object whose unpickling runs code: what `weights_only=True` must refuse."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": "/nonexistent-ray-tmp"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_config_typo_imports_neither_torch_nor_ray():
    """`python -m decrop run` and `tuning/sweep.py` check the config with light imports: a typo costs a fraction
    of a second, not the 5-45 s of importing torch, ray and mlflow on a busy machine."""
    code = ("import sys\n"
            "from decrop.cli import main as run\n"
            "from tuning.sweep import main as sweep\n"
            "codes = [run(['run', '--set', 'train.epoch=3']), sweep(['--num-trials', '0']),\n"
            "         sweep(['--set', 'train.epoch=3'])]\n"
            "print(codes, sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))\n")
    out = _fresh(code)
    assert out.stdout.strip() == "[2, 2, 2] []", out.stdout + out.stderr


def test_the_sweep_script_starts_no_ray_on_bad_input(tmp_path):
    """As a script: exit code 2, one line, and no Ray session (its temp folder is never created)."""
    ray_tmp = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "local"}
    out = subprocess.run([sys.executable, str(REPO / "tuning" / "sweep.py"), "--storage", str(tmp_path / "st"),
                          "--max-concurrent", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and out.stderr == "error: --max-concurrent 0: must be at least 1\n", out.stderr
    assert not ray_tmp.exists() and not (tmp_path / "st").exists()
