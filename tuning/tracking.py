"""Everything MLflow for a sweep; the rest of ``tuning/`` never calls mlflow directly.

It writes the schema of `tuning.schema` (roles, tags, metric names): one experiment per study, a parent run per
study, a nested child run per Tune trial. Every run carries the git commit. A preset's trials certify the test
images as ``certify_test_<method>/*`` metrics and ``certify/test_<method>.tsv``.

Runs are created explicitly and found again by tag, never remembered in process state: a resumed sweep
(``Tuner.restore``) or a retried trial gets back the run it had, so no run is ever duplicated. Ray's
``MLflowLoggerCallback`` is not used: it makes no nested runs and duplicates runs after a restore.

All calls go through an explicit ``MlflowClient(tracking_uri)``, never mlflow's global "active run" state, so
several studies (or Ray workers in one process) cannot log into each other's runs. A local SQLite store is
fine for one machine; several processes writing it can hit "database is locked", so use an ``mlflow server``
URI on a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from ray.tune import Callback

from decrop.rows import CertRow, average_certified_radius, certified_accuracy, read_rows, write_rows

from .schema import (ATTEMPTS_METRIC, COMMIT_TAG, CURVE_STEPS_PER_UNIT, EPOCH_PREFIXES, FAILURE_TAG,
                     FAILURES_METRIC, PARENT_ROLES, PARENT_TAG, RESULT_TAG, ROLE_TAG, STUDY_TAG, SWEEP_ROLE,
                     TEST_CURVE_METRIC, TERMINAL_STATUSES, TRIAL_ROLE, TRIAL_TAG, acr_key, certification_prefix,
                     metric_key)

log = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100  # MLflow rejects a log_batch with more than 100 params
_MAX_PARAM_VALUE = 6000  # ... or a param value longer than this
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")  # what MLflow accepts in a param key (colons aside: not on Windows)


def git_commit(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` of `repo` (default: the checkout holding this code), with ``-dirty`` when tracked files
    have uncommitted changes; ``"unknown"`` outside a git checkout or without git. Never raises."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    # GIT_OPTIONAL_LOCKS=0: `git status` must not rewrite the index of a checkout another process may be using.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=20, check=True).stdout.strip()
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not re.fullmatch(r"[0-9a-f]{40}", head):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def plot_certified_curve(rows_by_label: Mapping[str, Sequence[CertRow]], path: Path, title: str) -> Path:
    """Certified accuracy (%) against l2 radius, one step curve per label, from radius 0 to just past the largest
    certified radius; written as a PNG at `path` (Agg canvas: no display, no pyplot global state). Returns `path`."""
    max_radius = max((row.radius for rows in rows_by_label.values() for row in rows), default=0.0)
    # 10% past the largest radius so the final drop to zero is visible
    grid = np.linspace(0.0, 1.1 * max_radius if max_radius > 0 else 1.0, 201)
    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, rows in rows_by_label.items():
        acc = certified_accuracy(rows, grid)
        ax.step(grid, [100.0 * acc[float(r)] for r in grid], where="post", label=label)
    ax.set(xlabel="l2 radius", ylabel="certified accuracy (%)", ylim=(0, 100), xlim=(0, grid[-1]), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _quote(value: str) -> str:
    """A value inside a search filter: MLflow's filter grammar has no escape for quotes, so refuse them."""
    if "'" in value:
        raise ValueError(f"names used to find runs may not contain a single quote: {value!r}")
    return f"'{value}'"


def _as_logged(params: Mapping[str, Any]) -> dict[str, str]:
    """`params` as MLflow stores them: keys made valid, values strings cut to MLflow's length."""
    return {_param_key(key): str(value)[:_MAX_PARAM_VALUE] for key, value in params.items()}


def _differences(logged: Mapping[str, str], params: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(key, logged, given) where `params` (already `_as_logged`) disagrees with what the run logged."""
    return [(key, logged[key], text) for key, text in params.items() if key in logged and logged[key] != text]


def _param_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key)).strip("/") or "_"


class StudyTracker:
    """Parent and child runs of one study in one MLflow experiment, through an explicit client.

    Picklable (it pickles as its URI and experiment name), so it can be handed to Tune callbacks and Ray tasks.
    """

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        is_sqlite = tracking_uri.startswith("sqlite:///")
        self._db = Path(tracking_uri.removeprefix("sqlite:///")).resolve() if is_sqlite else None
        if self._db is not None:  # SQLite creates the file, not its folder
            self._db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri)
        self.commit = git_commit()
        self._experiment_id: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return StudyTracker, (self.tracking_uri, self.experiment)  # the client holds a DB engine: rebuild it

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating the experiment on first use."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, self._artifact_location())
                    return self._experiment_id
                except MlflowException:  # another process created it between our lookup and our create
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment {self.experiment!r} is deleted; restore it "
                                 f"(mlflow experiments restore) or use another experiment name")
            self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _artifact_location(self) -> str | None:
        # A SQLite store's default artifact root is ./mlruns *relative to the current directory* at the time
        # the store is opened, i.e. inside whichever Ray trial folder made the experiment. Pin it next to the DB.
        # Servers (http) choose their own root: leave those alone.
        return (self._db.parent / "mlartifacts").as_uri() if self._db is not None else None

    # ---------------------------------------------------------------------------------------------------
    # Runs

    def start_sweep(self, study: str, params: Mapping[str, Any], resume: bool, role: str = SWEEP_ROLE) -> str:
        """The parent run id of `study`: created (and `params` logged), or with ``resume`` the existing one set back
        to RUNNING (a missing one is created). ValueError when it exists and ``resume`` is False. `role` is
        `SWEEP_ROLE` for the search, `PRESET_ROLE` for one of the paper's studies (nothing else: the report reads
        only the schema's roles)."""
        if role not in PARENT_ROLES:
            raise ValueError(f"a study's parent run has role {' or '.join(PARENT_ROLES)}, not {role!r}")
        existing = self._search(f"tags.`{STUDY_TAG}` = {_quote(study)} and tags.`{ROLE_TAG}` = {_quote(role)}")
        if existing and not resume:
            raise ValueError(f"study {study!r} already has a {role} run ({existing[0].info.run_id}) in MLflow "
                             f"experiment {self.experiment!r}; pass --resume to continue it or choose another "
                             f"--study name")
        if existing:
            run = existing[0]
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=study, tags={
                STUDY_TAG: study, ROLE_TAG: role, COMMIT_TAG: self.commit})
        self._log_new_params(run, params)
        return run.info.run_id

    def existing_parent(self, study: str, role: str) -> str | None:
        """The id of `study`'s parent run, if the experiment and the run exist; creates nothing (a check before
        any work starts)."""
        existing = self._search_existing(f"tags.`{STUDY_TAG}` = {_quote(study)} and tags.`{ROLE_TAG}` = "
                                         f"{_quote(role)}")
        return existing[0].info.run_id if existing else None

    def _search_existing(self, filter_string: str) -> list[Run]:
        """`_search`, where the experiment exists (and is not deleted); [] otherwise, creating nothing."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            return []
        self._experiment_id = experiment.experiment_id
        return self._search(filter_string)

    def find_trial_run(self, parent_run_id: str, trial_id: str) -> str | None:
        """The id of Tune trial `trial_id`'s child run under the parent run, or None."""
        return self.find_child(parent_run_id, {TRIAL_TAG: trial_id})

    def find_child(self, parent_run_id: str, tags: Mapping[str, str]) -> str | None:
        """The id of the parent's child run carrying all of `tags`, or None."""
        run = self._find_child(parent_run_id, tags)
        return run.info.run_id if run is not None else None

    def _find_child(self, parent_run_id: str, tags: Mapping[str, str]) -> Run | None:
        where = " and ".join([f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)}",
                              *(f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items())])
        runs = self._search(where)
        return runs[0] if runs else None

    def child_run(self, parent_run_id: str, tags: Mapping[str, str], run_name: str, params: Mapping[str, Any]
                  ) -> str:
        """The child run of the parent identified by `tags` (e.g. a trial id, or a setting and seed): the existing
        one (set back to RUNNING: a resumed or retried piece of work) or a new nested one, role ``trial`` (the
        schema's only child role). `params` not yet logged are logged."""
        run = self._find_child(parent_run_id, tags)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
                PARENT_TAG: parent_run_id, ROLE_TAG: TRIAL_ROLE, COMMIT_TAG: self.commit, **tags})
        self._log_new_params(run, params)
        return run.info.run_id

    def trial_run(self, parent_run_id: str, trial_id: str, trial_name: str, params: Mapping[str, Any],
                  tags: Mapping[str, Any] | None = None) -> str:
        """The child run of a Tune trial (`child_run` keyed by the trial id, role ``trial``), named for a human
        (``decrop mixing=0.25 seed=1``) and tagged with what a runs table groups by (`TRIAL_TAGS`)."""
        run_id = self.child_run(parent_run_id, {TRIAL_TAG: trial_id}, trial_name, params)
        for key, value in (tags or {}).items():
            if value is not None:
                self.client.set_tag(run_id, key, str(value))
        return run_id

    def finished_trial(self, trial_id: str) -> tuple[str, list[tuple[int, str, float]]] | None:
        """(the commit that ran trial `trial_id` of this experiment, its learning curves: (epoch, metric, value)
        for each per-epoch ``train/*`` and ``val/*`` metric, `MlflowStatusCallback`); None when the experiment has
        no such trial."""
        runs = self._search_existing(f"tags.`{TRIAL_TAG}` = {_quote(trial_id)}")
        if not runs:
            return None
        run = runs[0]
        return run.data.tags.get(COMMIT_TAG, "unknown"), [
            (int(m.step), key, float(m.value)) for key in sorted(run.data.metrics) if key.startswith(EPOCH_PREFIXES)
            for m in self.client.get_metric_history(run.info.run_id, key)]

    def log_curves(self, run_id: str, curves: Sequence[tuple[int, str, float]]) -> None:
        """(epoch, metric, value) triples (`finished_trial`'s curves of another run) logged at their epochs."""
        now = int(time.time() * 1000)
        self._log_batch(run_id, [Metric(key, float(value), now, int(epoch)) for epoch, key, value in curves])

    def start_attempt(self, run_id: str) -> int:
        """Count a new attempt of the run's trial (`ATTEMPTS_METRIC`); returns its number, 1 for the first."""
        attempt = len(self.client.get_metric_history(run_id, ATTEMPTS_METRIC)) + 1
        self.log_metrics(run_id, {ATTEMPTS_METRIC: attempt}, step=attempt)
        return attempt

    def save_result(self, run_id: str, result: Mapping[str, float]) -> None:
        """Record the final result a trial reports to Tune (`RESULT_TAG`): proof that the trial finished."""
        self.client.set_tag(run_id, RESULT_TAG, json.dumps(dict(result)))

    def saved_result(self, run_id: str) -> dict[str, float] | None:
        """The final result the trial of this run recorded (`save_result`), or None if it never finished."""
        text = self.client.get_run(run_id).data.tags.get(RESULT_TAG)
        return json.loads(text) if text else None

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log the `params` the run does not have yet (params are immutable in MLflow)."""
        self._log_new_params(self.client.get_run(run_id), params)

    def rows(self, run_id: str, label: str) -> list[CertRow]:
        """The certification rows a run logged under `label` (``certify/<label>.tsv``)."""
        with tempfile.TemporaryDirectory() as tmp:
            return read_rows(self.client.download_artifacts(run_id, f"certify/{label}.tsv", tmp))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def param_differences(self, run_id: str, params: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """(key, logged value, value in `params`) for every key of `params` the run logged with another value (as
        MLflow stores it: a string, the key and length as `_log_new_params` writes them)."""
        return _differences(self.client.get_run(run_id).data.params, _as_logged(params))

    def _log_new_params(self, run: Run, params: Mapping[str, Any]) -> None:
        # MLflow params are immutable: re-logging a key with another value fails, so a resumed run keeps the
        # values it was started with and only gains keys it lacked.
        logged, given = run.data.params, _as_logged(params)
        for key, was, now in _differences(logged, given):
            log.warning("run %s keeps param %s=%r (not %r): params are immutable", run.info.run_id, key, was, now)
        new = [Param(key, text) for key, text in given.items() if key not in logged]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=new[start:start + _PARAMS_PER_BATCH])

    def finish(self, run_id: str, status: str) -> None:
        """End a run with status FINISHED, FAILED or KILLED."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        self.client.set_terminated(run_id, status)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def trial_runs(self, parent_run_id: str) -> pd.DataFrame:
        """One row per child run of the parent, oldest first: run_id, run_name, trial_id, status, start_time,
        then ``params.<key>`` (strings, as MLflow stores them) and ``metrics.<key>`` (latest values)."""
        runs = self._search(f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)}")
        rows = [{"run_id": r.info.run_id, "run_name": r.info.run_name, "trial_id": r.data.tags.get(TRIAL_TAG),
                 "status": r.info.status, "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
                 **{f"params.{k}": v for k, v in r.data.params.items()},
                 **{f"metrics.{k}": v for k, v in r.data.metrics.items()}} for r in runs]
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run_id", "run_name", "trial_id", "status",
                                                                        "start_time"])

    def _search(self, filter_string: str) -> list[Run]:
        """Active runs of the experiment matching the filter, oldest first (so "the" run found is the first made)."""
        runs, token = [], None
        while True:  # search_runs pages at 1000 runs
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    # ---------------------------------------------------------------------------------------------------
    # Metrics and artifacts

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log all `metrics` at `step` in one call; keys (``train/loss``, ``certify/acc_r0.25``) kept as given."""
        now = int(time.time() * 1000)
        self._log_batch(run_id, [Metric(key, float(value), now, int(step)) for key, value in metrics.items()])

    def _log_batch(self, run_id: str, entries: Sequence[Metric]) -> None:
        for start in range(0, len(entries), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=entries[start:start + 1000])

    def log_certification(self, run_id: str, rows: Sequence[CertRow], radii: Sequence[float], label: str,
                          artifact_dir: str = "certify", step: int = 0) -> dict[str, float]:
        """Certified accuracy at each radius and the ACR of `rows` as metrics (``certify/...`` for the
        "validation" label, ``certify_<label>/...`` otherwise), plus ``<artifact_dir>/<label>.tsv`` (Cohen's
        table) and ``<artifact_dir>/<label>_curve.png``. A test label's curve is also logged as
        `TEST_CURVE_METRIC`, one name for every method, so the chart view overlays DE-CROP's and the baseline's
        trials in one chart (a trial certifies one test label). Returns the metrics logged."""
        if not re.fullmatch(r"[\w\-]+", label):
            raise ValueError(f"label must be letters, digits, '_' or '-', got {label!r}")
        metrics = {metric_key(label, r): acc for r, acc in certified_accuracy(rows, radii).items()}
        metrics[acr_key(label)] = average_certified_radius(rows)
        self.log_metrics(run_id, metrics, step)
        self.log_curve(run_id, rows, f"{certification_prefix(label)}/curve")
        if label.startswith("test_"):
            self.log_curve(run_id, rows, TEST_CURVE_METRIC)
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / f"{label}.tsv"
            write_rows(rows, table)
            curve = plot_certified_curve({label: rows}, Path(tmp) / f"{label}_curve.png",
                                         title=f"certified accuracy ({label}, {len(rows)} images)")
            for path in (table, curve):
                self.log_artifact(run_id, path, artifact_dir)
        return metrics

    def log_curve(self, run_id: str, rows: Sequence[CertRow], key: str) -> None:
        """The certified-accuracy curve of `rows` as the stepped metric `key`, step = radius in hundredths
        (`CURVE_STEPS_PER_UNIT`), from 0 to one step past the largest certified radius: the MLflow UI's chart
        view then overlays the curves of the selected runs."""
        top = max((r.radius for r in rows if r.correct), default=0.0)
        steps = range(int(top * CURVE_STEPS_PER_UNIT) + 2)
        accuracy = certified_accuracy(rows, [s / CURVE_STEPS_PER_UNIT for s in steps])
        now = int(time.time() * 1000)
        self._log_batch(run_id, [Metric(key, float(acc), now, s) for s, acc in zip(steps, accuracy.values())])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts, under `artifact_path` if given."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file` (e.g. ``config.yaml``)."""
        self.client.log_text(run_id, text, artifact_file)


def _last_error(trial: Any) -> str:
    """The last line of a Tune trial's error file (``RuntimeError: ...``), for a tag; never raises."""
    try:
        lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
        return lines[-1][:500] if lines else "unknown error"
    except (OSError, TypeError, AttributeError):
        return "unknown error (see the trial's error.txt)"


class MlflowStatusCallback(Callback):
    """Driver-side Tune callback that logs each trial's training curves and ends its child run with its fate.

    Every per-epoch result of a trial's training (a report of the Train workers' rank 0, forwarded by
    ``TuneReportCallback``: it has ``epoch``) is logged to the trial's run at that step (its ``train/*`` and
    ``val/*`` metrics, and ``train/resumed_from_epoch`` after a resume), so the training workers never load MLflow.

    Trials cannot always end their own run: an errored trial's process may be gone, and a trial stopped by the
    scheduler (ASHA) is terminated without running its own clean-up. Errored trials become FAILED (a run is
    created if the trial died before making one, so every failure shows in MLflow); completed trials FINISHED,
    unless already FAILED or KILLED. Every failed attempt is recorded in the run (`FAILURES_METRIC`, `FAILURE_TAG`),
    the ones Tune retries (``FailureConfig(max_failures=...)``) too: their run stays RUNNING, and the next attempt
    counts itself (`ATTEMPTS_METRIC`). Tracking problems are logged, never raised: they must not abort the sweep.
    """

    def __init__(self, tracker: StudyTracker, parent_run_id: str) -> None:
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self._runs: dict[str, str] = {}  # trial id -> its run, once found

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result:  # a trial's final result: the trial logged it itself
            return
        metrics = {k: float(v) for k, v in result.items()
                   if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            run_id = self._runs.get(trial.trial_id) or self.tracker.find_trial_run(self.parent_run_id,
                                                                                   trial.trial_id)
            if run_id is None:
                return
            self._runs[trial.trial_id] = run_id
            self.tracker.log_metrics(run_id, metrics, step=int(result["epoch"]))
        except (MlflowException, OSError, ValueError) as err:
            log.warning("could not log epoch %s of trial %s: %s", result["epoch"], trial.trial_id, err)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED", create=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, None, create=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED", create=False)

    def _end(self, trial: Any, status: str | None, create: bool) -> None:
        """Mark the trial's run `status` (None: a failed attempt that Tune retries, the run goes on)."""
        try:
            run_id = self.tracker.find_trial_run(self.parent_run_id, trial.trial_id)
            if run_id is None and create:
                run_id = self.tracker.trial_run(self.parent_run_id, trial.trial_id, str(trial),
                                                getattr(trial, "config", None) or {})
            if run_id is None:
                return
            if status == "FINISHED" and self.tracker.run_status(run_id) in ("FAILED", "KILLED"):
                return
            if status in ("FAILED", None):
                failures = max(1, int(getattr(trial, "num_failures", 0) or 0))
                self.tracker.log_metrics(run_id, {FAILURES_METRIC: failures}, step=failures)
                self.tracker.set_tag(run_id, f"{FAILURE_TAG}{failures}", _last_error(trial))
            if status is not None:
                self.tracker.finish(run_id, status)
        except (MlflowException, OSError, ValueError) as err:
            log.warning("could not mark the MLflow run of trial %s %s: %s", trial.trial_id, status or "retried", err)
