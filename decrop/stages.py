"""A method's training: its stages, run one after the other on one denoiser, resumable from any epoch.

`train_method` is what a run and a Ray Train worker call: the baseline is one stage of L_lc; DE-CROP generates its
boundary and interpolated samples (or, in the black-box setting, distils a surrogate first) and runs stage 1 and,
when configured, stage 2 with the domain discriminator (`method_stages`). `run_stages` trains a fresh denoiser
through the stages with `decrop.training.train_denoiser`, each stage with an Adam-then-SGD schedule of its own.

Everything a resumed run needs is one `ResumeState`, captured after every epoch (`TrainHooks.on_epoch_end`) and
handed back through `TrainHooks.resume`: the run then continues bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .blackbox import BlackBox, distill_surrogate
from .checkpoint import restore_rng_state, rng_state
from .classifier import build_classifier, classifier_key
from .config import config_hash, expand_path
from .data import AugmentedTensorDataset, augmentation_policy
from .distributed import Shard
from .metrics import MetricSink
from .models import DomainDiscriminator, build_denoiser
from .objectives import DecropObjective, Objective, baseline_objective
from .prepare import Log, Prepared
from .samples import GeneratedSamples, load_or_generate_samples
from .training import AdamThenSGD, TrainResult, train_denoiser


@dataclass
class ResumeState:
    """Where a training run stands after an epoch, all a resumed run needs to continue it exactly.

    `epoch` counts the epochs done over all stages; `denoiser` is its state dict, `schedule` the stage's
    `AdamThenSGD` state, `objective` the objective's own parts (stage 2's discriminator and its optimiser), `rng`
    the CPU, CUDA and shuffle generators (`decrop.checkpoint.rng_state`). Plain tensors and numbers: `as_dict` is
    what a checkpoint file holds (loadable with ``weights_only=True``), `from_dict` reads it back.
    """

    epoch: int
    denoiser: dict[str, Tensor]
    schedule: dict[str, Any]
    objective: dict[str, Any]
    rng: dict[str, Any]

    @classmethod
    def capture(cls, epoch: int, denoiser: nn.Module, schedule: AdamThenSGD, objective: Objective,
                device: torch.device, loader: DataLoader) -> ResumeState:
        """The state after `epoch` epochs, deep-copied (state dicts hold the live tensors, which the next epoch
        changes in place)."""
        return copy.deepcopy(cls(epoch=epoch, denoiser=_unwrap(denoiser).state_dict(),
                                 schedule=schedule.state_dict(), objective=objective.state_dict(),
                                 rng=rng_state(device, loader.generator)))

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "denoiser": self.denoiser, "schedule": self.schedule,
                "objective": self.objective, "rng": self.rng}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ResumeState:
        return cls(epoch=state["epoch"], denoiser=state["denoiser"], schedule=state["schedule"],
                   objective=state["objective"] or {}, rng=state["rng"])

    def restore_rng(self, device: torch.device, loader: DataLoader) -> None:
        """The global generators (weight init, augmentation, noise) and the loader's shuffle, as saved."""
        restore_rng_state(self.rng, device, loader.generator)


@dataclass
class TrainHooks:
    """How `tuning/` runs the same training under Ray Train; the defaults are a plain single-process run.

    `wrap` wraps the trained denoiser (e.g. in DistributedDataParallel, after `convert_global_batchnorm`);
    `shard` is this worker's share of every global batch (`decrop.distributed`); `resume` is the state to continue
    from; ``on_epoch_end(epoch, metrics, state)`` runs after every epoch (counted over all stages), ``state()``
    returning the `ResumeState` after it. Every worker iterates the same global batches: the loader is never
    sharded.
    """

    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    shard: Shard = field(default_factory=Shard)
    resume: ResumeState | None = None
    on_epoch_end: Callable[[int, dict[str, float], Callable[[], ResumeState]], None] | None = None


@dataclass(frozen=True)
class Stage:
    """One training stage: its name, its epochs, its objective and whether it continues the previous stage's
    Adam-then-SGD schedule (else it starts one of its own)."""

    name: str
    epochs: int
    make_objective: Callable[[], Objective]
    continues_schedule: bool = False


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def run_stages(prep: Prepared, classifier: nn.Module, images: tuple[Tensor, ...], stages: list[Stage],
               sink: MetricSink | None = None, hooks: TrainHooks | None = None) -> tuple[nn.Module, TrainResult]:
    """Train a fresh denoiser on `images` (aligned tuples, one augmentation per sample) through consecutive
    stages; each stage starts from the previous stage's denoiser with a fresh optimiser schedule, or the previous
    stage's schedule counted on (`Stage.continues_schedule`). Returns the
    (unwrapped) denoiser in eval mode and the per-epoch history (epochs counted over all stages)."""
    cfg, hooks = prep.cfg, hooks or TrainHooks()
    torch.manual_seed(cfg.seed)
    # channels_last weights: the training step runs 1.15x faster than NCHW (benchmarks/train_speed.py).
    denoiser = build_denoiser(cfg.denoiser, prep.info.channels).to(prep.device, memory_format=torch.channels_last)
    dataset = AugmentedTensorDataset(images, prep.train_labels,
                                     augmentation_policy(cfg.data.augment, prep.info.image_size))
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    resume = hooks.resume
    done = resume.epoch if resume is not None else 0  # epochs over all stages already trained
    if resume is not None:
        denoiser.load_state_dict(resume.denoiser)
    model = hooks.wrap(denoiser)
    result, offset, schedule = TrainResult(), 0, None
    for stage in stages:
        if done < offset + stage.epochs:
            in_stage = max(done - offset, 0)
            # The global RNG drives weight init, augmentation and noise, the loader's generator the shuffle.
            # Restoring both where the interrupted run saved them (before building a stage that begins at the
            # resume point; after rebuilding one that was under way) continues it exactly.
            if resume is not None and done == offset:
                resume.restore_rng(prep.device, loader)
            objective = stage.make_objective()
            if schedule is None or not stage.continues_schedule:
                schedule = AdamThenSGD(model.parameters(), cfg.train)
            if stage.continues_schedule:
                schedule.offset = offset
            # A continued schedule resumed at the stage's start takes the previous stage's optimiser state.
            if resume is not None and (in_stage > 0 or (stage.continues_schedule and done == offset)):
                schedule.load_state_dict(resume.schedule, in_stage)
            if resume is not None and in_stage > 0:
                objective.load_state_dict(resume.objective)
                resume.restore_rng(prep.device, loader)

            def on_epoch_end(epoch, schedule, metrics, objective=objective):
                if hooks.on_epoch_end is not None:
                    hooks.on_epoch_end(epoch, metrics, lambda: ResumeState.capture(
                        epoch + 1, model, schedule, objective, prep.device, loader))

            part = train_denoiser(model, classifier, loader, objective, cfg.train, epochs=stage.epochs,
                                  val_images=prep.val_images, sigma=cfg.sigma, seed=cfg.seed, sink=sink,
                                  schedule=schedule, start_epoch=in_stage, epoch_offset=offset,
                                  on_epoch_end=on_epoch_end)
            result.history += part.history
        offset += stage.epochs
    return denoiser.eval(), result


def samples_for(prep: Prepared, model: nn.Module, model_key: str, log: Log = print) -> GeneratedSamples:
    """Boundary + interpolated samples of the training images through `model`, cached per model, images and
    setting."""
    cfg = prep.cfg
    images = [prep.budget["train_sha256"]] if "train_sha256" in prep.budget else []  # folders: positions only
    key = config_hash(model_key, prep.train_indices.tolist(), cfg.seed, *images)
    return load_or_generate_samples(expand_path(cfg.cache_dir) / "samples", model, prep.train_images,
                                    prep.train_labels, cfg.decrop, seed=cfg.seed, key=key, log=log)


def method_stages(method: str, prep: Prepared, classifier: nn.Module, hooks: TrainHooks | None = None
                  ) -> list[Stage]:
    """The training stages of `method` (`ExperimentConfig.stage_epochs`): the baseline's one stage of L_lc;
    DE-CROP's stage 1 (L_lc + L_cs + L_mmd) and, when ``decrop.stage2_epochs`` > 0, stage 2, a run of its own
    that adds the domain discriminator (its own Adam) to the stage-1 denoiser, whose schedule restarts or continues
    stage 1's (``decrop.stage2_schedule``)."""
    cfg, shard = prep.cfg, (hooks or TrainHooks()).shard
    epochs = cfg.stage_epochs(method)
    if method == "baseline":
        return [Stage("baseline", epochs[0], lambda: baseline_objective(cfg.train.objective, cfg.sigma, shard))]
    stages = [Stage("stage1", epochs[0], lambda: DecropObjective(cfg.sigma, cfg.decrop, shard=shard))]
    if len(epochs) > 1:
        stages.append(Stage("stage2", epochs[1], lambda: DecropObjective(
            cfg.sigma, cfg.decrop, DomainDiscriminator(classifier.feature_dim).to(prep.device), shard=shard),
            continues_schedule=cfg.decrop.stage2_schedule == "continue"))
    return stages


def train_method(method: str, prep: Prepared, sink: MetricSink | None = None, log: Log = print,
                 hooks: TrainHooks | None = None) -> tuple[nn.Module, TrainResult]:
    """Train the denoiser of `method` on the limited data; returns it in eval mode with its history.

    ``baseline``: Salman et al. (L_lc). ``decrop``: white-box DE-CROP through the classifier.
    ``decrop_blackbox``: DE-CROP through a surrogate distilled from the classifier's outputs.
    """
    if method == "baseline":
        return run_stages(prep, prep.classifier, (prep.train_images,),
                          method_stages(method, prep, prep.classifier, hooks), sink, hooks)
    if method == "decrop":
        samples = samples_for(prep, prep.classifier, classifier_key(prep.cfg), log)
        return run_stages(prep, prep.classifier, (prep.train_images, *samples.as_images()),
                          method_stages(method, prep, prep.classifier, hooks), sink, hooks)
    if method == "decrop_blackbox":
        surrogate, samples = distilled_surrogate(prep, log)
        return run_stages(prep, surrogate, (prep.train_images, *samples.as_images()),
                          method_stages(method, prep, surrogate, hooks), sink, hooks)
    raise ValueError(f"unknown method {method!r}")


def distilled_surrogate(prep: Prepared, log: Log = print) -> tuple[nn.Module, GeneratedSamples]:
    """The black-box setting's surrogate (distilled from the classifier's outputs on the subset, then on the
    subset plus the samples generated through it) and those samples."""
    cfg = prep.cfg
    blackbox = BlackBox(prep.classifier)
    torch.manual_seed(cfg.seed)
    surrogate = build_classifier(prep.info, cfg.blackbox.arch).to(prep.device)
    common = dict(image_size=prep.info.image_size, seed=cfg.seed, log=log)
    distill_surrogate(blackbox, surrogate, prep.train_images, cfg.blackbox, **common)
    surrogate_key = config_hash(classifier_key(cfg), "surrogate", cfg.blackbox, cfg.seed)
    samples = samples_for(prep, surrogate, surrogate_key, log)
    # Second round: the generated samples lie near the boundary, where the surrogate must match best.
    distill_surrogate(blackbox, surrogate, torch.cat([prep.train_images, *samples.as_images()]),
                      cfg.blackbox, **common)
    return surrogate, samples
