"""The Ray Train worker function: one DDP rank of a trial's denoiser training.

Each rank runs the library's own training (`decrop.pipeline.train_method`) with Ray's hooks plugged in: the
denoiser's BatchNorm made global and the denoiser wrapped in DistributedDataParallel by ``prepare_model`` (gloo
on CPU, nccl on GPU); every rank iterates the same global batches and computes its contiguous share of each
(`decrop.distributed`), so W workers optimise exactly the objective of one process. Every epoch every rank calls ``ray.train.report`` (a barrier); rank 0 attaches a checkpoint every
``checkpoint_every`` epochs and logs the epoch's metrics to the trial's MLflow run. A retried trial finds
its latest checkpoint with ``ray.train.get_checkpoint()`` and continues from it, bit for bit (logged as
``train/resumed_from_epoch`` in the trial's run). When ``weights`` is given, rank 0 writes the trained denoiser
there at the end (`decrop.checkpoint.save_checkpoint`, with what it is in its metadata).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from decrop.checkpoint import save_checkpoint
from decrop.config import config_hash, from_flat
from decrop.distributed import Shard, convert_global_batchnorm, no_forward_buffer_sync
from decrop.metrics import MultiSink, PrintSink
from decrop.pipeline import TrainHooks, prepare, train_method
from decrop.runtime import tune_allocator

from .tracking import StudyTracker

STATE_FILE = "state.pt"


class MlflowSink:
    """Epoch metrics of rank 0 into the trial's MLflow run."""

    def __init__(self, tracker: StudyTracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def log_metrics(self, metrics, step):
        self.tracker.log_metrics(self.run_id, metrics, step)


def _load_state(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """`loop_config`: ``config`` (flat experiment config), ``method``, ``label`` (progress lines),
    ``checkpoint_every``, ``threads``, ``weights`` (where rank 0 writes the trained denoiser; optional, with
    ``trial_id`` for its metadata) and, for MLflow, ``tracking_uri``, ``experiment``, ``run_id``. Rank 0 returns the
    final epoch's metrics."""
    cfg = from_flat(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    tune_allocator()
    torch.set_num_threads(loop_config.get("threads", 1))
    log = print if rank == 0 else (lambda _: None)
    prep = prepare(cfg, log=log, evaluate=False)
    device = ray.train.torch.get_device()  # cuda:<local rank> on a GPU worker, else cpu
    if device != prep.device:
        prep.classifier.to(device)
        prep.val_images, prep.device = prep.val_images.to(device), device

    total = sum(cfg.stage_epochs(loop_config["method"]))
    sinks = []
    if rank == 0:
        sinks.append(PrintSink(f"[{loop_config.get('label', 'train')}] ", total=total))
        if loop_config.get("run_id"):
            tracker = StudyTracker(loop_config["tracking_uri"], loop_config["experiment"])
            sinks.append(MlflowSink(tracker, loop_config["run_id"]))
    every = loop_config.get("checkpoint_every", 5)

    def on_epoch_end(epoch: int, metrics: dict[str, float], state) -> None:
        done = epoch + 1
        if rank == 0 and (done % every == 0 or done == total):
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state(), Path(folder) / STATE_FILE)
                ray.train.report({**metrics, "epoch": done},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report({**metrics, "epoch": done})

    # Every rank iterates the same global batches and computes its share of them; BatchNorm, the MMD and the
    # discriminator see the whole batch (decrop.distributed): the objective does not depend on the worker count.
    shard = Shard(rank, world)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:  # DDP (more than one worker) without per-forward syncs
        return ray.train.torch.prepare_model(convert_global_batchnorm(module, shard),
                                             parallel_strategy_kwargs=no_forward_buffer_sync())
    hooks = TrainHooks(wrap=wrap, shard=shard, resume=_load_state(ray.train.get_checkpoint()),
                       on_epoch_end=on_epoch_end)
    if hooks.resume is not None:
        log(f"resuming from the checkpoint of epoch {hooks.resume['epoch']}")
        if rank == 0 and loop_config.get("run_id"):  # the trial's run says where its training picked up again
            tracker.log_metrics(loop_config["run_id"], {"train/resumed_from_epoch": hooks.resume["epoch"]},
                                step=hooks.resume["epoch"])
    denoiser, result = train_method(loop_config["method"], prep, MultiSink(*sinks), log=log, hooks=hooks)
    if rank == 0 and loop_config.get("weights"):
        save_checkpoint(Path(loop_config["weights"]), denoiser, {
            "kind": "denoiser", "method": loop_config["method"], "arch": cfg.denoiser.arch,
            "key": config_hash(cfg.denoiser), "dataset": cfg.data.dataset, "sigma": cfg.sigma,
            "trial_id": loop_config.get("trial_id")})
    return result.final if rank == 0 else None
