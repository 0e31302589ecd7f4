"""2x2 average pooling, written for the CPU's memory system and for double backward.

PyTorch's CPU kernels for `avg_pool2d` and its backward walk NCHW maps window by window; on
the maps of a distillation (IPC 10, 100 x 32 x 32 x 32 floats at width 32) they ran at a
sixth of the memory bandwidth (13.5 ms forward, 15.4 ms backward, one thread of a 2-vCPU AMD
EPYC), while the same result as two passes of contiguous adds takes 2.2 ms and the backward as
a product with a 0/¼ matrix and a copy 3 ms. Trajectory matching runs pooling, its backward and the backward's
backward at every inner step, so pooling was a fifth of an outer iteration.

The pair of autograd functions below is exact, not an approximation: pooling is linear, its
adjoint is the 2x2 upsampling times 1/4, and the adjoint of that is the pooling again, so
each is the other's backward to every order (bptt and exact differentiate it twice).

Used on contiguous CPU tensors with even sides; anything else (odd sides, which the 2x2
window floors, CUDA, channels-last, code being traced by torch.compile, which fuses pooling
itself) takes `F.avg_pool2d`, which computes the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pool(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    rows = x.reshape(n * c * (h // 2), 2, w)
    pairs = (rows[:, 0] + rows[:, 1]).view(-1, w // 2, 2)  # each row pair summed: contiguous adds
    return ((pairs[:, :, 0] + pairs[:, :, 1]) * 0.25).view(n, c, h // 2, w // 2)


def _upsample(g: torch.Tensor) -> torch.Tensor:
    n, c, h, w = g.shape
    # Each row of w values becomes 2w (every value twice, times 1/4) by a product with a 0/¼
    # matrix, written into the first of each pair of output rows, then copied into the second:
    # both contiguous, where a broadcast copy of every value was 1.4x slower.
    spread = torch.zeros(w, 2 * w, dtype=g.dtype, device=g.device)
    columns = torch.arange(w, device=g.device)
    spread[columns, 2 * columns] = 0.25
    spread[columns, 2 * columns + 1] = 0.25
    out = torch.empty(n * c * h, 2, 2 * w, dtype=g.dtype, device=g.device)
    torch.mm(g.reshape(-1, w), spread, out=out[:, 0])
    out[:, 1].copy_(out[:, 0])
    return out.view(n, c, 2 * h, 2 * w)


class _Pool(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _pool(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # linear: nothing to keep
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _Upsample.apply(grad)


class _Upsample(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(g: torch.Tensor) -> torch.Tensor:
        return _upsample(g)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _Pool.apply(grad)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """`F.avg_pool2d(x, 2)` for (N, C, H, W) inputs, through the fast pair where it applies."""
    fast = (x.dim() == 4 and x.device.type == "cpu" and x.is_contiguous()
            and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and not torch.compiler.is_compiling())
    return _Pool.apply(x) if fast else F.avg_pool2d(x, 2)


class AvgPool2x2(nn.AvgPool2d):
    """nn.AvgPool2d(2, 2) computed by `avg_pool_2x2` (same result, same module type)."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_2x2(x)
