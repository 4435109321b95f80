"""A user's own images: ``data.dataset=folder`` (``train/<class>/``, ``test/<class>/``, optional ``unlabeled/``).

PNG and JPEG only, decoded by torchvision's own readers (EXIF orientation applied), as float tensors in [0, 1].
Every file is part of the user's data budget, so a file that is not an image is refused, not skipped; class
folders follow the model's output order when `classes` is given, sorted names otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from .data import DatasetInfo
from .errors import FolderDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def scan_class_folders(folder: Path, classes: Sequence[str] = ()) -> tuple[list[Path], Tensor, tuple[str, ...]]:
    """``(files, labels (N,) int64, classes)`` of a folder of class sub-folders ``folder/<class>/*``.

    The label of a file is the index of its folder's name in `classes` (the classifier's output order; empty:
    the folder names sorted, which then become `classes`). Files are ordered by their path inside the class
    folder, then by the folder's name, so that files named by a dataset's index keep that dataset's order.
    Raises FolderDataError for a missing or empty folder, an image file outside a class folder, an empty class
    folder, a folder not in `classes`, or a non-image file.
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
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise FolderDataError(f"class folder {folder / unknown[0]} is not one of the classes {list(classes)}: "
                              f"rename the folder, or for a run add the class to data.classes")
    entries = []
    for name in names:
        found = scan_images(folder / name)
        if not found:
            raise FolderDataError(f"class folder {folder / name} holds no PNG or JPEG image: add images or "
                                  f"remove the folder")
        entries += [(path.relative_to(folder / name).as_posix(), name, path) for path in found]
    entries.sort(key=lambda e: (e[0], e[1]))
    return [e[2] for e in entries], torch.tensor([classes.index(e[1]) for e in entries]), classes


def read_image(path: Path) -> Tensor:
    """One PNG or JPEG as float32 (C, H, W) in [0, 1] (channels as stored: 1 gray, 3 RGB, 4 RGBA), decoded by
    torchvision's own readers with the EXIF orientation applied; FolderDataError if it cannot be decoded."""
    try:
        image = decode_image(str(path), mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:
        raise FolderDataError(f"{path} cannot be decoded as PNG/JPEG ({str(err).splitlines()[0][:120]}): "
                              f"replace or remove the file") from None
    # x / 255 as as_tensors computes it (to_dtype multiplies by 1/255, which differs in the last bit): a dataset
    # written to PNG reads back bit for bit. 16-bit PNGs come as uint16 and are scaled by 65535.
    return image.to(torch.float32).div_(torch.iinfo(image.dtype).max)


def read_images(files: Sequence[Path], shape: Sequence[int] | None = None) -> Tensor:
    """Images (N, C, H, W) float32 in [0, 1] of `files`, which must all have one shape (`shape`, when given:
    (C, H, W)); FolderDataError naming the first file that differs."""
    images = []
    for path in files:
        image = read_image(path)
        expected = tuple(shape) if shape is not None else tuple(images[0].shape) if images else None
        if expected is not None and tuple(image.shape) != expected:
            raise FolderDataError(f"{path} has shape (C, H, W) = {tuple(image.shape)}, the other images "
                                  f"{expected}: every image must have one size and number of channels "
                                  f"(convert/resize it to match)")
        images.append(image)
    return torch.stack(images) if images else torch.empty(0)


def _fingerprint(folder: Path, files: Sequence[Path], labels: Tensor) -> str:
    digest = hashlib.sha256()
    for path, label in zip(files, labels.tolist()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{label}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_image_folder(root: str | Path, classes: Sequence[str] = ()) -> FolderData:
    """Read a folder dataset: ``root/train/<class>/*`` (the labelled images: all of them are used),
    ``root/test/<class>/*`` (certified for reporting) and the file list of the optional ``root/unlabeled/``.

    Test classes must be training classes; all images must share one square size and channel count (the
    augmentation policies crop squares). `classes` as in `scan_class_folders`. Raises FolderDataError.
    """
    root = Path(root)
    train_files, train_labels, classes = scan_class_folders(root / "train", classes)
    trained = {classes[label] for label in train_labels.tolist()}
    if (root / "test").is_dir():
        for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name not in trained:
                raise FolderDataError(f"class folder {folder} has no counterpart {root / 'train' / folder.name}: "
                                      f"the denoiser would never see that class; add training images for it or "
                                      f"remove it from test/")
    test_files, test_labels, _ = scan_class_folders(root / "test", classes)
    train = read_images(train_files)
    channels, height, width = train.shape[1:]
    if height != width:
        raise FolderDataError(f"{train_files[0]} is {height}x{width}: folder datasets need square images (the "
                              f"augmentation policies crop squares); pad or crop them to square")
    test = read_images(test_files, train.shape[1:])
    unlabeled = tuple(scan_images(root / "unlabeled")) if (root / "unlabeled").is_dir() else ()
    # mean/std only normalise a surrogate of the black-box setting: a generic 0.5 for images in [0, 1].
    info = DatasetInfo(name="folder", channels=channels, image_size=height, num_classes=len(classes),
                       mean=(0.5,), std=(0.5,), classes=classes)
    return FolderData(info, train, train_labels, test, test_labels, tuple(train_files), tuple(test_files),
                      unlabeled, _fingerprint(root / "train", train_files, train_labels))


def folder_info(root: str | Path, classes: Sequence[str] = ()) -> DatasetInfo:
    """The `DatasetInfo` of a folder dataset from its class folders and its first training image only (what
    `load_image_folder` would report, without reading every image)."""
    files, _, classes = scan_class_folders(Path(root) / "train", classes)
    channels, height, _ = read_image(files[0]).shape
    return DatasetInfo(name="folder", channels=channels, image_size=height, num_classes=len(classes),
                       mean=(0.5,), std=(0.5,), classes=classes)
