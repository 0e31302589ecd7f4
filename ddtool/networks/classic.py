"""The rest of the cross-architecture pool: AlexNet, VGG11, LeNet, MLP.

Layer plans follow the Dataset-Condensation family's small-image versions of these networks;
the linear heads are sized from the actual feature-map size, so 64px inputs work too.
"""

from __future__ import annotations

from torch import nn

from ddtool.networks.layers import (
    NORMS, Classifier, ConvBlock, conv_size, first_padding, mlp_layers, pooled_size, require_positive,
)
from ddtool.networks.registry import Choice, Whole, register_alias, register_network


def _conv_stack(name: str, channels: int, image_size: int, plan, norm: str):
    """Build ConvBlocks from `plan` = [(out_channels, kernel, padding, pooling), ...].

    Returns (blocks, out_channels, final side). The first padding follows the 28px rule.
    """
    blocks, size, in_channels = [], image_size, channels
    for i, (out_channels, kernel, padding, pooling) in enumerate(plan):
        padding = first_padding(image_size, padding) if i == 0 else padding
        blocks.append(ConvBlock(in_channels, out_channels, kernel=kernel, padding=padding, norm=norm, pooling=pooling))
        size = pooled_size(conv_size(size, kernel, padding), pooling)
        in_channels = out_channels
    return blocks, in_channels, require_positive(name, image_size, size)


_ALEXNET = [(128, 5, 2, "max"), (192, 5, 2, "max"), (256, 3, 1, "none"), (192, 3, 1, "none"), (192, 3, 1, "max")]


@register_network("alexnet", options={"norm": Choice(NORMS)})
def alexnet(*, channels: int, num_classes: int, image_size: int, norm: str = "none") -> Classifier:
    blocks, out_channels, size = _conv_stack("alexnet", channels, image_size, _ALEXNET, norm)
    return Classifier(nn.Sequential(*blocks), out_channels * size * size, num_classes)


register_alias("alexnet-bn", "alexnet", norm="batch")

# VGG11: numbers are 3x3 conv widths, "M" a 2x2 max pool after the preceding conv.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_network("vgg11", options={"norm": Choice(NORMS)})
def vgg11(*, channels: int, num_classes: int, image_size: int, norm: str = "instance") -> Classifier:
    plan = []
    for item in _VGG11:
        if item == "M":
            width, kernel, padding, _ = plan[-1]
            plan[-1] = (width, kernel, padding, "max")
        else:
            plan.append((item, 3, 1, "none"))
    blocks, out_channels, size = _conv_stack("vgg11", channels, image_size, plan, norm)
    return Classifier(nn.Sequential(*blocks), out_channels * size * size, num_classes)


register_alias("vgg11-bn", "vgg11", norm="batch")


@register_network("lenet")
def lenet(*, channels: int, num_classes: int, image_size: int) -> Classifier:
    plan = [(6, 5, 0, "max"), (16, 5, 0, "max")]
    blocks, out_channels, size = _conv_stack("lenet", channels, image_size, plan, "none")
    features = nn.Sequential(*blocks, nn.Flatten(), *mlp_layers(out_channels * size * size, (120, 84)))
    return Classifier(features, 84, num_classes)


@register_network("mlp", options={"width": Whole(min=1)})
def mlp(*, channels: int, num_classes: int, image_size: int, width: int = 128) -> Classifier:
    features = nn.Sequential(nn.Flatten(), *mlp_layers(channels * image_size * image_size, (width, width)))
    return Classifier(features, width, num_classes)
