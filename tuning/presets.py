"""The paper's studies as presets of one sweep: a grid over one factor x method x seeds, run as Tune trials.

Each preset carries the claim of the paper it tests as data, declared before any run (`Claim`: where it is said,
the sentence verbatim, the comparisons, radii and direction the verdict rests on, and a margin for "similar"
claims; `analysis.verdicts` turns the results into the verdict word by one rule), the config key it varies and
its levels. `points` expands a preset into the trials of a study:
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


BETTER, SIMILAR, TREND = "better", "similar", "trend"  # the kinds of comparison a claim can rest on
SAME_LEVEL = "same level"  # a comparison's reference at the arm's own level (its own, else the shared one)
EQUIVALENCE_MARGIN = 0.03  # "no difference" claims: |difference| < 3 points of certified accuracy
SMALLEST_EFFECT = 0.05  # the smallest difference worth detecting (the power analysis; "not reproduced")


@dataclass(frozen=True)
class Comparison:
    """One comparison a claim rests on, tested at each of `levels` x `radii` (one test each).

    ``better``: `arm` certifies more than `reference` (two-sided test, claimed direction positive).
    ``similar``: |arm - reference| < `margin` (two one-sided tests). ``trend``: the gain of `arm` over
    `reference` (at the same level) falls as the factor grows (one test over all `levels`: the per-seed slope of
    the gain against log10 of the level). `reference_level` is SAME_LEVEL or a level of the preset."""

    kind: str
    arm: str  # a method label: decrop, decrop_blackbox, ... ("method" presets: the level is the method)
    reference: str  # baseline, or a DE-CROP label
    levels: tuple[Any, ...]
    radii: tuple[float, ...]
    reference_level: Any = SAME_LEVEL
    margin: float = EQUIVALENCE_MARGIN

    def __post_init__(self) -> None:
        if self.kind not in (BETTER, SIMILAR, TREND):
            raise ValueError(f"unknown comparison kind {self.kind!r}; choose one of {BETTER}, {SIMILAR}, {TREND}")


@dataclass(frozen=True)
class Claim:
    """A claim of the paper, declared before the data: where it is said, the sentence verbatim, what our study
    tests of it (`comparisons`, their tests one Holm family), and what the declaration adds or leaves out."""

    source: str  # the supplementary's figure or table, or the main paper
    quote: str  # verbatim; "[...]" marks what is left out, and `note` says what is not known
    comparisons: tuple[Comparison, ...]
    note: str = ""
    headline: bool = False  # one of the headline comparisons: at least 10 seeds


@dataclass(frozen=True)
class Preset:
    """One study of the paper: `key` takes each of `levels` (a level's extra overrides in `extra`)."""

    name: str
    claim: Claim | None  # None: a study that tests no claim of the paper (the training budget)
    summary: str  # what the study shows, in one sentence
    key: str  # the varied config key ("method" when the methods themselves are the factor)
    levels: tuple[Any, ...]
    methods: tuple[str, ...] = ("decrop",)  # compared at every level, next to the baseline
    affects_baseline: bool = True  # False: the baseline and the reference are shared by all levels
    extra: dict[Any, dict[str, Any]] = field(default_factory=dict)
    names: dict[Any, str] = field(default_factory=dict)  # how a level reads in names and tables

    @property
    def source(self) -> str:
        return self.claim.source if self.claim else "training budget"

    def level_name(self, level: Any) -> str:
        return self.names.get(level, f"{self.key.split('.')[-1]}={level}")

    def overrides(self, level: Any) -> dict[str, Any]:
        """The config overrides of `level` (none for the method factor: the method is the point's own)."""
        own = {} if self.key == "method" else {self.key: level}
        return {**own, **self.extra.get(level, {})}


ROBUST = (0.25, 0.5)  # "certified robustness": the radii past 0 the quick profile can certify at sigma 0.25
ALL_RADII = (0.0, 0.25, 0.5)  # "across the radii" (the tables' 0.75 is out of reach of n = 1,000 at sigma 0.25)
SIGMAS = (0.12, 0.25, 0.5, 1.0)
DATA_PERCENTS = (1, 5, 10, 20, 100)
BUDGETS = (20, 60, 120, 260)  # total epochs; 260 x 19 steps at 1% of Fashion-MNIST ~ the paper's ~5,000 steps


def _budget_levels() -> dict[int, dict[str, Any]]:
    """Each budget's split into DE-CROP's stage 1 and stage 2 (the quick profile's 3 : 1); the baseline trains
    the same total in one stage (train.baseline_epochs), so both take the same number of optimizer steps."""
    return {total: {"train.epochs": total - total // 4, "decrop.stage2_epochs": total // 4,
                    "train.baseline_epochs": total} for total in BUDGETS}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sigma", Claim(
        "supplementary, fig 1",
        "Our method (DE-CROP) consistently provides better certified robustness across different noise strengths "
        "with σ ∈ {0.12, 0.25, 0.50, 1.00}. The results are presented on limited training data D_train^lim which "
        "is 1% of entire training samples D_train of CIFAR-10.",
        (Comparison(BETTER, "decrop", "baseline", SIGMAS, ROBUST),),
        note="Tested at the radii past 0 (certified robustness) that each sigma can certify with n = 1,000.",
        headline=True),
        "DE-CROP against the baseline at each noise level.", "sigma", SIGMAS),
    Preset("data", Claim(
        "supplementary, fig 2",
        "We perform ablation for different choices of k (i.e. 1, 5, 10, 20 and 100) and report our certified "
        "performance. DE-CROP significantly boosts the certified accuracy across the radii when the available "
        "training set size is small, showing the efficacy of our method for limited data settings. The benefit "
        "is limited when the amount of training samples is high. [...] noise strength σ = 0.50",
        (Comparison(BETTER, "decrop", "baseline", (1, 5, 10, 20), ALL_RADII),
         Comparison(TREND, "decrop", "baseline", DATA_PERCENTS, (0.25,))),
        note="'Small' is read as k <= 20%. The trend is the per-seed slope of DE-CROP's gain over the baseline "
             "against log10 k at r = 0.25, tested over seeds (claimed negative)."),
        "DE-CROP against the baseline as the limited data grows (sigma 0.5).", "data.percent", DATA_PERCENTS,
        # fig 2 is at sigma 0.5; k = 100% leaves no image outside the subset for label-free validation, so that
        # level validates on a held-out part of the split (its budget line says so)
        extra={k: {"sigma": 0.5, **({"data.val_source": "holdout"} if k == 100 else {})} for k in DATA_PERCENTS}),
    Preset("mixing", Claim(
        "supplementary, fig 3",
        "We perform experiments with three different values of α (i.e. 0.25, 0.50, 0.75) and observe that the "
        "certified performance of DE-CROP is stable across the broad range of α values allowing our technique to "
        "be easily adoptable without significant hyper-parameter tuning.",
        (Comparison(SIMILAR, "decrop", "decrop", (0.5, 0.75), ALL_RADII, reference_level=0.25),),
        note="'Stable' is tested as equivalence to alpha = 0.25 within the margin."),
        "DE-CROP at three mixing coefficients.", "decrop.mixing", (0.25, 0.5, 0.75), affects_baseline=False),
    Preset("denoiser", Claim(
        "supplementary, sec. 6 and fig 5",
        "DE-CROP achieves significantly better results on both DnCNN and MemNet without any hyperparameter tuning "
        "demonstrating its practical usefulness.",
        (Comparison(BETTER, "decrop", "baseline", ("dncnn", "memnet"), ALL_RADII),)),
        "DE-CROP against the baseline with each denoiser architecture.", "denoiser.arch", ("dncnn", "memnet")),
    Preset("n_interp", Claim(
        "supplementary, sec. 7 and fig 6",
        "In Fig. 6 we observe that increasing the amount of interpolated samples generated (per sample) from 1 "
        "(also reported in the main draft) to 2 and 5 does not increase the performance. Thus, we generate 1 "
        "interpolated sample only as it provides similar performance with cheaper computational overhead.",
        (Comparison(SIMILAR, "decrop", "decrop", (2, 5), ALL_RADII, reference_level=1),),
        note="'Does not increase' and 'similar' are tested as equivalence to n_interp = 1 within the margin."),
        "DE-CROP with 1, 2 and 5 interpolated samples per image.", "decrop.n_interp", (1, 2, 5),
        affects_baseline=False),
    Preset("attack", Claim(
        "supplementary, table 1",
        "We significantly outperform the baseline across the different choices of adversarial attacks (i.e., PGD, "
        "DeepFool, and Auto Attack). We observe that although all three of them perform similarly, PGD obtains "
        "better certified standard accuracy compared to Auto Attack and DeepFool.",
        (Comparison(BETTER, "decrop", "baseline", ("pgd", "autoattack", "deepfool"), ALL_RADII),
         Comparison(SIMILAR, "decrop", "decrop", ("autoattack", "deepfool"), ROBUST, reference_level="pgd"),
         Comparison(BETTER, "decrop", "decrop", ("pgd",), (0.0,), reference_level="autoattack"),
         Comparison(BETTER, "decrop", "decrop", ("pgd",), (0.0,), reference_level="deepfool")),
        note="'Perform similarly' is tested at r > 0 (the claim's next sentence singles out r = 0).",
        headline=True),
        "DE-CROP with boundary samples from three attacks, against the baseline and each other.", "decrop.attack",
        ("pgd", "autoattack", "deepfool"), affects_baseline=False),
    Preset("boundary", Claim(
        "supplementary, table 2",
        "In absence of boundary samples, interpolated logits are generated by using a pair of random samples from "
        "the same class (average results over three runs are reported). In contrast, we observe that the certified "
        "performance significantly improves when we utilize adversarial attack to generate boundary samples and "
        "use them along with the original samples to obtain interpolated logits.",
        (Comparison(BETTER, "decrop", "decrop", ("pgd",), ALL_RADII, reference_level="none"),),
        note="Without boundary samples the same-class partner only feeds the interpolation (decrop.attack=none); "
             "decrop.attack=same_class, which also trains on the partner as if it were a boundary sample, is "
             "not part of the claim.",
        headline=True),
        "DE-CROP with and without boundary samples.", "decrop.attack", ("pgd", "none"), affects_baseline=False,
        names={"pgd": "with boundary samples", "none": "without boundary samples"}),
    Preset("augment", Claim(
        "supplementary, sec. 4 (the main paper's table 2 is not in this repository)",
        "In the main draft (Table 2 of Sec. 5.1), we showed experimental results to demonstrate the effect of "
        "various augmentation policies in improving certification performance. [...] policy 3 all the "
        "augmentations of policy 2 are applied in a sequential manner making it a stronger augmentation",
        (Comparison(BETTER, "decrop", "baseline", (1, 2, 3), ROBUST),),
        note="The supplementary does not say which policy certifies best, and the main paper's numbers are not "
             "known here: what is tested is that DE-CROP improves on the baseline under each policy. Differences "
             "between policies are shown, not tested."),
        "DE-CROP against the baseline under augmentation policies 1, 2 and 3.", "data.augment", (1, 2, 3)),
    Preset("blackbox", Claim(
        "main paper, black-box setting (not in the supplementary; its text is not in this repository)",
        "[...] similar performance [...] (the main paper's abstract, as quoted in this project's issue; the rest "
        "of its wording is not known here)",
        (Comparison(SIMILAR, "decrop_blackbox", "decrop", ("decrop_blackbox",), ALL_RADII,
                    reference_level="decrop"),
         Comparison(BETTER, "decrop_blackbox", "baseline", ("decrop_blackbox",), ROBUST)),
        note="Black-box DE-CROP (gradients through a surrogate distilled from the classifier's outputs) is "
             "tested for equivalence with white-box DE-CROP, and for improving on the baseline."),
        "Black-box against white-box DE-CROP.", "method", ("decrop", "decrop_blackbox"), methods=(),
        affects_baseline=False, names={"decrop": "white-box", "decrop_blackbox": "black-box"}),
    Preset("budget", None,
           "Both methods trained for 20 to 260 epochs (the same optimizer steps each): learning curves of the "
           "label-free validation agreement and test certification at each budget, to choose where both have "
           "converged.", "train.baseline_epochs", BUDGETS, extra=_budget_levels(),
           names={b: f"{b} epochs" for b in BUDGETS}),
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
    change it), the reference once per level (once when shared), with the first seed.

    In the order Tune runs them: level by level, the level's reference first, then seed by seed every arm of
    that seed. The seed is the unit of replication and the arms are paired by it, so a study stopped part way
    (a long one spans sessions; ``--resume`` continues it) holds complete pairs of its first levels and seeds."""
    levels = preset.levels if levels is None else levels
    out: list[dict[str, Any]] = []
    for i, level in enumerate(levels):
        methods = (level,) if preset.key == "method" else preset.methods
        # The baseline and the reference of a factor that does not change them are shared: with the first level.
        shared = level if preset.affects_baseline else None
        if preset.affects_baseline or i == 0:
            out.append(_point(preset, NO_DENOISER, seeds[0], shared))
        for seed in seeds:
            out += [_point(preset, method, seed, level) for method in methods]
            if preset.affects_baseline or i == 0:
                out.append(_point(preset, "baseline", seed, shared))
    return out


def _point(preset: Preset, method: str, seed: int, level: Any) -> dict[str, Any]:
    overrides = {} if level is None else preset.overrides(level)
    return {"method": method, "seed": seed, "level": level, "overrides": overrides,
            "name": " ".join([method, preset.level_name(level) if level is not None else "(all levels)",
                              f"seed={seed}"])}


def seeds_for(name: str) -> tuple[int, ...]:
    """The seeds a study runs: 10 for a headline claim (and the training budget, which sets the budget for all),
    3 otherwise; the report's power column says whether a study's own spread calls for more."""
    preset = PRESETS.get(name)
    headline = preset is not None and (preset.claim is None or preset.claim.headline)
    return tuple(range(10 if headline else 3))


def cluster_command(name: str, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """The command that runs study `name` on the paper's CIFAR-10 profile on a GPU cluster (cluster/README.md:
    a Ray head with the job server and an MLflow server; one GPU per trial's training worker)."""
    seeds_flag = f" --seeds {' '.join(map(str, seeds))}" if name != SEARCH else ""
    return ("ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml "
            f"-- python tuning/sweep.py --profile paper --preset {name}{seeds_flag} --gpus-per-worker 1 "
            "--mlflow-uri http://127.0.0.1:5000 --resume")
