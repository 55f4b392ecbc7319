"""The safetensors reader: round-trips against the `safetensors` package, exact byte ranges, validation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import BadInputError, SafetensorsError, UnsupportedModelError
from sketches.dtypes import F8_E4M3_TABLE, F8_E5M2_TABLE
from sketches.safetensors import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    ByteSource,
    CallableSource,
    FileSource,
    TensorInfo,
    choose_files,
    decode,
    open_local_repo,
    parse_header,
    read_header,
    read_tensor,
)

# --- helpers ---------------------------------------------------------------------------------------


def build(header: dict | bytes | str, data: bytes = b"") -> bytes:
    """Raw safetensors bytes: 8-byte little-endian length, the header, the data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return len(header).to_bytes(8, "little") + header + data


class Recorder:
    """A byte source over an in-memory buffer that records every range asked of it."""

    def __init__(self, raw: bytes, name: str = "mem.safetensors") -> None:
        self.raw = raw
        self.calls: list[tuple[int, int]] = []
        self.source = CallableSource(name, len(raw), self._read)

    def _read(self, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        return self.raw[start:end]


def header_error(raw: bytes) -> str:
    """The reason read_header gives for `raw`; fails the test if it does not raise SafetensorsError."""
    with pytest.raises(SafetensorsError) as info:
        read_header(Recorder(raw).source)
    assert info.value.thing == "mem.safetensors"
    return info.value.reason


def f32_entry(shape: list[int], begin: int = 0) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * math.prod(shape)]}


def with_field(key: str, value: object) -> bytes:
    """A one-tensor file (F32 [1], 4 data bytes) whose entry has `key` replaced by `value`."""
    return build({"t": {**f32_entry([1]), key: value}}, b"\0" * 4)


# --- round trips against the safetensors package ---------------------------------------------------

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if dtype.is_floating_point:
        # x4 spreads values over normals and (for F8) subnormals without leaving F8_E4M3's +-448 range
        return (torch.randn(shape, generator=gen) * 4).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype_name", sorted(TORCH_DTYPES))
def test_round_trip_matches_torch(tmp_path: Path, dtype_name: str) -> None:
    tensors = {"w": sample(TORCH_DTYPES[dtype_name], (6, 5)), "b": sample(TORCH_DTYPES[dtype_name], (5,))}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with FileSource(path) as source:
        header = read_header(source)
        assert header.names() == ["b", "w"]
        for name, tensor in tensors.items():
            info = header.get(name)
            assert info.dtype == dtype_name and info.shape == tuple(tensor.shape)
            got = read_tensor(source, info)
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(got, tensor.float().numpy())


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_unsigned_round_trip_from_numpy_writer(tmp_path: Path, dtype: str) -> None:
    array = np.array([[0, 1, 2], [np.iinfo(dtype).max // 2, 7, 65535]], dtype=dtype)
    path = tmp_path / "u.safetensors"
    safetensors.numpy.save_file({"u": array}, str(path))
    repo = open_local_repo(path)
    np.testing.assert_array_equal(repo.read("u"), array.astype(np.float32))


@pytest.mark.parametrize(
    ("dtype_name", "table"), [("F8_E4M3", F8_E4M3_TABLE), ("F8_E5M2", F8_E5M2_TABLE)]
)
def test_float8_table_matches_torch_on_all_256_bytes(dtype_name: str, table: np.ndarray) -> None:
    raw = bytes(range(256))
    as_uint8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    expected = as_uint8.view(TORCH_DTYPES[dtype_name]).float().numpy()
    np.testing.assert_array_equal(decode(raw, dtype_name, (256,)), expected)  # NaNs compare equal here
    np.testing.assert_array_equal(table, expected)


def test_float8_special_values() -> None:
    e4m3 = decode(bytes([0x7F, 0xFF, 0x7E, 0x01, 0x80]), "F8_E4M3", (5,))
    assert np.isnan(e4m3[0]) and np.isnan(e4m3[1])
    assert e4m3[2] == 448.0 and e4m3[3] == 2.0**-9 and e4m3[4] == 0.0 and np.signbit(e4m3[4])
    e5m2 = decode(bytes([0x7C, 0xFC, 0x7D, 0x01, 0x7B]), "F8_E5M2", (5,))
    assert e5m2[0] == np.inf and e5m2[1] == -np.inf and np.isnan(e5m2[2])
    assert e5m2[3] == 2.0**-16 and e5m2[4] == 57344.0


def test_half_precision_specials_round_trip(tmp_path: Path) -> None:
    values = torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 1e-7, 65504.0])
    path = tmp_path / "s.safetensors"
    safetensors.torch.save_file({"h": values.half(), "b": values.bfloat16()}, str(path))
    repo = open_local_repo(path)
    np.testing.assert_array_equal(repo.read("h"), values.half().float().numpy())
    np.testing.assert_array_equal(repo.read("b"), values.bfloat16().float().numpy())


def test_scalar_and_empty_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"s": torch.tensor(3.5), "e": torch.zeros(0, 4)}, str(path))
    repo = open_local_repo(path)
    info = repo.tensors()["s"]
    assert info.shape == () and info.numel == 1 and info.row_bytes == 4
    assert repo.read("s").shape == () and float(repo.read("s")) == 3.5
    assert repo.read("e").shape == (0, 4) and repo.tensors()["e"].row_bytes == 16


def test_metadata_and_absolute_offsets(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.arange(3.0)}, str(path), metadata={"format": "pt", "x": "y"})
    with FileSource(path) as source:
        header = read_header(source)
    assert header.metadata == {"format": "pt", "x": "y"}
    info = header.get("a")
    raw = path.read_bytes()
    assert header.data_start == 8 + int.from_bytes(raw[:8], "little") == info.begin
    assert raw[info.begin : info.end] == np.arange(3, dtype="<f4").tobytes()
    assert header.file_size == len(raw) and info.nbytes == 12 and info.itemsize == 4


def test_dtype_sizes_cover_the_brief() -> None:
    assert DTYPE_SIZES == {
        "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1,
        "I16": 2, "I32": 4, "I64": 8, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
    }  # fmt: skip


# --- reading only the bytes asked for --------------------------------------------------------------


def two_tensor_file() -> tuple[bytes, np.ndarray, np.ndarray]:
    w = np.arange(10 * 7, dtype="<f2").reshape(10, 7)
    v = np.arange(2 * 3 * 4, dtype="<f4").reshape(2, 3, 4)
    header = {
        "w": {"dtype": "F16", "shape": [10, 7], "data_offsets": [0, 140]},
        "v": {"dtype": "F32", "shape": [2, 3, 4], "data_offsets": [140, 236]},
    }
    return build(header, w.tobytes() + v.tobytes()), w, v


def test_read_header_is_exactly_two_reads() -> None:
    raw, _, _ = two_tensor_file()
    rec = Recorder(raw)
    header = read_header(rec.source)
    n = int.from_bytes(raw[:8], "little")
    assert rec.calls == [(0, 8), (8, 8 + n)]
    assert rec.source.bytes_read == 8 + n == header.data_start


def test_read_tensor_is_one_read_of_exactly_its_bytes() -> None:
    raw, w, v = two_tensor_file()
    rec = Recorder(raw)
    header = read_header(rec.source)
    rec.calls.clear()
    before = rec.source.bytes_read
    got = read_tensor(rec.source, header.get("v"))
    assert rec.calls == [(header.data_start + 140, header.data_start + 236)]
    assert rec.source.bytes_read - before == 96
    np.testing.assert_array_equal(got, v)


def test_block_of_rows_touches_only_its_range() -> None:
    raw, w, v = two_tensor_file()
    rec = Recorder(raw)
    header = read_header(rec.source)
    info = header.get("w")
    assert info.row_bytes == 14
    rec.calls.clear()
    before = rec.source.bytes_read
    got = read_tensor(rec.source, info, rows=(2, 5))
    assert rec.calls == [(info.begin + 2 * 14, info.begin + 5 * 14)]
    assert rec.source.bytes_read - before == 3 * 14
    np.testing.assert_array_equal(got, w[2:5].astype(np.float32))
    rec.calls.clear()
    got = read_tensor(rec.source, header.get("v"), rows=(1, 2))
    assert got.shape == (1, 3, 4) and rec.calls == [(header.get("v").begin + 48, header.get("v").end)]
    np.testing.assert_array_equal(got, v[1:2])
    assert read_tensor(rec.source, info, rows=(4, 4)).shape == (0, 7)


def test_file_source_counts_bytes_and_reads_rows(tmp_path: Path) -> None:
    raw, w, _ = two_tensor_file()
    path = tmp_path / "f.safetensors"
    path.write_bytes(raw)
    source = FileSource(path)
    assert isinstance(source, ByteSource) and source.size == len(raw) and source.bytes_read == 0
    header = read_header(source)
    after_header = source.bytes_read
    np.testing.assert_array_equal(read_tensor(source, header.get("w"), rows=(9, 10)), w[9:])
    assert source.bytes_read - after_header == 14
    source.close()
    source.close()  # idempotent; a later read reopens
    assert source.read(0, 8) == raw[:8]
    source.close()


@pytest.mark.parametrize("rows", [(-1, 2), (3, 2), (0, 11)])
def test_rows_out_of_range_are_refused(rows: tuple[int, int]) -> None:
    raw, _, _ = two_tensor_file()
    rec = Recorder(raw)
    info = read_header(rec.source).get("w")
    with pytest.raises(SafetensorsError, match="rows"):
        read_tensor(rec.source, info, rows=rows)


def test_rows_of_a_scalar_are_refused() -> None:
    rec = Recorder(build({"s": f32_entry([])}, b"\0" * 4))
    with pytest.raises(SafetensorsError, match="scalar"):
        read_tensor(rec.source, read_header(rec.source).get("s"), rows=(0, 1))


def test_callable_source_short_read_is_truncated() -> None:
    source = CallableSource("remote", 100, lambda start, end: b"x" * (end - start - 1))
    with pytest.raises(SafetensorsError, match="truncated"):
        source.read(10, 20)


def test_reading_past_the_end_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with FileSource(path) as source, pytest.raises(SafetensorsError, match="truncated"):
        source.read(0, 4)


def test_file_shrunk_after_open_is_truncated(tmp_path: Path) -> None:
    raw, _, _ = two_tensor_file()
    path = tmp_path / "f.safetensors"
    path.write_bytes(raw)
    source = FileSource(path)
    header = read_header(source)
    path.write_bytes(raw[:-10])  # the size we recorded is now a lie: pread comes back short
    with pytest.raises(SafetensorsError, match="truncated"):
        read_tensor(source, header.get("v"))
    source.close()


def test_missing_file_source_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="nope"):
        FileSource(tmp_path / "nope.safetensors")


def test_header_get_names_the_missing_tensor() -> None:
    header = read_header(Recorder(build({"a": f32_entry([1])}, b"\0" * 4)).source)
    with pytest.raises(SafetensorsError, match="'missing.weight'"):
        header.get("missing.weight")
    assert "a" in header and "b" not in header


def test_decode_refuses_wrong_byte_count_and_unknown_dtype() -> None:
    with pytest.raises(SafetensorsError, match="needs 8 bytes"):
        decode(b"\0" * 7, "F32", (2,), name="t")
    with pytest.raises(SafetensorsError, match="unknown dtype"):
        decode(b"\0" * 8, "C64", (1,), name="t")


# --- validation: one test per rule -----------------------------------------------------------------


def test_length_missing() -> None:
    assert "truncated" in header_error(b"")


def test_length_truncated() -> None:
    assert "fewer than the 8-byte header length" in header_error(b"\x05\0\0")


def test_header_length_over_cap() -> None:
    raw = (MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}"
    reason = header_error(raw)
    assert f"{MAX_HEADER_BYTES + 1} bytes" in reason and "cap" in reason


def test_header_length_over_file_size() -> None:
    raw = (5_000_000_000 // 100).to_bytes(8, "little") + b"{}" + b" " * 1224
    assert header_error(raw) == "header declares 50000000 bytes but the file has 1234 (truncated?)"


def test_header_over_file_size_is_checked_before_anything_is_read() -> None:
    rec = Recorder((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError):
        read_header(rec.source)
    assert rec.calls == [(0, 8)]


def test_header_not_utf8() -> None:
    assert "not UTF-8" in header_error(build(b'{"\xff": 1}'))


def test_header_not_json() -> None:
    assert "not valid JSON" in header_error(build("{not json"))


@pytest.mark.parametrize("top", ["[]", "3", '"x"', "null"])
def test_header_not_an_object(top: str) -> None:
    assert "not an object" in header_error(build(top))


@pytest.mark.parametrize("entry", [[], "F32", 3, None])
def test_entry_not_an_object(entry: object) -> None:
    assert "entry is a" in header_error(build({"t": entry}))


@pytest.mark.parametrize("key", ["dtype", "shape", "data_offsets"])
def test_entry_missing_key(key: str) -> None:
    entry = f32_entry([1])
    del entry[key]
    assert f"missing '{key}'" in header_error(build({"t": entry}, b"\0" * 4))


@pytest.mark.parametrize("dtype", [4, None, ["F32"]])
def test_dtype_mistyped(dtype: object) -> None:
    assert "dtype must be a string" in header_error(with_field("dtype", dtype))


def test_dtype_unknown() -> None:
    assert "unknown dtype 'F4'" in header_error(with_field("dtype", "F4"))


@pytest.mark.parametrize("shape", ["[1]", 1, {"0": 1}, None])
def test_shape_mistyped(shape: object) -> None:
    assert "shape must be a list" in header_error(with_field("shape", shape))


@pytest.mark.parametrize("shape", [[-1], [1, -4]])
def test_shape_negative(shape: list[int]) -> None:
    assert "shape must be a list" in header_error(with_field("shape", shape))


@pytest.mark.parametrize("shape", [[1.0], [True], ["1"], [None]])
def test_shape_not_int(shape: list[object]) -> None:
    assert "shape must be a list" in header_error(with_field("shape", shape))


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [-4, 0], [0.0, 4], "0,4", [0, True], None])
def test_data_offsets_mistyped(offsets: object) -> None:
    assert "data_offsets must be" in header_error(with_field("data_offsets", offsets))


def test_size_mismatch() -> None:
    entry = {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 10]}
    reason = header_error(build({"t": entry}, b"\0" * 12))
    assert "F16 [2, 3] needs 12 bytes but data_offsets span 10" in reason


def test_huge_shape_is_refused_without_allocating() -> None:
    entry = {"dtype": "F64", "shape": [2**62, 2**62, 2**62], "data_offsets": [0, 8]}
    assert "data_offsets span 8" in header_error(build({"t": entry}, b"\0" * 8))


def test_offsets_beyond_file_size() -> None:
    reason = header_error(build({"t": f32_entry([4])}, b"\0" * 12))
    assert "data ends at byte" in reason and "truncated" in reason


def test_huge_offsets_beyond_file_size() -> None:
    entry = {"dtype": "U8", "shape": [2**70], "data_offsets": [0, 2**70]}
    assert "data ends at byte" in header_error(build({"t": entry}))


def test_begin_after_end() -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}
    assert "begin 8 > end 4" in header_error(build({"t": entry}, b"\0" * 8))


def test_overlapping_tensors() -> None:
    header = {"a": f32_entry([2], 0), "b": f32_entry([2], 4)}
    assert "'a' and 'b' overlap" in header_error(build(header, b"\0" * 12))


def test_gaps_and_empty_tensors_are_not_overlaps() -> None:
    header = {"a": f32_entry([1], 0), "e": f32_entry([0], 2), "b": f32_entry([1], 8)}
    parsed = read_header(Recorder(build(header, b"\0" * 12)).source)
    assert parsed.names() == ["a", "b", "e"]


@pytest.mark.parametrize("metadata", [[], "x", {"a": 1}, {"a": None}, {"a": {"b": "c"}}])
def test_metadata_not_str_to_str(metadata: object) -> None:
    assert "__metadata__ must be" in header_error(build({"__metadata__": metadata}))


def test_duplicate_tensor_key() -> None:
    entry = json.dumps(f32_entry([1]))
    assert "duplicate key 't'" in header_error(build(f'{{"t": {entry}, "t": {entry}}}', b"\0" * 4))


def test_duplicate_key_inside_an_entry() -> None:
    text = '{"t": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    assert "duplicate key 'dtype'" in header_error(build(text, b"\0" * 4))


@pytest.mark.parametrize("bomb", ["[" * 200_000, '{"a":' * 200_000, '{"a": ' + "[" * 200_000])
def test_json_nesting_bomb(bomb: str) -> None:
    assert header_error(build(bomb)) == "header is nested too deeply"


def test_parse_header_refuses_a_short_buffer() -> None:
    with pytest.raises(SafetensorsError, match="truncated"):
        parse_header("x", b"{}", header_size=10, file_size=100)


def test_parse_header_is_pure_and_offsets_are_absolute() -> None:
    text = json.dumps({"b": f32_entry([1], 4), "a": f32_entry([1], 0)}).encode()
    header = parse_header("x", text, header_size=len(text), file_size=8 + len(text) + 8)
    assert [t.name for t in header.tensors] == ["a", "b"]
    assert header.get("b") == TensorInfo("b", "F32", (1,), 8 + len(text) + 4, 8 + len(text) + 8)


# --- local repos -------------------------------------------------------------------------------------


def save_sharded(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {
        "embed.weight": sample(torch.float32, (8, 4)),
        "layer.0.weight": sample(torch.bfloat16, (4, 4)),
        "layer.1.weight": sample(torch.float16, (4, 4)),
        "head.bias": sample(torch.float32, (3,)),
    }
    shards = {
        "model-00001-of-00002.safetensors": ["embed.weight", "layer.0.weight"],
        "model-00002-of-00002.safetensors": ["layer.1.weight", "head.bias"],
    }
    weight_map = {}
    for shard, names in shards.items():
        safetensors.torch.save_file({n: tensors[n] for n in names}, str(folder / shard))
        weight_map.update({n: shard for n in names})
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_sharded_repo(tmp_path: Path) -> None:
    tensors = save_sharded(tmp_path)
    with open_local_repo(tmp_path) as repo:
        assert repo.files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        assert list(repo.tensors()) == sorted(tensors)
        assert repo.file_of("head.bias") == "model-00002-of-00002.safetensors"
        assert repo.bytes_read == repo.header_bytes  # opening reads headers only
        for name, tensor in tensors.items():
            before = repo.bytes_read
            np.testing.assert_array_equal(repo.read(name), tensor.float().numpy())
            assert repo.bytes_read - before == repo.tensors()[name].nbytes
        block = repo.read("embed.weight", rows=(6, 8))
        np.testing.assert_array_equal(block, tensors["embed.weight"][6:].numpy())
        with pytest.raises(SafetensorsError, match="'nope'"):
            repo.file_of("nope")


def test_sharded_repo_through_the_index_path(tmp_path: Path) -> None:
    tensors = save_sharded(tmp_path)
    repo = open_local_repo(tmp_path / "model.safetensors.index.json")
    assert list(repo.tensors()) == sorted(tensors) and len(repo.files) == 2
    repo.close()


def write_index(folder: Path, index: object) -> None:
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)


@pytest.mark.parametrize(
    "index", ["[]", "{oops", {"weight_map": []}, {"weight_map": {"a": 1}}, {"other": {}}, {"weight_map": {}}]
)
def test_index_must_be_an_object_with_a_weight_map(tmp_path: Path, index: object) -> None:
    save_sharded(tmp_path)
    write_index(tmp_path, index)
    with pytest.raises(SafetensorsError, match="index|weight_map"):
        open_local_repo(tmp_path)


@pytest.mark.parametrize(
    "shard", ["../model-00001-of-00002.safetensors", "sub/x.safetensors", "/etc/passwd", "..", "a\0b", ""]
)
def test_index_shard_must_be_a_plain_file_name(tmp_path: Path, shard: str) -> None:
    save_sharded(tmp_path)
    write_index(tmp_path, {"weight_map": {"embed.weight": shard}})
    with pytest.raises(SafetensorsError, match="not a plain file name"):
        open_local_repo(tmp_path)


def test_index_shard_must_exist(tmp_path: Path) -> None:
    save_sharded(tmp_path)
    write_index(tmp_path, {"weight_map": {"embed.weight": "model-00009-of-00009.safetensors"}})
    with pytest.raises(SafetensorsError, match="missing"):
        open_local_repo(tmp_path)


def test_index_tensor_must_be_in_its_shard(tmp_path: Path) -> None:
    save_sharded(tmp_path)
    write_index(tmp_path, {"weight_map": {"head.bias": "model-00001-of-00002.safetensors"}})
    with pytest.raises(SafetensorsError, match="'head.bias' in model-00001-of-00002.safetensors"):
        open_local_repo(tmp_path)


def test_index_duplicate_key(tmp_path: Path) -> None:
    save_sharded(tmp_path)
    shard = "model-00001-of-00002.safetensors"
    write_index(tmp_path, f'{{"weight_map": {{"embed.weight": "{shard}", "embed.weight": "{shard}"}}}}')
    with pytest.raises(SafetensorsError, match="duplicate key"):
        open_local_repo(tmp_path)


def test_folder_without_index_reads_every_safetensors_file_sorted(tmp_path: Path) -> None:
    safetensors.torch.save_file({"b": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    safetensors.torch.save_file({"a": torch.ones(3)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "notes.txt").write_text("not weights")
    repo = open_local_repo(tmp_path)
    assert repo.files == ("a.safetensors", "b.safetensors") and repo.file_of("b") == "b.safetensors"


def test_folder_prefers_model_safetensors(tmp_path: Path) -> None:
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    safetensors.torch.save_file({"lora": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    assert open_local_repo(tmp_path).files == ("model.safetensors",)


def test_files_sharing_names_are_variants_and_the_most_precise_is_read(tmp_path: Path) -> None:
    """x.safetensors beside x.fp16.safetensors (ControlNets, SD checkpoints): one model, read once; a file
    sharing no name with it (an autoencoder beside a transformer) is a part of the same model."""
    safetensors.torch.save_file({"w": torch.ones(2, dtype=torch.float16), "x": torch.ones(2, dtype=torch.float16)},
                                str(tmp_path / "a.fp16.safetensors"))
    safetensors.torch.save_file({"w": torch.full((2,), 2.0), "x": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    safetensors.torch.save_file({"w": torch.full((2,), 3.0)}, str(tmp_path / "c-emaonly.safetensors"))
    safetensors.torch.save_file({"vae.w": torch.ones(3)}, str(tmp_path / "d-ae.safetensors"))
    with open_local_repo(tmp_path) as repo:
        assert repo.files == ("b.safetensors", "d-ae.safetensors") and repo.read("w").tolist() == [2.0, 2.0]
    headers = {}
    for name in ("a.fp16.safetensors", "c-emaonly.safetensors"):
        with FileSource(tmp_path / name) as src:
            headers[name] = read_header(src)
    assert choose_files(headers) == ("c-emaonly.safetensors",)  # F32 before F16, whatever the tensor count
    same = {"one.safetensors": headers["a.fp16.safetensors"], "two.safetensors": headers["a.fp16.safetensors"]}
    assert choose_files(same) == ("one.safetensors",)  # same precision and count: the first by name


def test_pickle_only_folder_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsupportedModelError) as info:
        open_local_repo(tmp_path)
    assert info.value.thing == str(tmp_path)
    assert "no safetensors weights (pickled weights are never loaded)" in info.value.reason


def test_pickle_file_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UnsupportedModelError, match="never loaded"):
        open_local_repo(tmp_path / "model.pt")


def test_empty_folder_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="no safetensors weights"):
        open_local_repo(tmp_path)


def test_missing_path_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        open_local_repo(tmp_path / "missing")


def test_broken_shard_closes_the_others(tmp_path: Path) -> None:
    safetensors.torch.save_file({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0[]")
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(SafetensorsError, match="b.safetensors") as info:
        open_local_repo(tmp_path)
    # `info` keeps the traceback (and so the half-built repo) alive: only an explicit close frees the fd
    assert info.value.thing.endswith("b.safetensors")
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


# --- properties --------------------------------------------------------------------------------------

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_never_crashes(raw: bytes) -> None:
    """read_header and every read_tensor either work or raise SafetensorsError, nothing else."""
    source = Recorder(raw).source
    try:
        header = read_header(source)
    except SafetensorsError:
        return
    for info in header.tensors:
        assert header.data_start <= info.begin <= info.end <= len(raw)
        assert read_tensor(source, info).shape == info.shape


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(raw: bytes) -> None:
    check_never_crashes(raw)


@FAST
@given(st.binary(max_size=200))
def test_random_header_bytes_never_crash(header: bytes) -> None:
    check_never_crashes(build(header, b"\0" * 64))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_SIZES, "F4", ""]) | JSON,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
        "data_offsets": st.lists(st.integers(-2, 80), min_size=2, max_size=2) | JSON,
    }
)


@FAST
@given(st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=5), st.binary(max_size=80))
def test_random_headers_never_crash(header: dict, data: bytes) -> None:
    check_never_crashes(build(json.dumps(header), data))


@FAST
@given(st.data())
def test_mutated_valid_files_never_crash(data: st.DataObject) -> None:
    raw = bytearray(two_tensor_file()[0])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    check_never_crashes(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))


@FAST
@given(
    st.sampled_from(sorted(DTYPE_SIZES)),
    st.lists(st.integers(0, 5), min_size=1, max_size=3),
    st.data(),
)
def test_any_block_of_rows_equals_the_slice_of_the_whole(
    dtype: str, shape: list[int], data: st.DataObject
) -> None:
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    payload = data.draw(st.binary(min_size=nbytes, max_size=nbytes))
    rec = Recorder(build({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, payload))
    info = read_header(rec.source).get("t")
    whole = read_tensor(rec.source, info)
    r0 = data.draw(st.integers(0, shape[0]))
    r1 = data.draw(st.integers(r0, shape[0]))
    rec.calls.clear()
    block = read_tensor(rec.source, info, rows=(r0, r1))
    assert rec.calls == [(info.begin + r0 * info.row_bytes, info.begin + r1 * info.row_bytes)]
    np.testing.assert_array_equal(block, whole[r0:r1])
