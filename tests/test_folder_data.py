"""Folder datasets (data.dataset=folder): layout, order, decoding, and every bad input failing before compute."""

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from decrop.config import from_dict, from_flat, load_config, to_dict, to_flat
from decrop.folders import folder_info, load_image_folder, read_image, scan_class_folders, scan_images
from decrop.errors import ConfigError, FolderDataError
from decrop.models import create_model
from decrop.pipeline import prepare


def write_image(path: Path, image: torch.Tensor, kind: str = "png") -> None:
    """`image` (C, H, W) uint8 as a PNG or JPEG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(image) if kind == "png" else encode_jpeg(image, quality=95)
    path.write_bytes(data.numpy().tobytes())


def make_folder(root: Path, counts: dict[str, dict[str, int]], shape=(1, 16, 16), seed: int = 0) -> Path:
    """root/<split>/<class>/<k>.png with counts[split][class] random images (unlabeled: split -> {"": n})."""
    g = torch.Generator().manual_seed(seed)
    k = 0
    for split, classes in counts.items():
        for name, n in classes.items():
            for _ in range(n):
                write_image(root / split / name / f"{k:04d}.png", torch.randint(0, 256, shape, generator=g,
                                                                                  dtype=torch.uint8))
                k += 1
    return root


@pytest.fixture()
def exported(tmp_path):
    """A small_cnn for 1x16x16 images with 3 classes, exported (dynamic batch) in eval mode."""
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=3).eval()
    program = torch.export.export(model, (torch.rand(2, 1, 16, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    return path


def folder_config(root: Path, model: Path, *extra: str):
    return load_config(None, ["data.dataset=folder", f"data.root={root}", "data.percent=100", "data.val_size=4",
                              "certify.val_images=2", "data.test_every=1", "classifier.source=export",
                              f"classifier.path={model}", "device=cpu", *extra])


def test_order_follows_file_names_then_class_and_labels_follow_the_class_list(tmp_path):
    for name, cls in (("0003.png", "b"), ("0001.png", "a"), ("0002.png", "b"), ("0001.png", "c")):
        write_image(tmp_path / "train" / cls / name, torch.zeros(1, 4, 4, dtype=torch.uint8))
    files, labels, classes = scan_class_folders(tmp_path / "train")
    assert classes == ("a", "b", "c")
    assert [f.relative_to(tmp_path / "train").as_posix() for f in files] == ["a/0001.png", "c/0001.png", "b/0002.png",
                                                                             "b/0003.png"]
    assert labels.tolist() == [0, 2, 1, 1]
    _, labels, classes = scan_class_folders(tmp_path / "train", ("c", "b", "a", "d"))  # the model's output order
    assert classes == ("c", "b", "a", "d") and labels.tolist() == [2, 0, 1, 1]
    with pytest.raises(FolderDataError, match=r"train/c is not one of the classes \['a', 'b'\]"):
        scan_class_folders(tmp_path / "train", ("a", "b"))


def test_png_is_read_exactly_and_jpeg_through_torchvision(tmp_path):
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    write_image(tmp_path / "x.png", image)
    assert torch.equal(read_image(tmp_path / "x.png"), image.float() / 255)
    flat = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    write_image(tmp_path / "y.JPEG", flat, "jpeg")
    decoded = read_image(tmp_path / "y.JPEG")
    assert decoded.shape == (3, 8, 8) and (decoded - 100 / 255).abs().max() < 3 / 255


def test_load_image_folder_reads_train_test_and_lists_unlabeled(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "test": {"dog": 2}, "unlabeled": {"": 4}})
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden files are never data
    data = load_image_folder(root)
    assert data.train_images.shape == (5, 1, 16, 16) and data.train_labels.tolist() == [0, 0, 0, 1, 1]
    assert data.test_labels.tolist() == [1, 1] and len(data.unlabeled) == 4
    assert 0 <= data.train_images.min() and data.train_images.max() <= 1
    assert (data.info.channels, data.info.image_size, data.info.classes) == (1, 16, ("cat", "dog"))
    assert folder_info(root) == data.info
    other = make_folder(tmp_path / "other", {"train": {"cat": 3, "dog": 2}, "test": {"dog": 2}}, seed=1)
    assert load_image_folder(other).train_sha256 != data.train_sha256  # same layout, other images


@pytest.mark.parametrize("case, message", [
    ("empty class", "holds no PNG or JPEG image"),
    ("test-only class", "has no counterpart"),
    ("non-image file", "notes.txt is not a PNG or JPEG image"),
    ("corrupt png", "cannot be decoded"),
    ("loose file", "lies directly in"),
    ("mixed sizes", "every image must have one size"),
    ("not square", "square"),
    ("no train folder", "does not exist"),
])
def test_bad_folders_fail_naming_the_file_and_the_fix(tmp_path, case, message):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    if case == "empty class":
        (root / "train" / "c").mkdir()
    elif case == "test-only class":
        make_folder(root, {"test": {"z": 1}})
    elif case == "non-image file":
        (root / "train" / "a" / "notes.txt").write_text("labels by hand")
    elif case == "corrupt png":
        (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    elif case == "loose file":
        write_image(root / "train" / "stray.png", torch.zeros(1, 16, 16, dtype=torch.uint8))
    elif case == "mixed sizes":
        write_image(root / "test" / "a" / "big.png", torch.zeros(1, 20, 20, dtype=torch.uint8))
    elif case == "not square":
        root = make_folder(tmp_path / "wide", {"train": {"a": 1}, "test": {"a": 1}}, shape=(1, 8, 12))
    else:
        root = tmp_path / "nothing"
    with pytest.raises(FolderDataError, match=message):
        load_image_folder(root)


def test_a_non_image_file_is_refused_not_skipped(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "sub" / "b.webp").write_bytes(b"")
    with pytest.raises(FolderDataError, match="b.webp.*refused, not skipped"):
        scan_images(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["data.percent=1"], "data.percent=100"),
    (["classifier.source=train", "classifier.path="], "needs your pretrained classifier"),
    (["classifier.path="], "set classifier.path"),
    (["data.classes=[a, a]"], "lists a class twice"),
    (["certify.fold_bn=true"], "certified as written"),
])
def test_folder_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        folder_config(tmp_path, tmp_path / "m.pt2", *overrides)


def test_paths_are_made_absolute_where_the_config_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = folder_config(Path("images"), Path("model.pt2"), "data.classes=[b, a]")
    assert cfg.data.root == str(tmp_path / "images") and cfg.classifier.path == str(tmp_path / "model.pt2")
    monkeypatch.chdir("/")  # a Ray trial rebuilds the flat config elsewhere: the same config
    assert from_flat(to_flat(cfg)) == cfg and from_dict(to_dict(cfg)) == cfg


def test_unlabeled_validation_without_unlabeled_folder_names_the_holdout_fix(tmp_path, exported):
    root = make_folder(tmp_path / "img", {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 1}})
    with pytest.raises(FolderDataError, match="data.val_source=holdout"):
        prepare(folder_config(root, exported), log=lambda _: None)
    make_folder(root, {"unlabeled": {"": 2}})
    with pytest.raises(ConfigError, match="data.val_size"):  # 4 asked, 2 there
        prepare(folder_config(root, exported), log=lambda _: None)


def test_prepare_on_a_folder_uses_every_training_image(tmp_path, exported):
    root = make_folder(tmp_path / "img", {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 1, "c": 1},
                                          "unlabeled": {"": 6}})
    lines = []
    prep = prepare(folder_config(root, exported), log=lines.append)
    assert len(prep.train_images) == 9 and len(prep.val_images) == 4 and list(prep.test_indices) == [0, 1]
    assert prep.budget["train_images"] == 9 and prep.budget["labels_outside"] == 0
    assert len(prep.budget["classifier_sha256"]) == 64 and prep.budget["classifier_sha256"][:16] in lines[0]
    holdout = prepare(folder_config(root, exported, "data.val_source=holdout", "data.val_size=3"), log=lambda _: None)
    assert len(holdout.train_images) == 6 and sorted(holdout.val_indices.tolist() + holdout.train_indices.tolist()) \
        == list(range(9))
