"""What an expert buffer is: the configuration that determines every trajectory in it.

`ExpertConfig.fingerprint()` hashes exactly the settings that change the trajectories, so a
store can be found again by configuration. The number of experts is left out on purpose:
expert i is a pure function of (configuration, i), so a store holding more experts of the
same fingerprint serves a request for fewer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ddtool.data.preprocess import ZCA_FITTED_ON
from ddtool.data.registry import canonical_name, get_spec
from ddtool.errors import ConfigError
from ddtool.networks import check_network_options
from ddtool.training import check_precision

OPTIMIZERS = ("sgd", "sam", "gsam")
LR_DECAYS = ("none", "step", "cosine")

# Bump when the training procedure changes in a way that changes trajectories for the same
# settings (order of random draws, loss definition, ...): old cached stores then stop matching.
TRAJECTORY_ALGORITHM = 1

# AST's "clipping loss": the loss is scaled 0.50, 0.55, ..., 0.95 over the first 10 epochs.
_AST_SCALE_START, _AST_SCALE_STEP, _AST_SCALE_EPOCHS = 0.50, 0.05, 10


@dataclass(frozen=True)
class ExpertConfig:
    dataset: str = "fashion-mnist"
    arch: str = "convnet"
    arch_options: dict[str, Any] = field(default_factory=dict)
    zca: bool = False
    experts: int = 10  # K
    epochs: int = 50  # E: a trajectory has E + 1 snapshots (init and after every epoch)
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: str = "none"  # "step": x0.1 at half the epochs; "cosine": per-epoch cosine to 0
    optimizer: str = "sgd"
    rho: float = 0.01  # SAM/GSAM neighbourhood radius
    gsam_alpha: float = 0.3
    adaptive: bool = True  # the published FTD code always uses the adaptive (ASAM) perturbation
    augment: bool = True  # DSA
    flip: bool | None = None  # DSA may mirror images; None = the dataset's own setting
    ast_loss_scaling: bool = False
    ast_input_grad_penalty: float = 0.0  # lambda; 0 = off (AST uses 2)
    seed: int = 0
    eval_every: int = 0  # test accuracy every N epochs as well as at the end; 0 = end only
    # Cap on the number of training images (a seeded subset): quick runs and tests.
    train_subset: int | None = None
    precision: str = "fp32"  # of the training forward passes (ddtool.training.PRECISIONS)
    # The digest of the images the experts learn from (PreparedData.content_digest; set by
    # experts.plan.for_data): part of a cached store's name, so that other images under the same
    # dataset name make another store. None: a name without it, as stores had before.
    data_digest: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset", canonical_name(self.dataset))
        object.__setattr__(self, "arch", self.arch.strip().lower())
        # Checked values (ConfigError for an unknown network or option, or a value that does not
        # fit, before any planning), in a private copy: the dataclass is frozen, its options must
        # not change behind its back.
        object.__setattr__(self, "arch_options", check_network_options(self.arch, self.arch_options))
        _require(self.experts >= 1, f"experts must be at least 1, got {self.experts}.")
        _require(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}.")
        _require(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}.")
        _require(_finite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}.")
        _require(_finite(self.momentum) and 0 <= self.momentum < 1,
                 f"momentum must be in [0, 1), got {self.momentum}.")
        _require(_finite(self.weight_decay) and self.weight_decay >= 0,
                 f"weight decay must be >= 0, got {self.weight_decay}.")
        _require(self.lr_decay in LR_DECAYS,
                 f"Unknown lr decay {self.lr_decay!r}; choose one of {', '.join(LR_DECAYS)}.")
        _require(self.optimizer in OPTIMIZERS,
                 f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
        _require(_finite(self.rho) and self.rho > 0, f"rho must be positive, got {self.rho}.")
        _require(_finite(self.gsam_alpha) and self.gsam_alpha >= 0,
                 f"GSAM alpha must be >= 0, got {self.gsam_alpha}.")
        _require(_finite(self.ast_input_grad_penalty) and self.ast_input_grad_penalty >= 0,
                 f"the AST input-gradient penalty must be >= 0, got {self.ast_input_grad_penalty}.")
        _require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}.")
        _require(self.train_subset is None or self.train_subset >= 1,
                 f"train_subset must be at least 1 image, got {self.train_subset}.")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                 f"seed must be an integer, got {self.seed!r}.")
        check_precision(self.precision, "expert precision")

    def __hash__(self) -> int:  # the dict field makes the generated hash fail
        return hash(self.fingerprint())

    # -- derived settings ---------------------------------------------------------------

    def resolved_arch_options(self) -> dict[str, Any]:
        """The options with the network's defaults filled in, so {} and {"width": 128} are
        recognised as the same ConvNet (same fingerprint, same store)."""
        from ddtool.networks import network_options

        return {**network_options(self.arch), **self.arch_options}

    def resolved_flip(self) -> bool:
        if self.flip is not None:
            return self.flip
        return get_spec(self.dataset).flip

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch `epoch` (0-based). A pure function of the epoch, so a
        resumed expert needs no scheduler state."""
        if self.lr_decay == "step":
            return self.lr * (0.1 if epoch >= self.epochs // 2 else 1.0)
        if self.lr_decay == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.lr

    def loss_scale_at(self, epoch: int) -> float:
        """AST's clipping-loss factor for epoch `epoch` (1.0 when the option is off)."""
        if self.ast_loss_scaling and epoch < _AST_SCALE_EPOCHS:
            return _AST_SCALE_START + _AST_SCALE_STEP * epoch
        return 1.0

    # -- identity -----------------------------------------------------------------------

    def trajectory_settings(self) -> dict[str, Any]:
        """Every setting that changes a trajectory, canonicalised (settings that have no effect,
        such as rho for plain SGD or flip without augmentation, are left out)."""
        settings: dict[str, Any] = {
            "algorithm": TRAJECTORY_ALGORITHM,
            "dataset": self.dataset,
            "arch": self.arch,
            "arch_options": self.resolved_arch_options(),
            "zca": self.zca,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": float(self.lr),
            "momentum": float(self.momentum),
            "weight_decay": float(self.weight_decay),
            "lr_decay": self.lr_decay,
            "optimizer": self.optimizer,
            "augment": self.augment,
            "ast_loss_scaling": self.ast_loss_scaling,
            "ast_input_grad_penalty": float(self.ast_input_grad_penalty),
            "seed": self.seed,
            "train_subset": self.train_subset,
        }
        if self.optimizer != "sgd":
            settings |= {"rho": float(self.rho), "adaptive": self.adaptive}
        if self.optimizer == "gsam":
            settings["gsam_alpha"] = float(self.gsam_alpha)
        if self.augment:
            settings["flip"] = self.resolved_flip()
        if self.precision != "fp32":  # float32 stores keep the fingerprint they always had
            settings["precision"] = self.precision
        if self.zca:  # the whitened space changed (ZCA of pixels, not of normalised images)
            settings["zca_fitted_on"] = ZCA_FITTED_ON
        return settings

    def fingerprint(self) -> str:
        """A stable hash (20 hex digits) of `trajectory_settings()`."""
        text = json.dumps(self.trajectory_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ExpertConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})

    def describe(self) -> str:
        """One line for plans and logs."""
        options = ", ".join(f"{k}={v}" for k, v in self.arch_options.items())
        opt = self.optimizer
        if self.optimizer != "sgd":
            opt += f" (rho {self.rho:g}{', adaptive' if self.adaptive else ''}"
            opt += f", alpha {self.gsam_alpha:g})" if self.optimizer == "gsam" else ")"
        extras = [f"lr {self.lr:g}", f"batch {self.batch_size}"]
        if self.momentum:
            extras.append(f"momentum {self.momentum:g}")
        if self.weight_decay:
            extras.append(f"wd {self.weight_decay:g}")
        if self.lr_decay != "none":
            extras.append(f"{self.lr_decay} lr decay")
        extras.append("DSA" if self.augment else "no augmentation")
        if self.zca:
            extras.append("ZCA")
        if self.ast_loss_scaling:
            extras.append("AST loss scaling")
        if self.ast_input_grad_penalty:
            extras.append(f"AST input-gradient penalty {self.ast_input_grad_penalty:g}")
        if self.precision != "fp32":
            extras.append(f"{self.precision} autocast")
        arch = f"{self.arch}({options})" if options else self.arch
        return f"{arch} on {self.dataset}, {opt}, " + ", ".join(extras)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"Expert configuration: {message}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
