"""The trajectory-matching family's configuration: one typed dataclass, checked once when it
is made, and the named presets (Fashion-MNIST for a CPU and a GPU, each with per-IPC variants,
and the published CIFAR/Tiny ImageNet settings).

How the Fashion-MNIST presets were chosen on the validation split, with the scores behind each
choice: docs/presets.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ddtool.errors import ConfigError
from ddtool.matching.engine import BACKENDS
from ddtool.methods.base import require_finite
from ddtool.methods.settings import setting
from ddtool.networks import network_options
from ddtool.training import check_precision

LABEL_MODES = ("hard", "expert_soft", "learned")
INIT_MODES = ("real", "noise", "kmeans")
AUTO_BACKEND = "auto"  # the backend setting that lets the run choose (TrajectoryMatching.choose_backend)


@dataclass(frozen=True)
class TrajectoryConfig:
    """The settings of a trajectory-matching run; each field's meaning is its `setting` text
    (`ddtool methods mtt` lists them). Notation of docs/methods.md: N = syn_steps, M =
    match_span_epochs (the matching span), E = expert_train_epochs (how long experts train)."""

    # Old names of renamed settings, still taken wherever settings are given (--set, a settings
    # dict, a set file's record), so that sets and scripts made before a rename run again.
    renamed_settings: ClassVar[dict[str, str]] = {"expert_epochs": "match_span_epochs"}

    # The student/expert network.
    arch: str = setting("convnet", "the network the experts and the student train, a bare name (convnet, resnet18, "
                                   "vgg11, ...); its options are width and depth")
    width: int = setting(128, "the network's width, for networks with a width option (the ConvNet family, mlp)")
    depth: int = setting(0, "the ConvNet's depth in blocks; 0: the default for the image size")
    zca: bool = setting(False, "distill (and evaluate) in ZCA-whitened space")
    # Experts (trained or found by configuration).
    experts: int = setting(10, "how many expert trajectories are trained (or found in the cache) and matched")
    expert_train_epochs: int = setting(20, "E, how long each expert is trained: the epochs of its whole trajectory "
                                           "(not the matching span M, match_span_epochs)")
    expert_lr: float = setting(0.01, "the experts' learning rate")
    expert_momentum: float = setting(0.0, "the experts' SGD momentum")
    expert_weight_decay: float = setting(0.0, "the experts' weight decay")
    expert_batch_size: int = setting(256, "the experts' minibatch size")
    expert_optimizer: str = setting("sgd", "the experts' optimiser: sgd | sam | gsam (FTD's flat experts)")
    expert_lr_decay: str = setting("none", "the experts' learning-rate schedule: none | step | cosine")
    expert_rho: float = setting(0.01, "SAM/GSAM neighbourhood radius")
    expert_gsam_alpha: float = setting(0.3, "GSAM's surrogate-gap weight (FTD's published code: 1)")
    expert_adaptive: bool = setting(True, "the adaptive (ASAM) perturbation of SAM/GSAM, as the published FTD code")
    # AST's expert side (docs/methods.md §6).
    expert_ast_loss_scaling: bool = setting(False, "AST: the experts' loss in their early epochs scaled 0.50 ... 0.95")
    expert_ast_input_grad_penalty: float = setting(0.0, "AST: weight of the experts' input-gradient penalty (AST: 2; "
                                                        "0 = off)")
    expert_seed: int = setting(0, "which buffer of experts: experts are shared by runs of any seed, this picks them")
    expert_precision: str = setting("fp32", "the experts' training forward passes: fp32, or bf16 autocast (a GPU's "
                                            "speed; a buffer of its own)")
    # Matching (docs/methods.md notation: N = syn_steps, M = match_span_epochs, T+ = max_start_epoch).
    syn_steps: int = setting(20, "N: the student's SGD steps on the synthetic set in one segment (the unroll)")
    match_span_epochs: int = setting(2, "M, the matching span: the expert epochs one segment spans (N student steps "
                                        "from θ*_t are matched to θ*_{t+M}; formerly expert_epochs); not how long "
                                        "experts train (expert_train_epochs)")
    min_start_epoch: int = setting(0, "the lowest start epoch t a segment is drawn from")
    max_start_epoch: int = setting(10, "start epochs are drawn from [min_start_epoch, max_start_epoch); "
                                       "max_start_epoch - 1 + match_span_epochs must be at most expert_train_epochs")
    batch_syn: int = setting(0, "synthetic images in each inner step's minibatch (0: the whole set at every step)")
    backend: str = setting("auto", "the gradient's backend: auto (bptt where N steps' activations fit in a quarter "
                                   "of the device's memory, else exact) | bptt | exact | tesla")
    augment: bool = setting(True, "DSA augmentation inside the unroll")
    segments_per_iteration: int = setting(1, "(expert, start epoch) segments matched per outer iteration, averaged "
                                             "into one update; under torchrun a multiple of the processes")
    # Outer optimisation.
    iterations: int = setting(1000, "outer iterations: updates of the images (and labels, α)")
    lr_img: float = setting(100.0, "the images' learning rate (outer SGD)")
    lr_lr: float = setting(1e-5, "the learning rate of α, the student's learnable step size")
    lr_init: float = setting(0.01, "α₀: the student's step size at the start")
    lr_label: float = setting(2.0, "the learning rate of learned soft labels (labels=learned)")
    img_momentum: float = setting(0.5, "the images' outer momentum")
    lr_momentum: float = setting(0.5, "α's outer momentum")
    label_momentum: float = setting(0.9, "the learned labels' outer momentum")
    max_lr_growth: float = setting(100.0, "divergence: α beyond α₀ × this")
    min_lr_factor: float = setting(1e-3, "α is kept at or above α₀ × this (a negative step size is meaningless)")
    # Divergence while finite (methods/divergence.py), each rolled back from like NaN.
    max_image_scale: float = setting(10.0, "divergence: the images' standard deviation beyond this multiple of "
                                           "the initial set's")
    lr_floor_patience: int = setting(10, "divergence: α at its floor this many iterations in a row")
    loss_window: int = setting(20, "divergence: the iterations whose mean loss is watched (see max_loss_rise)")
    max_loss_rise: float = setting(1.5, "divergence: the loss's mean over loss_window iterations above 1 and this "
                                        "factor above its lowest earlier mean")
    labels: str = setting("hard", "the set's labels: hard | expert_soft (TESLA: the target expert's) | learned "
                                  "(DATM)")
    soft_label_temperature: float = setting(1.0, "temperature T of soft labels: targets are softmax(logits / T)")
    init: str = setting("real", "how the images start: real | noise | kmeans (AST's representative images)")
    # AST's options (docs/methods.md §6), usable with every trajectory method.
    ast_balanced_loss: float = setting(0.0, "AST: inner CE scaled by 1 + this × start_epoch / max_start_epoch")
    ast_intermediate_weight: float = setting(0.0, "AST: weight of extra matches to θ*_{t+m}, 0 < m < M, at step "
                                                  "N·m/M")
    ast_weight_perturbation: float = setting(0.0, "AST: start conv weights += this × their std × N(0, 1)")
    ast_inner_momentum: float = setting(0.0, "AST: heavy-ball momentum of the student's inner SGD")
    # FTD's moving average of the images (what is saved when on), usable with every method.
    ema_decay: float = setting(0.0, "decay of the images' moving average, which is saved instead of the last "
                                    "images (FTD); 0: off")
    ema_bias_correction: bool = setting(False, "start the images' moving average at zero and divide by 1 - decay^t")
    init_pool_per_class: int = setting(500, "real images per class scored by experts for kmeans/correct-only init")
    # Bookkeeping.
    checkpoint_every: int = setting(50, "iterations between checkpoints (what --resume continues from)")
    eval_every: int = setting(0, "iterations between validation evaluations, which choose the iteration saved "
                                 "(0: only the final set)")
    eval_epochs: int = setting(300, "epochs each validation network trains")
    eval_networks: int = setting(1, "fresh networks each validation trains (their mean accuracy counts)")
    max_rollbacks: int = setting(5, "rollbacks after a divergence (to the last checkpoint, outer lrs halved) "
                                    "before the run stops")
    # The outer loop stops before an iteration that would pass the budget.
    budget_s: float = setting(0.0, "a wall-clock budget in seconds for the set's whole cost, cached experts' recorded "
                                   "training included (0: none); `ddtool distill --budget` sizes the run to it")
    # A budget chooses the experts' length, so it places the start epochs as shares of it.
    budget_start_share: float = setting(0.8, "with a budget: start epochs are matched below this share of the "
                                             "experts' trajectory (whatever length the budget gives it)")

    def __post_init__(self) -> None:
        positive = ("experts", "expert_train_epochs", "syn_steps", "match_span_epochs", "iterations",
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
        if self.max_start_epoch - 1 + self.match_span_epochs > self.expert_train_epochs:
            raise ConfigError(self.span_error("max_start_epoch", self.max_start_epoch))
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
        if not 0 < self.budget_start_share <= 1:
            raise ConfigError(f"budget_start_share must be in (0, 1], got {self.budget_start_share}.")
        if self.max_rollbacks < 0:
            raise ConfigError(f"max_rollbacks must be >= 0 (0: stop at the first divergence), got {self.max_rollbacks}.")
        if not self.soft_label_temperature > 0:
            raise ConfigError(f"soft_label_temperature must be positive, got {self.soft_label_temperature}.")
        if self.batch_syn < 0 or self.eval_every < 0:
            raise ConfigError("batch_syn and eval_every must be >= 0 (0: the whole set at every inner step / "
                              "only the final set).")
        if not 0 < self.min_lr_factor < 1 < self.max_lr_growth:
            raise ConfigError("Need 0 < min_lr_factor < 1 < max_lr_growth.")
        if not (self.max_image_scale > 1 and self.max_loss_rise > 1):
            raise ConfigError("max_image_scale and max_loss_rise must be above 1 (they are multiples of a healthy "
                              f"run's scale and loss), got {self.max_image_scale} and {self.max_loss_rise}.")
        if min(self.lr_floor_patience, self.loss_window) < 1:
            raise ConfigError("lr_floor_patience and loss_window count iterations: at least 1.")
        check_precision(self.expert_precision, "expert_precision")

    def span_error(self, start_setting: str, max_start: int) -> str:
        """Why start epochs below `max_start` (the setting `start_setting`) plus the span M do
        not fit in the experts' E epochs, and which settings to change."""
        last, span, epochs = max_start - 1, self.match_span_epochs, self.expert_train_epochs
        if span <= epochs:  # start epochs below E - M + 1 leave room for the span
            lower = f"lower {start_setting} to at most {epochs - span + 1}"
        else:  # no start epoch does: the span itself must shrink
            lower = f"lower match_span_epochs to at most {epochs}" + (f" with {start_setting}=1" if last else "")
        return (f"Start epochs up to {last} plus match_span_epochs={span} need experts trained for at least "
                f"{last + span} epochs (expert_train_epochs={epochs}): {lower}, or raise expert_train_epochs to "
                f"{last + span}.")

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


# Fashion-MNIST presets, chosen on the validation split (docs/presets.md).
# "cpu": the base fits a 2-core CPU in about half an hour end to end (3 small experts x 6
# epochs, width 32); its IPC-10 and IPC-50 variants train 20-epoch experts (about 76 min, once).
# "gpu": the full setting (width 128, more experts and iterations).
FASHION_CPU = TrajectoryConfig(width=32, experts=3, expert_train_epochs=6, syn_steps=10, match_span_epochs=2,
                               max_start_epoch=4, batch_syn=100, iterations=100, lr_img=100.0, lr_lr=1e-5,
                               lr_init=0.01, checkpoint_every=20)
FASHION_GPU = TrajectoryConfig(width=128, experts=20, expert_train_epochs=30, syn_steps=40, match_span_epochs=2,
                               max_start_epoch=20, iterations=5000, lr_img=100.0, lr_lr=1e-5, lr_init=0.01,
                               checkpoint_every=200, eval_every=500)

# Per-IPC changes to the Fashion-MNIST presets: `--ipc 1` with the preset fashion-cpu, named or
# by default, runs "fashion-cpu-ipc1" (methods.base.resolve_preset); other IPCs, the base.
# CPU: chosen for MTT on the validation split (scripts/tune_fashion.py, docs/presets.md) and
# inherited by the family; GPU: the CPU's choice carried over, not validated.
FASHION_IPC_CHANGES: dict[int, dict[str, dict]] = {
    # 10 images: an inner step is cheap and longer unrolls score better
    1: {"cpu": dict(syn_steps=80), "gpu": dict(syn_steps=80)},
    # 500 images learn what the first epochs teach from real images alone: match later ones
    50: {"cpu": dict(expert_train_epochs=20, max_start_epoch=16), "gpu": dict(lr_img=100.0)},
}

# MTT's own variants (FTD's too): 20-epoch experts at IPC 10 as well, and at IPC 50 start epochs
# over the whole trajectory. TESLA keeps the family's (its labels come from the target expert).
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


# The published MTT settings (docs/methods.md §2): CIFAR experts are 50-epoch ConvNet-3 runs.
_CIFAR = dict(experts=100, expert_train_epochs=50, iterations=5000)
PUBLISHED_MTT = {
    "cifar10-ipc1": TrajectoryConfig(syn_steps=50, match_span_epochs=2, max_start_epoch=2, zca=True, lr_img=100,
                                     lr_lr=1e-7, lr_init=0.01, **_CIFAR),
    "cifar10-ipc10": TrajectoryConfig(syn_steps=30, match_span_epochs=2, max_start_epoch=20, zca=True, lr_img=100,
                                      lr_lr=1e-5, lr_init=0.001, **_CIFAR),
    "cifar10-ipc50": TrajectoryConfig(syn_steps=30, match_span_epochs=2, max_start_epoch=40, zca=False, lr_img=1000,
                                      lr_lr=1e-5, lr_init=0.001, **_CIFAR),
    "cifar100-ipc1": TrajectoryConfig(syn_steps=20, match_span_epochs=3, max_start_epoch=20, zca=True, lr_img=1000,
                                      lr_lr=1e-5, lr_init=0.01, **_CIFAR),
    "cifar100-ipc10": TrajectoryConfig(syn_steps=20, match_span_epochs=2, max_start_epoch=20, zca=False, lr_img=1000,
                                       lr_lr=1e-5, lr_init=0.01, **_CIFAR),
    "cifar100-ipc50": TrajectoryConfig(syn_steps=80, match_span_epochs=2, max_start_epoch=40, batch_syn=125, zca=True,
                                       lr_img=1000, lr_lr=1e-5, lr_init=0.01, **_CIFAR),
    "tiny-ipc1": TrajectoryConfig(syn_steps=10, match_span_epochs=2, max_start_epoch=10, lr_img=1e4, lr_lr=1e-4,
                                  lr_init=0.01, depth=4, **_CIFAR),
    "tiny-ipc10": TrajectoryConfig(syn_steps=20, match_span_epochs=2, max_start_epoch=40, batch_syn=200, lr_img=1e4,
                                   lr_lr=1e-4, lr_init=0.01, depth=4, **_CIFAR),
    "tiny-ipc50": TrajectoryConfig(syn_steps=20, match_span_epochs=2, max_start_epoch=40, batch_syn=300, lr_img=1e4,
                                   lr_lr=1e-4, lr_init=0.01, depth=4, **_CIFAR),
}


def start_epochs_below(share: float, epochs: int, span: int) -> int:
    """The bound `share` of the way along `epochs`-epoch experts, at least 1 and at most what
    `span`-epoch segments allow (the last start epoch plus span within the trajectory)."""
    return max(1, min(round(share * epochs), epochs - span + 1))
