"""DE-CROP's losses (decrop.losses): values at known points, symmetry, and the gradient-reversal layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from decrop.losses import beta_schedule, cosine_loss, label_consistency_loss, mmd_loss, reverse_gradient


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------------ MMD

def test_mmd_of_a_set_with_itself_is_zero():
    a = torch.randn(40, 16)  # > 25 rows: torch.cdist takes its matmul path, which must still give 0
    assert abs(mmd_loss(a, a).item()) < 1e-6
    assert abs(mmd_loss(a[:10], a[:10]).item()) < 1e-6


def test_mmd_is_positive_and_grows_with_the_shift():
    a = torch.randn(32, 16)
    values = [mmd_loss(a, a + shift).item() for shift in (0.1, 0.3, 1.0, 3.0)]
    assert values[0] > 0
    assert all(later > earlier for earlier, later in zip(values, values[1:])), values


def test_mmd_separates_different_distributions_more_than_same_ones():
    a, b, c = torch.randn(64, 8), torch.randn(64, 8), torch.randn(64, 8) + 2.0
    assert mmd_loss(a, c).item() > 5 * mmd_loss(a, b).item()


def test_mmd_is_symmetric_and_nonnegative():
    a, b = torch.randn(20, 8), torch.randn(30, 8) * 2 + 0.5
    ab, ba = mmd_loss(a, b), mmd_loss(b, a)
    assert ab.item() > 0
    assert torch.allclose(ab, ba, atol=1e-6)


def test_mmd_gradient_is_finite_even_with_coincident_points():
    a = torch.randn(30, 8, requires_grad=True)
    b = torch.cat([a.detach()[:10], torch.randn(20, 8)]).requires_grad_(True)  # 10 exact duplicates
    mmd_loss(a, b).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert b.grad.abs().sum() > 0


def _reference_mmd(a, b):
    """The MMD of decrop.losses spelled out with loops: biased MMD^2, 5 Gaussian kernels exp(-d^2 / (h 2^(k-2))),
    h = mean squared distance over distinct pairs of the pooled batch."""
    pooled = torch.cat([a, b]).double()
    n = len(pooled)
    d2 = [[float(((pooled[i] - pooled[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    h = sum(d2[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)

    def k(i, j):
        return sum(math.exp(-d2[i][j] / (h * 2.0 ** (q - 2))) for q in range(5))

    na, nb = len(a), len(b)
    xx = sum(k(i, j) for i in range(na) for j in range(na)) / na ** 2
    yy = sum(k(i, j) for i in range(na, n) for j in range(na, n)) / nb ** 2
    xy = sum(k(i, j) for i in range(na) for j in range(na, n)) / (na * nb)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("sizes", [(6, 6), (5, 9)])
def test_mmd_matches_the_multi_kernel_definition(sizes):
    a, b = torch.randn(sizes[0], 4), torch.randn(sizes[1], 4) * 1.5 + 0.3
    assert mmd_loss(a, b).item() == pytest.approx(_reference_mmd(a, b), rel=1e-4, abs=1e-6)


def test_mmd_bandwidth_is_detached():
    """The data-driven scale h carries no gradient: the loss cannot lower itself by inflating distances."""
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, 4)
    (grad,) = torch.autograd.grad(mmd_loss(a, b), a)
    eps = 1e-3
    direction = torch.randn_like(a)
    # numerical derivative with h frozen at its value at `a`: pooled distances recomputed, h held fixed
    pooled = torch.cat([a.detach(), b])
    sq = torch.cdist(pooled, pooled).pow(2)
    h = sq.sum() / (len(pooled) ** 2 - len(pooled))

    def fixed_h_mmd(a_):
        p = torch.cat([a_, b]).double()
        s = torch.cdist(p, p).pow(2)
        kern = sum(torch.exp(-s / (h.double() * 2.0 ** (q - 2))) for q in range(5))
        return kern[:6, :6].mean() + kern[6:, 6:].mean() - 2 * kern[:6, 6:].mean()

    numeric = (fixed_h_mmd(a.detach() + eps * direction) - fixed_h_mmd(a.detach() - eps * direction)) / (2 * eps)
    assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-6)


# --------------------------------------------------------------------------------------------------- cosine

def test_cosine_loss_at_identical_opposite_and_orthogonal_logits():
    z = torch.randn(6, 10)
    assert cosine_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(z, 3 * z).item() == pytest.approx(0.0, abs=1e-6)  # direction, not magnitude
    assert cosine_loss(-z, z).item() == pytest.approx(2.0, abs=1e-6)
    e0, e1 = torch.eye(4)[:2]
    assert cosine_loss(e0.repeat(3, 1), e1.repeat(3, 1)).item() == pytest.approx(1.0, abs=1e-6)


def test_cosine_loss_is_the_batch_mean():
    z = torch.randn(2, 5)
    target = torch.stack([z[0], -z[1]])  # one identical (0), one opposite (2) -> mean 1
    assert cosine_loss(z, target).item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------- label consistency

def test_label_consistency_is_cross_entropy_against_the_clean_prediction():
    logits, clean = torch.randn(8, 5), torch.randn(8, 5)
    expected = F.cross_entropy(logits, clean.argmax(1))
    assert torch.allclose(label_consistency_loss(logits, clean), expected)
    # the target is the prediction, not the clean logits as soft labels nor any true label
    assert not torch.allclose(label_consistency_loss(logits, clean),
                              F.cross_entropy(logits, F.softmax(clean, 1)))


def test_label_consistency_gradient_does_not_reach_the_clean_logits():
    logits = torch.randn(4, 3, requires_grad=True)
    clean = torch.randn(4, 3, requires_grad=True)
    label_consistency_loss(logits, clean).backward()
    assert logits.grad is not None and clean.grad is None


# ---------------------------------------------------------------------------------------- gradient reversal

@pytest.mark.parametrize("beta", [0.0, 0.37, 1.0, 2.0])
def test_reverse_gradient_is_identity_forward_and_negated_scaled_backward(beta):
    w = torch.randn(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    out = reverse_gradient(x, beta)
    assert torch.equal(out, x)
    (grad_reversed,) = torch.autograd.grad(torch.tanh(out @ w).pow(2).sum(), x)
    (grad_plain,) = torch.autograd.grad(torch.tanh(x @ w).pow(2).sum(), x)
    assert torch.equal(grad_reversed, -beta * grad_plain)


def test_reverse_gradient_leaves_layers_after_it_untouched():
    layer = torch.nn.Linear(5, 2)
    x = torch.randn(4, 5, requires_grad=True)
    layer(reverse_gradient(x, 3.0)).sum().backward()
    grad_after = layer.weight.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    assert torch.equal(grad_after, layer.weight.grad)  # only what lies *before* the layer is reversed


# ------------------------------------------------------------------------------------------------ beta(p)

def test_beta_schedule_endpoints():
    assert beta_schedule(0.0) == 0.0
    assert beta_schedule(1.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-10.0)) - 1), rel=1e-12)
    assert beta_schedule(1.0, scale=0.5, gamma=3.0) == pytest.approx(0.5 * (2 / (1 + math.exp(-3.0)) - 1))
    assert beta_schedule(0.0, scale=5.0, gamma=1.0) == 0.0


def test_beta_schedule_is_monotone_increasing():
    values = [beta_schedule(p / 20) for p in range(21)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] < 2.0


@pytest.mark.parametrize("progress", [-0.01, 1.01, 2.0])
def test_beta_schedule_rejects_progress_outside_unit_interval(progress):
    with pytest.raises(ValueError, match="progress"):
        beta_schedule(progress)
