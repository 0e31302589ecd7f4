"""Files, for every layer: write-then-rename, so that no reader ever sees a half-written file;
and the advisory lock that makes a read-modify-write of a shared file one step.

HDF5 and torch files up to IN_MEMORY_MAX_BYTES are built in memory and reach the disk as
plain writes (atomic_h5, save_torch): h5py writing to a full disk fails in its close and then
crashes the interpreter when it closes the file again at exit, and torch.save reports a failed
write as a RuntimeError without its errno. A plain write's ENOSPC is an OSError that
atomic_path turns into a message. Larger files would cost their size again in memory: they are
written to the temporary file directly, once the disk is known to have room for them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

import h5py
import torch

from ddtool.errors import DDToolError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was. A full disk,
    and a folder that cannot be written (read-only, not ours, not a folder), become a
    DDToolError naming the file.
    """
    # through a symbolic link to the file it names (replacing the link would leave that file
    # behind, unchanged), keeping the permissions the file has
    final = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    _prepare_folder(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with _cleanup_on_failure(tmp, final):
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
        os.replace(tmp, final)


def write_atomically(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write `data` to `path` through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


# Files up to this size are built in memory; larger ones (a big expert, an ImageNet-sized set)
# would cost their size again in memory, and are written in place after a free-space check.
IN_MEMORY_MAX_BYTES = 256 * 2**20


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, *, update: bool = False, size_hint: int = 0,
              **options: Any) -> Iterator[h5py.File]:
    """An HDF5 file written to `path` atomically when the block ends (nothing is written if it
    raises). update: start from the file at `path`, opened "r+". size_hint: about how many
    bytes a new file will hold. Built in memory up to IN_MEMORY_MAX_BYTES; a larger one is
    written to the temporary file directly once the disk is known to have room for it."""
    path = Path(path)
    size = path.stat().st_size if update else size_hint
    if size <= IN_MEMORY_MAX_BYTES:
        buffer = io.BytesIO(path.read_bytes() if update else b"")
        with h5py.File(buffer, "r+" if update else "w", **options) as f:
            yield f
        write_atomically(path, buffer.getbuffer())
        return
    with _atomic_path_with_room(size, path) as tmp:
        if update:
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+" if update else "w", **options) as f:
            yield f


@contextlib.contextmanager
def _atomic_path_with_room(size: int, path: str | os.PathLike) -> Iterator[Path]:
    """atomic_path for a file too large to build in memory: its temporary path, once the disk
    is known to have room for `size` bytes and a margin (else the disk-full DDToolError now,
    before hours of writing)."""
    with atomic_path(path) as tmp:
        if shutil.disk_usage(tmp.parent).free < size * 1.1 + 16 * 2**20:
            raise _disk_full(Path(path))
        yield tmp


def save_torch(obj: Any, path: str | os.PathLike, *, size_hint: int = 0) -> Path:
    """torch.save(obj) to `path` atomically: serialised in memory, or, when `size_hint` (about
    the bytes of its tensors) exceeds IN_MEMORY_MAX_BYTES, straight to the temporary file once
    the disk is known to have room."""
    if size_hint <= IN_MEMORY_MAX_BYTES:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return write_atomically(path, buffer.getbuffer())
    with _atomic_path_with_room(size_hint, path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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
    _prepare_folder(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    _remove(tmp)  # a leftover of a killed earlier run with the same pid
    tmp.mkdir()
    with _cleanup_on_failure(tmp, final):
        yield tmp
        os.replace(tmp, final)


@contextlib.contextmanager
def exclusive_lock(lock: str | os.PathLike | None, *, wait: bool = True, remove: bool = False) -> Iterator[bool]:
    """Hold an exclusive advisory lock (flock) on the file `lock` for the block's duration
    (None: no lock); the block gets whether it holds it (False only with wait=False, when
    another process does). Separate opens exclude each other, in one process too.

    remove: delete the lock file when done, for locks beside a user's files (a set's
    `<file>.lock` should not outlive the append it guards). It is deleted while held, and a
    process that waited on the deleted file retries on the path's new one, so two processes
    never both hold "the" lock."""
    if lock is None:
        yield True
        return
    lock = Path(lock)
    while True:
        handle = _open_lock(lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = os.fstat(handle.fileno())
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(lock)
                if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                    break
        except BlockingIOError:
            handle.close()
            yield False
            return
        except BaseException:
            handle.close()
            raise
        handle.close()  # the holder before us removed this file: lock the path's new one
    try:
        yield True
    finally:
        if remove:
            lock.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_writable(path: str | os.PathLike) -> None:
    """Raise now the DDToolError a later write of `path` would meet, creating nothing: for a
    command that works for hours before it saves. The folder, or the nearest existing one it
    would be created in, must be a folder this user may write to; `path` must not be a folder."""
    final = Path(os.path.realpath(path))
    if final.is_dir():
        raise _not_writable(final, IsADirectoryError(errno.EISDIR, "Is a directory"))
    folder = final.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise _not_writable(final, NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder"))
    _require_access(folder, final)


def _open_lock(lock: Path):
    _prepare_folder(lock)
    try:
        return open(lock, "a")
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise _not_writable(lock, exc) from None
        raise


# What writing into a folder we may not write to (or that is not a folder) fails with.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


def _prepare_folder(final: Path) -> None:
    """Create `final`'s folder, and check it can be written before any work goes into the
    file: some writers (torch.save) report a refused file as a RuntimeError, not an OSError."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (*_NOT_WRITABLE, errno.EEXIST):  # EEXIST: a file where the folder should be
            raise _not_writable(final, exc) from None
        raise
    _require_access(final.parent, final)


def _require_access(folder: Path, final: Path) -> None:
    """The not-writable DDToolError for `final` unless this user may create files in `folder`."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _not_writable(final, PermissionError(errno.EACCES, "Permission denied"))


def _not_writable(final: Path, exc: OSError) -> DDToolError:
    reason = exc.strerror or str(exc)
    return DDToolError(
        f"Could not write {final}: {reason}. Its folder {final.parent} must be a folder this user may "
        f"write to, on a file system that is not read-only, and {final.name} must not be a folder. "
        "Nothing was written; choose another output path, or fix the permissions, and run the command again."
    )


@contextlib.contextmanager
def _cleanup_on_failure(tmp: Path, final: Path) -> Iterator[None]:
    """Remove `tmp` if the body fails; turn a full disk or a refused write into a DDToolError
    naming `final`."""
    try:
        yield
    except OSError as exc:
        _remove(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(final) from exc
        if exc.errno in _NOT_WRITABLE:
            raise _not_writable(final, exc) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _disk_full(final: Path) -> DDToolError:
    return DDToolError(
        f"The disk is full: could not write {final}. Nothing was written; free some space and run the "
        "command again (with --resume, a distillation or an evaluation continues from its last checkpoint)."
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
