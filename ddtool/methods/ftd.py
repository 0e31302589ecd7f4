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
from ddtool.methods.trajectory import (
    FASHION_CPU,
    FASHION_GPU,
    PUBLISHED_MTT,
    MatchingState,
    TrajectoryConfig,
    TrajectoryMatching,
)


@dataclass(frozen=True)
class FTDConfig(TrajectoryConfig):
    expert_optimizer: str = "gsam"
    ema_decay: float = 0.999
    ema_bias_correction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}.")


def _ftd(base: TrajectoryConfig, **changes) -> FTDConfig:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrajectoryConfig)}
    return FTDConfig(**{**fields, "expert_optimizer": "gsam", **changes})


@register_method("ftd")
class FTD(TrajectoryMatching):
    config_class = FTDConfig
    default_preset = "fashion-cpu"
    presets = {
        "fashion-cpu": _ftd(FASHION_CPU),
        "fashion-gpu": _ftd(FASHION_GPU, ema_decay=0.9995),
        **{f"ftd-{name}": _ftd(cfg) for name, cfg in PUBLISHED_MTT.items()},
    }

    def on_start(self, state: MatchingState) -> None:
        images = state.images.detach()
        state.extra["ema"] = images.clone() * (0.0 if self.config.ema_bias_correction else 1.0)
        state.extra["ema_updates"] = 0

    def after_update(self, state: MatchingState) -> None:
        decay = self.config.ema_decay
        state.extra["ema"].mul_(decay).add_(state.images.detach(), alpha=1 - decay)
        state.extra["ema_updates"] += 1

    def images_to_save(self, state: MatchingState):
        ema = state.extra["ema"]
        if self.config.ema_bias_correction:
            updates = state.extra["ema_updates"]
            return ema / (1 - self.config.ema_decay ** updates) if updates else state.images.detach().clone()
        return ema.clone()
