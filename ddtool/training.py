"""The one supervised training loop of ddtool.

Expert trajectories, evaluation of synthetic sets, teachers for curriculum synthesis and the
feature networks of coreset baselines all train a network the same way: minibatches of a
tensor dataset that already lives on the device, optional DSA augmentation, an optimiser
stepped through a closure (so SAM/GSAM, which evaluate the loss twice, plug in unchanged).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddtool.errors import ConfigError

# loss_fn(model, x, targets) -> (loss, logits). It sees the model and the input, so losses
# such as AST's input-gradient penalty or epoch-dependent scaling plug in without a new loop.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# Numerical precision of the training loop's forward passes. "bf16": autocast to bfloat16
# (weights, gradients and optimiser state stay float32; softmax and losses run in float32),
# which a GPU's tensor cores run several times faster. Offered where only an accuracy depends
# on the result (evaluation, experts); never in distillation's unrolled inner loop, whose
# gradient must equal full backprop, nor by default: see docs/evaluation.md, "Mixed precision".
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, what: str = "precision") -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{what} must be one of {', '.join(PRECISIONS)}, not {precision!r}.")


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The context forward passes run in at `precision`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """A reduced-precision (bf16/fp16) tensor in float32; float32 and float64 ones unchanged."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for hard (N,) class ids or soft (N, K) probability targets, in float32
    (under bf16 autocast the logits arrive in bfloat16; a CPU's autocast would keep the
    log-softmax in bfloat16)."""
    logits = widened(logits)
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return cross_entropy(logits, y), logits


def minibatches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over range(n): a fresh permutation from `generator`, or in order if None."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    loss_fn: LossFn = standard_loss,
    precision: str = "fp32",
) -> EpochStats:
    """One pass over (images, targets) in shuffled minibatches.

    `augment(x, generator)` is applied per minibatch (DSA draws its parameters from the same
    generator, so an epoch is a pure function of the generator's state). `precision`: that of
    the forward passes (see PRECISIONS); augmentation and the backward pass are not autocast.
    """
    model.train()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for idx in minibatches(images.shape[0], batch_size, generator):
        idx = idx.to(images.device)
        x, y = images[idx], targets[idx]
        if augment is not None:
            x = augment(x, generator)

        first_logits: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with autocast(x.device, precision):
                loss, logits = loss_fn(model, x, y)
            if not first_logits:  # SAM-style optimisers call this twice; count the first pass
                first_logits.append(logits.detach())
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        total_loss += loss.detach() * idx.numel()
        hard = y if y.dim() == 1 else y.argmax(dim=1)
        correct += (first_logits[0].argmax(dim=1) == hard).sum()
    n = images.shape[0]
    return EpochStats(loss=float(total_loss) / n, accuracy=float(correct) / n, images=n)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode, in batches (the test set never needs gradients)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


class CompiledNetwork(nn.Module):
    """A network through torch.compile with static shapes (a training run has at most two
    batch sizes, the test split one more), fed inputs with canonical strides: a one-channel
    batch leaves DSA with either stride on its channel axis, and each would be compiled anew.

    The same training, fused into fewer kernels (results differ from eager only by rounding);
    single backward only: a loss that differentiates twice (AST's input-gradient penalty)
    cannot run through it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # inductor's C++ toolchain probe warns "No CUDA runtime is found" on every CPU-only
        # machine, in the middle of the progress bars; it says nothing about the CPU build
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.net = torch.compile(net, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.new_empty(x.shape).copy_(x))
