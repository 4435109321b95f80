"""Tests for decrop.data: loaders on real and synthetic files, subsets, index files and augmentation."""

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from decrop import data
from decrop.data import (
    DATASETS,
    AugmentedTensorDataset,
    DatasetNotFoundError,
    as_tensors,
    augmentation_policy,
    dataset_info,
    load_dataset,
    load_indices,
    save_indices,
    stratified_subset,
    test_indices,
    unlabeled_indices,
    validation_indices,
)

HAVE_DEBIAN_FMNIST = all(
    os.path.isfile(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, f"{f}.gz")) for f in data._FASHION_MNIST_FILES
)


def test_dataset_info_and_unknown_name():
    assert dataset_info("cifar10").channels == 3 and dataset_info("cifar10").image_size == 32
    info = dataset_info("fashion_mnist")
    assert (info.channels, info.image_size, info.num_classes, info.mean) == (1, 28, 10, (0.2860,))
    assert all(len(i.classes) == i.num_classes and len(i.mean) == len(i.std) == i.channels for i in DATASETS.values())
    with pytest.raises(ValueError, match="cifar10.*fashion_mnist"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="valid names"):
        load_dataset("svhn", "/nonexistent", train=True)


# ------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST,
                    reason=f"Debian package dataset-fashion-mnist not installed ({data.DEBIAN_FASHION_MNIST_DIR})")
def test_fashion_mnist_from_debian_files(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    train = load_dataset("fashion_mnist", tmp_path, train=True)
    test = load_dataset("fashion_mnist", tmp_path, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= x.min() and x.max() <= 1.0
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data._FASHION_MNIST_FILES)  # no temp leftovers

    images, labels = as_tensors(test)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() == 1.0
    assert torch.bincount(labels).tolist() == [1000] * 10
    for i in (0, 1234, 9999):  # the fast path equals what the dataset itself returns
        assert torch.equal(images[i], test[i][0]) and labels[i] == test[i][1]
    sub_x, sub_y = as_tensors(test, indices=[5, 7])
    assert torch.equal(sub_x, images[[5, 7]]) and torch.equal(sub_y, labels[[5, 7]])

    # 1% of the real training split: 60 images of each class.
    subset = stratified_subset(train.targets, 1.0, seed=0)
    assert np.bincount(train.targets.numpy()[subset]).tolist() == [60] * 10


def test_fashion_mnist_missing_names_debian_package(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(empty))
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist", tmp_path / "root", train=True)
    assert isinstance(err.value, FileNotFoundError)
    assert data.FASHION_MNIST_DIR_ENV in str(err.value) and "data.download=true" in str(err.value)


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the format of the original MNIST/Fashion-MNIST files."""
    magic = struct.pack(">HBB", 0, 0x08, array.ndim)  # 0x08: unsigned byte
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + dims + array.astype(np.uint8).tobytes())


def _synthetic_fmnist_dir(folder: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(12, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5], dtype=np.uint8),
    }
    folder.mkdir()
    for name, array in arrays.items():
        _write_idx_gz(folder / f"{name}.gz", array)
    return arrays


def test_fashion_mnist_from_env_dir(tmp_path, monkeypatch):
    arrays = _synthetic_fmnist_dir(tmp_path / "src")
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path / "src"))
    test = load_dataset("fashion_mnist", tmp_path / "root", train=False)
    assert len(test) == 5 and [test[i][1] for i in range(5)] == [3, 1, 4, 1, 5]
    x, _ = test[2]
    assert x.shape == (1, 28, 28)
    assert x[0, 7, 11].item() == pytest.approx(arrays["t10k-images-idx3-ubyte"][2, 7, 11] / 255)
    images, _ = as_tensors(load_dataset("fashion_mnist", tmp_path / "root", train=True))
    assert torch.equal(images, torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1).float() / 255)


def test_interrupted_extraction_leaves_no_file(tmp_path, monkeypatch):
    _synthetic_fmnist_dir(tmp_path / "src")
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path / "src"))

    def interrupted(from_path, to_path):  # writes half a file, then dies
        Path(to_path, Path(from_path).stem).write_bytes(b"\x00\x00")
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "extract_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("fashion_mnist", tmp_path / "root", train=True)
    assert list((tmp_path / "root" / "FashionMNIST" / "raw").iterdir()) == []


# ------------------------------------------------------------------------------------------------ CIFAR-10

class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str``, as the original CIFAR batches were written by cPickle.

    Such files give ``b'data'`` keys under ``encoding='bytes'`` and ``'data'`` under torchvision's
    ``encoding='latin1'``; Python 3's own pickling of bytes would not round-trip to ``'data'``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _synthetic_cifar(root: Path) -> dict[str, dict]:
    """Write a tiny CIFAR-10 (4 images per train batch, 3 test images) into ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 3 if name == "test_batch" else 4
        batches[name] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [(4 * i + j) % 10 for j in range(n)]}
    batches["test_batch"][b"data"][1, 2 * 1024 + 5 * 32 + 17] = 200  # channel 2 (blue), row 5, column 17
    for name, batch in batches.items():
        _dump_py2(batch, folder / name)
    _dump_py2({b"label_names": [c.encode() for c in DATASETS["cifar10"].classes]}, folder / "batches.meta")
    return batches


def test_cifar10_synthetic_files_load(tmp_path):
    batches = _synthetic_cifar(tmp_path)
    train = load_dataset("cifar10", tmp_path, train=True)
    test = load_dataset("cifar10", tmp_path, train=False)
    assert (len(train), len(test)) == (20, 3)
    assert train.classes == list(DATASETS["cifar10"].classes)
    x, y = test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == batches["test_batch"][b"labels"][1]
    assert x[2, 5, 17].item() == pytest.approx(200 / 255)
    images, labels = as_tensors(train)
    expected = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(expected).float() / 255)
    assert labels.tolist() == sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    for i in (0, 13):
        assert torch.equal(images[i], train[i][0])


def test_cifar10_missing_or_corrupt(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz") as err:
        load_dataset("cifar10", tmp_path, train=True)
    assert "data.download=true" in str(err.value)
    _synthetic_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by an interrupted copy
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        load_dataset("cifar10", tmp_path, train=False)


# -------------------------------------------------------------------------------------- subsets and indices

def test_stratified_subset_counts_and_seed():
    labels = np.repeat([0, 1, 2, 3], [100, 50, 7, 1])
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]
    idx = stratified_subset(torch.as_tensor(labels), 10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 5, 1, 1]  # round(0.7) = 1; max(1, round(0.1)) = 1
    assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
    assert np.array_equal(idx, stratified_subset(labels, 10, seed=0))
    assert not np.array_equal(idx, stratified_subset(labels, 10, seed=1))
    assert np.array_equal(stratified_subset(labels, 100, seed=3), np.arange(len(labels)))
    for bad in (0, -1, 100.5):
        with pytest.raises(ValueError, match="percent"):
            stratified_subset(labels, bad, seed=0)


def test_validation_indices_disjoint_and_stratified():
    labels = np.tile(np.arange(10), 100)
    train = stratified_subset(labels, 10, seed=0)
    val = validation_indices(labels, exclude=train, size=55, seed=0)
    assert len(val) == 55 and len(np.unique(val)) == 55 and np.all(np.diff(val) > 0)
    assert not set(val) & set(train)
    assert sorted(np.bincount(labels[val]).tolist()) == [5] * 5 + [6] * 5
    assert np.array_equal(val, validation_indices(labels, train, 55, seed=0))

    imbalanced = np.repeat([0, 1], [300, 100])
    counts = np.bincount(imbalanced[validation_indices(imbalanced, [], size=40, seed=2)])
    assert counts.tolist() == [30, 10]
    with pytest.raises(ValueError, match="only 900"):
        validation_indices(labels, train, size=901, seed=0)


def test_unlabeled_indices_read_no_label_and_avoid_the_subset():
    subset = np.arange(0, 1000, 10)
    val = unlabeled_indices(1000, exclude=subset, size=300, seed=3)  # the signature takes no labels at all
    assert len(val) == 300 and len(np.unique(val)) == 300 and np.all(np.diff(val) > 0)
    assert not set(val) & set(subset) and val.max() < 1000
    assert np.array_equal(val, unlabeled_indices(1000, subset, 300, seed=3))
    assert not np.array_equal(val, unlabeled_indices(1000, subset, 300, seed=4))
    with pytest.raises(ValueError, match="only 900"):
        unlabeled_indices(1000, subset, size=901, seed=0)


def test_test_indices():
    idx = test_indices(10000, every=20)
    assert len(idx) == 500 and idx[:3].tolist() == [0, 20, 40] and idx[-1] == 9980
    assert test_indices(10000, 20, max_count=100).tolist() == list(range(0, 2000, 20))
    assert test_indices(5, 1).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="every"):
        test_indices(100, every=0)


def test_save_load_indices_round_trip_and_mismatch(tmp_path):
    path = tmp_path / "subsets" / "fmnist_1pct.json"
    idx = np.array([3, 17, 42])
    save_indices(path, idx, dataset="fashion_mnist", percent=1.0, seed=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fmnist_1pct.json"]  # no temp leftovers
    assert json.loads(path.read_text())["meta"] == {"dataset": "fashion_mnist", "percent": 1.0, "seed": 0}
    loaded = load_indices(path, dataset="fashion_mnist", percent=1.0, seed=0)
    assert loaded.dtype == np.int64 and loaded.tolist() == [3, 17, 42]
    assert load_indices(path).tolist() == [3, 17, 42]
    with pytest.raises(ValueError, match="seed") as err:
        load_indices(path, dataset="fashion_mnist", seed=1)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="attack"):
        load_indices(path, attack="pgd")


# ---------------------------------------------------------------------------------------------- augmentation

def test_augmentation_same_transform_for_all_images():
    from torchvision.tv_tensors import Image

    x = torch.rand(1, 28, 28)
    for policy in (1, 2, 3):
        t = augmentation_policy(policy, image_size=28)
        changed = 0
        for _ in range(20):
            a, b = t(Image(x), Image(x.clone()))
            assert a.shape == b.shape == x.shape
            assert torch.equal(a, b)
            changed += not torch.equal(a, x)
        assert changed > 0, f"policy {policy} never changed the image"
    assert torch.equal(augmentation_policy(0, 32)(Image(x)), x)
    with pytest.raises(ValueError, match="0, 1, 2, 3"):
        augmentation_policy(4, 28)


def _flip_frequencies(transform, x: torch.Tensor, draws: int) -> dict[str, float]:
    """How often `transform`'s output equals x, its horizontal mirror, its vertical mirror, or both mirrors."""
    from torchvision.tv_tensors import Image

    targets = {"none": x, "h": x.flip(-1), "v": x.flip(-2), "hv": x.flip(-1).flip(-2)}
    counts = dict.fromkeys(targets, 0)
    for _ in range(draws):
        out = transform(Image(x)).as_subclass(torch.Tensor)
        for name, target in targets.items():
            counts[name] += torch.equal(out, target)
    return {name: c / draws for name, c in counts.items()}


def test_flips_apply_half_the_time():
    """The supplementary: random horizontal / vertical flip 'with probability 0.5'. Policy 2 picks one of four
    transforms and a picked flip applies half the time, so the output is exactly the horizontal (vertical)
    mirror 1/8 of the time; under policy 3 both flips run in sequence, each half the time, independently."""
    torch.manual_seed(0)
    x = torch.rand(1, 16, 16)
    draws = 4000
    tol = 4 * (0.125 * 0.875 / draws) ** 0.5  # 4 standard errors of a frequency near 1/8
    freq = _flip_frequencies(augmentation_policy(2, 16), x, draws)
    assert abs(freq["h"] - 0.125) < tol and abs(freq["v"] - 0.125) < tol
    assert freq["hv"] == 0  # policy 2 applies one transform, never both flips
    policy3 = augmentation_policy(3, 16)
    flips = v2.Compose(policy3.transforms[:2])  # the flips of policy 3, before its crop and affine
    assert [type(t) for t in flips.transforms] == [v2.RandomHorizontalFlip, v2.RandomVerticalFlip]
    freq = _flip_frequencies(flips, x, draws)
    tol = 4 * (0.25 * 0.75 / draws) ** 0.5
    assert all(abs(freq[k] - 0.25) < tol for k in ("none", "h", "v", "hv")), freq


def test_augmented_tensor_dataset():
    x = torch.rand(6, 3, 32, 32)
    labels = torch.arange(6)
    ds = AugmentedTensorDataset((x, x.clone(), 0.5 * x), labels, transform=augmentation_policy(3, 32))
    assert len(ds) == 6
    for i in range(6):
        (a, b, c), y = ds[i]
        assert y == i and a.shape == (3, 32, 32) and type(a) is torch.Tensor
        # Same flips/crop/affine (nearest interpolation, zero fill) on each: the relation between inputs survives.
        assert torch.equal(a, b) and torch.equal(c, 0.5 * a)
    (only,), y = AugmentedTensorDataset([x], labels)[2]
    assert torch.equal(only, x[2]) and y == 2
    batch, ys = next(iter(DataLoader(ds, batch_size=4)))
    assert len(batch) == 3 and batch[0].shape == (4, 3, 32, 32) and ys.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="images\\[1\\]"):
        AugmentedTensorDataset((x, x[:5]), labels)
