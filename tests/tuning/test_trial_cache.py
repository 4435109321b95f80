"""Finished trials reused across studies (tuning.trial_cache): what the key covers, and the round trip."""


import torch

from decrop.rows import CertRow
from tuning import trial_cache

ROWS = [CertRow(0, 1, 1, 0.24996, 1, 0.1, 1100), CertRow(100, 2, -1, 0.0, 0, 0.1, 1100)]


def test_key_covers_config_layout_classifier_and_code(monkeypatch):
    flat = {"seed": 0, "sigma": 0.25, "methods": ["decrop"]}
    key = trial_cache.trial_key(flat, 1, 0.0, "aa")
    assert key == trial_cache.trial_key(dict(flat), 1, 0.0, "aa")
    assert key == trial_cache.trial_key({**flat, "cache_dir": "/elsewhere"}, 1, 0.0, "aa")  # where, not what
    assert key != trial_cache.trial_key({**flat, "seed": 1}, 1, 0.0, "aa")  # another seed
    assert key != trial_cache.trial_key({**flat, "methods": ["baseline"]}, 1, 0.0, "aa")  # another method
    assert key != trial_cache.trial_key(flat, 2, 0.0, "aa")  # two DDP workers: the same objective, other rounding
    assert key != trial_cache.trial_key(flat, 1, 0.0, "bb")  # the same config, another classifier file
    monkeypatch.setattr(trial_cache, "code_hash", lambda: "other code")
    assert key != trial_cache.trial_key(flat, 1, 0.0, "aa")  # changed code never reuses a result


def test_round_trip_first_writer_wins_and_nothing_half_written(tmp_path):
    key = trial_cache.trial_key({"seed": 0}, 1, 0.0, "aa")
    assert trial_cache.load(str(tmp_path), key) is None
    weights = tmp_path / "trial-1.pt"
    torch.save({"w": torch.arange(3.0)}, weights)
    trial_cache.store(str(tmp_path), key, weights, ROWS, "study-a/trial-1")
    weights.unlink()  # the cache keeps its own copy
    cached = trial_cache.load(str(tmp_path), key)
    assert torch.equal(torch.load(cached.weights)["w"], torch.arange(3.0))
    assert cached.rows == ROWS and cached.source == "study-a/trial-1" and cached.denoiser
    trial_cache.store(str(tmp_path), key, None, ROWS[:1], "study-b/trial-9")  # a second writer changes nothing
    assert trial_cache.load(str(tmp_path), key).source == "study-a/trial-1"
    reference = trial_cache.trial_key({"seed": 1}, 1, 0.0, "aa")
    trial_cache.store(str(tmp_path), reference, None, ROWS, "study-a/none")  # no denoiser
    assert trial_cache.load(str(tmp_path), reference).weights is None
    assert not trial_cache.load(str(tmp_path), reference).denoiser
    assert not list((tmp_path / "trials").glob(".*"))  # no temporary folder left behind


def test_key_refuses_an_unknown_classifier():
    import pytest
    with pytest.raises(ValueError, match="sha256"):
        trial_cache.trial_key({"seed": 0}, 1, 0.0, "")


CURVES = [(1, "val/agreement", 0.5), (2, "val/agreement", 0.625), (1, "train/loss", 0.1234567891234)]


def test_the_shelf_keeps_rows_and_curves_without_weights_and_a_fresh_cache_finds_them(tmp_path):
    cache, shelf = str(tmp_path / "cache"), str(tmp_path / "shelf")
    weights = tmp_path / "trial-1.pt"
    torch.save({"w": torch.arange(3.0)}, weights)
    trained, reference, elsewhere = (trial_cache.trial_key({"seed": s}, 1, 0.0, "aa") for s in range(3))
    trial_cache.store(cache, trained, weights, ROWS, "sigma/trial-1")
    trial_cache.store(cache, reference, None, ROWS[:1], "sigma/trial-2")
    trial_cache.store(cache, elsewhere, weights, ROWS, "other-store/trial-3")
    known = {"sigma/trial-1": ("abc123", CURVES), "sigma/trial-2": ("abc123", [])}
    assert trial_cache.shelve(cache, shelf, known.get) == 2  # trial-3's run is not in this store: it waits
    assert trial_cache.shelve(cache, shelf, known.get) == 0  # nothing twice
    assert not list((tmp_path / "shelf").rglob("*.pt"))  # no weights on the shelf
    assert trial_cache.load(str(tmp_path / "fresh"), elsewhere, shelf) is None

    shelved = trial_cache.load(str(tmp_path / "fresh"), trained, shelf)  # a fresh machine: an empty cache
    assert shelved.weights is None and shelved.denoiser  # a denoiser was trained; its weights were not kept
    assert shelved.rows == ROWS and shelved.source == "sigma/trial-1"
    assert sorted(shelved.curves) == sorted(CURVES)  # values at full precision
    assert trial_cache.load(str(tmp_path / "fresh"), reference, shelf).denoiser is False
    assert trial_cache.load(cache, trained, shelf).weights is not None  # the cache, where it has the entry, first


def test_a_shelf_of_other_code_is_named_with_the_commit_to_continue_from(tmp_path, monkeypatch):
    cache, shelf = str(tmp_path / "cache"), str(tmp_path / "shelf")
    assert trial_cache.other_code(shelf) == ""  # no shelf yet
    trial_cache.store(cache, "k1", None, ROWS, "sigma/trial-1")
    trial_cache.shelve(cache, shelf, {"sigma/trial-1": ("0123456789abcdef", [])}.get)
    assert trial_cache.other_code(shelf) == ""  # computed by this code
    monkeypatch.setattr(trial_cache, "code_hash", lambda: "changed code")
    line = trial_cache.other_code(shelf)
    assert "1 trial(s) computed by other code" in line and "git worktree add ../reruns 0123456789ab" in line


def test_the_classifier_is_pinned_to_the_shelfs_copy(tmp_path):
    import pytest
    shelf = str(tmp_path / "shelf")
    trained = tmp_path / "machine-a" / "classifiers" / "fashion_mnist-small_cnn-abc.pt"
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"weights of machine a")
    trial_cache.pin_classifier(trained, shelf)  # the shelf has none: it keeps machine a's
    kept = tmp_path / "shelf" / "classifiers" / trained.name
    assert kept.read_bytes() == b"weights of machine a"
    fresh = tmp_path / "machine-b" / "classifiers" / trained.name
    trial_cache.pin_classifier(fresh, shelf)  # machine b has none: it takes the shelf's, never trains its own
    assert fresh.read_bytes() == b"weights of machine a"
    retrained = tmp_path / "machine-c" / "classifiers" / trained.name
    retrained.parent.mkdir(parents=True)
    retrained.write_bytes(b"weights of machine c")
    with pytest.raises(ValueError, match=f"remove {retrained}"):
        trial_cache.pin_classifier(retrained, shelf)
    assert kept.read_bytes() == b"weights of machine a" and retrained.read_bytes() == b"weights of machine c"
