"""The user's own classifier (every classifier.source), the feature contract, bad model files, the smoothed-model
export with predict/certify, and the equality of the folder/exported-model path with the built-in one."""

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import encode_png

from decrop.certify import certify_indices
from decrop.rows import read_rows
from decrop.checkpoint import save_checkpoint
from decrop.classifier import build_classifier, classifier_key, classifier_path, train_classifier
from decrop.cli import main
from decrop.config import CertifyConfig, load_config, to_yaml
from decrop.data import DatasetInfo, as_tensors, load_dataset
from decrop.folders import read_image
from decrop.errors import ClassifierError
from decrop.models import create_model, logits_and_features
from decrop.models import build_denoiser, smoothed_model
from decrop.pipeline import run_experiment
from decrop.prepare import prepare, subset_for
from decrop.runtime import eval_mode
from decrop.smoothed import load_smoothed, read_new_images
from decrop.user_model import UserClassifier, load_user_classifier

from test_folder_data import make_folder  # tests/decrop/test_folder_data.py: image folders on disk

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path(os.environ.get("DECROP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
INFO = DatasetInfo("folder", channels=1, image_size=16, num_classes=3, mean=(0.5,), std=(0.5,),
                   classes=("a", "b", "c"))
CPU = torch.device("cpu")
BATCH = torch.export.Dim("batch", min=1)


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("small_cnn", in_channels=1, num_classes=3)
    m.train()(torch.rand(64, 1, 16, 16))  # BatchNorm statistics that are not the identity
    return m.eval()


def _export(model, path, dynamic=True, shape=(1, 16, 16)):
    program = torch.export.export(model, (torch.rand(2, *shape),), dynamic_shapes=({0: BATCH},) if dynamic else None)
    torch.export.save(program, str(path))
    return path


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")  # the legacy format


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    torch.jit.save(torch.jit.script(model), str(tmp / "model.ts"))
    torch.save(model.state_dict(), tmp / "weights.pt")
    save_checkpoint(tmp / "checkpoint.pt", model, {"kind": "classifier"})
    return {"export": _export(model, tmp / "model.pt2"), "torchscript": tmp / "model.ts",
            "state_dict": tmp / "weights.pt", "checkpoint": tmp / "checkpoint.pt"}


def _cfg(source, path, *extra):
    return load_config(None, [f"classifier.source={source}", f"classifier.path={path}", *extra]).classifier


def _load(cfg, info=INFO, example=None):
    return load_user_classifier(cfg, info, torch.rand(2, 1, 16, 16) if example is None else example, CPU, log=_quiet)


def test_registry_models_implement_the_contract(model):
    x = torch.rand(4, 1, 16, 16)
    logits, features = logits_and_features(model, x)
    assert torch.equal(logits, model(x)) and torch.equal(features, model.features(x))
    assert features.shape == (4, model.feature_dim)
    with pytest.raises(TypeError, match="UserClassifier"):
        logits_and_features(torch.nn.Linear(3, 3), x)


@pytest.mark.parametrize("source, file, layer, features", [
    ("export", "export", "body", "penultimate"), ("export", "export", "", "logits"),
    ("torchscript", "torchscript", "", "logits"),
    ("state_dict", "state_dict", "", "penultimate"), ("state_dict", "checkpoint", "", "penultimate"),
    ("state_dict", "state_dict", "body.12", "penultimate"),
])
def test_every_source_is_the_same_function_with_the_named_features(model, files, source, file, layer, features):
    cfg = _cfg(source, files[file], "classifier.arch=small_cnn", f"classifier.feature_layer={layer}")
    wrapped = _load(cfg)
    x = torch.rand(5, 1, 16, 16)
    logits, phi = logits_and_features(wrapped, x)
    expected = model.features(x) if features == "penultimate" else model(x)
    torch.testing.assert_close(wrapped(x), model(x))
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(phi, expected)
    assert wrapped.feature_dim == expected.shape[1] and wrapped.num_classes == 3
    # frozen: gradients reach the input (DE-CROP's losses), never the user's weights; modes stay as loaded
    x.requires_grad_(True)
    logits_and_features(wrapped, x)[0].sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in wrapped.parameters())
    wrapped.train()
    with eval_mode(wrapped):
        torch.testing.assert_close(wrapped(x), model(x))


def test_torchvision_source_with_local_weights_normalisation_and_a_named_node(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "squeeze.pth")
    info = DatasetInfo("folder", 3, 32, 3, (0.5,), (0.5,), ("a", "b", "c"))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg = _cfg("torchvision", tmp_path / "squeeze.pth", "classifier.torchvision_arch=squeezenet1_1",
               f"classifier.mean={mean}", f"classifier.std={std}", "classifier.feature_layer=features.12.cat")
    wrapped = _load(cfg, info, torch.rand(2, 3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    logits, features = logits_and_features(wrapped, x)
    torch.testing.assert_close(logits, net(normalised))
    torch.testing.assert_close(features, net.features(normalised).flatten(1))
    with pytest.raises(ClassifierError, match="valid names: .*features.12.cat"):
        _load(_cfg("torchvision", tmp_path / "squeeze.pth", "classifier.torchvision_arch=squeezenet1_1",
                   "classifier.feature_layer=features.99"), info, torch.rand(2, 3, 32, 32))
    with pytest.raises(ClassifierError, match="did you mean squeezenet1_1"):
        _load(_cfg("torchvision", tmp_path / "squeeze.pth", "classifier.torchvision_arch=squeezenet1_2"), info)


def _case(case, model, files, tmp):
    """(classifier config, info, example) of one bad input."""
    rgb = torch.rand(2, 3, 16, 16)
    if case == "not a model":
        (tmp / "notes.pt2").write_text("weights are on the other disk")
        return _cfg("export", tmp / "notes.pt2"), INFO, None
    if case == "wrong source":
        return _cfg("export", files["torchscript"]), INFO, None
    if case == "missing file":
        return _cfg("export", tmp / "gone.pt2"), INFO, None
    if case == "output width":
        return _cfg("export", files["export"]), DatasetInfo("folder", 1, 16, 5, (0.5,), (0.5,), tuple("abcde")), None
    if case == "channels (export)":
        return _cfg("export", files["export"]), DatasetInfo("folder", 3, 16, 3, (0.5,), (0.5,), ("a", "b", "c")), rgb
    if case == "channels (torchscript)":
        return _cfg("torchscript", files["torchscript"]), INFO, rgb
    if case == "size":
        return _cfg("export", files["export"]), INFO, torch.rand(2, 1, 20, 20)
    if case == "unknown layer":
        return _cfg("export", files["export"], "classifier.feature_layer=penultimate"), INFO, None
    if case == "layer of a TorchScript model":
        return _cfg("torchscript", files["torchscript"], "classifier.feature_layer=body"), INFO, None
    if case == "fixed batch":
        return _cfg("export", _export(model, tmp / "fixed.pt2", dynamic=False)), INFO, None
    if case == "training mode":
        return _cfg("export", _export(create_model("small_cnn", in_channels=1, num_classes=3).train(),
                                      tmp / "train.pt2")), INFO, None
    if case == "state dict for another model":
        return _cfg("state_dict", files["state_dict"], "classifier.arch=resnet20"), INFO, None
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("not a model", "notes.pt2 cannot be loaded.*not a model file"),
    ("wrong source", "model.ts is a torchscript file, not one for classifier.source=export: set classifier.source=torchscript"),
    ("missing file", "gone.pt2 does not exist"),
    ("output width", "outputs 3 logits but the data has 5 classes.*data.classes"),
    ("channels (export)", r"takes images of shape \(C, H, W\) = \(1, 16, 16\), the data's are \(3, 16, 16\)"),
    ("channels (torchscript)", r"model.ts fails on images of the data of shape \(2, 3, 16, 16\)"),
    ("size", r"\(1, 16, 16\), the data's are \(1, 20, 20\)"),
    ("unknown layer", "'penultimate' is not a submodule.*valid names: body, body.0"),
    ("layer of a TorchScript model", "cannot expose an inner layer.*torch.export.save"),
    ("fixed batch", "fixed batch of 2.*Dim"),
    ("training mode", r"exported in training mode.*model.eval\(\)"),
    ("state dict for another model", "does not fit resnet20"),
])
def test_bad_model_files_fail_before_compute_naming_the_file_and_fix(model, files, tmp_path, case, message):
    cfg, info, example = _case(case, model, files, tmp_path)
    with pytest.raises(ClassifierError, match=message):
        _load(cfg, info, example)


def test_cache_key_of_trained_classifiers_is_unchanged_by_the_new_keys():
    # ~/.cache/decrop/classifiers/fashion_mnist-small_cnn-e9d0c83e5d31.pt: retraining it costs minutes, the paper's
    # ResNet-110 hours
    assert classifier_key(load_config(REPO / "configs/quick.yaml")) == "e9d0c83e5d31"


# ------------------------------------------------------------------------------------ smoothed-model export

@pytest.fixture(scope="module")
def run_dir(model, files, tmp_path_factory):
    """A run folder as `python -m decrop run` leaves it (config.yaml, denoiser_decrop.pt), without training:
    the denoiser's weights are perturbed so that it is not the identity."""
    tmp = tmp_path_factory.mktemp("run")
    root = make_folder(tmp / "images", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 2, "c": 2}})
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.percent=100", "sigma=0.5",
                             "classifier.source=export", f"classifier.path={files['export']}", "denoiser.depth=3",
                             "denoiser.width=4"])
    torch.manual_seed(1)
    denoiser = build_denoiser(cfg.denoiser, 1)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp / "run"
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(cfg))
    save_checkpoint(out / "denoiser_decrop.pt", denoiser, {"kind": "denoiser", "method": "decrop", "sigma": 0.5})
    return out, root, cfg, denoiser.eval()


def test_export_writes_one_program_with_sigma_and_a_dynamic_batch(run_dir, model, tmp_path, capsys):
    out, root, cfg, denoiser = run_dir
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "smoothed.pt2")]) == 0
    smoothed = load_smoothed(tmp_path / "smoothed.pt2")
    assert smoothed.sigma == 0.5 and smoothed.classes == ("a", "b", "c") and smoothed.input_shape == (1, 16, 16)
    assert smoothed.meta["method"] == "decrop" and smoothed.meta["config"]["sigma"] == 0.5
    assert len(smoothed.meta["classifier_sha256"]) == 64
    for batch in (1, 7):
        x = torch.rand(batch, 1, 16, 16)
        torch.testing.assert_close(smoothed.module(x), model(denoiser(x)))
    assert main(["export", "--run", str(out), "--method", "baseline", "--out", str(tmp_path / "b.pt2")]) == 2
    assert "no denoiser for method 'baseline'; it has: ['decrop']" in capsys.readouterr().err


def test_certify_and_predict_commands_use_the_engine_on_new_images(run_dir, model, tmp_path, capsys):
    out, root, cfg, denoiser = run_dir
    main(["export", "--run", str(out), "--out", str(tmp_path / "smoothed.pt2")])
    capsys.readouterr()
    args = ["--model", str(tmp_path / "smoothed.pt2"), "--images", str(root / "test"), "--n", "200"]
    assert main(["certify", *args, "--n0", "20", "--out", str(tmp_path / "rows.tsv")]) == 0
    lines = (tmp_path / "rows.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "samples", "class", "file"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[-1] for r in rows] == ["a/0006.png", "a/0007.png", "c/0008.png", "c/0009.png"]
    # the same rows as the engine on the eager composition: one certification engine, one seed per image
    images = [(read_image(root / "test" / r[-1]), int(r[1])) for r in rows]
    eager = smoothed_model(copy.deepcopy(model), copy.deepcopy(denoiser))  # a copy: it converts to channels_last
    expected = certify_indices(eager, images, range(4), CertifyConfig(n0=20, n=200, alpha=0.001, batch_size=1000),
                               num_classes=3, sigma=0.5, seed=0)
    assert [(int(r[2]), float(r[3])) for r in rows] == [(e.predict, e.radius) for e in expected]
    assert "certify: 4 images under sigma=0.5" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    for r in rows[:2]:
        (flat / Path(r[-1]).name).write_bytes((root / "test" / r[-1]).read_bytes())
    assert main(["predict", "--model", str(tmp_path / "smoothed.pt2"), "--images", str(flat), "--n", "200"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split("\t") == ["idx", "label", "predict", "correct", "time", "samples", "class", "file"]
    assert all(line.split("\t")[1] == "-1" and line.split("\t")[3] == "-1" for line in printed[1:])  # unlabelled


def test_new_images_may_be_in_folders_named_by_class_index(run_dir, tmp_path, capsys):
    out, root, cfg, denoiser = run_dir
    main(["export", "--run", str(out), "--out", str(tmp_path / "smoothed.pt2")])
    smoothed = load_smoothed(tmp_path / "smoothed.pt2")
    by_name = read_new_images(root / "test", smoothed)
    shutil.copytree(root / "test" / "a", tmp_path / "by_index" / "0")  # as a training folder with classes.txt is
    shutil.copytree(root / "test" / "c", tmp_path / "by_index" / "2")
    by_index = read_new_images(tmp_path / "by_index", smoothed)
    assert by_index[2].tolist() == by_name[2].tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(by_index[1], by_name[1])
    shutil.copytree(root / "test" / "a", tmp_path / "by_index" / "3")  # the model has classes 0..2
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "smoothed.pt2"), "--images", str(tmp_path / "by_index")]) == 2
    err = capsys.readouterr().err
    assert "is neither a class of the model's classes ['a', 'b', 'c'] nor a class index 0..2" in err
    assert "Traceback" not in err


def test_a_program_without_sigma_is_refused(model, tmp_path, capsys):
    _export(model, tmp_path / "plain.pt2")
    make_folder(tmp_path / "img", {"x": {"": 1}})
    assert main(["certify", "--model", str(tmp_path / "plain.pt2"), "--images", str(tmp_path / "img" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "no sigma in its metadata" in err and "decrop export" in err


def test_a_torchscript_classifier_is_exported_with_a_dynamic_batch(run_dir, model, files, tmp_path):
    out, root, cfg, denoiser = run_dir
    legacy = tmp_path / "run"
    legacy.mkdir()
    (legacy / "config.yaml").write_text((out / "config.yaml").read_text().replace(
        "source: export", "source: torchscript").replace(str(files["export"]), str(files["torchscript"])))
    (legacy / "denoiser_decrop.pt").write_bytes((out / "denoiser_decrop.pt").read_bytes())
    assert main(["export", "--run", str(legacy), "--out", str(tmp_path / "ts.pt2")]) == 0
    smoothed = load_smoothed(tmp_path / "ts.pt2")
    assert smoothed.meta["config"]["classifier.source"] == "torchscript"
    for batch in (1, 6):
        x = torch.rand(batch, 1, 16, 16)
        torch.testing.assert_close(smoothed.module(x), model(denoiser(x)))


def test_a_sweep_trial_is_exported_from_its_storage_folder(run_dir, tmp_path, capsys):
    out, _, _, _ = run_dir
    storage = tmp_path / "quick-study"
    (storage / "denoisers").mkdir(parents=True)
    (storage / "denoisers" / "abc123.pt").write_bytes((out / "denoiser_decrop.pt").read_bytes())
    args = ["export", "--trial", "abc123", "--storage", str(storage), "--out", str(tmp_path / "t.pt2")]
    assert main(args) == 2
    assert "pass --config with the trial's config.yaml" in capsys.readouterr().err
    (storage / "denoisers" / "abc123.yaml").write_text((out / "config.yaml").read_text())
    assert main(args) == 0 and load_smoothed(tmp_path / "t.pt2").sigma == 0.5


# --------------------------------------------------------------------- folder + exported model == built-in

TINY = ["train.epochs=1", "train.adam_epochs=1", "data.test_every=1000", "data.val_size=10", "certify.val_images=5",
        "certify.n0=20", "certify.n=100", "certify.batch_size=100", "denoiser.depth=3", "denoiser.width=8",
        "decrop.stage2_epochs=1", "decrop.attack_steps=2", "decrop.interp_steps=2", "methods=[baseline, decrop]",
        "data.val_source=holdout", "device=cpu", "classifier.epochs=1"]


def _write_split(folder: Path, images, labels, indices):
    for idx in indices:  # named by dataset index: the folder keeps the dataset's order
        sub = folder / f"{int(labels[idx])}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{int(idx):05d}.png").write_bytes(
            encode_png(images[idx].mul(255).round().to(torch.uint8)).numpy().tobytes())


def test_folder_and_exported_classifier_reproduce_the_builtin_run(tmp_path, single_thread):
    """The same images, weights and seed through data.dataset=folder + classifier.source=export give the same
    certification rows as the built-in Fashion-MNIST path, for the classifier alone, the baseline and DE-CROP."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST} (scripts/setup.sh installs it)")
    builtin = load_config(REPO / "configs/quick.yaml", [*TINY, f"cache_dir={tmp_path / 'cache'}",
                                                        f"data.root={tmp_path / 'data'}", "data.percent=0.2"])
    train_x, train_y = as_tensors(load_dataset("fashion_mnist", tmp_path / "data", train=True))
    test_x, test_y = as_tensors(load_dataset("fashion_mnist", tmp_path / "data", train=False))
    # A classifier trained briefly, put where the built-in run finds it: the "pretrained" model of both paths.
    torch.manual_seed(0)
    model = build_classifier("fashion_mnist", "small_cnn")
    train_classifier(model, train_x[:2000], train_y[:2000], builtin.classifier, image_size=28)
    save_checkpoint(classifier_path(builtin), model, {"kind": "classifier", "dataset": "fashion_mnist",
                                                      "arch": "small_cnn", "key": classifier_key(builtin), "epochs": 1})
    _export(model.eval(), tmp_path / "classifier.pt2", shape=(1, 28, 28))
    run_experiment(builtin, tmp_path / "builtin", log=_quiet)

    subset = subset_for(builtin, train_y)  # the images the built-in run drew (training and held-out)
    _write_split(tmp_path / "folder" / "train", train_x, train_y, subset)
    _write_split(tmp_path / "folder" / "test", test_x, test_y, np.arange(len(test_y)))
    folder = load_config(REPO / "configs/quick.yaml", [
        *TINY, f"cache_dir={tmp_path / 'cache'}", "data.dataset=folder", f"data.root={tmp_path / 'folder'}",
        "data.percent=100", "classifier.source=export", f"classifier.path={tmp_path / 'classifier.pt2'}",
        "classifier.feature_layer=body"])
    run_experiment(folder, tmp_path / "folder-run", log=_quiet)
    # the exported classifier on the built-in dataset: the same classifier, clean accuracy and all
    exported = prepare(load_config(REPO / "configs/quick.yaml", [
        *TINY, f"cache_dir={tmp_path / 'cache'}", f"data.root={tmp_path / 'data'}", "data.percent=0.2",
        "classifier.source=export", f"classifier.path={tmp_path / 'classifier.pt2'}"]), log=_quiet)
    assert isinstance(exported.classifier, UserClassifier)

    for method in ("none", "baseline", "decrop"):
        ours, theirs = (read_rows(tmp_path / run / f"certify_{method}.tsv") for run in ("folder-run", "builtin"))
        assert len(ours) == 10
        assert [(r.idx, r.label, r.predict, r.radius, r.correct) for r in ours] == \
               [(r.idx, r.label, r.predict, r.radius, r.correct) for r in theirs], method
    reference = json.loads((tmp_path / "builtin" / "run.json").read_text())
    assert exported.clean_accuracy == reference["clean_accuracy"]
    budget = json.loads((tmp_path / "folder-run" / "run.json").read_text())["budget"]
    assert budget["train_images"] == len(subset) - 10 and budget["classifier_sha256"] != json.loads(
        (tmp_path / "builtin" / "run.json").read_text())["budget"]["classifier_sha256"]
