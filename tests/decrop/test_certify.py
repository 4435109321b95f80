"""Tests for the certification engine: the bound and radius (decrop.bounds), CERTIFY/PREDICT (decrop.smooth),
the dataset runner (decrop.certify: seeds, sharding, packing, memory budget) and soundness in both modes."""

import dataclasses

import pytest
import torch
from scipy.stats import binom, norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from decrop.bounds import certified_radius, lower_confidence_bound
from decrop.certify import certify_indices, fit_batch_size
from decrop.config import CertifyConfig
from decrop.rows import CertRow, merge_rows
from decrop.smooth import ABSTAIN, Smooth

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only cost time on a shared CPU


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
    certify_indices(composed, image_dataset(2), [0, 1], CertifyConfig(n0=5, n=10, alpha=0.01, batch_size=8),
                    num_classes=4, sigma=0.25, seed=0)
    assert all(m.training for m in denoiser.modules())
    assert not any(m.training for m in classifier.modules())


def test_certify_rejects_wrong_logit_width() -> None:
    with pytest.raises(ValueError, match="logits"):
        Smooth(ConstantClassifier(10, cls=0), 5, sigma=0.25).certify(torch.rand(3, 4, 4), 5, 10, 0.01, 8)


# --- sharding and reproducibility ---------------------------------------------------------------------------

CERT = CertifyConfig(n0=20, n=100, alpha=0.05, batch_size=64, radii=(0.0,))
SMALL = dict(num_classes=4, sigma=0.5)


@pytest.mark.parametrize("mode", ["exact", "sequential"])
def test_sharded_run_equals_unsharded(mode: str) -> None:
    model, data = small_cnn(), image_dataset(6)
    cfg = dataclasses.replace(CERT, mode=mode)
    full = certify_indices(model, data, range(6), cfg, seed=7, **SMALL)
    halves = [certify_indices(model, data, part, cfg, seed=7, **SMALL) for part in ([3, 4, 5], [0, 1, 2])]
    assert without_time(merge_rows(halves)) == without_time(full)
    assert [r.idx for r in full] == list(range(6))
    assert all(r.correct == int(r.predict == r.label) for r in full)
    assert all(r.radius == 0.0 for r in full if r.predict == ABSTAIN)


def test_sequential_draws_stay_within_the_batch_and_count_every_forward_pass() -> None:
    """Every forward batch is at most batch_size, and `samples` is n0 plus every noisy copy classified;
    a clear image stops after a few small draws, an undecidable one (pA = 1/2 exactly) uses more of n."""
    sizes: list[int] = []

    class Recorder(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(len(x))
            return super().forward(x)

    model = Recorder(torch.ones(1, 2, 2), b=-2.0)  # class 1 iff the noisy grey image's pixel sum exceeds 2
    far, tie = torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 0.5)
    rows = []
    for image in (far, tie):
        sizes.clear()
        cfg = CertifyConfig(n0=30, n=2000, alpha=0.001, batch_size=256, mode="sequential", radii=(0.0, 0.25))
        rows += certify_indices(model, [(image, 1)], [0], cfg, num_classes=2, sigma=0.25, seed=0)
        assert max(sizes) <= 256 and sum(sizes) == rows[-1].samples
    assert rows[0].predict == 1 and rows[0].radius == 0.25 and rows[0].samples < 200
    assert rows[1].samples > 1000


def test_same_seed_same_rows_different_seed_differs() -> None:
    model, data = small_cnn(), image_dataset(6)
    a = certify_indices(model, data, range(6), CERT, seed=1, **SMALL)
    b = certify_indices(model, data, range(6), CERT, seed=1, **SMALL)
    c = certify_indices(model, data, range(6), CERT, seed=2, **SMALL)
    assert without_time(a) == without_time(b)
    assert without_time(a) != without_time(c)


def test_progress_is_called_per_image() -> None:
    calls = []
    rows = certify_indices(small_cnn(), image_dataset(3), [2, 0], CERT, seed=0, progress=lambda *a: calls.append(a),
                           **SMALL)
    assert [(done, total, row.idx) for done, total, row in calls] == [(1, 2, 2), (2, 2, 0)]
    assert [row for _, _, row in calls] == rows


def test_merge_rows_rejects_duplicates() -> None:
    row = CertRow(1, 0, 0, 0.5, 1, 0.1)
    with pytest.raises(ValueError, match="duplicate idx 1"):
        merge_rows([[row], [dataclasses.replace(row, radius=0.2)]])


# --- soundness against a closed form ------------------------------------------------------------------------


def linear_problem(p_true: torch.Tensor, sigma: float, seed: int = 3):
    """Images whose smoothed top-class probability under f(x) = [w.x + b > 0] is ``p_true`` (float64, > 1/2),
    on random sides of the boundary. The smoothed classifier predicts sign(w.x + b) with exact l2 radius
    |w.x + b| / |w| = sigma Phi^-1(pA); returns (model, data, true radius of each image as stored)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 4, 4, generator=g)
    w_hat = w / w.norm()
    b = -0.5 * w.sum().item()  # the decision boundary passes through the grey image
    side = torch.randint(0, 2, (len(p_true),), generator=g) * 2 - 1
    margin = side * sigma * torch.from_numpy(norm.ppf(p_true.numpy()))  # signed l2 distance to boundary
    data = [(0.5 + m.float() * w_hat, int(s > 0)) for m, s in zip(margin, side)]
    w64 = w.double().flatten()
    true_radius = [abs(float(x.double().flatten() @ w64 + b)) / float(w64.norm()) for x, _ in data]
    return Linear(w, b), data, true_radius


def wrong_certificates(rows: list[CertRow], true_radius: list[float]) -> int:
    """Certificates with the wrong class or a radius above the true one (exact comparison: none is rounded)."""
    return sum(r.predict != ABSTAIN and (r.correct == 0 or r.radius > rad) for r, rad in zip(rows, true_radius))


@pytest.mark.parametrize("mode", ["exact", "sequential"])
def test_certified_radii_of_a_linear_classifier_are_sound_and_not_vacuous(mode: str) -> None:
    """True pA spread over (0.5, 0.999): few wrong certificates, most points certified, radii near the truth."""
    num, sigma, alpha = 200, 0.25, 0.05
    p_true = 0.5 + 0.499 * torch.rand(num, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model, data, true_radius = linear_problem(p_true, sigma)
    cfg = CertifyConfig(n0=50, n=500, alpha=alpha, batch_size=550, mode=mode, radii=(0.0, 0.1, 0.2))
    rows = certify_indices(model, data, range(num), cfg, num_classes=2, sigma=sigma, seed=0)
    assert wrong_certificates(rows, true_radius) <= binom.ppf(0.999, num, alpha)  # ~21 of 200
    assert sum(r.predict != ABSTAIN for r in rows) > num // 2  # most points are certified at all
    ratio = [r.radius / rad for r, rad in zip(rows, true_radius) if r.correct]
    assert sum(ratio) / len(ratio) > (0.5 if mode == "exact" else 0.3)  # radii track the true ones
    samples = [r.samples for r in rows]
    if mode == "exact":
        assert samples == [550] * num
    else:  # points far from every reported threshold stop early
        assert max(samples) <= 550 and sum(samples) / num < 0.8 * 550


# Soundness with power, through the whole sampling path. alpha = 0.1; every image's pA sits just below the point
# where the certificate is nearly exact, so a valid certifier fails close to alpha of the time and one run at
# 2 x alpha fails clearly more often than a level-alpha certifier may. Exact mode: pA just below CP(170 of 200),
# failure probability alpha - 1e-5 (the binomial tail). Sequential mode, one radius r*: the threshold
# Phi(r* / sigma) is CP(170 of 200) at the final look's level 0.8 alpha and pA sits just below it (failure
# measured at ~8.5% with decrop.sequential's own simulation, tests/decrop/test_sequential.py).
POWER = dict(num=1500, sigma=0.25, n0=20, n=200, alpha=0.1)


@pytest.mark.parametrize("mode", ["exact", "sequential"])
@pytest.mark.parametrize("scale, valid", [(1, True), (2, False)], ids=["alpha", "2alpha"])
def test_a_certifier_at_2_alpha_fails_the_soundness_check_a_valid_one_passes(mode: str, scale: int,
                                                                             valid: bool) -> None:
    num, sigma, n0, n, alpha = POWER.values()
    level = alpha if mode == "exact" else 0.8 * alpha
    threshold = lower_confidence_bound(170, n, level)
    p_true = torch.full((num,), threshold - 1e-6, dtype=torch.float64)
    model, data, true_radius = linear_problem(p_true, sigma)
    radii = (float(sigma * norm.ppf(threshold)),)
    cfg = CertifyConfig(n0=n0, n=n, alpha=scale * alpha, batch_size=50 if mode == "sequential" else 2000, mode=mode,
                        radii=radii)
    rows = certify_indices(model, data, range(num), cfg, num_classes=2, sigma=sigma, seed=1)
    wrong = wrong_certificates(rows, true_radius)
    limit = binom.ppf(0.999, num, alpha)  # ~186 of 1500
    assert (wrong <= limit) == valid, f"{wrong} wrong certificates of {num}, limit {limit}"
    if valid:
        assert wrong > 0.06 * num  # the check is sharp: a valid certifier is close to the limit


def test_packing_images_into_one_batch_changes_no_result() -> None:
    """batch_size 1000 with n0 = n = 100 packs 10 images per forward pass; batch_size 100 packs none.
    Each image draws its noise from its own generator either way, so the rows are identical."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    data = [(torch.rand(1, 8, 8), i % 3) for i in range(23)]
    common = dict(num_classes=3, sigma=0.5, seed=4)
    cfg = CertifyConfig(n0=100, n=100, alpha=0.01)
    packed = certify_indices(model, data, range(23), dataclasses.replace(cfg, batch_size=1000), **common)
    alone = certify_indices(model, data, range(23), dataclasses.replace(cfg, batch_size=100), **common)
    assert [(r.idx, r.predict, r.radius) for r in packed] == [(r.idx, r.predict, r.radius) for r in alone]
    assert len({r.predict for r in packed}) > 1  # a model with varied answers, so equality means something


def test_bf16_autocast_certifies_and_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    data = [(torch.rand(1, 8, 8), i % 3) for i in range(10)]
    common = dict(num_classes=3, sigma=0.25, seed=1)
    cfg = CertifyConfig(n0=50, n=400, alpha=0.01, batch_size=450)
    fp32 = certify_indices(model, data, range(10), cfg, **common)
    bf16 = certify_indices(model, data, range(10), dataclasses.replace(cfg, precision="bf16"), **common)
    assert sum(a.predict == b.predict for a, b in zip(fp32, bf16)) >= 8
    with pytest.raises(ValueError, match="precision"):  # the section's constructor does not check choices
        certify_indices(model, data, range(1), dataclasses.replace(cfg, precision="int8"), **common)


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
    common = dict(num_classes=3, sigma=0.5, seed=2)
    cfg = CertifyConfig(n0=50, n=300, alpha=0.01)
    chosen = fit_batch_size(model, (1, 8, 8), "cpu", 0.5, upper=1000)
    assert 1 < chosen < 300  # the budget binds: several forward batches per image
    budgeted = certify_indices(model, data, range(4), dataclasses.replace(cfg, batch_size=1000, memory_mb=0.5),
                               **common)
    explicit = certify_indices(model, data, range(4), dataclasses.replace(cfg, batch_size=chosen), **common)
    assert without_time(budgeted) == without_time(explicit)
