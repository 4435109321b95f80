"""Folder datasets (data.dataset=folder): layout, order, decoding, and every bad input failing before compute."""

import re
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from decrop.config import from_dict, from_flat, load_config, to_dict, to_flat
from decrop.folders import folder_info, load_image_folder, read_image, scan_class_folders, scan_images
from decrop.errors import ConfigError, FolderDataError
from decrop.models import create_model
from decrop.prepare import prepare


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


# ---- issue 22, items 5 and 6: the odd image named, image size bounded before decoding, class-name files, and the
# folder profile

REPO = Path(__file__).resolve().parents[2]


def write_png_header(path: Path, width: int, height: int) -> None:
    """A small gray PNG whose header declares width x height (its few pixel bytes would not fill it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_the_odd_image_is_named_even_when_it_sorts_first(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 3, "b": 3}, "test": {"a": 2}})
    odd = root / "train" / "a" / "0000.png"  # the first file read
    write_image(odd, torch.zeros(1, 20, 20, dtype=torch.uint8))
    with pytest.raises(FolderDataError) as err:
        load_image_folder(root)
    message = str(err.value)
    assert message.startswith(f"{odd} has shape (C, H, W) = (1, 20, 20), but 7 of the 8 images are (1, 16, 16)")
    assert "0001.png" not in message and "every image must have one size" in message
    two = root / "test" / "a" / "0006.png"  # two odd files, one of them a test image: both named
    write_image(two, torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(FolderDataError, match=r"6 of the 8 images are \(1, 16, 16\).*2 files: .*0000.png, .*0006.png"):
        load_image_folder(root)


def test_the_classifier_input_shape_decides_which_images_are_odd(tmp_path, exported):
    """Most images are 20x20 but the classifier takes 1x16x16: the 20x20 ones are named, through `prepare`
    (which reads the exported program's input shape only because the images disagree)."""
    root = make_folder(tmp_path / "img", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1}})
    for k in range(9):
        write_image(root / "train" / "abc"[k % 3] / f"1{k:03d}.png", torch.zeros(1, 20, 20, dtype=torch.uint8))
    with pytest.raises(FolderDataError) as err:
        prepare(folder_config(root, exported, "data.val_source=holdout", "data.val_size=3"), log=lambda _: None)
    message = str(err.value)
    assert "but the classifier takes (1, 16, 16), the shape of 7 of the 16 images" in message
    assert "has shape (C, H, W) = (1, 20, 20)" in message and "9 files:" in message
    with pytest.raises(FolderDataError, match=r"9 of the 16 images are \(1, 20, 20\)"):  # no classifier known
        load_image_folder(root)
    with pytest.raises(FolderDataError, match=r"takes \(1, any, any\) and 9 of the 16"):  # dynamic H, W
        load_image_folder(root, shape=lambda: (1, None, None))


@pytest.mark.parametrize("side", [4097, 10_000, 15_000])  # beyond the limit; beyond PIL's warning; PIL's error
def test_an_image_beyond_the_size_limit_is_refused_from_its_header(tmp_path, monkeypatch, side):
    import decrop.folders

    root = make_folder(tmp_path, {"train": {"a": 2}, "test": {"a": 1}})
    bomb = root / "train" / "a" / "0001.png"
    write_png_header(bomb, side, side)
    assert bomb.stat().st_size < 1000

    def no_decoding(path, **kwargs):
        if path == str(bomb):
            raise AssertionError("the image was decoded")
        return decode(path, **kwargs)

    decode = decrop.folders.decode_image
    monkeypatch.setattr(decrop.folders, "decode_image", no_decoding)
    with pytest.raises(FolderDataError) as err:
        load_image_folder(root)
    message = str(err.value)
    assert message.startswith(f"{bomb} declares ") and f"{side * side} pixels" in message
    assert "(4096x4096)" in message and "resize it" in message and "\n" not in message


def test_an_image_at_the_size_limit_is_read(tmp_path):
    from PIL import Image

    from decrop.folders import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == 4096 * 4096
    path = tmp_path / "wide.png"
    Image.new("L", (MAX_IMAGE_PIXELS // 2048, 2048)).save(path)  # 8192x2048: the limit is a pixel count
    assert read_image(path).shape == (1, 2048, 8192)


FASHION = ["T-shirt/top", "Trouser", "Pullover"]


@pytest.mark.parametrize("listing", ["classes.txt", "classes.json"])
def test_a_class_file_names_classes_that_cannot_be_folder_names(tmp_path, listing):
    import json

    root = make_folder(tmp_path, {"train": {"0": 2, "Trouser": 2, "2": 1}, "test": {"0": 1, "Pullover": 1}})
    text = json.dumps(FASHION) if listing.endswith(".json") else "\n".join(FASHION) + "\n\n"
    (root / listing).write_text(text)
    data = load_image_folder(root)
    assert data.info.classes == tuple(FASHION) and data.info.num_classes == 3
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2]  # 0000-0001 in 0/, 0002-0003 in Trouser/, 0004 in 2/
    assert data.test_labels.tolist() == [0, 2]  # test/Pullover is named, test/0 numbered
    assert folder_info(root).classes == tuple(FASHION)
    cfg = folder_config(root, tmp_path / "m.pt2", f"data.classes={json.dumps(FASHION)}")
    assert load_image_folder(root, cfg.data.classes).info.classes == tuple(FASHION)  # the same list: fine


@pytest.mark.parametrize("case, message", [
    ("both files", "both list the classes: keep one"),
    ("class twice", "lists class 'Trouser' twice (line 2 and line 3)"),
    ("blank line", "line 2 is empty"),
    ("json not a list", "must hold a JSON list of class names"),
    ("not utf-8", "is not UTF-8 text"),
    ("index beyond", "train/7 is neither a class of"),
    ("unknown name", "train/Sandal is neither a class of"),
    ("two folders, one class", "both hold class 1 'Trouser': merge them"),
    ("ambiguous", "is ambiguous"),
    ("data.classes differs", "differs from"),
])
def test_bad_class_files_fail_naming_the_file_and_the_fix(tmp_path, case, message):
    root = make_folder(tmp_path, {"train": {"0": 1, "1": 1, "2": 1}, "test": {"0": 1}})
    (root / "classes.txt").write_text("\n".join(FASHION) + "\n")
    classes = ()
    if case == "both files":
        (root / "classes.json").write_text('["a", "b", "c"]')
    elif case == "class twice":
        (root / "classes.txt").write_text("T-shirt/top\nTrouser\nTrouser\n")
    elif case == "blank line":
        (root / "classes.txt").write_text("T-shirt/top\n\nPullover\n")
    elif case == "json not a list":
        (root / "classes.txt").unlink()
        (root / "classes.json").write_text('{"0": "T-shirt/top"}')
    elif case == "not utf-8":
        (root / "classes.txt").write_bytes(b"T-shirt/top\n\xff\xfe\n")
    elif case == "index beyond":
        make_folder(root, {"train": {"7": 1}})
    elif case == "unknown name":
        make_folder(root, {"train": {"Sandal": 1}})
    elif case == "two folders, one class":
        make_folder(root, {"train": {"Trouser": 1}})
    elif case == "ambiguous":  # a class named "1" at index 2: is folder 1 class 1 or class 2?
        (root / "classes.txt").write_text("T-shirt/top\nTrouser\n1\n")
        (root / "train" / "2").rename(root / "train" / "Pullover")
    else:
        classes = ("a", "b", "c")
    with pytest.raises(FolderDataError, match=re.escape(message)):
        load_image_folder(root, classes)


def test_the_folder_profile_runs_own_data_with_only_its_paths(tmp_path, exported):
    """configs/folder.yaml with the README's keys: no data.percent error, no missing-unlabeled/ error; the budget
    line states that all of train/ is the budget and how much of it is held out."""
    root = make_folder(tmp_path / "images", {"train": {"a": 25, "b": 25, "c": 25}, "test": {"a": 2, "b": 2}})
    cfg = load_config(REPO / "configs" / "folder.yaml", [f"data.root={root}", "classifier.source=export",
                                                         f"classifier.path={exported}",
                                                         f"cache_dir={tmp_path / 'cache'}", "device=cpu"])
    assert (cfg.data.dataset, cfg.data.percent, cfg.data.val_source) == ("folder", 100, "holdout")
    assert cfg.certify.val_images <= cfg.data.val_size
    lines = []
    prep = prepare(cfg, log=lines.append)
    held = cfg.data.val_size
    assert len(prep.train_images) == 75 - held and len(prep.val_images) == held and len(prep.test_indices) == 4
    budget = next(line for line in lines if line.startswith("budget: "))
    assert budget.startswith(f"budget: all 75 labelled images of {root}/train (data.percent=100): {75 - held} "
                             f"trained on, {held} held out for validation (holdout, their labels not read); labels "
                             f"read outside train/: 0; classifier: your export model {exported}, frozen")
    assert any(line.startswith(f"data: all 75 images of {root}/train (3 classes, 1x16x16), 4 certified") for line
               in lines)
    assert not (tmp_path / "cache").exists()  # a folder run draws no subset to cache


def test_the_folder_profile_paths_default_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "folder.yaml")
    assert cfg.data.root == str(tmp_path / "images") and cfg.classifier.path == str(tmp_path / "classifier.pt2")
    assert cfg.classifier.source == "export"


def test_the_unlabeled_budget_line_of_a_folder(tmp_path, exported):
    root = make_folder(tmp_path / "img", {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 1},
                                          "unlabeled": {"": 5}})
    lines = []
    prepare(folder_config(root, exported), log=lines.append)
    assert (f"budget: all 9 labelled images of {root}/train (data.percent=100): all trained on; 4 validation "
            f"images from unlabeled/ (labels not read)") in "\n".join(lines)
