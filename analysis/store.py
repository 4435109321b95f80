"""Opening the tracking store for the report without harming what it points at.

``store_uri`` finds the store (``--mlflow-uri``, or ``default_store``: the newest ``~/decrop-runs/*/mlflow.db``
whose study has finished); ``open_store`` checks a local file before MLflow sees it: MLflow turns any SQLite file it
opens into a store (a 0-byte file becomes one, another application's database gains MLflow's tables). So a local
file is opened for writing only when it is an MLflow store of this platform; another MLflow store is read from a
snapshot; anything else is refused with a ReportError, unchanged. The URI is shown with its password redacted.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient

from analysis.runs import ReportError, _first_line
import tuning.schema as schema
from tuning.schema import PARENT_ROLES, ROLE_TAG, STUDY_TAG, redact_uri, resolve_tracking_uri

DEFAULT_STORAGE = Path("~/decrop-runs")  # the sweep's default --storage: stores are <storage>/<study>/mlflow.db


def _local_path(uri: str) -> Path | None:
    """The file or folder behind a ``sqlite:///`` or ``file:`` URI; None for servers and other databases."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return None


def running_in_store(path: Path, experiments: Sequence[str] | None = None) -> list[str]:
    """The studies of the local SQLite store at `path` whose parent run (a sweep or a preset) is RUNNING, by name,
    among the experiments the report would read there: those named, else the most recently created one other
    than Default (as `pick_experiments` chooses). Read with SQL over a read-only connection (no MLflow client:
    opening a store may migrate, i.e. write, it). Empty for a file that is no MLflow store or cannot be read:
    `open_store` judges those."""
    if experiments:
        which, values = f"e.name IN ({', '.join('?' * len(experiments))})", tuple(experiments)
    else:
        which, values = ("e.experiment_id = (SELECT experiment_id FROM experiments WHERE lifecycle_stage = 'active' "
                         "AND name != 'Default' ORDER BY creation_time DESC LIMIT 1)"), ()
    try:
        check_mlflow_sqlite(path)
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute(
                "SELECT COALESCE((SELECT s.value FROM tags s WHERE s.run_uuid = r.run_uuid AND s.key = ?), r.name) "
                "FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = ? "
                "JOIN experiments e ON e.experiment_id = r.experiment_id "
                f"WHERE t.value IN ({', '.join('?' * len(PARENT_ROLES))}) AND r.status = 'RUNNING' "
                f"AND r.lifecycle_stage = 'active' AND e.lifecycle_stage = 'active' AND {which} "
                "ORDER BY r.start_time", (STUDY_TAG, ROLE_TAG, *PARENT_ROLES, *values)).fetchall()
        finally:
            con.close()
    except (ReportError, sqlite3.Error, OSError):
        return []
    return list(dict.fromkeys(str(name) for (name,) in rows))


def default_store(storage: Path = DEFAULT_STORAGE, progress=print, experiments: Sequence[str] | None = None) -> Path:
    """The store the report reads when no ``--mlflow-uri`` is given: the most recently modified
    ``<storage>/*/mlflow.db`` whose study (in `experiments`, else its newest experiment: `running_in_store`) has
    finished. Newer stores whose study is still running are skipped (read, they would give a partial report), with
    a line each saying so; when every study is still running, the newest store (reported as partial, logged
    nowhere). ReportError when there is no store at all."""
    root = Path(storage).expanduser()
    stores = sorted(root.glob("*/mlflow.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not stores:
        raise ReportError(f"no MLflow store found: nothing matches {root}/*/mlflow.db; run a study first "
                          f"(tuning/sweep.py) or pass --mlflow-uri")
    skipped = []
    for path in stores:
        running = running_in_store(path, experiments)
        if not running:
            break
        skipped.append(path)
        which = f"study {running[0]!r} is" if len(running) == 1 else f"studies {', '.join(map(repr, running))} are"
        progress(f"report: skipped {path}: {which} still running (a report of it would be partial; pass "
                 f"--mlflow-uri {path} to read it anyway)")
    else:
        progress(f"report: every study under {root} is still running: reading the newest, {stores[0]} (the "
                 f"report is partial)")
        return stores[0]
    newest = "the newest store" if not skipped else "the newest store whose study has finished"
    progress(f"report: reading {path}, {newest} under {root} ({len(stores)} found)")
    return path


def store_uri(uri: str | None, storage: Path = DEFAULT_STORAGE, progress=print,
              experiments: Sequence[str] | None = None) -> str:
    """The tracking URI to read: `uri` resolved like the sweep's ``--mlflow-uri``, or by default the newest
    finished study's ``<storage>/*/mlflow.db`` (`default_store`, which says what it picked through `progress`;
    `experiments`: the ``--experiment`` names, if any). ReportError when a local store does not exist: opening a
    missing SQLite path would create an empty store there."""
    if not uri:
        root = Path(storage).expanduser()
        return resolve_tracking_uri(str(default_store(root, progress, experiments)), root)
    resolved = resolve_tracking_uri(uri, Path.cwd())
    path = _local_path(resolved)
    if path is not None and not path.exists():
        raise ReportError(f"no MLflow store at {path} (--mlflow-uri {redact_uri(uri)})")
    return resolved


@dataclass
class Store:
    """A tracking store opened for the report.

    ``shown`` is the URI as messages and the report show it (any password replaced by ``***``); ``writable``
    says whether the report may log itself under the store's parent runs, and ``note`` why not when it may not.
    """

    client: MlflowClient
    shown: str
    writable: bool
    note: str = ""
    snapshot: tempfile.TemporaryDirectory | None = None  # holds the read-only copy while the client reads it


REPORT_FIX = ("the report reads only MLflow stores (the mlflow.db of a study: tuning/sweep.py); pass one with "
              "--mlflow-uri. The file was not changed")


def check_mlflow_sqlite(path: Path, fix: str = REPORT_FIX) -> bool:
    """`tuning.schema.check_mlflow_sqlite` (whether the file is an MLflow store of this platform, read-only), its
    refusal as a ReportError ending with `fix`."""
    try:
        return schema.check_mlflow_sqlite(path, fix)
    except schema.StoreError as err:
        raise ReportError(str(err)) from None


def _snapshot(path: Path) -> tuple[str, tempfile.TemporaryDirectory]:
    """A consistent copy of the SQLite store at `path` in a temporary folder (SQLite's backup API over a
    read-only connection: the original is never written), as a tracking URI, and the folder to keep alive."""
    folder = tempfile.TemporaryDirectory(prefix="decrop-report-")
    copy = Path(folder.name) / "mlflow.db"
    src = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return f"sqlite:///{copy.as_posix()}", folder


def open_store(uri: str) -> Store:
    """The store behind `uri`, checked by listing one experiment; ReportError if it cannot be read.

    A local SQLite file is checked first (`check_mlflow_sqlite`) and never modified unless it is an MLflow store of
    this platform: another MLflow store is read from a snapshot and the report is not logged to it; anything
    else is refused. Servers are opened as they are (the report is logged to this platform's parent runs only).
    """
    shown, snapshot, writable, note, target = redact_uri(uri), None, True, "", uri
    path = _local_path(uri)
    if path is not None and uri.startswith("sqlite:///"):
        if not check_mlflow_sqlite(path):
            try:
                target, snapshot = _snapshot(path)
            except sqlite3.Error as err:
                raise ReportError(f"cannot read the MLflow store {shown}: {err}") from None
            writable = False
            note = f"{path} is an MLflow store without runs of this platform: read from a copy, left unchanged"
    try:
        client = MlflowClient(target)
        client.search_experiments(max_results=1)
    except Exception as err:  # MlflowException, connection errors, SQLAlchemy errors: all mean "cannot read"
        raise ReportError(f"cannot read the MLflow store {shown}: {_first_line(err)}") from None
    return Store(client, shown, writable, note, snapshot)
