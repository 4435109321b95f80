import pytest
import torch
from torch import nn

from decrop.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
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


class _RunsCode:
    """Pickled as a call of exec(code): an unrestricted unpickler runs `code` while it reads the file."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_pickled_objects_are_refused_by_weights_only(tmp_path, monkeypatch):
    """A checkpoint shaped exactly like a good one (keys meta and state_dict, weights that fit the model) whose
    metadata pickles a call of exec, and another that pickles a module object: both refused with CheckpointError
    before any of it runs. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes torch.load unrestricted unless its caller asks
    for weights_only=True itself (as torch < 2.6 always was), so only the loader's own flag passes this test."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ran = tmp_path / "code-ran"
    state = nn.Linear(1, 1).state_dict()
    evil = tmp_path / "evil.pt"
    torch.save({"meta": {"arch": "linear", "note": _RunsCode(f"open({str(ran)!r}, 'w').close()")},
                "state_dict": state}, evil)
    objects = tmp_path / "objects.pt"
    torch.save({"meta": {"arch": "linear", "note": nn.Linear(1, 1)}, "state_dict": state}, objects)  # a class
    for path in (evil, objects):
        model = nn.Linear(1, 1)
        before = model.weight.clone()
        with pytest.raises(CheckpointError, match="corrupt or not a decrop checkpoint"):
            load_checkpoint(path, model, {"arch": "linear"})
        assert torch.equal(model.weight, before)
    assert not ran.exists(), "loading the checkpoint ran the code pickled in it"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", nn.Linear(1, 1))


# --- the random state of a resumed run -----------------------------------------------------------------------

def _weights_only_round_trip(state, tmp_path):
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)  # as the project loads it


def test_cpu_random_state_round_trip_continues_the_streams(tmp_path):
    loader = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    torch.rand(5), torch.randperm(10, generator=loader)
    state = _weights_only_round_trip(rng_state("cpu", loader), tmp_path)
    want = torch.rand(4), torch.randperm(10, generator=loader)
    torch.manual_seed(123)
    other = torch.Generator().manual_seed(9)
    restore_rng_state(state, "cpu", other)
    assert torch.equal(torch.rand(4), want[0]) and torch.equal(torch.randperm(10, generator=other), want[1])
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert state["cuda"] is None and state["cuda_device"] is None  # written on a CPU: no CUDA states


def test_an_older_state_without_cuda_entries_still_restores(tmp_path):
    torch.manual_seed(0)
    state = {"torch": torch.get_rng_state(), "loader": None}  # before CUDA states were saved
    want = torch.rand(3)
    restore_rng_state(_weights_only_round_trip(state, tmp_path), "cpu")
    assert torch.equal(torch.rand(3), want)


class _FakeCuda:
    """Two CUDA devices whose generator states are byte tensors; records what set_rng_state_all receives."""

    def __init__(self, monkeypatch, states, current=0):
        self.states, self.current, self.received = list(states), current, []
        for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                            "device_count": lambda: len(self.states), "current_device": lambda: self.current,
                            "get_rng_state_all": lambda: [s.clone() for s in self.states],
                            "set_rng_state_all": self.set_all}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def set_all(self, states):
        self.received.append([s.clone() for s in states])
        self.states = [s.clone() for s in states]


def _states(*seeds):
    return [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
            for s in seeds]


def test_cuda_random_states_are_saved_and_the_same_states_restored(monkeypatch, tmp_path):
    """A GPU draws its noise from the CUDA generator: the states saved are the states restored, through a
    weights_only load of the checkpoint (a CPU resume of it restores the CPU state only)."""
    saved = _states(1, 2)
    cuda = _FakeCuda(monkeypatch, saved)
    state = _weights_only_round_trip(rng_state(torch.device("cuda", 1)), tmp_path)
    assert [torch.equal(a, b) for a, b in zip(state["cuda"], saved)] == [True, True] and state["cuda_device"] == 1
    cuda.states = _states(7, 8)  # the resumed process starts from the seed's states
    restore_rng_state(state, torch.device("cuda", 1))
    assert len(cuda.received) == 1 and all(torch.equal(a, b) for a, b in zip(cuda.received[0], saved))
    assert len(cuda.received[0]) == 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same checkpoint resumed on a CPU
    torch.manual_seed(0)
    cpu = torch.get_rng_state()
    want = torch.rand(3)
    restore_rng_state(dict(state, torch=cpu), "cpu")
    assert len(cuda.received) == 1  # no CUDA to restore ...
    assert torch.equal(torch.rand(3), want)  # ... and the CPU stream continues


def test_the_noise_stream_goes_to_this_workers_device(monkeypatch):
    """Ray workers sharing a node's GPUs train on cuda:<local rank>; rank 0 saved its states, and the stream it
    drew on cuda:0 is the one rank 1 continues on cuda:1. A device without a saved state keeps its own."""
    saved = _states(1, 2)
    cuda = _FakeCuda(monkeypatch, saved)
    state = rng_state("cuda:0")
    cuda.states = _states(7, 8, 9)  # three devices now
    restore_rng_state(state, "cuda:1")
    got = cuda.received[-1]
    assert len(got) == 3 and torch.equal(got[0], saved[0]) and torch.equal(got[1], saved[0])
    assert torch.equal(got[2], _states(9)[0])


def test_no_cuda_states_are_taken_before_cuda_is_initialised(monkeypatch):
    cuda = _FakeCuda(monkeypatch, _states(1))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    state = rng_state("cpu")
    assert state["cuda"] is None and state["cuda_device"] is None
    restore_rng_state(state, "cpu")
    restore_rng_state(dict(state, cuda=_states(5), cuda_device=0), "cpu")  # a GPU checkpoint, CPU training
    assert cuda.received == []  # CUDA left alone (and uninitialised) for a CPU run
