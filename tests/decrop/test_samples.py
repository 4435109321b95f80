"""Generated samples (decrop.samples): interpolation towards mixed logits, generation and its cache."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from decrop.attacks import pgd
from decrop.config import DecropConfig
from decrop.errors import CheckpointError
from decrop.models import create_model
from decrop import samples as samples_module
from decrop.samples import GeneratedSamples, generate_samples, interpolate, load_or_generate_samples
from helpers import quadrant_images

NUM_CLASSES, SIZE = 4, 12


pytestmark = pytest.mark.usefixtures("single_thread")


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quadrant_images(n, seed, SIZE, NUM_CLASSES)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_model("small_cnn", in_channels=1, num_classes=NUM_CLASSES, image_size=SIZE)
    x, y = _data(128, seed=0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    net.zero_grad(set_to_none=True)
    return net


@pytest.fixture(scope="module")
def pair(model):
    """Clean images and their PGD boundary partners (a large eps so the logits differ clearly)."""
    x, _ = _data(8, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_b = pgd(model, x, y, eps=0.2, step_size=0.05, steps=10, generator=torch.Generator().manual_seed(0))
    return x, x_b


def _target_mse(model, x_int, x, x_b, mixing):
    """Per-sample MSE (B,) between f(x_int) and mixing f(x) + (1 - mixing) f(x_b)."""
    with torch.no_grad():
        target = mixing * model(x) + (1 - mixing) * model(x_b)
        return (model(x_int) - target).pow(2).mean(dim=1)


# ----------------------------------------------------------------------------------------------- interpolate

@pytest.mark.parametrize("n_interp", [1, 2, 5])
def test_interpolate_shape_range_and_moves_towards_the_mixed_logits(n_interp, model, pair):
    x, x_b = pair
    mixing = 0.5
    x_int = interpolate(model, x, x_b, mixing=mixing, n_interp=n_interp, steps=30, lr=1e-2,
                        generator=torch.Generator().manual_seed(0))
    assert x_int.shape == (n_interp, *x.shape)
    assert x_int.min() >= 0 and x_int.max() <= 1
    assert not x_int.requires_grad
    start = _target_mse(model, x, x, x_b, mixing).mean()
    assert start > 0.01  # the test is meaningful only if x is not already at the target
    for j in range(n_interp):
        end = _target_mse(model, x_int[j], x, x_b, mixing).mean()
        assert end < 0.5 * start, (j, end.item(), start.item())


def test_interpolated_samples_are_distinct(model, pair):
    x, x_b = pair
    x_int = interpolate(model, x, x_b, mixing=0.8, n_interp=5, steps=5, generator=torch.Generator().manual_seed(0))
    for i in range(5):
        for j in range(i + 1, 5):
            assert (x_int[i] - x_int[j]).abs().max() > 1e-3, (i, j)


def test_interpolate_with_alpha_one_targets_the_clean_logits(model, pair):
    """mixing = 1: the target is f(x) and the search starts at x, so sample 0 barely moves."""
    x, x_b = pair
    x_int = interpolate(model, x, x_b, mixing=1.0, n_interp=1, steps=10)
    assert _target_mse(model, x_int[0], x, x_b, 1.0).mean() < 1e-3


@pytest.mark.parametrize("train_mode", [True, False])
def test_interpolate_restores_model_mode_and_leaves_no_gradients(train_mode, model, pair):
    x, x_b = pair
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train_mode)
    try:
        interpolate(model, x, x_b, mixing=0.5, n_interp=2, steps=3, generator=torch.Generator().manual_seed(0))
        assert model.training == train_mode
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())
        for key, value in model.state_dict().items():  # eval mode inside: BatchNorm buffers untouched
            assert torch.equal(value, state[key]), key
    finally:
        model.eval()


def test_interpolate_is_reproducible_for_a_seed(model, pair):
    x, x_b = pair

    def run(seed):
        return interpolate(model, x, x_b, mixing=0.5, n_interp=2, steps=3,
                           generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3)[1], run(4)[1])


# ------------------------------------------------------------------------------------------ generate_samples

_CFG = DecropConfig(attack="pgd", eps=16 / 255, attack_steps=3, attack_step_size=4 / 255, n_interp=2,
                    interp_steps=4, mixing=0.5)


def test_generate_samples_shapes_ranges_and_budget(model):
    images, labels = _data(10, seed=2)
    out = generate_samples(model, images, labels, _CFG, seed=0, batch_size=4)
    assert isinstance(out, GeneratedSamples)
    assert out.boundary.shape == images.shape
    assert out.interpolated.shape == (2, *images.shape)
    assert out.boundary.device.type == "cpu" and out.interpolated.device.type == "cpu"
    for t in (out.boundary, out.interpolated):
        assert t.min() >= 0 and t.max() <= 1
    assert (out.boundary - images).abs().max() <= _CFG.eps + 1e-6
    assert not torch.equal(out.boundary, images)
    parts = out.as_images()
    assert len(parts) == 3 and torch.equal(parts[0], out.boundary) and torch.equal(parts[2], out.interpolated[1])


def test_generate_samples_is_reproducible_for_a_seed(model):
    images, labels = _data(10, seed=2)
    a = generate_samples(model, images, labels, _CFG, seed=7, batch_size=4)
    b = generate_samples(model, images, labels, _CFG, seed=7, batch_size=4)
    c = generate_samples(model, images, labels, _CFG, seed=8, batch_size=4)
    assert torch.equal(a.boundary, b.boundary) and torch.equal(a.interpolated, b.interpolated)
    assert not torch.equal(a.boundary, c.boundary)


def test_generate_samples_none_pairs_within_the_class_across_batches(model):
    images, labels = _data(12, seed=3)
    cfg = DecropConfig(attack="none", n_interp=1, interp_steps=2)
    # labels = i % 4 and batches of 4: every class member lies in another batch, so pairing per batch
    # would leave each image with itself
    out = generate_samples(model, images, labels, cfg, seed=0, batch_size=4)
    for i in range(len(images)):
        matches = [j for j in range(len(images)) if torch.equal(out.boundary[i], images[j])]
        assert len(matches) == 1 and matches[0] != i and labels[matches[0]] == labels[i]


# ------------------------------------------------------------------------------------------------ the cache

def test_cache_is_written_then_reused_and_rejects_another_key(model, tmp_path, monkeypatch):
    images, labels = _data(6, seed=4)
    folder = tmp_path / "samples"
    logs = []
    first = load_or_generate_samples(folder, model, images, labels, _CFG, seed=0, key="abc", log=logs.append)
    boundary_file, = folder.glob("boundary-*.pt")
    interp_file, = folder.glob("interpolated-*.pt")

    def must_not_run(*args, **kwargs):
        raise AssertionError("generated although the cache exists")

    real_interpolated = samples_module.generate_interpolated
    monkeypatch.setattr(samples_module, "generate_boundary", must_not_run)
    monkeypatch.setattr(samples_module, "generate_interpolated", must_not_run)
    second = load_or_generate_samples(folder, model, images, labels, _CFG, seed=0, key="abc", log=logs.append)
    assert torch.equal(first.boundary, second.boundary)
    assert torch.equal(first.interpolated, second.interpolated)
    assert sum("reusing" in line for line in logs) == 2

    # Another mixing coefficient reuses the boundary samples (the attack is the expensive part) and
    # interpolates anew.
    monkeypatch.setattr(samples_module, "generate_interpolated", real_interpolated)
    other = load_or_generate_samples(folder, model, images, labels, dataclasses.replace(_CFG, mixing=0.3), seed=0,
                                     key="abc", log=logs.append)
    assert torch.equal(other.boundary, first.boundary) and not torch.equal(other.interpolated, first.interpolated)
    assert len(list(folder.glob("boundary-*.pt"))) == 1 and len(list(folder.glob("interpolated-*.pt"))) == 2

    # A file that was written for another key is refused, never silently reused.
    monkeypatch.undo()
    interp_file.unlink()
    boundary_file.rename(interp_file)
    with pytest.raises(CheckpointError, match="key"):
        load_or_generate_samples(folder, model, images, labels, _CFG, seed=0, key="abc", log=logs.append)
