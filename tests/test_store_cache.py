"""store.cache: a real on-disk LRU of .npy files, never pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from errors import BadInputError
from store.cache import TensorCache

SHA = "f" * 40


def _block(i: int, n: int = 256) -> np.ndarray:
    return np.full(n, i, dtype=np.float32)  # 1 KiB of data + a 128-byte .npy header


def test_put_then_get_round_trips_and_a_miss_is_none(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    data = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert cache.put(("org/a", SHA, "layer.0.weight", 0), data)
    got = cache.get(("org/a", SHA, "layer.0.weight", 0))
    assert got is not None and got.dtype == np.float16
    np.testing.assert_array_equal(got, data)
    assert cache.get(("org/a", SHA, "layer.0.weight", 1)) is None  # another row block
    assert cache.get(("org/a", "e" * 40, "layer.0.weight", 0)) is None  # another revision
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_total_size_stays_under_the_bound_evicting_least_recently_used(tmp_path: Path) -> None:
    one = (tmp_path / "probe")
    np.save(one, _block(0))
    size = (tmp_path / "probe.npy").stat().st_size
    (tmp_path / "probe.npy").unlink()
    cache = TensorCache(tmp_path / "c", max_bytes=3 * size)
    for i in range(3):
        cache.put(("org/a", SHA, "w", i), _block(i))
    assert cache.get(("org/a", SHA, "w", 0)) is not None  # 0 is now the most recent
    cache.put(("org/a", SHA, "w", 3), _block(3))
    assert cache.get(("org/a", SHA, "w", 1)) is None  # the least recently used went
    assert all(cache.get(("org/a", SHA, "w", i)) is not None for i in (0, 2, 3))
    assert cache.total_bytes <= 3 * size and len(cache) == 3
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.npy"))
    assert on_disk == cache.total_bytes


def test_recency_survives_a_restart(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path, max_bytes=10_000)
    for i in range(3):
        cache.put(("org/a", SHA, "w", i), _block(i))
    cache.get(("org/a", SHA, "w", 0))
    size = cache.total_bytes // 3
    reopened = TensorCache(tmp_path, max_bytes=2 * size)  # a smaller bound: evicts on open
    assert reopened.get(("org/a", SHA, "w", 1)) is None
    assert reopened.get(("org/a", SHA, "w", 0)) is not None and reopened.get(("org/a", SHA, "w", 2)) is not None


def test_a_block_larger_than_the_cache_is_not_kept(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path, max_bytes=100)
    assert not cache.put(("org/a", SHA, "w", 0), _block(0))
    assert len(cache) == 0 and cache.get(("org/a", SHA, "w", 0)) is None


def test_object_arrays_are_refused_and_pickles_never_loaded(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    with pytest.raises(BadInputError, match="pickle"):
        cache.put(("org/a", SHA, "w", 0), np.array([{"x": 1}], dtype=object))
    cache.put(("org/a", SHA, "w", 0), _block(0))
    (path,) = list(tmp_path.rglob("*.npy"))
    np.save(path, np.array([{"boom": 1}], dtype=object), allow_pickle=True)  # a planted pickle
    fresh = TensorCache(tmp_path)
    assert fresh.get(("org/a", SHA, "w", 0)) is None  # refused, not unpickled
    assert not path.exists() and len(fresh) == 0


def test_leftover_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    (tmp_path / "ab").mkdir()
    junk = tmp_path / "ab" / ".tmp-123-ab00.npy"
    junk.write_bytes(b"\x93NUMPY half")
    cache = TensorCache(tmp_path)
    assert not junk.exists() and len(cache) == 0
