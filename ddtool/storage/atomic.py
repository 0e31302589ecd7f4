"""Write-then-rename, so that no reader ever sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from ddtool.errors import DDToolError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was. A full disk
    becomes a DDToolError naming the file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with _cleanup_on_failure(tmp, final):
        yield tmp
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Like atomic_path, for a folder: yield an empty temporary folder beside `path`, rename
    it to `path` on success, delete it on failure.

    `path` must not exist or be an empty folder (rename can replace only an empty folder; a
    non-empty one is never deleted, to keep a mistyped output path from destroying data).
    """
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise DDToolError(
            f"{final} already exists and is not an empty folder. Choose another output folder, "
            "or remove it first."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    _remove(tmp)  # a leftover of a killed earlier run with the same pid
    tmp.mkdir()
    with _cleanup_on_failure(tmp, final):
        yield tmp
        os.replace(tmp, final)


@contextlib.contextmanager
def _cleanup_on_failure(tmp: Path, final: Path) -> Iterator[None]:
    """Remove `tmp` if the body fails; turn a full disk into a DDToolError naming `final`."""
    try:
        yield
    except OSError as exc:
        _remove(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DDToolError(
                f"The disk is full: could not write {final}. Nothing was written; "
                "free some space and run the command again (--resume continues from the last checkpoint)."
            ) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
