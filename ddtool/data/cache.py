"""Where ddtool looks for datasets in the user's cache, and the files it derives from them.

Derived files (decoded image tensors of slow formats, fitted ZCA transforms) live under the
cache directory: the `cache_dir` argument, else $DDTOOL_CACHE, else $XDG_CACHE_HOME/ddtool
(~/.cache/ddtool). Each is named `<what>-<version>.pt`, where the version is a hash of the
inputs (file paths, sizes, modification times, settings), so a changed input is never served
stale, and writing a new version removes the old ones.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ddtool.errors import FormatError
from ddtool.files import save_torch
from ddtool.paths import cache_root, user_cache_root


def user_data_dir() -> Path:
    """The per-user dataset folder, one of the places datasets are searched (and downloaded to)."""
    return user_cache_root() / "data"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root()


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def fingerprint(files: Iterable[Path]) -> str:
    """Identifies a set of files by path, size and modification time (cheap: no reading)."""
    h = hashlib.sha256()
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FormatError(f"{path} is missing: the dataset's files are incomplete.") from None
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def slug(text: str) -> str:
    """A file-name-safe rendering of a dataset name or path."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[-60:] or "x"


def load_or_build(directory: Path, what: str, version: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The cached dict for (`what`, `version`), building and storing it on a miss.

    Values must be what torch.load(weights_only=True) accepts: tensors, numbers, strings and
    containers of them.
    """
    path = directory / f"{what}-{version[:24]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # a cache file is disposable: any failure to read it is a miss
            warnings.warn(f"Ignoring unreadable cache file {path} ({exc}); rebuilding it.", stacklevel=2)
    value = build()
    save_torch(value, path)
    for old in directory.glob(f"{what}-*.pt"):
        if old != path and old.stem.rpartition("-")[0] == what:
            old.unlink(missing_ok=True)
    return value
