"""Tests of decrop.models, parametrized over every registered name (timm-style)."""

import pytest
import torch
from torch import nn

from decrop.models import (CLASSIFIERS, DENOISERS, CifarResNet, DnCNN, DomainDiscriminator, MemNet, Normalize,
                           SmallCNN, create_model, model_names)

SHAPES = [(2, 1, 28, 28), (2, 3, 32, 32)]


def _build(name: str, channels: int, **kwargs) -> nn.Module:
    if name in CLASSIFIERS:
        return create_model(name, in_channels=channels, num_classes=10, mean=(0.5,) * channels,
                            std=(0.25,) * channels, **kwargs)
    return create_model(name, in_channels=channels, **kwargs)


def _small_denoiser(name: str, channels: int) -> nn.Module:
    """Reduced sizes keep the training-step tests fast; the structure is unchanged."""
    if name == "dncnn":
        return create_model(name, in_channels=channels, depth=5, width=16)
    return create_model(name, in_channels=channels, width=16, num_memblocks=2, num_resblocks=2)


def test_registry_partitions_names() -> None:
    assert sorted(CLASSIFIERS + DENOISERS) == model_names()
    assert set(CLASSIFIERS) == {"small_cnn", "resnet20", "resnet56", "resnet110"}
    assert set(DENOISERS) == {"dncnn", "memnet"}


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", model_names())
def test_output_shape(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape[1]).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        out = model(x)
    expected = (shape[0], 10) if name in CLASSIFIERS else shape
    assert out.shape == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_features_feed_the_head(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, in_channels=shape[1], num_classes=7).eval()
    assert model.num_classes == 7
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (model.feature_dim, 7)
    x = torch.rand(shape)
    feats = model.features(x)
    assert feats.shape == (shape[0], model.feature_dim)
    assert feats.requires_grad  # the feature losses (MMD, discriminator) backpropagate through it
    torch.testing.assert_close(model(x), model.head(feats))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_normalises_inside(name: str) -> None:
    """Pixel-space inputs: the model with stats (m, s) on x equals the same model with (0, 1) on (x - m) / s."""
    model = _build(name, 3).eval()
    norm = next(m for m in model.modules() if isinstance(m, Normalize))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        standardised = (x - norm.mean) / norm.std
        norm.mean.zero_()
        norm.std.fill_(1.0)
        torch.testing.assert_close(model(standardised), expected)


def test_normalize_values_and_device_follow() -> None:
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(4, 3, 5, 5)
    out = norm(x)
    torch.testing.assert_close(out[:, 0], (x[:, 0] - 0.5) / 0.5)
    torch.testing.assert_close(out[:, 2], x[:, 2] / 2.0)
    assert {"mean", "std"} <= set(norm.state_dict())  # travels inside checkpoints
    assert norm.to(torch.float64)(x.double()).dtype == torch.float64


def test_normalize_rejects_bad_stats() -> None:
    with pytest.raises(ValueError, match="same length"):
        Normalize((0.5, 0.5), (0.5,))
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="in_channels=1"):
        SmallCNN(in_channels=1, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", DENOISERS)
def test_denoiser_is_identity_at_init(name: str, shape: tuple[int, ...], train: bool) -> None:
    model = _build(name, shape[1]).train(train)
    for x in (torch.rand(shape), 3 * torch.randn(shape)):  # images, and far outside [0, 1]
        with torch.no_grad():
            assert torch.equal(model(x), x)


@pytest.mark.parametrize("name", DENOISERS)
def test_denoiser_zero_init_still_learns(name: str) -> None:
    model = _small_denoiser(name, 1).train()
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert torch.count_nonzero(last_conv.weight) == 0
    x = torch.rand(4, 1, 28, 28)
    noisy = x + 0.25 * torch.randn_like(x)
    loss = (model(noisy) - x).pow(2).mean()
    loss.backward()
    assert last_conv.weight.grad is not None and last_conv.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.allclose(model(noisy), noisy, atol=1e-6)
        assert (model(noisy) - x).pow(2).mean() < loss  # the step went downhill


@pytest.mark.parametrize("name", model_names())
def test_channels_last_gives_same_result(name: str) -> None:
    model = (_build(name, 3) if name in CLASSIFIERS else _small_denoiser(name, 3)).eval()
    if name in DENOISERS:  # move the zero-init conv off zero so the whole network is exercised
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        create_model("resnet18")
    assert "resnet18" in str(err.value)
    assert str(model_names()) in str(err.value)


@pytest.mark.parametrize("name, kwargs", [("small_cnn", {"colour": True}), ("resnet20", {"depth": 56}),
                                          ("dncnn", {"in_channels": 1, "num_memblocks": 3})])
def test_unknown_kwargs_raise_type_error(name: str, kwargs: dict) -> None:
    with pytest.raises(TypeError):
        create_model(name, **kwargs)


@pytest.mark.parametrize("depth", [0, 2, 21, 33])
def test_resnet_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=r"6n \+ 2"):
        CifarResNet(depth)


@pytest.mark.parametrize("name, blocks", [("resnet20", 3), ("resnet56", 9), ("resnet110", 18)])
def test_resnet_depth(name: str, blocks: int) -> None:
    model = create_model(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 6 * blocks + 2  # stem conv + 2 per block + the linear head
    if name == "resnet20":  # He et al. 2016, Table 6: 0.27M parameters
        assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_dncnn_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=">= 3"):
        DnCNN(1, depth=depth)


def test_dncnn_depth_counts_convs() -> None:
    model = DnCNN(3, depth=7, width=32, batch_norm=False)
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 7
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_memnet_gate_sees_all_memories() -> None:
    model = MemNet(1, width=8, num_memblocks=3, num_resblocks=2)
    gates = [block.gate[-1] for block in model.blocks]
    # block i concatenates its 2 short-term outputs with i + 1 long-term memories
    assert [g.in_channels for g in gates] == [8 * (2 + 1), 8 * (2 + 2), 8 * (2 + 3)]
    assert all(g.kernel_size == (1, 1) for g in gates)
    with pytest.raises(ValueError):
        MemNet(1, num_memblocks=0)


def test_domain_discriminator_is_the_papers_vanilla_mlp() -> None:
    """The supplementary: "a vanilla multi-layer perceptron with one hidden layer of size 100 units"."""
    disc = DomainDiscriminator(128)
    z = torch.randn(8, 128)
    assert disc(z).shape == (8, 2)
    assert DomainDiscriminator(64, hidden=32, num_domains=3)(torch.randn(4, 64)).shape == (4, 3)
    assert [type(m) for m in disc.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (disc.net[0].in_features, disc.net[0].out_features) == (128, 100)
    assert (disc.net[2].in_features, disc.net[2].out_features) == (100, 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    assert list(disc.buffers()) == []  # nothing but weights: no running statistics to sync or checkpoint
    # no batch statistics: a row's logits do not depend on the batch, in train mode as in eval mode
    torch.testing.assert_close(disc.train()(z)[:1], disc(z[:1]))
    torch.testing.assert_close(disc.eval()(z), disc.train()(z))


@pytest.mark.parametrize("denoiser", ["dncnn", "memnet"])
@pytest.mark.parametrize("classifier", ["small_cnn", "resnet20"])
def test_batchnorm_folding_keeps_the_function(denoiser, classifier):
    from decrop.models import fold_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(create_model(denoiser, in_channels=1, **({"depth": 4, "width": 8} if denoiser == "dncnn" else {"width": 8, "num_memblocks": 1, "num_resblocks": 1})),
                          create_model(classifier, in_channels=1, num_classes=10))
    for m in model.modules():  # non-trivial statistics and a non-identity denoiser
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, 0.1)
    model.eval()
    x = torch.rand(4, 1, 28, 28)
    folded = fold_batchnorm(model)
    assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert n_bn < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
