"""tuning.tracking.redact_uri hides the password of a tracking URI, and the sweep prints no password."""


import pytest

from tuning import sweep
from tuning.schema import redact_uri


@pytest.mark.parametrize("uri, shown", [
    ("http://decrop:hunter2@mlflow:5000", "http://decrop:***@mlflow:5000"),
    ("https://u:p%40ss@host/path?x=1", "https://u:***@host/path?x=1"),
    ("http://u:p@ss@host:5000/x", "http://u:***@host:5000/x"),  # an unencoded '@': urllib splits at the last
    ("postgresql+psycopg2://me:pw@db.internal/mlflow", "postgresql+psycopg2://me:***@db.internal/mlflow"),
    ("http://host:5000/?token=abc&experiment=1", "http://host:5000/?token=***&experiment=1"),
    ("http://decrop@mlflow:5000", "http://decrop@mlflow:5000"),  # a user alone is no secret
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////home/me/decrop-runs/quick-study/mlflow.db", "sqlite:////home/me/decrop-runs/quick-study/mlflow.db"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # idempotent: redacting a shown URI changes nothing


def test_redact_uri_inside_a_message():
    message = "API request to http://decrop:hunter2@mlflow:5000/api/2.0/mlflow/runs/get failed; see http://docs"
    assert redact_uri(message) == ("API request to http://decrop:***@mlflow:5000/api/2.0/mlflow/runs/get failed; "
                                   "see http://docs")


def test_sweep_start_line_shows_no_password(tmp_path, monkeypatch, capsys):
    uri = "http://decrop:hunter2@mlflow.example:5000"

    class Tracker:  # stands in for the server: the sweep only needs the parent run and the experiment id
        experiment_id = "1"

        def __init__(self, tracking_uri, experiment):
            assert tracking_uri == uri  # the sweep still connects with the real credentials

        def start_sweep(self, *args, **kwargs):
            return "parent"

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    import decrop.prepare
    import tuning.studies
    import tuning.tracking
    from types import SimpleNamespace

    # No server, no data, no Ray: the study's start line (open_study) is printed before its first trial.
    monkeypatch.setattr(tuning.tracking, "StudyTracker", Tracker)
    monkeypatch.setattr(sweep, "preflight", lambda name, args, base: None)
    monkeypatch.setattr(decrop.prepare, "prepare", lambda cfg: SimpleNamespace(
        clean_accuracy=1.0, budget={"classifier_sha256": "0" * 64}))
    monkeypatch.setattr(sweep, "connect", lambda: None)
    monkeypatch.setattr(sweep, "check_cluster", lambda args: None)
    monkeypatch.setattr(sweep, "concurrency", lambda args: 1)
    monkeypatch.setattr(tuning.studies, "run_search", stop)
    with pytest.raises(Stop):
        sweep.main(["--storage", str(tmp_path), "--mlflow-uri", uri])
    out = capsys.readouterr()
    assert "MLflow http://decrop:***@mlflow.example:5000 (experiment 1)" in out.out
    assert "hunter2" not in out.out + out.err
