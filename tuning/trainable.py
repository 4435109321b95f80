"""One Tune trial of a study: samples -> Ray Train DDP training -> sharded certification -> report.

Every study runs its trials through this one trainable: the Optuna search (a trial's parameters are the
searched config keys), the paper's presets and the search's confirmation (a trial's parameters are a *point*
of `tuning.presets`: method, seed, level and config overrides). The trial function is the driver of a Ray
Train run (PLATFORM_NOTES: Train V2 inside Tune): it builds a `TorchTrainer` whose per-epoch reports reach Tune
through ``TuneReportCallback`` (so ASHA can stop weak search trials on ``val/agreement``), calls ``fit()``,
certifies the trained denoiser as parallel Ray tasks and reports with ``ray.tune.report``. The no-denoiser
reference (method ``none``) trains nothing and is only certified.

**Objective** (the search): certified agreement of the smoothed classifier on the first ``certify.val_images``
validation images (`data.val_source`: extra unlabelled images or a held-out part of the limited subset),
averaged over the profile's radii (``certify.radii``): an image counts at r when the smoothed denoised
classifier agrees with the classifier's own prediction, certified at r, so no label outside the limited data
is read. The average over radii is an ACR on the reported grid: it rewards certifying more images and
certifying them further, and moves more smoothly than accuracy at one radius. It is certified in the
sequential mode, which decides each image at those radii and stops sampling as soon as the answer is known
(same per-image guarantee; its radii are the grid's, so the logged ``certify/acr`` is a lower bound). **Test images** are certified only by trials of a study that
reports them (presets, confirmation), after training: nothing is selected on them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from decrop.checkpoint import read_checkpoint, save_checkpoint
from decrop.classifier import classifier_key
from decrop.config import ExperimentConfig, config_hash, from_flat, to_flat, to_yaml
from decrop.pipeline import NO_DENOISER, build_denoiser, prepare, samples_for
from decrop.runtime import release_memory

from . import trial_cache
from .certify_tasks import certify_parallel
from .space import trial_overrides
from .tracking import (FACTOR_TAG, LEVEL_TAG, METHOD_TAG, PRESET_TAG, SEED_TAG, VARIANT_TAG, StudyTracker)
from .train_loop import train_loop_per_worker, trained_state


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


def _quiet(_: str) -> None:
    pass


def _train(settings: StudySettings, flat: dict, method: str, trial_id: str, name: str, run_id: str
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """The trial's denoiser, trained by a Ray Train run of `train_loop_per_worker`; (weights, last metrics)."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": flat, "method": method, "label": name,
                           "checkpoint_every": settings.checkpoint_every,
                           "threads": 1, "tracking_uri": settings.tracking_uri,
                           "experiment": settings.experiment, "run_id": run_id},
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
    result = trainer.fit()
    return trained_state(result), result.return_value or {}


def _save_weights(settings: StudySettings, cfg: ExperimentConfig, method: str, trial_id: str,
                  state: dict[str, torch.Tensor], channels: int) -> Path:
    weights = Path(settings.storage) / "denoisers" / f"{trial_id}.pt"
    denoiser = build_denoiser(cfg.denoiser, channels)
    denoiser.load_state_dict(state)
    save_checkpoint(weights, denoiser, {"kind": "denoiser", "method": method, "arch": cfg.denoiser.arch,
                                        "key": config_hash(cfg.denoiser), "dataset": cfg.data.dataset,
                                        "sigma": cfg.sigma, "trial_id": trial_id})
    weights.with_suffix(".yaml").write_text(to_yaml(cfg))  # what `python -m decrop export --trial` reads
    return weights


def run_trial(params: dict[str, Any], settings: StudySettings) -> None:
    """The Tune function trainable (see module doc). Raises on failure so Tune marks the trial errored.

    Idempotent once finished: the final result is recorded in the trial's MLflow run, and an attempt that finds it
    reports it again and does nothing else (Tune saves its own state only every few seconds, so a driver killed
    just after a trial ended restarts that trial on --resume)."""
    point = trial_point(params, settings.base)
    method, label = point["method"], point.get("label", point["method"])
    flat = trial_config(settings, params)
    cfg = from_flat(flat)
    trial_id = ray.tune.get_context().get_trial_id()
    clock = PhaseClock()
    tracker = StudyTracker(settings.tracking_uri, settings.experiment)
    earlier = tracker.find_trial_run(settings.parent_run_id, trial_id)
    done = tracker.saved_result(earlier) if earlier else None
    if done is not None:  # it finished, but the driver died before Tune saved that: report it again, redo nothing
        ray.tune.report(done)
        return
    tags = {PRESET_TAG: settings.preset, FACTOR_TAG: settings.factor, LEVEL_TAG: point["level"],
            METHOD_TAG: method, SEED_TAG: point["seed"], VARIANT_TAG: point.get("variant")}
    run_id = tracker.trial_run(settings.parent_run_id, trial_id, point["name"], flat, tags)
    tracker.start_attempt(run_id)
    inject_fault(point["name"])
    tracker.log_text(run_id, to_yaml(cfg), "config.yaml")
    clock.sink = (tracker, run_id)
    prep = prepare(cfg, log=_quiet, evaluate=False)
    tracker.log_params(run_id, {f"budget.{k}": v for k, v in prep.budget.items()})
    clock.lap("prepare")

    # A trial that only reports the test subset and whose result another study already computed with the same
    # config, seed and code takes it (tuning.trial_cache): the paper's studies share the profile's defaults.
    key = trial_cache.trial_key(flat, settings.workers, settings.gpus_per_worker) if (
        settings.test and not settings.validate) else None
    cached = trial_cache.load(cfg.cache_dir, key) if key else None
    if cached is not None:
        state, rows, source = cached
        tracker.set_tag(run_id, trial_cache.REUSED_TAG, source)
        if state is not None:
            tracker.log_artifact(run_id, str(_save_weights(settings, cfg, method, trial_id, state,
                                                           prep.info.channels)), "denoiser")
        metrics = tracker.log_certification(run_id, rows, cfg.certify.radii, f"test_{label}")
        clock.lap("reused")
        tracker.save_result(run_id, {**metrics, **clock.times})
        ray.tune.report({**metrics, **clock.times})
        return

    state, last = None, {}
    if method != NO_DENOISER:
        if method == "decrop":  # generated (and cached) once here, so the DDP workers read the cache
            samples_for(prep, prep.classifier, classifier_key(prep.cfg), log=_quiet)
            clock.lap("samples")
            release_memory()  # the attacks' activations: this actor only waits on the training and certification
        state, last = _train(settings, flat, method, trial_id, point["name"], run_id)
        clock.lap("train")
        tracker.log_artifact(run_id, str(_save_weights(settings, cfg, method, trial_id, state,
                                                       prep.info.channels)), "denoiser")
    metrics: dict[str, float] = {}
    if settings.validate:
        # Decisions at the study's radii, stopped as soon as they are known (decrop.sequential): same guarantee
        # per image, ~1.8x fewer forward passes at the quick profile's n.
        val = [int(i) for i in prep.val_indices[:cfg.certify.val_images]]
        rows = certify_parallel({**flat, "certify.mode": "sequential"}, {label: state}, "val", val,
                                settings.cert_shards, gpus_per_task=settings.gpus_per_worker)[label]
        metrics.update(tracker.log_certification(run_id, rows, cfg.certify.radii, "validation"))
        metrics["objective"] = validation_objective(metrics, cfg.certify.radii)
        tracker.log_metrics(run_id, {"certify/objective": metrics["objective"]}, step=0)
        clock.lap("certify_validation")
    if settings.test:
        rows = certify_parallel(flat, {label: state}, "test", [int(i) for i in prep.test_indices],
                                settings.cert_shards, gpus_per_task=settings.gpus_per_worker)[label]
        metrics.update(tracker.log_certification(run_id, rows, cfg.certify.radii, f"test_{label}"))
        clock.lap("certify_test")
        if key is not None:
            trial_cache.store(cfg.cache_dir, key, state, rows, f"{settings.experiment}/{trial_id}")
    result = {**metrics, **clock.times, "val/agreement": last.get("val/agreement", float("nan"))}
    tracker.save_result(run_id, result)
    ray.tune.report(result)


FAIL_ONCE_ENV, FAIL_ALWAYS_ENV = "DECROP_TEST_FAIL_ONCE", "DECROP_TEST_FAIL_ALWAYS"


def inject_fault(name: str) -> None:
    """Test-only fault injection (tests/tuning/test_faults.py); does nothing unless one of these is set:

    ``DECROP_TEST_FAIL_ALWAYS=<file>``: a trial whose name contains a line of that file (read at every attempt;
    no file, no failure) raises on every attempt. ``DECROP_TEST_FAIL_ONCE=<marker file>``: the first attempt (of
    any trial) that finds the marker absent creates it and raises; later attempts run normally.
    Called in each attempt once its MLflow run exists, so the failure shows in that run."""
    always, once = os.environ.get(FAIL_ALWAYS_ENV), os.environ.get(FAIL_ONCE_ENV)
    if always and os.path.exists(always):
        with open(always) as f:
            if any(line.strip() and line.strip() in name for line in f):
                raise RuntimeError(f"injected failure ({FAIL_ALWAYS_ENV}) of trial {name!r}")
    if once:
        try:
            open(once, "x").close()  # exclusive: of trials racing for the marker, one fails
        except FileExistsError:
            return
        raise RuntimeError(f"injected failure ({FAIL_ONCE_ENV}) of trial {name!r}")


class PhaseClock:
    """Wall seconds of a trial's phases (``time/<phase>``): where a study's time goes. Each phase is logged to
    the trial's run as it ends, so a trial that ASHA stops during training still has its earlier phases."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()
        self.sink: tuple[StudyTracker, str] | None = None

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{phase}"] = now - self.last
        self.last = now
        if self.sink is not None:
            tracker, run_id = self.sink
            tracker.log_metrics(run_id, {f"time/{phase}": self.times[f"time/{phase}"]}, step=0)


def validation_objective(metrics: dict[str, float], radii: tuple[float, ...]) -> float:
    """The search's objective: certified agreement on the validation images averaged over the study's radii
    (a Riemann sum of the certified-accuracy curve, i.e. an ACR on the reported grid)."""
    return sum(metrics[f"certify/acc_r{r:.2f}"] for r in radii) / len(radii)


def tune_trainable(settings: StudySettings):
    """`run_trial` bound to `settings`, with the resources a trial itself holds: no CPU (a CPU held idle by every
    trial driver deadlocks a 2-CPU machine; PLATFORM_NOTES), just a sliver of the head node, where the drivers
    live. Its Train workers and certification tasks request their own."""
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, settings=settings),
                                   {"cpu": 0, "node:__internal_head__": 0.01})


def load_denoiser_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights a trial saved; a missing or corrupt file raises `CheckpointError` naming it."""
    return read_checkpoint(path)["state_dict"]
