"""The studies a sweep runs: the Optuna search with its confirmation on fresh seeds, and the paper's presets.

Both drive `tuning.trainable.run_trial` through Ray Tune: the search with Optuna's TPE and ASHA on the
validation objective, a preset (and the confirmation) as a grid of points (`tuning.presets`) that each train a
method and certify the test subset. Every study has its own storage folder (Tune state, Train checkpoints,
denoisers), its own MLflow experiment with a parent run, and resumes with ``--resume`` (`Tuner.restore`: no
finished trial reruns, no MLflow run is duplicated).

**Does tuning help?** The search's best trial is chosen on a noisy validation objective, so its validation score
is biased upward (the winner's curse). `confirm` therefore retrains the best configuration and the profile's
defaults (and the baseline, and certifies the reference) on seeds the search never used and certifies them on
the test subset; the study's report (`analysis.report`, written by the sweep next) tests whether the tuned
configuration beats the defaults. That answer, not the search's own score, is the study's result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.tune
from optuna.samplers import TPESampler
from ray.tune.schedulers import ASHAScheduler

from decrop.rows import CertRow
from decrop.config import ExperimentConfig, from_flat
from decrop.config import NO_DENOISER
from decrop.pipeline import epochs_text, format_table, summarize

from .presets import PRESETS, points
from .space import FinalObjectiveOptunaSearch, default_point, define_space, total_epochs, trial_overrides
from .schema import BEST_TRIAL_TAG, TRIAL_TAG
from .tracking import MlflowStatusCallback, StudyTracker
from .trainable import StudySettings, trial_config, tune_trainable


@dataclass(frozen=True)
class Study:
    """Where one study lives and how it runs (built by `tuning.sweep` from its arguments)."""

    name: str
    storage: Path  # <storage>/<study>: Tune state, Train runs, denoisers, the report
    tracker: StudyTracker
    parent: str  # the study's parent MLflow run
    settings: StudySettings
    resume: bool
    concurrent: int


class Progress(ray.tune.Callback):
    """One line per trial event: started, finished (with its numbers), stopped early or failed. `metric` is the
    result key shown (a prefix such as ``certify_test_`` shows the first ``<prefix>*/acr``)."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric, self.done, self.started = total, metric, 0, {}

    def _value(self, result: dict) -> tuple[str, float] | None:
        if self.metric in result:
            return self.metric, result[self.metric]
        keys = [k for k in result if k.startswith(self.metric) and k.endswith("/acr")]
        return (keys[0], result[keys[0]]) if keys else None

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.perf_counter()
        print(f"  start  {_name(trial)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        result = trial.last_result or {}
        value = self._value(result)
        shown = f"{value[0]} {value[1]:.4f}" if value is not None else (
            f"stopped early by ASHA after {result.get('epoch', '?')} epochs")
        took = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
        print(f"  done   {_name(trial)}: {shown} ({took:.0f}s; {self.done}/{self.total} trials)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  FAILED {_name(trial)} (see {trial.local_path or 'its trial folder'}/error.txt)", flush=True)


def _name(trial: Any) -> str:
    point = (trial.config or {}).get("point")
    return point["name"] if point else f"search trial {trial.trial_id}"


def _tuner(study: Study, trainable: Any, **tune_args: Any) -> ray.tune.Tuner:
    """A new Tuner for the study, or the interrupted one restored when resuming."""
    path = study.storage / tune_args.pop("name")
    if study.resume and ray.tune.Tuner.can_restore(str(path)):
        print(f"{study.name}: resuming {path}", flush=True)
        return ray.tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    callbacks = [MlflowStatusCallback(study.tracker, study.parent), tune_args.pop("progress")]
    return ray.tune.Tuner(trainable, param_space=tune_args.pop("param_space", None),
                          tune_config=ray.tune.TuneConfig(max_concurrent_trials=study.concurrent, **tune_args),
                          run_config=ray.tune.RunConfig(name=path.name, storage_path=str(study.storage),
                                                        callbacks=callbacks, verbose=0,
                                                        failure_config=ray.tune.FailureConfig(max_failures=1)))


def asha(epochs: int) -> ASHAScheduler:
    """ASHA on the per-epoch validation agreement: rungs at a quarter of the budget and 3x that, keeping the top
    third at each. Every rung lies before the last epoch (max_t = epochs - 1, no stop at max_t): a trial that
    trained to the end is always certified, never discarded after paying for all its epochs."""
    grace = max(1, epochs // 4)
    return ASHAScheduler(metric="val/agreement", mode="max", max_t=max(grace, epochs - 1), grace_period=grace,
                         reduction_factor=3, stop_last_trials=False)


class Interrupted(RuntimeError):
    """Tune ended before every trial had: Ctrl-C (SIGINT) or SIGUSR1 reached the driver, and Tune saved its state
    and returned the trials it had instead of raising."""


def check_finished(name: str, results: ray.tune.ResultGrid, expected: int) -> None:
    """`Interrupted` unless all `expected` trials ended (TERMINATED: finished, or stopped by the scheduler) or
    errored. Tune's own test for an incomplete run; a trial's ``done`` flag is not one (a trial that reruns on
    resume only to report its saved result may end without it)."""
    ended = results.num_terminated + results.num_errors
    if ended < expected:
        raise Interrupted(f"interrupted with {ended} of {expected} trials of {name} ended")


def run_grid(study: Study, grid: list[dict[str, Any]], name: str) -> ray.tune.ResultGrid:
    """Run the points of `grid` as Tune trials (no search, no early stopping); every trial must succeed."""
    print(f"{study.name}: {len(grid)} trials ({name})", flush=True)
    tuner = _tuner(study, tune_trainable(study.settings), name=name,
                   param_space={"point": ray.tune.grid_search(grid)},
                   progress=Progress(len(grid), "certify_test_"))
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(grid)} trials of {study.name} failed (first: {failed[0].error}); "
                           f"rerun with --resume to retry them")
    check_finished(study.name, results, len(grid))
    return results


def run_search(study: Study, num_trials: int, seed: int) -> dict[str, Any]:
    """The Optuna search on the validation objective; returns the best trial's parameters."""
    base = study.settings.base
    default = default_point(base)  # the first trial: the method with the profile's own values
    print(f"{study.name}: searching {num_trials} trials on the validation objective", flush=True)
    tuner = _tuner(study, tune_trainable(study.settings), name="tune",
                   search_alg=FinalObjectiveOptunaSearch(space=define_space, metric="objective", mode="max",
                                                         sampler=TPESampler(seed=seed), points_to_evaluate=[default]),
                   scheduler=asha(total_epochs(base)), num_samples=num_trials,
                   progress=Progress(num_trials, "objective"))
    results = tuner.fit()
    check_finished(study.name, results, num_trials)
    best = best_result(results, base)
    study.tracker.set_tag(study.parent, BEST_TRIAL_TAG, best.metrics["trial_id"])
    print(f"{study.name}: best trial {best.metrics['trial_id']}: validation objective "
          f"{best.metrics['objective']:.4f} with {dict(best.config)}", flush=True)
    return dict(best.config)


def best_result(results: ray.tune.ResultGrid, base: dict[str, Any]) -> ray.tune.Result:
    """The trial with the highest validation objective. Ties (few validation images make them common) go to
    the profile's defaults, then to the smallest trial id, so a resumed study picks the same trial as the run
    it resumes (the order of a restored result grid is not the order of the first run)."""
    default = trial_overrides(default_point(base), base)
    scored = [r for r in results if math.isfinite(r.metrics.get("objective", math.nan))]
    if not scored:
        raise RuntimeError("no trial of the search reported a validation objective")
    return min(scored, key=lambda r: (-r.metrics["objective"], trial_overrides(dict(r.config), base) != default,
                                      str(r.metrics["trial_id"])))


def confirmation_points(base: dict[str, Any], best: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """The best configuration and the profile's defaults (once, if they are the same), the baseline and the
    reference, on `seeds` (which the search never used)."""
    variants = {"best": trial_overrides(best, base), "default": trial_overrides(default_point(base), base)}
    if variants["best"] == variants["default"]:
        variants.pop("best")
    grid = []
    for seed in seeds:
        for variant, overrides in variants.items():
            grid.append({"method": "decrop", "variant": variant, "label": f"decrop_{variant}", "seed": seed,
                         "level": None, "overrides": overrides, "name": f"decrop {variant} seed={seed}"})
        grid.append({"method": "baseline", "seed": seed, "level": None, "overrides": {},
                     "name": f"baseline seed={seed}"})
    grid.append({"method": NO_DENOISER, "seed": seeds[0], "level": None, "overrides": {},
                 "name": f"none seed={seeds[0]}"})
    return grid


def confirm(study: Study, best: dict[str, Any], seeds: list[int], cfg: ExperimentConfig,
            clean_accuracy: float) -> pd.DataFrame:
    """Retrain and test-certify the best configuration and the defaults on fresh `seeds`; print and log the
    table (certified accuracy pooled over the seeds). Its statistics (best against defaults, seed-level and per
    image) are the study's report's, which the sweep writes next (`analysis.report`)."""
    grid = confirmation_points(study.settings.base, best, seeds)
    tested = dataclasses.replace(study, settings=dataclasses.replace(study.settings, validate=False, test=True))
    results = run_grid(tested, grid, "confirm")
    rows: dict[str, dict[int, list[CertRow]]] = {}  # label -> seed -> rows
    for result in results:
        point = result.config["point"]
        label = point.get("label", point["method"])
        run_id = study.tracker.find_child(study.parent, {TRIAL_TAG: result.metrics["trial_id"]})
        rows.setdefault(label, {})[point["seed"]] = study.tracker.rows(run_id, f"test_{label}")
    pooled = {label: [r for seed_rows in runs.values() for r in seed_rows] for label, runs in rows.items()}
    best_epochs = epochs_text(from_flat(trial_config(study.settings, best)), "decrop")
    table = summarize(pooled, cfg, clean_accuracy, epochs={"decrop_best": best_epochs})
    study.tracker.log_text(study.parent, table.to_csv(), "confirm/test_summary.csv")
    print(f"\nConfirmation on fresh seeds {seeds} (test subset, {len(rows['none'][seeds[0]])} images; certified "
          f"accuracy (%) pooled over the seeds):")
    print(format_table(table))
    if "decrop_best" not in rows:
        print("\nThe search's best configuration is the profile's defaults: there is nothing to confirm.")
    else:
        print("\nDoes tuning help? The report compares the best configuration with the defaults over the fresh "
              "seeds.")
    return table


def run_preset(study: Study, name: str, seeds: list[int], levels: tuple | None) -> ray.tune.ResultGrid:
    """The paper's study `name` over `seeds` (and `levels`): every point trained and test-certified."""
    return run_grid(study, points(PRESETS[name], seeds, levels), "tune")
