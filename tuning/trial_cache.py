"""Finished trials reused across studies: the same configuration, seed and code give the same result.

The paper's studies share points: the profile's defaults appear in almost every one of them (sigma 0.25, attack
PGD, n_interp 1, DnCNN, augmentation policy 1, white-box, 1% of the data). Training and certifying such a point
again reproduces the same rows bit for bit (every random draw is seeded, one thread per worker), so a trial that
certifies the test subset stores its denoiser and its rows under a key of everything that determines them: the
trial's flat config (method, seed, data, training and certification settings), the training layout (DDP workers,
GPUs per worker), the sha256 of the classifier's file and a hash of the source code that computes them (`SOURCES`). A later trial with the same key,
in any study, takes them instead of recomputing; its MLflow run carries the tag ``decrop.reused_from`` naming
the trial that computed them. Any change of config or code is another key. Entries live under
``<cache_dir>/trials/<key>/`` and are written atomically (a folder renamed into place).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from decrop.config import config_hash, expand_path
from decrop.rows import CertRow, read_rows, write_rows

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("decrop", "tuning/train_loop.py", "tuning/certify_tasks.py")  # what computes a trial's rows


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 of the source files that train and certify a trial (their paths and bytes)."""
    digest = hashlib.sha256()
    for source in SOURCES:
        path = REPO / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(REPO)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def trial_key(flat: dict[str, Any], workers: int, gpus_per_worker: float, classifier_sha256: str) -> str:
    """The key of a trial's result: its flat config, its training layout, the classifier's file (its sha256: the
    same config names another classifier when the user's file or the cached trained one is replaced) and the
    code."""
    if not classifier_sha256:
        raise ValueError("trial_key needs the classifier's sha256")
    return config_hash({"flat": flat, "workers": workers, "gpus_per_worker": gpus_per_worker,
                        "classifier_sha256": classifier_sha256, "code": code_hash()})


def _folder(cache_dir: str, key: str) -> Path:
    return expand_path(cache_dir) / "trials" / key


def load(cache_dir: str, key: str) -> tuple[Path | None, list[CertRow], str] | None:
    """(the denoiser's weights file or None for no denoiser, test rows, the trial that computed them), or None."""
    folder = _folder(cache_dir, key)
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    return folder / "denoiser.pt" if meta["denoiser"] else None, read_rows(folder / "test.tsv"), meta["source"]


def store(cache_dir: str, key: str, weights: Path | None, rows: list[CertRow], source: str) -> None:
    """Keep a finished trial's weights file (a copy) and test rows under `key` (first writer wins)."""
    folder = _folder(cache_dir, key)
    if folder.exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        if weights is not None:
            shutil.copyfile(weights, work / "denoiser.pt")
        write_rows(rows, work / "test.tsv")
        (work / "meta.json").write_text(json.dumps({"source": source, "denoiser": weights is not None,
                                                    "code": code_hash()}))
        os.replace(work, folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
