"""Networks of DE-CROP: base classifiers, denoisers, the domain discriminator, and one factory for them.

Every model is built by name through ``create_model(name, **kwargs)`` (timm-style); unknown names fail with the
list of valid ones, unknown keyword arguments fail with Python's own ``TypeError``.

Classifier contract (``small_cnn``, ``resnet20``, ``resnet56``, ``resnet110``):
    * inputs are images (B, C, H, W) in [0, 1]; normalisation is the first layer (:class:`Normalize`), so
      noise, attacks and denoisers all work in pixel space (Cohen et al.);
    * ``forward(x) -> logits (B, num_classes)`` and ``features(x) -> (B, feature_dim)``, the penultimate
      activations before the final linear layer ``head`` (un-normalised; the losses L2-normalise them);
    * ``forward(x) == head(features(x))``.

What DE-CROP's losses need of *any* classifier (these models, a surrogate, or the user's own model behind
`decrop.user_model.UserClassifier`) is smaller: ``forward(x) -> logits``, ``logits_and_features(x) ->
(logits, features)`` from one pass, and the attribute ``feature_dim``. Callers use the function
`logits_and_features`, which flattens the features to (B, feature_dim).

Denoiser contract (``dncnn``, ``memnet``): ``forward(x) -> (B, C, H, W)``, same shape as ``x``, and exactly the
identity at initialisation (the last conv is zero-initialised), so ``f(D(x)) == f(x)`` before training.

`build_denoiser` builds a denoiser from its config section; `smoothed_model` composes the model that randomized
smoothing certifies. Nothing here picks a device: parameters live wherever the caller moves the module.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DenoiserConfig


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean``/``std`` have one entry per channel or one for all.

    Stored as (persistent) buffers so they follow ``.to(device)`` and travel inside checkpoints.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _normalize(in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Normalize:
    # Catch a dataset/architecture mismatch (e.g. CIFAR statistics on a 1-channel model) at construction
    # time rather than as a broadcasting error deep inside the first forward pass.
    if len(mean) not in (1, in_channels):
        raise ValueError(f"mean/std need 1 or in_channels={in_channels} entries, got {len(mean)}")
    return Normalize(mean, std)


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convs and linears (ReLU networks), unit/zero for batch norms."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------- classifiers

class SmallCNN(nn.Module):
    """A small, fast CNN for 28x28 images: conv16-pool-conv32-pool-fc128-fc(num_classes).

    Each conv is 3x3 + BatchNorm + ReLU (BN keeps the paper's SGD lr 0.1 stable). About 1.2M multiply-adds per
    28x28 image: certification runs f on n noisy copies of every image, so the quick profile's classifier
    must cost little next to the denoiser. ``feature_dim`` is 128.
    Input (B, in_channels, H, W) in [0, 1]; built for H = W = ``image_size``, other sizes are pooled to the
    same grid (see below).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,), image_size: int = 28) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = 128
        grid = image_size // 4  # two 2x2 max-pools

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            _normalize(in_channels, mean, std),
            *block(in_channels, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            # A no-op at image_size; lets the same model accept e.g. 32x32 CIFAR images (the factory's common
            # kwargs do not include image_size) instead of failing with a shape error in the linear layer.
            nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(),
            nn.Linear(32 * grid * grid, self.feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, 128) of images (B, C, H, W) in [0, 1]."""
        return self.body(x)

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features) of images (B, C, H, W) in [0, 1] from one pass."""
        features = self.features(x)
        return self.head(features), features

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) in [0, 1]."""
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; identity shortcut, zero-padded and subsampled when the shape changes.

    The parameter-free shortcut is He et al.'s option A, used for their CIFAR experiments, so ResNet-20 has
    the paper's 0.27M parameters.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))  # extra channels are zeros
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet: depth = 6n + 2, three stages of n BasicBlocks with widths 16/32/64.

    Input (B, in_channels, H, W) in [0, 1], any H, W (32x32 and 28x28 both work: global average pooling).
    ``feature_dim`` is 64.
    """

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1 (e.g. 20, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.feature_dim = 64
        layers: list[nn.Module] = [
            _normalize(in_channels, mean, std),
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        ]
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, num_classes)
        _init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        """Globally pooled activations (B, 64) of images (B, C, H, W) in [0, 1]."""
        return self.body(x)

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features) of images (B, C, H, W) in [0, 1] from one pass."""
        features = self.features(x)
        return self.head(features), features

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) in [0, 1]."""
        return self.head(self.features(x))


def logits_and_features(classifier: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (B, num_classes) and penultimate features (B, feature_dim), flattened, of images (B, C, H, W) in
    [0, 1], from one differentiable pass: the classifier contract every DE-CROP loss relies on (module doc).
    Does not change the classifier's mode. TypeError for a model without ``logits_and_features``."""
    method = getattr(classifier, "logits_and_features", None)
    if method is None:
        raise TypeError(f"{type(classifier).__name__} has no logits_and_features(x): wrap it with "
                        f"decrop.user_model.UserClassifier (classifier.feature_layer names its feature layer)")
    logits, features = method(x)
    return logits, features.flatten(1)


# ------------------------------------------------------------------------------------------------- denoisers

class DnCNN(nn.Module):
    """Zhang et al. 2017 DnCNN: conv+ReLU, (depth - 2) x conv+BN+ReLU, conv; predicts the noise.

    ``forward(x) = x - net(x)`` (residual learning) on (B, in_channels, H, W), same shape out. The last conv
    is zero-initialised, so the denoiser is exactly the identity at initialisation: training starts from
    ``f(D(x)) = f(x)`` rather than from a random image-to-image map that the frozen classifier cannot read.
    The zero conv still receives a gradient (its input activations are non-zero), so training moves it.
    """

    def __init__(self, in_channels: int, depth: int = 17, width: int = 64, batch_norm: bool = True) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"DnCNN depth must be >= 3 (first conv, middle layers, last conv), got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers, nn.Conv2d(width, in_channels, 3, padding=1))
        _init_weights(self)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """Denoised images (B, C, H, W) of noisy images (B, C, H, W); values are not clamped."""
        return x - self.net(x)


class _BNReLUConv(nn.Sequential):
    """Pre-activation conv (BN -> ReLU -> conv), MemNet's building unit."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        # In-place ReLU is safe: it overwrites the BN output, never the block input that skips reuse.
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False))


class _ResidualUnit(nn.Module):
    """MemNet's recursive unit: two BN-ReLU-convs plus the identity skip."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_BNReLUConv(width, width), _BNReLUConv(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _MemoryBlock(nn.Module):
    """``num_resblocks`` residual units (short-term memory) and a gate unit over them plus long-term memory.

    The gate is a 1x1 BN-ReLU-conv over the concatenation of every short-term output of this block and every
    earlier long-term memory (the feature extractor's output and the previous blocks' outputs).
    """

    def __init__(self, width: int, num_resblocks: int, num_memories: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(_ResidualUnit(width) for _ in range(num_resblocks))
        self.gate = _BNReLUConv((num_resblocks + num_memories) * width, width, kernel_size=1)

    def forward(self, x: Tensor, memories: list[Tensor]) -> Tensor:
        short_term = []
        for unit in self.units:
            x = unit(x)
            short_term.append(x)
        return self.gate(torch.cat(short_term + memories, dim=1))


class MemNet(nn.Module):
    """Tai et al. 2017 MemNet: feature extractor, densely connected memory blocks, reconstruction, ``x + recon``.

    Input and output (B, in_channels, H, W). Residual units have their own weights (as in the PyTorch MemNet
    used by Salman et al.'s denoised smoothing); the multi-supervised output averaging is not used.
    """

    def __init__(self, in_channels: int, width: int = 64, num_memblocks: int = 3, num_resblocks: int = 6) -> None:
        super().__init__()
        if num_memblocks < 1 or num_resblocks < 1:
            raise ValueError(f"MemNet needs num_memblocks >= 1 and num_resblocks >= 1, "
                             f"got {num_memblocks} and {num_resblocks}")
        self.extractor = _BNReLUConv(in_channels, width)
        # Block i sees i + 1 long-term memories: the extractor output and the i earlier block outputs.
        self.blocks = nn.ModuleList(_MemoryBlock(width, num_resblocks, i + 1) for i in range(num_memblocks))
        self.reconstructor = _BNReLUConv(width, in_channels)
        _init_weights(self)
        # Zero-init the last reconstruction conv: recon = 0, so the denoiser starts as the identity and
        # f(D(x)) = f(x) at step 0; its input is non-zero, so it still receives a gradient and learns.
        nn.init.zeros_(self.reconstructor[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        """Denoised images (B, C, H, W) of noisy images (B, C, H, W); values are not clamped."""
        out = self.extractor(x)
        memories = [out]
        for block in self.blocks:
            out = block(out, memories)
            memories.append(out)
        return x + self.reconstructor(out)


# --------------------------------------------------------------------------------------------- discriminator

class DomainDiscriminator(nn.Module):
    """DE-CROP's domain discriminator: ``in_features -> hidden -> ReLU -> num_domains``.

    The paper's supplementary: "a vanilla multi-layer perceptron with one hidden layer of size 100 units", so
    no normalisation layer: its output for a row does not depend on the rest of the batch, and train and eval
    mode compute the same function. Input: features (B, in_features) (the classifier's L2-normalised
    ``features``); output: domain logits (B, num_domains). The gradient-reversal layer lives in the losses, not
    here.
    """

    def __init__(self, in_features: int, hidden: int = 100, num_domains: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_domains))

    def forward(self, z: Tensor) -> Tensor:
        """Domain logits (B, num_domains) of features (B, in_features)."""
        return self.net(z)


# -------------------------------------------------------------------------------------------------- registry

def _resnet(depth: int) -> Callable[..., CifarResNet]:
    def factory(**kwargs) -> CifarResNet:
        return CifarResNet(depth, **kwargs)
    factory.__name__ = f"resnet{depth}"
    return factory


_CLASSIFIER_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
    "resnet110": _resnet(110),
}
_DENOISER_FACTORIES: dict[str, Callable[..., nn.Module]] = {"dncnn": DnCNN, "memnet": MemNet}
_REGISTRY = {**_CLASSIFIER_FACTORIES, **_DENOISER_FACTORIES}

CLASSIFIERS: tuple[str, ...] = tuple(_CLASSIFIER_FACTORIES)
DENOISERS: tuple[str, ...] = tuple(_DENOISER_FACTORIES)


def model_names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` passed to its constructor.

    Classifiers accept ``in_channels, num_classes, mean, std`` (``small_cnn`` also ``image_size``); denoisers
    accept ``in_channels`` (required) plus ``depth, width, batch_norm`` (``dncnn``) or ``width, num_memblocks,
    num_resblocks`` (``memnet``). The model is on the CPU in train mode. Unknown names raise ``ValueError``
    listing the valid ones; unknown kwargs raise ``TypeError``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {model_names()}")
    return _REGISTRY[name](**kwargs)


def build_denoiser(cfg: DenoiserConfig, in_channels: int) -> nn.Module:
    """A fresh denoiser from its config section (identity at initialisation)."""
    if cfg.arch == "dncnn":
        return create_model("dncnn", in_channels=in_channels, depth=cfg.depth, width=cfg.width)
    return create_model("memnet", in_channels=in_channels, width=cfg.width,
                        num_memblocks=cfg.num_memblocks, num_resblocks=cfg.num_resblocks)


def smoothed_model(classifier: nn.Module, denoiser: nn.Module | None, fold_bn: bool = False) -> nn.Module:
    """The base model that randomized smoothing wraps: f, or f(D(.)) (Salman et al.'s composition), in eval mode.

    Converted to channels_last in place: convolutions run faster in that layout on CPUs and GPUs, and the weights'
    values are unchanged. With `fold_bn`, a copy with BatchNorm folded into the convs (`fold_batchnorm`)."""
    model = classifier if denoiser is None else nn.Sequential(denoiser, classifier)
    model = model.to(memory_format=torch.channels_last).eval()
    return fold_batchnorm(model) if fold_bn else model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every BatchNorm that follows a conv folded into the conv's weights.

    In eval mode BN is an affine map with fixed statistics, so conv+BN is exactly another conv: same function
    up to float rounding, one pass less over each activation. Uses torch.fx's fusion (the model must be
    symbolically traceable; all models here are). The copy computes only ``forward``: use it for inference
    (certification), not where ``features`` is needed.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval(), inplace=False)
