"""What counts as a diverged trajectory-matching run, and what to tell the user about it.

A run can go wrong while every number stays finite: on a dataset the presets were not tuned
for, the images may grow to ±1e5 while the learned step size α sits at its floor, and the
set trains networks to chance. So divergence is any of

- NaN/inf in the matching loss, its gradients, the images, the labels;
- α above α₀ × max_lr_growth (an exploding step size);
- the images' standard deviation beyond `max_image_scale` times the initial set's: healthy
  sets on the datasets we measured stay within 1.3x (single pixels may spike further, so the
  largest value is reported but not judged);
- α held at its floor (α₀ × min_lr_factor) for `lr_floor_patience` iterations in a row: the
  matching wants a negative step, i.e. no step at all helps it;
- the matching loss rising: its mean over the last `loss_window` iterations above 1 (worse
  than a student that does not move) and above `max_loss_rise` times the lowest such mean
  seen before.

Each triggers the loop's rollback to the last checkpointed state with halved outer learning
rates; `DivergenceWatch.advice()` says which settings to change when rollbacks run out.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

# The reasons, as keys of ADVICE.
NOT_FINITE, LR_EXPLODED, IMAGES_GREW, LR_AT_FLOOR, LOSS_ROSE = (
    "not_finite", "lr_exploded", "images_grew", "lr_at_floor", "loss_rose")

ADVICE = {
    NOT_FINITE: "lower lr_img and lr_lr, or use fewer syn_steps",
    LR_EXPLODED: "lower lr_lr, or raise max_lr_growth if a larger step size is expected",
    IMAGES_GREW: "lower lr_img; on small images (16 px or less) a shallower network (depth) often helps",
    LR_AT_FLOOR: "lower lr_img or lr_lr, or raise lr_init; on small images try a shallower network (depth)",
    LOSS_ROSE: "lower lr_img and lr_lr, or use fewer syn_steps",
}


@dataclass(frozen=True)
class Divergence:
    kind: str  # a key of ADVICE
    message: str  # what happened, in words

    def __str__(self) -> str:
        return self.message


def image_scale(images: torch.Tensor) -> tuple[float, float]:
    """(standard deviation, largest |value|) of a set of images."""
    flat = images.detach().float()
    return float(flat.std()), float(flat.abs().max())


class DivergenceWatch:
    """Watches one run's outer iterations for the signs above; `reset()` after a rollback."""

    def __init__(self, initial_images: torch.Tensor, *, lr_floor: float, lr_ceiling: float,
                 max_image_scale: float, lr_floor_patience: int, loss_window: int, max_loss_rise: float):
        self.initial_std, self.initial_max = image_scale(initial_images)
        self.lr_floor, self.lr_ceiling = lr_floor, lr_ceiling
        self.max_image_scale = max_image_scale
        self.lr_floor_patience = lr_floor_patience
        self.loss_window, self.max_loss_rise = loss_window, max_loss_rise
        self.kinds: list[str] = []  # of every divergence seen, for the advice when rollbacks run out
        self.reset()

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges as the uninterrupted one would."""
        return {"initial_std": self.initial_std, "initial_max": self.initial_max, "kinds": list(self.kinds),
                "iterations_at_floor": self.iterations_at_floor, "losses": list(self.losses),
                "lowest_window_mean": self.lowest_window_mean}

    def load_state_dict(self, saved: dict) -> None:
        self.initial_std, self.initial_max = saved["initial_std"], saved["initial_max"]
        self.kinds = list(saved["kinds"])
        self.iterations_at_floor = saved["iterations_at_floor"]
        self.losses = deque(saved["losses"], maxlen=self.loss_window)
        self.lowest_window_mean = saved["lowest_window_mean"]

    def record(self, divergence: Divergence) -> None:
        """Count a divergence the run rolls back from, and start judging afresh."""
        self.kinds.append(divergence.kind)
        self.reset()

    def advice(self) -> str:
        """The settings to try after the divergences seen, most recent first, in one sentence."""
        return "; ".join(ADVICE[kind] for kind in dict.fromkeys(reversed(self.kinds)))

    def reset(self) -> None:
        self.iterations_at_floor = 0
        self.losses: deque[float] = deque(maxlen=self.loss_window)
        self.lowest_window_mean = math.inf

    def check_gradients(self, loss: float, gradients: list[torch.Tensor]) -> Divergence | None:
        """Before the update: the matching loss and its gradients must be finite."""
        if not math.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in gradients):
            return Divergence(NOT_FINITE, "the matching loss or its gradient is NaN/inf")
        return None

    def check_update(self, images: torch.Tensor, lr: torch.Tensor, label_logits: torch.Tensor | None,
                     loss: float, lr_clamped: bool) -> Divergence | None:
        """After the update: the new images, labels and α, and the loss that led to them."""
        if not bool(torch.isfinite(images).all()) or (label_logits is not None
                                                      and not bool(torch.isfinite(label_logits).all())):
            return Divergence(NOT_FINITE, "the synthetic images or labels became NaN/inf")
        alpha = float(lr.detach())
        if alpha > self.lr_ceiling:
            return Divergence(LR_EXPLODED, f"the learned step size exploded ({alpha:.3g} > {self.lr_ceiling:.3g})")
        grown = self.image_growth(images)
        if grown is not None:
            return grown
        self.iterations_at_floor = self.iterations_at_floor + 1 if lr_clamped else 0
        if self.iterations_at_floor >= self.lr_floor_patience:
            return Divergence(LR_AT_FLOOR, f"the learned step size stayed at its floor ({self.lr_floor:.3g}) for "
                                           f"{self.iterations_at_floor} iterations in a row")
        self.losses.append(loss)
        if len(self.losses) == self.loss_window:
            mean = sum(self.losses) / len(self.losses)
            if mean > 1.0 and mean > self.max_loss_rise * self.lowest_window_mean:
                return Divergence(LOSS_ROSE, f"the matching loss rose to {mean:.3g} over the last {self.loss_window} "
                                             f"iterations (from {self.lowest_window_mean:.3g})")
            self.lowest_window_mean = min(self.lowest_window_mean, mean)
        return None

    def image_growth(self, images: torch.Tensor) -> Divergence | None:
        """IMAGES_GREW if the images' scale left the sane range, else None."""
        std, largest = image_scale(images)
        if std > self.max_image_scale * self.initial_std:
            return Divergence(IMAGES_GREW, f"the synthetic images grew far beyond the real data's scale (std {std:.3g}, "
                                           f"largest |value| {largest:.3g}; the initial set's: {self.initial_std:.3g}, "
                                           f"{self.initial_max:.3g})")
        return None

