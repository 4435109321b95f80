"""The search space of a DE-CROP study, define-by-run for Optuna (no computation here, only suggestions).

Searched: the mixing coefficient alpha of the interpolated samples, the loss weights w_cs and w_mmd (log
scale), the interpolation count n_interp, the boundary attack, whether stage 2 (the domain discriminator)
runs and, if it does, its gradient-reversal schedule (scale w_beta and steepness gamma). Parameter names are
the config's dotted keys, so a trial's parameters are config overrides as they stand (plus ``stage2``).
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

STAGE2_FRACTION = 0.25  # when stage 2 runs, it takes the last quarter of the epoch budget


def define_space(trial: optuna.Trial) -> None:
    trial.suggest_float("decrop.alpha", 0.2, 0.95)
    trial.suggest_float("decrop.w_cs", 0.25, 16.0, log=True)
    trial.suggest_float("decrop.w_mmd", 0.25, 16.0, log=True)
    trial.suggest_categorical("decrop.n_interp", [1, 2, 5])
    trial.suggest_categorical("decrop.attack", ["pgd", "autoattack", "deepfool", "none"])
    if trial.suggest_categorical("stage2", [True, False]):
        trial.suggest_float("decrop.beta_scale", 0.25, 4.0, log=True)
        trial.suggest_float("decrop.beta_gamma", 2.0, 20.0, log=True)


def trial_overrides(params: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Config overrides (dotted keys) of a trial's sampled parameters; ``stage2`` becomes a stage length."""
    overrides = {k: v for k, v in params.items() if k != "stage2"}
    overrides["decrop.stage2_epochs"] = max(1, round(STAGE2_FRACTION * epochs)) if params.get("stage2") else 0
    return overrides


class FinalObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from a trial's final objective only.

    A trial's per-epoch results carry the scheduler's metric (``val/agreement``, for ASHA) but not the
    objective, which exists only once the denoiser is certified; OptunaSearch would index every result by
    its metric. Trials that ASHA stops never report the objective and land in Optuna as pruned.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
