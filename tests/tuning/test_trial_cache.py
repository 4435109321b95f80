"""Finished trials reused across studies (tuning.trial_cache): what the key covers, and the round trip."""


import torch

from decrop.rows import CertRow
from tuning import trial_cache

ROWS = [CertRow(0, 1, 1, 0.24996, 1, 0.1, 1100), CertRow(100, 2, -1, 0.0, 0, 0.1, 1100)]


def test_key_covers_config_layout_classifier_and_code(monkeypatch):
    flat = {"seed": 0, "sigma": 0.25, "methods": ["decrop"]}
    key = trial_cache.trial_key(flat, 1, 0.0, "aa")
    assert key == trial_cache.trial_key(dict(flat), 1, 0.0, "aa")
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
    cached, rows, source = trial_cache.load(str(tmp_path), key)
    assert torch.equal(torch.load(cached)["w"], torch.arange(3.0)) and rows == ROWS and source == "study-a/trial-1"
    trial_cache.store(str(tmp_path), key, None, ROWS[:1], "study-b/trial-9")  # a second writer changes nothing
    assert trial_cache.load(str(tmp_path), key)[2] == "study-a/trial-1"
    reference = trial_cache.trial_key({"seed": 1}, 1, 0.0, "aa")
    trial_cache.store(str(tmp_path), reference, None, ROWS, "study-a/none")  # no denoiser
    assert trial_cache.load(str(tmp_path), reference)[0] is None
    assert not list((tmp_path / "trials").glob(".*"))  # no temporary folder left behind


def test_key_refuses_an_unknown_classifier():
    import pytest
    with pytest.raises(ValueError, match="sha256"):
        trial_cache.trial_key({"seed": 0}, 1, 0.0, "")
