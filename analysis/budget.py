"""The training-budget study: learning curves of both methods, and the budget at which both have converged.

The `budget` preset trains DE-CROP and the baseline for several total epoch budgets (the same optimizer steps for
both at each budget) and certifies the test images after each. Every trial logs the label-free validation
agreement per epoch (``val/agreement``: the fraction of validation images whose smoothed, denoised prediction
agrees with the classifier's own, no label read), so the longest budget's runs give each method's learning curve.
`converged_epoch` reads off where a curve reaches its plateau; the test certification at each budget is shown
for reporting only (nothing is chosen on test images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from .arms import StudyArms
from .figures import FigureOut, _canvas, _save
from .stats import certified_matrix
from .tables import method_name

TOLERANCE = 0.01  # "within about 1 point of the plateau"
SMOOTHING = 5  # epochs of the trailing moving average the plateau test reads


def load_curves(client: MlflowClient, study: StudyArms, key: str = "val/agreement") -> pd.DataFrame:
    """Per-epoch `key` of every trained arm's runs: method, level, seed, epoch, value."""
    records = []
    for (level, method), arm in study.arms.items():
        if method == "none":
            continue
        for seed, run in arm.runs.items():
            records += [{"method": method, "level": level, "seed": seed, "epoch": m.step, "value": m.value}
                        for m in client.get_metric_history(str(run.name), key)]
    return pd.DataFrame(records, columns=["method", "level", "seed", "epoch", "value"])


def longest(curves: pd.DataFrame) -> pd.DataFrame:
    """Each method's curves at its longest budget, averaged over seeds: method, epoch, mean, low, high, seeds."""
    out = []
    for method, own in curves.groupby("method", sort=False):
        top = own[own["level"] == max(own["level"], key=lambda lv: own.loc[own["level"] == lv, "epoch"].max())]
        by_epoch = top.groupby("epoch")["value"]
        out.append(pd.DataFrame({"method": method, "epoch": by_epoch.mean().index, "mean": by_epoch.mean().values,
                                 "low": by_epoch.min().values, "high": by_epoch.max().values,
                                 "seeds": by_epoch.count().values}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["method", "epoch", "mean", "low", "high", "seeds"])


def converged_epoch(epochs: np.ndarray, values: np.ndarray, tolerance: float = TOLERANCE,
                    smoothing: int = SMOOTHING) -> tuple[int, float]:
    """(the first epoch from which the trailing `smoothing`-epoch mean of `values` never falls more than
    `tolerance` below the plateau, the plateau): the plateau is the mean of the last tenth of the curve (at
    least `smoothing` epochs). A curve still rising at its end (by more than `tolerance` over its last quarter, by
a line fitted to it) converges only at its last epoch."""
    order = np.argsort(epochs)
    epochs, values = np.asarray(epochs)[order], np.asarray(values, dtype=float)[order]
    tail = max(smoothing, len(values) // 10)
    plateau = float(values[-tail:].mean())
    quarter = max(smoothing, len(values) // 4)
    rise = np.polyfit(epochs[-quarter:], values[-quarter:], 1)[0] * (epochs[-1] - epochs[-quarter])
    if rise > tolerance:  # still climbing over its last quarter by more than the tolerance: no plateau yet
        return int(epochs[-1]), plateau
    smooth = pd.Series(values).rolling(smoothing, min_periods=1).mean().to_numpy()
    below = np.nonzero(smooth < plateau - tolerance)[0]
    first = 0 if len(below) == 0 else below[-1] + 1
    return int(epochs[min(first, len(epochs) - 1)]), plateau


def end_below_best(epochs: np.ndarray, values: np.ndarray, smoothing: int = SMOOTHING) -> tuple[float, int, int]:
    """(how far the mean over the curve's last `w` epochs lies below the best mean over any `w` consecutive
    epochs of its second half, the last epoch of that best window, `w`), with `w` = `smoothing` or a twentieth of
    the curve, whichever is more. A curve that ends at its plateau, or still rising, gives 0."""
    order = np.argsort(epochs)
    epochs, values = np.asarray(epochs)[order], np.asarray(values, dtype=float)[order]
    window = max(smoothing, len(values) // 20)
    if len(values) < 2 * window:
        return 0.0, int(epochs[-1]), window
    means = pd.Series(values).rolling(window).mean().to_numpy()
    half = means[len(values) // 2:]
    best = int(np.nanargmax(half)) + len(values) // 2
    return max(float(means[best] - means[-1]), 0.0), int(epochs[best]), window


def off_plateau(study: StudyArms, curves: pd.DataFrame, tolerance: float = TOLERANCE
                ) -> dict[tuple[str | None, str], str]:
    """The arms (level, method) of `study` whose learning curve (`load_curves`), averaged over their seeds, ends
    more than `tolerance` below its own best (`end_below_best`): they were certified before training had settled
    (a late learning-rate or optimiser switch, too short a budget after one), so their numbers may understate the
    method. Values: why, in words."""
    found = {}
    for (level, method), own in curves.groupby(["level", "method"], sort=False, dropna=False):
        mean = own.groupby("epoch")["value"].mean()
        drop, epoch, window = end_below_best(mean.index.to_numpy(), mean.to_numpy())
        if drop > tolerance:
            level = None if pd.isna(level) else level
            where = study.level_name(level) if level is not None else ""
            at = f" at {where}" if where else ""
            found[(level, method)] = (
                f"{method_name(method)}{at}: its validation agreement (mean over {own['seed'].nunique()} seeds) "
                f"ends {100 * drop:.1f} points below its best, the {window} epochs to epoch {epoch}: certified "
                f"off its plateau, its numbers may understate the method")
    return found


def convergence_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per method: the epochs of its longest curve, the seeds, the plateau of the seed-mean curve, the epoch it
    reaches it within `TOLERANCE`, and its value at epoch 20 (the quick profile's old budget)."""
    mean = longest(curves)
    records = []
    for method, own in mean.groupby("method", sort=False):
        epoch, plateau = converged_epoch(own["epoch"].to_numpy(), own["mean"].to_numpy())
        at20 = own.loc[own["epoch"] == 20, "mean"]
        records.append({"method": method, "epochs": int(own["epoch"].max()), "seeds": int(own["seeds"].max()),
                        "plateau": plateau, "converged_at": epoch,
                        "at_epoch_20": float(at20.iloc[0]) if len(at20) else np.nan})
    return pd.DataFrame(records)


def certified_by_budget(study: StudyArms, radii: tuple[float, ...] = (0.0, 0.25, 0.5)) -> pd.DataFrame:
    """Test certified accuracy (mean over seeds) of each arm at each budget: method, budget, radius, mean, seeds
    (reporting only)."""
    records = []
    for (level, method), arm in study.arms.items():
        images = arm.images()
        for radius in radii:
            outcomes = certified_matrix(arm.tables(), images, radius)
            records.append({"method": method, "budget": level, "radius": radius, "mean": float(outcomes.mean()),
                            "seeds": len(arm.seeds)})
    return pd.DataFrame(records)


def budget_figure(curves: pd.DataFrame, certified: pd.DataFrame, out: Path, name: str) -> FigureOut:
    """Left: each method's validation agreement per epoch at its longest budget (seed mean, band: the seeds'
    range); right: test certified accuracy at r = 0.25 against the budget, with no denoiser as a line."""
    fig, (left, right) = _canvas(2, width=4.8, height=3.6)
    for i, (method, own) in enumerate(longest(curves).groupby("method", sort=False)):
        left.plot(own["epoch"], 100 * own["mean"], color=f"C{i}", label=method_name(method))
        left.fill_between(own["epoch"], 100 * own["low"], 100 * own["high"], color=f"C{i}", alpha=0.2)
    left.set(xlabel="epoch", ylabel="validation agreement (%)", title="Learning curves (longest budget)")
    left.legend(fontsize=7)
    at = certified[certified["radius"] == 0.25]
    for i, (method, own) in enumerate(at.groupby("method", sort=False)):
        if method == "none" or own["budget"].isna().all():
            continue
        own = own.assign(epochs=own["budget"].astype(float)).sort_values("epochs")
        right.plot(own["epochs"], 100 * own["mean"], marker="o", color=f"C{i}", label=method_name(method))
    for i, none in enumerate(sorted(set(at.loc[at["method"] == "none", "mean"]))):  # it trains nothing: one line
        right.axhline(100 * none, color="grey", linestyle="--", label=method_name("none") if i == 0 else None)
    budgets = sorted({float(b) for b in at["budget"].dropna()})
    right.set(xscale="log", xlabel="total epochs (log scale)", ylabel="certified accuracy at r = 0.25 (%)",
              title="Test certification by budget (reporting only)")
    right.set_xticks(budgets, [f"{b:g}" for b in budgets])
    right.minorticks_off()
    right.legend(fontsize=7)
    path = _save(fig, out / f"{name}.png")
    return FigureOut(name, "Learning curves and the training budget",
                     "Left: the label-free validation agreement per epoch of each method at its longest budget "
                     "(mean over seeds; band: the seeds' range). Right: certified accuracy on the test images at "
                     "r = 0.25 after training for each budget (mean over seeds; dashed: no denoiser); reported, "
                     "never used to choose.", path)
