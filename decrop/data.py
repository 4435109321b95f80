"""Datasets, limited-data subsets and augmentation policies.

DE-CROP (Nayak et al., WACV 2023) trains a denoiser on k% of the training split. This module loads the image
datasets (images as float tensors in [0, 1]; normalisation lives inside the classifier), draws the stratified,
seeded subsets and persists them so that the baseline and DE-CROP see exactly the same images, picks validation
and test images, and builds the augmentation policies 0-3 that apply one random spatial transform to ``x``,
``x_boundary`` and ``x_interp`` of a sample alike.

Fashion-MNIST is the offline default (Debian's ``dataset-fashion-mnist``); CIFAR-10 is downloaded by torchvision
where the internet is reachable, or read from an extracted ``cifar-10-python.tar.gz``. Files are never trusted:
CIFAR-10's pickles are read without running code and Fashion-MNIST's IDX files are checked against their headers
(``decrop.datafiles``); a bad extracted copy is extracted again from its source. A user's own images come
from a folder (``data.dataset=folder``: `decrop.folders`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms, tv_tensors
from torchvision.datasets.utils import extract_archive
from torchvision.transforms import v2

from decrop.datafiles import (CIFAR10_MD5, BadDatasetFile, check_cifar_batch, check_cifar_meta, idx_count,
                              idx_problem, md5sum, read_cifar_pickle)
from decrop.errors import DatasetNotFoundError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``mean``/``std`` are per channel, for the classifier's normalisation layer."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", channels=1, image_size=28, num_classes=10, mean=(0.2860,), std=(0.3530,),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetInfo(
        name="cifar10", channels=3, image_size=32, num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        classes=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
    ),
}

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "DECROP_FASHION_MNIST_DIR"
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name``; unknown names fail with the list of valid ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------------- loading

def load_dataset(name: str, root: str | Path, train: bool, download: bool = False) -> Dataset:
    """Load a torchvision dataset whose items are ``(image, label)``.

    ``image`` is a float32 tensor (C, H, W) in [0, 1] on the CPU, ``label`` an int. ``root`` is the data folder
    from the config; ``download`` (config key ``data.download``) lets torchvision fetch missing files.
    Raises :class:`DatasetNotFoundError` when the files are absent and cannot be obtained offline.
    """
    dataset_info(name)
    root = Path(root)
    # Classic ToTensor returns plain tensors (v2's ToImage returns tv_tensors.Image, a subclass that would leak
    # into every downstream op); it is also what as_tensors' fast path reproduces.
    to_tensor = transforms.ToTensor()
    load = _load_fashion_mnist if name == "fashion_mnist" else _load_cifar10
    try:
        return load(root, train, download, to_tensor)
    except DatasetNotFoundError:
        raise
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError; torchvision's mirrors a RuntimeError
        if not download:
            raise
        reason = str(getattr(err, "reason", None) or err).strip().splitlines()
        raise DatasetNotFoundError(
            f"{name} could not be downloaded into {root} ({type(err).__name__}: {reason[0][:200] if reason else ''}): "
            f"this machine seems offline. Copy the dataset's files there from a machine with internet, or "
            f"{_offline_fix(name)}") from None


def _offline_fix(name: str) -> str:
    if name == "fashion_mnist":
        return (f"install Debian's package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR}) and set "
                f"data.download=false")
    return (f"extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into the data root and "
            f"set data.download=false")


def _load_fashion_mnist(root: Path, train: bool, download: bool, to_tensor: Any) -> Dataset:
    _prepare_fashion_mnist(root / "FashionMNIST" / "raw",
                           Path(os.environ.get(FASHION_MNIST_DIR_ENV, DEBIAN_FASHION_MNIST_DIR)), download)
    return datasets.FashionMNIST(str(root), train=train, transform=to_tensor, download=download)


def _fashion_mnist_fix(source: Path) -> str:
    if source == Path(DEBIAN_FASHION_MNIST_DIR):
        return (f"reinstall Debian's package (`sudo apt-get install --reinstall dataset-fashion-mnist`, files go "
                f"to {DEBIAN_FASHION_MNIST_DIR})")
    return (f"put intact copies of the four original *.gz files into {source}, or unset {FASHION_MNIST_DIR_ENV} "
            f"to use Debian's package dataset-fashion-mnist")


def _prepare_fashion_mnist(raw: Path, source: Path, download: bool) -> None:
    """Make ``raw`` hold the four uncompressed IDX files, each complete (:func:`decrop.datafiles.idx_problem`).

    torchvision's FashionMNIST only checks that the raw files exist, so a bad copy would be trusted forever. A
    copy that is missing, bad, or older than its ``<source>/<name>.gz`` is extracted again from the source; with
    no source, a bad copy is deleted for torchvision to download (``download``), else it is an error naming it.
    """
    problems = {name: idx_problem(raw / name, _idx_kind(name)) for name in _FASHION_MNIST_FILES}
    sources = {name: source / f"{name}.gz" for name in _FASHION_MNIST_FILES}
    if not download and not any(p.is_file() for p in [*sources.values(), *(raw / n for n in _FASHION_MNIST_FILES)]):
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: neither {raw} nor {source} holds the IDX files "
            f"({', '.join(_FASHION_MNIST_FILES)}). Either install Debian's package dataset-fashion-mnist "
            f"(`sudo apt-get install dataset-fashion-mnist`, files go to {DEBIAN_FASHION_MNIST_DIR}), "
            f"or set {FASHION_MNIST_DIR_ENV} to a folder holding the four *.gz files, or enable download "
            f"(config key `data.download=true`) on a machine with internet."
        )
    for name in _FASHION_MNIST_FILES:
        target, gz = raw / name, sources[name]
        stale = gz.is_file() and target.is_file() and gz.stat().st_mtime > target.stat().st_mtime
        if problems[name] is None and not stale:
            continue
        if gz.is_file():
            _extract_gz_file(gz, raw, name, _fashion_mnist_fix(source))
        elif download:
            target.unlink(missing_ok=True)  # torchvision downloads what is missing, checking its md5
        else:
            raise DatasetNotFoundError(
                f"Fashion-MNIST file {target} is unusable: {problems[name]}, and {gz} does not exist to extract "
                f"it again. Delete {target}, then {_fashion_mnist_fix(source)}, or set {FASHION_MNIST_DIR_ENV} "
                f"to a folder holding the four *.gz files, or enable download (`data.download=true`).")
    for split in ("train", "t10k"):  # images and labels of one split must come from the same release
        images, labels = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
        if images.is_file() and labels.is_file() and idx_count(images) != idx_count(labels):
            raise DatasetNotFoundError(
                f"Fashion-MNIST files disagree: {images} has {idx_count(images)} images, {labels} "
                f"{idx_count(labels)} labels. Delete {raw}, then {_fashion_mnist_fix(source)}.")


def _idx_kind(name: str) -> str:
    return "images" if "-images-" in name else "labels"


def _extract_gz_file(gz: Path, dest: Path, name: str, fix: str) -> None:
    """Decompress ``gz`` to ``dest/<name>``, validated before it replaces what was there.

    The file is decompressed into a private temporary folder on the same filesystem, checked with
    :func:`decrop.datafiles.idx_problem`, and moved into place with an atomic ``os.replace``: an interrupted
    extraction leaves nothing behind, and concurrent workers doing the same each use their own folder (the last
    rename wins with identical content). A corrupt or truncated source is a DatasetNotFoundError naming it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=dest)
    try:
        try:
            extract_archive(str(gz), tmp)
        except (EOFError, OSError, zlib.error) as err:  # truncated gzip, bad CRC, garbage
            raise DatasetNotFoundError(f"Fashion-MNIST source {gz} is corrupt ({err}); {fix}.") from None
        problem = idx_problem(Path(tmp) / name, _idx_kind(name))
        if problem is not None:
            raise DatasetNotFoundError(f"Fashion-MNIST source {gz} is bad: decompressed, {problem}; {fix}.")
        os.replace(os.path.join(tmp, name), dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _LocalCIFAR10(datasets.CIFAR10):
    """CIFAR-10 read from an existing ``cifar-10-batches-py`` folder through :mod:`decrop.datafiles`.

    torchvision verifies each file's md5 before ``pickle.load``, which rejects any file but the official ones
    (e.g. the small synthetic batches the tests write in CIFAR's own format). Here no file is unpickled with code
    execution: :func:`decrop.datafiles.read_cifar_pickle` resolves only numpy's array reconstruction, and the
    batches are checked for shape, type and labels. ``official`` says whether every file read also matches
    torchvision's published md5. BadDatasetFile for a file that is not a CIFAR-10 file.
    """

    def __init__(self, root: str, train: bool, transform: Any) -> None:
        super(datasets.CIFAR10, self).__init__(root, transform=transform)  # VisionDataset: CIFAR10's loads pickles
        self.train = train
        folder = Path(root) / self.base_folder
        names = [name for name, _ in (self.train_list if train else self.test_list)]
        self.official = all(md5sum(folder / n) == CIFAR10_MD5[n] for n in [*names, self.meta["filename"]])
        data, self.targets = [], []
        for name in names:
            images, labels = check_cifar_batch(folder / name, read_cifar_pickle(folder / name))
            data.append(images)
            self.targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision's
        meta = folder / self.meta["filename"]
        self.classes = check_cifar_meta(meta, read_cifar_pickle(meta))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _load_cifar10(root: Path, train: bool, download: bool, to_tensor: Any) -> Dataset:
    if download:
        return datasets.CIFAR10(str(root), train=train, transform=to_tensor, download=True)
    folder = root / _CIFAR10_FOLDER
    missing = [f for f in _CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Either enable download (config key "
            f"`data.download=true`) on a machine with internet, or extract cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {root} so that {folder} exists."
        )
    try:
        return _LocalCIFAR10(str(root), train=train, transform=to_tensor)
    except BadDatasetFile as err:
        raise DatasetNotFoundError(
            f"CIFAR-10 files in {folder} are unreadable or corrupted, or not CIFAR-10's: {err} (nothing in the "
            f"file was run). Delete {folder} and extract the official cifar-10-python.tar.gz (md5 "
            f"{datasets.CIFAR10.tgz_md5}) into {root} again, or enable download (`data.download=true`) on a "
            f"machine with internet."
        ) from None


def as_tensors(dataset: Dataset, indices: Sequence[int] | np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """Materialise (a subset of) a dataset as ``(images (N, C, H, W) float32 in [0, 1], labels (N,) int64)``.

    For the datasets of :func:`load_dataset` the stored arrays are converted directly (the whole of
    Fashion-MNIST in well under a second); any other dataset is iterated item by item.
    """
    idx = None if indices is None else torch.as_tensor(np.asarray(indices, dtype=np.int64))
    # The fast path is only equivalent to __getitem__ when the transform is a plain ToTensor (or absent).
    plain = getattr(dataset, "transform", None) is None or isinstance(dataset.transform, transforms.ToTensor)
    if plain and isinstance(dataset, datasets.FashionMNIST):  # uint8 tensor (N, H, W)
        data, labels = dataset.data, torch.as_tensor(dataset.targets)
        images = data.unsqueeze(1)
    elif plain and isinstance(dataset, datasets.CIFAR10):  # numpy uint8 (N, H, W, C)
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)
        labels = torch.as_tensor(dataset.targets)
    else:
        order = range(len(dataset)) if idx is None else idx.tolist()
        items = [dataset[i] for i in order]
        to_image = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        xs = [x if isinstance(x, Tensor) else to_image(x) for x, _ in items]
        images = torch.stack([x.as_subclass(Tensor).float() for x in xs])
        return images, torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
    if idx is not None:
        images, labels = images[idx], labels[idx]
    return images.contiguous().float().div_(255.0), labels.to(torch.int64)


# ------------------------------------------------------------------------------------- subsets and indices

def _labels_array(labels: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def stratified_subset(labels: Tensor | np.ndarray | Sequence[int], percent: float, seed: int) -> np.ndarray:
    """Sorted indices of ``percent`` % of the images, drawn per class without replacement.

    Class c contributes ``max(1, round(percent / 100 * count_c))`` images (Python's round, half to even), so
    every class is present even at 1% of a tiny set. Same ``labels``/``percent``/``seed`` -> same indices.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    y = _labels_array(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):  # sorted classes: the draw order, hence the result, is reproducible
        members = np.flatnonzero(y == c)
        k = max(1, round(percent / 100 * len(members)))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def validation_indices(labels: Tensor | np.ndarray | Sequence[int], exclude: Sequence[int] | np.ndarray,
                       size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` images disjoint from ``exclude`` (e.g. the limited subset), stratified.

    Each class gets a share proportional to its count among the remaining images (largest-remainder rounding,
    so a balanced dataset gives per-class counts differing by at most one). Raises ValueError if fewer than
    ``size`` images remain.
    """
    y = _labels_array(labels)
    pool = np.setdiff1d(np.arange(len(y)), np.asarray(exclude, dtype=np.int64))
    if size < 0 or size > len(pool):
        raise ValueError(f"cannot draw {size} validation images: only {len(pool)} images lie outside the "
                         f"{len(y) - len(pool)} excluded ones")
    classes, counts = np.unique(y[pool], return_counts=True)
    quota = size * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    # Give the leftover images to the classes with the largest fractional share (stable: ties by class order).
    # Those fractions are > 0, so floor + 1 never exceeds a class's count.
    leftover = size - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(pool[y[pool] == c], size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def unlabeled_indices(num_images: int, exclude: Sequence[int] | np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` images drawn uniformly, without replacement, from ``range(num_images)`` minus
    ``exclude``, without looking at a single label: validation images beyond the limited subset whose labels
    stay outside the data budget (``data.val_source=unlabeled``). Raises ValueError if fewer remain."""
    pool = np.setdiff1d(np.arange(num_images), np.asarray(exclude, dtype=np.int64))
    if size < 0 or size > len(pool):
        raise ValueError(f"cannot draw {size} validation images: only {len(pool)} images lie outside the "
                         f"{num_images - len(pool)} excluded ones")
    return np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))


def test_indices(num_images: int, every: int, max_count: int | None = None) -> np.ndarray:
    """Indices 0, every, 2*every, ... below ``num_images`` (Cohen et al. certify every 20th test image),
    at most ``max_count`` of them."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_count is not None and max_count < 0:
        raise ValueError(f"max_count must be >= 0 or None, got {max_count}")
    return np.arange(0, num_images, every, dtype=np.int64)[:max_count]


test_indices.__test__ = False  # its name starts with "test": keep pytest from collecting it when imported


def save_indices(path: str | Path, indices: Sequence[int] | np.ndarray, **meta: Any) -> None:
    """Write ``indices`` and the settings that produced them (``dataset``, ``percent``, ``seed``, ...) as JSON.

    The file is written to a temporary name and renamed, so readers never see a half-written subset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "indices": [int(i) for i in np.asarray(indices).reshape(-1)]}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_indices(path: str | Path, **expected_meta: Any) -> np.ndarray:
    """Read indices saved by :func:`save_indices`, checking that each given meta value matches the file's.

    A mismatch (or a missing key) raises ValueError naming the key and the file, so a subset drawn for one
    setting is never silently reused for another.
    """
    with open(path) as f:
        payload = json.load(f)
    stored = payload.get("meta", {})
    for key, value in expected_meta.items():
        expected = json.loads(json.dumps(value))  # compare as stored: tuples become lists, etc.
        if key not in stored:
            raise ValueError(f"{path}: saved indices have no meta key {key!r} (expected {expected!r})")
        if stored[key] != expected:
            raise ValueError(f"{path}: saved indices have {key}={stored[key]!r}, expected {expected!r}")
    return np.asarray(payload["indices"], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- augmentation

def augmentation_policy(policy: int, image_size: int) -> v2.Transform:
    """The paper's augmentation policy as a ``torchvision.transforms.v2`` transform.

    0: identity; 1: random crop (padding image_size // 8) + horizontal flip; 2: one of {hflip, vflip, crop,
    affine(rotate 10 degrees, translate (0.25, 0.5))} chosen at random; 3: all four of policy 2 in sequence.
    Every flip applies with probability 0.5, as the paper's supplementary states (so under policy 3 an image is
    flipped horizontally, vertically, both or neither, a quarter of the time each).

    Called as ``t(a, b, c)`` with each input wrapped in ``torchvision.tv_tensors.Image``, v2 samples the random
    parameters once and applies them to every input, which keeps ``x``, ``x_boundary`` and ``x_interp`` of a
    sample aligned. The wrapping matters: given plain tensors, v2 transforms only the first and passes the rest
    through unchanged.
    """
    pad = image_size // 8
    spatial = [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
        v2.RandomCrop(image_size, padding=pad),
        v2.RandomAffine(degrees=10, translate=(0.25, 0.5)),
    ]
    if policy == 0:
        return v2.Identity()
    if policy == 1:
        return v2.Compose([v2.RandomCrop(image_size, padding=pad), v2.RandomHorizontalFlip()])
    if policy == 2:
        return v2.RandomChoice(spatial)
    if policy == 3:
        return v2.Compose(spatial)
    raise ValueError(f"unknown augmentation policy {policy!r}; valid policies: 0, 1, 2, 3")


class AugmentedTensorDataset(Dataset):
    """Aligned image tensors (e.g. ``x``, ``x_boundary``, ``x_interp``) with labels and a shared transform.

    ``images`` is a sequence of tensors (N, C, H, W) in [0, 1]; ``labels`` is (N,). Item ``i`` is
    ``(tuple of augmented images (C, H, W), int label)``, the same random transform applied to each image (a
    one-element tuple when one tensor is given). Outputs are plain tensors on the inputs' device.
    """

    def __init__(self, images: Sequence[Tensor], labels: Tensor, transform: v2.Transform | None = None) -> None:
        self.images = tuple(images)
        if not self.images:
            raise ValueError("images must hold at least one tensor")
        n = len(labels)
        for k, t in enumerate(self.images):
            if t.dim() != 4 or len(t) != n:
                raise ValueError(f"images[{k}] has shape {tuple(t.shape)}; expected (N, C, H, W) with N={n}")
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, ...], int]:
        xs = tuple(tv_tensors.Image(t[i]) for t in self.images)
        if self.transform is not None:
            out = self.transform(*xs)
            xs = out if len(xs) > 1 else (out,)  # v2 returns a bare output for a single input
        return tuple(x.as_subclass(Tensor) for x in xs), int(self.labels[i])
