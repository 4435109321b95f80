"""The Ray Train worker function: one DDP rank of a trial's denoiser training.

Each rank runs the library's own training (`decrop.stages.train_method`) with Ray's hooks plugged in: the
denoiser's BatchNorm made global and the denoiser wrapped in DistributedDataParallel by ``prepare_model`` (gloo
on CPU, nccl on GPU); every rank iterates the same global batches and computes its contiguous share of each
(`decrop.distributed`), so W workers optimise exactly the objective of one process. Every epoch every rank
calls ``ray.train.report`` (a barrier); rank 0 attaches a checkpoint every ``checkpoint_every`` epochs. Rank 0's
reports carry the epoch's metrics to Tune (``TuneReportCallback``), whose driver logs them to the trial's MLflow
run (`tuning.tracking.MlflowStatusCallback`): the workers never load MLflow (nor hold its memory). A retried trial
finds its latest checkpoint with ``ray.train.get_checkpoint()`` and continues from it, bit for bit (its first
report says ``train/resumed_from_epoch``). When ``weights`` is given, rank 0 writes the trained denoiser there
at the end (`decrop.checkpoint.save_checkpoint`, with what it is in its metadata).
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
from decrop.metrics import PrintSink
from decrop.prepare import prepare
from decrop.stages import ResumeState, TrainHooks, train_method
from decrop.runtime import tune_allocator

STATE_FILE = "state.pt"


def _load_state(checkpoint: ray.train.Checkpoint | None) -> ResumeState | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return ResumeState.from_dict(torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True))


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """`loop_config`: ``config`` (flat experiment config), ``method``, ``label`` (progress lines),
    ``checkpoint_every``, ``threads`` and ``weights`` (where rank 0 writes the trained denoiser; optional, with
    ``trial_id`` for its metadata). Rank 0 returns the final epoch's metrics."""
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
    sink = PrintSink(f"[{loop_config.get('label', 'train')}] ", total=total) if rank == 0 else None
    every = loop_config.get("checkpoint_every", 5)
    resume = _load_state(ray.train.get_checkpoint())
    resumed = {"train/resumed_from_epoch": resume.epoch} if resume is not None else {}

    def on_epoch_end(epoch: int, metrics: dict[str, float], state) -> None:
        done = epoch + 1
        report = {**metrics, **resumed, "epoch": done}
        resumed.clear()  # said once, in the first report after resuming
        if rank == 0 and (done % every == 0 or done == total):
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state().as_dict(), Path(folder) / STATE_FILE)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(report)

    # Every rank iterates the same global batches and computes its share of them; BatchNorm, the MMD and the
    # discriminator see the whole batch (decrop.distributed): the objective does not depend on the worker count.
    # Only the denoiser is wrapped in DDP; the objective keeps stage 2's discriminator replicas in sync itself
    # (rank 0's weights broadcast, gradients averaged before its step: decrop.objectives.DecropObjective).
    shard = Shard(rank, world)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:  # DDP (more than one worker) without per-forward syncs
        return ray.train.torch.prepare_model(convert_global_batchnorm(module, shard),
                                             parallel_strategy_kwargs=no_forward_buffer_sync())
    hooks = TrainHooks(wrap=wrap, shard=shard, resume=resume, on_epoch_end=on_epoch_end)
    if resume is not None:
        log(f"resuming from the checkpoint of epoch {resume.epoch}")
    denoiser, result = train_method(loop_config["method"], prep, sink, log=log, hooks=hooks)
    if rank == 0 and loop_config.get("weights"):
        save_checkpoint(Path(loop_config["weights"]), denoiser, {
            "kind": "denoiser", "method": loop_config["method"], "arch": cfg.denoiser.arch,
            "key": config_hash(cfg.denoiser), "dataset": cfg.data.dataset, "sigma": cfg.sigma,
            "trial_id": loop_config.get("trial_id")})
    return result.final if rank == 0 else None
