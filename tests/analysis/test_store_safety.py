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
from tuning.schema import default_tracking_uri
from tuning.tracking import StudyTracker

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


def _study(root: Path, finish: bool, name: str = "live") -> str:
    """A store at root/mlflow.db with one sweep `name` (one certified trial, test labels on the parent), RUNNING
    unless `finish`; returns its URI."""
    uri = default_tracking_uri(root)
    tracker = StudyTracker(uri, name)
    parent = tracker.start_sweep(name, {"base.sigma": 0.25, "base.certify.radii": "[0.0, 0.25]"}, resume=False)
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
    assert f"every study under {tmp_path}/decrop-runs is still running: reading the newest" in out
    assert "report: not logged to the store: study 'live' is still running" in out


def _parent(uri: str, name: str = "live") -> str:
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                filter_string="tags.`decrop.role` = 'sweep'")
    return run.info.run_id


def test_a_running_study_is_read_never_written(tmp_path, capsys, no_curves):
    """The report of a study still running goes into --out only: nothing is logged into its parent run."""
    uri = _study(tmp_path / "live", finish=False)
    out_dir = tmp_path / "out"
    assert report.main(["--mlflow-uri", uri, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "report: warning: study 'live' is still running" in out and "this report is partial" in out
    lines = [line for line in out.splitlines() if line.startswith("report: not logged to the store")]
    assert lines == [f"report: not logged to the store: study 'live' is still running (a running study is read, "
                     f"never written); the report is only in {out_dir}: rerun the report once the study has "
                     f"finished to log it under report/ of its parent run"]
    assert "files under report/ of run" not in out and "could not log" not in out
    assert {"report.html", "report.md", "certified.csv"} <= {p.name for p in out_dir.iterdir()}
    client = MlflowClient(uri)
    parent = _parent(uri)
    assert client.list_artifacts(parent, "report") == []
    assert "report" not in {a.path for a in client.list_artifacts(parent)}
    assert client.get_run(parent).info.status == "RUNNING"  # the study's run is left as it was

    tracker = StudyTracker(uri, "live")  # once the study has finished, the same command logs the report
    tracker.finish(parent, "FINISHED")
    assert report.main(["--mlflow-uri", uri, "--out", str(out_dir)]) == 0
    assert "still running" not in capsys.readouterr().out
    assert {Path(a.path).name for a in client.list_artifacts(parent, "report")} == {p.name for p in out_dir.iterdir()}


def test_a_study_resumed_while_it_is_read_is_not_written(tmp_path, monkeypatch, capsys, no_curves):
    """Finished when the report starts, running again (--resume) when it would log: nothing is logged."""
    uri = _study(tmp_path / "live", finish=True)
    parent = _parent(uri)
    real = report.write_report

    def resume_meanwhile(analysis, out):
        StudyTracker(uri, "live").start_sweep("live", {}, resume=True)  # the sweep's --resume: RUNNING again
        return real(analysis, out)

    monkeypatch.setattr(report, "write_report", resume_meanwhile)
    assert report.main(["--mlflow-uri", uri, "--out", str(tmp_path / "out")]) == 0
    assert "report: not logged to the store: study 'live' is still running" in capsys.readouterr().out
    assert MlflowClient(uri).list_artifacts(parent, "report") == []


def test_by_default_the_newest_finished_study_is_read(tmp_path, monkeypatch, capsys, no_curves):
    """No --mlflow-uri: the newest store under ~/decrop-runs whose study has finished; a newer store of a study
    still running is skipped with a line saying why, and left unchanged."""
    runs = tmp_path / "decrop-runs"
    _study(runs / "done", finish=True, name="done")
    _study(runs / "live", finish=False, name="live")
    done, live = runs / "done" / "mlflow.db", runs / "live" / "mlflow.db"
    os.utime(done, (done.stat().st_atime - 1000, done.stat().st_mtime - 1000))  # the finished one is older
    assert live.stat().st_mtime > done.stat().st_mtime
    before = _state(live)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert report.main([]) == 0
    out = capsys.readouterr().out
    assert (f"report: skipped {live}: study 'live' is still running (a report of it would be partial; pass "
            f"--mlflow-uri {live} to read it anyway)") in out
    assert f"report: reading {done}, the newest store whose study has finished under {runs} (2 found)" in out
    assert out.index("report: skipped") < out.index("report: reading") < out.index("report: loading the runs of done")
    assert "still running (its" not in out and "partial" not in out.split("report: reading")[1]
    assert (tmp_path / "reports" / "done" / "report.html").exists() and not (tmp_path / "reports" / "live").exists()
    assert MlflowClient(f"sqlite:///{done}").list_artifacts(_parent(f"sqlite:///{done}", "done"), "report")
    assert _state(live) == before  # the running study's store: not a byte changed


def test_the_running_check_looks_at_the_experiments_the_report_reads(tmp_path, no_curves):
    """A store is judged by the experiments the report would read there: those named with --experiment, else the
    newest one; an interrupted study in another experiment of the store does not make it running."""
    from analysis.store import running_in_store
    _study(tmp_path / "a", finish=True, name="done")
    _study(tmp_path / "a", finish=False, name="live")  # created after: the store's newest experiment
    _study(tmp_path / "b", finish=False, name="live")
    _study(tmp_path / "b", finish=True, name="done")
    a, b = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    before = (_state(a), _state(b))
    assert running_in_store(a) == ["live"] and running_in_store(b) == []
    assert running_in_store(a, ["done"]) == [] and running_in_store(b, ["done", "live"]) == ["live"]
    assert running_in_store(a, ["nope"]) == []
    assert (_state(a), _state(b)) == before


def test_the_running_check_of_the_default_store_reads_only_stores(tmp_path):
    """A file that is no MLflow store is not judged running (open_store refuses it later), and is not changed."""
    from analysis.store import running_in_store
    empty, text = tmp_path / "a.db", tmp_path / "b.db"
    empty.write_bytes(b"")
    text.write_text("notes\n")
    before = (_state(empty), _state(text))
    assert running_in_store(empty) == [] and running_in_store(text) == [] and running_in_store(tmp_path / "c.db") == []
    assert (_state(empty), _state(text)) == before and not (tmp_path / "c.db").exists()


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
