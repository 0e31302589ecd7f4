"""Merging shard stores into one store, checked before anything is written and undone if it
fails part-way (`ddtool buffer --merge`, and rank 0 after a torchrun buffer)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ddtool.errors import ConfigError, FormatError
from ddtool.experts.manifest import ExpertRecord, StoreManifest, merge_differences, raise_if_differences
from ddtool.experts.store import StoreWriter, experts_folder, read_expert_record, read_manifest
from ddtool.files import write_atomically


def remove_store(path: Path) -> None:
    shutil.rmtree(experts_folder(path), ignore_errors=True)
    path.unlink(missing_ok=True)


def merge_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge shard stores (and `out`, if it exists) into the store `out`, experts in index
    order; an expert `out` holds already is kept. ConfigError if they differ in configuration
    or hold the same expert twice, FormatError if a shard's expert file is missing or
    unreadable. Everything is checked before anything is written, and a merge that fails
    part-way is undone: it leaves no new file behind and `out` as it was."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("Nothing to merge: name the shard stores.")
    out = Path(out)
    manifests = [read_manifest(p) for p in paths]
    reference, reference_path = manifests[0], paths[0]
    for path, manifest in zip(paths[1:], manifests[1:]):
        raise_if_differences(
            merge_differences(reference, manifest),
            f"The shards {reference_path} and {path} were trained with different configurations",
            "Only shards of one configuration (one `ddtool buffer` command with different --shard) merge.",
        )
    owner: dict[int, Path] = {}
    for path, manifest in zip(paths, manifests):
        for record in manifest.experts:
            if record.index in owner and owner[record.index] != path:
                raise ConfigError(f"Expert {record.index} is in both {owner[record.index]} and {path}; "
                                  "merge each shard once.")
            owner[record.index] = path
    sources = [_checked_expert_file(path, manifest, record)
               for path, manifest in zip(paths, manifests) for record in manifest.experts]
    if out.exists():  # before anything is written: an `out` of another configuration stays as it is
        raise_if_differences(
            merge_differences(read_manifest(out), reference),
            f"The expert store {out} was made with a different configuration",
            "Use another --out path, or the same settings as that store.",
        )
    with _undone_on_failure(out):
        writer = StoreWriter.open(out, reference)
        held = writer.completed()
        for index, source in sources:
            if index not in held:
                writer.add_file(source)
        writer.flush()
    return out


def _checked_expert_file(store: Path, manifest: StoreManifest, record: ExpertRecord) -> tuple[int, Path]:
    """(index, file) of an expert the store's index lists; FormatError if the file is missing,
    unreadable or not that expert."""
    file = store.parent / record.file
    folder = experts_folder(store)
    try:
        found = read_expert_record(file, manifest.fingerprint, manifest.epochs)
        if found.index != record.index:
            raise FormatError(f"{file} holds expert {found.index}, not {record.index}.")
    except FormatError as exc:
        problem = f"its file {file} does not exist" if not file.exists() else str(exc).rstrip(".")
        raise FormatError(
            f"Expert {record.index} of the store {store} cannot be read: {problem}. A store is its index file "
            f"{store.name} and the folder {folder.name}/ beside it, which holds the experts' files; copy or move "
            f"the two together (is {folder} missing?). Nothing was merged or written."
        ) from None
    return record.index, file


@contextmanager
def _undone_on_failure(out: Path) -> Iterator[None]:
    """If the block fails, remove what it added to the store `out`: the files new in its
    folder (the folder too, if it was new) and the index if it was new; an existing index
    gets its old bytes back."""
    folder = experts_folder(out)
    index = out.read_bytes() if out.exists() else None
    folder_existed = folder.exists()
    before = set(folder.iterdir()) if folder.is_dir() else set()
    try:
        yield
    except BaseException:
        if not folder_existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for file in set(folder.iterdir()) - before:
                file.unlink(missing_ok=True)
        if index is None:
            out.unlink(missing_ok=True)
        elif out.read_bytes() != index:
            write_atomically(out, index)
        raise
