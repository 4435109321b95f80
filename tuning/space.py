"""The search space of a DE-CROP study, define-by-run for Optuna (no computation here, only suggestions).

The space is declared once, in `tuning.schema.SPACE` (which the report reads too): the mixing coefficient (the
paper's alpha, `decrop.mixing`) of the interpolated samples, the loss weights w_cs and w_mmd (log scale), the
interpolation count n_interp, the boundary attack, whether stage 2 (the domain discriminator) runs and, if it
does, its gradient-reversal schedule (scale w_beta and steepness gamma). Parameter names are the config's dotted
keys, so a trial's parameters are config overrides as they stand (plus ``stage2``).
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from .schema import SPACE

STAGE2_FRACTION = 0.25  # stage 2's share of the epoch budget when the profile itself has no stage 2


def define_space(trial: optuna.Trial) -> None:
    """Suggest every parameter of `SPACE` in its order; one whose ``only_if`` parameter came out False is not
    suggested (stage 2's schedule without stage 2)."""
    values: dict[str, Any] = {}
    for p in SPACE:
        if p.only_if is not None and not values[p.only_if]:
            continue
        values[p.name] = (trial.suggest_categorical(p.name, list(p.choices)) if p.choices is not None else
                          trial.suggest_float(p.name, p.low, p.high, log=p.log))


def total_epochs(base: dict[str, Any]) -> int:
    """The profile's epoch budget of DE-CROP, stage 1 plus stage 2: every trial trains exactly this many."""
    return int(base["train.epochs"]) + int(base["decrop.stage2_epochs"])


def stage2_length(base: dict[str, Any]) -> int:
    """Epochs of stage 2 when a trial turns it on: the profile's own length, or a quarter of the budget."""
    return int(base["decrop.stage2_epochs"]) or max(1, round(STAGE2_FRACTION * total_epochs(base)))


def trial_overrides(params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Config overrides (dotted keys) of a trial's sampled parameters over the profile's flat config `base`.
    ``stage2`` splits the profile's budget (`total_epochs`) into stage 1 and a stage 2 of `stage2_length`, or
    gives all of it to stage 1: trials with and without stage 2 train equally long."""
    overrides = {k: v for k, v in params.items() if k != "stage2"}
    stage2 = stage2_length(base) if params.get("stage2") else 0
    overrides["train.epochs"] = total_epochs(base) - stage2
    overrides["decrop.stage2_epochs"] = stage2
    return overrides


def default_point(base: dict[str, Any]) -> dict[str, Any]:
    """The profile's own values of the searched parameters: the search's first trial (``points_to_evaluate``),
    so every study measures the method's defaults next to what it finds. ``trial_overrides`` of it reproduces
    the profile."""
    point: dict[str, Any] = {}
    for p in SPACE:
        if p.only_if is not None and not point[p.only_if]:
            continue
        point[p.name] = int(base["decrop.stage2_epochs"]) > 0 if p.name == "stage2" else base[p.name]
    return point


class FinalObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from a trial's final objective only.

    A trial's per-epoch results carry the scheduler's metric (``val/agreement``, for ASHA) but not the
    objective, which exists only once the denoiser is certified; OptunaSearch would index every result by
    its metric. Trials that ASHA stops never report the objective and land in Optuna as pruned.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
