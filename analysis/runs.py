"""MLflow store -> runs frame -> certification rows -> the tidy certified-accuracy frame.

What is read (the schema of ``tuning/schema.py``): runs tagged ``decrop.role`` = ``sweep`` (the search's
parent; its params are ``base.<key>``), ``preset`` (the parent of one of the paper's studies, `tuning.presets`)
and ``trial`` (one Tune trial, child of either); trials carry the flat config as string params. Trials say
what they are with the tags ``decrop.preset``, ``decrop.factor``, ``decrop.level`` (absent on the baseline and
reference a preset shares across its levels), ``decrop.method``, ``decrop.seed`` and ``decrop.variant`` (the
confirmation's ``best``/``default``), from which `load_runs` derives each run's ``kind``. Certification of
label L is the metrics ``certify/...`` (L = validation) or ``certify_L/...`` and the artifact ``certify/L.tsv``
(Cohen's rows), from which every number of the report is recomputed; the logged metrics are only a
cross-check.
"""

from __future__ import annotations

import ast
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Experiment, Run, ViewType
from mlflow.exceptions import MlflowException
from statsmodels.stats.proportion import proportion_confint

from decrop.rows import CertRow, average_certified_radius, certified_counts, read_rows
from tuning.presets import PRESETS, SEARCH
from tuning.schema import (BASE_PREFIX, BEST_TRIAL_TAG, CERT_METRIC, COMMIT_TAG, FACTOR_TAG, LEVEL_TAG, METHOD_TAG,
                           OBJECTIVE_METRIC, PARENT_ROLES, PARENT_TAG, PRESET_ROLE, PRESET_TAG, REUSED_TAG, ROLE_TAG,
                           SEARCHED, SPACE, STUDY_TAG, TRIAL_ROLE, TRIAL_TAG, VARIANT_TAG, metric_key, redact_uri)

# What a run is (the ``kind`` column): the parents, a search trial (validation objective), a trial of the
# search's confirmation (fresh seeds, test images), a trial of a paper's study.
SEARCH_TRIAL, CONFIRM_TRIAL, PRESET_TRIAL = "search_trial", "confirm_trial", "preset_trial"
STUDY_KINDS = (CONFIRM_TRIAL, PRESET_TRIAL)  # trials that the study sections (analysis/studies.py) report
# The searched hyperparameters and their scale (tuning.schema.SEARCHED): "log" ones are analysed as log10.
SETTING_FACTORS = ("sigma", "data.percent", "seed", "denoiser.arch")
FACTORS = (*SETTING_FACTORS, *SEARCHED)
_SETTING_CASTS = {"sigma": float, "data.percent": float, "seed": int, "denoiser.arch": str,
                  "decrop.stage2_epochs": int}  # the searched ones cast as tuning.schema.SPACE says
Progress = Callable[[str], None]


class ReportError(Exception):
    """Bad input (store, experiment, runs): ``main`` prints the message as ``error: ...`` and exits with 2."""


# ---------------------------------------------------------------------------------------------------------
# Experiments (opening the store: analysis/store.py)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return redact_uri(text[0] if text else type(err).__name__)[:300]


def pick_experiments(client: MlflowClient, names: Sequence[str] | None, uri: str) -> list[Experiment]:
    """The named experiments, or the most recently created one other than Default; ReportError naming the
    experiments that exist when a name is unknown. `uri` is only shown in messages (pass it redacted)."""
    experiments, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        experiments.extend(page)
        token = page.token
        if not token:
            break
    by_name = {e.name: e for e in experiments}
    listing = ", ".join(sorted(repr(n) for n in by_name)) or "none"
    if names:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ReportError(f"unknown experiment {unknown[0]!r} in {uri}; experiments there: {listing}")
        return [by_name[n] for n in dict.fromkeys(names)]
    candidates = [e for e in experiments if e.name != "Default"]
    if not candidates:
        raise ReportError(f"no experiment other than Default in {uri}; run a study first")
    return [max(candidates, key=lambda e: e.creation_time or 0)]


def level_text(value: object) -> str:
    """A categorical value as text; 2.0 (an int column that pandas made float next to a NaN) reads 2."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# Runs


def _cast(text: str | None, kind: type) -> object:
    if text is None:
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        return None


def _factors(params: dict[str, str], prefix: str) -> dict[str, object]:
    """Typed factor columns from a run's string params (a parent's are ``base.<key>``)."""
    values = {key: _cast(params.get(prefix + key), kind) for key, kind in _SETTING_CASTS.items()}
    values.update({p.name: p.cast(params.get(prefix + p.name)) for p in SPACE if p.name != "stage2"})
    epochs = values.pop("decrop.stage2_epochs")
    values["stage2"] = None if epochs is None else epochs > 0
    if values["stage2"] is False:  # the gradient-reversal schedule only exists when stage 2 runs
        values["decrop.beta_scale"] = values["decrop.beta_gamma"] = None
    return values


def _run_record(run: Run, experiment: str) -> dict[str, object]:
    tags, params = run.data.tags, run.data.params
    role = tags.get(ROLE_TAG, "other")
    parent = role in PARENT_ROLES  # a parent names its preset and factor in its params
    record = {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment": experiment, "role": role,
              "parent_run_id": tags.get(PARENT_TAG), "study": tags.get(STUDY_TAG), "trial_id": tags.get(TRIAL_TAG),
              "setting": None, "best_trial_id": tags.get(BEST_TRIAL_TAG),  # setting: load_runs derives it
              f"tags.{REUSED_TAG}": tags.get(REUSED_TAG), f"tags.{COMMIT_TAG}": tags.get(COMMIT_TAG),
              "preset": tags.get(PRESET_TAG, params.get("preset") if parent else None),
              "factor": tags.get(FACTOR_TAG, params.get("factor") if parent else None),
              "level": tags.get(LEVEL_TAG), "trial_method": tags.get(METHOD_TAG), "variant": tags.get(VARIANT_TAG),
              "status": run.info.status,
              "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
              "end_time": pd.to_datetime(run.info.end_time, unit="ms") if run.info.end_time else pd.NaT}
    record.update(_factors(params, BASE_PREFIX if parent else ""))
    record.update({f"params.{k}": v for k, v in params.items()})
    record.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    return record


def load_runs(client: MlflowClient, experiment_ids: Sequence[str]) -> pd.DataFrame:
    """One row per active run of the experiments, oldest first, indexed by run_id: run_id, run_name, experiment,
    role, parent_run_id, study, trial_id, setting, best_trial_id, preset, factor, level, trial_method, variant
    (the trial tags), status, start_time, end_time, the typed factor columns (`FACTORS`; NaN where a run lacks
    them), then ``params.<key>`` (strings) and ``metrics.<key>`` (latest values), and ``kind`` (`run_kinds`).
    ``setting`` is the study (trials: their parent's; a preset's trials add their level, the confirmation's
    ``confirmation``)."""
    names = {i: client.get_experiment(i).name for i in experiment_ids}
    runs, token = [], None
    while True:  # search_runs pages at 1000 runs
        page = client.search_runs(list(experiment_ids), run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    frame = pd.DataFrame([_run_record(r, names[r.info.experiment_id]) for r in runs])
    if frame.empty:
        return frame
    frame.index = pd.Index(frame["run_id"], name=None)
    own = frame["study"].fillna(frame["run_name"])
    frame["setting"] = frame["parent_run_id"].map(own).fillna(own)  # trials share their parent's
    frame["study"] = frame["study"].fillna(frame["parent_run_id"].map(frame["study"]))
    frame["kind"] = run_kinds(frame)
    for run_id in frame.index[frame["kind"].isin(STUDY_KINDS)]:
        run = frame.loc[run_id]
        where = ("confirmation" if run["kind"] == CONFIRM_TRIAL else
                 level_name(run["preset"], run["factor"], run["level"]))
        frame.at[run_id, "setting"] = f"{run['setting']} {where}"
    return frame


def run_kinds(runs: pd.DataFrame) -> pd.Series:
    """What each run is: its role for the parents; a trial is a `PRESET_TRIAL` (under a preset parent, or tagged
    with a preset other than the search), a `CONFIRM_TRIAL` (the search's confirmation: a ``decrop.variant``, or
    the baseline or the reference) or a `SEARCH_TRIAL` (every other trial: the search's own)."""
    parent_role = runs["parent_run_id"].map(runs["role"])
    preset = runs["preset"].notna() & (runs["preset"] != SEARCH)
    confirm = runs["variant"].notna() | runs["trial_method"].isin(["baseline", "none"])
    trial = np.where(preset | (parent_role == PRESET_ROLE), PRESET_TRIAL, np.where(confirm, CONFIRM_TRIAL,
                                                                                  SEARCH_TRIAL))
    return pd.Series(np.where(runs["role"] == TRIAL_ROLE, trial, runs["role"]), index=runs.index)


def level_name(preset: object, factor: object, level: object) -> str:
    """How a preset's level reads (``mixing=0.25``, ``with boundary samples``; `tuning.presets.Preset.level_name`);
    ``(all levels)`` for a baseline or reference that the levels share (no level)."""
    if level is None or (isinstance(level, float) and np.isnan(level)):
        return "(all levels)"
    known = PRESETS.get(preset) if isinstance(preset, str) else None
    if known is not None:
        value = next((v for v in known.levels if str(v) == str(level)), None)
        if value is not None:
            return known.level_name(value)
    return f"{str(factor).split('.')[-1]}={level}" if isinstance(factor, str) else str(level)


def load_histories(client: MlflowClient, runs: pd.DataFrame, key: str, progress: Progress) -> pd.DataFrame:
    """Per-step values of metric `key` of the search trials that logged it: columns run_id, step, value."""
    column = f"metrics.{key}"
    if column not in runs:
        return pd.DataFrame(columns=["run_id", "step", "value"])
    ids = runs.index[(runs["kind"] == SEARCH_TRIAL) & runs[column].notna()]
    progress(f"report: reading the {key} history of {len(ids)} trials")
    records = [{"run_id": run_id, "step": m.step, "value": m.value}
               for run_id in ids for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(records, columns=["run_id", "step", "value"])


# ---------------------------------------------------------------------------------------------------------
# Certification rows


def _metric_labels(run: pd.Series) -> dict[str, set[float]]:
    """Labels with certification metrics, each with the radii in its metric names."""
    labels: dict[str, set[float]] = {}
    for column, value in run.items():
        match = CERT_METRIC.match(column.removeprefix("metrics.")) if column.startswith("metrics.") else None
        if match and pd.notna(value):
            radii = labels.setdefault(match["label"] or "validation", set())
            if match["radius"] is not None:
                radii.add(float(match["radius"]))
    return labels


def download_rows(client: MlflowClient, runs: pd.DataFrame,
                  progress: Progress) -> tuple[dict[tuple[str, str], list[CertRow]], list[str]]:
    """The certification rows of every (run_id, label) with a ``certify/<label>.tsv`` artifact, and notes on
    labels that have metrics but no readable table (those are left out of the report)."""
    progress(f"report: listing the certification tables of {len(runs)} runs")
    wanted, notes = [], []
    for run_id, run in runs.iterrows():
        try:
            tables = {Path(f.path).stem for f in client.list_artifacts(run_id, "certify")
                      if not f.is_dir and f.path.endswith(".tsv")}
        except (MlflowException, OSError) as err:
            notes.append(f"run {run['run_name']}: its artifacts cannot be listed ({_first_line(err)}); left out")
            continue
        for label in sorted(set(_metric_labels(run)) - tables):
            notes.append(f"run {run['run_name']} has {label} certification metrics but no certify/{label}.tsv "
                         f"table; left out")
        wanted += [(run_id, label) for label in sorted(tables)]
    progress(f"report: downloading {len(wanted)} certification tables")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run_id, label) in enumerate(wanted):
            dst = Path(tmp) / str(i)
            dst.mkdir()
            try:
                label_rows = read_rows(client.download_artifacts(run_id, f"certify/{label}.tsv", str(dst)))
            except (ValueError, OSError, MlflowException) as err:
                notes.append(f"run {runs.at[run_id, 'run_name']}: certify/{label}.tsv unreadable ({err}); left out")
                continue
            if not label_rows:
                notes.append(f"run {runs.at[run_id, 'run_name']}: certify/{label}.tsv has no rows; left out")
                continue
            rows[(run_id, label)] = label_rows
    return rows, notes


def _param_radii(run: pd.Series) -> list[float]:
    text = run.get("params.certify.radii")
    try:
        return [float(r) for r in ast.literal_eval(text)] if isinstance(text, str) else []
    except (ValueError, SyntaxError, TypeError):
        return []


def _method(run: pd.Series, label: str) -> str:
    if label != "validation":
        return label.removeprefix("test_")
    try:  # a trial certifies the one method it trained
        methods = [m for m in ast.literal_eval(run.get("params.methods") or "[]") if m != "none"]
    except (ValueError, SyntaxError):
        methods = []
    return methods[0] if methods else "decrop"


def certification_frame(runs: pd.DataFrame, rows: dict[tuple[str, str], Sequence[CertRow]]) -> pd.DataFrame:
    """The tidy frame: one row per (run, label, radius) with the run's identity and factors, split
    (validation | test), method, radius, n_images, n_certified, accuracy, the 95% Clopper-Pearson interval
    (ci_low, ci_high) over images, the label's acr, and the logged metric (logged_accuracy, NaN if none).
    Radii: the run's ``certify.radii`` param, those in its metric names, and 0."""
    keep = ["run_id", "run_name", "experiment", "role", "kind", "parent_run_id", "setting", "trial_id", "status",
            *FACTORS]
    records = []
    for (run_id, label), label_rows in rows.items():
        run = runs.loc[run_id]
        identity = {k: run.get(k) for k in keep}
        split = "validation" if label == "validation" else "test" if label.startswith("test_") else "other"
        acr, n = average_certified_radius(label_rows), len(label_rows)
        radii = sorted({0.0, *_param_radii(run), *_metric_labels(run).get(label, ())})
        for r, k in certified_counts(label_rows, radii).items():
            lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
            records.append({**identity, "label": label, "split": split, "method": _method(run, label),
                            "radius": r, "n_images": n, "n_certified": k, "accuracy": k / n,
                            "ci_low": float(lo), "ci_high": float(hi), "acr": acr,
                            "logged_accuracy": run.get(f"metrics.{metric_key(label, r)}", np.nan)})
    return pd.DataFrame(records)


def check_logged(cert: pd.DataFrame) -> list[str]:
    """A warning for every (run, label, radius) whose count from the table differs from the logged metric."""
    if cert.empty:
        return []
    off = cert[cert["logged_accuracy"].notna() & ((cert["accuracy"] - cert["logged_accuracy"]).abs() > 1e-9)]
    return [f"run {r.run_name}, {r.label}, r={r.radius:.2f}: {r.n_certified}/{r.n_images} certified in the table "
            f"= {r.accuracy:.4f}, but the logged metric is {r.logged_accuracy:.4f} (the table rounds radii to "
            f"4 decimals; a larger gap means the table and the metric disagree)" for r in off.itertuples()]


# ---------------------------------------------------------------------------------------------------------
# Runs without results


def _why(run: pd.Series) -> str:
    if run["status"] == "FAILED":
        return "failed"
    if run["status"] == "KILLED":
        return "killed"
    if run["status"] in ("RUNNING", "SCHEDULED"):
        return "still running or interrupted"
    if run["kind"] == SEARCH_TRIAL and pd.notna(run.get("metrics.val/agreement")):
        return "stopped early by ASHA"
    return "finished without certifying"


def missing_results(runs: pd.DataFrame, rows: dict[tuple[str, str], object]) -> list[str]:
    """One phrase per role of the runs that have no certification table, with why (from status and metrics),
    e.g. "all 3 trials (2 stopped early by ASHA, 1 failed)". A parent run certifies nothing itself (its trials
    do): it is named only when nothing at all was certified."""
    certified = {run_id for run_id, _ in rows}
    without = runs[~runs.index.isin(certified)]
    if certified:
        without = without[~without["role"].isin(PARENT_ROLES)]
    phrases = []
    for role, group in without.groupby("role", sort=False):
        total = int((runs["role"] == role).sum())
        reasons = Counter(_why(run) for _, run in group.iterrows())
        why = ", ".join(f"{n} {reason}" if len(group) > 1 else reason for reason, n in reasons.most_common())
        noun = role + ("s" if total > 1 else "")
        share = (f"all {total}" if total > 1 else "the") if len(group) == total else f"{len(group)} of {total}"
        phrases.append(f"{share} {noun} ({why})")
    return phrases


def running_studies(runs: pd.DataFrame) -> list[str]:
    """A warning per parent run (a sweep or a preset) in status RUNNING: its study is still going on, or was
    interrupted without ending its run, so a report of it shows only what has been logged so far."""
    parents = runs[runs["role"].isin(PARENT_ROLES) & (runs["status"] == "RUNNING")]
    return [f"study {run['study'] or run['run_name']!r} is still running (its {run['role']} run is RUNNING, or "
            f"the study was interrupted): this report is partial, it shows what was logged until now"
            for _, run in parents.iterrows()]


def running_parents(client: MlflowClient, experiment_ids: Sequence[str]) -> list[str]:
    """The studies of the experiments whose parent run (a sweep or a preset) is RUNNING now, by name: asked of the
    store itself, so the report can check it both before reading the runs and just before it would log into
    them. A study still running is read, never written (its report stays in the out folder)."""
    names, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string="attributes.status = 'RUNNING'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        names += [run.data.tags.get(STUDY_TAG) or run.info.run_name for run in page
                  if run.data.tags.get(ROLE_TAG) in PARENT_ROLES]
        token = page.token
        if not token:
            return list(dict.fromkeys(names))


def objective_column(trials: pd.DataFrame) -> pd.Series:
    """The search trials' objective: ``certify/objective`` (certified agreement averaged over the radii); NaN for
    trials that never logged it."""
    return trials.get(f"metrics.{OBJECTIVE_METRIC}", pd.Series(np.nan, index=trials.index))


def trials_frame(runs: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """One row per search trial (`SEARCH_TRIAL`: not the confirmation's or a preset's) in completion order (end
    time): run_id, run_name, trial_id, status, end_time, epochs (last step of the per-epoch history), objective
    (`objective_column`, NaN if never certified), why (for trials without objective) and the searched
    hyperparameters."""
    trials = runs[runs["kind"] == SEARCH_TRIAL].copy()
    if trials.empty:
        return pd.DataFrame(columns=["run_id", "run_name", "trial_id", "status", "end_time", "epochs",
                                     "objective", "why", *SEARCHED])
    trials["objective"] = objective_column(trials)
    last = histories.groupby("run_id")["step"].max() if len(histories) else pd.Series(dtype=float)
    trials["epochs"] = trials.index.map(last)
    trials["why"] = [None if pd.notna(t["objective"]) else _why(t) for _, t in trials.iterrows()]
    order = trials["end_time"].fillna(pd.Timestamp.max)
    trials = trials.assign(_order=order).sort_values(["_order", "start_time"]).drop(columns="_order")
    return trials[["run_id", "run_name", "trial_id", "status", "end_time", "epochs", "objective", "why",
                   *SEARCHED]].reset_index(drop=True)
