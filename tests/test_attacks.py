"""Boundary attacks (decrop.attacks): shapes, ranges, budgets, model state, determinism and effect."""

import pytest
import torch
import torch.nn.functional as F

from decrop.attacks import ATTACKS, get_attack
from decrop.models import create_model
from conftest import quadrant_images  # tests/conftest.py: shared toy data

NUM_CLASSES, SIZE = 4, 12
BUDGETED = ["pgd", "autoattack", "deepfool"]  # every attack but `none` stays inside its eps-ball


pytestmark = pytest.mark.usefixtures("single_thread")


def _separable_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quadrant_images` with one all-black and one all-white image, so clipping to [0, 1] matters."""
    x, y = quadrant_images(n, seed, SIZE, NUM_CLASSES)
    x[0].fill_(0.0)
    x[1].fill_(1.0)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained to ~100% on the separable data; returned in eval mode with the data."""
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=NUM_CLASSES, image_size=SIZE)
    x, y = _separable_data(256, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    x_test, y_test = _separable_data(32, seed=1)
    with torch.no_grad():
        pred = model(x_test).argmax(1)
    assert (pred == y_test).float().mean() > 0.9, "fixture model failed to learn the separable data"
    return model, x_test, pred  # the attacks move away from the model's own predictions, as DE-CROP does


def _run(name, model, x, y, eps=8 / 255, seed=0, **kwargs):
    return get_attack(name)(model, x, y, eps=eps, generator=torch.Generator().manual_seed(seed), **kwargs)


# ------------------------------------------------------------------------------------ contract of all attacks

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_shape_range_and_input_untouched(name, trained):
    model, x, y = trained
    x_orig = x.clone()
    x_b = _run(name, model, x, y, eps=0.3)
    assert x_b.shape == x.shape and x_b.dtype == x.dtype
    assert x_b.min() >= 0 and x_b.max() <= 1
    assert not x_b.requires_grad and x_b.grad_fn is None
    assert torch.equal(x, x_orig)


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 0.1])
def test_budgeted_attacks_stay_inside_the_eps_ball(name, eps, trained):
    model, x, y = trained
    x_b = _run(name, model, x, y, eps=eps)
    assert (x_b - x).abs().max().item() <= eps + 1e-6


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_mode_flags_grads_and_buffers_are_restored(name, train_mode, trained):
    model, x, y = trained
    model.train(train_mode)
    frozen = model.head.weight
    frozen.requires_grad_(False)  # a mixed set of flags must come back exactly as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _run(name, model, x, y, eps=0.1)
        assert model.training == train_mode
        assert all(m.training == train_mode for m in model.modules())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        for key, value in model.state_dict().items():  # eval mode inside: BatchNorm statistics untouched
            assert torch.equal(value, state[key]), key
    finally:
        frozen.requires_grad_(True)
        model.eval()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_seeded_generator_gives_identical_outputs(name, trained):
    model, x, y = trained
    assert torch.equal(_run(name, model, x, y, seed=5), _run(name, model, x, y, seed=5))


@pytest.mark.parametrize("name", ["pgd", "autoattack"])
def test_random_start_depends_on_the_seed(name, trained):
    model, x, y = trained
    assert not torch.equal(_run(name, model, x, y, seed=1), _run(name, model, x, y, seed=2))


def test_get_attack_returns_registered_callables_and_rejects_unknown_names():
    for name, attack in ATTACKS.items():
        assert get_attack(name) is attack
    with pytest.raises(ValueError) as err:
        get_attack("fgsm")
    message = str(err.value)
    assert "fgsm" in message
    assert all(name in message for name in ATTACKS)


# ------------------------------------------------------------------------------------------ effect of attacks

def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("name", ["pgd", "autoattack"])
def test_gradient_attacks_increase_the_loss(name, trained):
    model, x, y = trained
    clean, attacked = _ce(model, x, y), _ce(model, _run(name, model, x, y, eps=8 / 255), y)
    assert attacked.mean() > clean.mean() * 1.5
    assert (attacked >= clean).float().mean() >= 0.9


def test_autoattack_is_at_least_as_strong_as_its_random_start(trained):
    model, x, y = trained
    x_start = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * (8 / 255)
    start = _ce(model, x_start.clamp(0, 1), y)
    attacked = _ce(model, _run("autoattack", model, x, y, eps=8 / 255, seed=0), y)
    assert (attacked >= start - 1e-5).all()  # it returns the best point found, never a worse one


@pytest.mark.parametrize("name", ["pgd", "autoattack"])
def test_gradient_attacks_flip_most_predictions_with_a_large_eps(name, trained):
    model, x, y = trained
    x_b = _run(name, model, x, y, eps=0.5, step_size=0.05) if name == "pgd" else _run(name, model, x, y, eps=0.5)
    with torch.no_grad():
        flipped = (model(x_b).argmax(1) != y).float().mean().item()
    assert flipped >= 0.8, flipped


def test_pgd_with_zero_steps_is_the_random_start_only(trained):
    model, x, y = trained
    x_b = _run("pgd", model, x, y, eps=8 / 255, steps=0)
    assert 0 < (x_b - x).abs().max() <= 8 / 255 + 1e-6


def test_deepfool_crosses_the_boundary_with_a_large_budget(trained):
    model, x, y = trained
    x_b = _run("deepfool", model, x, y, eps=1.0)
    with torch.no_grad():
        flipped = (model(x_b).argmax(1) != y).float().mean().item()
    assert flipped >= 0.9, flipped


def test_deepfool_is_a_small_perturbation(trained):
    """DeepFool seeks the *nearest* boundary: its L2 step is much smaller than a PGD point of the same flip rate."""
    model, x, y = trained
    x_df = _run("deepfool", model, x, y, eps=1.0)
    x_pgd = _run("pgd", model, x, y, eps=0.5, step_size=0.05)
    l2_df = (x_df - x).flatten(1).norm(dim=1).mean()
    l2_pgd = (x_pgd - x).flatten(1).norm(dim=1).mean()
    assert l2_df < l2_pgd


def test_deepfool_leaves_already_misclassified_images_alone(trained):
    model, x, y = trained
    wrong = (y + 1) % NUM_CLASSES  # labels the model does not predict: nothing to move away from
    assert torch.equal(_run("deepfool", model, x, wrong, eps=0.3), x)


# ---------------------------------------------------------------------------------------------------- none

def test_none_pairs_each_image_with_another_of_its_class():
    x = torch.rand(13, 1, 4, 4)  # distinct images, so the partner's index can be recovered
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 1, 0, 2, 2, 4])  # class 4 has a single member
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    for seed in range(5):
        x_b = _run("none", model, x, y, eps=8 / 255, seed=seed)
        for i in range(len(x)):
            matches = [j for j in range(len(x)) if torch.equal(x_b[i], x[j])]
            assert len(matches) == 1, (seed, i)
            j = matches[0]
            assert y[j] == y[i]
            if (y == y[i]).sum() >= 2:
                assert j != i, (seed, i)
            else:
                assert j == i


def test_none_partners_vary_with_the_seed():
    x = torch.rand(12, 1, 4, 4)
    y = torch.zeros(12, dtype=torch.long)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    outputs = {tuple(_run("none", model, x, y, seed=s).flatten(1)[:, 0].tolist()) for s in range(6)}
    assert len(outputs) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_run_on_cuda_with_a_cuda_generator(name):
    """`generate_samples` seeds a generator on the model's device; every attack must accept it."""
    model = create_model("small_cnn", in_channels=1, num_classes=NUM_CLASSES, image_size=SIZE).cuda().eval()
    x, y = _separable_data(16, seed=0)
    x, y = x.cuda(), y.cuda()
    x_b = get_attack(name)(model, x, y, eps=8 / 255, generator=torch.Generator(device="cuda").manual_seed(0))
    assert x_b.device == x.device and x_b.shape == x.shape
