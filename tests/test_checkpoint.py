import pytest
import torch
from torch import nn

from decrop.checkpoint import load_checkpoint, save_checkpoint
from decrop.errors import CheckpointError


def test_round_trip_and_meta(tmp_path):
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "m.pt", model, {"arch": "linear", "key": "abc"})
    other = nn.Linear(3, 2)
    meta = load_checkpoint(tmp_path / "m.pt", other, {"arch": "linear"})
    assert meta["key"] == "abc"
    assert torch.equal(other.weight, model.weight)


def test_corrupt_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.*delete it"):
        load_checkpoint(path, nn.Linear(3, 2))


def test_truncated_file_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", nn.Linear(30, 20), {"arch": "linear"})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, nn.Linear(30, 20))


def test_mismatched_meta_and_architecture_leave_the_model_untouched(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", nn.Linear(3, 2), {"arch": "linear", "dataset": "cifar10"})
    model = nn.Linear(3, 2)
    before = model.weight.clone()
    with pytest.raises(CheckpointError, match="dataset='cifar10'.*dataset='fashion_mnist'"):
        load_checkpoint(path, model, {"dataset": "fashion_mnist"})
    with pytest.raises(CheckpointError, match="shape differs"):
        load_checkpoint(path, nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path, nn.Sequential(nn.Linear(3, 2)))
    assert torch.equal(model.weight, before)


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"meta": {}, "state_dict": {}, "obj": nn.Linear(1, 1)}, path)  # a module is a pickled class
    with pytest.raises(CheckpointError):
        load_checkpoint(path, nn.Linear(1, 1))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", nn.Linear(1, 1))
