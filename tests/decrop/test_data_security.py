"""Dataset files are not trusted: a CIFAR-10 pickle carrying code is refused without running it, and bad
Fashion-MNIST files (truncated, corrupt, from another release) are named with their fix and never kept."""

import gzip
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from decrop import data, datafiles
from decrop.data import as_tensors, load_dataset
from decrop.errors import DatasetNotFoundError
from test_data import _dump_py2, _synthetic_cifar, _synthetic_fmnist_dir, _write_idx_gz  # tests/decrop/test_data.py

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ CIFAR-10


class _Payload:
    """Pickles as a call of `func(*args)`: what a tampered batch file does when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
        # inside an otherwise valid batch: the code would run while the dict is being built
        "nested in a batch": {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3],
                              b"batch_label": _Payload(os.system, f"touch {marker}")},
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.call", "nested in a batch"])
@pytest.mark.parametrize("target", ["data_batch_1", "test_batch", "batches.meta"])
def test_cifar_pickle_with_code_is_refused_without_running_it(tmp_path, kind, target):
    _synthetic_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / target
    with open(path, "wb") as f:
        pickle.dump(_payloads(marker)[kind], f, protocol=2)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", tmp_path, train=target == "data_batch_1")
    assert not marker.exists(), "the payload ran"
    message = str(err.value)
    assert str(path) in message and "nothing in the file was run" in message
    assert "extract the official cifar-10-python.tar.gz" in message and "data.download=true" in message
    if kind != "nested in a batch":
        assert "which no CIFAR-10 batch does" in message


def test_the_cli_refuses_a_tampered_batch(tmp_path, capsys):
    """The reported path: `python -m decrop run --set data.dataset=cifar10` on a folder with a tampered batch."""
    from decrop import cli

    _synthetic_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump(_Payload(os.system, f"touch {marker}"), f, protocol=2)
    quick = Path(__file__).resolve().parents[2] / "configs" / "quick.yaml"
    code = cli.main(["run", "--config", str(quick), "--set", "data.dataset=cifar10", "--set",
                     f"data.root={tmp_path / 'data'}", "--out", str(tmp_path / "out")])
    assert code == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 files in") and "posix.system" in err and "Traceback" not in err


def test_only_numpy_array_reconstruction_is_allowed():
    assert set(datafiles._CIFAR_GLOBALS) == {("numpy.core.multiarray", "_reconstruct"),
                                             ("numpy._core.multiarray", "_reconstruct"),
                                             ("numpy", "ndarray"), ("numpy", "dtype")}


@pytest.mark.parametrize("content, problem", [
    ([1, 2, 3], "holds a list, not a dict"),
    ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0, 1, 2, 3]}, "should be a uint8 array"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, "4 images but 3 labels"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "list of ints in 0..9"),
])
def test_cifar_batches_are_checked(tmp_path, content, problem):
    _synthetic_cifar(tmp_path)
    _dump_py2(content, tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DatasetNotFoundError, match=problem):
        load_dataset("cifar10", tmp_path, train=False)


def test_synthetic_files_load_and_official_md5_is_recognised(tmp_path, monkeypatch):
    _synthetic_cifar(tmp_path)
    test = load_dataset("cifar10", tmp_path, train=False)
    assert len(test) == 3 and not test.official  # CIFAR's format, not CIFAR's files
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(data, "CIFAR10_MD5", {n: datafiles.md5sum(folder / n) for n in data._CIFAR10_FILES})
    assert load_dataset("cifar10", tmp_path, train=False).official


# ------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    """A source folder of synthetic gzipped IDX files standing in for Debian's package (so errors say how to
    reinstall it), and a data root."""
    arrays = _synthetic_fmnist_dir(tmp_path / "src")
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "src"))
    return tmp_path / "src", tmp_path / "root", arrays


def _raw(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _images(root: Path, train: bool = False) -> torch.Tensor:
    return as_tensors(load_dataset("fashion_mnist", root, train=train))[0]


def test_truncated_copy_is_extracted_again_from_the_source(fmnist):
    src, root, arrays = fmnist
    _images(root)
    copy = _raw(root) / "t10k-images-idx3-ubyte"
    copy.write_bytes(copy.read_bytes()[:1000])  # an interrupted copy
    images = _images(root)
    assert torch.equal(images, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).unsqueeze(1).float() / 255)
    assert datafiles.idx_problem(copy, "images") is None


def test_truncated_copy_without_source_is_named_with_the_fix(fmnist, monkeypatch, tmp_path):
    src, root, _ = fmnist
    _images(root)
    copy = _raw(root) / "t10k-labels-idx1-ubyte"
    copy.write_bytes(copy.read_bytes()[:-2])
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(empty))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", root, train=False)
    message = str(err.value)
    assert f"{copy} is unusable: it is truncated: 11 bytes, its header (5) needs 13" in message
    assert f"Delete {copy}" in message and "data.download=true" in message


def test_bad_source_is_named_and_a_fixed_source_is_used(fmnist):
    """The reported failure: a truncated source file. Its error names it and the reinstall; once the source is
    fixed, loading works (the earlier failure left no bad copy behind to be trusted)."""
    src, root, arrays = fmnist
    gz = src / "t10k-images-idx3-ubyte.gz"
    good = gz.read_bytes()
    gz.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", root, train=False)
    assert f"source {gz} is corrupt" in str(err.value)
    assert "apt-get install --reinstall dataset-fashion-mnist" in str(err.value)
    assert not (_raw(root) / "t10k-images-idx3-ubyte").exists()
    assert sorted(p.name for p in _raw(root).iterdir() if p.name.startswith(".")) == []  # no temp leftovers

    with gzip.open(gz, "wb") as f:  # complete gzip, but the IDX inside is cut short
        f.write(gzip.decompress(good)[:-100])
    with pytest.raises(DatasetNotFoundError, match=r"is bad: decompressed, it is truncated"):
        load_dataset("fashion_mnist", root, train=False)

    gz.write_bytes(good)  # `apt-get install --reinstall`
    assert torch.equal(_images(root),
                       torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).unsqueeze(1).float() / 255)


def test_a_newer_source_replaces_an_older_copy(fmnist):
    src, root, _ = fmnist
    _images(root)
    newer = np.full((5, 28, 28), 7, np.uint8)
    gz = src / "t10k-images-idx3-ubyte.gz"
    _write_idx_gz(gz, newer)
    later = time.time() + 10
    os.utime(gz, (later, later))
    assert torch.equal(_images(root), torch.from_numpy(newer).unsqueeze(1).float() / 255)


def test_images_and_labels_of_different_releases_are_refused(fmnist):
    src, root, _ = fmnist
    _write_idx_gz(src / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8))  # 6 labels, 5 images
    with pytest.raises(DatasetNotFoundError, match="has 5 images, .* 6 labels"):
        load_dataset("fashion_mnist", root, train=False)


@pytest.mark.parametrize("content, kind, problem", [
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5), "images", "magic number is 0x00000801"),
    (b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 32, 32)) + bytes(2048), "images",
     "images are 32x32, not 28x28"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(6), "labels", "longer than its header says"),
    (b"\x00\x00", "labels", "too few for an IDX header"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5), "labels", None),
])
def test_idx_problem(tmp_path, content, kind, problem):
    path = tmp_path / "file"
    path.write_bytes(content)
    found = datafiles.idx_problem(path, kind)
    assert (found is None) if problem is None else (problem in found)


def test_datafiles_imports_no_tracking_library():
    code = "import sys, decrop.datafiles; assert not {'ray', 'mlflow', 'optuna'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
