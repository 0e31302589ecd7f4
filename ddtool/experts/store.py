"""The HDF5 expert-trajectory store: one store per configuration, readable one epoch at a time.

On disk a store `NAME.h5` is an index file plus a folder `NAME.experts/` of one file per expert:

    NAME.h5                      attrs: format "ddtool.expert_store", schema_version, manifest
                                        (JSON), and structured copies of its main fields
                                 /experts/<i>  -> external link to NAME.experts/expert-<i>.h5:/expert
    NAME.experts/expert-00007.h5 /expert/params (E+1, P) float32, chunks (1, P), each with a
                                        Fletcher-32 checksum (files written before 2026-12-06: none)
                                 /expert attrs: format "ddtool.expert", fingerprint, index, seed,
                                        final train/test accuracy, training seconds and
                                        side_by_side (experts trained at once meanwhile);
                                        per-epoch loss/accuracy datasets

Why a folder: an expert is either complete in the store or absent. Each expert file is
written under a temporary name and renamed, and the small index file is rewritten the same
way, so a kill at any moment leaves every visible file whole; nothing ever rewrites the
gigabytes of finished trajectories. Plain h5py follows the external links, so
`h5py.File("NAME.h5")["experts/7/params"][12]` reads epoch 12 of expert 7.

The links are relative, so a store is moved or copied as both: the index file and its folder.
An index whose folder stayed behind lists experts it cannot read; `ddtool buffer` counts such
experts as missing (and trains them again), `ddtool buffer-merge` refuses the store.

Several processes may fill one store at once. The index is rewritten under an exclusive lock
(flock on `NAME.experts/index.lock`), re-read under it, so an expert another writer added is
never dropped; and an expert is trained only by the process holding its lock,
`NAME.experts/expert-00007.lock` (see ddtool.experts.runner). The OS releases a dead process's
locks; a lock file left behind is harmless (a lock is the flock on it, not the file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from ddtool.errors import ConfigError, FormatError
from ddtool.experts.manifest import (
    FORMAT, SCHEMA_VERSION, ExpertRecord, StoreManifest, compatibility_differences, merge_differences,
    raise_if_differences,
)
from ddtool.experts.train import Trajectory
from ddtool.networks import ParamLayout
from ddtool.files import atomic_h5, atomic_path, exclusive_lock

EXPERT_FORMAT = "ddtool.expert"
# Files readable by HDF5 >= 1.10; needed for attributes over 64 KiB (large manifests).
_LIBVER = ("v110", "latest")
_EXPERT_FILE = re.compile(r"^expert-(\d+)\.h5$")


def experts_folder(store_path: str | os.PathLike) -> Path:
    path = Path(store_path)
    return path.with_name(path.stem + ".experts")


def expert_file_name(index: int) -> str:
    return f"expert-{index:05d}.h5"


def expert_lock_path(store_path: str | os.PathLike, index: int) -> Path:
    """The lock file of expert `index` of the store at `store_path` (held by the process training it)."""
    return experts_folder(store_path) / f"expert-{index:05d}.lock"


def index_lock_path(store_path: str | os.PathLike) -> Path:
    """The lock file guarding the rewrites of the store's index file."""
    return experts_folder(store_path) / "index.lock"


@contextmanager
def index_locked(store_path: str | os.PathLike) -> Iterator[None]:
    """Hold the store's index lock: one read-modify-write of the index at a time, over processes."""
    with exclusive_lock(index_lock_path(store_path), remove=True):
        yield


# -- reading ---------------------------------------------------------------------------------


class ExpertStore:
    """A read-only view of a store. Reads single epochs on demand; keeps files open."""

    def __init__(self, path: Path, manifest: StoreManifest, datasets: dict[int, h5py.Dataset]):
        self.path = path
        self.manifest = manifest
        self._datasets = datasets  # expert index -> its params dataset (file kept open)
        self.expert_indices: tuple[int, ...] = tuple(sorted(datasets))

    @classmethod
    def open(cls, path: str | os.PathLike, *, num_experts: int | None = None) -> "ExpertStore":
        """Open and validate a store. With `num_experts`, use only experts 0..num_experts-1
        (ConfigError if the store lacks one), so a run that asks for K experts reads the same
        trajectories whatever else the store holds."""
        path = Path(path)
        manifest = read_manifest(path)
        indices = [r.index for r in manifest.experts]
        if num_experts is not None:
            missing = sorted(set(range(num_experts)) - set(indices))
            if missing:
                raise ConfigError(
                    f"The expert store {path} has {len(indices)} experts but this run needs experts "
                    f"0..{num_experts - 1} ({len(missing)} missing, e.g. {missing[:5]}). Train them with "
                    f"`ddtool buffer --experts {num_experts}` (it adds only the missing ones)."
                )
            indices = list(range(num_experts))
        records = {r.index: r for r in manifest.experts}
        layout = manifest.param_layout
        datasets = {i: _open_params(path, records[i], manifest.epochs, layout.total) for i in indices}
        return cls(path, manifest, datasets)

    # -- what it holds
    @property
    def num_experts(self) -> int:
        return len(self.expert_indices)

    @property
    def epochs(self) -> int:
        return self.manifest.epochs

    @property
    def layout(self) -> ParamLayout:
        return self.manifest.param_layout

    def record(self, expert: int) -> ExpertRecord:
        """Seed and final accuracies of `expert`."""
        self._dataset(expert)  # ConfigError if it is not in the store
        return next(r for r in self.manifest.experts if r.index == expert)

    # -- reading trajectories
    def params(self, expert: int, epoch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The flat parameters (P,) of `expert` after `epoch` epochs (0 = initialisation);
        reads that one row only."""
        dataset = self._dataset(expert)
        if not 0 <= epoch <= self.epochs:
            raise ConfigError(f"Epoch {epoch} is outside the experts' trajectories (0..{self.epochs}).")
        try:
            row = torch.from_numpy(dataset[epoch])
        except OSError as exc:  # HDF5 checks each row's checksum as it reads it
            raise FormatError(f"Epoch {epoch} of expert {expert} could not be read from {dataset.file.filename} "
                              f"({exc}): the file is damaged. Delete it; `ddtool buffer` with the same settings "
                              "trains that expert again.") from None
        return row if device is None else row.to(device)

    def segment(self, expert: int, start: int, length: int,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(parameters at epoch `start`, parameters at epoch `start + length`)."""
        if length < 1 or start + length > self.epochs:
            raise ConfigError(
                f"A segment of {length} epochs from epoch {start} does not fit in {self.epochs}-epoch experts."
            )
        return self.params(expert, start, device), self.params(expert, start + length, device)

    def sample_segment(self, generator: torch.Generator, max_start: int, span: int, *,
                       min_start: int = 0) -> tuple[int, int]:
        """(expert, start): an expert uniformly from the store, a start epoch uniformly from
        [min_start, max_start) (MTT's max_start_epoch is exclusive); start + span must fit."""
        if not 0 <= min_start < max_start:
            raise ConfigError(f"Start epochs [{min_start}, {max_start}) are empty.")
        if max_start - 1 + span > self.epochs:
            raise ConfigError(
                f"Start epochs up to {max_start - 1} plus {span} matched epochs need experts of at least "
                f"{max_start - 1 + span} epochs; this store's have {self.epochs}. Lower the maximum start "
                "epoch or the number of expert epochs, or train longer experts."
            )
        pick = int(torch.randint(self.num_experts, (1,), generator=generator))
        start = int(torch.randint(min_start, max_start, (1,), generator=generator))
        return self.expert_indices[pick], start

    def check_compatible(self, dataset: str, arch: str, arch_options: dict[str, Any] | None,
                         preprocessing) -> None:
        """ConfigError naming every difference if these experts were not trained on `dataset`
        with network `arch`(`arch_options`) under `preprocessing` (ZCA on/off included)."""
        raise_if_differences(
            compatibility_differences(self.manifest, dataset=dataset, arch=arch,
                                      arch_options=arch_options or {}, preprocessing=preprocessing),
            f"The expert store {self.path} does not match this run",
            "Train matching experts with `ddtool buffer` (same dataset, network, --zca setting) or "
            "choose another store.",
        )

    def _dataset(self, expert: int) -> h5py.Dataset:
        try:
            return self._datasets[expert]
        except KeyError:
            raise ConfigError(f"Expert {expert} is not in the store {self.path} "
                              f"(it holds {_ranges(self.expert_indices)}).") from None

    def close(self) -> None:
        files = {d.file for d in self._datasets.values()}
        self._datasets = {}
        for f in files:
            f.close()

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_manifest(path: str | os.PathLike) -> StoreManifest:
    """The manifest of the store at `path`; FormatError for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"There is no expert store at {path}.")
    try:
        with h5py.File(path, "r") as f:
            marker = _text(f.attrs.get("format"))
            if marker != FORMAT:
                raise FormatError(
                    f"{path} is not a ddtool expert store (format marker {marker!r}, expected {FORMAT!r})."
                )
            version = int(f.attrs.get("schema_version", -1))
            if version > SCHEMA_VERSION or version < 1:
                raise FormatError(
                    f"{path} is an expert store of schema version {version}; this ddtool reads up to "
                    f"{SCHEMA_VERSION}. Upgrade ddtool or retrain the experts."
                )
            text = _text(f.attrs.get("manifest"))
    except OSError as exc:
        raise FormatError(f"{path} is not a readable HDF5 file ({exc}).") from None
    return StoreManifest.from_json(text, source=str(path))


def _open_params(store_path: Path, record: ExpertRecord, epochs: int, total: int) -> h5py.Dataset:
    file = store_path.parent / record.file
    try:
        f = h5py.File(file, "r")
    except (OSError, FileNotFoundError) as exc:
        raise FormatError(f"Expert {record.index} of the store {store_path} is missing or unreadable "
                          f"({file}: {exc}).") from None
    params = f.get("expert/params")
    if not isinstance(params, h5py.Dataset) or params.shape != (epochs + 1, total) or params.dtype != np.float32:
        f.close()
        raise FormatError(f"{file} does not hold a ({epochs + 1}, {total}) float32 trajectory for expert "
                          f"{record.index}: the store is damaged.")
    return params


# -- writing ---------------------------------------------------------------------------------


class StoreWriter:
    """Adds experts to a store, one whole expert at a time (see the module docstring)."""

    def __init__(self, path: Path, manifest: StoreManifest):
        self.path = path
        self.manifest = manifest.with_experts([])
        self.folder = experts_folder(path)
        self._records: dict[int, ExpertRecord] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, manifest: StoreManifest) -> "StoreWriter":
        """Create the store, or open it to add experts; ConfigError if it exists with a
        different configuration."""
        path = Path(path)
        _require_same_configuration(path, manifest)  # before anything is created
        writer = cls(path, manifest)
        writer.folder.mkdir(parents=True, exist_ok=True)
        with index_locked(path):  # another process may be creating or extending it right now
            _require_same_configuration(path, manifest)
            writer._scan()
            write_index_file(path, writer.manifest.with_experts(list(writer._records.values())))
        return writer

    def completed(self) -> set[int]:
        """The experts this writer knows complete: found at open, added, or read back from the
        index by a later write (experts other processes added meanwhile)."""
        return set(self._records)

    def checkpoint_path(self, index: int) -> Path:
        return self.folder / f"expert-{index:05d}.partial.pt"

    def lock_path(self, index: int) -> Path:
        return expert_lock_path(self.path, index)

    def add(self, trajectory: Trajectory) -> None:
        """Write the expert's file, then the index naming it; then drop its checkpoint."""
        target = self.folder / expert_file_name(trajectory.index)
        write_expert_file(target, trajectory, self.manifest.fingerprint)
        self._records[trajectory.index] = _record(trajectory, self._relative(target))
        self._write_index()
        self.checkpoint_path(trajectory.index).unlink(missing_ok=True)

    def finished_elsewhere(self, index: int) -> ExpertRecord | None:
        """The record of expert `index` if its finished file is in the folder (another process
        trained it since this writer opened the store), now in this writer's records and in the
        index (which the other process may not have reached before it died); else None."""
        file = self.folder / expert_file_name(index)
        if not file.exists():
            return None
        try:
            record = read_expert_record(file, self.manifest.fingerprint, self.manifest.epochs)
        except FormatError:
            return None  # another configuration's, or damaged: trained again and replaced
        if record.index != index:
            return None
        self._records[index] = replace(record, file=self._relative(file))
        self._write_index()
        self.checkpoint_path(index).unlink(missing_ok=True)  # left by a process that died before it could
        return self._records[index]

    def add_file(self, source: Path) -> int:
        """Adopt a finished expert file of the same configuration (merging shards): hard-linked
        when on the same file system, copied otherwise."""
        record = read_expert_record(source, self.manifest.fingerprint, self.manifest.epochs)
        target = self.folder / expert_file_name(record.index)
        if source.resolve() != target.resolve():
            with atomic_path(target) as tmp:
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
        self._records[record.index] = ExpertRecord(**{**asdict(record), "file": self._relative(target)})
        return record.index

    def flush(self) -> None:
        self._write_index()

    def _relative(self, file: Path) -> str:
        return f"{self.folder.name}/{file.name}"

    def _scan(self) -> None:
        """The folder is the truth: an expert file renamed into place just before a kill is
        complete even if the index was not rewritten yet."""
        for record in scan_expert_folder(self.folder, self.manifest.fingerprint, self.manifest.epochs).values():
            self._records[record.index] = record

    def _write_index(self) -> None:
        """Rewrite the index with this writer's experts and those it lists now: under the index
        lock, re-read, so that an expert another process added since this one last looked is
        kept (and known to this writer from now on). Nothing is written if nothing is new."""
        with index_locked(self.path):
            current = self._indexed_now()
            records = {**current, **self._records}
            self._records = records
            if records != current or not self.path.exists():
                write_index_file(self.path, self.manifest.with_experts(list(records.values())))

    def _indexed_now(self) -> dict[int, ExpertRecord]:
        """The experts the index lists now (under the index lock); a damaged index: the folder's."""
        if not self.path.exists():
            return {}
        try:
            existing = read_manifest(self.path)
        except FormatError:
            return scan_expert_folder(self.folder, self.manifest.fingerprint, self.manifest.epochs)
        _require_same_configuration(self.path, self.manifest, existing)
        return {r.index: r for r in existing.experts}


def _require_same_configuration(path: Path, manifest: StoreManifest, existing: StoreManifest | None = None) -> None:
    """ConfigError if the store at `path` exists with a configuration other than `manifest`'s."""
    if existing is None:
        if not path.exists():
            return
        existing = read_manifest(path)
    raise_if_differences(
        merge_differences(existing, manifest),
        f"The expert store {path} was made with a different configuration",
        "Use another --out path, or the same settings as that store.",
    )


def scan_expert_folder(folder: Path, fingerprint: str, epochs: int) -> dict[int, ExpertRecord]:
    """The finished expert files of configuration `fingerprint` in a store's `folder`, by index,
    each record's file named relative to the index file ("NAME.experts/expert-00007.h5").
    Files that are not such an expert (another configuration's, damaged) are left out: a buffer
    run trains those experts again and replaces the files."""
    found: dict[int, ExpertRecord] = {}
    for file in sorted(folder.glob("expert-*.h5")):
        if not _EXPERT_FILE.match(file.name):
            continue
        try:
            record = read_expert_record(file, fingerprint, epochs)
        except FormatError:
            continue
        found[record.index] = ExpertRecord(**{**asdict(record), "file": f"{folder.name}/{file.name}"})
    return found


def write_expert_file(path: Path, trajectory: Trajectory, fingerprint: str) -> None:
    params = trajectory.params.detach().cpu().to(torch.float32).contiguous().numpy()
    with atomic_h5(path, size_hint=params.nbytes, libver=_LIBVER) as f:
        group = f.create_group("expert")
        group.attrs.update({
            "format": EXPERT_FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
            "index": trajectory.index, "seed": np.int64(trajectory.seed), "epochs": params.shape[0] - 1,
            "train_accuracy": trajectory.train_accuracy, "test_accuracy": trajectory.test_accuracy,
            "seconds": trajectory.seconds, "side_by_side": trajectory.side_by_side,
        })
        # One chunk per epoch row: a reader of epoch t touches exactly one chunk. No compression:
        # trained float32 weights barely compress and segments are read at random. The checksum
        # costs little and makes a damaged row an error, not weights silently matched against.
        group.create_dataset("params", data=params, chunks=(1, params.shape[1]), fletcher32=True)
        group.create_dataset("epoch_loss", data=np.asarray(trajectory.epoch_loss, np.float64))
        group.create_dataset("epoch_train_accuracy", data=np.asarray(trajectory.epoch_accuracy, np.float64))
        evaluations = np.asarray(trajectory.evaluations, np.float64).reshape(-1, 2)
        group.create_dataset("evaluation_epochs", data=evaluations[:, 0].astype(np.int64))
        group.create_dataset("evaluation_test_accuracy", data=evaluations[:, 1])


def read_expert_record(path: Path, fingerprint: str, epochs: int) -> ExpertRecord:
    """The record of a finished expert file of configuration `fingerprint`; FormatError otherwise."""
    try:
        with h5py.File(path, "r") as f:
            group = f.get("expert")
            if group is None or _text(group.attrs.get("format")) != EXPERT_FORMAT:
                raise FormatError(f"{path} is not a ddtool expert file.")
            a = group.attrs
            if _text(a.get("fingerprint")) != fingerprint:
                raise FormatError(f"{path} belongs to another configuration ({_text(a.get('fingerprint'))}).")
            params = group.get("params")
            if params is None or params.shape[0] != epochs + 1:
                raise FormatError(f"{path} does not hold {epochs + 1} snapshots.")
            return ExpertRecord(index=int(a["index"]), seed=int(a["seed"]),
                                train_accuracy=float(a["train_accuracy"]),
                                test_accuracy=float(a["test_accuracy"]), file=path.name,
                                seconds=float(a["seconds"]) if "seconds" in a else None,
                                side_by_side=int(a.get("side_by_side", 1)))
    except OSError as exc:
        raise FormatError(f"{path} is not a readable HDF5 file ({exc}).") from None


def write_index_file(path: Path, manifest: StoreManifest) -> None:
    """The index: the manifest as JSON, structured attributes for plain-h5py readers, links."""
    records = manifest.experts
    with atomic_h5(path, libver=_LIBVER) as f:
        a = f.attrs
        a["format"] = FORMAT
        a["schema_version"] = SCHEMA_VERSION
        a["ddtool_version"] = manifest.ddtool_version
        a["manifest"] = manifest.to_json()
        a["fingerprint"] = manifest.fingerprint
        a["dataset"] = manifest.dataset["name"]
        a["architecture"] = manifest.architecture["name"]
        a["arch_options"] = _json(manifest.architecture["options"])
        a["param_names"] = np.array(manifest.layout["names"], dtype=h5py.string_dtype())
        a["param_shapes"] = _json(manifest.layout["shapes"])
        a["param_count"] = int(sum(int(np.prod(s)) for s in manifest.layout["shapes"]))
        a["epochs"] = manifest.epochs
        a["num_experts"] = len(records)
        a["train_images"] = manifest.dataset["train_images"]
        pre = manifest.preprocessing
        a["zca"] = pre["zca"]
        a["normalisation_mean"] = np.asarray(pre["mean"], np.float64)
        a["normalisation_std"] = np.asarray(pre["std"], np.float64)
        if pre["zca"]:
            a["zca_eps"] = pre["zca_eps"]
            a["zca_sha256"] = pre["zca_sha256"]
        a["augmentation"] = _json(manifest.augmentation)
        a["optimizer"] = manifest.optimizer["name"]
        a["optimizer_settings"] = _json(manifest.optimizer)
        a["ast"] = _json(manifest.ast)
        a["expert_indices"] = np.array([r.index for r in records], np.int64)
        a["expert_seeds"] = np.array([r.seed for r in records], np.int64)
        a["expert_train_accuracy"] = np.array([r.train_accuracy for r in records], np.float64)
        a["expert_test_accuracy"] = np.array([r.test_accuracy for r in records], np.float64)
        group = f.create_group("experts", track_order=True)  # index order, not name order
        for r in records:
            group[str(r.index)] = h5py.ExternalLink(r.file, "/expert")


def _record(trajectory: Trajectory, file: str) -> ExpertRecord:
    return ExpertRecord(index=trajectory.index, seed=trajectory.seed, train_accuracy=trajectory.train_accuracy,
                        test_accuracy=trajectory.test_accuracy, file=file, seconds=trajectory.seconds,
                        side_by_side=trajectory.side_by_side)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _ranges(indices: tuple[int, ...]) -> str:
    if not indices:
        return "no experts"
    return ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")
