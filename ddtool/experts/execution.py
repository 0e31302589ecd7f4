"""How a machine trains a buffer's experts: how many at once, with how many threads each, and
whether through torch.compile.

On a CPU, training one ConvNet uses a second core poorly (1.1x the images/s of one core at
width 32), while two experts trained side by side in two processes use both fully, and
torch.compile fuses the norm, activation and pooling passes that dominate small
convolutions (1.6-1.9x). The choice depends only on the machine and the configuration, never
on how many experts are left to train, so a resumed expert runs exactly as it began and
stays bit-identical to an uninterrupted run on the same machine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ddtool import distributed
from ddtool.errors import ConfigError
from ddtool.experts.config import ExpertConfig
from ddtool.experts.train import can_compile

# Compiling costs about half a minute per batch shape on a CPU (a minute for an expert's two
# shapes, the full and the last partial batch); it pays off from a few hundred thousand
# training images on (width 32: ~800 images/s eager, ~1,500 compiled, on one core).
COMPILE_MIN_IMAGES = 300_000
# Starting a worker process (and importing torch there) takes a few seconds: worth it from
# about a minute of training on.
PARALLEL_MIN_IMAGES = 100_000


# What a plan says beside a throughput timed uncompiled, when the run will compile.
UNCOMPILED_NOTE = " (timed uncompiled; compiled training is faster)"


def training_images(config: ExpertConfig, data) -> int:
    """How many images an expert trains on: the training split, capped at train_subset."""
    n = data.train_x.shape[0]
    return n if config.train_subset is None else min(n, config.train_subset)


@dataclass(frozen=True)
class ExpertExecution:
    workers: int = 1  # experts trained at once, each in its own process when > 1
    threads: int = 0  # torch threads of each expert's training; 0: leave the process's own setting
    compile: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 0:
            raise ConfigError(f"Expert training needs workers >= 1 and threads >= 0 (got {self.workers}, "
                              f"{self.threads}).")

    def describe(self) -> str:
        parts = [f"{self.workers} at a time" if self.workers > 1 else "one at a time"]
        if self.threads:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''} each")
        parts.append("compiled" if self.compile else "not compiled")
        return ", ".join(parts)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_execution(config: ExpertConfig, device: torch.device, train_images: int,
                   compile: bool | None = None, workers: int | None = None) -> ExpertExecution:
    """The execution for `config`'s experts on `device`. `compile`/`workers` None: chosen here.

    CPU: one expert per core (at most `config.experts`; one when an expert trains on fewer than
    PARALLEL_MIN_IMAGES images in all), the cores shared out as threads, and compiled when an
    expert trains on at least COMPILE_MIN_IMAGES images in all. A GPU, or
    torchrun (whose ranks are the workers already): one at a time, as the process is set up.
    """
    if compile and not can_compile(config):
        raise ConfigError("These experts cannot be trained compiled: AST's input-gradient penalty "
                          "differentiates twice, which torch.compile refuses. Drop the compile option.")
    work = config.epochs * train_images
    if compile is None:
        compile = device.type == "cpu" and can_compile(config) and work >= COMPILE_MIN_IMAGES
    if device.type != "cpu" or distributed.world_size() > 1:
        if workers not in (None, 1):
            raise ConfigError("Several expert workers are for a CPU in one process; on a GPU or under torchrun "
                              "experts are trained one at a time per process.")
        return ExpertExecution(1, 0, compile)
    cores = available_cores()
    if workers is None:
        workers = max(1, min(cores, config.experts)) if work >= PARALLEL_MIN_IMAGES else 1
    if workers == 1:
        return ExpertExecution(1, 0, compile)
    return ExpertExecution(workers, max(1, cores // workers), compile)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block (0: as they are)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
