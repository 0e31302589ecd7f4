"""The expert training loss, with AST's optional smoothing terms (docs/methods.md §6).

Plugged into `ddtool.training.train_epoch` as its `loss_fn(model, x, y) -> (loss, logits)`;
a new function per epoch, because the clipping-loss factor depends on the epoch.
"""

from __future__ import annotations

import torch
from torch import nn

from ddtool.experts.config import ExpertConfig
from ddtool.training import LossFn, cross_entropy, standard_loss, widened


def input_gradient_penalty(model: nn.Module, x: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * mean_i (||d sum(logits_i) / d x_i|| - 1)^2, logits).

    The gradient of the summed logits w.r.t. the input is taken per sample (each sample's
    logits depend only on its own input unless the network mixes the batch, as BatchNorm does)
    with create_graph=True, so the penalty itself is differentiated w.r.t. the weights.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    # a backward pass, which autocast is not meant to wrap (train_epoch's bf16 covers forwards)
    with torch.autocast(x.device.type, enabled=False):
        (grad_x,) = torch.autograd.grad(widened(logits).sum(), x, create_graph=True)
    norms = torch.linalg.vector_norm(grad_x.flatten(1), dim=1)
    return weight * (norms - 1.0).square().mean(), logits


def expert_loss(config: ExpertConfig, epoch: int) -> LossFn:
    """The loss of epoch `epoch`: cross-entropy, scaled by AST's clipping factor when on, plus
    the input-gradient penalty when its weight is positive. The factor scales the
    classification term only: it is AST's schedule for the data loss, the penalty is a
    separate regulariser with its own weight."""
    scale = config.loss_scale_at(epoch)
    penalty_weight = config.ast_input_grad_penalty
    if scale == 1.0 and penalty_weight == 0.0:
        return standard_loss

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if penalty_weight > 0.0:
            penalty, logits = input_gradient_penalty(model, x, penalty_weight)
            return scale * cross_entropy(logits, y) + penalty, logits
        logits = model(x)
        return scale * cross_entropy(logits, y), logits

    return loss_fn
