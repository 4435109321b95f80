"""The user's own pretrained classifier, frozen, behind the project's classifier contract.

DE-CROP protects a classifier the user already has. ``classifier.source`` says what its file is:

``export``       a ``torch.export`` program (``torch.export.save``; batch dimension dynamic, exported in eval mode);
``torchscript``  a legacy ``torch.jit.save`` file;
``state_dict``   weights for the registry architecture ``classifier.arch`` (a raw state dict or a decrop checkpoint);
``torchvision``  local weights for ``torchvision.models.get_model(classifier.torchvision_arch)`` (never downloaded).

`load_user_classifier` loads the file, wraps it in `UserClassifier` (inputs in [0, 1]; ``classifier.mean/std``
prepended as normalisation) and checks it against the data before any compute: input channels and size, output
width = number of classes, the feature layer. DE-CROP's L_mmd and discriminator need penultimate features:
``classifier.feature_layer`` names a node (``nn.Module`` sources: torchvision's ``create_feature_extractor``) or
a submodule (exported programs: ``torch.export.unflatten`` plus a forward hook; TorchScript models cannot name
one); left empty, the features are the logits (registry models: their own penultimate features). The
model is never trained or modified: `UserClassifier.train` does not reach it, and its sha256 is logged.

Safety: weights (``state_dict``, ``torchvision``) load with ``torch.load(weights_only=True)``. An ``export`` file is
read through `decrop.archive.load_export`, which refuses an archive with a member that would run code while torch
loads it (pickles of anything but tensors, compiled code, code hidden in the program's JSON); its graph is still
the author's code and runs on every call. A ``torchscript`` file is code that ``torch.jit.load`` runs as it loads,
unchecked: load only files you trust.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .archive import ArchiveRefused, load_export
from .config import ClassifierConfig
from .data import DatasetInfo
from .errors import ClassifierError
from .models import Normalize, create_model

Log = Callable[[str], None]


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (memoised per path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def detect_format(path: Path) -> str:
    """What a model file looks like: 'export', 'torchscript', 'state_dict' (a torch.save file) or 'unknown'."""
    try:
        names = {n.split("/", 1)[-1] for n in zipfile.ZipFile(path).namelist()}
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if "archive_format" in names:
        return "export"
    if "constants.pkl" in names:
        return "torchscript"
    return "state_dict" if "data.pkl" in names else "unknown"


def _not_a_model(path: Path, source: str, err: Exception) -> ClassifierError:
    found = detect_format(path)
    if found not in ("unknown", source):
        return ClassifierError(f"classifier.path {path} is a {found} file, not one for classifier.source={source}: set "
                               f"classifier.source={found}")
    return ClassifierError(f"classifier.path {path} cannot be loaded as classifier.source={source} "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); it is not a model file "
                           f"PyTorch can read: point classifier.path at your model")


class FrozenProgram(nn.Module):
    """A compiled program (exported ``GraphModule``, unflattened program, ``ScriptModule``) whose mode never
    changes: ``train()``/``eval()`` set only this wrapper's flag (exported programs refuse them, and their
    BatchNorm/dropout behaviour was fixed when they were exported)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> "FrozenProgram":
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


class UserClassifier(nn.Module):
    """The user's model as a classifier of the project's contract (`decrop.models`): images (B, C, H, W) in
    [0, 1] -> logits (B, num_classes); ``logits_and_features(x)`` and ``feature_dim`` for DE-CROP's losses.

    `model` maps normalised images to logits. `features` maps (this wrapper, normalised x) to (logits,
    features), using `extractor` (a module it registers so that it follows `.to()`);
    None: the logits serve as features. Mode changes stop at this wrapper: the user's model stays as loaded
    (eval). ``feature_dim`` and ``num_classes`` are set by `load_user_classifier`'s probe.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...] = (), std: tuple[float, ...] = (),
                 features: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]] | None = None,
                 extractor: nn.Module | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std) if mean else nn.Identity()
        self.model = model
        self.extractor = extractor
        self._features = features
        self.feature_dim = 0
        self.num_classes = 0

    def train(self, mode: bool = True) -> "UserClassifier":
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) in [0, 1]."""
        return self.model(self.normalize(x))

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features (B, ...)) of images in [0, 1] from one pass; features = logits without a layer."""
        z = self.normalize(x)
        if self._features is None:
            logits = self.model(z)
            return logits, logits
        return self._features(self, z)


# ------------------------------------------------------------------------------------------------- features

def _module_features(model: nn.Module, layer: str, path: Path) -> tuple[Callable, nn.Module]:
    """Feature function of an ``nn.Module`` through torchvision's feature extractor (fx node names)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    try:
        names = get_graph_node_names(model)[1]
    except Exception as err:  # fx cannot trace every model
        raise ClassifierError(f"classifier.feature_layer={layer!r}: {path} cannot be traced by torch.fx to find "
                              f"its layers ({type(err).__name__}); export it with torch.export and use "
                              f"classifier.source=export, or leave classifier.feature_layer empty") from None
    if layer not in names[1:]:
        raise ClassifierError(f"classifier.feature_layer={layer!r} is not a layer of {path}; valid names: "
                              f"{', '.join(names[1:])}")
    extractor = create_feature_extractor(model, {layer: "features", names[-1]: "logits"})

    def features(wrapper: UserClassifier, z: Tensor) -> tuple[Tensor, Tensor]:
        out = wrapper.extractor(z)
        return out["logits"], out["features"]
    return features, extractor


def _program_features(program: torch.export.ExportedProgram, layer: str, path: Path
                      ) -> tuple[Callable, nn.Module]:
    """Feature function of an exported program: its unflattened module (the original submodule tree), the
    output of submodule `layer` captured by a forward hook during the one forward pass."""
    module = torch.export.unflatten(program)
    names = [name for name, _ in module.named_modules() if name]
    if layer not in names:
        raise ClassifierError(f"classifier.feature_layer={layer!r} is not a submodule of {path}; valid names: "
                              f"{', '.join(names)}")
    # Armed only inside `features`: plain forward passes (certification) must not keep every batch's output.
    captured: dict[str, Tensor | bool | None] = {"armed": False, "out": None}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        if captured["armed"]:
            captured["out"] = out

    module.get_submodule(layer).register_forward_hook(hook)

    def features(wrapper: UserClassifier, z: Tensor) -> tuple[Tensor, Tensor]:
        captured["armed"] = True
        try:
            logits = wrapper.extractor(z)
        finally:
            captured["armed"] = False
        out, captured["out"] = captured["out"], None
        return logits, out
    return features, FrozenProgram(module)


# ---------------------------------------------------------------------------------------------------- loading

def _check_program(program: torch.export.ExportedProgram, path: Path, image_shape: tuple[int, ...]) -> None:
    """One image input (batch dynamic, C/H/W those of the data) and no training-mode BatchNorm or dropout."""
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise ClassifierError(f"{path} takes {len(inputs)} inputs {list(inputs)}; a classifier takes one batch "
                              f"of images: export a module whose forward(x) returns logits")
    spec = next(n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    if len(spec) != 4:
        raise ClassifierError(f"{path} takes inputs of shape {tuple(spec)}; expected (batch, C, H, W)")
    if not isinstance(spec[0], torch.SymInt):
        raise ClassifierError(f"{path} was exported with a fixed batch of {spec[0]}; smoothing classifies batches "
                              f"of noisy copies: export with dynamic_shapes=({{0: torch.export.Dim('batch')}},)")
    wanted = tuple(int(s) if not isinstance(s, torch.SymInt) else None for s in spec[1:])
    if any(w is not None and w != have for w, have in zip(wanted, image_shape)):
        raise ClassifierError(f"{path} takes images of shape (C, H, W) = {wanted}, the data's are "
                              f"{tuple(image_shape)}: convert/resize the images to the model's input, or use the "
                              f"model made for them")
    aten = torch.ops.aten
    for node in program.graph.nodes:
        if ((node.target is aten.batch_norm.default and node.args[5] is True)
                or node.target is aten._native_batch_norm_legit_functional.default
                or (node.target in (aten.dropout.default, aten.native_dropout.default) and node.args[2] is True)):
            raise ClassifierError(f"{path} was exported in training mode ({node.target} uses batch statistics "
                                  f"or drops units): call model.eval() before torch.export.export")


def _load_program(path: Path, device: torch.device) -> torch.export.ExportedProgram:
    """The exported program of `path`, its archive checked first (`decrop.archive.load_export`): a member that
    would run code while torch loads it (a pickle of anything but tensors, compiled code, code in the program's
    JSON) is refused, naming the member."""
    if detect_format(path) != "export":  # torch.export.load would first log a traceback of its own
        raise _not_a_model(path, "export", zipfile.BadZipFile("no torch.export archive inside"))
    try:
        program = load_export(path)
    except ArchiveRefused as err:
        raise ClassifierError(f"classifier.path {path} is refused: {err}; decrop never loads a file that would run "
                              f"code while loading (save a plain model with torch.export.save)") from None
    except Exception as err:  # not a zip, a TorchScript archive, a torch.save file, ...
        raise _not_a_model(path, "export", err) from None
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass
        program = move_to_device_pass(program, device)
    return program


def _load_weights(path: Path, source: str) -> dict[str, Tensor]:
    """A state dict from a raw ``torch.save(model.state_dict())`` file or a decrop checkpoint."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _not_a_model(path, source, err) from None
    if isinstance(payload, dict) and set(payload) == {"meta", "state_dict"}:
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ClassifierError(f"classifier.path {path} holds no state dict (a mapping of names to tensors): save "
                              f"it with torch.save(model.state_dict(), path)")
    return payload


def _weights_into(model: nn.Module, state: dict[str, Tensor], path: Path, built: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ClassifierError(f"{path} does not fit {built} ({detail}): the output width must equal the number of "
                              f"classes and the input channels those of the images") from None
    return model


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ClassifierError(f"classifier.torchvision_arch={name!r} is not a torchvision model"
                              f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                              f"torchvision.models.list_models() lists them")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _program_of_torchscript(module: torch.jit.ScriptModule, example: Tensor, path: Path
                            ) -> torch.export.ExportedProgram:
    """Convert a TorchScript module to an exported program (torch's TS2EPConverter, a private but maintained
    converter): ``torch.export`` cannot trace a ScriptModule with a dynamic batch, the smoothed model needs one."""
    from torch._export.converter import TS2EPConverter

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TS2EPConverter(module, (example,)).convert()
    except Exception as err:
        raise ClassifierError(f"{path}: torch cannot convert this TorchScript model to a torch.export program "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:160]}), which the smoothed-model "
                              f"export needs; re-save the model with torch.export.save (TorchScript is "
                              f"deprecated) and use classifier.source=export") from None


def _build(cfg: ClassifierConfig, info: DatasetInfo, example: Tensor, device: torch.device) -> UserClassifier:
    """The wrapped model for `cfg.source`, its feature function chosen (module doc)."""
    path, layer = Path(cfg.path), cfg.feature_layer
    if cfg.source in ("export", "torchscript"):
        if cfg.source == "torchscript":
            try:
                script = torch.jit.load(str(path), map_location=device)
            except Exception as err:
                raise _not_a_model(path, "torchscript", err) from None
            if layer:  # ScriptModules take no forward hooks; converted to torch.export they lose submodule names
                raise ClassifierError(f"classifier.feature_layer={layer!r}: a TorchScript model ({path}) cannot "
                                      f"expose an inner layer; leave classifier.feature_layer empty (the logits "
                                      f"serve as features) or save the model with torch.export.save and use "
                                      f"classifier.source=export")
            return UserClassifier(FrozenProgram(script.eval()), cfg.mean, cfg.std)
        program = _load_program(path, device)
        _check_program(program, path, tuple(example.shape[1:]))
        if not layer:
            return UserClassifier(FrozenProgram(program.module()), cfg.mean, cfg.std)
        features, module = _program_features(program, layer, path)
        return UserClassifier(module, cfg.mean, cfg.std, features, extractor=module)
    state = _load_weights(path, cfg.source)
    if cfg.source == "state_dict":
        model = _weights_into(create_model(cfg.arch, in_channels=info.channels, num_classes=info.num_classes),
                              state, path, f"{cfg.arch} for {info.num_classes} classes")
    else:
        model = _weights_into(_torchvision_model(cfg.torchvision_arch, info.num_classes), state, path,
                              f"torchvision {cfg.torchvision_arch} for {info.num_classes} classes")
    model = model.to(device).eval().requires_grad_(False)
    if layer:
        features, extractor = _module_features(model, layer, path)
        return UserClassifier(model, cfg.mean, cfg.std, features, extractor=extractor)
    if cfg.source == "state_dict":  # registry models know their penultimate features
        return UserClassifier(model, cfg.mean, cfg.std, lambda w, z: w.model.logits_and_features(z))
    return UserClassifier(model, cfg.mean, cfg.std)


def _probe(classifier: UserClassifier, example: Tensor, info: DatasetInfo, path: Path, data: str) -> None:
    """One forward pass on real images: output width, feature shape; errors name the file and the fix."""
    try:
        with torch.no_grad():
            logits, features = classifier.logits_and_features(example)
    except Exception as err:
        raise ClassifierError(f"{path} fails on images of {data} of shape {tuple(example.shape)} "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}): the model must take "
                              f"{info.channels}-channel {info.image_size}x{info.image_size} images (in [0, 1], or "
                              f"normalised by classifier.mean/std)") from None
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != len(example):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ClassifierError(f"{path} returns {shape} for {len(example)} images; expected logits "
                              f"({len(example)}, num_classes)")
    if logits.shape[1] != info.num_classes:
        raise ClassifierError(f"{path} outputs {logits.shape[1]} logits but {data} has {info.num_classes} classes "
                              f"{list(info.classes)[:12]}: the output width must equal the number of classes "
                              f"(for a folder dataset, list all {logits.shape[1]} class names in output order in "
                              f"data.classes, or use the classifier made for these classes)")
    classifier.num_classes, classifier.feature_dim = logits.shape[1], features.flatten(1).shape[1]


def load_user_classifier(cfg: ClassifierConfig, info: DatasetInfo, example: Tensor, device: torch.device,
                         data: str = "the data", log: Log = print) -> UserClassifier:
    """The user's classifier from ``cfg.path`` (module doc), on `device`, checked on `example` (B, C, H, W) in
    [0, 1] (a few images of the data described by `data`, e.g. its folder): ClassifierError, naming the file and
    the fix, for a missing or unreadable file, a wrong source, an input or output shape that does not fit the
    data, or an unknown feature layer. Parameters do not require gradients; inputs still get gradients."""
    path = Path(cfg.path)
    if not path.is_file():
        raise ClassifierError(f"classifier.path {path} does not exist (on a cluster it must be a path every node "
                              f"sees, cluster/README.md)")
    if len(cfg.mean) not in (0, 1, info.channels):
        raise ClassifierError(f"classifier.mean/std have {len(cfg.mean)} values; the images have {info.channels} "
                              f"channels: give one value or one per channel")
    example = example.to(device)
    classifier = _build(cfg, info, example, device)
    classifier.requires_grad_(False)
    _probe(classifier, example, info, path, data)
    layer = f"layer {cfg.feature_layer!r}" if cfg.feature_layer else (
        "its penultimate layer" if cfg.source == "state_dict" else "the logits (no classifier.feature_layer)")
    log(f"classifier: your {cfg.source} model {path} (sha256 {file_sha256(path)[:16]}), frozen; "
        f"{classifier.num_classes} classes; features for L_mmd/the discriminator from {layer}, "
        f"{classifier.feature_dim} values")
    return classifier.to(device)


def exportable(classifier: nn.Module, example: Tensor) -> nn.Module:
    """`classifier` in a form ``torch.export`` can trace with a dynamic batch: a TorchScript model (which
    export specialises to the example's batch) converted to an exported program; anything else unchanged."""
    if isinstance(classifier, UserClassifier) and isinstance(classifier.model, FrozenProgram) and isinstance(
            classifier.model.program, torch.jit.ScriptModule):
        program = _program_of_torchscript(classifier.model.program, example, Path("the TorchScript classifier"))
        return UserClassifier(FrozenProgram(program.module()), *normalize_of(classifier))
    return classifier


def normalize_of(classifier: UserClassifier) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the wrapper's normalisation, ((), ()) when it has none."""
    norm = classifier.normalize
    return (tuple(norm.mean.flatten().tolist()), tuple(norm.std.flatten().tolist())) if isinstance(
        norm, Normalize) else ((), ())
