"""Boundary attacks (decrop.attacks): shapes, ranges, budgets, model state, determinism and effect."""

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torchattacks.wrappers.multiattack import MultiAttack

from decrop.attacks import ATTACKS, get_attack
from decrop.models import create_model
from helpers import quadrant_images

NUM_CLASSES, SIZE = 4, 12
BUDGETED = ["pgd", "apgd_ce", "autoattack"]  # L-inf attacks inside their eps-ball
RANDOM = ["pgd", "apgd_ce", "autoattack"]  # random starts drawn from the generator
# AutoAttack runs 5,000 Square queries (seconds) on every image its gradient attacks leave unfooled: the tests use
# an eps at which the ensemble fools every toy image; `ensemble_run` needs its later members.
LARGE_EPS = 0.3

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


def _flipped(model, x_b, y):
    with torch.no_grad():
        return model(x_b).argmax(1) != y


# ------------------------------------------------------------------------------------ contract of all attacks

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_shape_range_and_input_untouched(name, trained):
    model, x, y = trained
    x_orig = x.clone()
    x_b = _run(name, model, x, y, eps=LARGE_EPS)
    assert x_b.shape == x.shape and x_b.dtype == x.dtype
    assert x_b.min() >= 0 and x_b.max() <= 1
    assert not x_b.requires_grad and x_b.grad_fn is None
    assert torch.equal(x, x_orig)


@pytest.mark.parametrize("name", ["pgd", "apgd_ce"])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 0.1])
def test_budgeted_attacks_stay_inside_the_eps_ball(name, eps, trained):
    model, x, y = trained
    x_b = _run(name, model, x, y, eps=eps)
    assert (x_b - x).abs().max().item() <= eps + 1e-6


def test_autoattack_stays_inside_the_eps_ball(trained):
    model, x, y = trained
    assert (_run("autoattack", model, x, y, eps=LARGE_EPS) - x).abs().max().item() <= LARGE_EPS + 1e-6


def _mixed_state(model, train_mode):
    """`model` in `train_mode` with one BatchNorm in the other mode and the head's weight frozen."""
    model.train(train_mode)
    model.body[2].train(not train_mode)
    model.head.weight.requires_grad_(False)
    return ({name: m.training for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_state(model, state):
    modes, flags, tensors = state
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # eval mode inside: BatchNorm statistics untouched
        assert torch.equal(value, tensors[key]), key


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("train_mode", [True, False])
def test_mixed_modes_flags_grads_and_buffers_are_restored(name, train_mode, trained):
    model, x, y = trained
    state = _mixed_state(model, train_mode)
    try:
        _run(name, model, x, y, eps=LARGE_EPS)
        _assert_state(model, state)
    finally:
        model.head.weight.requires_grad_(True)
        model.eval()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_callers_global_rng_is_left_alone(name, trained):
    model, x, y = trained
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _run(name, model, x, y, eps=LARGE_EPS)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_seeded_generator_gives_identical_outputs(name, trained):
    model, x, y = trained
    torch.manual_seed(1)
    first = _run(name, model, x, y, eps=LARGE_EPS, seed=5)
    torch.manual_seed(2)  # the global RNG's state must not matter
    assert torch.equal(first, _run(name, model, x, y, eps=LARGE_EPS, seed=5))


@pytest.mark.parametrize("name", RANDOM)
def test_random_start_depends_on_the_seed(name, trained):
    model, x, y = trained
    assert not torch.equal(_run(name, model, x, y, eps=LARGE_EPS, seed=1), _run(name, model, x, y, eps=LARGE_EPS,
                                                                                  seed=2))


def test_get_attack_returns_registered_callables_and_rejects_unknown_names():
    assert set(ATTACKS) == {"pgd", "autoattack", "apgd_ce", "deepfool", "none", "same_class"}
    for name, attack in ATTACKS.items():
        assert get_attack(name) is attack
    with pytest.raises(ValueError) as err:
        get_attack("fgsm")
    message = str(err.value)
    assert "fgsm" in message
    assert all(name in message for name in ATTACKS)


# ---------------------------------------------------------------------------------------- pgd, apgd_ce, autoattack

def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_pgd_increases_the_loss(trained):
    model, x, y = trained
    clean, attacked = _ce(model, x, y), _ce(model, _run("pgd", model, x, y, eps=8 / 255), y)
    assert attacked.mean() > clean.mean() * 1.5
    assert (attacked >= clean).float().mean() >= 0.9


@pytest.mark.parametrize("name", RANDOM)
def test_gradient_attacks_flip_most_predictions_with_a_large_eps(name, trained):
    model, x, y = trained
    kwargs = {"step_size": 0.05} if name == "pgd" else {}
    assert _flipped(model, _run(name, model, x, y, eps=0.5, **kwargs), y).float().mean() >= 0.8


def test_pgd_with_zero_steps_is_the_random_start_only(trained):
    model, x, y = trained
    x_b = _run("pgd", model, x, y, eps=8 / 255, steps=0)
    assert 0 < (x_b - x).abs().max() <= 8 / 255 + 1e-6


def test_apgd_ce_returns_a_fooling_point_or_the_clean_image(trained):
    """torchattacks' APGD (and so AutoAttack) keeps the clean image where it fails: DE-CROP gets x_b = x there."""
    model, x, y = trained
    x_b = _run("apgd_ce", model, x, y, eps=0.1)
    flipped, unchanged = _flipped(model, x_b, y), (x_b == x).flatten(1).all(1)
    assert flipped.any() and unchanged.any()  # eps 0.1 fools some of the toy images, not all
    assert torch.equal(flipped, ~unchanged)


@pytest.fixture(scope="module")
def ensemble_run(trained):
    """One AutoAttack run in which APGD-CE fools only part of the images and the later attacks the rest, with the
    model in mixed modes; records the attacks its MultiAttack holds and the ones that ran. Also APGD-CE with
    AutoAttack's 10 iterations from the same generator seed."""
    model, x, y = trained
    x, y, eps, seed = x[:8], y[:8], 0.28, 3
    held, ran = [], []
    with pytest.MonkeyPatch.context() as patch:
        for cls in (MultiAttack, torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB, torchattacks.Square):
            def spy(self, images, labels, _forward=cls.forward):
                if isinstance(self, MultiAttack):
                    held.append(list(self.attacks))
                else:
                    ran.append(type(self))
                return _forward(self, images, labels)
            patch.setattr(cls, "forward", spy)
        state = _mixed_state(model, True)
        try:
            torch.manual_seed(7)
            rng = torch.get_rng_state()
            x_b = _run("autoattack", model, x, y, eps=eps, seed=seed)
            rng_after = torch.get_rng_state()
            _assert_state(model, state)
        finally:
            model.head.weight.requires_grad_(True)
            model.eval()
    x_apgd = _run("apgd_ce", model, x, y, eps=eps, seed=seed, steps=10)
    return dict(model=model, x=x, y=y, eps=eps, x_b=x_b, held=held, ran=ran, rng=(rng, rng_after), x_apgd=x_apgd)


def test_autoattack_runs_the_standard_ensemble(ensemble_run):
    (attacks,) = ensemble_run["held"]
    assert [type(a) for a in attacks] == [torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB,
                                          torchattacks.Square]
    assert attacks[0].loss == "ce" and attacks[2].multi_targeted  # APGD-CE, FAB-T
    assert all(a.eps == ensemble_run["eps"] and a.norm == "Linf" for a in attacks)
    assert attacks[1].n_target_classes == attacks[2].n_target_classes == NUM_CLASSES - 1
    # each attack runs on the images its predecessors left: here APGD-CE leaves one, APGD-T fools it
    assert ensemble_run["ran"][:2] == [torchattacks.APGD, torchattacks.APGDT]
    assert torch.equal(*ensemble_run["rng"])


def test_autoattack_fools_at_least_what_its_apgd_ce_fools(ensemble_run):
    """Per image: the ensemble's first member is APGD-CE with the same seed, and the others try the rest.
    (Against `apgd_ce` with more iterations than AutoAttack's 10 this need not hold.)"""
    model, x, y, x_b = (ensemble_run[k] for k in ("model", "x", "y", "x_b"))
    by_ensemble, by_apgd = _flipped(model, x_b, y), _flipped(model, ensemble_run["x_apgd"], y)
    assert 0 < by_apgd.sum() < len(x)
    assert (by_ensemble | ~by_apgd).all() and by_ensemble.sum() > by_apgd.sum()
    unchanged = (x_b == x).flatten(1).all(1)
    assert torch.equal(by_ensemble, ~unchanged)  # unfooled images come back clean
    assert (x_b - x).abs().max() <= ensemble_run["eps"] + 1e-6


# -------------------------------------------------------------------------------------------------- deepfool

def test_deepfool_on_a_linear_classifier_takes_the_closed_form_step_and_is_not_clipped_to_eps():
    """f(x) = W x + b: one step of (1 + overshoot) x the minimal L2 perturbation |f_y - f_k| / ||w_y - w_k|| to
    the nearest boundary (plus the reference code's 1e-4), landing just past it even though eps is smaller."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3, 16, generator=g))
        linear.bias.copy_(0.2 * torch.randn(3, generator=g))
    model = torch.nn.Sequential(torch.nn.Flatten(), linear).eval()
    x = 0.5 + (torch.rand(6, 1, 4, 4, generator=g) - 0.5) * 0.4
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w, flat = linear.weight.detach(), x.flatten(1)
    expected, nearest = [], []
    for i in range(len(x)):
        others = [k for k in range(3) if k != y[i]]
        dist = {k: (logits[i, y[i]] - logits[i, k]).abs() / (w[k] - w[y[i]]).norm() for k in others}
        k = min(dist, key=dist.get)
        direction = (w[k] - w[y[i]]) / (w[k] - w[y[i]]).norm()
        expected.append(flat[i] + 1.02 * (dist[k] + 1e-4) * direction)
        nearest.append(k)
    expected = torch.stack(expected).view_as(x)
    assert expected.min() > 0 and expected.max() < 1, "the closed form must not need clamping"
    eps = 0.5 * (expected - x).abs().flatten(1).max(1).values.min().item()

    x_b = _run("deepfool", model, x, y, eps=eps)
    assert torch.allclose(x_b, expected, atol=1e-5)
    assert ((x_b - x).abs().flatten(1).max(1).values > eps).all()  # not clipped to the eps-ball
    with torch.no_grad():
        after = model(x_b)
        short = model(x + 0.98 / 1.02 * (expected - x))  # 98% of the minimal perturbation: still on y's side
    assert torch.equal(after.argmax(1), torch.tensor(nearest))
    assert torch.equal(short.argmax(1), y)


def test_deepfool_crosses_the_boundary_with_a_small_eps(trained):
    model, x, y = trained
    x_b = _run("deepfool", model, x, y, eps=2 / 255)
    assert _flipped(model, x_b, y).all()  # torchattacks' DeepFool left 15 of these 32 images on the boundary


def test_deepfool_is_a_small_perturbation(trained):
    """DeepFool seeks the *nearest* boundary: its L2 step is much smaller than a PGD point of the same flip rate."""
    model, x, y = trained
    x_df = _run("deepfool", model, x, y)
    x_pgd = _run("pgd", model, x, y, eps=0.5, step_size=0.05)
    l2_df = (x_df - x).flatten(1).norm(dim=1).mean()
    l2_pgd = (x_pgd - x).flatten(1).norm(dim=1).mean()
    assert l2_df < l2_pgd


def test_deepfool_leaves_already_misclassified_images_alone(trained):
    model, x, y = trained
    wrong = (y + 1) % NUM_CLASSES  # labels the model does not predict: nothing to move away from
    assert torch.equal(_run("deepfool", model, x, wrong), x)


def test_deepfool_leaves_an_image_with_zero_gradient_alone():
    """A saturated network (all-zero input gradients) gives no direction: the image stays, with no NaN."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x = torch.zeros(2, 1, 4, 4)  # ReLU'(0) = 0: the logits do not depend on the input here
    assert torch.equal(_run("deepfool", model, x, torch.zeros(2, dtype=torch.long)), x)


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
    """`generate_samples` seeds a generator on the model's device; every attack must accept it, reproducibly,
    leaving the caller's CPU and CUDA RNGs as they were."""
    model = create_model("small_cnn", in_channels=1, num_classes=NUM_CLASSES, image_size=SIZE).cuda().eval()
    x, y = _separable_data(16, seed=0)
    x, y = x.cuda(), y.cuda()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state())
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # equal gradients twice
        runs = [get_attack(name)(model, x, y, eps=LARGE_EPS, generator=torch.Generator(device="cuda").manual_seed(0))
                for _ in range(2)]
    assert runs[0].device == x.device and runs[0].shape == x.shape
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(rng[0], torch.get_rng_state()) and torch.equal(rng[1], torch.cuda.get_rng_state())
