"""Many fresh networks on the same images: an evaluation's runs, and the runs it keeps.

Under torchrun the runs are spread over the ranks (run r on rank r % world; a run depends
only on its index, so where it runs does not change it) and gathered to every rank in run
order.

An evaluation keeps each run's accuracy in the cache as soon as the run ends, until its
result is safe (a baseline: in its cache; a set: recorded in its file, see
EvaluationReport.release_kept_runs): `resume=True` takes the runs an interrupted evaluation
of the same set, protocol, network and seed finished instead of training them again (on a
CPU a cross-architecture cell is hours; a run, minutes to an hour).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ddtool import distributed
from ddtool.data import PreparedData
from ddtool.device import describe_hardware
from ddtool.evaluation import kd
from ddtool.evaluation.protocols import Protocol
from ddtool.evaluation.train import train_fresh_network
from ddtool.paths import cache_root, key_digest
from ddtool.seeding import derive_seed
from ddtool.files import atomic_path


@dataclass
class Accuracies:
    runs: list[float]
    seconds: float = 0.0
    # Whether the networks ran through torch.compile; None for a cached result from before it was recorded.
    compiled: bool | None = None
    # Runs read back from an interrupted evaluation (trained by an earlier process), by index.
    resumed: list[int] = field(default_factory=list)
    # What trained each run (device.describe_hardware -> run indices): a resumed evaluation's
    # runs may come from another machine. Empty for results from before it was recorded.
    hardware: dict[str, list[int]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.runs))

    @property
    def std(self) -> float:
        # Population std over runs, as the papers report it.
        return float(np.std(self.runs))

    def to_dict(self) -> dict:
        return {"runs": list(self.runs), "mean": self.mean, "std": self.std, "seconds": self.seconds,
                "compiled": self.compiled, **({"resumed_runs": list(self.resumed)} if self.resumed else {}),
                **({"hardware": {name: list(runs) for name, runs in self.hardware.items()}} if self.hardware else {})}

    def __str__(self) -> str:
        if len(self.runs) == 1:  # no spread to show: "± 0.00" would claim one
            return f"{100 * self.mean:.2f} (1 run)"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


def evaluate_images(
    images: torch.Tensor,
    targets: torch.Tensor | kd.LabelSource,
    data: PreparedData,
    *,
    protocol: Protocol,
    lr: float,
    arch: str = "convnet",
    seed: int = 0,
    runs: int | None = None,
    desc: str = "evaluate",
    progress: bool = True,
    images_for_run: Callable[[int], tuple[torch.Tensor, torch.Tensor | kd.LabelSource]] | None = None,
    compile: bool = False,
    checkpoint: dict | None = None,
    resume: bool = False,
    keep_runs: bool = False,
) -> Accuracies:
    """`runs` fresh networks on the same set (or on `images_for_run(i)` when each run gets
    its own, as the random baseline does). Under torchrun each rank trains its share of the
    runs and every rank returns all of them, in run order.

    `checkpoint`: what identifies this evaluation (JSON values; it must name everything the
    runs depend on). Each run's accuracy is then kept as it ends, and with `resume` the runs
    an interrupted evaluation of the same checkpoint finished are read back, not retrained.
    The kept runs are deleted once all are done, unless `keep_runs` (the caller deletes them
    with FinishedRuns(checkpoint, runs).discard() once the result is stored). `seconds` counts
    the read-back runs' time."""
    runs = runs or protocol.runs
    start = time.perf_counter()
    mine = distributed.indices_of_this_rank(runs)
    finished = FinishedRuns(checkpoint, runs) if checkpoint is not None else None
    accs: dict[int, float] = {}
    resumed: list[int] = []
    trained_on: dict[int, str | None] = {}
    here = describe_hardware(data.test_x.device)
    seconds_before = 0.0
    # Rank 0's bar stands for all ranks: they share one terminal.
    with tqdm(total=len(mine) * protocol.epochs, desc=desc, unit="epoch", leave=False,
              disable=not progress or not distributed.is_main()) as bar:
        for run in mine:
            kept = finished.read(run) if finished is not None and resume else None
            if kept is not None:
                accs[run], trained_on[run] = kept.accuracy, kept.hardware
                resumed.append(run)
                seconds_before += kept.seconds
                bar.update(protocol.epochs)
                continue
            run_start = time.perf_counter()
            x, y = images_for_run(run) if images_for_run is not None else (images, targets)
            accs[run] = train_fresh_network(x, y, data, protocol=protocol, lr=lr, arch=arch,
                                            seed=derive_seed(seed, "run", run), on_epoch=lambda: bar.update(1),
                                            compile=compile)
            trained_on[run] = here
            if finished is not None:
                finished.keep(run, accs[run], time.perf_counter() - run_start, here)
            bar.set_postfix(last=f"{100 * accs[run]:.2f}%")
    shares = distributed.gather_objects((accs, resumed, trained_on))
    everyone = {run: acc for share, _, _ in shares for run, acc in share.items()}
    hardware: dict[str, list[int]] = {}
    for run, name in sorted((run, name) for _, _, share in shares for run, name in share.items()
                            if name is not None):
        hardware.setdefault(name, []).append(run)
    if finished is not None and not keep_runs:
        finished.discard()
    return Accuracies([everyone[run] for run in range(runs)], seconds=time.perf_counter() - start + seconds_before,
                      compiled=compile, resumed=sorted(run for _, share, _ in shares for run in share),
                      hardware=hardware)


@dataclass(frozen=True)
class KeptRun:
    """A finished run of an interrupted evaluation, as kept for a resume."""

    accuracy: float
    seconds: float
    hardware: str | None = None  # device.describe_hardware; None if kept before runs named it


def kept_runs_where(match: Callable[[dict], bool]) -> list[tuple[dict, list[int]]]:
    """The interrupted evaluations whose checkpoint key satisfies `match` and whose finished
    runs wait in the cache for a resume: (checkpoint key, indices of the kept runs) each."""
    found: dict[str, tuple[dict, list[int]]] = {}
    for path in sorted((cache_root() / "evaluations").glob("*/run-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            stored = json.loads(path.read_text())
            if match(stored["key"]):
                found.setdefault(path.parent.name, (stored["key"], []))[1].append(int(stored["run"]))
    return [(key, sorted(runs)) for key, runs in found.values()]


class FinishedRuns:
    """The runs of one evaluation finished so far: one small file per run (written by the
    rank that trained it, so ranks never share a file) under
    <cache>/evaluations/<digest of the checkpoint key>/."""

    def __init__(self, key: dict, runs: int) -> None:
        self.key = key
        self.runs = runs
        self.folder = cache_root() / "evaluations" / key_digest(key)

    def _path(self, run: int) -> Path:
        return self.folder / f"run-{run}.json"

    def read(self, run: int) -> KeptRun | None:
        """The kept run `run`, or None."""
        path = self._path(run)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") != self.key:  # a digest collision, however unlikely, is not a match
                return None
            return KeptRun(float(stored["accuracy"]), float(stored["seconds"]), stored.get("hardware"))
        except FileNotFoundError:
            raise  # moved by another rank meanwhile: take_from tells this from damage
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # damaged (a machine crash can truncate a file): the run is trained again

    def keep(self, run: int, accuracy: float, seconds: float, hardware: str | None = None) -> None:
        with atomic_path(self._path(run)) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "run": run, "accuracy": accuracy, "seconds": seconds,
                                       "hardware": hardware}))

    def take_from(self, other: "FinishedRuns") -> None:
        """Move the runs `other` kept (those this one has not) under this one's key."""
        for run in range(self.runs):
            try:
                found = other.read(run)
            except FileNotFoundError:  # another rank sharing this cache moved it first
                found = None
            if found is not None and self.read(run) is None:
                self.keep(run, found.accuracy, found.seconds, found.hardware)
            other._path(run).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            other.folder.rmdir()

    def discard(self) -> None:
        """Delete this rank's kept runs (each rank deletes what it wrote)."""
        for run in distributed.indices_of_this_rank(self.runs):
            self._path(run).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another rank's files, removed by that rank
            self.folder.rmdir()


# Bumped by a fix that changes what training a network does (the loop, DSA, the networks):
# cached baselines, references and kept runs of an earlier revision are then not reused. Keys
# leave it out at 1, the revision of every entry cached before it existed.
EVALUATION_REVISION = 1


def evaluation_revision() -> int:
    return EVALUATION_REVISION


def data_key(data: PreparedData) -> dict:
    """What identifies the data an evaluation trains and tests on, for cache keys (with the
    training code's revision, which every such key needs too)."""
    key = {
        "dataset": data.spec.name,
        "preprocessing": data.preprocessing.describe(),
        "train_images": int(data.train_x.shape[0]),
        "train_split": hashlib.sha256(data.train_indices.cpu().numpy().tobytes()).hexdigest()[:16],
        "content": data.content_digest(),
    }
    if EVALUATION_REVISION != 1:
        key["revision"] = EVALUATION_REVISION
    return key
