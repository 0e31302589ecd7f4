"""The baselines that give a set's accuracy its meaning: real images drawn at random (as
many per class as the set has) and the whole training split, each trained exactly like the
set. They depend only on what their key names, so each is computed once and cached; only
rank 0 writes the cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from ddtool import distributed
from ddtool.data import PreparedData, sample_per_class
from ddtool.evaluation import kd
from ddtool.evaluation.evaluate import (Accuracies, FinishedRuns, data_key, evaluate_images, evaluation_revision,
                                        kept_runs_where)
from ddtool.evaluation.protocols import PROTOCOLS, Protocol
from ddtool.paths import cache_dir, key_digest
from ddtool.seeding import generator
from ddtool.files import atomic_path, exclusive_lock


def _cached(key: dict, compute: Callable[[], Accuracies], *, compute_if_missing: bool = True,
            kept: FinishedRuns | None = None) -> Accuracies | None:
    """Baselines are expensive and depend only on `key`: compute once, keep in the cache.

    Processes that need the same baseline at once (parallel evaluations of one table) take
    turns on a lock file: the first computes, the others wait and read its result.

    kept: the runs `compute` keeps (evaluate_images with keep_runs=True), discarded only once
    the result is in the cache: a kill between the last run and the cache write must not
    lose an hours-long baseline's runs."""
    digest = key_digest(key)
    # Rank 0's cache decides for every rank: they must agree on whether to compute, as the runs
    # are spread over them (and on several machines each may have a cache of its own).
    path = cache_dir("baselines") / f"{digest}.json" if distributed.is_main() else None
    with exclusive_lock(path.with_suffix(".lock") if path is not None and compute_if_missing else None):
        cached = distributed.broadcast_object(_read_cached(path, key) if path is not None else None)
        if cached is not None and kept is not None:
            kept.discard()  # what a kill between an earlier cache write and its discard left
        if cached is not None or not compute_if_missing:
            return cached
        result = compute()
        if path is not None:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(_entry(key, result), indent=1))
    if kept is not None:
        # every rank kept its own runs until rank 0 has cached the result
        distributed.barrier()
        kept.discard()
    return result


def _entry(key: dict, result: Accuracies) -> dict:
    """A cache file's content: the key it answers and the result (_read_cached reads it back)."""
    return {"key": key, "runs": result.runs, "seconds": result.seconds, "compiled": result.compiled,
            "resumed": result.resumed, "hardware": result.hardware}


def _read_cached(path: Path, key: dict) -> Accuracies | None:
    """The cached result at `path` for `key`; None if there is none, or only a damaged file
    (a crash of the machine can truncate one: the result is computed again, not fatal)."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return Accuracies(stored["runs"], stored.get("seconds", 0.0), stored.get("compiled"),
                              stored.get("resumed", []), stored.get("hardware", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def random_subset_baseline(data: PreparedData, *, ipc: int, protocol: Protocol, arch: str = "convnet",
                           seed: int = 0, runs: int | None = None, progress: bool = True,
                           teacher: kd.LiveTeacher | None = None, teacher_key: str | None = None,
                           like: kd.LabelSource | None = None, compile: bool = False,
                           resume: bool = False) -> Accuracies:
    """Real images, `ipc` per class drawn at random (a new draw per run), hard labels, lr of
    the protocol, trained exactly like the synthetic set.

    Under a KD protocol the subset learns from `teacher` (the set's; `teacher_key` is its
    storage.synthetic_set.teacher_digest), labelled the way `like` (the set's labels) is: live, or stored
    for the same number of epochs of views."""
    runs = runs or protocol.runs
    subset_size = ipc * data.spec.num_classes
    key = _random_subset_key(data, ipc=ipc, protocol=protocol.to_dict(), arch=arch, seed=seed, runs=runs)
    if protocol.kd is not None:
        if teacher is None or teacher_key is None:
            raise ValueError("a KD protocol's random baseline needs the set's teacher and its fingerprint")
        like = like or teacher
        key.update(teacher=teacher_key, teacher_mode=like.mode,
                   stored_epochs=like.epochs if isinstance(like, kd.StoredSoftLabels) else None)
    _adopt_entries_keyed_by_protocol(key, [protocol, *PROTOCOLS.values()], subset_size, compile)

    def subset(run: int) -> tuple[torch.Tensor, torch.Tensor | kd.LabelSource]:
        return random_subset(data, ipc=ipc, protocol=protocol, seed=seed, run=run, teacher=teacher, like=like)

    checkpoint = {**key, "compiled": compile}
    return _cached(key, lambda: evaluate_images(
        data.train_x[:0], data.train_y[:0], data, protocol=protocol, lr=protocol.lr, arch=arch, seed=seed,
        runs=runs, desc=f"random subset IPC {ipc}", progress=progress, images_for_run=subset, compile=compile,
        checkpoint=checkpoint, resume=resume, keep_runs=True), kept=FinishedRuns(checkpoint, runs))


# Fields of a protocol a random subset's training does not read: it has hard labels (or the
# teacher's), trains at protocol.lr, and is not the whole-dataset reference.
_UNUSED_BY_SUBSETS = ("name", "runs", "use_learned_lr", "soft_labels", "reference_epochs", "reference_batch_size")


def _random_subset_key(data: PreparedData, *, ipc: int, protocol: dict, arch: str, seed: int, runs: int) -> dict:
    """The cache key of a random baseline without KD (`protocol`: a Protocol's to_dict())."""
    # Keyed by what the training does, not by the protocol's name (as the whole-dataset
    # reference is): at IPC 10 the mtt and datm protocols (batch 256 and 128) both train the
    # 100 images as one batch, and share one baseline.
    recipe = _subset_recipe(protocol, ipc * data.spec.num_classes)
    return {"kind": "random_subset", "ipc": ipc, "recipe": recipe, "arch": arch, "seed": seed, "runs": runs,
            **data_key(data)}


def _subset_recipe(protocol: dict, subset_size: int) -> dict:
    """What of `protocol` (a Protocol's to_dict()) a random subset of `subset_size` images trains by."""
    recipe = {k: v for k, v in protocol.items() if k not in _UNUSED_BY_SUBSETS}
    # A batch at least as large as the subset is the whole subset, one step an epoch, whatever its size.
    recipe["batch_size"] = min(protocol["batch_size"], subset_size)
    return recipe


def _adopt_entries_keyed_by_protocol(key: dict, protocols: list[Protocol], subset_size: int, compile: bool) -> None:
    """Move what caches written before baselines were keyed by recipe hold for `key` (the
    baseline's result, or the runs an interrupted computation of it kept) to `key`'s names.

    Those entries named the protocol whole (`protocol`: its to_dict()), so one is looked for
    under each protocol that trains subsets like `key`'s recipe. Every rank moves what its own
    cache holds before _cached's broadcast, so no rank reads an entry while another moves it."""
    baselines = cache_dir("baselines")
    target = baselines / f"{key_digest(key)}.json"
    kept = FinishedRuns({**key, "compiled": compile}, key["runs"])
    for protocol in protocols:
        if _subset_recipe(protocol.to_dict(), subset_size) != key["recipe"]:
            continue
        old = {k: v for k, v in key.items() if k != "recipe"} | {"protocol": protocol.to_dict()}
        source = baselines / f"{key_digest(old)}.json"
        stored = json.loads(source.read_text()) if not target.exists() and source.exists() else {}
        if stored.get("key") == old:
            with atomic_path(target) as tmp:
                tmp.write_text(json.dumps({**stored, "key": key}, indent=1))
        kept.take_from(FinishedRuns({**old, "compiled": compile}, key["runs"]))


def random_subset(data: PreparedData, *, ipc: int, protocol: Protocol, seed: int, run: int,
                  teacher: kd.LiveTeacher | None = None,
                  like: kd.LabelSource | None = None) -> tuple[torch.Tensor, torch.Tensor | kd.LabelSource]:
    """The random baseline's draw for `run`: images and what they are trained toward (see
    random_subset_baseline)."""
    idx = sample_per_class(data.train_y, data.spec.num_classes, ipc, generator(seed, "random-subset", run))
    if protocol.kd is None:
        return data.train_x[idx], data.train_y[idx]
    labels = kd.matched_labels(teacher, data.train_x[idx], like or teacher, settings=protocol.kd,
                               allow_flip=data.spec.flip, generator=generator(seed, "random-subset-relabel", run))
    return data.train_x[idx], labels


def whole_dataset_reference(data: PreparedData, *, protocol: Protocol, arch: str = "convnet", seed: int = 0,
                            runs: int = 1, progress: bool = True, compute_if_missing: bool = True,
                            teacher: kd.LiveTeacher | None = None, teacher_key: str | None = None,
                            compile: bool = False, resume: bool = False) -> Accuracies | None:
    """The same architecture and optimiser trained on the whole training split for
    protocol.reference_epochs epochs (lr decay at the same fraction). With
    compute_if_missing=False, only a cached result is returned (None if there is none).
    Under a KD protocol: the same recipe, `teacher` live on the whole split."""
    reference = dataclasses.replace(protocol, epochs=protocol.reference_epochs,
                                    batch_size=protocol.reference_batch_size)
    # Keyed by what the training does, not by the protocol's name: protocols that differ only
    # in how they train synthetic sets (mtt and datm: the batch size) share one reference.
    recipe = {k: v for k, v in reference.to_dict().items() if k not in ("name", "runs")}
    key = {"kind": "whole_dataset", "recipe": recipe, "arch": arch, "seed": seed, "runs": runs, **data_key(data)}
    targets: torch.Tensor | kd.LabelSource = data.train_y
    if protocol.kd is not None:
        if teacher is None or teacher_key is None:
            raise ValueError("a KD protocol's whole-dataset reference needs the teacher and its fingerprint")
        key["teacher"], targets = teacher_key, teacher
    checkpoint = {**key, "compiled": compile}
    return _cached(key, lambda: evaluate_images(
        data.train_x, targets, data, protocol=reference, lr=protocol.lr, arch=arch, seed=seed, runs=runs,
        desc="whole dataset", progress=progress, compile=compile, checkpoint=checkpoint, resume=resume,
        keep_runs=True), compute_if_missing=compute_if_missing, kept=FinishedRuns(checkpoint, runs))


def recorded_random_baselines(sset, data: PreparedData) -> list[tuple[str, dict, dict]]:
    """The random baselines recorded in `sset`'s evaluations, as cache entries under the keys
    random_subset_baseline looks up for data prepared like `data`: (when recorded, key, entry)
    each. KD baselines are left out: their key names the teacher, which the record does not.

    A record holds a baseline's every run, so a cache that lost it (a new machine, a cleared
    cache) can have it back from the sets' files instead of retraining it for hours."""
    found = []
    for record in sset.evaluations:
        recorded = record.get("baselines", {}).get("random_subset")
        if recorded is None or "kd" in record["protocol"] or record.get("evaluation_revision", 1) != evaluation_revision():
            continue  # (a record of other training code holds other results)
        key = _random_subset_key(data, ipc=sset.ipc, protocol=record["protocol"], arch=record["arch"],
                                 seed=record["seed"], runs=len(recorded["runs"]))
        result = Accuracies(recorded["runs"], recorded.get("seconds", 0.0), recorded.get("compiled"),
                            recorded.get("resumed_runs", []), recorded.get("hardware", {}))
        found.append((record.get("timestamp", ""), key, _entry(key, result)))
    return found


def adopt_recorded_baselines(recorded: list[tuple[str, dict, dict]]) -> list[dict]:
    """Cache the entries of recorded_random_baselines whose key the cache holds nothing
    under, the most recently recorded first where records share a key; the keys cached. A key
    another process is computing right now is left to it."""
    adopted = []
    for _, key, entry in sorted(recorded, key=lambda found: found[0], reverse=True):
        path = cache_dir("baselines") / f"{key_digest(key)}.json"
        with exclusive_lock(path.with_suffix(".lock"), wait=False) as held:
            if not held or path.exists():
                continue
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(entry, indent=1))
        adopted.append(key)
    return adopted


def kept_runs_of_baselines() -> list[tuple[dict, list[int]]]:
    """The interrupted baseline computations whose finished runs wait in the cache for a
    resume: (checkpoint key, indices of the kept runs) each."""
    return kept_runs_where(lambda key: key.get("kind") in ("random_subset", "whole_dataset"))
