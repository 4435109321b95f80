"""The smoothed model's metadata (``decrop.json`` inside the archive) is checked when it is loaded: required keys,
types and ranges, and agreement with the config stored in it and with the program's own shapes. A refusal is one
line naming the field (and both values where two disagree); predict/certify exit with code 2."""

import json
import math
import re

import pytest

from decrop.cli import main
from decrop.errors import SmoothedModelError
from decrop.smoothed import FORMAT, load_smoothed

from test_archive import SIGMA, rewrite, write_smoothed  # tests/decrop/test_archive.py
from test_archive import smoothed_metadata as _exported


def smoothed_metadata(**changes):
    """decrop.json as `export_smoothed` writes it: the format, then the run's metadata, with `changes`."""
    return {"format": FORMAT, **_exported(**changes)}

META = "extra/decrop.json"


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory):
    return write_smoothed(tmp_path_factory.mktemp("smoothed") / "smoothed.pt2")[0]


def _with_meta(src, dst, meta):
    return rewrite(src, dst, {META: json.dumps(meta).encode() if meta is not None else None})


def _without(key):
    meta = smoothed_metadata()
    del meta[key]
    return meta


def _config(**changes):
    meta = smoothed_metadata()
    meta["config"] = {**meta["config"], **changes}
    return meta


def test_the_metadata_export_writes_loads(smoothed, tmp_path):
    model = load_smoothed(_with_meta(smoothed, tmp_path / "same.pt2", smoothed_metadata()))
    assert model.sigma == SIGMA and model.classes == ("a", "b", "c") and model.input_shape == (1, 16, 16)
    assert model.meta["config"]["sigma"] == SIGMA and model.meta["method"] == "decrop"


@pytest.mark.parametrize("meta, words", [
    # missing keys
    (None, "carries no sigma in its metadata"),
    (_without("sigma"), "carries no sigma in its metadata"),
    (_without("classes"), "has no classes"),
    (_without("input_shape"), "has no input_shape"),
    (_without("config"), "has no config"),
    (smoothed_metadata(config={}), "has a config without sigma"),
    # types and ranges
    (smoothed_metadata(sigma="0.5"), "has sigma='0.5': the noise level must be a positive finite number"),
    (smoothed_metadata(sigma=True), "has sigma=True"),
    (smoothed_metadata(sigma=0), "has sigma=0:"),
    (smoothed_metadata(sigma=-0.5), "has sigma=-0.5:"),
    (smoothed_metadata(sigma=math.nan), "has sigma=nan:"),
    (smoothed_metadata(sigma=math.inf), "has sigma=inf:"),
    (smoothed_metadata(classes="abc"), "has classes='abc': they must be a non-empty list of class names"),
    (smoothed_metadata(classes=[]), r"has classes=\[\]"),
    (smoothed_metadata(classes=[1, 2, 3]), r"has classes=\[1, 2, 3\]"),
    (smoothed_metadata(classes=["a", "a", "c"]), "names a class twice"),
    (smoothed_metadata(input_shape=[1, 16]), r"has input_shape=\[1, 16\]: it must be \[channels, height, width\]"),
    (smoothed_metadata(input_shape=[1, 16, "16"]), "has input_shape="),
    (smoothed_metadata(input_shape=[0, 16, 16]), "has input_shape="),
    (smoothed_metadata(input_shape={"c": 1}), "has input_shape="),
    (smoothed_metadata(config=[]), "has config of type list"),
    (smoothed_metadata(num_classes="3"), "has num_classes='3', not a valid value"),
    (smoothed_metadata(epochs=[-1]), r"has epochs=\[-1\]"),
    (smoothed_metadata(classifier_sha256="abc"), "has classifier_sha256='abc'"),
    (smoothed_metadata(format="decrop-smoothed-model/99"), "has format='decrop-smoothed-model/99'"),
    (_without("format"), "has no format"),
    # fields stored twice
    (smoothed_metadata(sigma=1e-9), "says sigma=1e-09 but the config stored with it says sigma=0.5: the file was "
                                    "edited"),
    (_config(sigma=0.25), "says sigma=0.5 but the config stored with it says sigma=0.25"),
    (smoothed_metadata(dataset="cifar10"), "says dataset='cifar10' but the config stored with it says "
                                           "data.dataset='fashion_mnist'"),
    (_config(**{"data.classes": ["a", "c", "b"]}), r"says classes=\['a', 'b', 'c'\] but the config stored with it "
                                                   r"says data.classes=\['a', 'c', 'b'\]"),
    (smoothed_metadata(num_classes=4), "says num_classes=4 but it lists 3 classes"),
    (smoothed_metadata(input_shape=[3, 16, 16]), r"says input_shape=\[3, 16, 16\] but the program takes images of "
                                                 r"shape \[1, 16, 16\]"),
    (smoothed_metadata(classes=["a", "b", "c", "d"], num_classes=4), "but the program outputs 3 logits"),
])
def test_bad_metadata_is_refused_in_one_line_naming_the_field(smoothed, tmp_path, meta, words):
    path = _with_meta(smoothed, tmp_path / "edited.pt2", meta)
    with pytest.raises(SmoothedModelError, match=words) as caught:
        load_smoothed(path)
    message = str(caught.value)
    assert message.startswith(f"--model {path}") and "\n" not in message and "decrop export" in message


def test_certify_refuses_an_edited_sigma_with_exit_code_2(smoothed, tmp_path, capsys):
    path = _with_meta(smoothed, tmp_path / "edited.pt2", smoothed_metadata(sigma=1e-9))
    images = tmp_path / "images"
    images.mkdir()
    assert main(["certify", "--model", str(path), "--images", str(images), "--n", "100", "--n0", "10"]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(rf"error: --model {re.escape(str(path))}: its metadata \(decrop.json\) says sigma=1e-09 but "
                        rf"the config stored with it says sigma=0.5: .*\n", captured.err)
    assert "Traceback" not in captured.err and captured.out == ""
