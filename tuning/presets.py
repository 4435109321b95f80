"""The paper's studies as presets of one sweep: a grid over one factor x method x seeds, run as Tune trials.

Each preset names the figure or table of the supplementary (`../shared/paper/decrop-supplementary.md`) it
reproduces, the config key it varies and its levels. `points` expands a preset into the trials of a study:
DE-CROP (or the methods the preset compares) at every level and seed, the Salman et al. baseline at the same
data and budget, and the no-denoiser reference once per setting. A factor that only DE-CROP reads (the mixing
coefficient, the attack, ...) leaves the baseline and the reference unchanged, so those are trained and
certified once per seed and shared by every level instead of being repeated. Search-free by design: nothing
is selected on the test images, which every trial certifies for reporting only.

A point is a plain dict (what Tune's grid hands a trial): ``method``, ``seed``, ``level`` (None for shared
references) and ``overrides`` (dotted config keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decrop.config import NO_DENOISER


@dataclass(frozen=True)
class Preset:
    """One study of the paper: `key` takes each of `levels` (a level's extra overrides in `extra`)."""

    name: str
    source: str  # the supplementary's figure or table
    claim: str  # what the paper states, in one sentence
    key: str  # the varied config key ("method" when the methods themselves are the factor)
    levels: tuple[Any, ...]
    methods: tuple[str, ...] = ("decrop",)  # compared at every level, next to the baseline
    affects_baseline: bool = True  # False: the baseline and the reference are shared by all levels
    extra: dict[Any, dict[str, Any]] = field(default_factory=dict)
    names: dict[Any, str] = field(default_factory=dict)  # how a level reads in names and tables

    def level_name(self, level: Any) -> str:
        return self.names.get(level, f"{self.key.split('.')[-1]}={level}")

    def overrides(self, level: Any) -> dict[str, Any]:
        """The config overrides of `level` (none for the method factor: the method is the point's own)."""
        own = {} if self.key == "method" else {self.key: level}
        return {**own, **self.extra.get(level, {})}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sigma", "fig 1", "DE-CROP gives better certified robustness than the baseline at every noise level "
           "sigma in {0.12, 0.25, 0.5, 1.0} (1% of the training data).", "sigma", (0.12, 0.25, 0.5, 1.0)),
    Preset("data", "fig 2", "DE-CROP boosts certified accuracy most when the limited data is small (k = 1, 5, "
           "10, 20%); the benefit is limited when k is large (100%).", "data.percent", (0.2, 1, 5, 10, 20, 100),
           extra={k: {"sigma": 0.5} for k in (0.2, 1, 5, 10, 20, 100)}),  # fig 2 is at sigma 0.5
    Preset("mixing", "fig 3", "DE-CROP's certified accuracy is stable across the mixing coefficient alpha in "
           "{0.25, 0.5, 0.75}.", "decrop.mixing", (0.25, 0.5, 0.75), affects_baseline=False),
    Preset("denoiser", "fig 5", "DE-CROP beats the baseline with either denoiser architecture, DnCNN and "
           "MemNet.", "denoiser.arch", ("dncnn", "memnet")),
    Preset("n_interp", "fig 6", "More interpolated samples per image (1, 2, 5) do not improve DE-CROP "
           "proportionally; 1 is enough.", "decrop.n_interp", (1, 2, 5), affects_baseline=False),
    Preset("attack", "table 1", "DE-CROP beats the baseline with boundary samples from PGD, AutoAttack or "
           "DeepFool; the three perform similarly, PGD best at r = 0.", "decrop.attack",
           ("pgd", "autoattack", "deepfool"), affects_baseline=False),
    Preset("boundary", "table 2", "Boundary samples matter: DE-CROP without them (interpolating between two "
           "images of the same class) certifies less than with them.", "decrop.attack", ("pgd", "none"),
           affects_baseline=False, names={"pgd": "with boundary samples", "none": "without boundary samples"}),
    Preset("augment", "main paper, table 2 (sec. 5.1)", "Augmentation policies 1, 2 and 3 change DE-CROP's "
           "certified accuracy (the main paper reports each).", "data.augment", (1, 2, 3)),
    Preset("blackbox", "main paper (black-box setting)", "DE-CROP also works when the classifier can only be "
           "queried (gradients through a distilled surrogate).", "method", ("decrop", "decrop_blackbox"),
           methods=(), affects_baseline=False,
           names={"decrop": "white-box", "decrop_blackbox": "black-box"}),
)}
ALIASES = {"alpha": "mixing"}  # the paper calls the mixing coefficient alpha
SEARCH, ALL = "search", "all"


def preset_names() -> list[str]:
    """Every name `--preset` accepts."""
    return [SEARCH, *PRESETS, *ALIASES, ALL]


def resolve(name: str) -> str:
    """The canonical preset name (aliases resolved); ValueError listing the valid ones."""
    name = ALIASES.get(name, name)
    if name not in (SEARCH, ALL, *PRESETS):
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return name


def points(preset: Preset, seeds: list[int], levels: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    """The trials of `preset` over `seeds` (and `levels`, default all of the preset's): DE-CROP (the preset's
    methods) at every level and seed, the baseline per level and seed (per seed when the factor does not
    change it), the reference once per level (once when shared), with the first seed."""
    levels = preset.levels if levels is None else levels
    out: list[dict[str, Any]] = []
    for level in levels:
        methods = (level,) if preset.key == "method" else preset.methods
        out += [_point(preset, method, seed, level) for method in methods for seed in seeds]
    shared = [None] if not preset.affects_baseline else list(levels)
    for level in shared:
        out += [_point(preset, "baseline", seed, level) for seed in seeds]
        out.append(_point(preset, NO_DENOISER, seeds[0], level))
    return out


def _point(preset: Preset, method: str, seed: int, level: Any) -> dict[str, Any]:
    overrides = {} if level is None else preset.overrides(level)
    return {"method": method, "seed": seed, "level": level, "overrides": overrides,
            "name": " ".join([method, preset.level_name(level) if level is not None else "(all levels)",
                              f"seed={seed}"])}


def cluster_command(name: str, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """The command that runs study `name` on the paper's CIFAR-10 profile on a GPU cluster (cluster/README.md:
    a Ray head with the job server and an MLflow server; one GPU per trial's training worker)."""
    seeds_flag = f" --seeds {' '.join(map(str, seeds))}" if name != SEARCH else ""
    return ("ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml "
            f"-- python tuning/sweep.py --profile paper --preset {name}{seeds_flag} --gpus-per-worker 1 "
            "--mlflow-uri http://127.0.0.1:5000 --resume")
