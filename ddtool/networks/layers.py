"""Building blocks shared by every architecture: norms, pools, conv blocks, the classifier shell.

Geometry rule shared by all convolutional networks: a 28px input gets 2 extra pixels of
padding on each side in the *first* convolution, so that MNIST-sized images produce the same
feature-map sizes (and the same head) as 32px images, as in the Dataset-Condensation code.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ddtool.errors import ConfigError
from ddtool.networks.instance_norm import InstanceNorm
from ddtool.networks.pooling import AvgPool2x2

NORMS = ("instance", "batch", "layer", "group", "none")
POOLINGS = ("avg", "max", "none")
GROUP_NORM_GROUPS = 4


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")
    return value


def make_norm(kind: str, channels: int) -> nn.Module:
    """A normalisation over `channels` feature maps.

    "instance" is GroupNorm with one group per channel (affine): per-sample statistics like
    InstanceNorm, but with learnable scale/shift and no running statistics, which is what the
    distillation papers call instance norm. "layer" normalises over all channels (one group).
    """
    check_choice("norm", kind, NORMS)
    if kind == "instance":
        return InstanceNorm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "group":
        if channels % GROUP_NORM_GROUPS:
            raise ConfigError(f"norm 'group' needs a width divisible by {GROUP_NORM_GROUPS}, got {channels}.")
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels, affine=True)
    return nn.Identity()


def make_pool(kind: str) -> nn.Module:
    """2x2, stride 2 pooling (or none)."""
    check_choice("pooling", kind, POOLINGS)
    if kind == "avg":
        return AvgPool2x2()
    if kind == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


def first_padding(image_size: int, padding: int) -> int:
    """Padding of the first convolution: 2 more on 28px inputs (28 + 4 = 32, see module doc)."""
    return padding + 2 if image_size == 28 else padding


def conv_size(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def pooled_size(size: int, pooling: str) -> int:
    return size if pooling == "none" else size // 2


class ConvBlock(nn.Sequential):
    """conv -> norm -> ReLU -> pool, with named children (conv, norm, act, pool).

    Norm and pool may be Identity; they hold no parameters, so the parameter names stay
    "<block>.conv.weight", "<block>.norm.weight", ... whatever the variant.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int = 3, padding: int = 1,
                 norm: str = "none", pooling: str = "none"):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding),
            norm=make_norm(norm, out_channels),
            act=nn.ReLU(),  # not in-place: keeps torch.func transforms and double backward simple
            pool=make_pool(pooling),
        ))


def mlp_layers(in_features: int, widths: tuple[int, ...]) -> list[nn.Module]:
    """Linear -> ReLU for each hidden width."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return layers


class Classifier(nn.Module):
    """features (anything producing a feature map or vector) -> flatten -> linear head.

    `embed(x)` is the input of the last linear layer (used by feature-matching baselines).
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def require_positive(network: str, image_size: int, size: int) -> int:
    """The final feature-map side; an error if the input is too small for the network."""
    if size < 1:
        raise ConfigError(f"Network {network!r} cannot take {image_size}px inputs: the feature map vanishes.")
    return size
