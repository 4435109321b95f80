import torch
from torch import nn
from torch.utils.data import DataLoader

from decrop.config import TrainConfig
from decrop.data import AugmentedTensorDataset
from decrop.metrics import MemorySink
from decrop.objectives import MSEObjective, StabilityObjective
from decrop.training import AdamThenSGD, agreement, train_denoiser


def test_schedule_really_switches_from_adam_to_sgd_and_decays():
    cfg = TrainConfig(epochs=10, adam_epochs=3, lr=1e-3, lr_step=2, lr_gamma=0.1, momentum=0.9)
    schedule = AdamThenSGD(nn.Linear(2, 2).parameters(), cfg)
    kinds = [type(schedule.for_epoch(e)).__name__ for e in range(6)]
    assert kinds == ["Adam"] * 3 + ["SGD"] * 3
    assert schedule.optimizer.param_groups[0]["momentum"] == 0.9
    lrs = [schedule.lr_at(e) for e in range(8)]
    assert lrs[:5] == [1e-3] * 5 and abs(lrs[5] - 1e-4) < 1e-12 and abs(lrs[7] - 1e-5) < 1e-12


def test_schedule_without_adam_starts_with_sgd():
    schedule = AdamThenSGD(nn.Linear(2, 2).parameters(), TrainConfig(adam_epochs=0))
    assert isinstance(schedule.for_epoch(0), torch.optim.SGD)


def test_schedule_state_resumes_the_same_optimizer():
    cfg = TrainConfig(epochs=6, adam_epochs=2)
    model = nn.Linear(2, 2)
    schedule = AdamThenSGD(model.parameters(), cfg)
    opt = schedule.for_epoch(3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    resumed = AdamThenSGD(model.parameters(), cfg)
    resumed.load_state_dict(schedule.state_dict(), epoch=4)
    assert isinstance(resumed.optimizer, torch.optim.SGD)
    assert resumed.optimizer.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


class _Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x * self.scale


def _tiny_problem(n=64):
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(n, 1, 4, 4)
    labels = torch.zeros(n, dtype=torch.long)
    loader = DataLoader(AugmentedTensorDataset((x,), labels), batch_size=16, shuffle=True)
    return classifier, x, loader


def test_loop_trains_reports_and_leaves_the_classifier_untouched():
    classifier, x, loader = _tiny_problem()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    classifier.train()  # the loop must freeze it in eval mode and restore train mode afterwards
    denoiser = _Denoiser()
    sink = MemorySink()
    cfg = TrainConfig(epochs=4, adam_epochs=2, lr=0.05)
    result = train_denoiser(denoiser, classifier, loader, MSEObjective(0.1), cfg, epochs=4, val_images=x,
                            sigma=0.1, seed=0, sink=sink)
    assert [row["step"] for row in sink.history] == [1, 2, 3, 4]
    assert {"train/loss", "train/loss_mse", "train/lr", "val/agreement"} <= set(sink.history[0])
    assert sink.series("train/loss")[-1] < sink.series("train/loss")[0]  # MSE pulls scale towards 1
    assert abs(denoiser.scale.item() - 1) < 0.5
    assert result.final["epoch"] == 4
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    assert not denoiser.training


def test_stability_objective_gradient_reaches_denoiser_only():
    classifier, x, _ = _tiny_problem()
    classifier.requires_grad_(False)
    denoiser = _Denoiser()
    loss, parts = StabilityObjective(0.25)(denoiser, classifier, (x,), torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    assert denoiser.scale.grad is not None and denoiser.scale.grad != 0
    assert all(p.grad is None for p in classifier.parameters())
    assert parts["loss_lc"] == loss.item()


def test_agreement_is_one_for_identity_without_noise_and_reproducible():
    classifier, x, _ = _tiny_problem()
    assert agreement(nn.Identity(), classifier, x, sigma=1e-8, seed=0) == 1.0
    a = agreement(nn.Identity(), classifier, x, sigma=1.0, seed=3)
    assert a == agreement(nn.Identity(), classifier, x, sigma=1.0, seed=3)


def test_agreement_builds_no_autograd_graph():
    """The per-epoch validation metric and the clean accuracy run without autograd: with it, a forward pass of
    500 images through DnCNN 7x32 keeps ~0.6 GiB of activations, which the tuned allocator then holds."""
    from decrop.classifier import accuracy

    seen = []

    class Probe(nn.Module):
        def __init__(self, logits: bool):
            super().__init__()
            self.conv, self.logits = nn.Conv2d(1, 1, 1), logits

        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return self.conv(x).flatten(1) if self.logits else self.conv(x)

    images = torch.rand(6, 1, 2, 2)
    agreement(Probe(logits=False), Probe(logits=True), images, sigma=0.1, seed=0, batch_size=4)
    accuracy(Probe(logits=True), images, torch.zeros(6, dtype=torch.long), batch_size=4)
    assert seen and not any(seen)


def test_agreement_does_not_depend_on_its_batch_size():
    """Its batches are a memory setting only: the noise stream and so the metric are the same for any size."""
    torch.manual_seed(0)
    denoiser = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    images = torch.rand(50, 1, 8, 8)
    values = {agreement(denoiser, classifier, images, sigma=0.5, seed=3, batch_size=b) for b in (50, 20, 7, 1)}
    assert len(values) == 1 and 0 < values.pop() < 1
