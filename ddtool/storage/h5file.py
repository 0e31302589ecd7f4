"""The synthetic-set HDF5 file: save, load (validated), append an evaluation.

The layout is documented in docs/synthetic-set-format.md and is meant to be read with plain
h5py by someone who never installed ddtool: plain datasets and attributes, JSON for nested
settings, no pickles. Every write goes to a temporary file that is renamed over the target,
so a reader never sees a half-written file and a failed write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

import ddtool
from ddtool.data.preprocess import Preprocessing
from ddtool.errors import ConfigError, DDToolError, FormatError
from ddtool.files import atomic_h5, check_writable, exclusive_lock
from ddtool.storage.synthetic_set import (
    RESERVED_RECORD_KEYS,
    SyntheticSet,
    dumps,
    normalize_evaluation,
    tensor_to_numpy,
)

FORMAT_MARKER = "ddtool.synthetic_set"
SCHEMA_VERSION = 1

# Arrays at least this large are gzip-compressed (lossless; shuffle helps on floats). Small
# ones are not: compression would cost more than it saves and makes chunked datasets.
_COMPRESS_MIN_BYTES = 64 * 1024

# Attribute of an evaluation record's group listing the attributes that hold JSON text.
(_JSON_ATTRS,) = RESERVED_RECORD_KEYS

_REQUIRED_MEMBERS = ("images", "labels", "classes", "preprocessing")


# ---------------------------------------------------------------------- public API
def save_synthetic_set(path: str | os.PathLike, sset: SyntheticSet) -> Path:
    """Write `sset` to `path` atomically (temporary file + rename); return the path."""
    sset.validate()  # fields may have been changed since construction
    path = Path(path)
    check_writable(path)  # a refusal names the set, not the lock beside it
    # under append_evaluation's lock: a record being added to the set this replaces must not
    # land in (or be renamed over) the new one
    with exclusive_lock(_lock_of(path), remove=True), atomic_h5(path, size_hint=_array_bytes(sset)) as f:
        _write_set(f, sset)
    return path


def _array_bytes(sset: SyntheticSet) -> int:
    """About how many bytes the set's arrays take uncompressed (what its file may need)."""
    arrays = [sset.images, sset.labels, *sset.extras.values(),
              *(sset.teacher["state"].values() if sset.teacher is not None else ())]
    return sum(a.nbytes for a in arrays)


def _lock_of(path: Path) -> Path:
    real = Path(os.path.realpath(path))  # one lock for a file, whichever link names it
    return real.with_name(real.name + ".lock")


def load_synthetic_set(path: str | os.PathLike) -> SyntheticSet:
    """Read and validate a synthetic-set file; FormatError says what is wrong with a bad one."""
    path = Path(path)
    with _open_checked(path) as f:
        fields = _guard_read(path, lambda: _read_fields(f, path))
    try:
        return SyntheticSet(**fields)
    except ConfigError as exc:
        raise FormatError(f"{path} holds an inconsistent synthetic set: {exc} The file may have "
                          "been edited by hand or written by a faulty tool; re-create it.") from None


def append_evaluation(path: str | os.PathLike, record: dict, *, expected_content: str | None = None) -> int:
    """Add one evaluation record to the file at `path` atomically; return its index.

    The file is read into memory, the record added there, and the result written to a
    temporary name and renamed over the original, so a crash leaves either the old or the new
    file. This is done under an exclusive lock on `<file>.lock`, so appends to one file from
    several processes (parallel `ddtool evaluate --arch` runs of one set) take turns and all
    land. Under the lock the file's records are read again: a record with the same key
    (evaluation_key: protocol, network, seed, lr, labels, the runs' accuracies and the
    baselines' names and runs) as one already there is the same evaluation recorded twice (two
    processes that ran it at once), and is not added; the index returned is then the record's
    already there.

    expected_content: the SyntheticSet.content_digest() of the set that was evaluated. If the
    file holds another set by now (replaced while an hours-long evaluation ran), nothing is
    written and a DDToolError says so: the record would describe images it was not measured on.
    """
    plain = normalize_evaluation(record)
    path = Path(path)
    with _open_checked(path) as f:  # refuse to touch a file that is not a valid set
        _guard_read(path, lambda: _require_members(f, path))
    with exclusive_lock(_lock_of(path), remove=True):
        if expected_content is not None and load_synthetic_set(path).content_digest() != expected_content:
            raise DDToolError(
                f"{path} changed while it was being evaluated: it no longer holds the set that was "
                "evaluated (its images, labels or learned lr differ), so the results were not recorded "
                "in it. Evaluate the file's new set (`ddtool evaluate` again), or restore the old file "
                "and run the same evaluation with --resume, which takes the runs it finished."
            )
        same = _recorded_index(path, evaluation_key(plain))
        if same is not None:
            return same
        with atomic_h5(path, update=True) as f:
            group = f.require_group("evaluations")
            index = _next_record_index(group)
            _write_record(group.create_group(_record_name(index), track_order=True), plain)
    return index


# What identifies an evaluation record, beside its baselines: two records equal in these are
# one measurement written twice. When and where it ran, and what it took, are left out.
EVALUATION_KEY_FIELDS = ("protocol", "arch", "seed", "lr", "labels", "evaluation_revision", "runs")


def evaluation_key(record: dict) -> dict:
    """The key of an evaluation record (as normalize_evaluation makes it, or as it reads back):
    its EVALUATION_KEY_FIELDS (None where absent) and its baselines' names and runs. Compare
    keys with ==, which takes 1 == 1.0 (an integer accuracy stored as a float reads back so)."""
    baselines = record.get("baselines")
    return {
        **{name: record.get(name) for name in EVALUATION_KEY_FIELDS},
        "baselines": ({name: (b.get("runs") if isinstance(b, dict) else b) for name, b in baselines.items()}
                      if isinstance(baselines, dict) else baselines),
    }


def _recorded_index(path: Path, key: dict) -> int | None:
    """The index of the first record in the set at `path` with this key, or None."""
    with _open_checked(path) as f:
        group = f.get("evaluations")
        if not isinstance(group, h5py.Group):
            return None
        for name, record in sorted(group.items(), key=_by_index):
            if name.isdigit() and isinstance(record, h5py.Group) and \
                    evaluation_key(_guard_read(path, lambda: _read_record(record))) == key:
                return int(name)
    return None


# ---------------------------------------------------------------------- writing
def _write_set(f: h5py.File, sset: SyntheticSet) -> None:
    f.attrs.update(
        {
            "format": FORMAT_MARKER,
            "schema_version": SCHEMA_VERSION,
            "ddtool_version": sset.ddtool_version,
            "dataset": sset.dataset,
            "ipc": sset.ipc,
            "method": sset.method,
            "seed": sset.seed,
            "created": sset.created,
            "label_kind": sset.label_kind,
            "label_temperature": sset.label_temperature,
            "num_classes": sset.num_classes,
            "num_images": sset.num_images,
            "image_shape": np.asarray(sset.image_shape, np.int64),
            "config": dumps(sset.config, "config"),
        }
    )
    if sset.timings is not None:
        f.attrs["timings"] = dumps(sset.timings, "timings")
    _write_array(f, "images", sset.images.cpu().numpy())
    _write_array(f, "labels", sset.labels.cpu().numpy())
    if sset.learned_lr is not None:
        f.create_dataset("learned_lr", data=np.float64(sset.learned_lr))
    f.create_dataset("classes", data=np.asarray(sset.classes, dtype=object), dtype=h5py.string_dtype("utf-8"))

    pre = f.create_group("preprocessing")
    pre.attrs["description"] = sset.preprocessing.describe()
    for name, value in sset.preprocessing.to_arrays().items():
        if np.ndim(value) == 0:
            pre.attrs[name] = value
        else:
            _write_array(pre, name, np.asarray(value))

    evaluations = f.create_group("evaluations")
    for index, record in enumerate(sset.evaluations):
        _write_record(evaluations.create_group(_record_name(index), track_order=True), record)

    extras = f.create_group("extras", track_order=True)
    for name, array in sset.extras.items():
        _write_array(extras, name, array)

    if sset.teacher is not None:
        teacher = f.create_group("teacher")
        teacher.attrs["arch"] = sset.teacher["arch"]
        teacher.attrs["options"] = dumps(sset.teacher["options"], "teacher options")
        state = teacher.create_group("state", track_order=True)  # keep the state dict's order
        for name, tensor in sset.teacher["state"].items():
            _write_array(state, name, tensor_to_numpy(tensor))


def _write_array(group: h5py.Group, name: str, array: np.ndarray) -> None:
    if array.ndim > 0 and array.nbytes >= _COMPRESS_MIN_BYTES:
        group.create_dataset(name, data=array, compression="gzip", compression_opts=4, shuffle=True)
    else:
        group.create_dataset(name, data=array)


def _write_record(group: h5py.Group, record: dict) -> None:
    """Numeric lists -> datasets; strings and numbers -> attributes; the rest -> JSON attributes."""
    json_names = []
    for key, value in record.items():
        if isinstance(value, (str, int, float)):  # bool is an int: stored as a numpy bool
            group.attrs[key] = value
        elif isinstance(value, list) and (array := _numeric_array(value)) is not None:
            group.create_dataset(key, data=array)
        else:
            group.attrs[key] = json.dumps(value)
            json_names.append(key)
    group.attrs[_JSON_ATTRS] = json.dumps(json_names)


def _numeric_array(values: list) -> np.ndarray | None:
    """`values` as an int/float array, or None when it is ragged, empty of numbers or not numeric."""
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        return None
    if array.dtype.kind in "iuf" or (array.size == 0 and array.ndim == 1):
        return array.astype(np.float64) if array.size == 0 else array
    return None


def _record_name(index: int) -> str:
    return f"{index:03d}"


def _next_record_index(group: h5py.Group) -> int:
    return max((int(name) for name in group if name.isdigit()), default=-1) + 1


# ---------------------------------------------------------------------- reading
@contextlib.contextmanager
def _open_checked(path: Path) -> Iterator[h5py.File]:
    """Open `path` read-only after checking that it is a ddtool synthetic set we can read."""
    if not path.is_file():
        raise FormatError(f"{path} does not exist (or is not a file): there is no synthetic set to read.")
    if not h5py.is_hdf5(path):
        raise FormatError(
            f"{path} is not an HDF5 file, so it is not a ddtool synthetic set. Sets made by other "
            "tools (MTT/DATM tensors, DC dicts, npz) can be converted with `ddtool import`."
        )
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise _corrupt(path, exc) from None
    with f:
        found = _guard_read(path, lambda: _text(f.attrs.get("format")))
        if found != FORMAT_MARKER:
            ddtool_kind = str(found).startswith("ddtool.")
            what = f"a different ddtool file ({found})" if ddtool_kind else "not a ddtool synthetic set"
            raise FormatError(
                f"{path} is an HDF5 file but {what}: its root attribute 'format' is {found!r}, "
                f"where a synthetic set has {FORMAT_MARKER!r}."
            )
        version = _guard_read(path, lambda: f.attrs.get("schema_version"))
        if version is None or not np.issubdtype(np.asarray(version).dtype, np.integer) or version < 1:
            raise FormatError(f"{path} has no valid schema_version attribute ({version!r}); the file is damaged.")
        if version > SCHEMA_VERSION:
            raise FormatError(
                f"{path} uses synthetic-set schema version {int(version)}, but this ddtool "
                f"({ddtool.__version__}) reads only versions up to {SCHEMA_VERSION}. Upgrade ddtool "
                "to read it."
            )
        yield f


def _read_fields(f: h5py.File, path: Path) -> dict[str, Any]:
    _require_members(f, path)
    attrs = f.attrs
    images, labels = f["images"], f["labels"]
    if images.ndim != 4 or images.dtype != np.float32:
        raise FormatError(
            f"{path} is damaged: /images must be float32 (N, C, H, W), but it is {images.dtype} {images.shape}."
        )
    if tuple(attrs["image_shape"]) != images.shape[1:]:
        raise FormatError(f"{path} is damaged: /images has shape {images.shape} but image_shape says "
                          f"{tuple(attrs['image_shape'])}.")
    classes = [str(c) for c in f["classes"].asstr()[()]]
    if len(classes) != attrs["num_classes"]:
        raise FormatError(f"{path} is damaged: /classes has {len(classes)} names but num_classes is "
                          f"{attrs['num_classes']}.")
    return {
        "images": torch.from_numpy(images[()]),
        "labels": torch.from_numpy(labels[()]),
        "classes": classes,
        "preprocessing": _read_preprocessing(f["preprocessing"], path),
        "dataset": _text(attrs["dataset"]),
        "ipc": int(attrs["ipc"]),
        "method": _text(attrs["method"]),
        "label_kind": _text(attrs["label_kind"]),
        "label_temperature": float(attrs["label_temperature"]),
        "learned_lr": float(f["learned_lr"][()]) if "learned_lr" in f else None,
        "config": json.loads(attrs["config"]),
        "seed": int(attrs["seed"]),
        "evaluations": [_read_record(g) for _, g in sorted(f.get("evaluations", {}).items(), key=_by_index)],
        "extras": {name: ds[()] for name, ds in f.get("extras", {}).items()},
        "teacher": _read_teacher(f["teacher"]) if "teacher" in f else None,
        "timings": json.loads(attrs["timings"]) if "timings" in attrs else None,
        "created": _text(attrs["created"]),
        "ddtool_version": _text(attrs["ddtool_version"]),
    }


def _require_members(f: h5py.File, path: Path) -> None:
    missing = [name for name in _REQUIRED_MEMBERS if name not in f]
    missing += [f"@{name}" for name in ("dataset", "ipc", "method", "seed", "created", "label_kind",
                                        "label_temperature", "num_classes", "image_shape", "config",
                                        "ddtool_version") if name not in f.attrs]
    if missing:
        raise FormatError(
            f"{path} is damaged or incomplete: it lacks {', '.join(missing)} (names with @ are root "
            "attributes). Re-create the file, or restore it from a copy."
        )
    kinds = {"images": h5py.Dataset, "labels": h5py.Dataset, "classes": h5py.Dataset, "preprocessing": h5py.Group}
    wrong = [f"/{name} is a {'group' if kind is h5py.Dataset else 'dataset'}" for name, kind in kinds.items()
             if not isinstance(f.get(name), kind)]
    if wrong:
        raise FormatError(f"{path} is damaged: {', '.join(wrong)}, where a synthetic set has the opposite. "
                          "Re-create the file, or restore it from a copy.")


def _read_preprocessing(group: h5py.Group, path: Path) -> Preprocessing:
    arrays = {name: value for name, value in group.attrs.items() if name != "description"}
    arrays.update({name: ds[()] for name, ds in group.items()})
    try:
        return Preprocessing.from_arrays(arrays)
    except FormatError as exc:
        raise FormatError(f"{path} is damaged: {exc} Re-create the file, or restore it from a copy.") from None


def _read_record(group: h5py.Group) -> dict:
    json_names = set(json.loads(group.attrs.get(_JSON_ATTRS, "[]")))
    record: dict[str, Any] = {}
    for key, value in group.attrs.items():
        if key == _JSON_ATTRS:
            continue
        record[key] = json.loads(value) if key in json_names else _plain_scalar(value)
    record.update({key: ds[()].tolist() for key, ds in group.items()})
    return record


def _read_teacher(group: h5py.Group) -> dict:
    return {
        "arch": _text(group.attrs["arch"]),
        "options": json.loads(group.attrs["options"]),
        "state": {name: torch.from_numpy(np.asarray(ds[()])) for name, ds in group["state"].items()},
    }


def _plain_scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return _text(value)
    return value.item() if isinstance(value, np.generic) else value


def _text(value: Any) -> Any:
    """h5py gives str for variable-length strings (what ddtool writes) but bytes for
    fixed-length ones, which other writers (or a hand edit) may produce."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _by_index(item: tuple[str, Any]) -> int:
    name = item[0]
    return int(name) if name.isdigit() else -1


def _guard_read(path: Path, read):
    """Run `read`; low-level errors of a damaged file become a FormatError naming it."""
    try:
        return read()
    except FormatError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> FormatError:
    return FormatError(
        f"{path} could not be read as a ddtool synthetic set: it looks truncated or corrupt "
        f"({type(exc).__name__}: {exc}). If it is still being copied or written, wait for that to "
        "finish; otherwise re-create it or restore it from a copy."
    )
