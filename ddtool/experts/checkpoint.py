"""Per-expert partial checkpoints, so that a killed expert restarts at its last finished epoch.

A checkpoint holds what the next epoch depends on: the network's state (parameters and any
buffers), the optimiser's state (momentum buffers) and the snapshots so far. The random
stream needs no saving: each epoch draws from a generator derived from (expert seed, epoch),
and the learning rate is a pure function of the epoch. Written atomically every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ddtool.files import save_torch


@dataclass
class ExpertProgress:
    """An expert after `epochs_done` epochs."""

    fingerprint: str
    index: int
    epochs_done: int
    snapshots: torch.Tensor  # (epochs_done + 1, P) float32, CPU
    model_state: dict
    optimizer_state: dict
    epoch_loss: list[float] = field(default_factory=list)
    epoch_accuracy: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (epoch, test accuracy)
    seconds: float = 0.0  # wall-clock of the epochs done, over every process that trained them


def save_progress(progress: ExpertProgress, path: Path) -> None:
    # Not dataclasses.asdict: it deep-copies every tensor, the snapshots included.
    record = {f.name: getattr(progress, f.name) for f in fields(progress)}
    save_torch(record, path, size_hint=progress.snapshots.nbytes)


def load_progress(path: Path, *, fingerprint: str, index: int) -> ExpertProgress | None:
    """The checkpoint at `path` if it is one of this expert of this configuration, else None
    (a missing, unreadable or foreign checkpoint only means starting the expert afresh)."""
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        progress = ExpertProgress(**raw)
    except Exception:  # noqa: BLE001 - any damage means: not resumable, train from scratch
        return None
    if progress.fingerprint != fingerprint or progress.index != index:
        return None
    progress.evaluations = [tuple(e) for e in progress.evaluations]  # type: ignore[misc]
    return progress
