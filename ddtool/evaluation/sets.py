"""A synthetic set's evaluation: fresh networks trained on it under a protocol, beside its
matched baselines, gathered in the report that is recorded in the set's file."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from ddtool.data import PreparedData
from ddtool.errors import ConfigError
from ddtool.evaluation import kd
from ddtool.evaluation.baselines import random_subset_baseline, whole_dataset_reference
from ddtool.evaluation.evaluate import (Accuracies, FinishedRuns, data_key, evaluate_images, evaluation_revision,
                                        kept_runs_where)
from ddtool.evaluation.protocols import Protocol
from ddtool.storage.synthetic_set import teacher_digest


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

    @property
    def beats_random_subset(self) -> bool | None:
        """Whether the set's mean is above its matched random baseline's (None without one): a
        distilled set that is not has cost its run for nothing on this data."""
        return None if self.random_subset is None else self.synthetic.mean > self.random_subset.mean

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
            # from the second revision on, so that a cache of a later one does not adopt its baselines
            **({"evaluation_revision": evaluation_revision()} if evaluation_revision() != 1 else {}),
            **self.details,
            **self.synthetic.to_dict(),
            "baselines": {
                name: acc.to_dict()
                for name, acc in (("random_subset", self.random_subset), ("whole_dataset", self.whole_dataset))
                if acc is not None
            },
        }


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
    check_set_fits_data(sset, data)
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


def check_set_fits_data(sset, data: PreparedData) -> None:
    """ConfigError unless the set's images and classes are those of the dataset it is to be
    evaluated on. Networks adapt to any input size, so a set of another dataset (an import
    given the wrong --dataset) would otherwise train and score, meaninglessly."""
    found = tuple(int(s) for s in data.test_x.shape[1:])
    problems = []
    if tuple(sset.image_shape) != found:
        problems.append(f"its images are {_shape(sset.image_shape)} where the dataset's are {_shape(found)}")
    if sset.num_classes != data.spec.num_classes:
        problems.append(f"it has {sset.num_classes} classes where the dataset has {data.spec.num_classes}")
    elif data.spec.classes and list(sset.classes) != list(data.spec.classes):
        differ = [i for i, (a, b) in enumerate(zip(sset.classes, data.spec.classes)) if a != b]
        problems.append(f"its class names differ from the dataset's (class {differ[0]}: "
                        f"{sset.classes[differ[0]]!r} in the set, {data.spec.classes[differ[0]]!r} in the dataset)")
    if problems:
        raise ConfigError(
            f"The set ({sset.method}, IPC {sset.ipc}, made from {sset.dataset}) does not fit the dataset "
            f"{data.spec.name} it would be evaluated on: {'; '.join(problems)}. A set can only be evaluated "
            "on the dataset it was distilled from; if it was imported with the wrong --dataset, import it "
            "again with the right one."
        )


def _shape(chw) -> str:
    c, h, w = chw
    return f"{c}x{h}x{w} (channels x height x width)"


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
        return cls(labels, float(protocol.lr), "soft", details, teacher, teacher_digest(sset.teacher))


def _set_checkpoint(sset, data: PreparedData, protocol: Protocol, arch: str, seed: int, compile: bool) -> dict:
    """The checkpoint key of a set's evaluation: everything its networks learn from (images,
    labels and how they read, the learned lr, stored views, the teacher) by content, not by
    file name, and how they are trained."""
    return {"kind": "synthetic_set", "set": _set_content_digest(sset), "protocol": protocol.to_dict(), "arch": arch,
            "seed": seed, "compiled": compile, **data_key(data)}


def _set_content_digest(sset) -> str:
    """A set by what its networks learn from (see _set_checkpoint), not by its file."""
    return sset.content_digest()[:16]


def kept_runs_of_set(sset) -> list[tuple[dict, list[int]]]:
    """The interrupted evaluations of this set (any protocol, network, seed) whose finished
    runs wait in the cache for a resume: (checkpoint key, indices of the kept runs) each."""
    digest = _set_content_digest(sset)
    return kept_runs_where(lambda key: key.get("kind") == "synthetic_set" and key.get("set") == digest)
