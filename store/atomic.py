"""Crash-safe file writes: write a temp file in the target folder, flush + fsync, rename, fsync the folder.

A crash at any instant leaves either the old file (or nothing) or the complete new one, never a torn
file: `os.replace` is atomic within one filesystem, which is why the temp file lives in the *same*
folder as its target. Temp names start with `TMP_PREFIX`; readers never glob them and the writer
removes leftovers when it opens the store (holding the write lock, so no live writer owns them).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink inside `folder` durable (POSIX needs the directory entry synced too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(target: Path) -> Path:
    """A fresh temp name next to `target` (same folder, hence same filesystem, hence atomic rename)."""
    return target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{target.name}"


@contextmanager
def atomic_open(target: Path) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it is fsynced and renamed onto `target`, else deleted."""
    tmp = temp_path_for(target)
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_open(target) as fh:
        fh.write(data)


def atomic_write_with(target: Path, write: Callable[[Path], None]) -> None:
    """For writers that insist on a path (faiss.write_index, DuckDB COPY): `write(tmp)`, fsync, rename."""
    tmp = temp_path_for(target)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def remove_temp_leftovers(folder: Path) -> int:
    """Delete `.tmp-*` files a killed writer left behind. Call only while holding the write lock."""
    if not folder.is_dir():
        return 0
    removed = 0
    for path in sorted(folder.glob(f"{TMP_PREFIX}*")):  # deterministic
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d temp leftovers in %s", removed, folder)
        fsync_dir(folder)
    return removed
