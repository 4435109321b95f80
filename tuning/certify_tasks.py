"""Certification as parallel Ray tasks: images split into shards, each certified by its own task.

Every image's noise is seeded by (seed, image index) (`decrop.certify.certify_indices`), so the merged shards
equal the unsharded result exactly, whatever the number of shards or where they ran. Tasks are launched with
``scheduling_strategy="SPREAD"``: from inside a Tune trial the default strategy would capture them into the
trial's placement group, where they never get a CPU (Ray 2.60: tasks launched from a trial inherit its placement group). A denoiser travels as the path of its
weights file, so the process that launches the tasks (a Tune trial actor) never loads torch; the tasks do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import ray

from decrop.config import ExperimentConfig, config_hash, from_flat
from decrop.rows import CertRow, merge_rows

if TYPE_CHECKING:
    from decrop.prepare import Prepared


def _quiet(_: str) -> None:
    pass


_PREPARED: dict[str, Prepared] = {}  # per worker process: Ray reuses a task's process for the next task


def _prepared(cfg: ExperimentConfig) -> Prepared:
    """`prepare(cfg)`, kept for the process's next task of the same data, classifier and seed: the dataset and
    the classifier are loaded once per worker process rather than once per shard (~2 s each on a CPU)."""
    from decrop.prepare import prepare

    key = config_hash(cfg.data, cfg.classifier, cfg.seed, cfg.cache_dir, cfg.device)
    if key not in _PREPARED:
        _PREPARED.clear()  # one setting at a time: a dataset's tensors are hundreds of MB
        _PREPARED[key] = prepare(cfg, log=_quiet, evaluate=False)
    return _PREPARED[key]


# A task whose worker dies (killed, out of memory, its node lost) is run again elsewhere: the rows are identical,
# since the noise is seeded per image (Ray's default for tasks, stated because the studies rely on it).
@ray.remote(num_cpus=1, max_retries=3)
def certify_shard(flat_config: Mapping[str, Any], weights: str | None, split: str,
                  indices: list[int]) -> list[CertRow]:
    """Certify images `indices` (dataset indices) of `split` with the classifier behind the denoiser whose
    weights file is `weights` (None: the classifier alone). "val": validation images of the training split, whose
    target is the classifier's own prediction (no label is read); "test": the test split with its labels."""
    import torch

    from decrop.certify import certify_indices
    from decrop.checkpoint import read_checkpoint
    from decrop.models import build_denoiser, smoothed_model
    from decrop.runtime import release_memory, tune_allocator

    cfg = from_flat(flat_config)
    tune_allocator()
    torch.set_num_threads(1)  # one CPU per task: parallelism comes from the shards
    prep = _prepared(cfg)
    denoiser = None
    if weights is not None:
        denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device)
        denoiser.load_state_dict(read_checkpoint(Path(weights))["state_dict"])
    model = smoothed_model(prep.classifier, denoiser, cfg.certify.fold_bn)
    dataset = prep.val_dataset() if split == "val" else prep.test_set
    rows = certify_indices(model, dataset, indices, cfg.certify, num_classes=prep.info.num_classes, sigma=cfg.sigma,
                           seed=cfg.seed, device=prep.device)
    # The forward passes' buffers, which `tune_allocator` keeps in the heap, back to the OS: Ray keeps this worker
    # for the next task, or hands it to another trial's Train worker, while trials train (1.06 -> ~0.6 GiB of
    # anonymous memory per idle worker; the prepared data stays for the next shard).
    del model, denoiser
    release_memory()
    return rows


def certify_parallel(flat_config: Mapping[str, Any], denoisers: Mapping[str, str | Path | None],
                     split: str, indices: list[int], num_shards: int, gpus_per_task: float = 0
                     ) -> dict[str, list[CertRow]]:
    """Certify several denoisers (label -> weights file, None for no denoiser) on images `indices` of `split`
    (dataset indices: ``Prepared.test_indices`` for "test", ``Prepared.val_indices[:certify.val_images]`` for
    "val"), each over `num_shards`
    shards, all tasks in flight at once; returns the merged rows per label."""
    shards = [list(map(int, s)) for s in np.array_split(indices, min(num_shards, len(indices))) if len(s)]
    task = certify_shard.options(scheduling_strategy="SPREAD", num_gpus=gpus_per_task)
    futures = {label: [task.remote(flat_config, None if weights is None else str(weights), split, shard)
                       for shard in shards] for label, weights in denoisers.items()}
    return {label: merge_rows(ray.get(refs)) for label, refs in futures.items()}
