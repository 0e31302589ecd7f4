"""ResNet-18 for small images (3x3 stem, no stem pooling), as used in distillation papers.

Four stages of two basic blocks (64, 128, 256, 512 maps; stages 2-4 halve the size), global
average pooling, linear head. Norm "instance" (GroupNorm, one group per channel) is the
Dataset-Condensation default; "-bn" variants use BatchNorm. Downsampling is a strided conv, or,
in the "-ap" variants, a stride-1 conv followed by 2x2 average pooling (shortcut likewise).
"""

from __future__ import annotations

import torch
from torch import nn

from ddtool.errors import ConfigError
from ddtool.networks.layers import NORMS, Classifier, first_padding, make_norm
from ddtool.networks.pooling import AvgPool2x2
from ddtool.networks.registry import Choice, register_alias, register_network

DOWNSAMPLING = ("stride", "avgpool")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, downsample: str):
        super().__init__()
        # With "avgpool", the convs keep the size and a 2x2 average pool does the halving.
        conv_stride = stride if downsample == "stride" else 1
        pool_halves = stride > 1 and downsample == "avgpool"
        self.conv1 = _conv3x3(in_channels, out_channels, conv_stride)
        self.norm1 = make_norm(norm, out_channels)
        self.pool = AvgPool2x2() if pool_halves else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = make_norm(norm, out_channels)
        self.act = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=conv_stride, bias=False),
                AvgPool2x2() if pool_halves else nn.Identity(),
                make_norm(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.act(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


@register_network("resnet18", options={"norm": Choice(NORMS), "downsample": Choice(DOWNSAMPLING)})
def resnet18(*, channels: int, num_classes: int, image_size: int, norm: str = "instance",
             downsample: str = "stride") -> Classifier:
    if image_size < 8:
        raise ConfigError(f"Network 'resnet18' needs inputs of at least 8px, got {image_size}px.")
    layers: list[nn.Module] = [
        _conv3x3(channels, 64, padding=first_padding(image_size, 1)),
        make_norm(norm, 64),
        nn.ReLU(),
    ]
    in_channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        stride = 1 if stage == 0 else 2
        layers.append(BasicBlock(in_channels, width, stride, norm, downsample))
        layers.append(BasicBlock(width, width, 1, norm, downsample))
        in_channels = width
    # Global pooling: on 32px inputs this is the published 4x4 average pool; on 64px inputs
    # it keeps the head at 512 features instead of failing.
    layers.append(nn.AdaptiveAvgPool2d(1))
    return Classifier(nn.Sequential(*layers), 512, num_classes)


register_alias("resnet18-bn", "resnet18", norm="batch")
register_alias("resnet18-ap", "resnet18", downsample="avgpool")
register_alias("resnet18-bn-ap", "resnet18", norm="batch", downsample="avgpool")
