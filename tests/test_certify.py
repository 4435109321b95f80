"""Tests for the certification engine: the bound and radius (decrop.bounds), CERTIFY/PREDICT (decrop.smooth),
the dataset runner (decrop.certify: seeds, sharding, packing, memory budget) and soundness in both modes."""

import dataclasses

import pytest
import torch
from scipy.stats import binom, norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from decrop.bounds import certified_radius, lower_confidence_bound
from decrop.certify import certify_indices, fit_batch_size, merge_rows
from decrop.rows import CertRow
from decrop.smooth import ABSTAIN, Smooth


class ConstantClassifier(nn.Module):
    """Always predicts `cls` whatever the input."""

    def __init__(self, num_classes: int, cls: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes), requires_grad=False)
        self.logits.data[cls] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


class NoiseLogits(nn.Module):
    """Logits are the first pixels of the noisy input: on a constant image the argmax is uniformly random."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.num_classes]


class Linear(nn.Module):
    """Binary linear classifier: class 1 iff w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.flatten(), requires_grad=False)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def small_cnn(num_classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes),
    )


def image_dataset(num: int = 6, num_classes: int = 4) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(3, 8, 8, generator=g), i % num_classes) for i in range(num)]


def without_time(rows: list[CertRow]) -> list[CertRow]:
    return [dataclasses.replace(r, time=0.0) for r in rows]


# --- the bound and the radius -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 100, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.2])
def test_lower_bound_matches_statsmodels(n: int, alpha: float) -> None:
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(expected, abs=1e-12)
    assert lower_confidence_bound(0, n, alpha) == 0.0
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n))


def test_lower_bound_rejects_bad_arguments() -> None:
    for k, n, alpha in [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (5, 10, 0.0), (5, 10, 1.0)]:
        with pytest.raises(ValueError):
            lower_confidence_bound(k, n, alpha)


def test_certified_radius_formula() -> None:
    for p in [0.5, 0.6, 0.9, 0.999]:
        for sigma in [0.12, 0.25, 1.0]:
            assert certified_radius(p, sigma) == pytest.approx(sigma * norm.ppf(p))
    assert certified_radius(0.5, 0.5) == 0.0


# --- CERTIFY and PREDICT ------------------------------------------------------------------------------------


def test_sample_noise_counts_and_noise_level() -> None:
    seen: list[torch.Tensor] = []

    class Recorder(NoiseLogits):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return super().forward(x)

    x = torch.full((1, 16, 16), 0.3)
    counts = Smooth(Recorder(5), 5, sigma=0.25)._sample_noise(x, 250, 100, torch.Generator().manual_seed(0))
    assert counts.shape == (5,) and counts.dtype == torch.long and int(counts.sum()) == 250
    assert [b.shape[0] for b in seen] == [100, 100, 50]
    noise = torch.cat(seen) - x
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(0.25, rel=0.02)


def test_certify_abstains_on_uniformly_random_classifier() -> None:
    smooth = Smooth(NoiseLogits(10), 10, sigma=0.5)
    x = torch.full((1, 4, 4), 0.5)
    pred, radius = smooth.certify(x, n0=100, n=1000, alpha=0.001, batch_size=256,
                                  generator=torch.Generator().manual_seed(0))
    assert (pred, radius) == (ABSTAIN, 0.0)


@pytest.mark.parametrize("sigma", [0.12, 0.5])
def test_certify_constant_classifier_gets_the_maximal_radius(sigma: float) -> None:
    n, alpha = 1000, 0.001
    smooth = Smooth(ConstantClassifier(10, cls=3), 10, sigma=sigma)
    pred, radius = smooth.certify(torch.rand(3, 8, 8), n0=10, n=n, alpha=alpha, batch_size=300)
    assert pred == 3
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)))


def test_predict_abstains_near_half_and_answers_for_constant() -> None:
    half = Linear(torch.ones(1, 2, 2), b=-2.0)  # w.x + b = sum of noise: class 0 or 1 with probability 1/2
    x = torch.full((1, 2, 2), 0.5)
    g = torch.Generator().manual_seed(0)
    assert Smooth(half, 2, sigma=0.25).predict(x, n=1000, alpha=0.001, batch_size=256, generator=g) == ABSTAIN
    assert Smooth(ConstantClassifier(10, cls=7), 10, sigma=0.25).predict(x, 100, 0.001, 64) == 7


def test_model_modes_are_restored() -> None:
    model = small_cnn().train()
    smooth = Smooth(model, 4, sigma=0.25)
    smooth.certify(torch.rand(3, 8, 8), n0=10, n=20, alpha=0.01, batch_size=16)
    smooth.predict(torch.rand(3, 8, 8), n=20, alpha=0.01, batch_size=16)
    assert all(m.training for m in model.modules())

    denoiser, classifier = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout()).train(), small_cnn().eval()
    composed = nn.Sequential(denoiser, classifier)
    certify_indices(composed, image_dataset(2), [0, 1], num_classes=4, sigma=0.25, n0=5, n=10,
                    alpha=0.01, batch_size=8, seed=0)
    assert all(m.training for m in denoiser.modules())
    assert not any(m.training for m in classifier.modules())


def test_certify_rejects_wrong_logit_width() -> None:
    with pytest.raises(ValueError, match="logits"):
        Smooth(ConstantClassifier(10, cls=0), 5, sigma=0.25).certify(torch.rand(3, 4, 4), 5, 10, 0.01, 8)


# --- sharding and reproducibility ---------------------------------------------------------------------------

CERT = dict(num_classes=4, sigma=0.5, n0=20, n=100, alpha=0.05, batch_size=64)


def test_sharded_run_equals_unsharded() -> None:
    model, data = small_cnn(), image_dataset(6)
    full = certify_indices(model, data, range(6), seed=7, **CERT)
    halves = [certify_indices(model, data, part, seed=7, **CERT) for part in ([3, 4, 5], [0, 1, 2])]
    assert without_time(merge_rows(halves)) == without_time(full)
    assert [r.idx for r in full] == list(range(6))
    assert all(r.correct == int(r.predict == r.label) for r in full)
    assert all((r.predict == ABSTAIN) == (r.radius == 0.0) for r in full)


def test_same_seed_same_rows_different_seed_differs() -> None:
    model, data = small_cnn(), image_dataset(6)
    a = certify_indices(model, data, range(6), seed=1, **CERT)
    b = certify_indices(model, data, range(6), seed=1, **CERT)
    c = certify_indices(model, data, range(6), seed=2, **CERT)
    assert without_time(a) == without_time(b)
    assert without_time(a) != without_time(c)


def test_progress_is_called_per_image() -> None:
    calls = []
    rows = certify_indices(small_cnn(), image_dataset(3), [2, 0], seed=0, progress=lambda *a: calls.append(a),
                           **CERT)
    assert [(done, total, row.idx) for done, total, row in calls] == [(1, 2, 2), (2, 2, 0)]
    assert [row for _, _, row in calls] == rows


def test_merge_rows_rejects_duplicates() -> None:
    row = CertRow(1, 0, 0, 0.5, 1, 0.1)
    with pytest.raises(ValueError, match="duplicate idx 1"):
        merge_rows([[row], [dataclasses.replace(row, radius=0.2)]])


# --- soundness against a closed form ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "sequential"])
def test_certified_radius_is_sound_for_a_linear_classifier(mode: str) -> None:
    """For f(x) = [w.x + b > 0] the smoothed classifier predicts sign(w.x + b) with exact l2 radius
    |w.x + b| / |w|. A certificate is wrong if its class is wrong or its radius exceeds the true radius;
    that may happen for at most an alpha fraction of points (up to binomial noise), in both modes."""
    num, sigma, alpha = 200, 0.25, 0.05
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 4, 4, generator=g)
    w_hat = w / w.norm()
    b = -0.5 * w.sum().item()  # the decision boundary passes through the grey image
    # True top-class probabilities spread over (0.5, 0.999), on both sides of the boundary.
    p_true = 0.5 + 0.499 * torch.rand(num, generator=g, dtype=torch.float64)
    side = torch.randint(0, 2, (num,), generator=g) * 2 - 1
    margin = side * sigma * torch.from_numpy(norm.ppf(p_true.numpy()))  # signed l2 distance to boundary
    data = [(0.5 + m.float() * w_hat, int(s > 0)) for m, s in zip(margin, side)]

    rows = certify_indices(Linear(w, b), data, range(num), num_classes=2, sigma=sigma, n0=50, n=500,
                           alpha=alpha, batch_size=550, seed=0, mode=mode, radii=(0.0, 0.1, 0.2))
    true_radius = margin.abs().tolist()
    wrong = sum(r.predict != ABSTAIN and (r.correct == 0 or r.radius > rad + 1e-6)
                for r, rad in zip(rows, true_radius))
    assert wrong <= binom.ppf(0.999, num, alpha)  # ~21 of 200
    assert sum(r.predict != ABSTAIN for r in rows) > num // 2  # most points are certified at all
    # The bound is also not vacuous: certified radii track the true ones.
    ratio = [r.radius / rad for r, rad in zip(rows, true_radius) if r.correct]
    assert sum(ratio) / len(ratio) > (0.5 if mode == "exact" else 0.3)
    samples = [r.samples for r in rows]
    if mode == "exact":
        assert samples == [550] * num
    else:  # points far from every reported threshold stop at an early look
        assert max(samples) <= 550 and sum(samples) / num < 0.8 * 550


def test_packing_images_into_one_batch_changes_no_result() -> None:
    """batch_size 1000 with n0 = n = 100 packs 10 images per forward pass; batch_size 100 packs none.
    Each image draws its noise from its own generator either way, so the rows are identical."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    data = [(torch.rand(1, 8, 8), i % 3) for i in range(23)]
    common = dict(num_classes=3, sigma=0.5, n0=100, n=100, alpha=0.01, seed=4)
    packed = certify_indices(model, data, range(23), batch_size=1000, **common)
    alone = certify_indices(model, data, range(23), batch_size=100, **common)
    assert [(r.idx, r.predict, r.radius) for r in packed] == [(r.idx, r.predict, r.radius) for r in alone]
    assert len({r.predict for r in packed}) > 1  # a model with varied answers, so equality means something


def test_bf16_autocast_certifies_and_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    data = [(torch.rand(1, 8, 8), i % 3) for i in range(10)]
    common = dict(num_classes=3, sigma=0.25, n0=50, n=400, alpha=0.01, seed=1, batch_size=450)
    fp32 = certify_indices(model, data, range(10), **common)
    bf16 = certify_indices(model, data, range(10), precision="bf16", **common)
    assert sum(a.predict == b.predict for a, b in zip(fp32, bf16)) >= 8
    with pytest.raises(ValueError, match="precision"):
        certify_indices(model, data, range(1), precision="int8", **common)


def test_fit_batch_size_follows_the_budget_and_the_activation_size() -> None:
    """One conv 1 -> 16 channels at 32x32 then ReLU: the largest layer holds input + output = 2 x 16 x 32 x 32
    floats per image; with the noisy batch and the 1.5x margin that is 1.5 x (32768 + 1024) x 4 bytes."""
    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(width * 32 * 32, 3)).train()

    model = net(16)
    per_image = 1.5 * (2 * 16 * 1024 + 1024) * 4
    assert fit_batch_size(model, (1, 32, 32), "cpu", 64, upper=10**6) == int(64 * 2**20 // per_image)
    assert model.training  # mode restored
    assert fit_batch_size(model, (1, 32, 32), "cpu", 64, upper=100) == 100  # the configured batch is the most
    assert fit_batch_size(model, (1, 32, 32), "cpu", 0.001, upper=100) == 1  # never below one image
    wide = fit_batch_size(net(64), (1, 32, 32), "cpu", 64, upper=10**6)
    assert 3.5 < fit_batch_size(model, (1, 32, 32), "cpu", 64, upper=10**6) / wide < 4.5
    with pytest.raises(ValueError):
        fit_batch_size(model, (1, 32, 32), "cpu", 0, upper=100)


def test_memory_budget_certifies_like_the_batch_it_chooses() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
    data = [(torch.rand(1, 8, 8), i % 3) for i in range(4)]
    common = dict(num_classes=3, sigma=0.5, n0=50, n=300, alpha=0.01, seed=2)
    chosen = fit_batch_size(model, (1, 8, 8), "cpu", 0.5, upper=1000)
    assert 1 < chosen < 300  # the budget binds: several forward batches per image
    budgeted = certify_indices(model, data, range(4), batch_size=1000, memory_mb=0.5, **common)
    explicit = certify_indices(model, data, range(4), batch_size=chosen, **common)
    assert without_time(budgeted) == without_time(explicit)
