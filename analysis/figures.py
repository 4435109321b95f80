"""The report's figures as PNG files (Agg canvases, no pyplot global state).

Every figure function returns a `FigureOut`; one without data comes back with ``path=None`` and a caption
saying why, so the report can show the sentence instead of the figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from decrop.rows import CertRow, certified_accuracy

from tuning.schema import SEARCHED

from .runs import level_text
from .tables import method_name, method_rank

if TYPE_CHECKING:
    from .arms import Arm, StudyArms

Rows = dict[tuple[str, str], Sequence[CertRow]]
# The studied factors of the paper's figures, in the order shown; the mixing coefficient (the paper's
# alpha) is binned.
PANEL_FACTORS = ("sigma", "data.percent", "decrop.mixing", "denoiser.arch", "decrop.n_interp", "decrop.attack",
                 "stage2")
_ALPHA_BINS = ([-np.inf, 0.45, 0.7, np.inf], ["in [0, 0.45)", "in [0.45, 0.7)", "in [0.7, 1]"])  # sort as text


@dataclass
class FigureOut:
    """A figure of the report: file stem, title, a caption in plain words, and the PNG (None: skipped)."""

    name: str
    title: str
    caption: str
    path: Path | None = None


def _canvas(panels: int, width: float = 3.4, height: float = 3.0, columns: int = 4) -> tuple[Figure, list]:
    cols = min(panels, columns)
    nrows = -(-panels // cols)
    fig = Figure(figsize=(width * cols + 0.6, height * nrows + 0.4))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _curve(rows: Sequence[CertRow], grid: np.ndarray) -> np.ndarray:
    """Certified accuracy (%) at each radius of `grid` (`decrop.rows.certified_accuracy`)."""
    return 100.0 * np.array(list(certified_accuracy(rows, grid).values()))


def _grid(rows: Rows) -> np.ndarray:
    top = max((r.radius for rs in rows.values() for r in rs if r.correct == 1), default=0.0)
    return np.linspace(0.0, 1.1 * top if top > 0 else 1.0, 241)


def _pooled(rows: Rows, keys: Sequence[tuple[str, str]]) -> list[CertRow]:
    """The rows of several runs together: their curve is the image-weighted mean of the runs' curves."""
    return [r for key in keys for r in rows[key]]


def _style(ax, grid: np.ndarray, title: str) -> None:
    ax.set(xlabel="l2 radius", ylabel="certified accuracy (%)", ylim=(0, 100), xlim=(0, grid[-1]), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)


def _panel_values(frame: pd.DataFrame, factor: str) -> pd.Series:
    """The panel of each row: the factor's value (the mixing coefficient binned)."""
    values = frame[factor]
    if factor == "decrop.mixing":
        values = pd.cut(values.astype(float), _ALPHA_BINS[0], labels=_ALPHA_BINS[1], right=False)
    return values.astype(object).where(values.notna(), None)


def _panel_title(factor: str, level: object) -> str:
    return f"{factor} {level}" if factor == "decrop.mixing" else f"{factor} = {level}"


def _level_key(value: object) -> tuple:
    """Numbers in numeric order (1, 2, 5, 10), then text."""
    return (0, float(value), "") if isinstance(value, (int, float, np.number)) else (1, 0.0, str(value))


def factor_figures(cert: pd.DataFrame, rows: Rows, out: Path) -> list[FigureOut]:
    """One panel per value of each studied factor that varies across the search trials: their validation curves
    (thin, one per trial) and the pooled curve."""
    results = []
    frame = cert[(cert["split"] == "validation") & (cert["role"] == "trial")] if len(cert) else cert
    for factor in PANEL_FACTORS if len(frame) else ():
        if frame[factor].isna().all():
            continue
        values = _panel_values(frame, factor)
        levels = sorted(values.dropna().unique(), key=_level_key)
        if len(levels) < 2:
            continue
        grid = _grid({k: rows[k] for k in set(zip(frame["run_id"], frame["label"]))})
        fig, axes = _canvas(len(levels))
        for ax, level in zip(axes, levels):
            group = frame[values == level]
            keys = list(dict.fromkeys(zip(group["run_id"], group["label"])))
            for key in keys:
                ax.step(grid, _curve(rows[key], grid), where="post", color="0.6", lw=0.8, alpha=0.7)
            ax.step(grid, _curve(_pooled(rows, keys), grid), where="post", color="C0", lw=2,
                    label=f"{len(keys)} trials pooled")
            _style(ax, grid, _panel_title(factor, level))
            ax.legend(fontsize=7)
        name = f"factor_validation_{factor.replace('.', '_')}"
        path = _save(fig, out / f"{name}.png")
        results.append(FigureOut(name, f"Effect of {factor} (validation)",
                                 f"Certified accuracy against radius, one panel per value of {factor}: validation "
                                 f"curves of the sweep trials (grey: one per trial; blue: pooled).", path))
    if not results:
        constant = [f"{f}={cert[f].dropna().iloc[0]}" for f in PANEL_FACTORS
                    if len(cert) and cert[f].notna().any()]
        results.append(FigureOut("factors", "Effect of the studied factors",
                                 "No factor figure: no studied factor takes two values in these runs "
                                 f"({', '.join(constant) or 'none recorded'})."))
    return results


def history_figure(trials: pd.DataFrame, out: Path) -> FigureOut:
    """The search history: objective of each trial in completion order, the running best, trials without
    objective at the bottom."""
    result = FigureOut("search_history", "Search history",
                       "Validation ACR (the objective) of each trial in the order the trials finished, with the "
                       "best so far; crosses at 0 are trials without objective (stopped early by ASHA or failed).")
    if trials.empty or trials["objective"].isna().all():
        result.caption = ("No search history: " + ("these runs contain no sweep trials." if trials.empty else
                          f"none of the {len(trials)} trials has an objective (all stopped early or failed)."))
        return result
    fig, (ax,) = _canvas(1, width=6.5, height=3.6)
    x = np.arange(1, len(trials) + 1)
    scored = trials["objective"].notna().to_numpy()
    ax.plot(x[scored], trials["objective"][scored], "o", label="trial")
    ax.plot(x[~scored], np.zeros((~scored).sum()), "x", color="C3", label="no objective")
    ax.step(x, trials["objective"].cummax().ffill(), where="post", color="C1", label="best so far")
    best = int(trials["objective"].idxmax())
    ax.plot([x[best]], [trials["objective"][best]], "*", ms=14, color="C2", label="best")
    ax.set(xlabel="trial (completion order)", ylabel="validation objective", title="objective per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    result.path = _save(fig, out / f"{result.name}.png")
    return result


def effects_figure(trials: pd.DataFrame, out: Path) -> FigureOut:
    """The objective against each searched hyperparameter: scatter (log axis for log-scaled ones) or a box
    per category."""
    result = FigureOut("hyperparameter_effects", "Objective against each hyperparameter",
                       "Validation ACR of the trials against each searched hyperparameter (one point per trial; "
                       "boxes for categorical ones). beta_scale and beta_gamma exist only for trials with stage 2.")
    scored = trials[trials["objective"].notna()] if len(trials) else trials
    present = [k for k in SEARCHED if len(scored) and scored[k].notna().any()]
    keys = [k for k in present if scored[k].dropna().map(level_text).nunique() > 1]
    if not keys:
        result.caption = ("No hyperparameter figure: " + ("no sweep trial has an objective." if not present else
                          "no searched hyperparameter varies over the trials with an objective."))
        return result
    constant = [f"{k.removeprefix('decrop.')}={scored[k].dropna().iloc[0]}" for k in present if k not in keys]
    if constant:
        result.caption += f" Not shown, the same in every trial with an objective: {', '.join(constant)}."
    fig, axes = _canvas(len(keys), width=3.0, height=2.8)
    for ax, key in zip(axes, keys):
        part = scored[scored[key].notna()]
        if SEARCHED[key] == "category":
            text = part[key].map(level_text)
            levels = sorted(text.unique(), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
            groups = [part.loc[text == lv, "objective"].to_numpy() for lv in levels]
            ax.boxplot(groups, positions=range(len(levels)), widths=0.5)
            for i, g in enumerate(groups):
                ax.plot(np.full(len(g), i) + np.linspace(-0.1, 0.1, len(g)), g, "o", ms=4, alpha=0.7, color="C0")
            ax.set_xticks(range(len(levels)), levels)
        else:
            ax.plot(part[key].astype(float), part["objective"], "o", alpha=0.8)
            if SEARCHED[key] == "log":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^0-style labels collide
        ax.set(xlabel=key.removeprefix("decrop."), ylabel="validation objective")
        ax.grid(alpha=0.3)
    result.path = _save(fig, out / f"{result.name}.png")
    return result


def agreement_figure(trials: pd.DataFrame, histories: pd.DataFrame, out: Path) -> FigureOut:
    """The per-epoch validation agreement (ASHA's metric) of every trial; dashed: trials without objective."""
    result = FigureOut("validation_agreement", "Validation agreement per epoch",
                       "How often f(D(x + noise)) agrees with f(x) on validation images after each epoch, the "
                       "metric ASHA stops trials on; dashed lines are trials that never got an objective.")
    if histories.empty:
        result.caption = "No per-epoch figure: no trial logged val/agreement."
        return result
    fig, (ax,) = _canvas(1, width=6.5, height=3.6)
    objective = trials.set_index("run_id")["objective"] if len(trials) else pd.Series(dtype=float)
    for i, (run_id, h) in enumerate(histories.sort_values("step").groupby("run_id", sort=False)):
        dashed = pd.isna(objective.get(run_id))
        ax.plot(h["step"], h["value"], "--" if dashed else "-", color=f"C{i % 10}", lw=1.2)
    ax.set(xlabel="epoch", ylabel="val/agreement", title="validation agreement per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    result.path = _save(fig, out / f"{result.name}.png")
    return result


def _arm_curves(ax, arm: Arm, grid: np.ndarray, colour: str, label: str) -> None:
    """The arm's mean curve over seeds (bold) and the range of its seeds' curves (band)."""
    curves = np.array([_curve(rows, grid) for rows in arm.tables()])
    if len(curves) > 1:
        ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), step="post", color=colour, alpha=0.18, lw=0)
    seeds = f" ({len(curves)} seeds)" if len(curves) > 1 else " (1 seed)"
    ax.step(grid, curves.mean(axis=0), where="post", color=colour, lw=1.8, label=label + seeds)


def arms_figure(study: StudyArms, out: Path, name: str) -> FigureOut:
    """The paper's figure of a study: certified accuracy against radius, one panel per level (one for a
    confirmation), each DE-CROP arm with the baseline and the no-denoiser reference it is compared with: the
    mean curve over seeds and, as a band, the range of the seeds' curves."""
    arms = list(study.arms.values())
    grid = _grid({(str(i), str(s)): rows for i, a in enumerate(arms) for s, rows in a.seeds.items()})
    fig, axes = _canvas(len(study.levels), width=4.2, height=3.4, columns=3)
    colours = {m: f"C{i}" for i, m in enumerate(sorted({a.method for a in arms}, key=method_rank))}
    for ax, level in zip(axes, study.levels):
        for method in ("none", "baseline"):
            ref = study.reference(level, method)
            if ref is not None:
                shared = " (all levels)" if ref.level is None and level is not None else ""
                _arm_curves(ax, ref, grid, colours[method], method_name(method) + shared)
        for arm in study.decrop_arms(level):
            _arm_curves(ax, arm, grid, colours[arm.method], method_name(arm.method))
        images = max(len(a.images()) for a in arms)
        _style(ax, grid, f"{study.level_name(level) or study.study}: {images} test images")
        ax.legend(fontsize=7)
    path = _save(fig, out / f"{name}.png")
    what = f"per level of {study.factor}" if study.levels != [None] else "of the confirmation on fresh seeds"
    shared = any(lv is None for lv, _ in study.arms) and study.levels != [None]
    return FigureOut(name, f"Certified accuracy {what} ({study.study})",
                     "Certified accuracy (%) on the test images against the l2 radius: each line is the mean over "
                     "seeds of the seeds' curves (every seed certifies the same images), the band the range of the "
                     "seeds' curves; DE-CROP with the baseline (Salman et al.) and the classifier without denoiser "
                     "that it is compared with"
                     + (" ('all levels': one run per seed, shared by every level, since the baseline does not read "
                        "the factor)." if shared else "."), path)


def figures(cert: pd.DataFrame, rows: Rows, trials: pd.DataFrame, histories: pd.DataFrame,
            out: Path) -> list[FigureOut]:
    """The search's figures written into `out` (PNG), in report order; skipped ones have no path. `cert`: the
    search trials' rows of the tidy frame (their validation certifications)."""
    out.mkdir(parents=True, exist_ok=True)
    return [*factor_figures(cert, rows, out), history_figure(trials, out), effects_figure(trials, out),
            agreement_figure(trials, histories, out)]
