"""Train fresh networks on a synthetic set and report final-epoch test accuracy.

Every run builds a new network from its own derived seed: nothing trained before is reused
(the published FTD evaluation reused a network trained on other images). The accuracy
reported is the test accuracy after the last epoch, never the best one seen.

Under torchrun the runs are spread over the ranks (run r on rank r % world; a run depends
only on its index, so where it runs does not change it) and gathered to every rank in run
order; only rank 0 writes the baseline cache.

An evaluation keeps each run's accuracy in the cache as soon as the run ends, until its
result is safe (a baseline: in its cache; a set: recorded in its file, see
EvaluationReport.release_kept_runs): `resume=True` takes the runs an interrupted evaluation
of the same set, protocol, network and seed finished instead of training them again (on a
CPU a cross-architecture cell is hours; a run, minutes to an hour).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ddtool import distributed
from ddtool.augment import DSA, DSAConfig
from ddtool.data import PreparedData, sample_per_class
from ddtool.evaluation import kd
from ddtool.evaluation.protocols import Protocol
from ddtool.networks import create_network
from ddtool.paths import cache_dir, cache_root, key_digest
from ddtool.seeding import derive_seed, generator, seeded
from ddtool.storage.atomic import atomic_path
from ddtool.training import accuracy, train_epoch


@dataclass
class Accuracies:
    runs: list[float]
    seconds: float = 0.0
    # Whether the networks ran through torch.compile; None for a cached result from before it was recorded.
    compiled: bool | None = None
    # Runs read back from an interrupted evaluation (trained by an earlier process), by index.
    resumed: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.runs))

    @property
    def std(self) -> float:
        # Population std over runs, as the papers report it.
        return float(np.std(self.runs))

    def to_dict(self) -> dict:
        return {"runs": list(self.runs), "mean": self.mean, "std": self.std, "seconds": self.seconds,
                "compiled": self.compiled, **({"resumed_runs": list(self.resumed)} if self.resumed else {})}

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


@dataclass
class EvaluationReport:
    """One evaluation of a set under one protocol and architecture, with its baselines."""

    protocol: Protocol
    arch: str
    lr: float
    labels: str  # "hard" or "soft"
    synthetic: Accuracies
    random_subset: Accuracies | None = None
    whole_dataset: Accuracies | None = None
    seed: int = 0
    device: str = "cpu"
    compiled: bool = False  # networks run through torch.compile (same training, other rounding)
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # Protocol-specific facts stored beside the figures (KD: whether the teacher was live or stored).
    details: dict[str, Any] = field(default_factory=dict)
    # The set's runs, kept in the cache for a resume until the report is stored.
    kept_runs: FinishedRuns | None = field(default=None, repr=False, compare=False)

    def release_kept_runs(self) -> None:
        """Call once the report is stored (ddtool evaluate: recorded in the set's file): its
        runs need no longer be kept for a resume."""
        if self.kept_runs is not None:
            self.kept_runs.discard()

    def to_record(self) -> dict:
        """The dict stored in the synthetic-set file's evaluations."""
        return {
            "protocol": self.protocol.to_dict(),
            "arch": self.arch,
            "lr": self.lr,
            "labels": self.labels,
            "seed": self.seed,
            "device": self.device,
            "compiled": self.compiled,
            "timestamp": self.timestamp,
            **self.details,
            **self.synthetic.to_dict(),
            "baselines": {
                name: acc.to_dict()
                for name, acc in (("random_subset", self.random_subset), ("whole_dataset", self.whole_dataset))
                if acc is not None
            },
        }


def train_fresh_network(
    images: torch.Tensor,
    targets: torch.Tensor | kd.LabelSource,
    data: PreparedData,
    *,
    protocol: Protocol,
    lr: float,
    arch: str,
    seed: int,
    epochs: int | None = None,
    batch_size: int | None = None,
    arch_options: dict | None = None,
    on_epoch: Callable[[], None] | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    compile: bool = False,
) -> float:
    """Train one new network on (images, targets) and return its final accuracy on the test
    split, or on `held_out` (the validation split, when choosing settings or checkpoints).

    Under a knowledge-distillation protocol (protocol.kd) `targets` is a kd.LabelSource (stored
    soft labels or a live teacher) and ddtool.evaluation.kd trains the network.

    `compile`: run the network through torch.compile. The same training, fused into fewer
    kernels: 1.4-2.2x faster on a CPU (wider networks gain less) after a one-off compile (seconds with a warm
    inductor cache, about a minute cold); results differ from eager only by rounding."""
    net = fresh_network(arch, data, seed, arch_options)
    if compile:
        net = _Compiled(net)
    fit_network(net, images, targets, data, protocol=protocol, lr=lr, seed=seed, epochs=epochs,
                batch_size=batch_size, on_epoch=on_epoch)
    held_x, held_y = held_out if held_out is not None else (data.test_x, data.test_y)
    return accuracy(net, held_x, held_y)


def fresh_network(arch: str, data: PreparedData, seed: int, arch_options: dict | None = None) -> torch.nn.Module:
    """The new network of the run with seed `seed`, on the data's device."""
    spec = data.spec
    with seeded(derive_seed(seed, "network")):
        net = create_network(arch, channels=spec.channels, num_classes=spec.num_classes,
                             image_size=spec.image_size, **(arch_options or {}))
    return net.to(data.test_x.device)


def fit_network(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor | kd.LabelSource,
                data: PreparedData, *, protocol: Protocol, lr: float, seed: int, epochs: int | None = None,
                batch_size: int | None = None, on_epoch: Callable[[], None] | None = None) -> None:
    """Train `net` on (images, targets) under `protocol`, every random draw from `seed`."""
    spec = data.spec
    device = data.test_x.device
    epochs = epochs or protocol.epochs
    images, targets = images.to(device), targets.to(device)
    if protocol.kd is not None:
        kd.fit_student(net, images, targets, protocol=protocol, lr=lr, epochs=epochs,
                       batch_size=batch_size or protocol.batch_size, seed_generator=lambda name: generator(seed, name),
                       allow_flip=spec.flip, on_epoch=on_epoch)
        return
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=protocol.momentum,
                                weight_decay=protocol.weight_decay)
    decay_epoch = int(round(protocol.lr_decay_at * epochs))
    augment = DSA(DSAConfig(flip=spec.flip)) if protocol.augment else None
    batches = generator(seed, "batches")
    for epoch in range(epochs):
        if epoch == decay_epoch:
            for group in optimizer.param_groups:
                group["lr"] *= protocol.lr_decay
        train_epoch(net, images, targets, optimizer=optimizer, batch_size=batch_size or protocol.batch_size,
                    generator=batches, augment=augment)
        if on_epoch is not None:
            on_epoch()


class _Compiled(torch.nn.Module):
    """A network through torch.compile with static shapes (a set has at most two batch sizes,
    the test split one more), fed inputs with canonical strides: a one-channel batch leaves
    DSA with either stride on its channel axis, and each would be compiled anew."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = torch.compile(net, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.new_empty(x.shape).copy_(x))


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
    seconds_before = 0.0
    # Rank 0's bar stands for all ranks: they share one terminal.
    with tqdm(total=len(mine) * protocol.epochs, desc=desc, unit="epoch", leave=False,
              disable=not progress or not distributed.is_main()) as bar:
        for run in mine:
            kept = finished.read(run) if finished is not None and resume else None
            if kept is not None:
                accs[run], seconds = kept
                resumed.append(run)
                seconds_before += seconds
                bar.update(protocol.epochs)
                continue
            run_start = time.perf_counter()
            x, y = images_for_run(run) if images_for_run is not None else (images, targets)
            accs[run] = train_fresh_network(x, y, data, protocol=protocol, lr=lr, arch=arch,
                                            seed=derive_seed(seed, "run", run), on_epoch=lambda: bar.update(1),
                                            compile=compile)
            if finished is not None:
                finished.keep(run, accs[run], time.perf_counter() - run_start)
            bar.set_postfix(last=f"{100 * accs[run]:.2f}%")
    shares = distributed.gather_objects((accs, resumed))
    everyone = {run: acc for share, _ in shares for run, acc in share.items()}
    if finished is not None and not keep_runs:
        finished.discard()
    return Accuracies([everyone[run] for run in range(runs)], seconds=time.perf_counter() - start + seconds_before,
                      compiled=compile, resumed=sorted(run for _, share in shares for run in share))


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

    def read(self, run: int) -> tuple[float, float] | None:
        """(accuracy, seconds) of a kept run, or None."""
        path = self._path(run)
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        if stored.get("key") != self.key:  # a digest collision, however unlikely, is not a match
            return None
        return float(stored["accuracy"]), float(stored["seconds"])

    def keep(self, run: int, accuracy: float, seconds: float) -> None:
        with atomic_path(self._path(run)) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "run": run, "accuracy": accuracy, "seconds": seconds}))

    def discard(self) -> None:
        """Delete this rank's kept runs (each rank deletes what it wrote)."""
        for run in distributed.indices_of_this_rank(self.runs):
            self._path(run).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another rank's files, removed by that rank
            self.folder.rmdir()


def _cached(key: dict, compute: Callable[[], Accuracies], *, compute_if_missing: bool = True) -> Accuracies | None:
    """Baselines are expensive and depend only on `key`: compute once, keep in the cache.

    Processes that need the same baseline at once (parallel evaluations of one table) take
    turns on a lock file: the first computes, the others wait and read its result."""
    digest = key_digest(key)
    # Rank 0's cache decides for every rank: they must agree on whether to compute, as the runs
    # are spread over them (and on several machines each may have a cache of its own).
    path = cache_dir("baselines") / f"{digest}.json" if distributed.is_main() else None
    with _exclusive(path.with_suffix(".lock") if path is not None and compute_if_missing else None):
        cached = distributed.broadcast_object(_read_cached(path, key) if path is not None else None)
        if cached is not None or not compute_if_missing:
            return cached
        result = compute()
        if path is not None:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({"key": key, "runs": result.runs, "seconds": result.seconds,
                                           "compiled": result.compiled, "resumed": result.resumed}, indent=1))
    return result


@contextlib.contextmanager
def _exclusive(lock: Path | None):
    """Hold an exclusive advisory lock on `lock` (None: no lock) for the block's duration."""
    if lock is None:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_cached(path: Path, key: dict) -> Accuracies | None:
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return Accuracies(stored["runs"], stored.get("seconds", 0.0), stored.get("compiled"),
                              stored.get("resumed", []))
    return None


def _data_key(data: PreparedData) -> dict:
    return {
        "dataset": data.spec.name,
        "preprocessing": data.preprocessing.describe(),
        "train_images": int(data.train_x.shape[0]),
        "train_split": hashlib.sha256(data.train_indices.cpu().numpy().tobytes()).hexdigest()[:16],
    }


def random_subset_baseline(data: PreparedData, *, ipc: int, protocol: Protocol, arch: str = "convnet",
                           seed: int = 0, runs: int | None = None, progress: bool = True,
                           teacher: kd.LiveTeacher | None = None, teacher_key: str | None = None,
                           like: kd.LabelSource | None = None, compile: bool = False,
                           resume: bool = False) -> Accuracies:
    """Real images, `ipc` per class drawn at random (a new draw per run), hard labels, lr of
    the protocol, trained exactly like the synthetic set.

    Under a KD protocol the subset learns from `teacher` (the set's; `teacher_key` is its
    kd.teacher_fingerprint), labelled the way `like` (the set's labels) is: live, or stored
    for the same number of epochs of views."""
    runs = runs or protocol.runs
    key = {"kind": "random_subset", "ipc": ipc, "protocol": protocol.to_dict(), "arch": arch, "seed": seed,
           "runs": runs, **_data_key(data)}
    if protocol.kd is not None:
        if teacher is None or teacher_key is None:
            raise ValueError("a KD protocol's random baseline needs the set's teacher and its fingerprint")
        like = like or teacher
        key.update(teacher=teacher_key, teacher_mode=like.mode,
                   stored_epochs=like.epochs if isinstance(like, kd.StoredSoftLabels) else None)

    def subset(run: int) -> tuple[torch.Tensor, torch.Tensor | kd.LabelSource]:
        return random_subset(data, ipc=ipc, protocol=protocol, seed=seed, run=run, teacher=teacher, like=like)

    return _cached(key, lambda: evaluate_images(
        data.train_x[:0], data.train_y[:0], data, protocol=protocol, lr=protocol.lr, arch=arch, seed=seed,
        runs=runs, desc=f"random subset IPC {ipc}", progress=progress, images_for_run=subset, compile=compile,
        checkpoint={**key, "compiled": compile}, resume=resume))


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
    key = {"kind": "whole_dataset", "recipe": recipe, "arch": arch, "seed": seed, "runs": runs, **_data_key(data)}
    targets: torch.Tensor | kd.LabelSource = data.train_y
    if protocol.kd is not None:
        if teacher is None or teacher_key is None:
            raise ValueError("a KD protocol's whole-dataset reference needs the teacher and its fingerprint")
        key["teacher"], targets = teacher_key, teacher
    return _cached(key, lambda: evaluate_images(
        data.train_x, targets, data, protocol=reference, lr=protocol.lr, arch=arch, seed=seed, runs=runs,
        desc="whole dataset", progress=progress, compile=compile, checkpoint={**key, "compiled": compile},
        resume=resume), compute_if_missing=compute_if_missing)


def evaluate_set(
    sset,
    data: PreparedData,
    *,
    protocol: Protocol,
    arch: str = "convnet",
    seed: int = 0,
    runs: int | None = None,
    baselines: bool = True,
    reference: bool | None = None,
    progress: bool = True,
    compile: bool = False,
    resume: bool = False,
    keep_runs: bool = False,
) -> EvaluationReport:
    """Evaluate a SyntheticSet under `protocol` on `arch`, with the matched baselines.

    `reference`: True computes the whole-dataset reference if it is not cached, None uses it
    only when cached (training on the whole split takes hours on a CPU), False skips it.
    `compile`: see train_fresh_network; the baselines computed here are compiled too.
    `resume`: take the runs an interrupted evaluation finished (see evaluate_images).
    `keep_runs`: keep the set's runs past the baselines, until the caller has stored the report
    and calls its release_kept_runs (what `ddtool evaluate` does); else they go once all ran.

    The set comes first, the baselines after: processes evaluating several sets at once then
    train their own sets while one of them computes the baseline they share."""
    runs = runs or protocol.runs
    device = data.test_x.device
    learning = SetLearning.of(sset, protocol, device)
    checkpoint = _set_checkpoint(sset, data, protocol, arch, seed, compile)
    synthetic = evaluate_images(sset.images.to(device), learning.targets, data, protocol=protocol, lr=learning.lr,
                                arch=arch, seed=seed, runs=runs, progress=progress, compile=compile,
                                desc=f"{sset.method} on {arch}" + (" (KD)" if protocol.kd is not None else ""),
                                checkpoint=checkpoint, resume=resume, keep_runs=keep_runs)
    report = EvaluationReport(protocol=protocol, arch=arch, lr=learning.lr, labels=learning.labels,
                              synthetic=synthetic, seed=seed, device=str(device), details=learning.details,
                              compiled=compile, kept_runs=FinishedRuns(checkpoint, runs) if keep_runs else None)
    if "baselines_skipped" in learning.details:
        return report
    if baselines:
        report.random_subset = random_subset_baseline(data, ipc=sset.ipc, protocol=protocol, arch=arch, seed=seed,
                                                      runs=runs, progress=progress, teacher=learning.teacher,
                                                      teacher_key=learning.teacher_key, like=learning.label_source,
                                                      compile=compile, resume=resume)
    if reference is not False:
        report.whole_dataset = whole_dataset_reference(data, protocol=protocol, arch=arch, seed=seed,
                                                       progress=progress, compute_if_missing=bool(reference),
                                                       teacher=learning.teacher, teacher_key=learning.teacher_key,
                                                       compile=compile, resume=resume)
    return report


@dataclass
class SetLearning:
    """What fresh networks learn from a set under one protocol, and what its baselines must
    learn from to match: the set's labels and lr; under a KD protocol the set's stored soft
    labels (else its live teacher), the teacher the baselines learn from, and facts for the
    record."""

    targets: torch.Tensor | kd.LabelSource
    lr: float
    labels: str  # "hard" or "soft"
    details: dict[str, Any] = field(default_factory=dict)
    teacher: kd.LiveTeacher | None = None
    teacher_key: str | None = None

    @property
    def label_source(self) -> kd.LabelSource | None:
        return None if isinstance(self.targets, torch.Tensor) else self.targets

    @classmethod
    def of(cls, sset, protocol: Protocol, device: torch.device) -> SetLearning:
        if protocol.kd is None:
            soft = protocol.soft_labels and sset.label_kind != "hard"
            targets = sset.soft_targets() if soft else sset.hard_labels()
            lr = sset.learned_lr if (protocol.use_learned_lr and sset.learned_lr is not None) else protocol.lr
            return cls(targets.to(device), float(lr), "soft" if soft else "hard")
        labels = kd.set_label_source(sset, device)
        details: dict[str, Any] = {"teacher": labels.mode,
                                   "teacher_arch": sset.teacher["arch"] if sset.teacher is not None else None}
        if isinstance(labels, kd.StoredSoftLabels):
            details["stored_epochs"] = labels.epochs
        teacher = kd.set_teacher(sset, device)
        if teacher is None:
            details["baselines_skipped"] = "the set carries no teacher"
            return cls(labels, float(protocol.lr), "soft", details)
        return cls(labels, float(protocol.lr), "soft", details, teacher, kd.teacher_fingerprint(sset.teacher))


def _set_checkpoint(sset, data: PreparedData, protocol: Protocol, arch: str, seed: int, compile: bool) -> dict:
    """The checkpoint key of a set's evaluation: everything its networks learn from (images,
    labels and how they read, the learned lr, stored views, the teacher) by content, not by
    file name, and how they are trained."""
    return {"kind": "synthetic_set", "set": _set_content_digest(sset), "protocol": protocol.to_dict(), "arch": arch,
            "seed": seed, "compiled": compile, **_data_key(data)}


def _set_content_digest(sset) -> str:
    """A set by what its networks learn from (see _set_checkpoint), not by its file."""
    content = hashlib.sha256()
    for tensor in (sset.images, sset.labels):
        content.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for name in sorted(sset.extras):
        content.update(name.encode())
        content.update(np.ascontiguousarray(sset.extras[name]).tobytes())
    teacher = kd.teacher_fingerprint(sset.teacher) if sset.teacher is not None else None
    content.update(json.dumps([sset.label_kind, sset.label_temperature, sset.learned_lr, teacher]).encode())
    return content.hexdigest()[:16]


def kept_runs_of_set(sset) -> list[tuple[dict, list[int]]]:
    """The interrupted evaluations of this set (any protocol, network, seed) whose finished
    runs wait in the cache for a resume: (checkpoint key, indices of the kept runs) each."""
    digest = _set_content_digest(sset)
    found: dict[str, tuple[dict, list[int]]] = {}
    for path in sorted((cache_root() / "evaluations").glob("*/run-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            stored = json.loads(path.read_text())
            key = stored["key"]
            if key.get("kind") == "synthetic_set" and key.get("set") == digest:
                found.setdefault(path.parent.name, (key, []))[1].append(int(stored["run"]))
    return [(key, sorted(runs)) for key, runs in found.values()]
