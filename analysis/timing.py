"""Where a study's time went: its wall time (the parent run's start to its end) and, summed over its trials, the
seconds of each phase a trial logs as ``time/<phase>`` metrics (`tuning.trainable.PhaseClock`: prepare,
samples, train, certify_validation, certify_test), per method. Trials run concurrently, so their summed time
can exceed the wall time; trials that ASHA stopped, failed trials and studies recorded before phase times
existed logged none."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tuning.schema import PARENT_ROLES

from .runs import CONFIRM_TRIAL, SEARCH_TRIAL
from .tables import method_name

PHASES = ("prepare", "samples", "train", "certify_validation", "certify_test")  # in the order a trial runs them
ALL_TRIALS = "all trials"


def duration_text(seconds: float) -> str:
    """``42.0 s``, ``7 min 20 s``, ``2 h 05 min``; ``unknown`` for NaN."""
    if seconds is None or np.isnan(seconds):
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _part(run: pd.Series) -> str:
    """The group a trial's time is counted in: search trials; the confirmation's configuration; the method."""
    if run["kind"] == SEARCH_TRIAL:
        return "search trials (DE-CROP)"
    method = run["trial_method"] if isinstance(run["trial_method"], str) else "other"
    name = f"DE-CROP ({run['variant']})" if isinstance(run["variant"], str) else method_name(method)
    return f"confirmation: {name}" if run["kind"] == CONFIRM_TRIAL else name


def _phases(runs: pd.DataFrame) -> list[str]:
    logged = [c.removeprefix("metrics.time/") for c in runs.columns if c.startswith("metrics.time/")]
    return [p for p in PHASES if p in logged] + sorted(p for p in logged if p not in PHASES)


def time_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per study (parent run): a row ``all trials`` and one per part (`_part`) with study, part, trials, timed
    (trials that logged phase times), the seconds of each phase summed over them, trial_seconds (all phases),
    and on the ``all trials`` row wall_seconds (the parent's start to end; NaN while it runs). One sentence per
    study."""
    phases, records, sentences = _phases(runs), [], []
    columns = [f"metrics.time/{p}" for p in phases]
    for parent_id, parent in runs[runs["role"].isin(PARENT_ROLES)].iterrows():
        trials = runs[runs["parent_run_id"] == parent_id]
        if trials.empty:
            continue
        finished = parent["status"] != "RUNNING" and pd.notna(parent["end_time"])
        wall = (parent["end_time"] - parent["start_time"]).total_seconds() if finished else np.nan
        study = parent["study"] if isinstance(parent["study"], str) else parent["run_name"]
        groups = [(ALL_TRIALS, trials), *trials.groupby(trials.apply(_part, axis=1), sort=False)]
        for part, group in groups:
            times = group.reindex(columns=columns)
            timed = times.notna().any(axis=1)
            record = {"study": study, "part": part, "trials": len(group), "timed": int(timed.sum()),
                      **{p: times[c].sum(min_count=1) for p, c in zip(phases, columns)},
                      "trial_seconds": times.sum(axis=1, min_count=1).sum(min_count=1),
                      "wall_seconds": wall if part == ALL_TRIALS else np.nan}
            records.append(record)
        sentences.append(_sentence(study, records[-len(groups)], phases, finished))
    return pd.DataFrame(records), sentences


def _sentence(study: str, total: dict, phases: list[str], finished: bool) -> str:
    wall = (f"took {duration_text(total['wall_seconds'])} of wall time (parent run start to end)" if finished else
            "is still running, or was interrupted (its parent run has no end)")
    if not total["timed"]:
        return (f"{study} {wall}; none of its {total['trials']} trials logged phase times (time/<phase>: "
                f"trials stopped early or failed, or recorded before phase times existed).")
    spent = total["trial_seconds"]
    shares = ", ".join(f"{p.replace('_', ' ')} {100 * total[p] / spent:.0f}%" for p in phases
                       if pd.notna(total[p]) and spent > 0)
    untimed = total["trials"] - total["timed"]
    return (f"{study} {wall}; {total['timed']} of its {total['trials']} trials logged "
            f"{duration_text(spent)} of phase time ({shares})"
            + (f"; {untimed} logged none (stopped early by ASHA or failed)" if untimed else "")
            + ". Trials run concurrently, so their sum can exceed the wall time.")


def time_display(frame: pd.DataFrame) -> pd.DataFrame:
    """The time table with durations as text."""
    if frame.empty:
        return frame
    shown = frame[["study", "part", "trials", "timed"]].copy()
    names = {"trial_seconds": "sum over trials", "wall_seconds": "wall time"}
    for column in frame.columns[4:]:
        shown[names.get(column, column.replace("_", " "))] = [
            "" if pd.isna(v) else duration_text(float(v)) for v in frame[column]]
    return shown
