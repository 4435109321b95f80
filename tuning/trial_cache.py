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

**The shelf** (``sweep.py --shelf DIR``, the repository's ``results/`` for the paper's reruns) keeps finished
trials where a fresh machine finds them: a folder committed with the code. `shelve` copies each entry's rows and
the trial's learning curves (its per-epoch ``train/*`` and ``val/*`` metrics, read from its MLflow run), without
the weights (a few MB each), and the classifier the trials were trained against (`pin_classifier`: the key holds
its sha256, and a classifier trained again differs in its bytes). A trial whose key is on the shelf takes the
rows and curves from there; its run holds no denoiser file (tag `WEIGHTS_TAG`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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


WHERE_KEYS = ("cache_dir",)  # config keys that say where files lie, not what a trial computes: not in its key


def trial_key(flat: dict[str, Any], workers: int, gpus_per_worker: float, classifier_sha256: str) -> str:
    """The key of a trial's result: its flat config (but `WHERE_KEYS`), its training layout, the classifier's
    file (its sha256: the same config names another classifier when the user's file or the cached trained one is
    replaced) and the code."""
    if not classifier_sha256:
        raise ValueError("trial_key needs the classifier's sha256")
    flat = {k: v for k, v in flat.items() if k not in WHERE_KEYS}
    return config_hash({"flat": flat, "workers": workers, "gpus_per_worker": gpus_per_worker,
                        "classifier_sha256": classifier_sha256, "code": code_hash()})


def _folder(cache_dir: str, key: str) -> Path:
    return expand_path(cache_dir) / "trials" / key


def _shelf(shelf: str) -> Path:
    """The shelf's folder; a relative one lies in the repository (a Tune trial runs in its own folder)."""
    path = Path(shelf).expanduser()
    return path if path.is_absolute() else REPO / path


CURVES = "curves.tsv"  # epoch, metric, value: a shelved trial's learning curves


@dataclass(frozen=True)
class Cached:
    """A finished trial's result: its denoiser's weights file (None for no denoiser, or on the shelf, which keeps
    none), its test rows, the trial that computed them (``<experiment>/<trial id>``) and its learning curves as
    (epoch, metric, value) triples (empty where none were kept)."""

    weights: Path | None
    rows: list[CertRow]
    source: str
    denoiser: bool
    curves: list[tuple[int, str, float]]


def load(cache_dir: str, key: str, shelf: str = "") -> Cached | None:
    """The result stored under `key` in the cache, else on the shelf (when one is given), else None."""
    for folder in (_folder(cache_dir, key), *([_shelf(shelf) / "trials" / key] if shelf else [])):
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())
            weights = folder / "denoiser.pt"
            return Cached(weights if meta["denoiser"] and weights.is_file() else None,
                          read_rows(folder / "test.tsv"), meta["source"], bool(meta["denoiser"]),
                          _read_curves(folder / CURVES))
    return None


def _read_curves(path: Path) -> list[tuple[int, str, float]]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()[1:]
    return [(int(epoch), key, float(value)) for epoch, key, value in (line.split("\t") for line in lines if line)]


def _write_curves(curves: list[tuple[int, str, float]], path: Path) -> None:
    lines = [f"{epoch}\t{key}\t{value!r}" for epoch, key, value in sorted(curves, key=lambda c: (c[1], c[0]))]
    path.write_text("\n".join(["epoch\tmetric\tvalue", *lines]) + "\n")


def _put(folder: Path, write: Callable[[Path], None]) -> bool:
    """An entry written into `folder` atomically by `write(work folder)` (first writer wins); whether this call
    wrote it."""
    if folder.exists():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(work)
        os.replace(work, folder)
        return True
    except OSError:
        if not folder.exists():
            raise
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def store(cache_dir: str, key: str, weights: Path | None, rows: list[CertRow], source: str) -> None:
    """Keep a finished trial's weights file (a copy) and test rows under `key` (first writer wins)."""
    def write(work: Path) -> None:
        if weights is not None:
            shutil.copyfile(weights, work / "denoiser.pt")
        write_rows(rows, work / "test.tsv")
        (work / "meta.json").write_text(json.dumps({"source": source, "denoiser": weights is not None,
                                                    "code": code_hash()}))
    _put(_folder(cache_dir, key), write)


def shelve(cache_dir: str, shelf: str, finished: Callable[[str], tuple[str, list[tuple[int, str, float]]] | None]
           ) -> int:
    """Each cache entry not on the shelf yet whose trial `finished(source)` knows ((the commit that ran it, its
    curves); None: its run is in another store, and it waits for that store's study), copied onto the shelf with
    those curves and that commit, without its weights; the number shelved."""
    shelved = 0
    for folder in sorted((expand_path(cache_dir) / "trials").glob("[!.]*")):
        target = _shelf(shelf) / "trials" / folder.name
        if not (folder / "meta.json").is_file() or target.exists():
            continue
        meta = json.loads((folder / "meta.json").read_text())
        found = finished(meta["source"])
        if found is None:
            continue

        def write(work: Path, entry: Path = folder, commit: str = found[0], curves: list = found[1]) -> None:
            shutil.copyfile(entry / "test.tsv", work / "test.tsv")
            (work / "meta.json").write_text(json.dumps({**json.loads((entry / "meta.json").read_text()),
                                                        "commit": commit}))
            _write_curves(curves, work / CURVES)
        shelved += _put(target, write)
    return shelved


def other_code(shelf: str) -> str:
    """A line for a shelf none of whose trials this checkout's code computed (their keys hold the code's hash, so
    none would be reused), naming the commit to continue them from; "" when some match or the shelf is empty."""
    metas = [json.loads(path.read_text()) for path in (_shelf(shelf) / "trials").glob("*/meta.json")]
    if not metas or any(meta["code"] == code_hash() for meta in metas):
        return ""
    commits = sorted({meta.get("commit", "unknown")[:12] for meta in metas})
    return (f"the shelf {shelf} holds {len(metas)} trial(s) computed by other code than this checkout's "
            f"(decrop/, {', '.join(SOURCES[1:])}): none will be reused. To continue them, run from their commit "
            f"({', '.join(commits)}), e.g. git worktree add ../reruns {commits[0]}")


def pin_classifier(classifier: Path, shelf: str) -> None:
    """One classifier file for the shelf's trials on every machine (their keys hold its sha256, and one trained
    again differs in its bytes): the shelf's copy goes into the cache where the cache has none, the cache's onto
    the shelf where the shelf has none. ValueError when both exist and differ."""
    kept = _shelf(shelf) / "classifiers" / classifier.name
    if kept.is_file() and classifier.is_file():
        if kept.read_bytes() != classifier.read_bytes():
            raise ValueError(f"the classifier {classifier} differs from the one the shelf's trials used ({kept}): "
                             f"remove {classifier} to take the shelf's, or pass another --shelf")
        return
    source, target = (kept, classifier) if kept.is_file() else (classifier, kept)
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
