"""Instance norm with a closed-form second derivative, for trajectory matching on a CPU.

Trajectory matching differentiates the student's gradient, so every layer's backward is itself
differentiated. For group norm PyTorch then replaces its fused backward kernel by a composite of
some forty elementwise operations on the full feature map, whose own backward is as many again:
the norm was a quarter of an outer iteration on a CPU (ConvNet-3, width 32, IPC 10), most of it
in the first block's 32 x 32 maps.

Here the backward is one autograd function whose forward is PyTorch's fused kernel and whose
backward is the closed form below: five row reductions and two elementwise sums. Per
(sample, channel) row of M = H·W values, with  x̂ = (x − μ)s,  s = (var + ε)^-½,  a = s·w,
and the projection  P(v) = v − mean(v) − x̂·mean(v·x̂)  (symmetric):

    backward:  gx = a·P(g),   gw = Σ_n Σ g·x̂,   gb = Σ_n Σ g

and for cotangents (u, u_w, u_b) of (gx, gw, gb), with row means ū, ḡ, q = mean(u·x̂),
m = mean(g·x̂), r = mean(u·g) and  z = −a·m·u + (u_w − a·q)·g:

    ∂/∂g = a·P(u) + u_w·x̂ + u_b
    ∂/∂w = Σ_n s·M·(r − ū·ḡ − q·m)
    ∂/∂x = s·P(z) − s²·w·(r − ū·ḡ − q·m)·x̂

(x̂'s own derivative is s·P, and ∂s/∂x = −s²·x̂/M, which gives the last term.) Every
formula is in differentiable operations, so higher derivatives are right too (the statistics
are recomputed from x when a third derivative is being recorded). Checked against PyTorch's
group norm to the third derivative in float64 (tests/test_networks.py).

Used for contiguous CPU tensors outside torch.compile; elsewhere `nn.GroupNorm` computes the
same numbers.
"""

from __future__ import annotations

import torch
from torch import nn


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.reshape(rows, -1)


def _per_row(values: torch.Tensor, n: int) -> torch.Tensor:
    """(C,) per-channel values as an (N·C, 1) column, one per row."""
    return values.repeat(n).unsqueeze(1)


def _statistics(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-row mean and 1/std, as (N·C, 1) columns."""
    rows = _rows(x, x.shape[0] * x.shape[1])
    mean = rows.mean(1, keepdim=True)
    centred = rows - mean
    return mean, (centred.pow(2).mean(1, keepdim=True) + eps).rsqrt()


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, eps):
        n, c, h, w = x.shape
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, h * w, c, eps)
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        _, mean, rstd = output
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, rstd)  # the backward accounts for x through them
        ctx.save_for_backward(x, weight, mean, rstd)

    @staticmethod
    def backward(ctx, grad, _mean, _rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _InstanceNormBackward.apply(grad, x, weight, mean, rstd, ctx.eps)
        return gx, gw, gb, None


class _InstanceNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad, x, weight, mean, rstd, eps):
        n, c, h, w = x.shape
        return torch.ops.aten.native_group_norm_backward(grad.contiguous(), x, mean, rstd, weight, n, c, h * w, c,
                                                         [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, mean, rstd, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(grad, x, weight, mean, rstd)

    @staticmethod
    def backward(ctx, u, u_weight, u_bias):
        g, x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        rows, size = n * c, x[0, 0].numel()
        if torch.is_grad_enabled():  # a higher derivative is being recorded: μ and s depend on x
            mean, rstd = _statistics(x, ctx.eps)
        else:
            mean, rstd = mean.reshape(rows, 1), rstd.reshape(rows, 1)
        # (autograd hands unused outputs' cotangents in as zeros: none is None)
        xr, gr, ur = _rows(x, rows), _rows(g, rows), _rows(u, rows)

        # row means; those with x̂ from those with x:  mean(v·x̂) = s·(mean(v·x) − μ·mean(v))
        u_mean, g_mean = ur.mean(1, keepdim=True), gr.mean(1, keepdim=True)
        q = rstd * ((ur * xr).mean(1, keepdim=True) - mean * u_mean)
        m = rstd * ((gr * xr).mean(1, keepdim=True) - mean * g_mean)
        r = (ur * gr).mean(1, keepdim=True)
        scale = rstd * _per_row(weight, n)  # a
        uw, ub = _per_row(u_weight, n), _per_row(u_bias, n)
        cross = r - u_mean * g_mean - q * m

        # ∂/∂g = a·P(u) + u_w·x̂ + u_b = a·u + k_x·x + k_0
        k_x = (uw - scale * q) * rstd
        grad_g = scale * ur + (k_x * xr + (ub - scale * u_mean - k_x * mean))

        # ∂/∂x = s·P(z) − s²·w·cross·x̂, z = α·u + β·g; as A·u + B·g + D·x + E
        alpha, beta = -scale * m, uw - scale * q
        z_mean, z_hat = alpha * u_mean + beta * g_mean, alpha * q + beta * m
        d_hat = -rstd * z_hat - rstd * scale * cross  # coefficient of x̂ (s²·w = s·a)
        d_x = d_hat * rstd
        grad_x = (rstd * alpha) * ur + (rstd * beta) * gr + (d_x * xr + (-rstd * z_mean - d_x * mean))

        grad_weight = (rstd * size * cross).view(n, c).sum(0)
        return (grad_g.view_as(x), grad_x.view_as(x), grad_weight, None, None, None)


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.group_norm(x, C, weight, bias, eps)`: per-sample, per-channel normalisation, affine."""
    fast = (x.dim() == 4 and x.device.type == "cpu" and x.is_contiguous() and not torch.compiler.is_compiling())
    if not fast:
        return nn.functional.group_norm(x, x.shape[1], weight, bias, eps)
    return _InstanceNorm.apply(x, weight, bias, eps)[0]


class InstanceNorm(nn.GroupNorm):
    """nn.GroupNorm(C, C, affine=True) computed by `instance_norm` (same parameters and type)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)
