"""One Tune trial of a DE-CROP study: samples -> Ray Train DDP training -> sharded certification -> objective.

The trial function is the driver of a Ray Train run (PLATFORM_NOTES: Train V2 inside Tune): it builds a
`TorchTrainer` whose per-epoch reports reach Tune through ``TuneReportCallback`` (so ASHA can stop weak
trials on ``val/agreement``), calls ``fit()``, certifies the trained denoiser on validation images as parallel
Ray tasks and reports the objective with ``ray.tune.report``.

**Objective**: the average certified radius (ACR) of the smoothed classifier on the first
``certify.val_images`` validation images (`data.val_source`: extra unlabelled images or a held-out part of the
limited subset), where an image counts as correct when the smoothed denoised classifier agrees with the
classifier's own prediction: no label outside the limited data is read. ACR rewards both certifying more
images and certifying them further, and varies smoothly with the hyperparameters, where certified accuracy at
one radius on ~100 images moves in steps of 1%. The test images are never touched.
"""

from __future__ import annotations

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
from decrop.config import config_hash, from_flat, to_flat, to_yaml
from decrop.pipeline import build_denoiser, prepare, samples_for

from .certify_tasks import certify_parallel
from .space import trial_overrides
from .tracking import StudyTracker
from .train_loop import train_loop_per_worker, trained_state


@dataclass(frozen=True)
class StudySettings:
    """What every trial of a study shares (picklable: it travels to the trial processes)."""

    base: dict[str, Any]  # the profile's flat config
    storage: str  # absolute folder for Train runs and checkpoints
    tracking_uri: str
    experiment: str
    parent_run_id: str
    workers: int = 1
    gpus_per_worker: float = 0.0
    cert_shards: int = 2
    checkpoint_every: int = 5


def trial_config(settings: StudySettings, params: dict[str, Any]) -> dict[str, Any]:
    """The flat config of a trial: the profile's, with the sampled parameters applied (and checked)."""
    flat = {**settings.base, **trial_overrides(params, settings.base), "methods": ["decrop"]}
    return to_flat(from_flat(flat))


def _quiet(_: str) -> None:
    pass


def run_trial(params: dict[str, Any], settings: StudySettings) -> None:
    """The Tune function trainable (see module doc). Raises on failure so Tune marks the trial errored."""
    flat = trial_config(settings, params)
    cfg = from_flat(flat)
    context = ray.tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    tracker = StudyTracker(settings.tracking_uri, settings.experiment)
    run_id = tracker.trial_run(settings.parent_run_id, trial_id, trial_name, flat)
    tracker.log_text(run_id, to_yaml(cfg), "config.yaml")

    # Samples are generated (and cached per subset and attack setting) here, once, so the DDP workers read
    # the cache instead of each generating them.
    prep = prepare(cfg, log=_quiet, evaluate=False)
    # The data budget (and the classifier file's sha256) as params of the trial's run, beside its config.
    tracker.trial_run(settings.parent_run_id, trial_id, trial_name, {f"budget.{k}": v for k, v in prep.budget.items()})
    samples_for(prep, prep.classifier, classifier_key(cfg), log=_quiet)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": flat, "method": "decrop", "label": trial_name,
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
    state = trained_state(result)

    rows = certify_parallel(flat, {"trial": state}, "val", [int(i) for i in prep.val_indices[:cfg.certify.val_images]],
                            settings.cert_shards, gpus_per_task=settings.gpus_per_worker)["trial"]
    metrics = tracker.log_certification(run_id, rows, cfg.certify.radii, "validation")
    weights = Path(settings.storage) / "denoisers" / f"{trial_id}.pt"
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels)
    denoiser.load_state_dict(state)
    save_checkpoint(weights, denoiser, {"kind": "denoiser", "method": "decrop", "arch": cfg.denoiser.arch,
                                        "key": config_hash(cfg.denoiser), "dataset": cfg.data.dataset,
                                        "sigma": cfg.sigma, "trial_id": trial_id})
    weights.with_suffix(".yaml").write_text(to_yaml(cfg))  # what `python -m decrop export --trial` reads
    tracker.log_artifact(run_id, str(weights), "denoiser")
    ray.tune.report({"objective": metrics["certify/acr"], **metrics,
                     "val/agreement": result.return_value.get("val/agreement", float("nan"))})


def tune_trainable(settings: StudySettings):
    """`run_trial` bound to `settings`, with the resources a trial itself holds: no CPU (a CPU held idle by every
    trial driver deadlocks a 2-CPU machine; PLATFORM_NOTES), just a sliver of the head node, where the drivers
    live. Its Train workers and certification tasks request their own."""
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, settings=settings),
                                   {"cpu": 0, "node:__internal_head__": 0.01})


def load_denoiser_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights a trial saved (for the final test certification of the best trial); a missing or corrupt
    file raises `CheckpointError` naming it."""
    return read_checkpoint(path)["state_dict"]
