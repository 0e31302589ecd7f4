"""Finding a cached store by configuration, and estimating what training the rest costs.

Stores live in `<cache>/experts/<fingerprint>-<data digest>.h5` (cache: $DDTOOL_CACHE, else
~/.cache/ddtool): the settings that make the trajectories, and the images they learn from
(stores made before the digest was part of the name keep `<fingerprint>.h5`: `for_data`). A
store serves any request for K experts of its name once it holds experts 0..K-1; `ddtool
buffer` / `run_buffer` on the same path adds the missing ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddtool.data import PreparedData
from ddtool.experts.config import ExpertConfig
from ddtool.experts.execution import ExpertExecution, plan_execution, torch_threads
from ddtool.experts.manifest import data_differences, raise_if_differences, settings_differences
from ddtool.experts.store import experts_folder, read_manifest, scan_expert_folder
from ddtool.experts.train import build_setup, run_epoch, training_split
from ddtool.paths import cache_root
from ddtool.seeding import derive_seed
from ddtool.training import accuracy


def default_cache_dir() -> Path:
    return cache_root() / "experts"  # not created here: a lookup must not leave folders behind


def store_path_for(config: ExpertConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cache keeps `config`'s store: named by its fingerprint and its data's digest."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    data = f"-{config.data_digest}" if config.data_digest else ""
    return folder / f"{config.fingerprint()}{data}.h5"


def for_data(config: ExpertConfig, data: PreparedData, cache_dir: str | os.PathLike | None = None) -> ExpertConfig:
    """`config` for the experts of `data`: with the digest of its images, which names its store
    in the cache beside the fingerprint, so that other images under the same dataset name
    (another --data-root, an image folder edited since) make another store. A cached store named
    before stores carried that digest still serves when its manifest records data alike (image
    geometry, classes, training split, normalisation), as it did then."""
    config = dataclasses.replace(config, data_digest=data.content_digest())
    if store_path_for(config, cache_dir).exists():
        return config
    unrecorded = dataclasses.replace(config, data_digest=None)
    path = store_path_for(unrecorded, cache_dir)
    if path.exists() and not data_differences(read_manifest(path), data):
        return unrecorded
    return config


def find_or_plan_store(config: ExpertConfig, cache_dir: str | os.PathLike | None = None) -> tuple[Path, list[int]]:
    """(the store for `config` in the cache, the expert indices < config.experts it lacks).

    An empty list means the store is ready; a missing store means all experts are missing.
    A damaged or foreign file at that path raises FormatError (it is not silently replaced).
    """
    path = store_path_for(config, cache_dir)
    found = inspect_store(config, path)
    # ready means readable as ExpertStore.open reads it, through the index: a file renamed into
    # the folder just before a kill, not indexed yet, is "missing" and run_buffer's scan indexes it
    ready = found.present & found.indexed
    return path, [i for i in range(config.experts) if i not in ready]


@dataclass(frozen=True)
class StoredExperts:
    """What a store at a path holds for a configuration."""

    present: frozenset[int]  # experts whose files are in the store's folder, whole and of this configuration
    unreadable: dict[int, Path]  # experts its index lists whose files are missing or unreadable, with the file
    indexed: frozenset[int] = frozenset()  # experts its index lists


def stored_experts(config: ExpertConfig, path: str | os.PathLike) -> set[int]:
    """The indices of `config`'s experts already in the store at `path` (none if it does not
    exist): those whose files are there and readable, as `run_buffer` finds them. ConfigError
    naming the differing settings if it holds another configuration."""
    return set(inspect_store(config, path).present)


def inspect_store(config: ExpertConfig, path: str | os.PathLike) -> StoredExperts:
    """`config`'s experts in the store at `path`: those present (files in its folder that
    `run_buffer` keeps), and those its index lists that are not (a store copied without its
    `NAME.experts/` folder, deleted or damaged files), which a buffer run trains again."""
    path = Path(path)
    if not path.exists():
        return StoredExperts(frozenset(), {})
    manifest = read_manifest(path)
    if manifest.fingerprint != config.fingerprint():
        raise_if_differences(
            settings_differences(manifest.settings, config.trajectory_settings())
            or [f"fingerprint {manifest.fingerprint} vs {config.fingerprint()}"],
            f"The expert store {path} was made with a different configuration (store vs this run)",
            "Use another store path (buffer -o), or the same settings as that store.",
        )
    present = scan_expert_folder(experts_folder(path), manifest.fingerprint, manifest.epochs)
    unreadable = {r.index: path.parent / r.file for r in manifest.experts if r.index not in present}
    return StoredExperts(frozenset(present), unreadable, frozenset(r.index for r in manifest.experts))


@dataclass(frozen=True)
class TrainingEstimate:
    experts: int
    epochs: int
    train_images: int
    images_per_second: float  # one expert's training throughput (augmentation and SAM's second pass included)
    seconds_per_expert: float  # E epochs plus the final accuracy measurement
    workers: int = 1  # experts trained at once

    @property
    def total_seconds(self) -> float:
        return math.ceil(self.experts / self.workers) * self.seconds_per_expert


def estimate_training_time(config: ExpertConfig, data: PreparedData, device: torch.device | str,
                           experts: int, *, batches: int = 3,
                           execution: ExpertExecution | None = None) -> TrainingEstimate:
    """Time `batches` training batches (after one warm-up batch) and one evaluation pass of the
    same images with a throw-away network, and scale up to `experts` full experts trained
    `execution.workers` at a time with its threads (None: plan_execution's choice). Always
    timed uncompiled (compiling takes longer than the timing): a compiled run is faster."""
    device = torch.device(device)
    images, labels = training_split(config, data, device)
    execution = plan_execution(config, device, images.shape[0]) if execution is None else execution
    with torch_threads(execution.threads):
        estimate = _time_training(config, data, device, images, labels, batches)
    return dataclasses.replace(estimate, experts=experts, workers=execution.workers)


def _time_training(config: ExpertConfig, data: PreparedData, device: torch.device, images: torch.Tensor,
                   labels: torch.Tensor, batches: int) -> TrainingEstimate:
    n_train, n_test = images.shape[0], data.test_x.shape[0]
    # Expert 0's network, trained on a few batches and thrown away: only its speed matters,
    # and nothing global (RNG, files) is touched.
    setup = build_setup(config, 0, data, device, (images, labels))
    seed = derive_seed(config.seed, "timing")
    warm = min(n_train, config.batch_size)
    run_epoch(config, setup, seed, 0, images[:warm], labels[:warm])
    timed = min(n_train, batches * config.batch_size)
    started = time.perf_counter()
    run_epoch(config, setup, seed, 1, images[:timed], labels[:timed])  # ends in a sync (float())
    train_ips = timed / max(time.perf_counter() - started, 1e-9)
    started = time.perf_counter()
    accuracy(setup.model, images[:timed], labels[:timed])
    eval_ips = timed / max(time.perf_counter() - started, 1e-9)
    per_expert = config.epochs * n_train / train_ips + (n_train + n_test) / eval_ips
    return TrainingEstimate(1, config.epochs, n_train, train_ips, per_expert)
