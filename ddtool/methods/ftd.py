"""FTD (Du et al., CVPR 2023): MTT on flat expert trajectories, plus a moving average of the
synthetic images, which is what gets saved and evaluated (always on fresh networks).

The flat trajectories come from experts trained with GSAM (expert_optimizer="gsam"). The
average starts, as published, at the initial real images; with 0.9999 over 5000 iterations
61% of it is still those images, so bias correction is offered: the average then starts at
zero and is divided by 1 − decay^t, weighting only the distilled iterates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ddtool.errors import ConfigError
from ddtool.methods.base import register_method
from ddtool.methods.settings import meaning_of, setting
from ddtool.methods.trajectory import TrajectoryMatching
from ddtool.methods.trajectory_config import (
    FASHION_CPU, FASHION_GPU, MTT_IPC_CHANGES, PUBLISHED_MTT, TrajectoryConfig, with_ipc_variants,
)


@dataclass(frozen=True)
class FTDConfig(TrajectoryConfig):
    """MTT's settings with FTD's defaults: flat (GSAM) experts and the image moving average,
    which lives in the shared loop (TrajectoryConfig.ema_decay) so any method can use it."""

    expert_optimizer: str = setting("gsam", meaning_of(TrajectoryConfig, "expert_optimizer"))
    ema_decay: float = setting(0.999, meaning_of(TrajectoryConfig, "ema_decay"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ema_decay:
            raise ConfigError("FTD is defined by its moving average: ema_decay must be in (0, 1).")


def _ftd(base: TrajectoryConfig, **changes) -> FTDConfig:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrajectoryConfig)}
    return FTDConfig(**{**fields, "expert_optimizer": "gsam", "ema_decay": 0.999, **changes})


@register_method("ftd")
class FTD(TrajectoryMatching):
    config_class = FTDConfig
    default_preset = "fashion-cpu"
    presets = with_ipc_variants({
        # 100 iterations: decay 0.98 averages roughly the last 50 iterates; bias-corrected, so
        # the initial real images do not dominate (0.999 would leave 90% of them in).
        "fashion-cpu": _ftd(FASHION_CPU, ema_decay=0.98, ema_bias_correction=True),
        "fashion-gpu": _ftd(FASHION_GPU, ema_decay=0.9995),
        **{f"ftd-{name}": _ftd(cfg) for name, cfg in PUBLISHED_MTT.items()},
    }, MTT_IPC_CHANGES)
