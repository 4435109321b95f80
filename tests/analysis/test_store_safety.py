"""analysis/report.py never writes into a file that is not an MLflow store of this platform, warns when the study
it reports is still running, keeps passwords of the tracking URI out of everything it prints and writes, and has
no side effects when imported."""

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import analysis.store
import tuning.tracking
from analysis import report
from decrop.rows import CertRow, write_rows
from tuning.tracking import StudyTracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[2]

PASSWORD = "hunter2-s3cret"


def _state(path: Path) -> tuple[str, int, int, list[str]]:
    """What must not change: the file's bytes, its size and mtime, and the names in its folder."""
    st = path.stat()
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns,
            sorted(p.name for p in path.parent.iterdir()))


def _refused(argv, capsys) -> str:
    assert report.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def _rows(n: int, seed: int) -> list[CertRow]:
    rng = np.random.default_rng(seed)
    return [CertRow(i, i % 10, i % 10 if rng.random() < 0.7 else -1, round(float(rng.uniform(0, 0.6)), 4),
                    int(rng.random() < 0.7), 0.1, 100) for i in range(n)]


@pytest.fixture
def no_curves(monkeypatch):
    """The per-label curve PNGs of log_certification are not read by the report: skip drawing them."""
    monkeypatch.setattr(tuning.tracking, "plot_certified_curve",
                        lambda rows, path, title: Path(path).write_bytes(b"") or Path(path))


def _study(root: Path, finish: bool) -> str:
    """A store at root/mlflow.db with one sweep (one certified trial, test labels on the parent), RUNNING unless
    `finish`; returns its URI."""
    uri = default_tracking_uri(root)
    tracker = StudyTracker(uri, "live")
    parent = tracker.start_sweep("live", {"base.sigma": 0.25, "base.certify.radii": "[0.0, 0.25]"}, resume=False)
    trial = tracker.trial_run(parent, "t0", "trial_t0", {"sigma": 0.25, "methods": "['decrop']"})
    tracker.log_certification(trial, _rows(20, 0), [0.0, 0.25], "validation")
    tracker.finish(trial, "FINISHED")
    for label in ("baseline", "decrop_best"):
        tracker.log_certification(parent, _rows(30, 1), [0.0, 0.25], f"test_{label}")
    if finish:
        tracker.finish(parent, "FINISHED")
    return uri


# ------------------------------------------------------------------------------ files that are not stores


def test_zero_byte_file_is_refused_and_left_unchanged(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    before = _state(db)
    for uri in (str(db), f"sqlite:///{db}"):
        err = _refused(["--mlflow-uri", uri, "--out", str(tmp_path / "out")], capsys)
        assert f"{db} is an empty file (0 bytes), not an MLflow store" in err and "not changed" in err
    assert _state(db) == before
    assert not (tmp_path / "out").exists()


def test_foreign_sqlite_database_is_refused_and_left_unchanged(tmp_path, capsys):
    db = tmp_path / "notes.db"
    with sqlite3.connect(db) as con:  # another application's database
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        con.execute("INSERT INTO notes (text) VALUES ('keep me')")
    con.close()
    before = _state(db)
    err = _refused(["--mlflow-uri", f"sqlite:///{db}", "--out", str(tmp_path / "out")], capsys)
    assert "is a SQLite database but not an MLflow store (no alembic_version, experiments, runs table)" in err
    assert _state(db) == before
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]

    text = tmp_path / "results.db"
    text.write_text("not a database\n")
    before = _state(text)
    assert "is not a SQLite database, not an MLflow store" in _refused(["--mlflow-uri", str(text)], capsys)
    assert _state(text) == before


def test_default_store_that_is_not_a_store_is_refused(tmp_path, monkeypatch, capsys):
    db = tmp_path / "decrop-runs" / "broken" / "mlflow.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    before = _state(db)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert "is an empty file (0 bytes)" in _refused([], capsys)
    assert _state(db) == before and not (tmp_path / "reports").exists()


def test_mlflow_store_of_another_application_is_read_from_a_copy(tmp_path, capsys, monkeypatch):
    """An MLflow store without runs of this platform is reported (from a snapshot) but never written to."""
    store = tmp_path / "other"
    store.mkdir()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.create_experiment("theirs", artifact_location=(store / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    table = tmp_path / "test_decrop.tsv"
    write_rows(_rows(25, 2), table)
    client.log_artifact(run, str(table), "certify")
    client.set_terminated(run)
    del client
    db = store / "mlflow.db"
    before = _state(db)
    monkeypatch.chdir(tmp_path)
    assert report.main(["--mlflow-uri", str(db), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "report: not logged to the store" in out and "read from a copy, left unchanged" in out
    assert (tmp_path / "out" / "report.html").exists()
    assert _state(db) == before


# ------------------------------------------------------------------------------------- a running study


def test_a_running_study_is_reported_as_partial(tmp_path, monkeypatch, capsys, no_curves):
    _study(tmp_path / "decrop-runs" / "live", finish=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert report.main([]) == 0  # no arguments: the newest store under ~/decrop-runs, which is still running
    out = capsys.readouterr().out
    warning = "report: warning: study 'live' is still running (its sweep run is RUNNING"
    assert warning in out and "this report is partial" in out
    assert out.index(warning) < out.index("report: writing figures")  # said before the work, not buried after
    assert "this report is partial" in (tmp_path / "reports" / "live" / "report.md").read_text()


def test_a_finished_study_gets_no_warning(tmp_path, capsys, no_curves):
    uri = _study(tmp_path / "done", finish=True)
    assert report.main(["--mlflow-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "still running" not in out and "logged" in out  # a store of this platform: the report is logged


# ----------------------------------------------------------------------------- passwords in the URI


def test_a_password_in_the_uri_reaches_no_output_and_no_report_file(tmp_path, monkeypatch, capsys, no_curves):
    """The report against `http://decrop:<password>@host:5000`, served here by a local store."""
    local = _study(tmp_path / "store", finish=True)
    uri = f"http://decrop:{PASSWORD}@mlflow.example:5000"
    real = analysis.store.MlflowClient
    monkeypatch.setattr(analysis.store, "MlflowClient", lambda target: real(local if target == uri else target))
    out_dir = tmp_path / "out"
    assert report.main(["--mlflow-uri", uri, "--out", str(out_dir)]) == 0
    printed = capsys.readouterr()
    assert "decrop:***@mlflow.example:5000" in printed.out
    assert PASSWORD not in printed.out + printed.err
    written = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert {"report.html", "report.md"} <= set(written)
    assert "decrop:***@mlflow.example:5000" in written["report.md"].decode()
    assert not [name for name, data in written.items() if PASSWORD.encode() in data]


def test_a_password_in_the_uri_is_redacted_in_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    err = _refused(["--mlflow-uri", f"http://decrop:{PASSWORD}@127.0.0.1:9", "--out", str(tmp_path)], capsys)
    assert "cannot read the MLflow store http://decrop:***@127.0.0.1:9" in err and PASSWORD not in err


# ------------------------------------------------------------------------------------------ importing


def test_import_changes_neither_sys_path_nor_environment():
    code = ("import os, sys, ray\n"  # ray puts its bundled packages on sys.path when imported: take it first
            "path, env = list(sys.path), dict(os.environ)\n"
            "import analysis.report\n"
            "assert sys.path == path, set(sys.path) ^ set(path)\n"
            "assert {k: v for k, v in os.environ.items() if k.startswith('MLFLOW_')} == "
            "{k: v for k, v in env.items() if k.startswith('MLFLOW_')}\n"
            "analysis.report.main(['--mlflow-uri', '/nonexistent/mlflow.db'])\n"
            "assert 'MLFLOW_HTTP_REQUEST_MAX_RETRIES' not in os.environ, 'main() restores the environment'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
