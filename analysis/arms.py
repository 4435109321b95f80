"""The arms of a study on the test images: one method at one level of a paper's study (`tuning.presets`), or one
configuration of the search's confirmation, each certified on the same test images under several seeds.

`find_studies` gathers the trials of every preset parent run, and of every search's confirmation, into a
`StudyArms`: its arms keyed by (level, method), each holding its certification rows per seed. A preset's
baseline and no-denoiser reference carry no level when the factor does not change them
(``Preset.affects_baseline = False``): that one arm is every level's reference. `accuracy_values` gives each
arm's certified accuracy at the paper's radii and the profile's: the mean and standard deviation over seeds, and
a 95% interval whose unit is the test image (`analysis.stats.accuracy_interval`). `budget_frame` states the
epochs each arm trained and the data it used.
"""

from __future__ import annotations

import ast
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from decrop.bounds import max_certifiable_radius
from decrop.rows import CertRow, average_certified_radius
from decrop.config import from_flat
from decrop.errors import ConfigError
from tuning.presets import NO_DENOISER, PRESETS, SEARCH

from .runs import CONFIRM_TRIAL, PRESET_TRIAL, level_name
from .stats import accuracy_interval, certified_matrix, shared_images
from .tables import method_rank

PAPER_RADII = (0.0, 0.25, 0.5, 0.75)  # the radii of the paper's tables
PRESET, CONFIRMATION = "preset", "confirmation"
_EPOCH_KEYS = ("train.epochs", "decrop.stage2_epochs", "train.baseline_epochs")


@dataclass
class Arm:
    """One method at one level: its certification rows and its run per seed."""

    level: str | None  # the level as tagged; None: shared by every level (and every arm of a confirmation)
    method: str  # the certification label without ``test_``: decrop, baseline, none, decrop_best, ...
    seeds: dict[int, list[CertRow]] = field(default_factory=dict)
    runs: dict[int, pd.Series] = field(default_factory=dict)

    def tables(self) -> list[list[CertRow]]:
        return [self.seeds[s] for s in sorted(self.seeds)]

    def images(self) -> list[int]:
        """The test images (``idx``) that every seed certified."""
        return shared_images(self.tables())


@dataclass
class StudyArms:
    """A preset study or a search's confirmation, as arms."""

    kind: str  # PRESET or CONFIRMATION
    study: str  # the study's name (its parent run's)
    parent_run_id: str
    preset: str  # the preset's name; "search" for a confirmation
    factor: str | None  # the varied config key
    levels: list[str | None]  # in the preset's own order; [None] for a confirmation
    arms: dict[tuple[str | None, str], Arm]
    radii: list[float]  # of the tables: the paper's and the profile's
    profile_radii: list[float]  # the profile's certify.radii (the sweep's tests use these)
    notes: list[str] = field(default_factory=list)
    resume: str = ""  # for a preset study not finished: the command that continues it (`resume_command`)

    def level_name(self, level: str | None) -> str:
        return "" if self.kind == CONFIRMATION else level_name(self.preset, self.factor, level)

    def decrop_arms(self, level: str | None) -> list[Arm]:
        """The DE-CROP arms (every method but the baseline and the reference) at `level`."""
        return sorted((a for (lv, m), a in self.arms.items() if lv == level and m not in ("baseline", NO_DENOISER)),
                      key=lambda a: method_rank(a.method))

    def reference(self, level: str | None, method: str) -> Arm | None:
        """The `method` arm (baseline or none) that `level` is compared with: its own, else the shared one."""
        return self.arms.get((level, method)) or self.arms.get((None, method))

    def ordered_arms(self) -> list[Arm]:
        """Shared arms first, then level by level; within each, `method_rank` order."""
        order = [None, *self.levels] if None not in self.levels else self.levels
        return [a for lv in order for a in sorted((a for a in self.arms.values() if a.level == lv),
                                                   key=lambda a: method_rank(a.method))]


def _radii(text: object) -> list[float]:
    try:
        return sorted(float(r) for r in ast.literal_eval(text)) if isinstance(text, str) else []
    except (ValueError, SyntaxError, TypeError):
        return []


def _level_order(preset: str, tagged: set[str]) -> list[str]:
    known = [str(v) for v in PRESETS[preset].levels] if preset in PRESETS else []
    rest = sorted(tagged - set(known), key=lambda v: (0, float(v), "") if _is_number(v) else (1, 0.0, v))
    return [v for v in known if v in tagged] + rest


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _study(kind: str, parent: pd.Series, trials: pd.DataFrame, rows: dict, labels: dict[str, list[str]]
           ) -> StudyArms | None:
    arms: dict[tuple[str | None, str], Arm] = {}
    notes = []
    for run_id, run in trials.iterrows():
        level = run["level"] if kind == PRESET and isinstance(run["level"], str) else None
        seed = int(run["seed"]) if pd.notna(run["seed"]) else -1
        for label in sorted(lb for lb in labels.get(run_id, []) if lb.startswith("test_")):
            arm = arms.setdefault((level, label.removeprefix("test_")), Arm(level, label.removeprefix("test_")))
            if seed in arm.seeds:
                notes.append(f"run {run['run_name']}: a second {label} of seed {seed} at this level; the first "
                             f"({arm.runs[seed]['run_name']}) is used")
                continue
            arm.seeds[seed], arm.runs[seed] = rows[(run_id, label)], run
    if not arms:
        return None
    reused = trials["tags.decrop.reused_from"].dropna() if "tags.decrop.reused_from" in trials else []
    if len(reused):
        notes.append(f"{len(reused)} of the {len(trials)} trials took the result of an identical trial (same "
                     f"config, seed, training layout and code) that another study computed "
                     f"(tag decrop.reused_from: {', '.join(sorted(set(reused))[:3])}{', ...' if len(set(reused)) > 3 else ''})")
    profile = _radii(parent.get("params.base.certify.radii")) or _radii(
        next(iter(next(iter(arms.values())).runs.values())).get("params.certify.radii"))
    preset = parent["preset"] if isinstance(parent["preset"], str) else (SEARCH if kind == CONFIRMATION else "")
    tagged = {lv for lv, _ in arms if lv is not None}
    levels = _level_order(preset, tagged) if kind == PRESET else [None]
    factor = parent["factor"] if isinstance(parent["factor"], str) else None
    name = parent["study"] if isinstance(parent["study"], str) else parent["run_name"]
    resume = resume_command(parent, name, preset) if kind == PRESET and parent.get("status") != "FINISHED" else ""
    return StudyArms(kind, name, parent["run_id"], preset, factor, levels, arms, sorted({*PAPER_RADII, *profile}),
                     profile, notes, resume)


def resume_command(parent: pd.Series, study: str, preset: str) -> str:
    """The command that continues the preset study of `parent` as it was started (its profile, --set overrides,
    seeds and levels, from the parent's params; `tuning/sweep.py` refuses a --resume that differs), with the store
    as STORE and its shelf (`--shelf`) where it had one."""
    def listed(key: str) -> list[str]:
        text = parent.get(f"params.{key}")
        try:
            values = ast.literal_eval(text) if isinstance(text, str) else None
        except (ValueError, SyntaxError):
            values = None
        return [str(value) for value in values] if isinstance(values, (list, tuple)) else []
    profile = parent.get("params.profile")
    profile = profile if isinstance(profile, str) else "quick"
    seeds, levels = " ".join(listed("seeds")), " ".join(listed("levels"))
    overrides = [f"--set {shlex.quote(item)}" for item in listed("set")]
    shelf = parent.get("params.shelf")  # a folder of the repository (results), or SHELF: no path of a machine
    shelf = (shelf if not Path(shelf).is_absolute() else "SHELF") if isinstance(shelf, str) else ""
    return " ".join(["python tuning/sweep.py", f"--profile {profile}", *overrides, f"--preset {preset}",
                     *([f"--seeds {seeds}"] if seeds else []), *([f"--levels {levels}"] if levels else []),
                     *([f"--study {study}"] if study != f"{profile}-{preset}" else []),
                     "--mlflow-uri STORE", *([f"--shelf {shlex.quote(shelf)}"] if shelf else []), "--resume"])


def find_studies(runs: pd.DataFrame, rows: dict[tuple[str, str], list[CertRow]]) -> list[StudyArms]:
    """Every preset study (parent role ``preset``) and every search's confirmation (confirmation trials under a
    parent of role ``sweep``) among `runs` with test certifications, in the order of their parent runs."""
    studies, labels = [], {}
    for run_id, label in rows:
        labels.setdefault(run_id, []).append(label)
    for run_id, parent in runs[runs["role"].isin(["preset", "sweep"])].iterrows():
        kind, trial_kind = (PRESET, PRESET_TRIAL) if parent["role"] == "preset" else (CONFIRMATION, CONFIRM_TRIAL)
        trials = runs[(runs["parent_run_id"] == run_id) & (runs["kind"] == trial_kind)]
        study = _study(kind, parent, trials, rows, labels)
        if study is not None:
            studies.append(study)
    return studies


# ---------------------------------------------------------------------------------------------------------
# Numbers per arm


def accuracy_values(study: StudyArms) -> pd.DataFrame:
    """One row per arm and radius of `study.radii`: study, level, level_name, method, radius, n_seeds, seeds,
    n_images (those every seed certified), mean (certified accuracy averaged over seeds, in [0, 1]), sd (its
    sample standard deviation over seeds; NaN with one seed), ci_low / ci_high (95%, the image as the unit:
    `accuracy_interval` of the per-image outcomes), interval (how it was computed), acr_mean, acr_sd, epochs."""
    records = []
    for arm in study.ordered_arms():
        tables, images = arm.tables(), arm.images()
        acr = np.array([average_certified_radius(t) for t in tables])
        identity = {"study": study.study, "level": arm.level,
                    "level_name": study.level_name(arm.level), "method": arm.method,
                    "n_seeds": len(tables), "seeds": ", ".join(str(s) for s in sorted(arm.seeds)),
                    "n_images": len(images), "acr_mean": float(acr.mean()),
                    "acr_sd": float(acr.std(ddof=1)) if len(acr) > 1 else np.nan, "epochs": arm_epochs(arm)}
        for radius in study.radii:
            outcomes = certified_matrix(tables, images, radius)
            per_seed = outcomes.mean(axis=0)
            lo, hi, how = accuracy_interval(outcomes)
            records.append({**identity, "radius": radius, "mean": float(outcomes.mean()),
                            "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else np.nan,
                            "ci_low": lo, "ci_high": hi, "interval": how})
    columns = ["study", "level", "level_name", "method", "radius", "n_seeds", "seeds", "n_images", "mean", "sd",
               "ci_low", "ci_high", "interval", "acr_mean", "acr_sd", "epochs"]
    return pd.DataFrame(records, columns=columns)


def certifiable(arm: Arm) -> float:
    """The largest radius a run of `arm` can certify with its n, alpha and sigma (all n votes for the top class);
    infinite when a run does not record them."""
    limits = []
    for run in arm.runs.values():
        try:
            limits.append(max_certifiable_radius(int(float(run["params.certify.n"])),
                                                 float(run["params.certify.alpha"]), float(run["params.sigma"])))
        except (KeyError, TypeError, ValueError):
            return math.inf
    return max(limits, default=math.inf)


def _epochs(params: pd.Series, method: str) -> str:
    """Epochs of each stage (``ExperimentConfig.stage_epochs``) from a run's params; "" for no denoiser."""
    if method == NO_DENOISER:
        return ""
    try:
        cfg = from_flat({k: int(params[f"params.{k}"]) for k in _EPOCH_KEYS if pd.notna(params.get(f"params.{k}"))})
    except (ConfigError, ValueError):
        return "?"
    return "+".join(map(str, cfg.stage_epochs("baseline" if method == "baseline" else "decrop")))


def arm_epochs(arm: Arm) -> str:
    """The epochs the arm's runs trained (``15+5``: stage 1 + stage 2), every distinct value if they differ."""
    return " / ".join(dict.fromkeys(_epochs(run, arm.method) for run in arm.runs.values()))


def budget_frame(study: StudyArms) -> pd.DataFrame:
    """One row per arm: level_name, method, seeds, epochs and the data budget its runs logged (``budget.*``
    params: training images, their share of the split, validation images and source, labels used outside the
    limited data, the classifier); every distinct value if the seeds differ."""
    records = []
    for arm in study.ordered_arms():
        runs = list(arm.runs.values())
        keys = sorted({c for run in runs for c in run.index if c.startswith("params.budget.") and pd.notna(run[c])})
        record = {"level": study.level_name(arm.level), "method": arm.method,
                  "seeds": ", ".join(str(s) for s in sorted(arm.seeds)), "epochs": arm_epochs(arm)}
        for key in keys:
            record[key.removeprefix("params.budget.")] = " / ".join(dict.fromkeys(
                str(run[key]) for run in runs if pd.notna(run.get(key))))
        records.append(record)
    frame = pd.DataFrame(records)
    return frame.drop(columns="level") if study.kind == CONFIRMATION else frame
