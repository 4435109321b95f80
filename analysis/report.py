"""The analysis report of a study: MLflow runs -> tidy frame -> figures, tables, statistics -> HTML and Markdown.

    python analysis/report.py                     # newest finished study's ~/decrop-runs/*/mlflow.db, newest experiment
    python analysis/report.py --experiment quick-study --mlflow-uri http://127.0.0.1:5000 --out reports/quick

Reads every run of the experiment(s) (the search: its parent, trials and confirmation; a paper's study from
``tuning/sweep.py --preset``: its parent and trials), downloads their certification tables (``certify/<label>.tsv``)
and recomputes every number from the rows. Each paper's study and each search's confirmation gets a section
(`analysis.studies`): the paper's figure (one panel per level, mean over seeds with the seeds' range), the table at
the paper's radii and the profile's (mean and spread over seeds, 95% interval with the test image as the unit), the
tests of the preset's declared claim or, for the confirmation, paired image-level tests (against the baseline; the
search's best configuration against the defaults), Holm-adjusted per family, and the epochs and data budget of every
arm. Then: certified accuracy per run with 95% Clopper-Pearson intervals, the search's trials (their figures,
Optuna's hyperparameter importance and an OLS regression of the objective), and where the time went
(`analysis.timing`). Writes into OUT (default ``reports/<experiment>``): ``report.html`` (self-contained, figures
inlined), ``report.md`` with the PNG figures next to it, and CSV tables (``certified.csv``: one row per run x label
x radius). Prints the headline table (a study's table when there is one) and logs the report files under ``report/``
of the study's parent run. Bad input (missing store, a file that is no MLflow store, unknown or empty experiment, no
certification, an ``--out`` that is a file) ends with ``error: ...`` and exit code 2 (an ``--out`` that is a file
before any run is read).

A local file is only written to when it is an MLflow store of this platform (runs tagged ``decrop.role``): any
other file is refused unchanged, another MLflow store is read from a copy. A study still running is read, never
written: it is reported with a warning that the report is partial, the report goes into OUT only and nothing is
logged into the store; without ``--mlflow-uri`` the newest store whose study has finished is read (newer stores of
studies still running are skipped, each with a line saying so). Passwords in the tracking URI never reach the
output or the report files.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

if __name__ == "__main__":
    # `python analysis/report.py` puts analysis/ on sys.path, not the repo root that holds the packages; and
    # analysis/ on the path would let its modules shadow others of the same name (tables = PyTables). Only
    # when run as a script: `import analysis.report` leaves sys.path alone.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from analysis.arms import PRESET, find_studies  # noqa: E402
from analysis.budget import load_curves  # noqa: E402
from analysis.figures import FigureOut, figures  # noqa: E402
from analysis.results import write_results  # noqa: E402
from analysis.render import Report, markdown_table, render_html, render_markdown, sections  # noqa: E402
from analysis.runs import (  # noqa: E402
    SEARCH_TRIAL,
    ReportError,
    certification_frame,
    check_logged,
    download_rows,
    load_histories,
    load_runs,
    missing_results,
    pick_experiments,
    running_parents,
    running_studies,
    trials_frame,
)
from analysis.stats import Statistics, statistics  # noqa: E402
from analysis.store import open_store, store_uri  # noqa: E402
from analysis.studies import StudySection, study_section  # noqa: E402
from analysis.tables import tables  # noqa: E402
from analysis.timing import time_table  # noqa: E402
from tuning.schema import PARENT_ROLES, TRIAL_ROLE  # noqa: E402
from tuning.schema import redact_uri  # noqa: E402

# While main() runs: a server that is down fails in seconds, not after MLflow's default ~2 minutes of retries,
# and downloads print no progress bar per table. Values the caller set win.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

__all__ = ["Analysis", "ReportError", "build_report", "certification_frame", "figures", "load_runs", "main",
           "render_html", "render_markdown", "statistics", "tables", "write_report"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", nargs="+", default=None, metavar="NAME",
                   help="MLflow experiment(s) to report (default: the most recently created one)")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI or path to mlflow.db (default: the newest ~/decrop-runs/*/mlflow.db whose "
                        "study has finished)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<experiment>)")
    p.add_argument("--results", type=Path, default=None, metavar="PATH",
                   help="also write the verdict of every claim found to PATH (docs/results.md is written this way)")
    return p.parse_args(argv)


def portable(uri: str) -> str:
    """The store as a committed report may show it: a local file store by its folder and file name only (no path
    of the machine it ran on); a server's URI as given (passwords already redacted)."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = Path(uri.removeprefix(scheme))
            return f"{path.parent.name}/{path.name} (a local store)"
    return uri


def provenance(runs: pd.DataFrame, certified: set[str]) -> str:
    """What the runs were made with: the commit(s), the profile(s), the classifier's sha256 and the seeds of the
    certified runs (the numbers rest on them); the seeds of trials still under way are named apart."""
    def values(*columns: str) -> str:
        found = sorted({str(v) for c in columns if c in runs for v in runs[c].dropna()})
        return ", ".join(found) or "not recorded"

    def seeds_of(selected: pd.DataFrame) -> list[int]:
        return sorted({int(float(s)) for s in selected.get("seed", pd.Series(dtype=float)).dropna()})
    commits = values("tags.decrop.git_commit")
    seeds = seeds_of(runs[runs.index.isin(certified)])
    going = runs[~runs.index.isin(certified) & runs["status"].isin(["RUNNING", "SCHEDULED"])
                 & (runs["role"] == TRIAL_ROLE)]
    under_way = sorted(set(seeds_of(going)) - set(seeds))
    return (f"Provenance: commit {commits}; profile {values('params.profile')}; classifier sha256 "
            f"{values('params.budget.classifier_sha256', 'params.classifier_sha256')}; seeds "
            f"{', '.join(map(str, seeds)) or 'not recorded'}"
            + (f" (trials under way: seed {', '.join(map(str, under_way))})" if under_way else "") + ".")


def _summary(names: list[str], runs: pd.DataFrame, cert: pd.DataFrame, missing: list[str],
             studies: list[StudySection], made_with: str) -> list[str]:
    counts = runs["role"].value_counts()
    lines = [f"Experiment(s) {', '.join(names)}: {len(runs)} runs ("
             + ", ".join(f"{n} {role}" for role, n in counts.items()) + ").", made_with,
             f"{cert.groupby(['run_id', 'label']).ngroups} certification tables read; every number below is "
             f"recomputed from their rows."]
    if studies:
        lines.append("Studies with a section of their own: " + "; ".join(s.heading for s in studies) + ".")
    if missing:
        lines.append("Without certification: " + "; ".join(missing) + ".")
    return lines


@dataclass
class Analysis:
    report: Report
    tables: dict[str, pd.DataFrame]  # by file stem, headline first (a study's table when there is one)
    cert: pd.DataFrame  # the tidy frame (certified.csv)
    parent_run_ids: list[str]  # the sweep and preset parent runs, where the report is logged
    csvs: dict[str, pd.DataFrame]  # the studies' numeric frames and the time table, by file stem
    studies: list[StudySection]
    provenance: str


def _search_figures(figs: list[FigureOut], trials: pd.DataFrame, studies: list[StudySection]) -> list[FigureOut]:
    """The search's figures, without the placeholders of a report whose study sections carry it: the factor
    panels' and, when there is no search, the search's."""
    if not studies:
        return figs
    covered = {"factors"}
    if trials.empty:
        covered |= {"search_history", "hyperparameter_effects", "validation_agreement"}
    return [f for f in figs if f.path is not None or f.name not in covered]


def build_report(client: MlflowClient, uri: str, experiments: list, out: Path, progress=print) -> Analysis:
    """Read the runs, compute tables, statistics and figures (PNGs written into `out`). ReportError when there is
    nothing to report. `uri` is shown in the progress lines and the report with any password redacted."""
    names, uri = [e.name for e in experiments], redact_uri(uri)
    progress(f"report: loading the runs of {', '.join(names)} from {uri}")
    runs = load_runs(client, [e.experiment_id for e in experiments])
    if runs.empty:
        raise ReportError(f"experiment {' / '.join(repr(n) for n in names)} has no runs")
    running = running_studies(runs)  # said first: everything below is partial
    for note in running:
        progress(f"report: warning: {note}")
    rows, notes = download_rows(client, runs, progress)
    missing = missing_results(runs, rows)
    if not rows:
        raise ReportError(f"no certification results in {' / '.join(repr(n) for n in names)}: "
                          + "; ".join(missing) + " — none has certify metrics with a certify/<label>.tsv table")
    cert = certification_frame(runs, rows)
    notes = [redact_uri(note) for note in notes + check_logged(cert)]  # notes may quote server errors
    for note in notes:
        progress(f"report: warning: {note}")
    notes = running + notes
    histories = load_histories(client, runs, "val/agreement", progress)
    trials = trials_frame(runs, histories)
    # Trials of a preset or a confirmation are reported by their study's section; the search's trials (their
    # validation certifications) by the tables, figures and statistics of the search, next to every run's own
    # test intervals.
    search = cert[cert["kind"] == SEARCH_TRIAL]
    found = tables(cert, trials)
    stats: Statistics = statistics(trials)
    progress(f"report: writing figures into {out}")
    out.mkdir(parents=True, exist_ok=True)
    studies = [study_section(study, out, load_curves(client, study) if study.kind == PRESET else None)
               for study in find_studies(runs, rows)]
    figs = _search_figures(figures(search, rows, trials, histories, out), trials, studies)
    times, time_notes = time_table(runs)
    title = f"DE-CROP study report: {', '.join(names)}"
    made_with = provenance(runs, set(cert["run_id"]))
    report = Report(title, portable(uri), _summary(names, runs, cert, missing, studies, made_with), found, figs, stats,
                    notes, studies, times, time_notes, search=not trials.empty)
    headline = {name: table for s in studies for name, table in s.tables.items()}
    csvs = {name: frame for s in studies for name, frame in s.csvs.items()}
    if not times.empty:
        csvs["time"] = times
    return Analysis(report, {**headline, **found}, cert, list(runs.index[runs["role"].isin(PARENT_ROLES)]), csvs,
                    studies, made_with)


def write_report(analysis: Analysis, out: Path) -> list[Path]:
    """report.html, report.md and the CSV tables into `out` (figures are already there); returns every file
    of the report, figures included."""
    report, found, cert = analysis.report, analysis.tables, analysis.cert
    files = [figure.path for _, items in sections(report) for kind, figure in items
             if kind == "figure" and figure.path is not None]
    csvs = {"certified": cert, **found, "regression": report.statistics.regression,
            "importance": report.statistics.importance, **analysis.csvs}
    for name, frame in csvs.items():
        if not frame.empty:
            frame.to_csv(out / f"{name}.csv", index=False)
            files.append(out / f"{name}.csv")
    for name, text in (("report.html", render_html(report)), ("report.md", render_markdown(report))):
        (out / name).write_text(text, encoding="utf-8")
        files.append(out / name)
    return files


def log_to_parents(client: MlflowClient, parent_run_ids: list[str], files: list[Path], progress=print) -> None:
    """Every report file as an artifact under ``report/`` of each parent run. A failure (a study still writing
    the store: "database is locked") is a warning line: the report files are written already."""
    for run_id in parent_run_ids:
        try:
            for path in files:
                client.log_artifact(run_id, str(path), "report")
        except (MlflowException, OSError) as err:
            progress(f"report: warning: could not log the report to run {run_id}: "
                     f"{redact_uri(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))}")
            continue
        progress(f"report: logged {len(files)} files under report/ of run {run_id}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args.mlflow_uri, args.experiment, args.out, args.results)


def run(mlflow_uri: str | None, experiments: list[str] | None = None, out: Path | None = None,
        results: Path | None = None) -> int:
    """Report `experiments` of the store at `mlflow_uri` into `out` (defaults as ``--help`` says) and, with
    `results`, write the verdicts page there; log the report to the studies' parent runs unless one is still
    running. 0, or 2 after printing a bad input as one ``error:`` line. The sweep calls it when a study ends."""
    with mock.patch.dict(os.environ, {k: v for k, v in MLFLOW_ENV.items() if k not in os.environ}):
        return _run(mlflow_uri, experiments, out, results)


def check_out(out: Path, given: bool) -> None:
    """ReportError unless `out` can be the report's folder: it, or else the nearest of its parents that exists, is
    a folder. Checked before any run is read: a file there ended the report with a traceback after reading them."""
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return
            what = "a file" if path.is_file() else "not a folder (a broken link or a special file)"
            shown = f"--out {out}" if given else f"the default report folder {out}"
            raise ReportError(f"{shown}: {path} is {what}, not a folder; choose a folder for the report with "
                              f"--out (a missing one is created); nothing was read or written")


def _run(mlflow_uri: str | None, names: list[str] | None, given_out: Path | None, results: Path | None) -> int:
    try:
        if given_out is not None:
            check_out(given_out, given=True)
        store = open_store(store_uri(mlflow_uri, experiments=names))
        experiments = pick_experiments(store.client, names, store.shown)
        out = given_out or Path("reports") / "+".join(e.name.replace("/", "_") for e in experiments)
        if given_out is None:
            check_out(out, given=False)
        # A study still running is read, never written: asked now (the runs read below are those of this moment)
        # and again just before logging (a study resumed meanwhile).
        ids = [e.experiment_id for e in experiments]
        running = running_parents(store.client, ids) if store.writable else []
        analysis = build_report(store.client, store.shown, experiments, out)
        files = write_report(analysis, out)
        if results is not None:
            shown = results.resolve()  # the page names no path of this machine: relative, or its name
            shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else Path(shown.name)
            command = ("python analysis/report.py --mlflow-uri STORE --experiment "
                       + " ".join(e.name for e in experiments) + f" --results {shown}")
            written = write_results(results, analysis.studies, analysis.provenance, command)
            print(f"report: verdicts written to {written}")
        if not store.writable:
            print(f"report: not logged to the store ({store.note})")
        elif running or (running := running_parents(store.client, ids)):
            which = f"study {running[0]!r} is" if len(running) == 1 else f"studies {', '.join(map(repr, running))} are"
            print(f"report: not logged to the store: {which} still running (a running study is read, never "
                  f"written); the report is only in {out}: rerun the report once the study has finished to log it "
                  f"under report/ of its parent run")
        elif analysis.parent_run_ids:
            log_to_parents(store.client, analysis.parent_run_ids, files)
        else:
            print("report: no parent run (sweep or preset) to log the report to")
    except ReportError as err:
        print(f"error: {redact_uri(str(err))}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: reading the MLflow store failed: "
              f"{redact_uri(str(err).splitlines()[0] if str(err) else repr(err))}", file=sys.stderr)
        return 2
    if analysis.tables:
        name, headline = next(iter(analysis.tables.items()))
        print(f"\n{name}:\n{markdown_table(headline)}\n")
    print(f"report: {out / 'report.html'} and {out / 'report.md'} ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
