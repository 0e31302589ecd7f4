"""ConvNet, the workhorse of the dataset-distillation literature.

depth x [conv3x3 (128 maps) -> norm -> ReLU -> 2x2 pool], then one linear layer. Instance
norm and average pooling by default; depth 3 for 28-32px (4x4 maps at the head), 4 for 64px,
5 for 128px, fewer below 28px (default_depth). ConvNet-3 on 32x32x3 with 10 classes has
320,010 parameters.
"""

from __future__ import annotations

import math

from torch import nn

from ddtool.networks.layers import (
    NORMS, POOLINGS, Classifier, ConvBlock, conv_size, first_padding, pooled_size, require_positive,
)
from ddtool.networks.registry import Choice, Whole, register_alias, register_network


def default_depth(image_size: int) -> int:
    """The published depths from 28 px up: 3 for 28-32 px, then one more block per doubling (4
    for 64, 5 for 128), so the head sees 3x3-4x4 maps. Below 28 px, as many blocks as keep every
    instance norm on maps of at least 4x4 (2 for 8 px, 3 for 16): three blocks on 8-px images
    normalise 2x2 maps, and trajectory matching there drives the images to ±1e5."""
    if image_size < 28:
        return max(1, int(math.log2(image_size / 4)) + 1) if image_size >= 4 else 1
    size = 32 if image_size == 28 else image_size
    return 3 if size <= 32 else max(3, round(math.log2(size / 4)))


def describe_depth(image_size: int) -> str:
    """Why `default_depth(image_size)` blocks, in a few words for a plan."""
    depth = default_depth(image_size)
    if image_size < 28:
        return f"depth {depth} for {image_size}-px images (every norm on maps of 4x4 or more)"
    return f"depth {depth} for {image_size}-px images (the published ConvNet-{depth})"


# The registry checks option values against these types before the factory runs; depth None
# (the default) follows the image size.
@register_network("convnet", options={"width": Whole(min=1), "depth": Whole(min=1),
                                      "norm": Choice(NORMS), "pooling": Choice(POOLINGS)})
def convnet(*, channels: int, num_classes: int, image_size: int, width: int = 128,
            depth: int | None = None, norm: str = "instance", pooling: str = "avg") -> Classifier:
    depth = default_depth(image_size) if depth is None else depth
    blocks, size, in_channels = [], image_size, channels
    for d in range(depth):
        padding = first_padding(image_size, 1) if d == 0 else 1
        blocks.append(ConvBlock(in_channels, width, kernel=3, padding=padding, norm=norm, pooling=pooling))
        size = pooled_size(conv_size(size, 3, padding), pooling)
        in_channels = width
    size = require_positive("convnet", image_size, size)
    return Classifier(nn.Sequential(*blocks), width * size * size, num_classes)


# The named variants of the Dataset-Condensation family's cross-architecture studies.
for _depth in range(1, 6):
    register_alias(f"convnetd{_depth}", "convnet", depth=_depth)
for _width in (32, 64, 256):
    register_alias(f"convnetw{_width}", "convnet", width=_width)
for _suffix, _norm in (("bn", "batch"), ("ln", "layer"), ("in", "instance"), ("gn", "group"), ("nn", "none")):
    register_alias(f"convnet-{_suffix}", "convnet", norm=_norm)
for _suffix, _pool in (("ap", "avg"), ("mp", "max"), ("np", "none")):
    register_alias(f"convnet-{_suffix}", "convnet", pooling=_pool)
