"""Experiment configuration: one frozen object per run, built in one place.

A run is described by an `ExperimentConfig`, built from a YAML profile (``configs/quick.yaml``) plus dotted
overrides (``--set train.epochs=5``), or from a flat dict with dotted keys (what Ray Tune hands a trial).
Every key and value is checked here, before any compute: an unknown key or an out-of-range value raises
`ConfigError` naming the key and what is allowed. Library functions then receive only the part they need
(``cfg.train``, ``cfg.certify``, ...).

Each field carries its help text, its bounds and (through ``Literal``) its choices in one place, so the
checks, the error messages and the docs cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import operator
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most samplers take 32-bit seeds
# Names of experiments and studies become folder names (runs/<name>-<time>, <storage>/<study>) and MLflow
# experiments: no path separators, no leading dot (no "..", no hidden folders).
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def check_name(value: str, what: str, example: str = "quick-sigma") -> str:
    """`value` if it is a valid experiment, study or trial name, else ConfigError naming `what` (a key or a
    flag)."""
    if not NAME.fullmatch(value):
        raise ConfigError(f"{what} = {value!r} is not a valid name: use 1-100 letters, digits, '.', '_' or '-', "
                          f"not starting with '.' (it becomes a folder name), e.g. {example}")
    return value


def _field(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text and numeric bounds (checked by `_check_bounds`)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


Dataset = Literal["fashion_mnist", "cifar10", "folder"]
ClassifierArch = Literal["small_cnn", "resnet20", "resnet56", "resnet110"]
DenoiserArch = Literal["dncnn", "memnet"]
Method = Literal["baseline", "decrop", "decrop_blackbox"]
NO_DENOISER = "none"  # the smoothed classifier alone, the reference every table shows
AttackName = Literal["pgd", "autoattack", "apgd_ce", "deepfool", "none", "same_class"]
ClassifierSource = Literal["train", "export", "torchscript", "state_dict", "torchvision"]


def _absolute(section: Any, name: str) -> None:
    """Make the path field `name` of a frozen section absolute (``~`` expanded) where the config is built: Ray
    runs workers in other folders, where a relative path would name another file."""
    value = getattr(section, name)
    if value:
        object.__setattr__(section, name, str(Path(value).expanduser().resolve()))


@dataclass(frozen=True)
class DataConfig:
    dataset: Dataset = _field("fashion_mnist", "dataset the classifier was trained on; 'folder' = your own images "
                                               "under data.root: train/<class>/*, test/<class>/*, optionally "
                                               "unlabeled/ (PNG or JPEG)")
    root: str = _field("~/.cache/decrop/data", "folder holding the torchvision dataset files, or your image folder "
                                               "(data.dataset=folder; made absolute where the config is built)")
    classes: tuple[str, ...] = _field((), "folder datasets: the class folder names in the order of the classifier's "
                                          "outputs (output k is classes[k]); empty = the names listed in "
                                          "data.root/classes.txt (one per line; folders then named by name or "
                                          "index), else the folder names sorted")
    download: bool = _field(False, "download the dataset with torchvision if it is not found (needs internet)")
    percent: float = _field(1.0, "size of the limited training subset in percent of the training split, "
                                 "drawn per class; folder datasets use all of train/ and require 100 (so a "
                                 "profile's 1% never shrinks your images)", gt=0, le=100)
    val_size: int = _field(500, "validation images for model selection, the per-epoch metric and the tuning "
                                "objective; never test images, and their labels are never read (the target is "
                                "the classifier's own prediction)", ge=1)
    val_source: Literal["unlabeled", "holdout"] = _field(
        "unlabeled", "where validation images come from: 'unlabeled' = extra images outside the limited subset, "
                     "drawn without reading their labels; 'holdout' = a stratified part of the limited subset, "
                     "which is then not trained on (nothing beyond the k% is used at all)")
    test_every: int = _field(20, "certify every m-th test image (the paper: 20, i.e. 500 of CIFAR-10)", ge=1)
    augment: Literal[0, 1, 2, 3] = _field(1, "augmentation policy for denoiser training: 0 none, 1 crop+flip, "
                                             "2 one of {hflip, vflip, crop, affine}, 3 all of policy 2 (each flip "
                                             "with probability 0.5)")

    def __post_init__(self) -> None:
        if self.dataset == "folder":
            _absolute(self, "root")
            if self.percent != 100:
                raise ConfigError(f"config key 'data.percent' = {self.percent} with data.dataset=folder: a folder "
                                  f"dataset trains on every image of its train/ folder (they are your data "
                                  f"budget); set data.percent=100 (configs/folder.yaml, the profile for folder "
                                  f"data, does), and to study a fraction put that fraction in the folder")
        elif self.classes:
            raise ConfigError("config key 'data.classes' names class folders and is read only with "
                              "data.dataset=folder; remove it")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"config key 'data.classes' lists a class twice: {list(self.classes)}")


@dataclass(frozen=True)
class ClassifierConfig:
    source: ClassifierSource = _field(
        "train", "where the frozen classifier comes from: 'train' = trained here on the full training split and "
                 "cached; 'export' = your torch.export program (torch.export.save, dynamic batch); "
                 "'torchscript' = your torch.jit.save file (legacy); 'state_dict' = your weights for the registry "
                 "architecture classifier.arch; 'torchvision' = your local weights for "
                 "classifier.torchvision_arch (never downloaded)")
    path: str = _field("", "your classifier's file (every source but 'train'); its sha256 is logged with every run; "
                           "made absolute where the config is built")
    torchvision_arch: str = _field("", "torchvision architecture name (classifier.source=torchvision), e.g. "
                                       "resnet18; torchvision.models.list_models() lists them")
    mean: tuple[float, ...] = _field((), "per-channel mean your classifier expects its inputs normalised with "
                                         "(one value, or one per channel); inputs are images in [0, 1]; empty = "
                                         "no normalisation added")
    std: tuple[float, ...] = _field((), "per-channel std of that normalisation (same length as classifier.mean)")
    feature_layer: str = _field("", "layer whose output are the penultimate features phi of L_mmd and the "
                                    "discriminator: a node name for nn.Module classifiers (torchvision's "
                                    "get_graph_node_names), a submodule name for exported programs (TorchScript: "
                                    "none); empty = the registry models' own features, the logits for other "
                                    "sources")
    arch: ClassifierArch = _field("small_cnn", "base classifier architecture (source 'train' and 'state_dict')")
    epochs: int = _field(300, "training epochs of the base classifier (on the full training split)", ge=1)
    batch_size: int = _field(128, "batch size", ge=1)
    lr: float = _field(0.1, "SGD learning rate", gt=0)
    momentum: float = _field(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _field(5e-4, "SGD weight decay", ge=0)
    lr_step: int = _field(100, "multiply the learning rate by lr_gamma every lr_step epochs", ge=1)
    lr_gamma: float = _field(0.1, "learning-rate decay factor", gt=0, le=1)
    seed: int = _field(0, "seed of the classifier's training; separate from the experiment seed because the "
                          "classifier is the fixed pretrained model every seed of a study protects", ge=0,
                    le=MAX_SEED)

    def __post_init__(self) -> None:
        if self.source == "train":
            given = [k for k in ("path", "torchvision_arch", "feature_layer", "mean", "std") if getattr(self, k)]
            if given:
                raise ConfigError(f"config key 'classifier.{given[0]}' is set but classifier.source=train trains "
                                  f"its own classifier: set classifier.source to export, torchscript, state_dict "
                                  f"or torchvision to use your model")
        elif not self.path:
            raise ConfigError(f"classifier.source={self.source} needs the model file: set classifier.path")
        _absolute(self, "path")
        if (self.source == "torchvision") != bool(self.torchvision_arch):
            raise ConfigError("config key 'classifier.torchvision_arch' names the architecture of "
                              "classifier.source=torchvision (and only of it): set both or neither")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"config keys 'classifier.mean' and 'classifier.std' need the same length, got "
                              f"{list(self.mean)} and {list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"config key 'classifier.std' must be positive, got {list(self.std)}")


@dataclass(frozen=True)
class DenoiserConfig:
    arch: DenoiserArch = _field("dncnn", "denoiser architecture")
    depth: int = _field(17, "DnCNN: number of conv layers", ge=3)
    width: int = _field(64, "channels of the hidden layers (DnCNN and MemNet)", ge=1)
    num_memblocks: int = _field(3, "MemNet: memory blocks", ge=1)
    num_resblocks: int = _field(6, "MemNet: residual blocks per memory block", ge=1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _field(600, "denoiser training epochs (DE-CROP: of stage 1; stage 2 adds "
                              "decrop.stage2_epochs of its own)", ge=1)
    baseline_epochs: int = _field(0, "epochs of the baseline (Salman et al.); 0 = the same total as DE-CROP, "
                                     "train.epochs + decrop.stage2_epochs", ge=0)
    batch_size: int = _field(64, "batch size", ge=1)
    lr: float = _field(1e-3, "learning rate of Adam and of SGD after the switch", gt=0)
    adam_epochs: int = _field(50, "epochs with Adam before switching to SGD (the paper's supplementary: 50)", ge=0)
    momentum: float = _field(0.9, "SGD momentum after the switch", ge=0, lt=1)
    lr_step: int = _field(200, "after the switch, multiply the SGD learning rate by lr_gamma every lr_step "
                               "epochs", ge=1)
    lr_gamma: float = _field(0.1, "SGD learning-rate decay factor", gt=0, le=1)
    objective: Literal["stability", "mse"] = _field(
        "stability", "baseline objective: 'stability' = CE(f(D(x+delta)), argmax f(x)) (Salman et al.), "
                     "'mse' = ||D(x+delta) - x||^2")
    precision: Literal["fp32", "bf16"] = _field(
        "fp32", "arithmetic of the forward and backward passes during training: 'bf16' autocasts convolutions and "
                "linear layers (weights, optimiser and losses stay fp32); about 2x faster on CPUs and GPUs with "
                "bf16 units")


@dataclass(frozen=True)
class DecropConfig:
    attack: AttackName = _field("pgd", "how boundary samples are made (decrop.attacks): pgd; autoattack (the standard "
                                       "ensemble APGD-CE, APGD-T, FAB-T, Square; unfooled images stay clean); "
                                       "apgd_ce (its first member alone, cheaper); deepfool (minimal L2 step just "
                                       "past the boundary, not bounded by eps); none (the paper's ablation "
                                       "without boundary samples: a random partner of the same class feeds the "
                                       "interpolation only); or same_class (that partner also trained as if it "
                                       "were a boundary sample, through L_cs and L_mmd)")
    eps: float = _field(8 / 255, "L-inf radius of the boundary attacks (a property of the dataset: 8/255 flips "
                                 "too few Fashion-MNIST predictions, 16/255 most)", gt=0, le=1)
    attack_steps: int = _field(20, "iterations of pgd and apgd_ce (autoattack keeps torchattacks' own budgets)", ge=1)
    attack_step_size: float = _field(2 / 255, "pgd step size", gt=0)
    mixing: float = _field(0.8, "the paper's mixing coefficient alpha of interpolated samples: target logits "
                                "mixing f(x) + (1 - mixing) f(x_b) (named apart from certify.alpha, the "
                                "certificate's failure probability)", ge=0, le=1)
    n_interp: Literal[1, 2, 5] = _field(1, "interpolated samples per original, each from its own start")
    interp_steps: int = _field(50, "Adam steps of the input optimisation towards the interpolated target", ge=1)
    interp_lr: float = _field(1e-2, "Adam learning rate of the input optimisation", gt=0)
    w_lc: float = _field(1.0, "weight of L_lc (label consistency)", ge=0)
    w_cs: float = _field(4.0, "weight of L_cs (cosine similarity of logits), per generated kind", ge=0)
    w_mmd: float = _field(4.0, "weight of L_mmd (feature MMD), per generated kind", ge=0)
    stage2_epochs: int = _field(0, "epochs of stage 2, a run of its own after stage 1: the domain discriminator "
                                   "is added, the denoiser starts from stage 1's and the Adam-then-SGD schedule "
                                   "restarts (the released code's second script); 0 = stage 1 only", ge=0)
    stage2_schedule: Literal["restart", "continue"] = _field(
        "restart", "the denoiser's optimiser in stage 2: 'restart' Adam-then-SGD from its own epoch 0 (the released "
                   "code's second script), or 'continue' stage 1's schedule (its optimiser and state; epoch e of "
                   "DE-CROP then has the optimiser and learning rate of the baseline's epoch e)")
    beta_scale: float = _field(2.0, "w_beta: final scale of the gradient-reversal coefficient", ge=0)
    beta_gamma: float = _field(10.0, "gamma: steepness of the gradient-reversal ramp", gt=0)
    disc_lr: float = _field(1e-5, "Adam learning rate of the domain discriminator", gt=0)


@dataclass(frozen=True)
class BlackBoxConfig:
    arch: ClassifierArch = _field("small_cnn", "surrogate classifier distilled from the black-box outputs")
    epochs: int = _field(30, "distillation epochs on the limited data (and again with the generated samples)",
                         ge=1)
    lr: float = _field(1e-3, "Adam learning rate of the distillation", gt=0)
    temperature: float = _field(1.0, "softmax temperature of the distillation targets", gt=0)


@dataclass(frozen=True)
class CertifyConfig:
    n0: int = _field(100, "noisy samples to select the top class", ge=1)
    n: int = _field(10_000, "noisy samples to estimate its probability", ge=1)
    alpha: float = _field(0.001, "failure probability of the certificate", gt=0, lt=1)
    batch_size: int = _field(1000, "noisy samples per forward pass (the most, when memory_mb is set)", ge=1)
    memory_mb: float = _field(0.0, "activation memory budget of a forward pass in MiB: when > 0 the batch is the "
                                   "largest <= batch_size that fits it, measured on the model (0: use batch_size)",
                              ge=0)
    mode: Literal["exact", "sequential"] = _field(
        "exact", "'exact' = Cohen's fixed-n CERTIFY; 'sequential' = stop an image once its certified-at-r "
                 "outcome is settled for every reported radius (calibrated anytime-valid tests; same guarantee, n is "
                 "the maximum)")
    radii: tuple[float, ...] = _field((0.0, 0.25, 0.5, 0.75, 1.0), "radii at which certified accuracy is "
                                                                   "reported")
    val_images: int = _field(100, "validation images certified for a tuning trial's objective (the first ones of "
                                  "the validation set; never test images)", ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = _field(
        "fp32", "arithmetic of the certified model: bf16/fp16 autocast is faster but certifies the "
                "reduced-precision model, not the fp32 one")
    fold_bn: bool = _field(False, "fold eval-mode BatchNorm into the preceding convs before certifying (the same "
                                  "function up to float rounding, which the certificate then covers)")

    def __post_init__(self) -> None:
        if self.n0 > self.n:
            raise ConfigError(f"config key 'certify.n0' = {self.n0} exceeds certify.n = {self.n}: n0 samples only "
                              f"pick the top class, n estimate its probability; lower certify.n0 or raise certify.n")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _field("decrop", "name of the experiment (MLflow experiment, output folder prefix): letters, "
                                 "digits, '.', '_', '-'")
    seed: int = _field(0, "seed of the subset, the training and the certification noise", ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "'auto' uses CUDA when available")
    sigma: float = _field(0.25, "noise level of randomized smoothing (training and certification)", gt=0)
    methods: tuple[Method, ...] = _field(("baseline",), "denoiser methods to train and certify (the "
                                                        "no-denoiser reference is always certified)")
    cache_dir: str = _field("~/.cache/decrop", "cache of trained classifiers and subsets, keyed by config")
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decrop: DecropConfig = field(default_factory=DecropConfig)
    blackbox: BlackBoxConfig = field(default_factory=BlackBoxConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)

    def __post_init__(self) -> None:
        check_name(self.name, "config key 'name'")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"config key 'methods' lists a method twice: {list(self.methods)}")
        if any(r < 0 for r in self.certify.radii) or not self.certify.radii:
            raise ConfigError(f"config key 'certify.radii' must be a non-empty list of radii >= 0, "
                              f"got {list(self.certify.radii)}")
        if self.data.dataset == "folder" and self.classifier.source == "train":
            raise ConfigError("data.dataset=folder needs your pretrained classifier (a folder holds too few images "
                              "to train one): set classifier.source to export, torchscript, state_dict or "
                              "torchvision and classifier.path to its file")
        if self.certify.fold_bn and self.classifier.source != "train":
            raise ConfigError("config key 'certify.fold_bn' folds the BatchNorm of the registry classifiers; your "
                              "classifier is certified as written: set certify.fold_bn=false")
        if self.certify.val_images > self.data.val_size:
            raise ConfigError(f"config key 'certify.val_images' = {self.certify.val_images} exceeds "
                              f"data.val_size = {self.data.val_size}: it certifies a part of the validation set")

    def stage_epochs(self, method: str) -> tuple[int, ...]:
        """Epochs of each training stage of `method`: DE-CROP ``(train.epochs, decrop.stage2_epochs)`` (the second
        only when stage 2 runs), the baseline one stage of ``train.baseline_epochs``, by default the same total."""
        if method == "baseline":
            return (self.train.baseline_epochs or self.train.epochs + self.decrop.stage2_epochs,)
        return (self.train.epochs, self.decrop.stage2_epochs) if self.decrop.stage2_epochs else (self.train.epochs,)


# ---------------------------------------------------------------------------------------------------------
# Building and checking


def _allowed_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key_error(key: str, prefix: str, cls: type) -> ConfigError:
    allowed = _allowed_keys(cls)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}; allowed keys"
                       f"{' in ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(allowed)}")


# A decimal number as Python's float() reads it: what YAML 1.1 leaves a string when it has an exponent but no '.'.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert lossless cases (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        # type() as well as ==: True == 1 and 1.0 == 1, but neither is the augmentation policy 1.
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of: "
                              f"{', '.join(repr(c) for c in choices)}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Union, types.UnionType):
        raise TypeError("optional config fields are not supported; use a sentinel value")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-3 (no '.') as a string, where YAML 1.2 and Python read the number 0.001
        text = value.strip()
        value = int(text) if tp is int and text.lstrip("+-").isdigit() else float(text)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # name=2024: YAML reads an integer, whose digits are the name
        if not isinstance(value, str):
            hint = (f" (YAML read the value as a {type(value).__name__}): put it in quotes, e.g. "
                    f"{key.rsplit('.', 1)[-1]}: \"...\" in the file or --set '{key}=\"...\"'"
                    if isinstance(value, (bool, float)) else "")
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}{hint}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


# The numeric bounds a field may carry (`_field`'s ge, gt, le, lt): the test and its symbol.
BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    for name, (ok, symbol) in BOUNDS.items():
        if name in meta and not ok(value, meta[name]):
            allowed = " and ".join(f"{BOUNDS[n][1]} {meta[n]}" for n in BOUNDS if n in meta)
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: must be {allowed} "
                              f"({meta['help']})")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix[:-1]}' must be a mapping of keys, got {data!r}")
    hints = get_type_hints(cls)
    names = set(_allowed_keys(cls))
    for key in data:
        if key not in names:
            raise _unknown_key_error(str(key), prefix, cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, tp, value = prefix + f.name, hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, key + ".")
        else:
            kwargs[f.name] = _coerce(value, tp, key)
            if isinstance(kwargs[f.name], (int, float)) and not isinstance(kwargs[f.name], bool):
                _check_bounds(kwargs[f.name], f.metadata, key)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Build a config from a nested dict (a parsed YAML profile). Missing keys take their defaults."""
    return _build(ExperimentConfig, data)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_flat(flat: Mapping[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Build a config from dotted keys (``{"train.epochs": 5}``), on top of `base` (defaults if None)."""
    tree = to_dict(base) if base is not None else {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return from_dict(tree)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]}; keep one)",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the constructor below says so
                continue
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or str(err).splitlines()[0]}{where}"


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is read as YAML (``5``, ``0.1``, ``[0, 0.5]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {_yaml_problem(err)}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML profile (defaults if `path` is None) and apply ``key=value`` overrides in order."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file: give a profile file, "
                              f"e.g. configs/quick.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (profiles live in configs/, "
                              f"e.g. configs/quick.yaml)")
        try:
            tree = _load_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        if tree is None:  # empty, or comments only: the defaults alone are the paper's scale (GPU hours)
            raise ConfigError(f"config file {str(path)!r} is empty (no keys): write the keys to change into it, "
                              f"or start from a profile, e.g. configs/quick.yaml")
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(tree)


# ---------------------------------------------------------------------------------------------------------
# Views of a config


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) that `from_dict` reads back to an equal config."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, tuple) else v
    return {f.name: to_dict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
            else plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def to_flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flat dict with dotted keys and primitive values (lists for tuples): MLflow params, Tune spaces."""
    flat: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update(to_flat(getattr(cfg, key), prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(*parts: Any) -> str:
    """Short stable hash of config sections or primitives, used to key caches (classifier, subsets)."""
    payload = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def expand_path(path: str) -> Path:
    """Absolute path with ``~`` expanded: Ray moves workers into trial folders, so relative paths break."""
    return Path(path).expanduser().resolve()


@dataclass(frozen=True)
class FieldSpec:
    """One config field as `_field` declared it, for what else declares it (a command-line flag): its annotation,
    default, help text, numeric bounds (``ge``/``gt``/``le``/``lt`` -> bound) and choices (a ``Literal``'s values,
    else None)."""
    type: Any
    default: Any
    help: str
    bounds: Mapping[str, Any]
    choices: tuple[Any, ...] | None

    def within(self, value: Any) -> bool:
        """Whether `value` satisfies every bound of the field."""
        return all(BOUNDS[name][0](value, bound) for name, bound in self.bounds.items())


def field_spec(cls: type, name: str) -> FieldSpec:
    """The `FieldSpec` of field `name` of the config section `cls` (e.g. ``field_spec(CertifyConfig, "n")``)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp = get_type_hints(cls)[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return FieldSpec(tp, default, f.metadata.get("help", ""), {k: f.metadata[k] for k in BOUNDS if k in f.metadata},
                     get_args(tp) if get_origin(tp) is Literal else None)


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: the reference printed by ``python -m decrop config --help-keys``."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".")
        else:
            spec = field_spec(cls, f.name)
            text = spec.help + (f" (one of {list(spec.choices)})" if spec.choices else "")
            rows.append((prefix + f.name, repr(spec.default), text))
    return rows
