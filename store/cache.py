"""A bounded on-disk cache of selected tensor blocks, so a re-run of lineage need not re-read the Hub.

Key: (repo_id, revision, tensor name, row block). File: `<root>/<h[:2]>/<h>.npy` where h is the
blake2b-128 hex of the JSON-encoded key; the content is a plain `.npy` (numpy's format v1/v2 header +
C-order data), written temp + fsync + rename and read with `np.load(allow_pickle=False)`: object
arrays are refused on the way in and can never be unpickled on the way out.

Eviction: least recently used, by file size, whenever the total exceeds `max_bytes`. Recency lives
in memory while the process runs and in each file's mtime between runs (a hit touches the file),
so the order survives a restart. A miss (or an unreadable file, which is deleted) returns None and
the caller re-reads the bytes by range. Only the store's writer (the lock holder) should open it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from errors import BadInputError
from store.atomic import TMP_PREFIX, atomic_open

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~ 64 models at the default 16 MiB byte budget per model

CacheKey = tuple[str, str, str, int]  # (repo_id, revision, tensor name, row block)


def _digest(key: CacheKey) -> str:
    repo_id, revision, tensor, block = key
    raw = json.dumps([repo_id, revision, tensor, int(block)], separators=(",", ":"))
    return hashlib.blake2b(raw.encode("utf-8"), digest_size=16).hexdigest()


class TensorCache:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise BadInputError("max_bytes", f"must not be negative, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, int] = OrderedDict()  # oldest first -> size in bytes
        self._clock = 0
        self._scan()

    def _scan(self) -> None:
        """Rebuild the LRU order from disk (mtime, then name) and drop a killed writer's temp files."""
        found: list[tuple[int, str, Path, int]] = []
        for path in sorted(self.root.glob("*/*")) if self.root.is_dir() else []:
            if path.name.startswith(TMP_PREFIX):
                path.unlink(missing_ok=True)
            elif path.suffix == ".npy":
                st = path.stat()
                found.append((st.st_mtime_ns, path.name, path, st.st_size))
        for mtime, _, path, size in sorted(found):
            self._entries[path] = size
            self._clock = max(self._clock, mtime)
        self._evict()

    def _path(self, key: CacheKey) -> Path:
        digest = _digest(key)
        return self.root / digest[:2] / f"{digest}.npy"

    def _touch(self, path: Path) -> None:
        # A strictly increasing mtime keeps the order exact even when two hits share a clock tick.
        self._clock = max(self._clock + 1, time.time_ns())
        os.utime(path, ns=(self._clock, self._clock))
        self._entries.move_to_end(path)

    @property
    def total_bytes(self) -> int:
        return sum(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and self._path(key) in self._entries  # type: ignore[arg-type]

    def get(self, key: CacheKey) -> np.ndarray | None:
        path = self._path(key)
        if path not in self._entries:
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("dropping unreadable cache file %s (%s)", path, exc)
            path.unlink(missing_ok=True)
            del self._entries[path]
            return None
        self._touch(path)
        return array

    def put(self, key: CacheKey, array: np.ndarray) -> bool:
        """Store a block; False when it alone is larger than the whole cache (it is not kept)."""
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise BadInputError(f"tensor {key[2]!r}", "object arrays cannot be cached (they would need pickle)")
        if array.nbytes > self.max_bytes:
            logger.debug("not caching %s: %d bytes exceed the %d-byte cache", key, array.nbytes, self.max_bytes)
            return False
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        self._entries[path] = path.stat().st_size
        self._touch(path)
        self._evict()
        return path in self._entries

    def _evict(self) -> None:
        total = self.total_bytes
        while total > self.max_bytes and self._entries:
            path, size = self._entries.popitem(last=False)  # least recently used
            path.unlink(missing_ok=True)
            total -= size
            logger.debug("evicted %s (%d bytes)", path.name, size)

    def clear(self) -> None:
        for path in list(self._entries):
            path.unlink(missing_ok=True)
        self._entries.clear()
