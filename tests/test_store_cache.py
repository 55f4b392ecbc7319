"""store.cache: a real on-disk LRU of .npy files, never pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from errors import BadInputError
from store.cache import TensorCache

SHA = "f" * 40


def _block(i: int, n: int = 256) -> np.ndarray:
    # 1 KiB of data + a 128-byte .npy header (i + 1/3 is neither BF16 nor F16: kept as float32)
    return np.full(n, i + 1 / 3, dtype=np.float32)


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


def test_bf16_and_f16_blocks_are_kept_at_half_the_bytes_and_read_back_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    from_bf16 = (f32.view(np.uint32) & 0xFFFF0000).view(np.float32)  # what decoding a BF16 tensor gives
    from_f16 = f32.astype(np.float16).astype(np.float32)
    cache = TensorCache(tmp_path)
    for i, array in enumerate([f32, from_bf16, from_f16]):
        assert cache.put(("org/a", SHA, "w", i), array)
        got = cache.get(("org/a", SHA, "w", i))
        assert got is not None and got.dtype == np.float32 and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert ("org/a", SHA, "w", i) in cache
    sizes = sorted(p.stat().st_size for p in tmp_path.rglob("*.npy"))
    assert sorted(p.name.split(".", 1)[1] for p in tmp_path.rglob("*.npy")) == ["bf16.npy", "f16.npy", "npy"]
    assert sizes[0] < 0.6 * sizes[2] and sizes[1] < 0.6 * sizes[2]  # 2 bytes a weight against 4
    assert cache.put(("org/a", SHA, "w", 1), f32)  # the same key again, not BF16 now: one file for it
    np.testing.assert_array_equal(cache.get(("org/a", SHA, "w", 1)), f32)
    assert len(cache) == 3 and len(list(tmp_path.rglob("*.npy"))) == 3
    assert len(TensorCache(tmp_path)) == 3  # the encodings survive a restart


def test_a_cache_file_whose_content_does_not_match_its_encoding_is_dropped(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    key = ("org/a", SHA, "w", 0)
    cache.put(key, (np.ones(8, dtype=np.float32)))  # 1.0 is exact in BF16
    (path,) = tmp_path.rglob("*.bf16.npy")
    np.save(path, np.ones(8, dtype=np.float64))  # not what a .bf16 file holds
    again = TensorCache(tmp_path)
    assert again.get(key) is None and key not in again and not path.exists()
