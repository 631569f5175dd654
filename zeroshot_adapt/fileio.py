"""Atomic file output: every result file is written to a temp file in its folder, flushed, fsynced and
renamed into place, so a reader (or a re-run after a crash or a full disk) sees the old file or the new
one, never half of one. The temp file is removed on any failure, and a full disk becomes a
:class:`DiskFullError` naming the file instead of a bare ``OSError``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from zeroshot_adapt.errors import UserError

FILE_MODE = 0o644  # mkstemp makes 0600 files; results are meant to be shared
_NO_DIRECTORY_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)  # filesystems that cannot fsync a folder


class DiskFullError(UserError):
    """No space left (or quota exceeded) while writing `path`."""

    def __init__(self, path: str | os.PathLike[str], needed_bytes: int | None = None) -> None:
        self.path = str(path)
        need = f" (about {needed_bytes:,} bytes needed)" if needed_bytes else ""
        super().__init__(
            f"no space left on the device while writing {self.path!r}{need}; free some space (or point the "
            "output elsewhere) and run the same command again: nothing that was complete before was changed"
        )


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file inside `path` durable. Filesystems that cannot fsync a directory are
    skipped; any other error (EIO, ...) is raised, not ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        if error.errno in _NO_DIRECTORY_FSYNC or os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temp file next to `path` for writing; on a clean exit it replaces `path` atomically.

    mode: "w" (text, `encoding` / `newline` apply) or "wb". Parent folders are created. On any
    exception the temp file is deleted and `path` is left as it was; ENOSPC / EDQUOT become
    :class:`DiskFullError`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        if is_disk_full(error):
            raise DiskFullError(path) from error
        raise
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
        os.replace(temp, path)
        fsync_directory(path.parent)
    except BaseException as error:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        if is_disk_full(error):
            raise DiskFullError(path) from error
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)
