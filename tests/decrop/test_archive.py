"""Loading a .pt2 never runs code: `decrop.archive` refuses every archive member that torch.export.load (torch
2.14) would turn into code while loading, through `load_smoothed` (predict/certify), the export classifier source
(run, sweep) and the CLI; genuine exported programs and the platform's own smoothed models still load.

Each crafted archive carries a payload that creates a marker file when it runs (``open(marker, "w")``, reached
through a pickle's ``__reduce__``, sympy's ``eval`` or torch.fx's generated source); the live ones are shown to
run under a plain ``torch.export.load``, and every one is refused by decrop with the marker never created."""

import io
import json
import logging
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from decrop.archive import ArchiveRefused, check_archive, check_pickle, load_export, _sympy_problem
from decrop.cli import main
from decrop.config import load_config, to_flat
from decrop.data import DatasetInfo
from decrop.errors import ClassifierError, SmoothedModelError
from decrop.models import create_model
from decrop.models import build_denoiser
from decrop.smoothed import export_smoothed, load_smoothed
from decrop.user_model import load_user_classifier

INFO = DatasetInfo("folder", channels=1, image_size=16, num_classes=3, mean=(0.5,), std=(0.5,),
                   classes=("a", "b", "c"))
BATCH = torch.export.Dim("batch", min=1)
SIGMA = 0.5


def _quiet(_):
    pass


# ----------------------------------------------------------------------------------------- building files

def classifier_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=3)
    model.train()(torch.rand(16, 1, 16, 16))  # BatchNorm statistics that are not the identity
    return model.eval()


def smoothed_metadata(**changes) -> dict:
    """The metadata `export_run` writes (sigma 0.5, three classes, 1x16x16 images, the flat config)."""
    config = to_flat(load_config(None, [f"sigma={SIGMA}", "denoiser.depth=3", "denoiser.width=4"]))
    meta = {"sigma": SIGMA, "num_classes": 3, "classes": ["a", "b", "c"], "input_shape": [1, 16, 16],
            "method": "decrop", "epochs": [600], "dataset": config["data.dataset"], "classifier_sha256": "0" * 64,
            "denoiser_sha256": "1" * 64, "config": config}
    meta.update(changes)
    return meta


def write_smoothed(path: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A smoothed model as `python -m decrop export` writes it (`export_smoothed`), its classifier and denoiser."""
    classifier = classifier_model()
    cfg = load_config(None, [f"sigma={SIGMA}", "denoiser.depth=3", "denoiser.width=4"])
    denoiser = build_denoiser(cfg.denoiser, 1).eval()
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_smoothed(classifier, denoiser, (1, 16, 16), path, smoothed_metadata())
    return path, classifier, denoiser


@pytest.fixture(autouse=True)
def _no_duplicate_name_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        yield


def rewrite(src: Path, dst: Path, changes: dict[str, bytes | Callable[[bytes], bytes] | None],
            before: tuple[tuple[str, bytes], ...] = ()) -> Path:
    """A copy of the archive `src` with members replaced (bytes, or a function of the old bytes), removed (None)
    or added (names not in `src`; all inside the archive's folder), and raw `before` entries written first."""
    with zipfile.ZipFile(src) as zin:
        folder = zin.namelist()[0].split("/", 1)[0] + "/"
        items = [(name[len(folder):], zin.read(name)) for name in zin.namelist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in before:
            zout.writestr(name, data)
        for name, data in items:
            if name in changes:
                change = changes[name]
                if change is None:
                    continue
                data = change(data) if callable(change) else change
            zout.writestr(folder + name, data)
        for name, change in changes.items():
            if name not in dict(items) and change is not None:
                zout.writestr(folder + name, change)
    return dst


def torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Payload:
    """Unpickling it calls ``open(marker, "w")``: code that runs at load time and leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _json_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        tree = json.loads(data)
        edit(tree)
        return json.dumps(tree).encode()
    return change


def _first_pickled(entry_kind: str):
    """Mark the first entry of a weights config as pickled (torch.load(weights_only=False) of its file)."""
    def edit(tree: dict) -> None:
        entry = next(iter(tree["config"].values()))
        entry.update(use_pickle=True, path_name=entry_kind)
    return _json_edit(edit)


def _add_constant(path_name: str):
    def edit(tree: dict) -> None:
        tree["config"]["evil"] = {"path_name": path_name, "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}
    return _json_edit(edit)


def _rename_input(evil: str):
    """Rename the program's image input (a placeholder: its name goes into torch.fx's generated source)."""
    def edit(tree: dict) -> None:
        specs = tree["graph_module"]["signature"]["input_specs"]
        old = next(s["user_input"]["arg"]["as_tensor"]["name"] for s in specs if "user_input" in s)

        def swap(node):
            if isinstance(node, dict):
                return {(evil if k == old else k): swap(v) for k, v in node.items()}
            if isinstance(node, list):
                return [swap(v) for v in node]
            return evil if node == old else node
        tree.update(swap(tree))
    return _json_edit(edit)


def _shape_expression(marker: Path):
    def edit(tree: dict) -> None:
        values = tree["graph_module"]["graph"]["tensor_values"]
        size = next(s for v in values.values() for s in v["sizes"] if "as_expr" in s)
        size["as_expr"]["expr_str"] += f" if open({str(marker)!r}, 'w') else 0"
    return _json_edit(edit)


def _spec_importing_a_module(tree: dict) -> None:
    signature = tree["graph_module"]["module_call_graph"][0]["signature"]
    enum = json.dumps([{"__enum__": True, "fqn": "json:JSONDecoder", "name": "x"}])
    signature["out_spec"] = json.dumps([1, {"type": "builtins.dict", "context": enum, "children_spec": [
        {"type": None, "context": None, "children_spec": []}]}])


def _carriage_return_in_a_stack_trace(tree: dict) -> None:
    node = tree["graph_module"]["graph"]["nodes"][0]
    node["metadata"]["stack_trace"] = 'File "m.py", line 1, in forward\n    y\rimport os'


def _torchscript_inside(marker: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(torch_save(((torch.zeros(1),), {})))) as inner, \
            zipfile.ZipFile(buffer, "w") as out:
        folder = inner.namelist()[0].split("/", 1)[0] + "/"
        for name in inner.namelist():
            out.writestr(name, inner.read(name))
        out.writestr(folder + "constants.pkl", pickle.dumps(Payload(marker), protocol=2))
    return buffer.getvalue()


SAMPLE = "data/sample_inputs/model.pt"
MODEL = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"


def craft(case: str, src: Path, dst: Path, marker: Path) -> tuple[Path, str]:
    """(the crafted archive, the member its refusal must name) of `case`."""
    raw = pickle.dumps(Payload(marker), protocol=2)
    saved = torch_save(((Payload(marker),), {}))
    if case == "sample inputs: a raw pickle":
        return rewrite(src, dst, {SAMPLE: raw}), SAMPLE
    if case == "sample inputs: torch.save of an object":
        return rewrite(src, dst, {SAMPLE: saved}), SAMPLE
    if case == "sample inputs: a second copy":  # an unsafe copy first, the genuine one after it
        with zipfile.ZipFile(src) as z:
            folder = z.namelist()[0].split("/", 1)[0] + "/"
        return rewrite(src, dst, {}, before=((folder + SAMPLE, saved),)), SAMPLE
    if case == "sample inputs: a TorchScript archive":
        return rewrite(src, dst, {SAMPLE: _torchscript_inside(marker)}), SAMPLE
    if case == "a pickled weight":
        return rewrite(src, dst, {WEIGHTS_CONFIG: _first_pickled("weight_0"),
                                  "data/weights/weight_0": torch_save(Payload(marker))}), "data/weights/weight_0"
    if case == "legacy weights":
        return rewrite(src, dst, {"data/weights/model.pt": torch_save(Payload(marker))}), "data/weights/model.pt"
    if case == "a pickled tensor constant":
        return rewrite(src, dst, {CONSTANTS_CONFIG: _add_constant("tensor_9"),
                                  "data/constants/tensor_9": torch_save(Payload(marker))}), "data/constants/tensor_9"
    if case == "an opaque object":
        return rewrite(src, dst, {CONSTANTS_CONFIG: _add_constant("opaque_obj_0"),
                                  "data/constants/opaque_obj_0": raw}), "data/constants/opaque_obj_0"
    if case == "a custom object":
        return rewrite(src, dst, {CONSTANTS_CONFIG: _add_constant("custom_obj_0"),
                                  "data/constants/custom_obj_0": raw}), "data/constants/custom_obj_0"
    if case == "a shape expression (sympy eval)":
        return rewrite(src, dst, {MODEL: _shape_expression(marker)}), MODEL
    if case == "an input name (torch.fx source)":
        return rewrite(src, dst, {MODEL: _rename_input(f"x=open({str(marker)!r},'w')")}), MODEL
    if case == "a pytree spec importing a module":
        return rewrite(src, dst, {MODEL: _json_edit(_spec_importing_a_module)}), MODEL
    if case == "a stack trace with a carriage return":
        return rewrite(src, dst, {MODEL: _json_edit(_carriage_return_in_a_stack_trace)}), MODEL
    if case == "AOTInductor code":
        return rewrite(src, dst, {"data/aotinductor/model/model.so": b"\x7fELF"}), "data/aotinductor/model/model.so"
    if case == "a member outside the archive's folder":  # torch's legacy loader: weights_only=False
        return rewrite(src, dst, {}, before=(("version", b"8"),)), "version"
    if case == "a member of another case":
        return rewrite(src, dst, {"Data/sample_inputs/model.pt": saved}), "Data/sample_inputs/model.pt"
    if case == "an unknown member":
        return rewrite(src, dst, {"data/other/model.pt": saved}), "data/other/model.pt"
    raise AssertionError(case)


# Payloads that a plain torch.export.load (plus .module(), as decrop calls it) really runs.
LIVE = ["sample inputs: a raw pickle", "sample inputs: torch.save of an object", "a pickled weight", "legacy weights",
        "a pickled tensor constant", "an opaque object", "a shape expression (sympy eval)",
        "an input name (torch.fx source)"]
# Which copy of a name given twice torch's reader returns depends on where its binary search lands; Python's zipfile
# returns the last: a check reading another copy than torch would be worthless.
CASES = LIVE + ["sample inputs: a second copy", "sample inputs: a TorchScript archive", "a custom object",
                "a pytree spec importing a module", "a stack trace with a carriage return", "AOTInductor code",
                "a member outside the archive's folder", "a member of another case", "an unknown member"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The platform's smoothed model and a user's exported classifier (torch.export.save of a plain model)."""
    tmp = tmp_path_factory.mktemp("sources")
    smoothed, classifier, denoiser = write_smoothed(tmp / "smoothed.pt2")
    program = torch.export.export(classifier_model(), (torch.rand(2, 1, 16, 16),), dynamic_shapes=({0: BATCH},))
    torch.export.save(program, str(tmp / "classifier.pt2"))
    return {"smoothed": smoothed, "classifier": tmp / "classifier.pt2", "model": classifier, "denoiser": denoiser}


def _load_classifier(path: Path):
    cfg = load_config(None, ["classifier.source=export", f"classifier.path={path}"]).classifier
    return load_user_classifier(cfg, INFO, torch.rand(2, 1, 16, 16), torch.device("cpu"), log=_quiet)


# -------------------------------------------------------------------------------------------------- tests

def test_genuine_programs_and_the_platforms_smoothed_model_load(sources):
    smoothed = load_smoothed(sources["smoothed"])
    assert smoothed.sigma == SIGMA and smoothed.classes == ("a", "b", "c") and smoothed.input_shape == (1, 16, 16)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(smoothed.module(x), sources["model"](sources["denoiser"](x)))
        torch.testing.assert_close(_load_classifier(sources["classifier"])(x), sources["model"](x))


class _Shapes(nn.Module):
    """Buffers, a tensor constant, a ModuleDict key that is no identifier and dynamic height and width: the
    archive has tensor constants and shape expressions with FloorDiv, Max, TruncToInt and Float."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a": nn.Conv2d(1, 4, 3, padding=1), "b-c": nn.BatchNorm2d(4)})
        self.register_buffer("scale", torch.full((1,), 2.0))
        self.offset = torch.tensor([0.5])

    def forward(self, x):
        y = self.blocks["b-c"](self.blocks["a"](x)) * self.scale + self.offset
        y = nn.functional.interpolate(y, scale_factor=0.5, mode="bilinear")
        return y.mean((2, 3)) + x.shape[-1] // 3


def test_a_program_with_constants_and_dynamic_sizes_passes_the_check(tmp_path):
    model = _Shapes().eval()
    height, width = torch.export.Dim("h", min=4, max=64), torch.export.Dim("w", min=4, max=64)
    program = torch.export.export(model, (torch.rand(2, 1, 16, 24),),
                                  dynamic_shapes=({0: BATCH, 2: 2 * height, 3: 2 * width},))
    torch.export.save(program, str(tmp_path / "shapes.pt2"))
    data = (tmp_path / "shapes.pt2").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        text = z.read(next(n for n in names if n.endswith(MODEL))).decode()
    assert any("data/constants/tensor_" in n for n in names) and "FloorDiv" in text and "TruncToInt" in text
    check_archive(data)
    x = torch.rand(3, 1, 20, 12)
    torch.testing.assert_close(load_export(tmp_path / "shapes.pt2").module()(x), model(x))


@pytest.mark.parametrize("case", LIVE)
def test_the_live_payloads_run_under_a_plain_torch_export_load(case, sources, tmp_path):
    """What the refusals below prevent: torch.export.load (and .module()) runs each payload."""
    marker = tmp_path / "ran"
    path, _ = craft(case, sources["classifier"], tmp_path / "crafted.pt2", marker)
    logging.disable(logging.WARNING)  # torch logs its fallbacks with tracebacks
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.load(str(path)).module()
    except Exception:
        pass
    finally:
        logging.disable(logging.NOTSET)
    assert marker.exists()


@pytest.mark.parametrize("target", ["smoothed", "classifier"])
@pytest.mark.parametrize("case", CASES)
def test_a_member_that_would_run_code_is_refused_naming_it(case, target, sources, tmp_path):
    marker = tmp_path / "ran"
    path, member = craft(case, sources[target], tmp_path / "crafted.pt2", marker)
    error = SmoothedModelError if target == "smoothed" else ClassifierError
    with pytest.raises(error) as caught:
        load_smoothed(path) if target == "smoothed" else _load_classifier(path)
    message = str(caught.value)
    assert "\n" not in message and f"is refused: its member {member} " in message, message
    assert not marker.exists()


def test_predict_refuses_a_crafted_smoothed_model_in_one_line_with_exit_code_2(sources, tmp_path, capsys):
    marker = tmp_path / "ran"
    path, member = craft("sample inputs: torch.save of an object", sources["smoothed"], tmp_path / "s.pt2", marker)
    images = tmp_path / "images"
    images.mkdir()
    assert main(["predict", "--model", str(path), "--images", str(images), "--n", "10"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"error: --model {path} is refused: its member {member} is a pickle that imports io.open")
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err and captured.out == ""
    assert not marker.exists()


def test_the_pickle_check_allows_plain_tensors_only():
    plain = torch_save(((torch.rand(2, 3), nn.Parameter(torch.ones(2))), {"mask": torch.zeros(2, dtype=torch.bool),
                        "table": OrderedDict(a=1), "n": 3, "f": 0.5, "s": "text", "none": None, "flag": True}))
    with zipfile.ZipFile(io.BytesIO(plain)) as z:
        check_pickle("plain", z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    for evil, words in ((pickle.dumps(Payload(Path("m")), protocol=2), "imports io.open"),
                        (pickle.dumps(Payload(Path("m")), protocol=4), "opcode"),
                        (b"cos\nsystem\n(S'true'\ntR.", "imports os.system"),
                        (b"(ios\nsystem\n.", "opcode INST"), (b"\x80\x02", "not a valid pickle")):
        with pytest.raises(ArchiveRefused, match=words):
            check_pickle("evil", evil)


@pytest.mark.parametrize("expr, ok", [
    ("Symbol('s77', positive=True, integer=True)", True),
    ("FloorDiv(Mul(Integer(2), Symbol('s94', positive=True, integer=True)), Integer(3))", True),
    ("Max(Integer(1), TruncToInt(Mul(Float('0.5', precision=53), ToFloat(Symbol('s39', integer=True)))))", True),
    ("Add(Symbol('s0', integer=True), Integer(-1))", True),
    ("-oo", True),
    ("__import__('os').system('true')", False),
    ("exec(chr(112))", False),
    ("Symbol('s0').func", False),
    ("Symbol('x; import os')", False),
    ("Symbol((lambda: 0)())", False),
    ("Integer(1) if open('m', 'w') else 0", False),
])
def test_shape_expressions_are_sympy_reprs_only(expr, ok):
    assert (_sympy_problem(expr) is None) == ok
