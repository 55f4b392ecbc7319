"""The store's single-writer lock: an exclusive, non-blocking `fcntl.flock` on `home/.lock`.

Only writers lock. Readers (`store.query`) take no lock: every file they read is complete by
construction (see `store.atomic`), and part files are immutable once renamed into place.
The lock file holds the owner's pid as ASCII so that the refusal can name it. The file is never
deleted: unlinking a flock'ed file lets two processes lock two different inodes at once.
The kernel drops the lock when the process dies, so a killed writer never leaves the store locked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from errors import StoreLockedError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _read_pid(fd: int) -> str:
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return raw if raw.isdigit() else "unknown"


class WriteLock:
    """Hold with `with WriteLock(home):` or `acquire()` / `release()`. Not re-entrant."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"{self.path.parent} is locked by another process (pid {pid}); wait for it to "
                    f"finish, or stop it if it is stuck (a dead process releases the lock by itself)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd
        logger.debug("write lock taken on %s", self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
