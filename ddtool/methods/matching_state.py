"""The state of a trajectory-matching run and how it persists: the checkpoint (exactly the
state), the per-iteration log, and the snapshot a divergence rolls back to.

A resumed run reads the checkpoint, truncates the log to the checkpoint's iteration (the
interrupted process may have logged iterations after it) and continues; because every outer
iteration draws from a generator derived from (seed, iteration), it then repeats exactly what
an uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ddtool import distributed
from ddtool.files import atomic_path, save_torch


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
    # a budgeted run's outer iterations, counted again from the pace of its first ones; a resumed
    # run keeps this count (None: not counted again yet)
    budget_iterations: int | None = None
    divergence_watch: dict = dataclasses.field(default_factory=dict)  # DivergenceWatch.state_dict()

    def clone(self) -> "MatchingState":
        return copy.deepcopy(self)

    def snapshot(self, images: torch.Tensor, lr: torch.Tensor, label_logits: torch.Tensor | None,
                 optimizers: dict[str, torch.optim.Optimizer]) -> "MatchingState":
        """A detached copy of this state with the live tensors and optimisers' states: what a
        rollback returns to."""
        snap = self.clone()
        snap.images, snap.lr = images.detach().clone(), lr.detach().clone()
        snap.label_logits = label_logits.detach().clone() if label_logits is not None else None
        snap.optimizer_states = copy.deepcopy({k: o.state_dict() for k, o in optimizers.items()})
        return snap


def save_checkpoint(path: Path, state: MatchingState) -> None:
    """Write `state` to `path` atomically (a kill leaves the previous checkpoint whole)."""
    save_torch(dataclasses.asdict(state) | {"images": state.images.detach(), "lr": state.lr.detach(),
                                             "label_logits": state.label_logits.detach()
                                             if state.label_logits is not None else None}, path)


def load_checkpoint(path: Path, device: torch.device) -> MatchingState | None:
    """The checkpoint at `path`, None if there is none. Rank 0 reads it and sends its bytes
    to the other ranks, so they resume from the same state without seeing rank 0's disk."""
    payload = path.read_bytes() if distributed.is_main() and path.exists() else None
    payload = distributed.broadcast_object(payload)
    if payload is None:
        return None
    raw = torch.load(io.BytesIO(payload), map_location=device, weights_only=False)
    return MatchingState(**raw)


def append_log(path: Path, record: dict) -> None:
    """Add one iteration's record (a JSON line) to the run log."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def keep_log_until(path: Path, iteration: int) -> None:
    """Keep only the log's records of iterations up to `iteration` (0: none)."""
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line)["iteration"] <= iteration]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
