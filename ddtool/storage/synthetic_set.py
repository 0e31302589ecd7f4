"""The in-memory synthetic set: images, labels and everything needed to use them again.

A `SyntheticSet` is validated when it is built (and again before it is saved), so that a file
written by ddtool is always self-consistent. Its JSON-like parts (config, evaluation records,
teacher options) are normalised to plain Python values on construction, so that a set read
back from disk compares equal to the set that was written.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any, Mapping

import numpy as np
import torch

import ddtool
from ddtool.data.preprocess import Preprocessing
from ddtool.errors import ConfigError

LABEL_KINDS = ("hard", "logits", "probs")

# Imported sets do not know the seed that made them.
UNKNOWN_SEED = -1

# Keys every evaluation record must have; see `normalize_evaluation`.
EVALUATION_REQUIRED_KEYS = ("protocol", "arch", "runs")
# Used by the HDF5 layout of a record (the list of its JSON-valued attributes).
RESERVED_RECORD_KEYS = ("json_attrs",)

# Tolerance for "each row of a probability label sums to one" (float32 labels, learned or averaged).
_PROBS_SUM_TOLERANCE = 1e-3


def now_iso() -> str:
    """The current time as an ISO-8601 string with time zone (UTC), to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(eq=False)
class SyntheticSet:
    """A distilled (or imported) training set and its provenance.

    images: float32 (N, C, H, W) in network space (see Preprocessing).
    labels: int64 (N,) class ids when label_kind == "hard"; float32 (N, K) otherwise, holding
        logits (targets = softmax(logits / label_temperature)) or probabilities (used as stored).
    learned_lr: the step size learned with the images (MTT family); the evaluation lr. None when
        the method has none.
    config: the method's full configuration (JSON values only).
    evaluations: one record per evaluation run on the set (see `normalize_evaluation`).
    extras: method-specific numeric arrays (e.g. per-view soft labels of SRe2L/CDA).
    teacher: optional {"arch": str, "options": dict, "state": {name: Tensor}}, a network saved
        with the set so that a knowledge-distillation evaluation can run it live.
    timings: what making the set cost in wall-clock, {"experts_s", "distill_s", "total_s",
        "hardware"} (experts_s: the recorded training time of the experts it used, also when
        they came from the cache; None where unknown); None for sets that do not record it.

    The size rule: with hard labels N must equal ipc * num_classes (what "images per class"
    means). Soft-label sets are not tied to it (e.g. several views per image), so only
    ipc >= 1 is checked for them.

    Tensors are detached but not copied when already of the right dtype; other float dtypes
    are converted to float32 and integer hard labels to int64. Validation errors raise
    ConfigError.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    preprocessing: Preprocessing
    dataset: str
    ipc: int
    method: str
    label_kind: str = "hard"
    label_temperature: float = 1.0
    learned_lr: float | None = None
    config: dict = field(default_factory=dict)
    seed: int = UNKNOWN_SEED
    evaluations: list[dict] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    teacher: dict | None = None
    timings: dict | None = None
    created: str = field(default_factory=now_iso)
    ddtool_version: str = ddtool.__version__

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived views
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def is_soft(self) -> bool:
        return self.label_kind != "hard"

    def hard_labels(self) -> torch.Tensor:
        """int64 (N,) class ids; the argmax of soft labels."""
        return self.labels if not self.is_soft else self.labels.argmax(dim=1)

    def soft_targets(self) -> torch.Tensor:
        """float32 (N, K) target probabilities: softmax(logits / T), probs as stored, or one-hot."""
        if self.label_kind == "logits":
            return torch.softmax(self.labels / self.label_temperature, dim=1)
        if self.label_kind == "probs":
            return self.labels
        return torch.nn.functional.one_hot(self.labels, self.num_classes).to(torch.float32)

    def to_dataset(self) -> torch.utils.data.TensorDataset:
        """The set as a torch Dataset of (image, target) in network space: targets are class ids
        for hard labels, else the probabilities its networks train on (`soft_targets`)."""
        targets = self.soft_targets() if self.is_soft else self.labels
        return torch.utils.data.TensorDataset(self.images, targets)

    def content_digest(self) -> str:
        """A hash of what the set's networks learn from (images, labels and how they read, the
        learned lr, stored views, the teacher), not of its provenance or evaluations: it keys an
        evaluation's kept runs, and append_evaluation compares it to refuse recording into a file
        whose set was replaced while the evaluation ran."""
        content = hashlib.sha256()
        for tensor in (self.images, self.labels):
            content.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        for name in sorted(self.extras):
            content.update(name.encode())
            content.update(np.ascontiguousarray(self.extras[name]).tobytes())
        teacher = teacher_digest(self.teacher) if self.teacher is not None else None
        content.update(json.dumps([self.label_kind, self.label_temperature, self.learned_lr, teacher]).encode())
        return content.hexdigest()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check (and normalise) every field; raise ConfigError on the first problem.

        Runs on construction and again before saving, since fields may be changed in between.
        """
        self._validate_metadata()
        self._validate_images()
        self._validate_labels()
        self._validate_preprocessing()
        if self.learned_lr is not None:
            lr = _as_float(self.learned_lr, "learned_lr")
            if not (math.isfinite(lr) and lr > 0):
                raise ConfigError(f"The learned lr must be a positive finite number, not {lr!r}.")
            self.learned_lr = lr
        self.config = _require_dict(to_plain(self.config, "config"), "config")
        self.evaluations = [normalize_evaluation(r) for r in _require_list(self.evaluations, "evaluations")]
        self.extras = {name: _extra_array(name, value) for name, value in dict(self.extras).items()}
        if self.teacher is not None:
            self.teacher = _normalize_teacher(self.teacher)
        if self.timings is not None:
            self.timings = _require_dict(to_plain(self.timings, "timings"), "timings")

    def _validate_metadata(self) -> None:
        for name in ("dataset", "method", "created", "ddtool_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"SyntheticSet.{name} must be a non-empty string.")
        if isinstance(self.ipc, bool) or not isinstance(self.ipc, (int, np.integer)) or self.ipc < 1:
            raise ConfigError(f"SyntheticSet.ipc must be a positive integer, not {self.ipc!r}.")
        self.ipc = int(self.ipc)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(f"SyntheticSet.seed must be an integer, not {self.seed!r}.")
        self.seed = int(self.seed)
        classes = list(self.classes)
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise ConfigError("SyntheticSet.classes must be a non-empty list of non-empty class names.")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"SyntheticSet.classes has duplicate names: {classes}.")
        self.classes = classes
        if self.label_kind not in LABEL_KINDS:
            raise ConfigError(f"label_kind must be one of {', '.join(LABEL_KINDS)}, not {self.label_kind!r}.")
        temperature = _as_float(self.label_temperature, "label_temperature")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"label_temperature must be a positive finite number, not {temperature!r}.")
        self.label_temperature = temperature

    def _validate_images(self) -> None:
        images = self.images
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ConfigError(
                "Synthetic images must be a floating-point tensor of shape (N, C, H, W); got "
                f"{_describe(images)}."
            )
        if images.shape[0] == 0 or 0 in images.shape[1:]:
            raise ConfigError(f"Synthetic images are empty: shape {tuple(images.shape)}.")
        images = images.detach().to(torch.float32)
        if not torch.isfinite(images).all():
            raise ConfigError("Synthetic images contain NaN or infinite values.")
        self.images = images

    def _validate_labels(self) -> None:
        labels, n, k = self.labels, self.num_images, self.num_classes
        if not isinstance(labels, torch.Tensor):
            raise ConfigError(f"Labels must be a tensor; got {_describe(labels)}.")
        labels = labels.detach()
        if self.label_kind == "hard":
            if labels.dim() != 1 or labels.shape[0] != n or labels.is_floating_point() or labels.dtype == torch.bool:
                raise ConfigError(
                    f"Hard labels must be an integer tensor of shape ({n},) (one class id per image); "
                    f"got {_describe(labels)}."
                )
            labels = labels.to(torch.int64)
            if labels.min() < 0 or labels.max() >= k:
                raise ConfigError(
                    f"Hard labels must lie in [0, {k - 1}] for {k} classes; found "
                    f"{int(labels.min())}..{int(labels.max())}."
                )
            if n != self.ipc * k:
                raise ConfigError(
                    f"A hard-label set with {k} classes at ipc {self.ipc} must have {self.ipc * k} "
                    f"images, but it has {n}."
                )
        else:
            if labels.dim() != 2 or tuple(labels.shape) != (n, k) or not labels.is_floating_point():
                raise ConfigError(
                    f"Soft labels ({self.label_kind}) must be a float tensor of shape ({n}, {k}); "
                    f"got {_describe(labels)}."
                )
            labels = labels.to(torch.float32)
            if not torch.isfinite(labels).all():
                raise ConfigError("Soft labels contain NaN or infinite values.")
            if self.label_kind == "probs":
                row_sums = labels.sum(dim=1)
                if labels.min() < 0 or (row_sums - 1).abs().max() > _PROBS_SUM_TOLERANCE:
                    raise ConfigError(
                        "Labels of kind 'probs' must be non-negative rows summing to 1; use "
                        "label_kind='logits' for unnormalised scores."
                    )
        self.labels = labels

    def _validate_preprocessing(self) -> None:
        pre = self.preprocessing
        if not isinstance(pre, Preprocessing):
            raise ConfigError(f"preprocessing must be a ddtool Preprocessing, not {type(pre).__name__}.")
        channels, height, width = self.image_shape
        if len(pre.mean) != channels:
            raise ConfigError(
                f"The preprocessing has {len(pre.mean)} channel statistics but the images have "
                f"{channels} channels."
            )
        if pre.zca is not None and tuple(pre.zca.matrix.shape) != (channels * height * width,) * 2:
            raise ConfigError(
                f"The ZCA transform is for {pre.zca.matrix.shape[0]} values per image but the images "
                f"have {channels}x{height}x{width} = {channels * height * width}."
            )


# ---------------------------------------------------------------------- evaluation records
def normalize_evaluation(record: Mapping[str, Any]) -> dict:
    """Check an evaluation record and return it as plain JSON values.

    Required: "protocol" (dict: the protocol's full settings), "arch" (str), "runs" (the
    per-run test accuracies, a non-empty list of numbers). Filled in when absent: "mean" and
    "std" of runs (population std, ddof=0) and "timestamp" (now, ISO-8601). Anything else
    (baseline figures, "device", "seconds", ...) is kept as long as it is JSON-like; numpy
    values and tensors become lists/numbers. Keys must be valid HDF5 names (no "/").
    """
    if not isinstance(record, Mapping):
        raise ConfigError(f"An evaluation record must be a dict, not {type(record).__name__}.")
    plain = to_plain(dict(record), "evaluation record")
    missing = [key for key in EVALUATION_REQUIRED_KEYS if key not in plain]
    if missing:
        raise ConfigError(f"The evaluation record lacks {', '.join(map(repr, missing))}.")
    for key in plain:
        check_name(key, "evaluation record key")
        if key in RESERVED_RECORD_KEYS:
            raise ConfigError(f"{key!r} is reserved by the file format; name the field differently.")
    if not isinstance(plain["protocol"], dict):
        raise ConfigError("The evaluation record's 'protocol' must be a dict of the protocol's settings.")
    if not isinstance(plain["arch"], str):
        raise ConfigError("The evaluation record's 'arch' must be the architecture's name.")
    runs = plain["runs"]
    if not isinstance(runs, list) or not runs or not all(_is_number(v) for v in runs):
        raise ConfigError("The evaluation record's 'runs' must be a non-empty list of accuracies.")
    plain.setdefault("mean", float(np.mean(runs)))
    plain.setdefault("std", float(np.std(runs)))
    plain.setdefault("timestamp", now_iso())
    return plain


# ---------------------------------------------------------------------- plain values
def to_plain(value: Any, what: str) -> Any:
    """`value` as JSON-serialisable Python: numpy scalars/arrays and tensors become numbers
    and lists, tuples become lists, paths become strings. Dict keys must be strings (JSON
    would silently turn other keys into strings and the value would not round-trip)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = tensor_to_numpy(value) if isinstance(value, torch.Tensor) else value
        if array.dtype.kind not in "biufU":
            raise ConfigError(f"{what}: arrays of dtype {array.dtype} cannot be stored as JSON.")
        return array.tolist()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{what}: dictionary keys must be strings, found {key!r}.")
            out[key] = to_plain(item, what)
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(item, what) for item in value]
    raise ConfigError(f"{what}: a value of type {type(value).__name__} cannot be stored as JSON: {value!r}.")


def dumps(value: Any, what: str) -> str:
    """JSON text of `value` (after to_plain)."""
    return json.dumps(to_plain(value, what))


def check_name(name: Any, what: str) -> str:
    """HDF5 member names: non-empty strings without "/" that are not "." (the group itself)."""
    if not isinstance(name, str) or not name or "/" in name or name == ".":
        raise ConfigError(f"{what} {name!r} is not a valid name: use a non-empty string without '/'.")
    return name


# ---------------------------------------------------------------------- helpers
def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy/view; dtypes numpy lacks (bfloat16, float8) become float32, which
    holds their values exactly (and load_state_dict casts back)."""
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy()
    except TypeError:
        return tensor.to(torch.float32).numpy()


def _extra_array(name: str, value: Any) -> np.ndarray:
    check_name(name, "extras key")
    array = tensor_to_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise ConfigError(f"extras[{name!r}] must be a numeric array, not dtype {array.dtype}.")
    return array


def teacher_digest(record: dict) -> str:
    """A short hash of a teacher record's architecture and weights."""
    digest = hashlib.sha256(repr((record["arch"], sorted(record["options"].items()))).encode())
    for name, tensor in record["state"].items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _normalize_teacher(teacher: Any) -> dict:
    if not isinstance(teacher, Mapping) or set(teacher) != {"arch", "options", "state"}:
        raise ConfigError('The teacher must be a dict with exactly the keys "arch", "options" and "state".')
    if not isinstance(teacher["arch"], str) or not teacher["arch"]:
        raise ConfigError("The teacher's 'arch' must be the architecture's name.")
    options = _require_dict(to_plain(teacher["options"], "teacher options"), "teacher options")
    if not isinstance(teacher["state"], Mapping) or not teacher["state"]:
        raise ConfigError("The teacher's 'state' must be a non-empty state dict (name -> tensor).")
    state = {}
    for name, tensor in teacher["state"].items():
        check_name(name, "teacher state key")
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"The teacher's state[{name!r}] must be a tensor, not {type(tensor).__name__}.")
        state[name] = tensor.detach()
    return {"arch": teacher["arch"], "options": options, "state": state}


def _require_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a dict, not {type(value).__name__}.")
    return value


def _require_list(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{what} must be a list, not {type(value).__name__}.")
    return list(value)


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not _is_number(value):
        raise ConfigError(f"{what} must be a number, not {value!r}.")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
