"""An exclusive, non-blocking lock on a file that names its holder: two runs can never share one run
directory, and the one that is refused is told which process (pid, host) holds it.

Written on `fcntl.flock` instead of the `filelock` package because the message must name the holder:
the holder writes its pid, host and start time into the lock file once it holds the lock, and a refused
process reads them back. The kernel releases the lock when the holder exits in any way (crash, SIGKILL),
so a stale lock file never blocks a later run. Platforms without `fcntl` run unlocked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from zeroshot_adapt.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class LockedError(UserError):
    """Another process holds the lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    started = info.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"process {info['pid']} on host {info.get('host', '?')!r}{since}"


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the duration of the block.

    what: what the lock protects, for the message ("run directory 'runs/x'").
    Raises LockedError at once (no waiting) if another process holds it."""
    path = Path(path)
    if fcntl is None:
        log.debug("no fcntl on this platform: %s is not locked", path)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{what} is in use by {_holder(path)}: wait for that run to finish (or stop it), or use another "
                f"--run-dir (lock file {str(path)!r})"
            ) from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        try:
            yield
        finally:
            with suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
