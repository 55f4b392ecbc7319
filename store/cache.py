"""A bounded on-disk cache of selected tensor blocks, so a re-run of lineage need not re-read the Hub.

Key: (repo_id, revision, tensor name, row block). File: `<root>/<h[:2]>/<h>[.bf16|.f16].npy` where h is
the blake2b-128 hex of the JSON-encoded key; the content is a plain `.npy` (numpy's format v1/v2 header +
C-order data; a float32 block that is exactly BF16 or F16 is kept in that width, see ENCODINGS), written temp + fsync + rename and read with `np.load(allow_pickle=False)`: object
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
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from errors import BadInputError
from store.atomic import TMP_PREFIX, atomic_open

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB: ~ 256 BF16 models at the default 16 MiB byte budget per model

CacheKey = tuple[str, str, str, int]  # (repo_id, revision, tensor name, row block)


def _digest(key: CacheKey) -> str:
    repo_id, revision, tensor, block = key
    raw = json.dumps([repo_id, revision, tensor, int(block)], separators=(",", ":"))
    return hashlib.blake2b(raw.encode("utf-8"), digest_size=16).hexdigest()


# A float32 block decoded from BF16 (the Hub's usual dtype) or F16 is kept in that dtype, at half the bytes:
# the same cache then holds twice the models, and the crawl reads evicted nominees again half as often
# (bench/crawl_rate.py). The encoding is in the file name; plain `.npy` files (every earlier version's)
# read as before.
BF16 = ".bf16"  # the float32's upper 16 bits as uint16: exact when its lower 16 are zero
F16 = ".f16"  # float16: exact when the round trip is
ENCODINGS = ("", BF16, F16)


def _encoded(array: np.ndarray) -> tuple[str, np.ndarray]:
    if array.dtype != np.float32 or array.size == 0:
        return "", array
    bits = array.view(np.uint32)
    if not (bits & 0xFFFF).any():
        return BF16, (bits >> 16).astype(np.uint16)
    half = array.astype(np.float16)
    if np.array_equal(half.astype(np.float32), array):  # NaN never reaches the cache (decode refuses it)
        return F16, half
    return "", array


def _decoded(stored: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == BF16 and stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if encoding == F16 and stored.dtype == np.float16:
        return stored.astype(np.float32)
    if encoding:
        raise ValueError(f"a {encoding} cache file holds {stored.dtype}")
    return stored


class TensorCache:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise BadInputError("max_bytes", f"must not be negative, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, int] = OrderedDict()  # oldest first -> size in bytes
        self._total = 0  # bytes of the entries
        # the crawl puts on its cache-writer thread while the lineage step gets: the books under a lock
        self._lock = threading.RLock()
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
            self._total += size
            self._clock = max(self._clock, mtime)
        self._evict()

    def _path(self, key: CacheKey, encoding: str = "") -> Path:
        digest = _digest(key)
        return self.root / digest[:2] / f"{digest}{encoding}.npy"

    def _stored(self, key: CacheKey) -> tuple[Path, str] | None:
        """The key's file and its encoding, when cached."""
        for encoding in ENCODINGS:
            if (path := self._path(key, encoding)) in self._entries:
                return path, encoding
        return None

    def _touch(self, path: Path) -> None:
        # A strictly increasing mtime keeps the order exact even when two hits share a clock tick.
        self._clock = max(self._clock + 1, time.time_ns())
        os.utime(path, ns=(self._clock, self._clock))
        self._entries.move_to_end(path)

    @property
    def total_bytes(self) -> int:
        return self._total  # kept as entries come and go: a sum per put grew with the cache (32 blocks a 7B model)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and self._stored(key) is not None  # type: ignore[arg-type]

    def get(self, key: CacheKey) -> np.ndarray | None:
        with self._lock:
            stored = self._stored(key)
        if stored is None:
            return None
        path, encoding = stored
        try:
            array = _decoded(np.load(path, allow_pickle=False), encoding)
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("dropping unreadable cache file %s (%s)", path, exc)
            with self._lock:
                path.unlink(missing_ok=True)
                self._total -= self._entries.pop(path, 0)
            return None
        with self._lock:
            if path in self._entries:  # not evicted meanwhile
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
        encoding, stored = _encoded(np.ascontiguousarray(array))
        path = self._path(key, encoding)
        with self._lock:
            if (old := self._stored(key)) is not None:  # put again (maybe in another encoding): one file a key
                old[0].unlink(missing_ok=True)
                self._total -= self._entries.pop(old[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as fh:
                np.save(fh, stored, allow_pickle=False)
            self._entries[path] = path.stat().st_size
            self._total += self._entries[path]
            self._touch(path)
            self._evict()
            return path in self._entries

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._entries:
            path, size = self._entries.popitem(last=False)  # least recently used
            path.unlink(missing_ok=True)
            self._total -= size
            logger.debug("evicted %s (%d bytes)", path.name, size)

    def clear(self) -> None:
        with self._lock:
            for path in list(self._entries):
                path.unlink(missing_ok=True)
            self._entries.clear()
            self._total = 0
