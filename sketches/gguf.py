"""A GGUF reader that reads only the bytes it is asked for: header by growing range reads, then blocks.

File layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    uint32 magic "GGUF" | uint32 version (2 or 3) | uint64 tensor_count | uint64 kv_count
    kv_count x  (string key, uint32 value_type, value)        string = uint64 length + UTF-8 bytes
                                                              array  = uint32 type + uint64 count + items
    tensor_count x (string name, uint32 n_dims, n_dims x uint64 ne, uint32 ggml_type, uint64 offset)
    padding to `general.alignment` (default 32)  -> data_start
    tensor data; tensor t is bytes [data_start + offset, + nbytes), rows of ne0 values, whole blocks

`ne` lists the innermost dimension first, so the numpy shape is `ne` reversed: a Hugging Face (out, in)
Linear weight is `ne = [in, out]`. A row (ne0 values) is whole quantization blocks (Q8_0: 32 values in
34 bytes; K-quants: 256-value super-blocks), so a run of rows is one contiguous byte range and rows
[r0, r1) cost one read of exactly their bytes, like `sketches.safetensors.read_tensor`.

The header has no length field and sits in front of the tensor infos together with the metadata, which
carries the whole tokenizer (Llama-3: 128k token strings + 280k merges, ~7 MiB). It is read as a prefix
that grows (1 MiB, then x4) until the tensor infos are complete: 1 read for a GGUF without a tokenizer,
3 for a Llama-3 one. Every count and length is checked against the file size before it is trusted, and
every failure is a `GGUFError` naming the file.

Blocks are dequantized by `gguf.quants.dequantize` (numpy). llama.cpp names are mapped to Hugging Face
names through `gguf.TensorNameMap`; llama's q/k rows, which llama.cpp's converter permutes (`permute` in
convert_hf_to_gguf.py: within each head, interleaved rotary pairs), are put back in Hugging Face order;
GPT-2's Conv1D weights, which the converter transposes, are transposed back.

A gguf-split set (llama.cpp's `gguf-split`, `convert_hf_to_gguf.py --split-max-size`) is N files that are
each a GGUF: every shard carries `split.no` (its 0-based place), `split.count` (N) and
`split.tensors.count` (the set's tensors), the first also the model's metadata. `merge_split` checks that
the headers make one model and gives one view of them (names, shapes); a tensor is read through the header
and source of the shard that holds it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from errors import GGUFError, SafetensorsError
from sketches.flux import COMFY, flux_inner, flux_parts, is_bfl_flux
from sketches.ldm import LDM_UNET, unet_names
from sketches.safetensors import ByteSource
from sketches.sd3 import PREFIX as SD3_PREFIX
from sketches.sd3 import is_sd3, sd3_parts

__all__ = [
    "FIRST_READ_BYTES",
    "MAX_HEADER_BYTES",
    "QUANT_RELATIVE_ERROR",
    "ArraySummary",
    "GGUFHeader",
    "GGUFTensorInfo",
    "HFName",
    "declared_base_models",
    "dequantize",
    "hf_names",
    "merge_split",
    "parse_header",
    "predicted_relative_error",
    "read_header",
    "read_hf_tensor",
    "read_tensor",
]

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 (2023, uint32 counts) is gone from the Hub's active files
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# 1 MiB holds the whole header of a GGUF without an embedded tokenizer (LoRA GGUFs, vision towers) and
# the preamble of every other; x4 growth reaches a Llama-3 header (~7 MiB) in 3 reads, a 256k-vocab one
# (Gemma, ~17 MiB) in 4.
FIRST_READ_BYTES = 1 << 20
GROWTH = 4
# Larger than any tokenizer on the Hub by ~10x; a bigger "header" is a broken or hostile file.
MAX_HEADER_BYTES = 256 * 1024 * 1024
# Arrays longer than this (tokens, merges, scores) are summarised, not kept: no lineage decision reads them.
MAX_KEPT_ARRAY = 1024
MAX_ARRAY_DEPTH = 2  # arrays of arrays exist in the spec; deeper nesting is not in any writer

# struct format of each scalar value type of the metadata (GGUFValueType)
_SCALAR_FORMATS: dict[int, str] = {
    int(gguf.GGUFValueType.UINT8): "<B",
    int(gguf.GGUFValueType.INT8): "<b",
    int(gguf.GGUFValueType.UINT16): "<H",
    int(gguf.GGUFValueType.INT16): "<h",
    int(gguf.GGUFValueType.UINT32): "<I",
    int(gguf.GGUFValueType.INT32): "<i",
    int(gguf.GGUFValueType.FLOAT32): "<f",
    int(gguf.GGUFValueType.BOOL): "<B",
    int(gguf.GGUFValueType.UINT64): "<Q",
    int(gguf.GGUFValueType.INT64): "<q",
    int(gguf.GGUFValueType.FLOAT64): "<d",
}
_STRING = int(gguf.GGUFValueType.STRING)
_ARRAY = int(gguf.GGUFValueType.ARRAY)
_BOOL = int(gguf.GGUFValueType.BOOL)

# Plain numeric tensor types that gguf.quants does not handle itself.
_NUMPY_TYPES: dict[str, str] = {"F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}

# RMS relative error ||deq(q(W)) - W|| / ||W|| of each block type on N(0, 1) data, measured once
# (tests/test_gguf.py::test_relative_error_table re-measures them: 64 x 4096 values, seed 0).
# Q8_0, Q4_0/1, Q5_0/1, BF16: gguf.quants' bit-exact ports of llama.cpp's reference quantizers.
# Q2_K..Q6_K: ggml's own ggml_quantize_chunk without an importance matrix (what llama-quantize writes
# without --imatrix; an importance matrix trades RMS error for weighted error, not measured here).
# Real weights have heavier tails than a Gaussian, which absmax-scaled blocks pay for: judge "within
# quantization error" with a margin (the tests allow 1.5x).
QUANT_RELATIVE_ERROR: dict[str, float] = {
    "F32": 0.0,
    "F64": 0.0,
    "F16": 2.1e-4,
    "BF16": 1.7e-3,
    "Q8_0": 5.4e-3,
    "Q6_K": 1.8e-2,
    "Q5_K": 3.6e-2,
    "Q5_1": 3.8e-2,
    "Q5_0": 4.3e-2,
    "Q4_K": 7.1e-2,
    "Q4_1": 7.8e-2,
    "Q4_0": 8.6e-2,
    "Q3_K": 1.5e-1,
    "Q2_K": 3.0e-1,
    # i-quants, ggml's quantizer too; IQ1_S, IQ2_XXS and IQ2_XS need an importance matrix: measured with a
    # uniform one (real ones weigh columns by activations and trade some RMS error for it). llama-quantize
    # writes IQ4_NL for rows that are not whole 256-value super-blocks in Q2_K / Q3_K files (Qwen2's 896).
    "IQ4_NL": 7.6e-2,
    "IQ4_XS": 7.7e-2,
    "IQ3_S": 1.67e-1,
    "IQ3_XXS": 2.14e-1,
    "IQ2_S": 2.65e-1,
    "IQ2_XS": 3.0e-1,
    "IQ2_XXS": 3.44e-1,
    "IQ1_S": 4.86e-1,
    "IQ1_M": 5.83e-1,
    "MXFP4": 1.15e-1,  # FP4 E2M1, a power-of-two scale per 32 (gpt-oss)
    "NVFP4": 9.5e-2,  # FP4 E2M1, an F8 scale per 16
    # ternary types hold BitNet-style models trained ternary; from float weights they lose most of them
    "TQ1_0": 8.08e-1,
    "TQ2_0": 8.08e-1,
}


class _NeedBytes(Exception):
    """The prefix ends before the header does; `end` is the first byte offset the parser needs."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


# --- header records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep (a tokenizer's tokens or merges): its element type and length."""

    element_type: str
    length: int


MetaValue = int | float | bool | str | tuple["MetaValue", ...] | ArraySummary


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # llama.cpp's name, e.g. blk.0.attn_q.weight
    qtype: str  # GGMLQuantizationType name: F32, F16, BF16, Q8_0, Q4_K, ...
    dims: tuple[int, ...]  # GGUF order: ne0 (innermost, contiguous) first
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy (C-order) shape: dims reversed. An HF Linear weight is (out, in)."""
        return tuple(reversed(self.dims))

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def block_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.qtype]][0]

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the numpy dim 0 (whole blocks, since ne0 is a multiple of the block)."""
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.qtype]]
        return math.prod(self.shape[1:]) // block * type_size if len(self.shape) > 1 else self.nbytes


@dataclass(frozen=True)
class GGUFHeader:
    name: str
    version: int
    alignment: int
    data_start: int  # bytes before the first tensor's data: what a header read costs at least
    file_size: int
    metadata: dict[str, MetaValue]  # sorted by key
    tensors: tuple[GGUFTensorInfo, ...]  # sorted by name
    _by_name: dict[str, GGUFTensorInfo] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else ""

    def get(self, name: str) -> GGUFTensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise GGUFError(self.name, f"no tensor named {name!r}") from None

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def qtypes(self) -> dict[str, int]:
        """How many tensors of each quantization type (a Q4_K_M file is mostly Q4_K with some Q6_K)."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return dict(sorted(counts.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


# --- parsing ----------------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian fields from a prefix of a file of `file_size` bytes."""

    def __init__(self, thing: str, data: bytes, file_size: int) -> None:
        self.thing = thing
        self.data = memoryview(data)
        self.file_size = file_size
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > self.file_size:
            raise GGUFError(
                self.thing, f"truncated: {what} at byte {self.pos} needs {n} bytes but the file has {self.file_size}"
            )
        if end > len(self.data):
            raise _NeedBytes(end)
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int | float:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def count(self, what: str, *, min_item_bytes: int) -> int:
        """A uint64 count, refused when that many items could not fit in the rest of the file."""
        n = self.u64(what)
        if n * min_item_bytes > self.file_size - self.pos:
            raise GGUFError(
                self.thing,
                f"truncated or corrupt: {what} is {n}, more than the {self.file_size - self.pos} bytes left can hold",
            )
        return n

    def raw_string(self, what: str) -> memoryview:
        return self.take(self.count(f"{what} length", min_item_bytes=1), what)

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(self.thing, f"{what} is not UTF-8 (byte {exc.start})") from None


def _type_name(value_type: int) -> str:
    try:
        return gguf.GGUFValueType(value_type).name
    except ValueError:
        return str(value_type)


def _min_bytes(value_type: int) -> int:
    """The fewest bytes one value of this type takes (for bounding counts before looping)."""
    if value_type in _SCALAR_FORMATS:
        return struct.calcsize(_SCALAR_FORMATS[value_type])
    return 8 if value_type == _STRING else 12  # array: uint32 type + uint64 count


def _value(cur: _Cursor, value_type: int, what: str, depth: int = 0) -> MetaValue:
    if value_type in _SCALAR_FORMATS:
        value = cur.unpack(_SCALAR_FORMATS[value_type], what)
        return bool(value) if value_type == _BOOL else value
    if value_type == _STRING:
        return bytes(cur.raw_string(what)).decode("utf-8", errors="replace")  # values are shown, not keyed
    if value_type == _ARRAY:
        return _array(cur, what, depth)
    raise GGUFError(cur.thing, f"{what}: unknown metadata value type {value_type}")


def _array(cur: _Cursor, what: str, depth: int) -> MetaValue:
    if depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(cur.thing, f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    item_type = cur.u32(f"{what} item type")
    if item_type not in _SCALAR_FORMATS and item_type not in (_STRING, _ARRAY):
        raise GGUFError(cur.thing, f"{what}: unknown array item type {item_type}")
    n = cur.count(f"{what} length", min_item_bytes=_min_bytes(item_type))
    keep = n <= MAX_KEPT_ARRAY
    if item_type in _SCALAR_FORMATS:  # one slice for the whole array
        fmt = _SCALAR_FORMATS[item_type]
        raw = cur.take(n * struct.calcsize(fmt), what)
        if not keep:
            return ArraySummary(_type_name(item_type), n)
        values = np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
        return tuple(bool(v) for v in values) if item_type == _BOOL else tuple(values)
    if item_type == _STRING and not keep:  # walk the lengths only: 280k merges, nothing decoded
        for _ in range(n):
            cur.raw_string(what)
        return ArraySummary(_type_name(item_type), n)
    items = [_value(cur, item_type, what, depth + 1) for _ in range(n)]
    return tuple(items) if keep else ArraySummary(_type_name(item_type), n)


def _preamble(cur: _Cursor) -> tuple[int, int, int]:
    """(version, tensor_count, kv_count) after checking the magic and the version."""
    magic = bytes(cur.take(4, "magic"))
    if magic != MAGIC:
        raise GGUFError(cur.thing, f"not a GGUF file: magic {magic!r}, expected {MAGIC!r}")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        raise GGUFError(cur.thing, "big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(cur.thing, f"GGUF version {version} is not supported (supported: 2, 3)")
    # minimum sizes: a tensor info is name length + n_dims + type + offset (24 bytes), a kv 13 bytes
    tensor_count = cur.count("tensor count", min_item_bytes=24)
    kv_count = cur.count("metadata count", min_item_bytes=13)
    return version, tensor_count, kv_count


def _metadata(cur: _Cursor, kv_count: int) -> dict[str, MetaValue]:
    metadata: dict[str, MetaValue] = {}
    for index in range(kv_count):
        key = cur.text(f"metadata key #{index}")
        if key in metadata:
            raise GGUFError(cur.thing, f"duplicate metadata key {key!r}")
        metadata[key] = _value(cur, cur.u32(f"type of {key!r}"), f"metadata {key!r}")
    return metadata


def _alignment(thing: str, metadata: Mapping[str, MetaValue]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(thing, f"general.alignment must be a power of two, got {alignment!r:.40}")
    return alignment


def _qtype(thing: str, name: str, raw_type: int) -> gguf.GGMLQuantizationType:
    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFError(thing, f"tensor {name!r}: unknown quantization type {raw_type}") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise GGUFError(thing, f"tensor {name!r}: quantization type {qtype.name} has no known block size")
    return qtype


def _tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int]:
    name = cur.text(f"tensor name #{index}")
    n_dims = cur.u32(f"tensor {name!r} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(cur.thing, f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(cur.u64(f"tensor {name!r} dimension") for _ in range(n_dims))
    qtype = _qtype(cur.thing, name, cur.u32(f"tensor {name!r} type"))
    offset = cur.u64(f"tensor {name!r} offset")
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if dims[0] % block:
        raise GGUFError(
            cur.thing, f"tensor {name!r}: row of {dims[0]} values is not whole {qtype.name} blocks of {block}"
        )
    return name, dims, qtype, offset


def _place(thing: str, raw: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int]], *,
           data_start: int, alignment: int, file_size: int) -> list[GGUFTensorInfo]:
    """Absolute byte ranges, checked: aligned, inside the file, no overlaps, no duplicate names."""
    infos, seen = [], set()
    for name, dims, qtype, offset in raw:
        if name in seen:
            raise GGUFError(thing, f"duplicate tensor name {name!r}")
        seen.add(name)
        if offset % alignment:
            raise GGUFError(thing, f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(dims) // block * type_size  # Python ints: compared, never allocated
        begin = data_start + offset
        if begin + nbytes > file_size:
            raise GGUFError(
                thing, f"tensor {name!r}: data ends at byte {begin + nbytes}, past the end of the file ({file_size})"
            )
        infos.append(GGUFTensorInfo(name, qtype.name, dims, begin, begin + nbytes))
    ordered = sorted((t for t in infos if t.nbytes), key=lambda t: (t.begin, t.name))
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.begin < prev.end:
            raise GGUFError(thing, f"tensors {prev.name!r} and {cur.name!r} overlap")
    return sorted(infos, key=lambda t: t.name)  # deterministic


def _parse(thing: str, data: bytes, file_size: int) -> GGUFHeader:
    cur = _Cursor(thing, data, file_size)
    version, tensor_count, kv_count = _preamble(cur)
    metadata = _metadata(cur, kv_count)
    alignment = _alignment(thing, metadata)
    raw = [_tensor_info(cur, i) for i in range(tensor_count)]
    data_start = -(-cur.pos // alignment) * alignment
    if data_start > file_size:
        raise GGUFError(thing, f"truncated: the data section starts at byte {data_start}, the file has {file_size}")
    tensors = _place(thing, raw, data_start=data_start, alignment=alignment, file_size=file_size)
    return GGUFHeader(thing, version, alignment, data_start, file_size, dict(sorted(metadata.items())), tuple(tensors))


def parse_header(name: str, data: bytes, *, file_size: int) -> GGUFHeader:
    """Validate the header held in `data`, a prefix of a file of `file_size` bytes. Pure.

    Raises GGUFError when the bytes break the format, or when `data` ends before the tensor infos do
    (read more, or use `read_header`, which grows the prefix itself).
    """
    if len(data) > file_size:
        raise GGUFError(name, f"{len(data)} bytes given for a file of {file_size}")
    try:
        return _parse(name, data, file_size)
    except _NeedBytes as need:
        raise GGUFError(name, f"truncated: the header needs at least {need.end} bytes, {len(data)} given") from None
    except RecursionError:  # cannot happen under MAX_ARRAY_DEPTH; kept so bad bytes only ever raise GGUFError
        raise GGUFError(name, "metadata nested too deeply") from None


def _read(source: ByteSource, start: int, end: int) -> bytes:
    """source.read, with the source's own short-read error re-raised as a GGUFError."""
    try:
        return source.read(start, end)
    except SafetensorsError as exc:
        raise GGUFError(source.name, exc.reason) from None


def read_header(source: ByteSource, *, first_read: int = FIRST_READ_BYTES) -> GGUFHeader:
    """Read and validate the header of `source` by a growing prefix (see the module docstring)."""
    # 1. The first read: the whole header of a small GGUF, the preamble of every other.
    want = min(source.size, first_read)
    prefix = _read(source, 0, want)
    while True:
        try:
            return _parse(source.name, prefix, source.size)
        except _NeedBytes as need:
            # 2. Grow by x4 (or to what the parser asked for) and read only the new bytes.
            want = min(source.size, max(need.end, len(prefix) * GROWTH))
            if want > MAX_HEADER_BYTES:
                raise GGUFError(
                    source.name, f"header is over the {MAX_HEADER_BYTES}-byte cap (not a GGUF file?)"
                ) from None
            logger.debug("%s: GGUF header needs more than %d bytes, reading up to %d", source.name, len(prefix), want)
            prefix += _read(source, len(prefix), want)


# --- decoding ---------------------------------------------------------------------------------------


def dequantize(raw: bytes, qtype: str, shape: tuple[int, ...], *, name: str = "") -> np.ndarray:
    """Blocks of type `qtype` -> a new float32 array of numpy `shape` (last dim = whole blocks). Pure."""
    thing = name or "<gguf tensor>"
    try:
        kind = gguf.GGMLQuantizationType[qtype]
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
    except KeyError:
        raise GGUFError(thing, f"unknown quantization type {qtype!r}") from None
    if not shape or shape[-1] % block:
        raise GGUFError(thing, f"{qtype} shape {list(shape)}: the last dimension is not whole blocks of {block}")
    expected = math.prod(shape) // block * type_size
    if len(raw) != expected:
        raise GGUFError(thing, f"{qtype} {list(shape)} needs {expected} bytes but {len(raw)} were given")
    if qtype in _NUMPY_TYPES:
        return np.frombuffer(raw, dtype=_NUMPY_TYPES[qtype]).astype(np.float32).reshape(shape)
    if not expected:  # a dimension of 0: nothing to dequantize (and no row length to reshape by)
        return np.zeros(shape, dtype=np.float32)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, shape[-1] // block * type_size)
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf scales decode to NaN / inf, as in llama.cpp
            values = gguf.quants.dequantize(rows, kind)
    except NotImplementedError:
        raise GGUFError(thing, f"dequantizing {qtype} is not supported by the gguf package") from None
    # F32 comes back as a read-only view of `raw`: copy, so every caller gets a new writable array
    return np.array(values, dtype=np.float32, copy=True).reshape(shape)


def _row_range(source: ByteSource, info: GGUFTensorInfo,
               rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    if rows is None:
        return info.begin, info.end, info.shape
    r0, r1 = rows
    if len(info.shape) < 2:
        raise GGUFError(source.name, f"tensor {info.name!r} is 1-D: it has no rows to slice")
    if not 0 <= r0 <= r1 <= info.shape[0]:
        raise GGUFError(source.name, f"tensor {info.name!r}: rows [{r0}, {r1}) outside its {info.shape[0]} rows")
    return info.begin + r0 * info.row_bytes, info.begin + r1 * info.row_bytes, (r1 - r0, *info.shape[1:])


def read_tensor(source: ByteSource, info: GGUFTensorInfo, *, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor (or rows [r0, r1) along numpy dim 0) as float32, in one read of exactly its bytes."""
    start, end, shape = _row_range(source, info, rows)
    return dequantize(_read(source, start, end), info.qtype, shape, name=f"{source.name}: {info.name}")


def predicted_relative_error(qtype: str) -> float:
    """RMS relative error that quantizing to `qtype` predicts (QUANT_RELATIVE_ERROR); unknown types raise."""
    try:
        return QUANT_RELATIVE_ERROR[qtype]
    except KeyError:
        known = ", ".join(sorted(QUANT_RELATIVE_ERROR))
        raise GGUFError(qtype, f"no predicted error for this quantization type (known: {known})") from None


# --- Hugging Face names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFName:
    """Where a GGUF tensor sits in the Hugging Face checkpoint of the same model."""

    gguf_name: str
    hf_name: str
    transposed: bool  # HF stores it transposed (GPT-2 Conv1D): W_hf = W_gguf.T
    heads: int | None  # llama q/k: rows permuted by the converter within each of this many heads
    qkv_heads: tuple[int, int] | None = None  # fused q/k/v (GPT-NeoX, BLOOM, Falcon): (heads, kv heads);
    # HF rows by kv group (its q heads, then its k and v), GGUF rows by part
    # rows (first, count) of the tensor seen as (-1, ne0) (a bias: its elements): one expert of a stacked MoE
    # tensor (blk.N.ffn_gate_exps: (experts, I, H)), or FLUX's q, k or v of a fused q/k/v (sketches.flux)
    part: tuple[int, int] | None = None
    # the tensor's own numpy shape when its converter flattened it (ComfyUI-GGUF's comfy.gguf.orig_shape.*)
    shape: tuple[int, ...] | None = None


# HF names each naming family uses; among gguf's aliases for a tensor (all architectures' spellings) the
# first in gguf's own order that matches wins. Decoders of the llama family (llama, mistral, qwen2,
# gemma, phi3 ...) share the `model.layers.N` spelling.
_DECODER_STYLE = (r"model\.layers\.\d+\.(self_attn\.|mlp\.|input_layernorm$|post_attention_layernorm$)",
                  r"model\.(embed_tokens|norm)$", r"lm_head$")
_GPT2_STYLE = (r"transformer\.h\.\d+\.(attn\.|mlp\.|ln_1$|ln_2$)", r"transformer\.(wte|wpe|ln_f)$", r"lm_head$")
_NEOX_STYLE = (r"gpt_neox\.layers\.\d+\.", r"gpt_neox\.(embed_in|final_layer_norm)$", r"embed_out$")
_BLOOM_STYLE = (r"transformer\.h\.\d+\.(self_attention\.|mlp\.dense_|input_layernorm$|post_attention_layernorm$"
                r"|ln_attn$|ln_mlp$)", r"transformer\.(word_embeddings|word_embeddings_layernorm|ln_f)$", r"lm_head$")
# Encoders llama.cpp converts for embeddings (BertModel: BERT, RoBERTa, XLM-R, CamemBERT; NomicBertModel:
# nomic-embed-text), as their HF checkpoints name them
_BERT_STYLE = (r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.(dense|LayerNorm))|intermediate\.dense"
               r"|output\.(dense|LayerNorm))$", r"embeddings\.(word_embeddings|token_type_embeddings|position_embeddings"
               r"|LayerNorm)$")
_NOMIC_STYLE = (r"encoder\.layers\.\d+\.(attn\.(Wqkv|out_proj)|mlp\.fc1[12]|mlp\.fc2|norm[12])$",
                r"embeddings\.(word_embeddings|token_type_embeddings)$", r"emb_ln$")
# T5 (llama.cpp's T5Model / T5EncoderModel: the text encoders FLUX and SD3 pipelines load as GGUF)
_T5_STYLE = (r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.", r"(encoder|decoder)\.final_layer_norm$", r"shared$",
             r"lm_head$")
_STYLES: dict[str, tuple[str, ...]] = {"gpt2": _GPT2_STYLE, "gptneox": _NEOX_STYLE, "bloom": _BLOOM_STYLE,
                                       "falcon": _BLOOM_STYLE, "bert": _BERT_STYLE, "nomic-bert": _NOMIC_STYLE,
                                       "t5": _T5_STYLE, "t5encoder": _T5_STYLE,
                                       "starcoder": _GPT2_STYLE}  # GPTBigCode: GPT-2's names, nn.Linear layers
# A fused query_key_value holds, per kv group, its q heads' rows, then its k and v rows (GPT-NeoX and
# BLOOM: one q head a group; Falcon: head_count / head_count_kv); the converters (GPTNeoXModel, BloomModel,
# FalconModel.modify_tensors) regroup the rows as all q, then all k, then all v.
FUSED_QKV_ARCHITECTURES = frozenset({"gptneox", "bloom", "falcon"})
# GPT-2's Conv1D layers store (in, out); convert_hf_to_gguf.py transposes them to (out, in). GPTBigCode
# (StarCoder) has the same names on nn.Linear layers: not transposed.
_TRANSPOSED = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Architectures whose converter (LlamaModel.permute) reorders q/k rows: convert_hf_to_gguf.py's LlamaModel
# (llama, and Mistral / Mixtral converted from HF files) and its subclasses that keep `undo_permute`
# (GraniteModel, GraniteMoeModel, SmolLM3Model, ArceeModel, LlamaEmbedNemotronModel, AfmoeModel), and
# MiniCPMModel, which permutes in its own modify_tensors. Llama 4, Apertus and Mistral-format checkpoints
# (consolidated.safetensors: arch mistral3, or llama with `permuted=False`) are not permuted.
PERMUTED_ARCHITECTURES = frozenset({"llama", "granite", "granitemoe", "smollm3", "arcee", "llama-embed", "afmoe",
                                    "minicpm"})
_SUFFIXES = (".weight", ".bias")
# Stacked MoE experts (convert_hf_to_gguf.py stacks Mixtral's w1 / w3 / w2, Qwen-MoE's gate / up / down of
# every expert into one tensor of numpy shape (experts, out, in)): one HF matrix per expert, under the
# names sketches.experts gives every MoE layout.
_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps$")


@cache
def _reverse_map(arch: str, n_blocks: int) -> dict[str, str]:
    """gguf name (no suffix) -> HF name (no suffix) for `arch`, per gguf.TensorNameMap."""
    kinds = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not kinds:
        return {}
    styles = [re.compile(p) for p in _STYLES.get(arch, _DECODER_STYLE)]
    reverse: dict[str, str] = {}
    for key, (_, gguf_name) in gguf.TensorNameMap(kinds[0], n_blocks).mapping.items():
        if key == gguf_name or gguf_name in reverse or "_exps" in gguf_name or key.endswith("_no_perm"):
            continue  # identity entries; first alias wins; stacked MoE experts have no 1:1 HF tensor
        if any(s.match(key) for s in styles):
            reverse[gguf_name] = key
    return reverse


# The names llama.cpp's converter was measured to write (bench/gguf_converter.py: small models of each
# transformers type converted by convert_hf_to_gguf's own classes, every GGUF tensor matched to the source
# tensor it came from). gguf's TensorNameMap lists every spelling of a tensor across architectures; only the
# converter says which one an architecture's checkpoints use (Qwen3's `q_norm`, not Persimmon's
# `q_layernorm`; Phi-3's fused `qkv_proj`; Mamba's `backbone.layers.N.mixer.*`), and which tensors it rewrites.
MEASURED_NAMES = Path(__file__).with_name("gguf_names.json")
MEASURED_NAMES_VERSION = 1
# how a tensor's values relate to the source tensor of that name; only these are read (the others: "reshaped",
# "changed", "unmatched", "ambiguous"); "regrouped": a fused q/k/v by part (FUSED_QKV_ARCHITECTURES' rows)
_READ_AS = frozenset({"exact", "permuted", "transposed", "regrouped"})


@cache
def _measured_table() -> dict[str, dict[str, tuple[str | None, str]]]:
    """The whole table, read once: {architecture: {GGUF name template: (HF name template, relation)}}."""
    table = json.loads(MEASURED_NAMES.read_text(encoding="utf-8"))
    if table.get("version") != MEASURED_NAMES_VERSION:
        raise GGUFError(str(MEASURED_NAMES), f"version {table.get('version')!r}, this reader knows {MEASURED_NAMES_VERSION}")
    return {arch: {g: (e["hf"], e["values"]) for g, e in names.items()} for arch, names in table["architectures"].items()}


def _measured(arch: str) -> dict[str, tuple[str | None, str]]:
    """{GGUF name template ("blk.{bid}." for a block): (HF name template, how its values relate)} for `arch`."""
    return _measured_table().get(arch, {})


def _measured_name(arch: str, name: str) -> tuple[str | None, str] | None:
    """(HF name, how its values relate) of a GGUF tensor, as the converter was seen to write it (HF name None:
    made from several tensors, or changed past recognition); None when the table has no such tensor (then
    gguf's name map and the architecture's naming style decide)."""
    block = re.match(r"blk\.(\d+)\.", name)
    entry = _measured(arch).get("blk.{bid}." + name[block.end():] if block else name)
    if entry is None:
        return None
    hf, values = entry
    return (hf.replace("{bid}", block.group(1)) if block and hf else hf), values


def _int_meta(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(key)
    return value if type(value) is int and value > 0 else None


def _heads_meta(header: GGUFHeader, key: str) -> Callable[[int], int | None]:
    """A head count by block (None: not recorded): one number for every block, or (hybrids: Nemotron-H,
    Granite 4.0-H, whose SSM blocks have none) an array of one per block."""
    value = header.metadata.get(key)
    if type(value) is int and value > 0:
        return lambda block: value
    if isinstance(value, tuple) and value and all(type(v) is int and v >= 0 for v in value):
        return lambda block: (value[block] or None) if block < len(value) else None
    return lambda block: None


def hf_names(header: GGUFHeader, *, permuted: bool | None = None) -> dict[str, HFName]:
    """GGUF tensor name -> its Hugging Face name, for the tensors gguf's name map knows (sorted).

    `permuted` overrides whether llama's q/k rows are in llama.cpp's order (default: the architecture
    says). Tensors with no HF counterpart (rope tables) are left out; a stacked MoE tensor is one HF
    matrix per expert (keys `<gguf name>#<expert>`, `HFName.expert`).
    """
    if is_bfl_flux(header.names()) or header.architecture == "flux":
        return _flux_names(header)
    if is_sd3(header.names()) or header.architecture == "sd3":
        return _sd3_names(header)
    if header.architecture in COMFY_ARCHITECTURES:
        return _comfy_names(header)
    arch = header.architecture
    n_blocks = _int_meta(header, f"{arch}.block_count") or 1 + max(
        (int(m.group(1)) for t in header.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))), default=-1
    )
    reverse = _reverse_map(arch, n_blocks)
    if arch in ("t5", "t5encoder") and any(".ffn_gate" in t.name for t in header.tensors):
        # T5 v1.1's gated feed-forward: ffn_gate is wi_0, ffn_up wi_1 (gguf's first alias, `wi`, is T5 v1.0's)
        reverse = {g: re.sub(r"\.wi$", ".wi_1", h) for g, h in reverse.items()}
    permute = arch in PERMUTED_ARCHITECTURES if permuted is None else permuted
    n_head = _heads_meta(header, f"{arch}.attention.head_count")
    n_kv = _heads_meta(header, f"{arch}.attention.head_count_kv")
    names: dict[str, HFName] = {}
    for info in header.tensors:
        stem, suffix = _split_suffix(info.name)
        if (stacked := _EXPERTS.match(stem)) and len(info.shape) == 3 and suffix == ".weight":
            rows = info.shape[1]
            # the spelling this architecture's experts were measured under (Jamba's feed_forward.experts.E,
            # Nemotron-H's mixer.experts.E), else the one sketches.experts gives every MoE layout
            entry = _measured(arch).get("blk.{bid}." + info.name[len(f"blk.{stacked.group(1)}."):])
            if entry is not None and entry[0] is None:
                continue  # measured as no source matrix's (gpt-oss / Llama 4 store (E, H, 2I), not split here)
            template = entry[0] if entry else f"model.layers.{{bid}}.mlp.experts.{{xid}}.{stacked.group(2)}_proj.weight"
            for e in range(info.shape[0]):
                hf = template.replace("{bid}", stacked.group(1)).replace("{xid}", str(e))
                names[f"{info.name}#{e}"] = HFName(info.name, hf, False, None, part=(e * rows, rows))
            continue
        measured = _measured_name(arch, info.name)
        if measured is not None and measured[1] not in _READ_AS:
            continue  # values the converter rewrote (Gemma's norms + 1, Mamba's -exp(A_log), a squeezed conv, MLA's kv_b split)
        if measured is None and stem not in reverse:
            continue
        # how the values relate: as measured, else as the architecture's converter is known to write them
        hf, relation = measured or (reverse[stem] + suffix, None)
        if relation is None:
            relation = ("transposed" if arch == "gpt2" and _TRANSPOSED.match(hf) else "permuted" if permute
                        else "regrouped" if arch in FUSED_QKV_ARCHITECTURES else "exact")
        elif permuted is not None and relation in ("permuted", "exact"):
            relation = "permuted" if permuted else "exact"  # the caller knows (a Mistral-format conversion)
        block = int(m.group(1)) if (m := re.match(r"blk\.(\d+)\.", stem)) else 0
        q_heads = n_head(block)
        kv_heads = n_kv(block) or q_heads
        heads = None
        if relation == "permuted" and q_heads and re.search(r"\.attn_[qk]$", stem):
            heads = q_heads if stem.endswith("attn_q") else kv_heads
        fused = (q_heads, kv_heads) if relation == "regrouped" and q_heads and stem.endswith(".attn_qkv") else None
        names[info.name] = HFName(info.name, hf, relation == "transposed", heads, fused)
    return names


def _flux_names(header: GGUFHeader) -> dict[str, HFName]:
    """A FLUX GGUF (city96's ComfyUI-GGUF files: the original layout's names, architecture `flux`) as the
    diffusers transformer, q / k / v split by rows (`sketches.flux.flux_parts`), as its safetensors are read."""
    prefix = COMFY if any(t.name.startswith(COMFY) for t in header.tensors) else ""
    inner = flux_inner({t.name.removeprefix(prefix): t.shape for t in header.tensors})
    return _split_names(header, prefix, "FLUX", lambda name, rows: flux_parts(name, rows, inner))


def _sd3_names(header: GGUFHeader) -> dict[str, HFName]:
    """An SD3 / SD3.5 GGUF (city96's: Stability AI's names, architecture `sd3`) as the diffusers transformer,
    q / k / v split by rows (`sketches.sd3.sd3_parts`), as its safetensors are read."""
    prefix = SD3_PREFIX if any(t.name.startswith(SD3_PREFIX) for t in header.tensors) else ""
    blocks = [int(m.group(1)) for t in header.tensors if (m := re.match(r"joint_blocks\.(\d+)\.", t.name.removeprefix(prefix)))]
    last = max(blocks, default=0)
    return _split_names(header, prefix, "SD3", lambda name, rows: sd3_parts(name, rows, last))


# ComfyUI-GGUF's image architectures (city96's loader.py IMG_ARCH_LIST, FLUX and SD3 read above with their
# diffusers maps): its converter keeps the source checkpoint's own tensor names (under an optional
# `model.diffusion_model.`) and flattens a tensor whose last dimension is no multiple of 256 -- conv kernels,
# a 5-D patch embedding, which GGUF cannot hold -- to rows of 256, its shape kept in the metadata key
# `comfy.gguf.orig_shape.<name>`. SD 1.x / SDXL UNets are LDM names, read under diffusers' (`sketches.ldm`), as
# their single-file safetensors are.
COMFY_ARCHITECTURES = frozenset({"sd1", "sdxl", "aura", "hidream", "cosmos", "ltxv", "ltx2", "hyvid", "wan",
                                 "lumina2", "qwen_image"})
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _comfy_names(header: GGUFHeader) -> dict[str, HFName]:
    unet = unet_names(LDM_UNET + t.name.removeprefix(LDM_UNET) for t in header.tensors) if header.architecture in (
        "sd1", "sdxl") else {}
    names = {}
    for info in header.tensors:
        hf = unet.get(LDM_UNET + info.name.removeprefix(LDM_UNET), info.name)
        names[info.name] = HFName(info.name, hf, False, None, shape=_orig_shape(header, info))
    return names


def _orig_shape(header: GGUFHeader, info: GGUFTensorInfo) -> tuple[int, ...] | None:
    """The numpy shape ComfyUI-GGUF's converter recorded for a tensor it flattened, checked against its values."""
    value = header.metadata.get(ORIG_SHAPE_KEY + info.name)
    if value is None:
        return None
    if not isinstance(value, tuple) or not value or not all(type(d) is int and d > 0 for d in value):
        raise GGUFError(header.name, f"{ORIG_SHAPE_KEY}{info.name} must be an array of positive dimensions, got "
                                     f"{value!r:.60}")
    if math.prod(value) != info.numel:
        raise GGUFError(header.name, f"{ORIG_SHAPE_KEY}{info.name}: shape {list(value)} holds {math.prod(value)} "
                                     f"values, the tensor {info.numel}")
    return value


def _read_reshaped(source: ByteSource, info: GGUFTensorInfo, shape: tuple[int, ...],
                   rows: tuple[int, int] | None) -> np.ndarray:
    """Rows of a flattened tensor in its recorded shape: the stored rows that hold their values, cut."""
    r0, r1 = (0, shape[0]) if rows is None else rows
    if not 0 <= r0 <= r1 <= shape[0]:
        raise GGUFError(source.name, f"tensor {info.name!r}: rows [{r0}, {r1}) outside its {shape[0]} rows")
    inner = math.prod(shape[1:])
    if len(info.shape) < 2:
        flat = read_tensor(source, info).reshape(-1)[r0 * inner : r1 * inner]
    else:
        width = math.prod(info.shape[1:])
        first = r0 * inner // width
        stored = read_tensor(source, info, rows=(first, -(-r1 * inner // width))).reshape(-1)
        start = r0 * inner - first * width
        flat = stored[start : start + (r1 - r0) * inner]
    return np.ascontiguousarray(flat.reshape(r1 - r0, *shape[1:]))


def _split_names(header: GGUFHeader, prefix: str, kind: str,
                 parts_of: Callable[[str, int], list[tuple[str, tuple[int, int] | None]]]) -> dict[str, HFName]:
    """A diffusion transformer's GGUF in its original layout: each tensor as the diffusers tensors it holds
    (`parts_of(name without prefix, rows)`), a fused one by row ranges."""
    names: dict[str, HFName] = {}
    for info in header.tensors:
        try:
            parts = parts_of(info.name.removeprefix(prefix), info.shape[0] if info.shape else 0)
        except ValueError as exc:
            raise GGUFError(header.name, f"tensor {info.name!r}: a {kind} tensor that does not split: {exc}") from None
        for hf, part in parts:
            names[f"{info.name}#{hf}"] = HFName(info.name, hf, False, None, part=part)
    return dict(sorted(names.items()))


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _gguf_rows(hf_rows: np.ndarray, heads: int, n_rows: int) -> np.ndarray:
    """GGUF row of each HF row of a q/k matrix permuted by the converter.

    permute() views the rows as (heads, 2, d/2) and swaps the last two axes, so HF row h*d + j*(d/2) + i
    (j in {0, 1}: first or second half of the head) is GGUF row h*d + 2*i + j.
    """
    d = n_rows // heads
    head, rem = np.divmod(hf_rows, d)
    half, i = np.divmod(rem, d // 2)
    return head * d + 2 * i + half


def _qkv_rows(hf_rows: np.ndarray, heads: int, kv: int, n_rows: int) -> np.ndarray:
    """GGUF row of each HF row of a fused q/k/v matrix. HF row g*(q+2)d + j*d + i (kv group g of q = heads/kv
    q heads, then its k and v; row i of the head) is GGUF row (g*q + j)*d + i for a q head (j < q), heads*d +
    g*d + i for its k, (heads + kv)*d + g*d + i for its v."""
    d = n_rows // (heads + 2 * kv)
    q = heads // kv
    group, rem = np.divmod(hf_rows, (q + 2) * d)
    j, i = np.divmod(rem, d)
    return np.where(j < q, (group * q + j) * d + i, np.where(j == q, heads * d, (heads + kv) * d) + group * d + i)


def _row_order(source: ByteSource, info: GGUFTensorInfo, name: HFName) -> np.ndarray | None:
    """GGUF row of each HF row when the converter reordered them, else None; raises when the heads do not
    divide the rows as the reorder needs."""
    n_rows = info.shape[0]
    if name.heads is not None:
        if n_rows % name.heads or (n_rows // name.heads) % 2:
            raise GGUFError(source.name, f"tensor {info.name!r}: {n_rows} rows do not split into {name.heads} "
                                         "heads of even size")
        return _gguf_rows(np.arange(n_rows), name.heads, n_rows)
    if name.qkv_heads is not None:
        heads, kv = name.qkv_heads
        if heads % kv or n_rows % (heads + 2 * kv):
            raise GGUFError(source.name, f"tensor {info.name!r}: {n_rows} rows are not q, k and v of {heads} "
                                         f"heads in {kv} kv groups")
        return _qkv_rows(np.arange(n_rows), heads, kv, n_rows)
    return None


def read_hf_tensor(source: ByteSource, header: GGUFHeader, name: HFName, *,
                   rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor in the Hugging Face layout (q/k rows un-permuted, fused q/k/v rows regrouped by head,
    Conv1D transposed back), float32.

    `rows` are HF rows. Reordered rows are read as the runs of GGUF rows that hold them: a permuted q/k one
    span (at most 2x the rows asked, or whole heads), a fused q/k/v one span per part; a transposed tensor
    or a 1-D one is read whole, then sliced.
    """
    info = header.get(name.gguf_name)
    if name.shape is not None:
        return _read_reshaped(source, info, name.shape, rows)
    if name.part is not None:
        info = part_info(info, *name.part)
    n_rows = info.shape[0]
    order = _row_order(source, info, name)
    if name.transposed or len(info.shape) < 2:
        full = read_tensor(source, info)
        if name.transposed:
            full = full.T.copy()
        elif order is not None:  # a bias: reordered like the rows of its matrix
            full = full[order]
        return full if rows is None else _slice_rows(source.name, info.name, full, rows)
    if order is None:
        return read_tensor(source, info, rows=rows)
    r0, r1 = (0, n_rows) if rows is None else rows
    _row_range(source, info, (r0, r1))  # validates
    wanted = order[r0:r1]
    if not len(wanted):
        return np.empty((0, *info.shape[1:]), dtype=np.float32)
    return _read_runs(source, info, wanted)


def part_info(info: GGUFTensorInfo, first: int, rows: int) -> GGUFTensorInfo:
    """Rows [first, first + rows) of a tensor seen as (-1, ne0) (a 1-D tensor: its elements) as a tensor of
    its own: rows are whole blocks of the file (ne0 is a multiple of the block), so its bytes are one range."""
    total = math.prod(info.dims[1:]) if len(info.dims) > 1 else info.dims[0]
    if rows < 1 or not 0 <= first <= total - rows:
        raise GGUFError(info.name, f"rows [{first}, {first + rows}) outside a tensor of dims {info.dims}")
    size = info.nbytes // total
    begin = info.begin + first * size
    dims = (info.dims[0], rows) if len(info.dims) > 1 else (rows,)
    return replace(info, name=f"{info.name}#{first}", dims=dims, begin=begin, end=begin + rows * size)


def hf_shape(header: GGUFHeader, name: HFName) -> tuple[int, ...]:
    """The shape of the Hugging Face tensor `name` reads (a part's rows; a transposed tensor's shape)."""
    if name.shape is not None:
        return name.shape
    info = header.get(name.gguf_name)
    shape = part_info(info, *name.part).shape if name.part is not None else info.shape
    return tuple(reversed(shape)) if name.transposed else tuple(shape)


def _read_runs(source: ByteSource, info: GGUFTensorInfo, wanted: np.ndarray) -> np.ndarray:
    """The GGUF rows `wanted`, in that order: one read per run of them, a run ending where the next row is
    further on than the rows asked (a q/k permutation is one run; fused q/k/v, one run per part)."""
    ranked = np.sort(wanted)
    cuts = np.flatnonzero(np.diff(ranked) > max(1, len(wanted))) + 1
    found: dict[int, np.ndarray] = {}
    for run in np.split(ranked, cuts):
        lo, hi = int(run[0]), int(run[-1]) + 1
        block = read_tensor(source, info, rows=(lo, hi))
        found.update({int(r): block[r - lo] for r in run})
    return np.stack([found[int(r)] for r in wanted])


def _slice_rows(thing: str, tensor: str, full: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
    r0, r1 = rows
    if not 0 <= r0 <= r1 <= full.shape[0]:
        raise GGUFError(thing, f"tensor {tensor!r}: rows [{r0}, {r1}) outside its {full.shape[0]} rows")
    return full[r0:r1].copy()


def declared_base_models(header: GGUFHeader) -> tuple[str, ...]:
    """The parents the file declares (`general.base_model.N.repo_url` or organization/name), in order.

    Declared, so audited, never trusted (DESIGN.md): shown beside the recovered parent.
    """
    count = header.metadata.get("general.base_model.count")
    bases: list[str] = []
    for i in range(count if type(count) is int and 0 < count <= MAX_KEPT_ARRAY else 0):
        prefix = f"general.base_model.{i}."
        url, org, name = (header.metadata.get(prefix + k) for k in ("repo_url", "organization", "name"))
        if isinstance(url, str) and url:
            bases.append(url.removeprefix("https://huggingface.co/"))
        elif isinstance(name, str) and name:
            bases.append(f"{org}/{name}" if isinstance(org, str) and org else name)
    return tuple(bases)


# --- gguf-split sets ------------------------------------------------------------------------------------

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


def merge_split(headers: Sequence[GGUFHeader]) -> GGUFHeader:
    """One view of a gguf-split set, its shards' headers in file order: the first shard's metadata (the only
    one with the model's: architecture, heads, tokenizer) and every shard's tensor infos, sorted by name.

    The view is for names and shapes: each tensor's byte range is in its own shard's file, so read it with
    that shard's header and source. Raises GGUFError naming the shard when the files are not one set: a
    `split.count` other than the number of files, a `split.no` other than the shard's place, a tensor in two
    shards, or fewer or more tensors than the first shard's `split.tensors.count`.
    """
    if not headers:
        raise ValueError("merge_split needs the headers of at least one shard")
    holder: dict[str, str] = {}
    for index, header in enumerate(headers):
        _check_place(header, index, len(headers))
        for info in header.tensors:
            if info.name in holder:
                raise GGUFError(header.name, f"tensor {info.name!r} is also in {holder[info.name]}: "
                                             "the shards are not one gguf-split set")
            holder[info.name] = header.name
    first = headers[0]
    declared = first.metadata.get(SPLIT_TENSORS)
    if type(declared) is int and declared != len(holder):
        raise GGUFError(first.name, f"{SPLIT_TENSORS} is {declared} but the {len(headers)} shards hold "
                                    f"{len(holder)} tensors (a shard from another set?)")
    tensors = tuple(sorted((t for h in headers for t in h.tensors), key=lambda t: t.name))  # deterministic
    return GGUFHeader(first.name, first.version, first.alignment, sum(h.data_start for h in headers),
                      sum(h.file_size for h in headers), first.metadata, tensors)


def _check_place(header: GGUFHeader, index: int, count: int) -> None:
    """Shard `index` (0-based) of `count` says so in its own split KVs."""
    of, no = header.metadata.get(SPLIT_COUNT), header.metadata.get(SPLIT_NO)
    if type(of) is not int or of != count:
        raise GGUFError(header.name, f"{SPLIT_COUNT} is {of!r} but the set has {count} files")
    if type(no) is not int or no != index:
        raise GGUFError(header.name, f"{SPLIT_NO} is {no!r} but this is file {index + 1} of {count} "
                                     f"(expected {index})")
