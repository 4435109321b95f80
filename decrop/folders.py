"""A user's own images: ``data.dataset=folder`` (``train/<class>/``, ``test/<class>/``, optional ``unlabeled/``).

PNG and JPEG only, decoded by torchvision's own readers (EXIF orientation applied), as float tensors in [0, 1].
Every file is part of the user's data budget, so a file that is not an image is refused, not skipped; class
folders follow the model's output order when `classes` is given, sorted names otherwise. A ``classes.txt`` (one
name per line) or ``classes.json`` (a list) beside ``train/`` gives the names in the model's output order; class
folders are then named by a class's name or its index (``0``, ``1``, ...), for names that cannot be folder
names (Fashion-MNIST's ``T-shirt/top``). Each image's size is read from its header before it is decoded, and
images beyond `MAX_IMAGE_PIXELS` are refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from .data import DatasetInfo
from .datafiles import BadDatasetFile, ImageTooLarge, image_header, read_class_names
from .errors import FolderDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The largest image a folder may hold, width x height as its header declares it (checked before decoding):
# 4096x4096, 64 MiB as RGBA bytes, 256 MiB as the float32 tensor it becomes. A denoiser trains on whole images,
# so a larger one is almost certainly a mistake (a photo left among thumbnails, or a forged header).
MAX_IMAGE_PIXELS = 4096 * 4096
CLASS_FILES = ("classes.txt", "classes.json")  # beside train/: the class names in the classifier's output order
# (C, H, W) the images must have, None where any size goes; or a function giving it, asked only when they disagree
Shape = Sequence[int | None] | Callable[[], Sequence[int | None] | None] | None


@dataclass(frozen=True)
class FolderData:
    """A user's image folder (``data.dataset=folder``) read for one run.

    ``train``/``test`` images are (N, C, H, W) float32 in [0, 1] on the CPU with int64 labels, the class of each
    its index in ``info.classes``; ``unlabeled`` lists the files of ``unlabeled/`` (read on demand: only the
    validation images drawn from it are decoded); ``train_sha256`` fingerprints train/ (names, classes, bytes).
    Row i of a split is its i-th file in `scan_class_folders` order.
    """

    info: DatasetInfo
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    train_files: tuple[Path, ...]
    test_files: tuple[Path, ...]
    unlabeled: tuple[Path, ...]
    train_sha256: str


def scan_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by relative path. Hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints``) are ignored; any other non-PNG/JPEG file is refused: every file of a data folder is an
    image of the user's budget, so one that cannot be read is reported rather than silently dropped."""
    files, others = [], []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or path.is_dir():
            continue
        (files if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    if others:
        raise FolderDataError(f"{others[0]} is not a PNG or JPEG image ({len(others)} such file(s) under {folder}); "
                              f"non-image files are refused, not skipped, because each file is part of your "
                              f"data: convert it to PNG/JPEG or move it out of {folder}")
    return files


def class_list(root: Path, classes: Sequence[str] = ()) -> tuple[tuple[str, ...], Path | None]:
    """(class names in the classifier's output order, the file that listed them or None) of a folder dataset:
    ``root/classes.txt`` or ``root/classes.json`` (`decrop.datafiles.read_class_names`) when there is one, else
    `classes` (``data.classes``; empty: the folder names, sorted, decided by `scan_class_folders`).
    FolderDataError for both files at once, a bad file, or ``data.classes`` disagreeing with the file."""
    found = [root / name for name in CLASS_FILES if (root / name).is_file()]
    if not found:
        return tuple(classes), None
    if len(found) > 1:
        raise FolderDataError(f"{found[0]} and {found[1]} both list the classes: keep one of them")
    try:
        names = read_class_names(found[0])
    except BadDatasetFile as err:
        raise FolderDataError(f"{err}: list one class name per line (classes.json: a list of names) in the order "
                              f"of the classifier's outputs") from None
    if classes and tuple(classes) != names:
        raise FolderDataError(f"data.classes {list(classes)} differs from {found[0]} {list(names)}: both give the "
                              f"classifier's output order; keep one (remove data.classes, or the file)")
    return names, found[0]


def _class_index(folder: Path, classes: tuple[str, ...], listed_in: Path | str | None) -> int:
    """The class (index into `classes`) of the class folder `folder`: its name, or, when the classes have a fixed
    order (`listed_in`: the class file, or the words for another source such as a saved model), also its index."""
    name = folder.name
    number = int(name) if listed_in is not None and name.isascii() and name.isdecimal() else None
    if name in classes:
        k = classes.index(name)
        if number is not None and number != k and number < len(classes):
            raise FolderDataError(f"class folder {folder} is ambiguous: {listed_in} names class {k} {name!r} and "
                                  f"{name} is also the index of class {number} {classes[number]!r}; rename the "
                                  f"folder to {k} (the index of the class it holds)")
        return k
    if number is not None and number < len(classes):
        return number
    if isinstance(listed_in, Path):
        raise FolderDataError(f"class folder {folder} is neither a class of {listed_in} nor a class index 0.."
                              f"{len(classes) - 1}: name it by its class's index (or name) in {listed_in.name}, or "
                              f"add the class to the file")
    if listed_in is not None:
        raise FolderDataError(f"class folder {folder} is neither a class of {listed_in} {list(classes)} nor a class "
                              f"index 0..{len(classes) - 1}: rename the folder to its class's name or index")
    raise FolderDataError(f"class folder {folder} is not one of the classes {list(classes)}: "
                          f"rename the folder, or for a run add the class to data.classes")


def scan_class_folders(folder: Path, classes: Sequence[str] = (), listed_in: Path | str | None = None
                       ) -> tuple[list[Path], Tensor, tuple[str, ...]]:
    """``(files, labels (N,) int64, classes)`` of a folder of class sub-folders ``folder/<class>/*``.

    The label of a file is the index of its folder's name in `classes` (the classifier's output order; empty:
    the folder names sorted, which then become `classes`). With `listed_in` (the ``classes.txt`` that listed
    `classes`, see `class_list`, or the words naming another fixed source, such as a saved model's class list) a
    folder may instead be named by the class's index, ``0`` to ``len(classes)-1``.
    Files are ordered by their path inside the class folder, then by the folder's name, so that files named by a
    dataset's index keep that dataset's order. Raises FolderDataError for a missing or empty folder, an image
    file outside a class folder, an empty class folder, a folder not in `classes`, two folders of one class, or
    a non-image file.
    """
    if not folder.is_dir():
        raise FolderDataError(f"{folder} does not exist: a folder dataset needs {folder}/<class>/<image>.png")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        raise FolderDataError(f"{loose[0]} lies directly in {folder}: images go into one sub-folder per class, "
                              f"{folder}/<class>/{loose[0].name}")
    if not names:
        raise FolderDataError(f"{folder} has no class folders: put each class's images in {folder}/<class>/")
    classes = tuple(classes) or tuple(names)
    label_of: dict[str, int] = {}
    for name in names:
        label = _class_index(folder / name, classes, listed_in)
        other = next((n for n, k in label_of.items() if k == label), None)
        if other is not None:
            raise FolderDataError(f"class folders {folder / other} and {folder / name} both hold class {label} "
                                  f"{classes[label]!r}: merge them into one")
        label_of[name] = label
    entries = []
    for name in names:
        found = scan_images(folder / name)
        if not found:
            raise FolderDataError(f"class folder {folder / name} holds no PNG or JPEG image: add images or "
                                  f"remove the folder")
        entries += [(path.relative_to(folder / name).as_posix(), name, path) for path in found]
    entries.sort(key=lambda e: (e[0], e[1]))
    return [e[2] for e in entries], torch.tensor([label_of[e[1]] for e in entries]), classes


def read_image(path: Path) -> Tensor:
    """One PNG or JPEG as float32 (C, H, W) in [0, 1] (channels as stored: 1 gray, 3 RGB, 4 RGBA), decoded by
    torchvision's own readers with the EXIF orientation applied; FolderDataError if it cannot be decoded, or if
    its header declares more than `MAX_IMAGE_PIXELS` pixels (then nothing of it is decoded)."""
    try:
        image_header(path, MAX_IMAGE_PIXELS)
    except ImageTooLarge as err:
        raise FolderDataError(f"{err} ({_side(MAX_IMAGE_PIXELS)}) in a folder dataset, checked before decoding: "
                              f"resize it to your classifier's input size or remove it") from None
    except BadDatasetFile as err:
        raise FolderDataError(f"{err}, so it cannot be decoded: replace or remove the file") from None
    try:
        image = decode_image(str(path), mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:
        raise FolderDataError(f"{path} cannot be decoded as PNG/JPEG ({str(err).splitlines()[0][:120]}): "
                              f"replace or remove the file") from None
    # x / 255 as as_tensors computes it (to_dtype multiplies by 1/255, which differs in the last bit): a dataset
    # written to PNG reads back bit for bit. 16-bit PNGs come as uint16 and are scaled by 65535.
    return image.to(torch.float32).div_(torch.iinfo(image.dtype).max)


def _side(pixels: int) -> str:
    side = int(pixels ** 0.5)
    return f"{side}x{side}" if side * side == pixels else f"{pixels} pixels"


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"


def check_shapes(files: Sequence[Path], shapes: Sequence[tuple[int, ...]], shape: Shape = None
                 ) -> tuple[int, ...]:
    """The one (C, H, W) that the images `files` of shapes `shapes` share; FolderDataError naming the files that
    differ. The norm is `shape` when it is given (None entries: any size); else, only when the images disagree,
    the classifier's input shape if `shape` is a function that returns it, else the most common shape (among
    those the classifier takes): one odd image is blamed whether or not it sorts first."""
    if not shapes:
        return ()
    fixed = shape is not None and not callable(shape)
    if not fixed and len(set(shapes)) == 1:
        return shapes[0]
    model = shape if fixed else shape() if callable(shape) else None
    model = tuple(model) if model is not None else None

    def fits(s: tuple[int, ...]) -> bool:
        return model is None or (len(s) == len(model) and all(m is None or m == x for m, x in zip(model, s)))

    fitting = [s for s in shapes if fits(s)]
    if fixed:
        odd = [i for i, s in enumerate(shapes) if not fits(s)]
        if not odd:
            return shapes[0] if len(set(shapes)) == 1 else check_shapes(files, shapes)
        rule = f"not {_show(model)} as expected"
    else:
        counts = Counter(fitting or shapes)
        norm = counts.most_common(1)[0][0]
        odd = [i for i, s in enumerate(shapes) if s != norm]
        share = f"{counts[norm]} of the {len(shapes)} images"
        if model is None:
            rule = f"but {share} are {norm}"
        elif not fitting:
            rule = f"but {share} are {norm} (and none fits the classifier's input {_show(model)})"
        elif None in model:
            rule = f"but the classifier takes {_show(model)} and {share} are {norm}"
        else:
            rule = f"but the classifier takes {norm}, the shape of {share}"
    named = ", ".join(str(files[i]) for i in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
    fix = "convert/resize it to match" if len(odd) == 1 else f"convert/resize them to match; {len(odd)} files: {named}"
    raise FolderDataError(f"{files[odd[0]]} has shape (C, H, W) = {shapes[odd[0]]}, {rule}: every image must "
                          f"have one size and number of channels ({fix})")


def read_images(files: Sequence[Path], shape: Shape = None) -> Tensor:
    """Images (N, C, H, W) float32 in [0, 1] of `files`, which must all have one shape (`check_shapes`:
    `shape` (C, H, W) when given, else the classifier's shape or the most common one); FolderDataError naming
    the files that differ."""
    images = [read_image(path) for path in files]
    check_shapes(files, [tuple(image.shape) for image in images], shape)
    return torch.stack(images) if images else torch.empty(0)


def _fingerprint(folder: Path, files: Sequence[Path], labels: Tensor) -> str:
    digest = hashlib.sha256()
    for path, label in zip(files, labels.tolist()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{label}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_image_folder(root: str | Path, classes: Sequence[str] = (), shape: Shape = None) -> FolderData:
    """Read a folder dataset: ``root/train/<class>/*`` (the labelled images: all of them are used),
    ``root/test/<class>/*`` (certified for reporting) and the file list of the optional ``root/unlabeled/``.

    Test classes must be training classes; all images must share one square size and channel count (the
    augmentation policies crop squares): the classifier's input shape when `shape` (or the function it is,
    asked only when the images disagree) gives it, else the most common one, so that the message names the odd
    files (`check_shapes`). Classes from ``root/classes.txt`` or ``classes.json`` when there is one (`class_list`),
    else `classes` as in `scan_class_folders`. Raises FolderDataError.
    """
    root = Path(root)
    classes, listed_in = class_list(root, classes)
    train_files, train_labels, classes = scan_class_folders(root / "train", classes, listed_in)
    trained = {classes[label] for label in train_labels.tolist()}
    if (root / "test").is_dir():
        for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                label = _class_index(folder, classes, listed_in)
            except FolderDataError:
                label = None
            if label is None or classes[label] not in trained:
                raise FolderDataError(f"class folder {folder} has no counterpart in {root / 'train'}: the denoiser "
                                      f"would never see that class; add training images for it or remove it from "
                                      f"test/")
    test_files, test_labels, _ = scan_class_folders(root / "test", classes, listed_in)
    train = [read_image(path) for path in train_files]
    test = [read_image(path) for path in test_files]
    files = [*train_files, *test_files]
    channels, height, width = check_shapes(files, [tuple(image.shape) for image in [*train, *test]], shape)
    if height != width:
        raise FolderDataError(f"{train_files[0]} is {height}x{width}: folder datasets need square images (the "
                              f"augmentation policies crop squares); pad or crop them to square")
    train, test = torch.stack(train), torch.stack(test)
    unlabeled = tuple(scan_images(root / "unlabeled")) if (root / "unlabeled").is_dir() else ()
    # mean/std only normalise a surrogate of the black-box setting: a generic 0.5 for images in [0, 1].
    info = DatasetInfo(name="folder", channels=channels, image_size=height, num_classes=len(classes),
                       mean=(0.5,), std=(0.5,), classes=classes)
    return FolderData(info, train, train_labels, test, test_labels, tuple(train_files), tuple(test_files),
                      unlabeled, _fingerprint(root / "train", train_files, train_labels))


def folder_info(root: str | Path, classes: Sequence[str] = ()) -> DatasetInfo:
    """The `DatasetInfo` of a folder dataset from its class folders (and class file) and its first training image
    only (what `load_image_folder` would report, without reading every image)."""
    classes, listed_in = class_list(Path(root), classes)
    files, _, classes = scan_class_folders(Path(root) / "train", classes, listed_in)
    channels, height, _ = read_image(files[0]).shape
    return DatasetInfo(name="folder", channels=channels, image_size=height, num_classes=len(classes),
                       mean=(0.5,), std=(0.5,), classes=classes)
