"""DE-CROP's objective (decrop.objectives.DecropObjective), its hooks in the training loop, and the black box.

The classifier is a small CNN with BatchNorm (so "frozen" can be checked on its running statistics), the
denoiser a 3-layer DnCNN; images are 1x8x8.
"""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from decrop.blackbox import BlackBox, distill_surrogate
from decrop.config import BlackBoxConfig, DecropConfig, TrainConfig
from decrop.data import AugmentedTensorDataset
from decrop.losses import beta_schedule
from decrop.metrics import MemorySink
from decrop.models import DomainDiscriminator, create_model
from decrop.objectives import BaseObjective, DecropObjective
from decrop.training import AdamThenSGD, train_denoiser
from helpers import quadrant_images

NUM_CLASSES, SIZE, SIGMA = 4, 8, 0.25
PARTS = {"loss", "loss_lc", "loss_cs_b", "loss_cs_int", "loss_mmd_b", "loss_mmd_int"}


pytestmark = pytest.mark.usefixtures("single_thread")


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return quadrant_images(n, seed, SIZE, NUM_CLASSES)


def _classifier(seed: int = 0, train_steps: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("small_cnn", in_channels=1, num_classes=NUM_CLASSES, image_size=SIZE)
    if train_steps:
        x, y = _data(128, seed=seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(train_steps):
            idx = torch.arange(step * 32, step * 32 + 32) % len(x)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return model.eval()


def _denoiser(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    denoiser = create_model("dncnn", in_channels=1, depth=3, width=8)
    with torch.no_grad():  # leave the identity start so every layer receives a gradient
        for p in denoiser.parameters():
            if p.dim() == 4 and not p.abs().sum():
                p.normal_(0, 0.05)
    return denoiser


def _images(n: int = 8, n_interp: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, x_b, x_int_0, ...) aligned batches in [0, 1]."""
    x, _ = _data(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    x_b = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.2).clamp(0, 1)
    ints = [(0.5 * x + 0.5 * x_b + (torch.rand(x.shape, generator=g) - 0.5) * 0.02).clamp(0, 1)
            for _ in range(n_interp)]
    return (x, x_b, *ints)


def _frozen(classifier: nn.Module) -> nn.Module:
    return classifier.requires_grad_(False).eval()  # what train_denoiser does to it


# ------------------------------------------------------------------------------------------ the loss itself

@pytest.mark.parametrize("n_interp", [1, 2])
def test_objective_returns_finite_loss_and_the_weighted_sum_of_its_parts(n_interp):
    cfg = DecropConfig(w_lc=1.0, w_cs=2.0, w_mmd=3.0)
    images = _images(n_interp=n_interp)
    loss, parts = DecropObjective(SIGMA, cfg)(_denoiser(), _frozen(_classifier()), images, torch.zeros(8).long())
    assert set(parts) == PARTS
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and v == v for v in parts.values())
    assert 0 <= parts["loss_cs_b"] <= 2 and 0 <= parts["loss_cs_int"] <= 2
    assert parts["loss_mmd_b"] >= -1e-6 and parts["loss_mmd_int"] >= -1e-6
    expected = (parts["loss_lc"] + 2 * (parts["loss_cs_b"] + parts["loss_cs_int"])
                + 3 * (parts["loss_mmd_b"] + parts["loss_mmd_int"]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["loss"] == pytest.approx(expected, rel=1e-5)


def test_objective_with_discriminator_adds_the_domain_loss_and_beta():
    cfg = DecropConfig(beta_scale=1.5, beta_gamma=4.0)
    objective = DecropObjective(SIGMA, cfg, DomainDiscriminator(128))
    objective.set_progress(0.5)
    assert objective.beta == pytest.approx(beta_schedule(0.5, 1.5, 4.0))
    loss, parts = objective(_denoiser(), _frozen(_classifier()), _images(), torch.zeros(8).long())
    assert set(parts) == PARTS | {"loss_dd", "beta"}
    assert parts["beta"] == pytest.approx(beta_schedule(0.5, 1.5, 4.0))
    assert torch.isfinite(loss) and parts["loss_dd"] > 0
    expected = (parts["loss_lc"] + 4 * (parts["loss_cs_b"] + parts["loss_cs_int"])
                + 4 * (parts["loss_mmd_b"] + parts["loss_mmd_int"]) + parts["loss_dd"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("with_discriminator", [False, True])
def test_gradients_reach_the_denoiser_but_not_the_frozen_classifier(with_discriminator):
    classifier, denoiser = _frozen(_classifier()), _denoiser()
    objective = DecropObjective(SIGMA, DecropConfig(), DomainDiscriminator(128) if with_discriminator else None)
    objective.set_progress(1.0)
    loss, _ = objective(denoiser, classifier, _images(), torch.zeros(8).long())
    loss.backward()
    for name, p in denoiser.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in classifier.parameters())


def test_each_generated_kind_pulls_on_the_denoiser():
    """L_cs_b / L_mmd_b depend on x_b and L_cs_int / L_mmd_int on x_int: changing one kind changes only its parts."""
    classifier, denoiser = _frozen(_classifier(train_steps=20)), _denoiser()
    denoiser.eval()  # no batch statistics: branches do not influence each other through BatchNorm
    objective = DecropObjective(SIGMA, DecropConfig())
    x, x_b, x_int = _images(n_interp=1)
    torch.manual_seed(1)
    _, base = objective(denoiser, classifier, (x, x_b, x_int), torch.zeros(8).long())
    torch.manual_seed(1)
    _, other_b = objective(denoiser, classifier, (x, x_b.flip(0), x_int), torch.zeros(8).long())
    assert other_b["loss_lc"] == base["loss_lc"]
    assert other_b["loss_cs_int"] == base["loss_cs_int"] and other_b["loss_mmd_int"] == base["loss_mmd_int"]
    assert other_b["loss_cs_b"] != base["loss_cs_b"]


def test_without_boundary_samples_the_partner_only_feeds_the_interpolation():
    """attack=none (the supplementary's table 2): no boundary branch, so the partner x_b changes nothing and its
    terms are 0; attack=same_class trains on the same partner as if it were a boundary sample."""
    classifier, denoiser = _frozen(_classifier(train_steps=20)), _denoiser()
    denoiser.eval()
    x, x_b, x_int = _images(n_interp=1)
    labels = torch.zeros(8).long()
    results = {}
    for attack in ("none", "same_class"):
        objective = DecropObjective(SIGMA, DecropConfig(attack=attack))
        for name, partner in (("own", x_b), ("other", x_b.flip(0))):
            torch.manual_seed(1)
            loss, parts = objective(denoiser, classifier, (x, partner, x_int), labels)
            results[attack, name] = (loss.item(), parts)
    loss, parts = results["none", "own"]
    assert parts["loss_cs_b"] == 0 and parts["loss_mmd_b"] == 0 and results["none", "other"][0] == loss
    cfg = DecropConfig()
    assert loss == pytest.approx(cfg.w_lc * parts["loss_lc"] + cfg.w_cs * parts["loss_cs_int"]
                                 + cfg.w_mmd * parts["loss_mmd_int"], rel=1e-5)
    assert results["same_class", "own"][1]["loss_cs_b"] > 0
    assert results["same_class", "other"][0] != results["same_class", "own"][0]
    assert results["same_class", "own"][1]["loss_cs_int"] == parts["loss_cs_int"]  # the same interpolation


# ---------------------------------------------------------------------------------------- domain adversarial

def _denoiser_grads(denoiser: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in denoiser.parameters()]


@pytest.mark.parametrize("progress", [0.3, 1.0])
def test_domain_gradient_reaching_the_denoiser_is_reversed_and_scaled_by_beta(progress):
    """With the other weights at 0 the loss is L_dd alone; its denoiser gradient must be -beta times the
    gradient of the same loss without the reversal layer (same noise, same discriminator)."""
    classifier = _frozen(_classifier(train_steps=20))
    cfg = DecropConfig(w_lc=0.0, w_cs=0.0, w_mmd=0.0)
    discriminator = DomainDiscriminator(128)
    objective = DecropObjective(SIGMA, cfg, discriminator)
    objective.set_progress(progress)
    beta = objective.beta
    assert beta > 0.5
    images = _images()
    x = images[0]

    denoiser = _denoiser()
    torch.manual_seed(7)  # the objective's noise draw
    loss, parts = objective(denoiser, classifier, images, torch.zeros(8).long())
    loss.backward()
    reversed_grads = _denoiser_grads(denoiser)
    assert loss.item() == pytest.approx(parts["loss_dd"])

    denoiser = _denoiser()  # the same weights, fresh gradients
    torch.manual_seed(7)
    delta = torch.randn_like(x) * SIGMA
    with torch.no_grad():
        phi_clean = F.normalize(classifier.features(x), dim=1)
    phi_den = F.normalize(classifier.features(denoiser(x + delta)), dim=1)
    domains = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    plain = F.cross_entropy(discriminator(torch.cat([phi_clean, phi_den])), domains)
    assert plain.item() == pytest.approx(parts["loss_dd"], rel=1e-5)  # same forward pass as the objective's
    plain.backward()
    for name, (g_rev, g_plain) in zip([n for n, _ in denoiser.named_parameters()],
                                      zip(reversed_grads, _denoiser_grads(denoiser))):
        assert g_plain.abs().sum() > 0, name
        torch.testing.assert_close(g_rev, -beta * g_plain, rtol=1e-4, atol=1e-7, msg=name)


def test_at_progress_zero_the_denoiser_gets_no_domain_gradient_but_the_discriminator_learns():
    classifier = _frozen(_classifier())
    objective = DecropObjective(SIGMA, DecropConfig(w_lc=0.0, w_cs=0.0, w_mmd=0.0), DomainDiscriminator(128))
    objective.set_progress(0.0)
    assert objective.beta == 0.0
    denoiser = _denoiser()
    loss, _ = objective(denoiser, classifier, _images(), torch.zeros(8).long())
    loss.backward()
    assert all(not p.grad.any() for p in denoiser.parameters())
    assert all(p.grad is not None and p.grad.any() for p in objective.discriminator.parameters())


def test_after_backward_steps_the_discriminator_down_its_own_loss():
    """The discriminator's update uses the plain (not reversed) gradient: its loss on the same features drops."""
    classifier, denoiser = _frozen(_classifier(train_steps=20)), _denoiser()
    cfg = DecropConfig(disc_lr=1e-2)
    discriminator = DomainDiscriminator(128)
    objective = DecropObjective(SIGMA, cfg, discriminator)
    objective.set_progress(1.0)
    before = {n: p.detach().clone() for n, p in discriminator.named_parameters()}
    torch.manual_seed(3)
    loss, parts = objective(denoiser, classifier, _images(), torch.zeros(8).long())
    loss.backward()
    objective.after_backward()
    changed = [n for n, p in discriminator.named_parameters() if not torch.equal(p, before[n])]
    assert changed == list(before)
    torch.manual_seed(3)  # the same noise draw, so the same features
    with torch.no_grad():
        _, parts_after = objective(denoiser, classifier, _images(), torch.zeros(8).long())
    assert parts_after["loss_dd"] < parts["loss_dd"]


def test_after_backward_does_not_accumulate_old_discriminator_gradients():
    classifier, denoiser = _frozen(_classifier()), _denoiser()
    objective = DecropObjective(SIGMA, DecropConfig(), DomainDiscriminator(128))
    objective.set_progress(1.0)
    torch.manual_seed(0)
    loss, _ = objective(denoiser, classifier, _images(), torch.zeros(8).long())
    loss.backward()
    first = [p.grad.clone() for p in objective.discriminator.parameters()]
    torch.manual_seed(0)
    loss, _ = objective(denoiser, classifier, _images(), torch.zeros(8).long())
    loss.backward()
    for g_first, p in zip(first, objective.discriminator.parameters()):
        torch.testing.assert_close(p.grad, g_first)  # zeroed before the second backward, not doubled


# ------------------------------------------------------------------------------------------ training hooks

class Recording(BaseObjective):
    """Wraps an objective, forwarding its hooks and recording progress values and the first call's weights."""

    name = "recording"

    def __init__(self, inner):
        self.inner = inner
        self.progress: list[float] = []
        self.after_backward_calls = 0
        self.first_state: dict[str, torch.Tensor] | None = None

    def set_progress(self, progress: float) -> None:
        self.progress.append(progress)
        self.inner.set_progress(progress)

    def after_backward(self) -> None:
        self.after_backward_calls += 1
        self.inner.after_backward()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def __call__(self, denoiser, classifier, images, labels):
        if self.first_state is None:
            self.first_state = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
        return self.inner(denoiser, classifier, images, labels)


def _loader(n: int = 16) -> tuple[DataLoader, torch.Tensor]:
    x, x_b, x_int = _images(n=n, n_interp=1)
    labels = torch.arange(n) % NUM_CLASSES
    loader = DataLoader(AugmentedTensorDataset((x, x_b, x_int), labels), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return loader, x


def test_training_keeps_the_classifier_bit_identical_and_ramps_progress_from_0_to_1():
    classifier = _classifier(train_steps=10)
    classifier.train()  # the loop must freeze BatchNorm by itself
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    denoiser = _denoiser()
    loader, x = _loader()
    objective = Recording(DecropObjective(SIGMA, DecropConfig(), DomainDiscriminator(128)))
    cfg = TrainConfig(epochs=3, batch_size=8, adam_epochs=1, lr=1e-3)
    sink = MemorySink()
    train_denoiser(denoiser, classifier, loader, objective, cfg, epochs=3, val_images=x, sigma=SIGMA, seed=0,
                   sink=sink)
    for key, value in classifier.state_dict().items():  # weights and running statistics alike
        assert torch.equal(value, state[key]), key
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    # Ganin & Lempitsky's p per iteration: steps done / steps of the stage (2 steps per epoch, 3 epochs).
    steps = 3 * len(loader)
    assert objective.progress == pytest.approx([i / steps for i in range(steps)])
    assert objective.after_backward_calls == steps
    per_epoch = [sum(beta_schedule(i / steps) for i in range(e * 2, e * 2 + 2)) / 2 for e in range(3)]
    assert sink.series("train/beta") == pytest.approx(per_epoch)  # the epoch's mean beta
    assert sink.series("train/beta")[0] > 0  # the first epoch already ramps (not beta = 0 for all of it)
    assert {f"train/{p}" for p in PARTS | {"loss_dd"}} <= set(sink.history[0])


def test_stage_two_starts_from_the_stage_one_weights_with_a_schedule_of_its_own():
    """Stage 2 is a run of its own (`decrop.stages.run_stages`): the stage-1 denoiser, a fresh Adam-then-SGD
    schedule counted from its own first epoch (Adam with empty moments, the Adam learning rate again)."""
    classifier = _classifier(train_steps=10)
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    denoiser = _denoiser()
    loader, x = _loader()
    train_cfg = TrainConfig(epochs=3, batch_size=8, adam_epochs=2, lr=1e-3, lr_step=1)
    common = dict(val_images=x, sigma=SIGMA, seed=0)
    initial = {k: v.clone() for k, v in denoiser.state_dict().items()}

    stage1 = Recording(DecropObjective(SIGMA, DecropConfig()))
    schedule1 = AdamThenSGD(denoiser.parameters(), train_cfg)
    result1 = train_denoiser(denoiser, classifier, loader, stage1, train_cfg, epochs=3, schedule=schedule1, **common)
    after_stage1 = {k: v.clone() for k, v in denoiser.state_dict().items()}
    assert any(not torch.equal(after_stage1[k], initial[k]) for k in initial)  # stage 1 trained
    assert isinstance(schedule1.optimizer, torch.optim.SGD)  # stage 1 ended in its SGD phase

    stage2 = Recording(DecropObjective(SIGMA, DecropConfig(), DomainDiscriminator(classifier.feature_dim)))
    schedule2 = AdamThenSGD(denoiser.parameters(), train_cfg)
    result2 = train_denoiser(denoiser, classifier, loader, stage2, train_cfg, epochs=2, schedule=schedule2,
                             epoch_offset=3, **common)

    for key, value in after_stage1.items():
        assert torch.equal(stage2.first_state[key], value), key
    assert any(not torch.equal(denoiser.state_dict()[k], after_stage1[k]) for k in after_stage1)  # stage 2 trained
    assert isinstance(schedule2.optimizer, torch.optim.Adam)  # restarted: Adam again, not stage 1's SGD
    assert next(iter(schedule2.optimizer.state.values()))["step"].item() == 2 * len(loader)  # its own moments
    assert [row["train/lr"] for row in result1.history] == pytest.approx([1e-3, 1e-3, 1e-3])
    assert [row["train/lr"] for row in result2.history] == pytest.approx([1e-3, 1e-3])
    assert [row["epoch"] for row in result1.history + result2.history] == [1, 2, 3, 4, 5]
    assert stage2.progress[0] == 0.0  # beta's ramp starts at stage 2
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, state[key]), key


# ------------------------------------------------------------------------------------------------ black box

@pytest.mark.parametrize("train_mode", [True, False])
def test_blackbox_returns_logits_without_a_graph_and_counts_queries(train_mode):
    model = _classifier().train(train_mode)
    model.requires_grad_(True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    box = BlackBox(model)
    x = _data(6)[0].requires_grad_(True)
    out = box(x)
    assert out.shape == (6, NUM_CLASSES)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.train(train_mode)
    torch.testing.assert_close(out, expected)  # eval-mode logits, whatever mode the model was in
    assert box.queries == 6
    box(x[:2])
    assert box.queries == 8
    assert model.training == train_mode
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_distilled_surrogate_agrees_more_with_the_blackbox():
    box = BlackBox(_classifier(seed=0, train_steps=30))
    surrogate = _classifier(seed=1).train()
    images, _ = _data(128, seed=5)

    def agreement() -> float:
        surrogate.eval()
        with torch.no_grad():
            return (surrogate(images).argmax(1) == box(images).argmax(1)).float().mean().item()

    before = agreement()
    sink = MemorySink()
    out = distill_surrogate(box, surrogate, images, BlackBoxConfig(epochs=6, lr=1e-2), image_size=SIZE, seed=0,
                            sink=sink)
    assert out is surrogate and not surrogate.training
    after = agreement()
    assert after > before + 0.2 and after >= 0.8, (before, after)
    assert [row["step"] for row in sink.history] == list(range(1, 7))
    assert box.queries >= 6 * len(images)
