"""Training one expert: a network trained on the real training split, its parameters saved at
initialisation and after every epoch.

All randomness derives from (config.seed, expert index): the initial weights, and per epoch
the batch order and DSA parameters. So expert i is the same whether trained alone, in a
shard, or resumed after a kill, and creating a network never touches the global RNG.
Accuracy is measured once at the end (every `eval_every` epochs if asked), never per epoch
by default: the published code's per-epoch test evaluation is most of its run time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ddtool.augment import DSA, DSAConfig
from ddtool.data import PreparedData
from ddtool.errors import DDToolError
from ddtool.experts.checkpoint import ExpertProgress, load_progress, save_progress
from ddtool.experts.config import ExpertConfig
from ddtool.experts.losses import expert_loss
from ddtool.experts.optim import build_optimizer
from ddtool.networks import ParamLayout, create_network
from ddtool.seeding import derive_seed, generator
from ddtool.training import CompiledNetwork, EpochStats, accuracy, train_epoch

# on_epoch(epoch_number_done, stats, seconds): progress reporting.
EpochCallback = Callable[[int, EpochStats, float], None]


@dataclass
class Trajectory:
    index: int
    seed: int  # the expert's own seed, derived from (config.seed, index)
    params: torch.Tensor  # (E + 1, P) float32 on CPU: row 0 is the initialisation
    train_accuracy: float  # final, eval mode, on the (un-augmented) training split
    test_accuracy: float  # final
    epoch_loss: list[float]  # mean training loss of each epoch (free by-products of training)
    epoch_accuracy: list[float]  # running training accuracy of each epoch (augmented batches)
    evaluations: list[tuple[int, float]]  # (epoch, test accuracy) when eval_every > 0
    # Wall-clock of its training epochs (resumed sessions included), and how many experts
    # trained side by side meanwhile (sharing the machine): what the expert cost.
    seconds: float = 0.0
    side_by_side: int = 1


@dataclass
class ExpertSetup:
    """Everything one expert's training needs, built the same way for training and for timing."""

    model: nn.Module
    trainer: nn.Module  # what training calls: the model, or the model through torch.compile
    layout: ParamLayout
    optimizer: torch.optim.Optimizer
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    images: torch.Tensor
    labels: torch.Tensor


def expert_seed(config: ExpertConfig, index: int) -> int:
    return derive_seed(config.seed, "expert", index)


def training_split(config: ExpertConfig, data: PreparedData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The images experts train on: the training split (validation images excluded), capped at
    `train_subset` images by a seeded draw shared by all experts."""
    images, labels = data.train_x, data.train_y
    if config.train_subset is not None and config.train_subset < images.shape[0]:
        order = torch.randperm(images.shape[0], generator=generator(config.seed, "train-subset"))
        keep = order[: config.train_subset].sort().values.to(images.device)
        images, labels = images[keep], labels[keep]
    return images.to(device), labels.to(device)


def dsa_flip(config: ExpertConfig, data: PreparedData) -> bool:
    return config.flip if config.flip is not None else data.spec.flip


def build_setup(config: ExpertConfig, index: int, data: PreparedData, device: torch.device,
                split: tuple[torch.Tensor, torch.Tensor] | None = None, compile: bool = False) -> ExpertSetup:
    spec = data.spec
    model = create_network(
        config.arch, channels=spec.channels, num_classes=spec.num_classes, image_size=spec.image_size,
        generator=generator(expert_seed(config, index), "init"), **config.arch_options,
    ).to(device)
    optimizer = build_optimizer(
        model.parameters(), name=config.optimizer, lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, rho=config.rho, gsam_alpha=config.gsam_alpha,
        adaptive=config.adaptive,
    )
    augment = DSA(DSAConfig(flip=dsa_flip(config, data))) if config.augment else None
    images, labels = split if split is not None else training_split(config, data, device)
    trainer = CompiledNetwork(model) if compile else model
    return ExpertSetup(model, trainer, ParamLayout.from_module(model), optimizer, augment, images, labels)


def can_compile(config: ExpertConfig) -> bool:
    """Whether this expert's training can run through torch.compile: not when its loss
    differentiates twice (AST's input-gradient penalty), which compiled graphs refuse."""
    return config.ast_input_grad_penalty == 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def run_epoch(config: ExpertConfig, setup: ExpertSetup, seed: int, epoch: int,
              images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> EpochStats:
    """Epoch `epoch` (0-based) of an expert with seed `seed`: its lr, its loss, its random stream."""
    set_lr(setup.optimizer, config.lr_at(epoch))
    return train_epoch(
        setup.trainer,
        setup.images if images is None else images,
        setup.labels if labels is None else labels,
        optimizer=setup.optimizer,
        batch_size=config.batch_size,
        generator=generator(seed, "epoch", epoch),
        augment=setup.augment,
        loss_fn=expert_loss(config, epoch),
        precision=config.precision,
    )


def train_expert(
    config: ExpertConfig,
    index: int,
    data: PreparedData,
    device: torch.device | str = "cpu",
    *,
    checkpoint: Path | None = None,
    on_epoch: EpochCallback | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    compile: bool = False,
    side_by_side: int = 1,
) -> Trajectory:
    """Train expert `index` of `config` for config.epochs epochs.

    With `checkpoint`, progress is saved there (atomically) after every epoch and a matching
    checkpoint found there is resumed from: the result is bit-identical on CPU to an
    uninterrupted run (run with the same `compile` and thread count). `split` passes a
    precomputed `training_split` (shared across experts). `compile`: train through
    torch.compile (the same maths, other rounding; see `can_compile`). `side_by_side`: how
    many experts train at once on this machine, recorded with the expert's wall-clock.
    """
    device = torch.device(device)
    seed = expert_seed(config, index)
    setup = build_setup(config, index, data, device, split, compile)
    fingerprint = config.fingerprint()
    progress = load_progress(checkpoint, fingerprint=fingerprint, index=index) if checkpoint else None
    snapshots = torch.empty(config.epochs + 1, setup.layout.total, dtype=torch.float32)
    if progress is None:
        progress = ExpertProgress(fingerprint, index, 0, snapshots[:1], {}, {})
        snapshots[0] = setup.layout.flatten(setup.model, torch.float32).cpu()
    else:
        done = progress.epochs_done
        snapshots[: done + 1] = progress.snapshots
        setup.model.load_state_dict(progress.model_state)
        setup.optimizer.load_state_dict(progress.optimizer_state)

    for epoch in range(progress.epochs_done, config.epochs):
        started = time.perf_counter()
        stats = run_epoch(config, setup, seed, epoch)
        if not math.isfinite(stats.loss):
            raise DDToolError(
                f"Expert {index} diverged in epoch {epoch + 1} (training loss {stats.loss}); nothing of it "
                f"was stored. Lower the learning rate (--lr {config.lr:g}) or the AST penalty, then rerun."
            )
        snapshots[epoch + 1] = setup.layout.flatten(setup.model, torch.float32).cpu()
        progress.seconds += time.perf_counter() - started
        progress.epoch_loss.append(stats.loss)
        progress.epoch_accuracy.append(stats.accuracy)
        done = epoch + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.epochs:
            progress.evaluations.append((done, _test_accuracy(setup.model, data, device)))
        if checkpoint is not None and done < config.epochs:
            progress.epochs_done = done
            progress.snapshots = snapshots[: done + 1].clone()  # a view would save the whole buffer
            progress.model_state = setup.model.state_dict()
            progress.optimizer_state = setup.optimizer.state_dict()
            save_progress(progress, checkpoint)
        if on_epoch is not None:
            on_epoch(done, stats, time.perf_counter() - started)

    test_accuracy = _test_accuracy(setup.model, data, device)
    if config.eval_every:
        progress.evaluations.append((config.epochs, test_accuracy))
    return Trajectory(
        index=index,
        seed=seed,
        params=snapshots,
        train_accuracy=accuracy(setup.model, setup.images, setup.labels),
        test_accuracy=test_accuracy,
        epoch_loss=list(progress.epoch_loss),
        epoch_accuracy=list(progress.epoch_accuracy),
        evaluations=list(progress.evaluations),
        seconds=progress.seconds,
        side_by_side=side_by_side,
    )


def _test_accuracy(model: nn.Module, data: PreparedData, device: torch.device) -> float:
    return accuracy(model, data.test_x.to(device), data.test_y.to(device))


def expert_layout(config: ExpertConfig, data: PreparedData) -> ParamLayout:
    """The flat-parameter layout of this configuration's networks (built once, on CPU)."""
    spec = data.spec
    model = create_network(config.arch, channels=spec.channels, num_classes=spec.num_classes,
                           image_size=spec.image_size, generator=generator(config.seed, "layout"),
                           **config.arch_options)
    return ParamLayout.from_module(model)
