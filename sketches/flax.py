"""Flax checkpoints of `transformers` models (`flax_model.msgpack`), read without JAX or Flax.

The JAX/Flax community sprints (2021) left Flax-only fine-tunes on the Hub, their bases PyTorch models.
`FlaxPreTrainedModel.save_pretrained` writes `flax.serialization.to_bytes(params)`: one msgpack document, the
parameter tree as nested maps (`{"bert": {"encoder": {"layer": {"0": {"attention": {"self": {"query":
{"kernel": <array>}}}}}}}}`), each array a msgpack extension of type 1 whose payload is itself msgpack:
`[shape, dtype name, raw bytes in C order]`. Nothing in it is code.

msgpack has no index, so the file is walked: every map key and extension header is read, every array's bytes
are skipped by their length (`_Walker`, over the same page cache as `sketches.tfh5`): a remote file costs one
range request per page touched, about one per tensor. An array's bytes are then read by range at their
offset, as a safetensors tensor's are (`sketches.tfh5.read_tensor`).

Names map to PyTorch's as transformers' own Flax -> PyTorch loader maps them
(`modeling_flax_pytorch_utils.load_flax_weights_in_pytorch_model`): the tree path joined with dots; a last
level `kernel` becomes `weight`, transposed (a 4-D kernel (kh, kw, in, out) to (out, in, kh, kw)); `scale` and
`embedding` become `weight`; batch norm's `mean` / `var` become `running_mean` / `running_var`.

Refused in one line naming the file: a document that is not a map of maps and arrays, an extension of another
type, an array of a type a weights file does not hold, and Flax's chunked arrays (tensors over 1 GiB, split
into `__msgpack_chunked_array__` maps: not read yet).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator

import numpy as np

from errors import SafetensorsError
from sketches.safetensors import ByteSource
from sketches.tfh5 import ConvertedWeights, PagedFile, StoredTensor

FLAX_FILE = "flax_model.msgpack"
MAX_DEPTH = 32  # a parameter tree is a dozen levels deep
_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
_DTYPES = {"float32": ("F32", "<f4"), "float16": ("F16", "<f2"), "bfloat16": ("BF16", "<u2"), "float64": ("F64", "<f8"),
           "int32": ("I32", "<i4"), "int64": ("I64", "<i8"), "int8": ("I8", "<i1"), "uint8": ("U8", "<u1"),
           "bool": ("BOOL", "<u1")}


class FlaxWeightsError(SafetensorsError):
    """A `flax_model.msgpack` that is not Flax's serialized parameter tree (named, with the reason)."""


def pt_name(path: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """transformers' Flax -> PyTorch name of a parameter at `path`, and the axes that give PyTorch's layout."""
    *stem, last = path
    axes = None
    if last == "kernel":
        last, axes = "weight", ((3, 2, 0, 1) if ndim == 4 else (1, 0) if ndim == 2 else None)
    elif last in ("scale", "embedding"):
        last = "weight"
    elif last in ("mean", "var") and stem and "batch_stats" in path:
        last = {"mean": "running_mean", "var": "running_var"}[last]
    return ".".join(p for p in (*stem, last) if p not in ("params", "batch_stats")), axes


class _Walker:
    """msgpack values read at a position of a PagedFile: headers and small values, never an array's bytes."""

    def __init__(self, thing: str, paged: PagedFile, size: int) -> None:
        self.thing, self.file, self.size = thing, paged, size

    def error(self, reason: str) -> FlaxWeightsError:
        return FlaxWeightsError(self.thing, reason)

    def read(self, n: int) -> bytes:
        data = self.file.read(n)
        if data is None or len(data) != n:
            raise self.error(f"truncated at byte {self.file.tell()}")
        return data

    def uint(self, size: int) -> int:
        return int.from_bytes(self.read(size), "big")

    def head(self) -> tuple[str, int]:
        """(kind, n) of the next value: map / array (n entries), str / bin (n bytes), ext (n payload bytes,
        its type read next), int (the value), nil / bool (0)."""
        b = self.read(1)[0]
        if b <= 0x7F:
            return "int", b
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        if b >= 0xE0:
            return "int", b - 0x100
        sized = {0xDE: ("map", 2), 0xDF: ("map", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xD9: ("str", 1),
                 0xDA: ("str", 2), 0xDB: ("str", 4), 0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
                 0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4), 0xCC: ("int", 1), 0xCD: ("int", 2),
                 0xCE: ("int", 4), 0xCF: ("int", 8)}
        if b in sized:
            kind, size = sized[b]
            return kind, self.uint(size)
        if 0xD4 <= b <= 0xD8:
            return "ext", 1 << (b - 0xD4)
        if 0xD0 <= b <= 0xD3:
            size = 1 << (b - 0xD0)
            return "int", int.from_bytes(self.read(size), "big", signed=True)
        if b in (0xC0, 0xC2, 0xC3):
            return "nil", 0
        raise self.error(f"byte 0x{b:02x} at {self.file.tell() - 1}: not a value a parameter tree holds")

    def text(self) -> str:
        kind, n = self.head()
        if kind != "str":
            raise self.error(f"a {kind} where a name was expected at byte {self.file.tell()}")
        return self.read(n).decode("utf-8", errors="replace")


def _array(w: _Walker, path: tuple[str, ...], length: int) -> StoredTensor:
    """An ndarray extension's payload `[shape, dtype name, bin]`: the tensor, its bytes left unread."""
    end = w.file.tell() + length
    kind, n = w.head()
    if kind != "array" or n != 3:
        raise w.error(f"{'/'.join(path)}: an ndarray extension that is not [shape, dtype, bytes]")
    kind, dims = w.head()
    if kind != "array":
        raise w.error(f"{'/'.join(path)}: its shape is not a list")
    shape = []
    for _ in range(dims):
        kind, value = w.head()
        if kind != "int" or value < 0:
            raise w.error(f"{'/'.join(path)}: its shape holds a {kind}")
        shape.append(value)
    dtype = w.text()
    if dtype not in _DTYPES:
        raise w.error(f"{'/'.join(path)}: element type {dtype!r} is not a number type of a weights file")
    kind, nbytes = w.head()
    stored, numpy_dtype = _DTYPES[dtype]
    if kind != "bin" or nbytes != math.prod(shape) * np.dtype(numpy_dtype).itemsize or w.file.tell() + nbytes != end:
        raise w.error(f"{'/'.join(path)}: {nbytes} bytes for a {dtype} array of shape {tuple(shape)}")
    name, axes = pt_name(path, len(shape))
    pt_shape = tuple(shape[a] for a in axes) if axes else tuple(shape)
    offset = w.file.tell()
    if offset + nbytes > w.size:
        raise w.error(f"truncated at byte {w.size}: {'/'.join(path)}'s {nbytes} bytes from byte {offset} end past it")
    w.file.seek(nbytes, 1)
    return StoredTensor(name, "/".join(path), stored, tuple(shape), pt_shape, axes, offset, numpy_dtype)


def _walk(w: _Walker, path: tuple[str, ...]) -> Iterator[StoredTensor]:
    """Every array of the map at the walker's position (its header read by the caller), depth first."""
    if len(path) > MAX_DEPTH:
        raise w.error(f"{'/'.join(path[:4])}/...: deeper than {MAX_DEPTH} levels")
    kind, n = w.head()
    if kind != "map":
        raise w.error(f"{'/'.join(path) or 'the document'}: a {kind}, not a map of parameters")
    for _ in range(n):
        key = w.text()
        if key == "__msgpack_chunked_array__":
            raise w.error(f"{'/'.join(path)}: a chunked array (a tensor over 1 GiB): not read")
        at = w.file.tell()
        kind, length = w.head()
        if kind == "ext":
            ext_type = struct.unpack(">b", w.read(1))[0]
            if ext_type != _NDARRAY_EXT:
                raise w.error(f"{'/'.join((*path, key))}: a msgpack extension of type {ext_type}, not an ndarray")
            yield _array(w, (*path, key), length)
        elif kind == "map":
            w.file.seek(at)
            yield from _walk(w, (*path, key))
        else:
            raise w.error(f"{'/'.join((*path, key))}: a {kind}, not an array or a map")


def read_index(source: ByteSource) -> dict[str, StoredTensor]:
    """{PyTorch name: tensor} of a Flax checkpoint, sorted; the arrays' bytes are not read."""
    walker = _Walker(source.name, PagedFile(source), source.size)
    tensors: dict[str, StoredTensor] = {}
    for t in _walk(walker, ()):
        if t.name in tensors:
            raise walker.error(f"two parameters map to the PyTorch name {t.name!r}")
        tensors[t.name] = t
    if walker.file.tell() != source.size:
        raise walker.error(f"{source.size - walker.file.tell()} bytes after the parameter tree")
    if not tensors:
        raise walker.error("no parameters in it")
    return dict(sorted(tensors.items()))


class FlaxWeights(ConvertedWeights):
    """A local `flax_model.msgpack` (`sketches.tfh5.ConvertedWeights`): walked on opening, read on `read`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from sketches.safetensors import FileSource

        source = FileSource(path)
        try:
            tensors = read_index(source)
        except BaseException:
            source.close()
            raise
        super().__init__(path, source, tensors)
