"""Trajectory matching (MTT and TESLA) over the shared engine.

The outer loop is the same for every method of the family; a method differs in its
configuration (presets) and in a few hooks: which start epochs to sample, how images and
labels start, whether an update is kept, what happens after it and which images are saved.
DATM (methods/datm.py) and FTD (methods/ftd.py) subclass `TrajectoryMatching` and override
those hooks; AST's options are configuration fields every method of the family honours.

Reproducibility: each outer iteration draws from its own generator derived from
(seed, iteration), so a resumed run draws exactly what an uninterrupted one would. With
`segments_per_iteration` S > 1, segment s > 0 draws from (seed, iteration, s); segment 0
keeps the single-segment stream.

Under torchrun, segment s of every iteration is matched on rank s % world and the segments'
gradients are summed over ranks with all_reduce, so every rank holds the same mean and makes
the same update and the same decisions (divergence, DATM's gate, FTD's average); rank 0
alone writes the checkpoint, the log and the validation scores.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddtool import distributed
from ddtool.augment import DSA, DSAConfig
from ddtool.data import sample_per_class
from ddtool.errors import ConfigError, DDToolError
from ddtool.evaluation import get_protocol, train_fresh_network
from ddtool.experts import ExpertStore
from ddtool.matching import InnerStep, MatchResult, MatchTarget, SyntheticBatch, Unroll, get_backend
from ddtool.matching.engine import BACKENDS, Forward
from ddtool.methods.base import DistillContext, Method, register_method, require_finite
from ddtool.durations import format_duration, format_step
from ddtool.methods.experts import describe_expert_plan, expert_config_for, experts_wall_clock, open_experts
from ddtool.methods.initialisation import representative_indices
from ddtool.networks import ParamLayout, create_network, format_arch, network_options
from ddtool.seeding import derive_seed, generator, seeded
from ddtool.storage import SyntheticSet
from ddtool.storage.atomic import atomic_path, save_torch
from ddtool.training import check_precision

LABEL_MODES = ("hard", "expert_soft", "learned")
Relabel = Callable[[torch.Tensor], torch.Tensor]  # images -> label logits
INIT_MODES = ("real", "noise", "kmeans")
AUTO_BACKEND = "auto"  # the backend setting that lets the run choose (TrajectoryMatching.choose_backend)


@dataclass(frozen=True)
class TrajectoryConfig:
    # The student/expert network.
    arch: str = "convnet"
    width: int = 128
    depth: int = 0  # 0: the default depth for the image size
    zca: bool = False
    # Experts (trained or found by configuration).
    experts: int = 10
    expert_train_epochs: int = 20
    expert_lr: float = 0.01
    expert_momentum: float = 0.0
    expert_weight_decay: float = 0.0
    expert_batch_size: int = 256
    expert_optimizer: str = "sgd"  # sgd | sam | gsam (FTD's flat experts)
    expert_lr_decay: str = "none"  # none | step | cosine
    expert_rho: float = 0.01  # SAM/GSAM neighbourhood radius
    expert_gsam_alpha: float = 0.3  # GSAM's surrogate-gap weight (FTD's published code: 1)
    expert_adaptive: bool = True  # the adaptive (ASAM) perturbation, as the published FTD code
    # AST's expert side (methods.md §6): the early epochs' loss scaled 0.50 ... 0.95, and the
    # input-gradient penalty's weight (AST: 2; 0 = off).
    expert_ast_loss_scaling: bool = False
    expert_ast_input_grad_penalty: float = 0.0
    expert_seed: int = 0  # experts are shared by runs of any seed; this picks the buffer
    # the experts' training forward passes: fp32, or bf16 autocast (a GPU's speed; a buffer of its own)
    expert_precision: str = "fp32"
    # Matching (methods.md notation: N = syn_steps, M = expert_epochs, T+ = max_start_epoch).
    syn_steps: int = 20
    expert_epochs: int = 2
    min_start_epoch: int = 0
    max_start_epoch: int = 10
    batch_syn: int = 0  # 0: the whole synthetic set at every inner step
    # auto: bptt where its memory (N steps' activations, measured) fits in a quarter of the
    # device's memory, else exact; both give the same gradient (exact costs ~1.34x bptt on a CPU)
    backend: str = "auto"
    augment: bool = True  # DSA inside the unroll
    # (expert, start epoch) segments matched per outer iteration; their gradients (images, labels,
    # α) and losses are averaged into one update. Under torchrun they are split over the processes,
    # so it must be a multiple of the number of processes (the result does not depend on it).
    segments_per_iteration: int = 1
    # Outer optimisation.
    iterations: int = 1000
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_init: float = 0.01  # α₀
    lr_label: float = 2.0
    img_momentum: float = 0.5
    lr_momentum: float = 0.5
    label_momentum: float = 0.9
    max_lr_growth: float = 100.0  # α beyond α₀ × this counts as divergence
    min_lr_factor: float = 1e-3  # α is kept at or above α₀ × this (a negative step size is meaningless)
    labels: str = "hard"  # hard | expert_soft (TESLA) | learned (DATM)
    soft_label_temperature: float = 1.0
    init: str = "real"  # real | noise | kmeans (AST's representative images)
    # AST's options (methods.md §6), usable with every trajectory method.
    ast_balanced_loss: float = 0.0  # inner CE scaled by 1 + this × start_epoch / max_start_epoch
    ast_intermediate_weight: float = 0.0  # weight of extra matches to θ*_{t+m}, 0 < m < M, at step N·m/M
    ast_weight_perturbation: float = 0.0  # start conv weights += this × their std × N(0, 1)
    ast_inner_momentum: float = 0.0  # heavy-ball momentum of the student's inner SGD
    # FTD's moving average of the images (what is saved when on), usable with every method.
    ema_decay: float = 0.0  # 0: off
    ema_bias_correction: bool = False  # start the average at zero and divide by 1 - decay^t
    init_pool_per_class: int = 500  # real images per class scored by experts for kmeans/correct-only init
    # Bookkeeping.
    checkpoint_every: int = 50
    eval_every: int = 0  # validation evaluation period (0: only the final set)
    eval_epochs: int = 300
    eval_networks: int = 1  # fresh networks each validation trains (their mean accuracy counts)
    max_rollbacks: int = 5
    # A wall-clock budget in seconds for the set's whole cost (0: none): the recorded training
    # time of the experts it uses (cached ones too) plus distillation. The outer loop stops
    # before an iteration that would pass it; `ddtool distill --budget` sizes the run to it.
    budget_s: float = 0.0

    def __post_init__(self) -> None:
        positive = ("experts", "expert_train_epochs", "syn_steps", "expert_epochs", "iterations",
                    "checkpoint_every", "eval_epochs", "eval_networks", "segments_per_iteration")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.backend not in (AUTO_BACKEND, *BACKENDS):
            raise ConfigError(f"Unknown backend {self.backend!r}; choose one of {AUTO_BACKEND}, {', '.join(BACKENDS)}.")
        if self.labels not in LABEL_MODES:
            raise ConfigError(f"labels must be one of {', '.join(LABEL_MODES)} (got {self.labels!r}).")
        if self.init not in INIT_MODES:
            raise ConfigError(f"init must be one of {', '.join(INIT_MODES)} (got {self.init!r}).")
        if min(self.ast_balanced_loss, self.ast_intermediate_weight, self.ast_weight_perturbation) < 0:
            raise ConfigError("AST option weights must be >= 0.")
        if not 0 <= self.ast_inner_momentum < 1:
            raise ConfigError("ast_inner_momentum must be in [0, 1).")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns the moving average off), got {self.ema_decay}.")
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            raise ConfigError("Need 0 <= min_start_epoch < max_start_epoch.")
        # Start epochs are drawn from [min, max): the last, max - 1, needs max - 1 + M stored epochs.
        if self.max_start_epoch - 1 + self.expert_epochs > self.expert_train_epochs:
            raise ConfigError(
                f"Start epochs up to {self.max_start_epoch - 1} plus expert_epochs={self.expert_epochs} need experts "
                f"trained for at least {self.max_start_epoch - 1 + self.expert_epochs} epochs "
                f"(expert_train_epochs={self.expert_train_epochs})."
            )
        if ":" in self.arch:
            raise ConfigError(f"arch={self.arch!r}: name the network alone (e.g. arch=convnet, or an alias such as "
                              "arch=convnet-bn); width and depth are settings of their own.")
        # an unknown network fails here, with the known ones listed; a preset's width is
        # ignored by networks without one (a user's is refused: unused_settings), but a depth
        # is only ever asked for
        accepted = network_options(self.arch)
        if self.depth and "depth" not in accepted:
            raise ConfigError(f"Network {self.arch!r} has no depth option; drop depth={self.depth}.")
        require_finite(self)
        if min(self.lr_img, self.lr_lr, self.lr_init, self.lr_label) <= 0:
            raise ConfigError("lr_img, lr_lr, lr_init and lr_label must be positive.")
        if self.budget_s < 0:
            raise ConfigError(f"budget_s must be >= 0 (0: no budget), got {self.budget_s}.")
        if self.max_rollbacks < 0:
            raise ConfigError(f"max_rollbacks must be >= 0 (0: stop at the first divergence), got {self.max_rollbacks}.")
        if not self.soft_label_temperature > 0:
            raise ConfigError(f"soft_label_temperature must be positive, got {self.soft_label_temperature}.")
        if self.batch_syn < 0 or self.eval_every < 0:
            raise ConfigError("batch_syn and eval_every must be >= 0 (0: the whole set at every inner step / "
                              "only the final set).")
        if not 0 < self.min_lr_factor < 1 < self.max_lr_growth:
            raise ConfigError("Need 0 < min_lr_factor < 1 < max_lr_growth.")
        check_precision(self.expert_precision, "expert_precision")

    def unused_settings(self) -> dict[str, str]:
        """{setting: why} for the settings the chosen network ignores (build_config refuses them
        when given explicitly)."""
        return {} if "width" in network_options(self.arch) else {"width": f"network {self.arch!r} has no width option"}

    def arch_options(self) -> dict:
        """The network's options from width and depth, for the networks that have them: the
        presets' width applies to the convnet family, and `--set arch=resnet18` must not fail
        on an option that network does not take."""
        accepted = network_options(self.arch)
        options = {"width": self.width} if "width" in accepted else {}
        if self.depth and "depth" in accepted:
            options["depth"] = self.depth
        return options


# Fashion-MNIST presets, chosen on the validation split (see README "Choosing the presets").
# "cpu": the base fits a 2-core CPU in about half an hour end to end (3 small experts x 6
# epochs, width 32); its IPC-10 and IPC-50 variants train 20-epoch experts (about 76 min, once).
# "gpu": the full setting (width 128, more experts and iterations).
FASHION_CPU = TrajectoryConfig(width=32, experts=3, expert_train_epochs=6, syn_steps=10, expert_epochs=2,
                               max_start_epoch=4, batch_syn=100, iterations=100, lr_img=100.0, lr_lr=1e-5,
                               lr_init=0.01, checkpoint_every=20)
FASHION_GPU = TrajectoryConfig(width=128, experts=20, expert_train_epochs=30, syn_steps=40, expert_epochs=2,
                               max_start_epoch=20, iterations=5000, lr_img=100.0, lr_lr=1e-5, lr_init=0.01,
                               checkpoint_every=200, eval_every=500)

# Per-IPC changes to the Fashion-MNIST presets: `--ipc 1` with the preset fashion-cpu, named or
# by default, runs "fashion-cpu-ipc1" (methods.base.resolve_preset); other IPCs, the base.
# CPU: chosen for MTT on the validation split (scripts/tune_fashion.py, README "Choosing the
# presets") and inherited by the family; GPU: the CPU's choice carried over, not validated.
FASHION_IPC_CHANGES: dict[int, dict[str, dict]] = {
    # 10 images: an inner step is cheap, and longer unrolls scored better (N = 10/30/50/80:
    # 58.4/69.4/70.6/71.6% on validation, lr_img 100; lr_img 1000 was worse at N = 10 and 30)
    1: {"cpu": dict(syn_steps=80), "gpu": dict(syn_steps=80)},
    # 500 images learn what the first epochs teach from real images alone: matching start epochs
    # below 4 of 6-epoch experts scored 83.56% on validation, under a random real subset's 84.42;
    # 20-epoch experts with start epochs below 10 / 16 scored 85.54 / 85.77 for MTT (lr_img 100
    # held against 1000 for every method). TESLA: 84.26 below 16, 83.65 below 18, so the family
    # default stays at 16 and MTT has its own (MTT_IPC_CHANGES). The GPU experts are long
    # already (30 epochs, start < 20).
    50: {"cpu": dict(expert_train_epochs=20, max_start_epoch=16), "gpu": dict(lr_img=100.0)},
}

# MTT's own variants (FTD's too, checked on its GSAM experts). IPC 50: start epochs over the
# whole 20-epoch trajectory, below 19: MTT 86.26 ± 0.22 on validation (86.20 below 18, 85.77
# below 16); FTD 86.10 ± 0.34 (85.88 below 16, 84.21 on the 6-epoch experts). IPC 10: the
# 20-epoch experts too, start epochs below 16: MTT 79.64 ± 0.12 (78.59 on the 6-epoch experts
# below 4; 79.32 below 10, 79.07 below 19), FTD 79.54 ± 0.28 (78.91). TESLA keeps the 6-epoch
# experts at IPC 10: its labels come from the target-epoch expert, and below 16 it scored 74.98
# against 78.06.
MTT_IPC_CHANGES = {**FASHION_IPC_CHANGES,
                   10: {"cpu": dict(expert_train_epochs=20, max_start_epoch=16)},
                   50: {**FASHION_IPC_CHANGES[50], "cpu": dict(expert_train_epochs=20, max_start_epoch=19)}}


def with_ipc_variants(presets: dict[str, TrajectoryConfig],
                      changes_by_ipc: dict[int, dict[str, dict]] = FASHION_IPC_CHANGES) -> dict[str, TrajectoryConfig]:
    """`presets` plus the per-IPC variants of its fashion-cpu and fashion-gpu entries."""
    out = dict(presets)
    for size in ("cpu", "gpu"):
        base = presets.get(f"fashion-{size}")
        if base is None:
            continue
        for ipc, changes in changes_by_ipc.items():
            if size in changes:  # an IPC may change only one size
                out[f"fashion-{size}-ipc{ipc}"] = dataclasses.replace(base, **changes[size])
    return out


# The published MTT settings (methods.md §2): CIFAR experts are 50-epoch ConvNet-3 runs.
_CIFAR = dict(experts=100, expert_train_epochs=50, iterations=5000)
PUBLISHED_MTT = {
    "cifar10-ipc1": TrajectoryConfig(syn_steps=50, expert_epochs=2, max_start_epoch=2, zca=True, lr_img=100,
                                     lr_lr=1e-7, lr_init=0.01, **_CIFAR),
    "cifar10-ipc10": TrajectoryConfig(syn_steps=30, expert_epochs=2, max_start_epoch=20, zca=True, lr_img=100,
                                      lr_lr=1e-5, lr_init=0.001, **_CIFAR),
    "cifar10-ipc50": TrajectoryConfig(syn_steps=30, expert_epochs=2, max_start_epoch=40, zca=False, lr_img=1000,
                                      lr_lr=1e-5, lr_init=0.001, **_CIFAR),
    "cifar100-ipc1": TrajectoryConfig(syn_steps=20, expert_epochs=3, max_start_epoch=20, zca=True, lr_img=1000,
                                      lr_lr=1e-5, lr_init=0.01, **_CIFAR),
    "cifar100-ipc10": TrajectoryConfig(syn_steps=20, expert_epochs=2, max_start_epoch=20, zca=False, lr_img=1000,
                                       lr_lr=1e-5, lr_init=0.01, **_CIFAR),
    "cifar100-ipc50": TrajectoryConfig(syn_steps=80, expert_epochs=2, max_start_epoch=40, batch_syn=125, zca=True,
                                       lr_img=1000, lr_lr=1e-5, lr_init=0.01, **_CIFAR),
    "tiny-ipc1": TrajectoryConfig(syn_steps=10, expert_epochs=2, max_start_epoch=10, lr_img=1e4, lr_lr=1e-4,
                                  lr_init=0.01, depth=4, **_CIFAR),
    "tiny-ipc10": TrajectoryConfig(syn_steps=20, expert_epochs=2, max_start_epoch=40, batch_syn=200, lr_img=1e4,
                                   lr_lr=1e-4, lr_init=0.01, depth=4, **_CIFAR),
    "tiny-ipc50": TrajectoryConfig(syn_steps=20, expert_epochs=2, max_start_epoch=40, batch_syn=300, lr_img=1e4,
                                   lr_lr=1e-4, lr_init=0.01, depth=4, **_CIFAR),
}


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a key of ddtool.matching.engine.BACKENDS
    reason: str

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def device_memory(device: torch.device) -> int:
    """Bytes of memory installed on `device` (a GPU's own; a CPU's, the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class MatchingState:
    """Everything the outer loop changes; a checkpoint is exactly this."""

    iteration: int
    images: torch.Tensor
    hard_labels: torch.Tensor  # class ids of the images (the targets unless labels are soft)
    lr: torch.Tensor
    label_logits: torch.Tensor | None
    optimizer_states: dict
    lr_scale: float = 1.0  # halved at each rollback
    rollbacks: int = 0
    best_val: float = -1.0
    best: dict | None = None  # {"iteration", "images", "lr", "label_logits"} of the best validation score
    extra: dict = dataclasses.field(default_factory=dict)  # subclass state (e.g. FTD's EMA)
    elapsed: float = 0.0  # seconds of outer iterations up to this state, over every process that ran them
    budget_spent: bool = False  # the loop stopped here at its budget: a resumed run goes no further

    def clone(self) -> "MatchingState":
        return copy.deepcopy(self)


@dataclass
class Segment:
    """One (expert, start epoch) segment of an outer iteration, and the generator that drew it
    (the unroll's minibatches and augmentations continue from it)."""

    expert: int
    start_epoch: int
    rng: torch.Generator


class TrajectoryMatching(Method):
    """MTT: match N student steps on the synthetic set to M expert epochs."""

    config_class = TrajectoryConfig
    default_protocol = "mtt"
    default_preset = "fashion-cpu"
    checkpoint_name = "checkpoint.pt"
    presets = with_ipc_variants({"fashion-cpu": FASHION_CPU, "fashion-gpu": FASHION_GPU,
                                 **{f"mtt-{k}": v for k, v in PUBLISHED_MTT.items()}})

    def student_arch(self) -> str:
        return format_arch(self.config.arch, self.config.arch_options())

    # ---- hooks for the methods built on this loop -------------------------------------------
    def start_epoch_range(self, iteration: int) -> tuple[int, int]:
        """Start epochs are drawn uniformly from [low, high)."""
        return self.config.min_start_epoch, self.config.max_start_epoch

    def initialise(self, ctx: DistillContext, experts: ExpertStore, forward: Forward
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, their hard labels, learnable label logits or None), class-major."""
        c, data = self.config, ctx.data
        if c.init == "kmeans":
            idx = representative_indices(data, experts, forward, ctx.ipc, pool_per_class=c.init_pool_per_class,
                                         generator=generator(ctx.seed, "init"))
        else:
            idx = sample_per_class(data.train_y, data.spec.num_classes, ctx.ipc, generator(ctx.seed, "init"))
        images = data.train_x[idx].detach().clone()
        if c.init == "noise":
            images = torch.randn(images.shape, generator=generator(ctx.seed, "noise")).to(images.device)
        hard = data.train_y[idx]
        logits = F.one_hot(hard, data.spec.num_classes).float() * 3.0 if c.labels == "learned" else None
        return images, hard, logits

    def fixed_targets(self, state: MatchingState, forward: Forward, target_params: torch.Tensor) -> torch.Tensor:
        if self.config.labels == "expert_soft":
            # TESLA: the target-epoch expert's soft predictions on the current images.
            with torch.no_grad():
                logits = forward(target_params, state.images.detach())
            return F.softmax(logits / self.config.soft_label_temperature, dim=1)
        return state.hard_labels

    def skip_reason(self, result: MatchResult) -> str | None:
        """A reason to leave this iteration's update out (DATM's loss gate), or None."""
        return None

    def on_start(self, state: MatchingState) -> None:
        """Called once on a fresh (not resumed) run, before the first iteration."""
        if self.config.ema_decay:
            # Published FTD starts the average at the initial real images; with bias correction
            # it starts at zero so that only distilled iterates are averaged.
            state.extra["ema"] = state.images.detach().clone() * (0.0 if self.config.ema_bias_correction else 1.0)
            state.extra["ema_updates"] = 0

    def after_update(self, state: MatchingState) -> None:
        """Called after every applied update (skipped or rolled-back ones do not count)."""
        decay = self.config.ema_decay
        if decay:
            state.extra["ema"].mul_(decay).add_(state.images.detach(), alpha=1 - decay)
            state.extra["ema_updates"] += 1

    def images_to_save(self, state: MatchingState) -> torch.Tensor:
        """The images a run's result holds: the moving average when one is kept, else the iterate."""
        c = self.config
        if not c.ema_decay:
            return state.images.detach()
        ema, updates = state.extra["ema"], state.extra["ema_updates"]
        if c.ema_bias_correction:
            return ema / (1 - c.ema_decay ** updates) if updates else state.images.detach().clone()
        return ema.clone()

    # ---- the loop --------------------------------------------------------------------------
    fits_budget = True
    splits_over_processes = True
    # What a budget's sizing timed already (ddtool.run), so that the plan states the same figures.
    timed_iteration_s: float | None = None
    timed_experts_s: float | None = None
    # Of experts trained for E epochs, a budgeted run matches start epochs below this share of E.
    budget_start_share = 0.8

    def budget_settings(self, epochs: int, iterations: int, base: TrajectoryConfig) -> dict:
        """The matching settings of a budgeted run on `epochs`-epoch experts over `iterations`
        outer iterations: start epochs spread in proportion to the trajectory's length."""
        return {"max_start_epoch": start_epochs_below(self.budget_start_share, epochs, base.expert_epochs)}

    def describe_start_epochs(self) -> str:
        low, high = self.start_epoch_range(0)
        return f"start epochs [{low}, {high})"

    def plan(self, ctx: DistillContext) -> list[str]:
        c = self.config
        lines = [
            f"{self.name}: {ctx.ipc} image{'s' if ctx.ipc != 1 else ''}/class of {ctx.data.spec.name} "
            f"({ctx.ipc * ctx.data.spec.num_classes} images), "
            f"{self.student_arch()}, {c.iterations} iterations of N={c.syn_steps} student steps against "
            f"M={c.expert_epochs} expert epochs, {self.describe_start_epochs()}, "
            f"backend {self.choose_backend(ctx).describe()}, labels {c.labels}, init {c.init}"
            + (f", {c.segments_per_iteration} segments per iteration" if c.segments_per_iteration > 1 else "")
            + (f", saves the images' moving average (decay {c.ema_decay}"
               f"{', bias-corrected' if c.ema_bias_correction else ''})" if c.ema_decay else ""),
        ]
        lines += describe_expert_plan(expert_config_for(c, ctx), ctx, self.timed_experts_s)
        per_iteration = self.timed_iteration_s or self.time_iteration(ctx)
        world = distributed.world_size()
        lines.append(f"distillation: about {format_duration(per_iteration * c.iterations)} ({c.iterations} iterations "
                     f"at {format_step(per_iteration)}{f' on each of {world} processes' if world > 1 else ''}, timed here)"
                     + (f", plus a validation every {c.eval_every} iterations" if c.eval_every else ""))
        return lines

    def choose_backend(self, ctx: DistillContext) -> "BackendChoice":
        """The gradient backend this run uses: the configured one, or for "auto" bptt when N
        steps of its graph (one step's saved tensors, measured, times N) fit in a quarter of
        the device's memory, else exact. The same choice on the same machine every time (it
        reads the memory installed, not what is free), so a resumed run continues alike."""
        c = self.config
        if c.backend != AUTO_BACKEND:
            return BackendChoice(c.backend, "as configured")
        cached = getattr(self, "_backend_choice", None)
        if cached is not None and cached[0] == (ctx.ipc, ctx.device):
            return cached[1]
        need = c.syn_steps * self._bptt_step_bytes(ctx)
        memory = device_memory(ctx.device)
        if need <= memory / 4:
            choice = BackendChoice("bptt", f"auto: N={c.syn_steps} steps' graph, about {need / 2**30:.2f} GiB, fits "
                                           f"in a quarter of the {memory / 2**30:.0f} GiB here")
        else:
            choice = BackendChoice("exact", f"auto: bptt's graph of N={c.syn_steps} steps, about "
                                            f"{need / 2**30:.1f} GiB, would pass a quarter of the "
                                            f"{memory / 2**30:.0f} GiB here; exact keeps one step's")
        self._backend_choice = ((ctx.ipc, ctx.device), choice)
        return choice

    def _stand_in_network(self, ctx: DistillContext) -> tuple[torch.nn.Module, ParamLayout]:
        """A fresh student network on the run's device, for plans that measure before any
        expert exists (seeded apart from the run's own draws)."""
        c, spec = self.config, ctx.data.spec
        with seeded(derive_seed(ctx.seed, "timing")):
            net = create_network(c.arch, channels=spec.channels, num_classes=spec.num_classes,
                                 image_size=spec.image_size, **c.arch_options()).to(ctx.device)
        return net, ParamLayout.from_module(net)

    def _bptt_step_bytes(self, ctx: DistillContext) -> int:
        """Bytes of the tensors one inner step's double-backward graph keeps alive (bptt keeps
        N of them), counted over one stand-in step with autograd's saved-tensor hooks."""
        c, spec, device = self.config, ctx.data.spec, ctx.device
        net, layout = self._stand_in_network(ctx)
        rng = generator(ctx.seed, "timing")
        count = c.batch_syn or ctx.ipc * spec.num_classes
        images = torch.randn(count, spec.channels, spec.image_size, spec.image_size, generator=rng).to(device)
        images.requires_grad_(True)
        hard = torch.arange(count, device=device) % spec.num_classes
        theta = layout.flatten(net).to(device).requires_grad_(True)
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        dsa = DSA(DSAConfig(flip=spec.flip)) if c.augment else None
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = images
            if dsa is not None:
                x = dsa.apply(x, dsa.sample(count, spec.image_size, spec.image_size, rng).to(device))
            loss = F.cross_entropy(layout.functional_forward(net, theta, x), hard)
            torch.autograd.grad(loss, theta, create_graph=True)
        return sum(storages.values())

    def time_iteration(self, ctx: DistillContext, steps: int = 3) -> float:
        """Seconds an outer iteration should take on this device: `steps` inner steps of a
        stand-in segment (a fresh network's weights for the expert's, random images of the set's
        size), timed after a warm-up and scaled to syn_steps and this process's segments. The
        experts are not needed, so a plan can say it before they are trained."""
        c, spec, device = self.config, ctx.data.spec, ctx.device
        net, layout = self._stand_in_network(ctx)
        start = layout.flatten(net).to(device)
        rng = generator(ctx.seed, "timing")
        shape = (ctx.ipc * spec.num_classes, spec.channels, spec.image_size, spec.image_size)
        images = torch.randn(shape, generator=rng).to(device).requires_grad_(True)
        hard = torch.arange(spec.num_classes, device=device).repeat_interleave(ctx.ipc)
        dsa = DSA(DSAConfig(flip=spec.flip)) if c.augment else None
        steps = min(steps, c.syn_steps)
        backend = get_backend(self.choose_backend(ctx).name)

        def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return layout.functional_forward(net, flat, x)

        def one_segment() -> float:
            began = time.perf_counter()
            unroll = Unroll(forward=forward, start=start, steps=self._inner_steps(torch.Size(shape), rng, dsa)[:steps],
                            targets=[MatchTarget(step=steps, params=start.detach() + 0.01, normaliser=start.new_tensor(1.0))],
                            augmenter=dsa, momentum=c.ast_inner_momentum)
            lr = torch.tensor(c.lr_init, device=device, requires_grad=True)
            result = backend(unroll, SyntheticBatch(images=images, lr=lr,
                                                    fixed_targets=hard, label_temperature=c.soft_label_temperature))
            float(result.loss)  # waits for the device
            return time.perf_counter() - began

        one_segment()  # warm-up: first calls allocate and pick kernels
        segments = len(distributed.indices_of_this_rank(c.segments_per_iteration))
        return one_segment() / steps * c.syn_steps * segments

    def distill(self, ctx: DistillContext) -> SyntheticSet:
        c = self.config
        world = distributed.world_size()
        if c.segments_per_iteration % world:
            raise ConfigError(
                f"segments_per_iteration={c.segments_per_iteration} cannot be split evenly over {world} processes. "
                f"Each outer iteration matches that many segments, segment s on process s mod {world}; set it to a "
                f"multiple of {world} (--set segments_per_iteration={world} * k). The result depends only on it, "
                "not on the number of processes."
            )
        if not distributed.is_main():
            # The other ranks compute the same state as rank 0: one voice is enough.
            ctx = dataclasses.replace(ctx, log=lambda message: None, progress=False)
        data, device = ctx.data, ctx.device
        experts = open_experts(expert_config_for(c, ctx), ctx)
        ctx.experts_s = experts_wall_clock(experts)
        distill_started = time.perf_counter()
        spec = data.spec
        with seeded(derive_seed(ctx.seed, "student")):
            net = create_network(c.arch, channels=spec.channels, num_classes=spec.num_classes,
                                 image_size=spec.image_size, **c.arch_options()).to(device)
        layout = ParamLayout.from_module(net)
        if layout.total != experts.layout.total:
            raise DDToolError(f"The experts have {experts.layout.total} parameters but a {c.arch} with "
                              f"{c.arch_options()} has {layout.total}: they were trained for another architecture.")

        def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return layout.functional_forward(net, flat, x)

        relabel = self._expert_labeller(experts, forward, device) if c.labels == "expert_soft" else None
        if distributed.is_main():
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = ctx.work_dir / self.checkpoint_name
        state = self._load_checkpoint(checkpoint, device) if ctx.resume else None
        if state is None:
            images, hard, logits = self.initialise(ctx, experts, forward)
            state = MatchingState(iteration=0, images=images.to(device), hard_labels=hard.to(device),
                                  lr=torch.tensor(c.lr_init, device=device),
                                  label_logits=logits.to(device) if logits is not None else None,
                                  optimizer_states={})
            self.on_start(state)
        else:
            ctx.log(f"Resuming from {checkpoint} at iteration {state.iteration}.")
        resumed_after = state.elapsed
        images = state.images.requires_grad_(True)
        lr = state.lr.requires_grad_(True)
        label_logits = state.label_logits.requires_grad_(True) if state.label_logits is not None else None
        optimizers = self._optimizers(images, lr, label_logits, state.lr_scale)
        if state.optimizer_states:
            for name, opt in optimizers.items():
                opt.load_state_dict(state.optimizer_states[name])

        chosen = self.choose_backend(ctx)
        ctx.log(f"Gradient backend: {chosen.describe()}.")
        backend = get_backend(chosen.name)
        dsa = DSA(DSAConfig(flip=spec.flip)) if c.augment else None
        last_good = self._snapshot(state, images, lr, label_logits, optimizers)
        log_path = ctx.work_dir / "log.jsonl"
        if distributed.is_main() and log_path.exists():
            # A fresh run starts a new log; a resumed one runs again the iterations after its
            # checkpoint, so their records from the interrupted process go.
            self._keep_log_until(log_path, state.iteration)
        my_segments = distributed.indices_of_this_rank(c.segments_per_iteration)
        bar = tqdm(total=c.iterations, initial=state.iteration, desc=self.name, unit="it", disable=not ctx.progress)
        it = state.iteration
        last_seconds = 0.0
        while it < c.iterations:
            if state.budget_spent or (c.budget_s and self._budget_spent(
                    ctx, resumed_after + time.perf_counter() - distill_started, last_seconds)):
                ctx.log(f"Budget of {format_duration(c.budget_s)} reached: stopping after {it} of {c.iterations} "
                        "iterations.")
                state.budget_spent = True
                state.optimizer_states = {k: o.state_dict() for k, o in optimizers.items()}
                if distributed.is_main():
                    self._save_checkpoint(checkpoint, state)
                break
            started = time.perf_counter()
            segments = self._draw_segments(ctx.seed, it, experts)
            result = self._mean_over_segments(
                [self._segment_gradients(segments[s], experts, forward, layout, backend, dsa, state)
                 for s in my_segments])
            diverged = self._diverged(result)
            skipped = None if diverged else self.skip_reason(result)
            lr_clamped = False
            if not diverged and not skipped:
                images.grad, lr.grad = result.grad_images, result.grad_lr.reshape(lr.shape)
                if label_logits is not None:
                    label_logits.grad = result.grad_label_logits
                for opt in optimizers.values():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    lr_clamped = bool(lr < c.lr_init * c.min_lr_factor)
                    lr.clamp_(min=c.lr_init * c.min_lr_factor)
                diverged = self._diverged_after_step(images, lr, label_logits)
            if diverged:
                elapsed = state.elapsed + time.perf_counter() - started
                state, images, lr, label_logits, optimizers = self._rollback(ctx, last_good, state, it, diverged)
                it += 1
                state.iteration, state.elapsed = it, elapsed
                bar.update(1)
                continue
            it += 1
            state.iteration = it
            state.images, state.lr, state.label_logits = images, lr, label_logits
            state.elapsed += time.perf_counter() - started
            if not skipped:
                self.after_update(state)
            if distributed.is_main():
                expert, start_epoch = [s.expert for s in segments], [s.start_epoch for s in segments]
                if len(segments) == 1:  # one segment logs plain numbers, as always; several, a list entry each
                    expert, start_epoch = expert[0], start_epoch[0]
                self._log(log_path, {"iteration": it, "loss": result.loss, "target_loss": result.target_loss,
                                     "lr": float(lr.detach()),
                                     "lr_clamped": lr_clamped, "skipped": skipped, "expert": expert,
                                     "start_epoch": start_epoch, "seconds": time.perf_counter() - started})
            if c.eval_every and it % c.eval_every == 0:
                self._validate(ctx, state, relabel)
            if it % c.checkpoint_every == 0 or it == c.iterations:
                state.optimizer_states = {k: o.state_dict() for k, o in optimizers.items()}
                if distributed.is_main():
                    self._save_checkpoint(checkpoint, state)
                last_good = self._snapshot(state, images, lr, label_logits, optimizers)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{float(lr.detach()):.2e}")
            bar.update(1)
            last_seconds = time.perf_counter() - started
        bar.close()
        sset = self._final_set(ctx, state, relabel)
        ctx.resumed_s = resumed_after  # what earlier, interrupted processes spent on this run
        sset.config["backend"] = chosen.name  # the one that computed it, "auto" resolved
        return sset

    # ---- pieces of the loop -----------------------------------------------------------------
    def _budget_spent(self, ctx: DistillContext, distill_seconds: float, next_iteration: float) -> bool:
        """Whether another outer iteration (taking about `next_iteration` seconds, the last one's)
        would pass the budget, counting the experts' recorded time and `distill_seconds` so far.
        Decided by rank 0 for all, so every process stops at the same iteration."""
        spent = (ctx.experts_s or 0.0) + distill_seconds + next_iteration
        return bool(distributed.broadcast_object(spent > self.config.budget_s))

    def _draw_segments(self, seed: int, iteration: int, experts: ExpertStore) -> list[Segment]:
        """All of this iteration's segments, each from its own generator. Every rank draws all of
        them (two integers each) so that rank 0 can log what the others match."""
        c = self.config
        low, high = self.start_epoch_range(iteration)
        segments = []
        for index in range(c.segments_per_iteration):
            # Segment 0 keeps the single-segment stream: one segment per iteration draws what it always did.
            rng = generator(seed, "iteration", iteration) if index == 0 else generator(seed, "iteration", iteration,
                                                                                        index)
            expert, start_epoch = experts.sample_segment(rng, high, c.expert_epochs, min_start=low)
            segments.append(Segment(expert, start_epoch, rng))
        return segments

    def _segment_gradients(self, segment: Segment, experts: ExpertStore, forward: Forward, layout: ParamLayout,
                           backend: Callable[[Unroll, SyntheticBatch], MatchResult], dsa: DSA | None,
                           state: MatchingState) -> MatchResult:
        """The matching loss of one segment and its gradients for the images, labels and α."""
        images = state.images
        unroll = self._unroll(experts, segment.expert, segment.start_epoch, forward, layout, images.shape,
                              segment.rng, dsa, images.device)
        syn = SyntheticBatch(images=images, lr=state.lr, label_logits=state.label_logits,
                             fixed_targets=None if state.label_logits is not None else
                             self.fixed_targets(state, forward, unroll.targets[0].params),
                             label_temperature=self.config.soft_label_temperature)
        return backend(unroll, syn)

    def _mean_over_segments(self, results: list[MatchResult]) -> MatchResult:
        """The mean over all the iteration's segments, given this rank's `results`: summed here,
        summed over the ranks (all_reduce), divided by the number of segments. Every rank gets
        the same numbers; with two ranks they are also those of one process (a + b = b + a)."""
        first = results[0]
        grad_images, grad_lr = first.grad_images.clone(), first.grad_lr.clone()
        grad_labels = first.grad_label_logits.clone() if first.grad_label_logits is not None else None
        losses = torch.tensor([first.loss, first.target_loss], dtype=torch.float64, device=grad_images.device)
        for r in results[1:]:
            grad_images += r.grad_images
            grad_lr += r.grad_lr
            if grad_labels is not None:
                grad_labels += r.grad_label_logits
            losses += torch.tensor([r.loss, r.target_loss], dtype=torch.float64, device=grad_images.device)
        distributed.all_reduce_sum_([t for t in (grad_images, grad_lr, grad_labels, losses) if t is not None])
        count = self.config.segments_per_iteration
        return MatchResult(loss=float(losses[0]) / count, grad_images=grad_images / count, grad_lr=grad_lr / count,
                           grad_label_logits=grad_labels / count if grad_labels is not None else None,
                           # per-target terms are one segment's breakdown; a mean of them would mean little
                           terms=first.terms if count == 1 else [], target_loss=float(losses[1]) / count)

    def _unroll(self, experts: ExpertStore, expert: int, start_epoch: int, forward: Forward, layout: ParamLayout,
                shape: torch.Size, rng: torch.Generator, dsa: DSA | None, device: torch.device) -> Unroll:
        """The student's unroll for one segment, with AST's options applied."""
        c = self.config
        expert_start = experts.params(expert, start_epoch).to(device)
        final = experts.params(expert, start_epoch + c.expert_epochs).to(device)
        targets = [MatchTarget(step=c.syn_steps, params=final, normaliser=(expert_start - final).pow(2).sum())]
        if c.ast_intermediate_weight:
            for m in range(1, c.expert_epochs):
                middle = experts.params(expert, start_epoch + m).to(device)
                targets.append(MatchTarget(step=max(1, round(c.syn_steps * m / c.expert_epochs)), params=middle,
                                           normaliser=(expert_start - middle).pow(2).sum(),
                                           weight=c.ast_intermediate_weight))
        start = expert_start
        if c.ast_weight_perturbation:
            start = perturb_conv_weights(expert_start, layout, c.ast_weight_perturbation, rng)
        scale = 1.0 + c.ast_balanced_loss * start_epoch / c.max_start_epoch
        return Unroll(forward=forward, start=start, steps=self._inner_steps(shape, rng, dsa), targets=targets,
                      augmenter=dsa, momentum=c.ast_inner_momentum, inner_loss_scale=scale)

    def _optimizers(self, images, lr, label_logits, lr_scale: float) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        optimizers = {
            "images": torch.optim.SGD([images], lr=c.lr_img * lr_scale, momentum=c.img_momentum),
            "lr": torch.optim.SGD([lr], lr=c.lr_lr * lr_scale, momentum=c.lr_momentum),
        }
        if label_logits is not None:
            optimizers["labels"] = torch.optim.SGD([label_logits], lr=c.lr_label * lr_scale, momentum=c.label_momentum)
        return optimizers

    def _inner_steps(self, shape: torch.Size, rng: torch.Generator, dsa: DSA | None) -> list[InnerStep]:
        """Minibatches walk through fresh permutations of the set, each cut into batches (the last
        shorter when batch_syn does not divide the set, so no batch holds an image twice); each
        step its own DSA draw."""
        c = self.config
        n_images, height, width = shape[0], shape[2], shape[3]
        batch = min(c.batch_syn or n_images, n_images)
        chunks: list[torch.Tensor] = []
        steps = []
        for _ in range(c.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n_images, generator=rng).split(batch))
            idx = chunks.pop(0)
            aug = dsa.sample(idx.numel(), height, width, rng) if dsa is not None else None
            steps.append(InnerStep(batch=idx, augmentation=aug))
        return steps

    def _diverged(self, result) -> str | None:
        grads = [result.grad_images, result.grad_lr] + ([result.grad_label_logits]
                                                       if result.grad_label_logits is not None else [])
        if not math.isfinite(result.loss) or not all(torch.isfinite(g).all() for g in grads):
            return "the matching loss or its gradient is NaN/inf"
        return None

    def _diverged_after_step(self, images, lr, label_logits) -> str | None:
        c = self.config
        if not torch.isfinite(images).all() or (label_logits is not None and not torch.isfinite(label_logits).all()):
            return "the synthetic images or labels became NaN/inf"
        alpha = float(lr.detach())
        if alpha > c.lr_init * c.max_lr_growth:
            return f"the learned step size exploded ({alpha:.3g} > {c.max_lr_growth:g} × α₀)"
        return None

    def _snapshot(self, state, images, lr, label_logits, optimizers) -> MatchingState:
        snap = state.clone()
        snap.images, snap.lr = images.detach().clone(), lr.detach().clone()
        snap.label_logits = label_logits.detach().clone() if label_logits is not None else None
        snap.optimizer_states = copy.deepcopy({k: o.state_dict() for k, o in optimizers.items()})
        return snap

    def _rollback(self, ctx: DistillContext, last_good: MatchingState, current: MatchingState, it: int, why: str):
        """Return to the last good state with halved outer learning rates; give up after a few.

        The best validated set so far survives: it may have been scored after the checkpoint
        rolled back to, and it was a finite, validated set."""
        state = last_good.clone()
        state.best_val, state.best = current.best_val, copy.deepcopy(current.best)
        state.rollbacks = last_good.rollbacks + 1
        last_good.rollbacks = state.rollbacks
        state.lr_scale = last_good.lr_scale * 0.5
        last_good.lr_scale = state.lr_scale
        if state.rollbacks > self.config.max_rollbacks:
            raise DDToolError(
                f"Distillation diverged {state.rollbacks} times ({why} at iteration {it + 1}); stopping rather than "
                f"saving a broken set. Lower lr_img / lr_lr, or use fewer syn_steps.")
        ctx.log(f"Iteration {it + 1}: {why}. Rolled back to iteration {last_good.iteration} and halved the outer "
                f"learning rates (rollback {state.rollbacks} of at most {self.config.max_rollbacks}).")
        images = state.images.requires_grad_(True)
        lr = state.lr.requires_grad_(True)
        label_logits = state.label_logits.requires_grad_(True) if state.label_logits is not None else None
        optimizers = self._optimizers(images, lr, label_logits, state.lr_scale)
        for name, opt in optimizers.items():
            # the saved state brings its momentum and the rates of its time, which may already be
            # halved once or more: the rates come from the scale, which counts every rollback
            scaled_rates = [group["lr"] for group in opt.param_groups]
            opt.load_state_dict(state.optimizer_states[name])
            for group, rate in zip(opt.param_groups, scaled_rates):
                group["lr"] = rate
        state.images, state.lr, state.label_logits = images, lr, label_logits
        return state, images, lr, label_logits, optimizers

    def _validate(self, ctx: DistillContext, state: MatchingState, relabel: Relabel | None) -> None:
        """Score the current set on the validation split; remember the best for saving."""
        data = ctx.data
        if data.val_x.shape[0] == 0:
            return
        score = None
        if distributed.is_main():  # few networks to train: rank 0 trains them, the others wait for the score
            protocol = get_protocol(self.default_protocol)
            images, targets = self.images_to_save(state), self._eval_targets(state, relabel)
            scores = [train_fresh_network(images, targets, data, protocol=protocol, lr=float(state.lr.detach()),
                                          arch=self.student_arch(), seed=derive_seed(ctx.seed, "validation",
                                                                                     state.iteration, *run),
                                          epochs=self.config.eval_epochs, held_out=(data.val_x, data.val_y))
                      # network 0 keeps the seed a single validation network always had
                      for run in [()] + [(n,) for n in range(1, self.config.eval_networks)]]
            score = sum(scores) / len(scores)
        score = distributed.broadcast_object(score)  # so every rank keeps the same best state
        ctx.log(f"Iteration {state.iteration}: validation accuracy {100 * score:.2f}%")
        if score > state.best_val:
            state.best_val = score
            state.best = {"iteration": state.iteration, "images": self.images_to_save(state).clone(),
                          "lr": state.lr.detach().clone(),
                          "label_logits": state.label_logits.detach().clone() if state.label_logits is not None else None}

    def _eval_targets(self, state: MatchingState, relabel: Relabel | None) -> torch.Tensor:
        labels, kind = self._labels(self.images_to_save(state), state.label_logits, state.hard_labels, relabel)
        return F.softmax(labels.detach() / self.config.soft_label_temperature, dim=1) if kind == "logits" else labels

    @staticmethod
    def _labels(images: torch.Tensor, label_logits: torch.Tensor | None, hard: torch.Tensor,
                relabel: Relabel | None) -> tuple[torch.Tensor, str]:
        """The labels a set of these images carries: learned logits, the experts' logits (TESLA),
        or the hard class ids; and their kind."""
        if label_logits is not None:
            return label_logits, "logits"
        if relabel is not None:
            return relabel(images), "logits"
        return hard, "hard"

    def _expert_labeller(self, experts: ExpertStore, forward: Forward, device: torch.device) -> Relabel:
        """TESLA's labels for the saved set. During matching each segment's target expert labels
        the images; a saved set needs one labelling, and its student must train on the labels the
        images were distilled for: the experts' mean logits at the last target epoch."""
        c = self.config
        epoch = self.start_epoch_range(c.iterations)[1] - 1 + c.expert_epochs
        params = [experts.params(e, epoch).to(device) for e in range(experts.num_experts)]

        def relabel(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.stack([forward(p, images) for p in params]).mean(dim=0)
        return relabel

    def _final_set(self, ctx: DistillContext, state: MatchingState, relabel: Relabel | None) -> SyntheticSet:
        chosen = state.best if state.best is not None else {
            "iteration": state.iteration, "images": self.images_to_save(state), "lr": state.lr,
            "label_logits": state.label_logits}
        labels, kind = self._labels(chosen["images"], chosen["label_logits"], state.hard_labels, relabel)
        sset = self.make_set(ctx, chosen["images"], labels, label_kind=kind, learned_lr=float(chosen["lr"].detach()),
                             label_temperature=self.config.soft_label_temperature)
        sset.config["selected_iteration"] = chosen["iteration"]
        return sset

    @staticmethod
    def _log(path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def _keep_log_until(path: Path, iteration: int) -> None:
        """Keep only the log's records of iterations up to `iteration` (0: none)."""
        lines = [line for line in path.read_text().splitlines()
                 if line.strip() and json.loads(line)["iteration"] <= iteration]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))

    @staticmethod
    def _save_checkpoint(path: Path, state: MatchingState) -> None:
        save_torch(dataclasses.asdict(state) | {"images": state.images.detach(), "lr": state.lr.detach(),
                                                 "label_logits": state.label_logits.detach()
                                                 if state.label_logits is not None else None}, path)

    @staticmethod
    def _load_checkpoint(path: Path, device: torch.device) -> MatchingState | None:
        """The checkpoint at `path`, None if there is none. Rank 0 reads it and sends its bytes
        to the other ranks, so they resume from the same state without seeing rank 0's disk."""
        payload = path.read_bytes() if distributed.is_main() and path.exists() else None
        payload = distributed.broadcast_object(payload)
        if payload is None:
            return None
        raw = torch.load(io.BytesIO(payload), map_location=device, weights_only=False)
        return MatchingState(**raw)


def start_epochs_below(share: float, epochs: int, span: int) -> int:
    """The bound `share` of the way along `epochs`-epoch experts, at least 1 and at most what
    `span`-epoch segments allow (the last start epoch plus span within the trajectory)."""
    return max(1, min(round(share * epochs), epochs - span + 1))


def perturb_conv_weights(params: torch.Tensor, layout: ParamLayout, scale: float,
                         generator: torch.Generator) -> torch.Tensor:
    """AST's weight perturbation: each convolution weight tensor (4-d) of the start parameters
    gets Gaussian noise of `scale` times that tensor's own standard deviation."""
    perturbed = params.clone()
    views = layout.unflatten(perturbed)
    for name, shape in zip(layout.names, layout.shapes):
        if len(shape) == 4:
            weight = views[name]
            noise = torch.randn(weight.shape, generator=generator).to(weight)
            weight.add_(scale * weight.std() * noise)
    return perturbed


@register_method("mtt")
class MTT(TrajectoryMatching):
    presets = with_ipc_variants(TrajectoryMatching.presets, MTT_IPC_CHANGES)


@register_method("tesla")
class TESLA(TrajectoryMatching):
    """TESLA: constant-memory matching with the target expert's soft labels.

    The gradient is exact by default (bptt where its graph fits, else the adjoint sweep, whose
    memory is that of TESLA's rule); `backend="tesla"` reproduces the published first-order rule.
    """

    presets = {name: dataclasses.replace(cfg, labels="expert_soft")
               for name, cfg in TrajectoryMatching.presets.items()}

