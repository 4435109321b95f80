"""One Tune trial of a study: samples -> Ray Train DDP training -> sharded certification -> report.

Every study runs its trials through this one trainable: the Optuna search (a trial's parameters are the
searched config keys), the paper's presets and the search's confirmation (a trial's parameters are a *point*
of `tuning.presets`: method, seed, level and config overrides). The trial function is the driver of a Ray
Train run (Ray 2.60's Train V2 inside Tune): it builds a PyTorch DDP trainer (`tuning.torch_backend`) whose
per-epoch reports reach Tune through ``TuneReportCallback`` (so ASHA can stop weak search trials on
``val/agreement``), calls ``fit()``, certifies the trained denoiser as parallel Ray tasks and reports with
``ray.tune.report``. The no-denoiser reference (method ``none``) trains nothing and is only certified.

The trial function itself (the Tune trial actor, which mostly waits) never loads torch, the data or the
classifier: a short-lived task prepares the data and generates DE-CROP's samples, rank 0 of the training saves
the denoiser's weights file, and the certification tasks read that file. Loading torch costs memory in every
process, and several trials wait on their training at once (`benchmarks/results/sweep_cpu.md`).

**Objective** (the search): certified agreement of the smoothed classifier on the first ``certify.val_images``
validation images (`data.val_source`: extra unlabelled images or a held-out part of the limited subset),
averaged over the profile's radii (``certify.radii``): an image counts at r when the smoothed denoised
classifier agrees with the classifier's own prediction, certified at r, so no label outside the limited data
is read. The average over radii is an ACR on the reported grid: it rewards certifying more images and
certifying them further, and moves more smoothly than accuracy at one radius. It is certified in the
sequential mode, which decides each image at those radii and stops sampling as soon as the answer is known
(same per-image guarantee; its radii are the grid's, so the logged ``certify/acr`` is a lower bound). **Test
images** are certified only by trials of a study that reports them (presets, confirmation), after training:
nothing is selected on them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from decrop.config import NO_DENOISER, ExperimentConfig, config_hash, from_flat, to_flat, to_yaml
from decrop.rows import CertRow

from . import trial_cache
from .certify_tasks import certify_parallel
from .space import trial_overrides
from .torch_backend import torch_trainer
from .schema import (AGREEMENT_METRIC, BUDGET_PREFIX, FACTOR_TAG, LEVEL_TAG, METHOD_TAG, NOT_KEPT, OBJECTIVE_METRIC,
                     PRESET_TAG, REUSED_TAG, SEED_TAG, VALIDATION_LABEL, VARIANT_TAG, WEIGHTS_TAG, metric_key)
from .tracking import StudyTracker


@dataclass(frozen=True)
class StudySettings:
    """What every trial of a study shares (picklable: it travels to the trial processes). `preset` and `factor`
    tag its runs; `validate` certifies validation images for the objective (the search), `test` the test subset
    for reporting (presets and the confirmation)."""

    base: dict[str, Any]  # the profile's flat config
    storage: str  # absolute folder for Train runs and checkpoints
    tracking_uri: str
    experiment: str
    parent_run_id: str
    workers: int = 1
    gpus_per_worker: float = 0.0
    cert_shards: int = 2
    checkpoint_every: int = 5
    preset: str = "search"
    factor: str | None = None
    validate: bool = True
    test: bool = False
    classifier_sha256: str = ""  # of the classifier's file (a trial cache key must change with the classifier)
    shelf: str = ""  # folder of committed finished trials (tuning.trial_cache; relative: in the repository)


def trial_point(params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The point a trial runs: `params` itself when it is one (presets), else a search trial's Optuna parameters
    as a DE-CROP point on the profile's seed."""
    if "point" in params:
        return params["point"]
    shown = " ".join(f"{k.removeprefix('decrop.')}={v:.3g}" if isinstance(v, float) else
                     f"{k.removeprefix('decrop.')}={v}" for k, v in params.items())
    return {"method": "decrop", "seed": int(base["seed"]), "level": None,
            "overrides": trial_overrides(params, base), "name": f"decrop search {shown}"}


def trial_config(settings: StudySettings, params: dict[str, Any]) -> dict[str, Any]:
    """The flat config of a trial: the profile's, with the point's overrides and seed applied (and checked)."""
    point = trial_point(params, settings.base)
    method = point["method"]
    flat = {**settings.base, **point["overrides"], "seed": point["seed"],
            "methods": [] if method == NO_DENOISER else [method]}
    return to_flat(from_flat(flat))


def _train_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The Train workers' function, `tuning.train_loop.train_loop_per_worker`, imported there (it loads torch)."""
    from .train_loop import train_loop_per_worker

    return train_loop_per_worker(loop_config)


# In a process of its own that ends with the task (max_calls=1), so that the trial actor never loads torch, the
# data or the classifier, and holds none of that memory while it waits on its training. No CPU, as when the actor
# did it itself.
@ray.remote(num_cpus=0, max_calls=1)
def _trial_data(flat: dict[str, Any], generate_samples: bool) -> dict[str, Any]:
    """What a trial needs of `decrop.prepare.prepare` (budget, validation and test indices) and the wall seconds
    of its phases; with `generate_samples`, DE-CROP's boundary and interpolated samples are generated and cached
    here, so the Train workers read the cache."""
    from decrop.classifier import classifier_key
    from decrop.prepare import prepare
    from decrop.stages import samples_for

    tic = time.perf_counter()
    prep = prepare(from_flat(flat), log=_quiet, evaluate=False)
    times = {"prepare": time.perf_counter() - tic}
    if generate_samples:
        tic = time.perf_counter()
        samples_for(prep, prep.classifier, classifier_key(prep.cfg), log=_quiet)
        times["samples"] = time.perf_counter() - tic
    return {"budget": prep.budget, "val_indices": [int(i) for i in prep.val_indices],
            "test_indices": [int(i) for i in prep.test_indices], "times": times}


def _quiet(_: str) -> None:
    pass


def _weights_path(settings: StudySettings, trial_id: str) -> Path:
    """Where a trial's denoiser is saved (`python -m decrop export --trial` reads it and the config beside it)."""
    return Path(settings.storage) / "denoisers" / f"{trial_id}.pt"


def _train(settings: StudySettings, flat: dict, method: str, trial_id: str, name: str) -> dict:
    """Train the trial's denoiser in a Ray Train run of `train_loop_per_worker`, whose rank 0 saves it to
    `_weights_path`; returns the last epoch's metrics. Its per-epoch metrics reach Tune, whose driver logs them to
    the trial's run (`MlflowStatusCallback`)."""
    trainer = torch_trainer(
        _train_worker,
        train_loop_config={"config": flat, "method": method, "label": name,
                           "checkpoint_every": settings.checkpoint_every, "threads": 1,
                           "weights": str(_weights_path(settings, trial_id)), "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers, use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker={"CPU": 1, **({"GPU": settings.gpus_per_worker}
                                               if settings.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            # A deterministic name: a retried trial finds this run's checkpoints and resumes from them.
            name=f"train-{trial_id}-{config_hash(flat)}", storage_path=settings.storage,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=1, controller_failure_limit=1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    return trainer.fit().return_value or {}


class Trial:
    """One attempt of one trial, phase by phase: `open` (its MLflow run), then `run`: `prepare` (data and
    DE-CROP's samples, in a task), `reuse` (a cached result) or `train` then `certify`, and `finish`.
    `run_trial` composes them; a test trainable can put a fault between `open` and `run`."""

    def __init__(self, params: dict[str, Any], settings: StudySettings) -> None:
        self.settings = settings
        self.point = trial_point(params, settings.base)
        self.method = self.point["method"]
        self.label = self.point.get("label", self.method)
        self.flat = trial_config(settings, params)
        self.cfg = from_flat(self.flat)
        self.trial_id = ray.tune.get_context().get_trial_id()
        self.clock = PhaseClock()
        self.tracker = StudyTracker(settings.tracking_uri, settings.experiment)
        self.run_id = ""
        self.weights = _weights_path(settings, self.trial_id) if self.method != NO_DENOISER else None
        self.metrics: dict[str, float] = {}

    def open(self) -> dict[str, float] | None:
        """The trial's MLflow run, found again or created, with this attempt counted in it. Returns the saved
        result instead when an earlier attempt finished (the driver died before Tune saved that)."""
        earlier = self.tracker.find_trial_run(self.settings.parent_run_id, self.trial_id)
        done = self.tracker.saved_result(earlier) if earlier else None
        if done is not None:
            return done
        point = self.point
        tags = {PRESET_TAG: self.settings.preset, FACTOR_TAG: self.settings.factor, LEVEL_TAG: point["level"],
                METHOD_TAG: self.method, SEED_TAG: point["seed"], VARIANT_TAG: point.get("variant")}
        self.run_id = self.tracker.trial_run(self.settings.parent_run_id, self.trial_id, point["name"], self.flat,
                                             tags)
        self.tracker.start_attempt(self.run_id)
        self.tracker.log_text(self.run_id, to_yaml(self.cfg), "config.yaml")
        self.clock.sink = (self.tracker, self.run_id)
        return None

    def run(self) -> dict[str, float]:
        """Every phase after `open`; returns the result to report (also saved in the run)."""
        key = self.cache_key()
        cached = trial_cache.load(self.cfg.cache_dir, key, self.settings.shelf) if key else None
        data = self.prepare(generate_samples=self.method == "decrop" and cached is None)
        if cached is not None:
            self.reuse(cached)
            return self.finish(None)
        last = self.train()
        if self.settings.validate:
            self.certify_validation(data["val_indices"])
        if self.settings.test:
            self.certify_test(data["test_indices"], key)
        return self.finish(last)

    def cache_key(self) -> str | None:
        """A trial that only reports the test subset, and whose result another study already computed with the
        same config, seed, code and classifier, takes it (tuning.trial_cache): the paper's studies share the
        profile's defaults. None for trials that validate (the search)."""
        s = self.settings
        if not s.test or s.validate:
            return None
        return trial_cache.trial_key(self.flat, s.workers, s.gpus_per_worker, s.classifier_sha256)

    def prepare(self, generate_samples: bool) -> dict[str, Any]:
        """The budget, validation and test indices, in a task of its own; DE-CROP's samples are generated (and
        cached) there, once, before training, so that the DDP workers read the cache."""
        data = ray.get(_trial_data.options(scheduling_strategy="SPREAD").remote(self.flat, generate_samples))
        self.tracker.log_params(self.run_id, {f"{BUDGET_PREFIX}{k}": v for k, v in data["budget"].items()})
        self.clock.record(data["times"])
        return data

    def reuse(self, cached: trial_cache.Cached) -> None:
        """The cached (or shelved) result as this trial's: its weights (a shelved trial has none: tag
        `WEIGHTS_TAG`), its learning curves where they were kept, and its test rows."""
        self.tracker.set_tag(self.run_id, REUSED_TAG, cached.source)
        if self.weights is not None and cached.weights is not None:
            self.weights.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached.weights, self.weights)
            _log_weights(self.tracker, self.run_id, self.weights, self.cfg)
        elif cached.denoiser:
            self.tracker.set_tag(self.run_id, WEIGHTS_TAG, NOT_KEPT)
        self.tracker.log_curves(self.run_id, cached.curves)
        self.metrics.update(self.tracker.log_certification(self.run_id, cached.rows, self.cfg.certify.radii,
                                                           f"test_{self.label}"))
        self.clock.lap("reused")

    def train(self) -> dict[str, float]:
        """The denoiser in a Ray Train run (`_train`), its weights logged; the last epoch's metrics ({} for the
        no-denoiser reference, which trains nothing)."""
        if self.weights is None:
            return {}
        last = _train(self.settings, self.flat, self.method, self.trial_id, self.point["name"])
        self.clock.lap("train")
        _log_weights(self.tracker, self.run_id, self.weights, self.cfg)
        return last

    def certify_validation(self, val_indices: list[int]) -> None:
        """The search's objective. Decisions at the study's radii, stopped as soon as they are known
        (decrop.sequential): the same guarantee per image, with fewer forward passes."""
        self._certify({**self.flat, "certify.mode": "sequential"}, "val",
                      val_indices[:self.cfg.certify.val_images], VALIDATION_LABEL)
        self.metrics["objective"] = validation_objective(self.metrics, self.cfg.certify.radii)
        self.tracker.log_metrics(self.run_id, {OBJECTIVE_METRIC: self.metrics["objective"]}, step=0)
        self.clock.lap("certify_validation")

    def certify_test(self, test_indices: list[int], key: str | None) -> None:
        """The test subset, for reporting; the result goes to the trial cache under `key`."""
        rows = self._certify(self.flat, "test", test_indices, f"test_{self.label}")
        self.clock.lap("certify_test")
        if key is not None:
            trial_cache.store(self.cfg.cache_dir, key, self.weights, rows,
                              f"{self.settings.experiment}/{self.trial_id}")

    def _certify(self, flat: dict[str, Any], split: str, indices: list[int], label: str) -> list[CertRow]:
        """The denoiser certified on `indices` of `split` as parallel tasks under `flat`; the rows logged under
        `label` and their metrics kept for the result."""
        rows = certify_parallel(flat, {self.label: self.weights}, split, indices, self.settings.cert_shards,
                                gpus_per_task=self.settings.gpus_per_worker)[self.label]
        self.metrics.update(self.tracker.log_certification(self.run_id, rows, self.cfg.certify.radii, label))
        return rows

    def finish(self, last: dict[str, float] | None) -> dict[str, float]:
        """The result (certification metrics, phase times, the last epoch's validation agreement unless the result
        was reused: `last` None), saved in the run as the proof that the trial finished."""
        result = {**self.metrics, **self.clock.times}
        if last is not None:
            result[AGREEMENT_METRIC] = last.get(AGREEMENT_METRIC, float("nan"))
        self.tracker.save_result(self.run_id, result)
        return result


def run_trial(params: dict[str, Any], settings: StudySettings) -> None:
    """The Tune function trainable (see module doc): `Trial.open`, then `Trial.run`, reported to Tune. Raises
    on failure so Tune marks the trial errored.

    Idempotent once finished: the final result is recorded in the trial's MLflow run, and an attempt that finds it
    reports it again and does nothing else (Tune saves its own state only every few seconds, so a driver killed
    just after a trial ended restarts that trial on --resume)."""
    trial = Trial(params, settings)
    done = trial.open()
    ray.tune.report(done if done is not None else trial.run())


def _log_weights(tracker: StudyTracker, run_id: str, weights: Path, cfg: ExperimentConfig) -> None:
    """The trial's denoiser and, beside it, its config (what `python -m decrop export --trial` reads) into its
    run."""
    weights.with_suffix(".yaml").write_text(to_yaml(cfg))
    tracker.log_artifact(run_id, str(weights), "denoiser")


class PhaseClock:
    """Wall seconds of a trial's phases (``time/<phase>``): where a study's time goes. Each phase is logged to
    the trial's run as it ends, so a trial that ASHA stops during training still has its earlier phases."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()
        self.sink: tuple[StudyTracker, str] | None = None

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self._log(phase, now - self.last)
        self.last = now

    def record(self, seconds: dict[str, float]) -> None:
        """Phases timed elsewhere (a task's), in order; the wall time since the last lap that they do not cover
        (starting the task's process, waiting for it) goes to the first."""
        now = time.perf_counter()
        phases = list(seconds)
        for phase in phases:
            self._log(phase, seconds[phase] + (now - self.last - sum(seconds.values()) if phase == phases[0] else 0))
        self.last = now

    def _log(self, phase: str, seconds: float) -> None:
        self.times[f"time/{phase}"] = seconds
        if self.sink is not None:
            tracker, run_id = self.sink
            tracker.log_metrics(run_id, {f"time/{phase}": seconds}, step=0)


def validation_objective(metrics: dict[str, float], radii: tuple[float, ...]) -> float:
    """The search's objective: certified agreement on the validation images averaged over the study's radii
    (a Riemann sum of the certified-accuracy curve, i.e. an ACR on the reported grid)."""
    return sum(metrics[metric_key(VALIDATION_LABEL, r)] for r in radii) / len(radii)


def tune_trainable(settings: StudySettings, trial=run_trial):
    """`trial` (`run_trial`; tests pass one that injects faults) bound to `settings`, with the resources a trial
    itself holds: no CPU (a CPU held idle by every trial driver deadlocks a machine whose CPUs its Train workers
    need), just a sliver of the head node, where the drivers live. Its Train workers and certification tasks
    request their own."""
    return ray.tune.with_resources(ray.tune.with_parameters(trial, settings=settings),
                                   {"cpu": 0, "node:__internal_head__": 0.01})


def load_denoiser_state(path: Path) -> dict:
    """The weights a trial saved (a dict of tensors); a missing or corrupt file raises `CheckpointError` naming
    it."""
    from decrop.checkpoint import read_checkpoint

    return read_checkpoint(path)["state_dict"]
