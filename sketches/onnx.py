"""ONNX exports of `transformers` models (`model.onnx`, `onnx/model_quantized.onnx`), read without onnx.

transformers.js and optimum put thousands of ONNX-only repos on the Hub (`Xenova/bert-base-uncased`,
`onnx-community/...`): `onnx/model.onnx` beside its F16 and 8-bit copies, config.json, no other weights,
their bases PyTorch models. An ONNX file is one protobuf `ModelProto`; its `graph` holds the nodes and the
weights (`initializer`, TensorProto: dims, data_type, name, raw_data). Nothing in it is code.

Protobuf has no index, so the file is walked (`_Fields`, over `sketches.tfh5.PagedFile`): every node is read
(a few hundred bytes each), every initializer's header fields are read and its `raw_data` skipped by its
length; a remote file costs one range request per page touched. A tensor's bytes are then read by range at
their offset, as a safetensors tensor's are (`sketches.tfh5.read_tensor`). A tensor stored outside the file
(`data_location` EXTERNAL: `model.onnx_data`, for files over 2 GiB) is read from the file it names.

Names map back to PyTorch's as PyTorch's exporter made them (`torch.onnx.export`, which optimum runs):
- a parameter used as it is keeps its name (`bert.embeddings.word_embeddings.weight`, biases, norms, a GPT-2
  Conv1D weight used by MatMul in its own (in, out) layout);
- a Linear's weight is folded into a transposed constant with no name of its own (`onnx::MatMul_292`, (in, out)):
  its name is the MatMul node's module path (`/bert/encoder/layer.0/attention/self/query/MatMul` ->
  `bert.encoder.layer.0.attention.self.query.weight`), transposed back;
- a Conv's kernel with the BatchNorm after it folded in (`onnx::Conv_81`: each output filter scaled by
  gamma / sqrt(var + eps), the BatchNorm's own tensors gone) is named from its Conv node the same way. Its
  values are not its source's, but its filters' directions are, and those are what conv kernels are compared
  by (the pair rule's unit filters): it joins its source's family;
- onnxruntime's quantizer (`quantize_dynamic`, transformers.js' `model_quantized` / `_int8` / `_uint8`) stores a
  weight `W` as `W_quantized` (int8 or uint8 codes), `W_scale` and `W_zero_point` (per tensor, or per output
  column for a MatMul's weight), and a Gemm's weight transposed first as `W_Transposed`. They are dequantized:
  W = (code - zero_point) * scale.
- onnxruntime's block quantizer (`MatMulNBitsQuantizer`, transformers.js' `model_q4` / `model_q4f16`) replaces a
  MatMul by MatMulNBits (attributes K, N, bits, block_size): its weight `<W>_Q4` is (N, blocks, block_size x bits
  / 8) bytes, `bits`-bit codes packed low bits first, each row of K inputs cut into blocks with a scale each
  (`<W>_scales`, (N, blocks)) and a zero point (`<W>_zero_points`, packed as the codes; absent: 2^(bits-1)):
  W[n, k] = (code - zero_point) * scale, (N, K): a Linear's own (out, in) layout; a named parameter used as
  it is (GPT-2's Conv1D, (in, out)) is transposed back. A row of the weight is a row of its codes, scales and
  zero points, so rows are read by range as a safetensors tensor's are.

Left out: initializers no rule names (folded shape constants, a folded Conv bias, an anonymous weight of a node
without a module path),
two tensors mapping to one name (both dropped: neither can be told apart), weights of ops not decoded here
(MatMulBnb4's NF4, MatMulNBits with float zero points or a g_idx) and of float8 / 4-bit element types (QDQ
int4, FP8): `skipped` in the details. Refused in one line naming the file: a
document that is not a ModelProto with a graph, a tensor whose bytes end past the file, an external file outside
the repo, a data type that is not a number.

Encoder-decoder models (t5, bart, marian, whisper: Xenova/opus-mt-*, onnx-community/whisper-*) are exported as
two graphs, read as one model (`choose_onnx_files`, `join_halves`): `encoder_model.onnx`, the encoder alone (its
weights named inside it: `block.0...`, given the prefix the decoder's names show), and `decoder_model.onnx` or
optimum's `decoder_model_merged.onnx`, the whole model run from the encoder's output. The merged file holds
the decoder twice, as the branches of an If node (subgraphs are walked for their nodes, MAX_GRAPH_DEPTH), over
main-graph weights renamed `<name>_merged_0`. The encoder's token embedding is the model's tied `shared`
one: read once. A sinusoidal position table (Marian's `embed_positions.weight`, which PyTorch recomputes and
never saves) is a constant of the export, not a weight: left out, counted (`skipped.sinusoidal`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from errors import SafetensorsError
from sketches.safetensors import ByteSource
from sketches.tfh5 import ConvertedWeights, PagedFile, StoredTensor, read_tensor

ONNX_SUFFIX = ".onnx"
# The files of one export that hold the model, best first: full precision, F16, then onnxruntime's 8-bit copies
# (transformers.js' names; optimum's `model_quantized.onnx`), then its 4-bit block ones. A repo without one of
# these (or an encoder's and a decoder's graph of one: `choose_onnx_files`) is not read.
ONNX_FILES = ("model.onnx", "model_fp16.onnx", "model_quantized.onnx", "model_int8.onnx", "model_uint8.onnx",
              "model_q4.onnx", "model_q4f16.onnx")
# a decoder-only model exported by an older optimum (Xenova/gpt2): `decoder_model*.onnx` is the whole model when
# no `encoder_model*.onnx` is beside it (an encoder-decoder's decoder is half of one: not read)
DECODER_FILES = (*(f"decoder_{name}" for name in ONNX_FILES),
                 *(f"decoder_model_merged{name[len('model'):]}" for name in ONNX_FILES))  # optimum's If of both
# TensorProto.data_type -> (safetensors dtype name, numpy dtype)
_DTYPES = {1: ("F32", "<f4"), 2: ("U8", "<u1"), 3: ("I8", "<i1"), 4: ("U16", "<u2"), 5: ("I16", "<i2"),
           6: ("I32", "<i4"), 7: ("I64", "<i8"), 9: ("BOOL", "<u1"), 10: ("F16", "<f2"), 11: ("F64", "<f8"),
           12: ("U32", "<u4"), 13: ("U64", "<u8"), 16: ("BF16", "<u2")}
_FLOATS = frozenset({"F32", "F16", "F64", "BF16"})
_NARROW_TYPES = frozenset(range(17, 29))  # FLOAT8E4M3FN .. FLOAT6E3M2: float8, 4-, 2- and 6-bit types (onnx >= 1.15)
# ops whose second input is a weight matrix, (in, out) unless a Gemm says transB; a Conv's is its kernel, as
# PyTorch stores it (with a BatchNorm after it folded in by the exporter: each output filter scaled)
_MATMUL_OPS = frozenset({"MatMul", "MatMulInteger", "Gemm"})
_WEIGHT_OPS = _MATMUL_OPS | {"Conv"}
_UNDECODED_OPS = frozenset({"MatMulBnb4", "MatMulFpQ4", "QOrderedMatMul"})
_BLOCK_OP = "MatMulNBits"
_BLOCK_BITS = frozenset({2, 4, 8})
_MERGED = re.compile(r"_merged_\d+$")
_POSITIONS = re.compile(r"(?:^|\.)embed_positions\.weight$")
_PARAMETER = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+)+$")  # a PyTorch parameter's dotted name
MAX_TEXT_BYTES = 1 << 16  # a name, an op type, a dims list: a few bytes (a Constant node's value is skipped, never read)
MAX_GRAPH_DEPTH = 4  # If / Loop bodies within bodies: optimum's merged decoder nests one level
MAX_SMALL_VALUES = 1 << 20  # varint-coded values (int32_data) decoded whole at most this many bytes


class OnnxWeightsError(SafetensorsError):
    """An ONNX file that is not an exported model this reader can read (named, with the reason)."""


@dataclass(frozen=True)
class OnnxTensor:
    """One weight of an ONNX file under its PyTorch name: the stored tensor (its bytes in `location`, None: the
    .onnx file itself) and, for onnxruntime's 8-bit weights, the scale and zero point that dequantize it."""

    stored: StoredTensor
    location: str | None = None
    scale: np.ndarray | None = None  # () per tensor, (n,) per column of the stored (in, out) matrix
    zero_point: np.ndarray | None = None
    axis: int = 1  # the stored axis a per-channel scale runs along
    blocks: BlockQuant | None = None  # MatMulNBits' codes: `stored` is then the dequantized (N, K) matrix


@dataclass(frozen=True)
class BlockQuant:
    """A MatMulNBits weight (module docstring): its codes are `OnnxTensor.stored`'s bytes, (N, blocks, blob)."""

    k: int
    n: int
    bits: int
    block_size: int
    scales: _Init
    scales_at: str | None  # the file holding the scales (None: the .onnx file)
    zeros: _Init | None
    zeros_at: str | None

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def row_bytes(self) -> int:  # codes of one output row
        return self.blocks * self.block_size * self.bits // 8

    @property
    def zero_row_bytes(self) -> int:
        return -(-self.blocks * self.bits // 8)


@dataclass(frozen=True)
class _Init:
    name: str
    dims: tuple[int, ...]
    data_type: int
    offset: int | None  # raw_data (or packed float_data) in the file
    nbytes: int
    small: np.ndarray | None  # values coded as varints (int32_data / int64_data), decoded
    external: dict[str, str]


@dataclass(frozen=True)
class _Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    ints: dict[str, int]


class _Fields:
    """Protobuf wire-format fields read at a position of a PagedFile, up to `end`; never a value's bytes
    unless asked."""

    def __init__(self, thing: str, paged: PagedFile) -> None:
        self.thing, self.file = thing, paged

    def error(self, reason: str) -> OnnxWeightsError:
        return OnnxWeightsError(self.thing, reason)

    def read(self, n: int) -> bytes:
        data = self.file.read(n)
        if data is None or len(data) != n:
            raise self.error(f"truncated at byte {self.file.tell()}")
        return data

    def short(self, length: int) -> bytes:
        """A short field of `length` bytes (a name, a packed dims list), refused when it is not short."""
        if length > MAX_TEXT_BYTES:
            raise self.error(f"a {length}-byte name or shape at byte {self.file.tell()}: not an ONNX model's")
        return self.read(length)

    def text(self, length: int) -> str:
        return self.short(length).decode("utf-8", errors="replace")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.read(1)[0]
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise self.error(f"a varint longer than 10 bytes at byte {self.file.tell()}")

    def fields(self, end: int) -> object:
        """(field number, wire type, value) up to `end`: a varint's value, a length-delimited field's
        (offset, length) with the file left at its first byte, a fixed field's bytes."""
        while self.file.tell() < end:
            key = self.varint()
            number, wire = key >> 3, key & 7
            if wire == 0:
                yield number, wire, self.varint()
            elif wire == 2:
                length = self.varint()
                at = self.file.tell()
                if at + length > end:
                    raise self.error(f"field {number} of {length} bytes at byte {at} ends past its message")
                yield number, wire, (at, length)
                self.file.seek(at + length)
            elif wire in (1, 5):
                yield number, wire, self.read(8 if wire == 1 else 4)
            else:
                raise self.error(f"wire type {wire} at byte {self.file.tell()}: not a protobuf message")
        if self.file.tell() != end:
            raise self.error(f"a field runs past its message's end at byte {end}")


def _varints(data: bytes) -> list[int]:
    out, value, shift = [], 0, 0
    for b in data:
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            out.append(value)
            value, shift = 0, 0
    return out


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _node(f: _Fields, end: int, out: list[_Node], depth: int = 0) -> None:
    """Append the node at the file's position to `out`, then the nodes of its subgraphs (an If's branches:
    optimum's `decoder_model_merged.onnx` holds its whole decoder in two, over the main graph's weights)."""
    name, op, inputs, ints = "", "", [], {}
    nested: list[_Node] = []
    for number, wire, value in f.fields(end):
        if wire == 2 and number in (1, 3, 4):
            text = f.text(value[1])
            if number == 1:
                inputs.append(text)
            elif number == 3:
                name = text
            else:
                op = text
        elif wire == 2 and number == 5:  # an attribute: integer ones (transB, axis) and subgraphs are kept
            key, number_value = "", None
            for n2, w2, v2 in f.fields(value[0] + value[1]):
                if n2 == 1 and w2 == 2:
                    key = f.text(v2[1])
                elif n2 == 3 and w2 == 0:
                    number_value = _signed(v2)
                elif n2 in (6, 11) and w2 == 2:  # g, graphs: a GraphProto
                    if depth >= MAX_GRAPH_DEPTH:
                        raise f.error(f"subgraphs nested deeper than {MAX_GRAPH_DEPTH} at byte {v2[0]}")
                    for n3, w3, v3 in f.fields(v2[0] + v2[1]):
                        if n3 == 1 and w3 == 2:
                            _node(f, v3[0] + v3[1], nested, depth + 1)
            if key and number_value is not None:
                ints[key] = number_value
    out.append(_Node(name, op, tuple(inputs), ints))
    out.extend(nested)


def _tensor(f: _Fields, end: int) -> _Init:
    name, dims, data_type, offset, nbytes, small, external = "", [], 0, None, 0, None, {}
    for number, wire, value in f.fields(end):
        if number == 1:  # dims: packed or one varint each
            dims += _varints(f.short(value[1])) if wire == 2 else [value]
        elif number == 2 and wire == 0:
            data_type = value
        elif number == 8 and wire == 2:
            name = f.text(value[1])
        elif number in (9, 4) and wire == 2:  # raw_data; float_data packed is the same bytes
            offset, nbytes = value
        elif number in (5, 7) and wire == 2:  # int32_data / int64_data: varints
            if value[1] > MAX_SMALL_VALUES:
                raise f.error(f"{name or 'a tensor'}: {value[1]} bytes of varint-coded values: not read")
            small = np.array([_signed(v) for v in _varints(f.read(value[1]))], dtype=np.int64)
        elif number == 13 and wire == 2:  # external_data: key / value entries
            key = text = ""
            for n2, w2, v2 in f.fields(value[0] + value[1]):
                if w2 == 2 and n2 in (1, 2):
                    s = f.text(v2[1])
                    key, text = (s, text) if n2 == 1 else (key, s)
            external[key] = text
    return _Init(name, tuple(_signed(d) for d in dims), data_type, offset, nbytes, small, external)


def _graph(thing: str, source: ByteSource) -> tuple[list[_Node], dict[str, _Init]]:
    """The main graph's nodes and initializers (their values left unread)."""
    f = _Fields(thing, PagedFile(source))
    graph = None
    for number, wire, value in f.fields(source.size):
        if number == 7 and wire == 2:
            graph = value
    if graph is None:
        raise f.error("no graph: not an ONNX model")
    f.file.seek(graph[0])
    nodes, inits = [], {}
    for number, wire, value in f.fields(graph[0] + graph[1]):
        if wire != 2:
            continue
        if number == 1:
            _node(f, value[0] + value[1], nodes)
        elif number == 5:
            init = _tensor(f, value[0] + value[1])
            inits[init.name] = init
    if not inits:
        raise f.error("no initializers: the graph holds no weights")
    return nodes, inits


def module_path(node_name: str) -> str | None:
    """`/bert/encoder/layer.0/attention/self/query/MatMul` -> `bert.encoder.layer.0.attention.self.query`. A
    called container (nn.Sequential) is a scope of its own before its children's `<name>.<i>`:
    `/layer/layer.0/convolution/Conv` -> `layer.0.convolution`."""
    parts = [p for p in node_name.split("/") if p]
    if not node_name.startswith("/") or len(parts) < 2:
        return None
    scopes = parts[:-1]
    kept = [p for p, after in zip(scopes, [*scopes[1:], ""], strict=True) if not after.startswith(f"{p}.")]
    return ".".join(kept)


def _stem(name: str) -> tuple[str, bool, bool]:
    """(the weight's own name, quantized, transposed by the quantizer) of an initializer name; optimum's
    merged decoder suffixes every weight `_merged_0`."""
    name = _MERGED.sub("", name)
    quantized = name.endswith("_quantized")
    stem = _MERGED.sub("", name[: -len("_quantized")]) if quantized else name
    transposed = stem.endswith("_Transposed")
    return (stem[: -len("_Transposed")] if transposed else stem), quantized, transposed


def _weights_of(nodes: list[_Node]) -> tuple[dict[str, _Node], set[str]]:
    """initializer -> the matmul node that takes it as its weight; and the initializers of undecoded ops."""
    used, undecoded = {}, set()
    for node in nodes:
        if node.op in _WEIGHT_OPS and len(node.inputs) > 1:
            used.setdefault(node.inputs[1], node)
        elif node.op in _UNDECODED_OPS and len(node.inputs) > 1:
            undecoded.add(node.inputs[1])
    return used, undecoded


def _pt_name(init: str, node: _Node | None) -> tuple[str | None, bool]:
    """(PyTorch name or None, stored transposed) of a weight initializer (module docstring)."""
    stem, _, transposed = _stem(init)
    named = _PARAMETER.match(stem) is not None
    if node is None:
        return (stem if named else None), False
    if named:  # a parameter used as it is (a Linear's in a Gemm, a Conv1D's in a MatMul): PyTorch's layout
        return stem, transposed  # but for the quantizer's own transpose of a Gemm's weight
    path = module_path(node.name)
    if path is None:
        return None, False
    as_stored = node.op == "Conv" or (node.op == "Gemm" and node.ints.get("transB", 0))
    return f"{path}.weight", not as_stored


def _stored(thing: str, init: _Init, name: str, transposed: bool, size: int | None) -> StoredTensor:
    if init.data_type not in _DTYPES:
        raise OnnxWeightsError(thing, f"{init.name}: data type {init.data_type} is not a number type of a weights file")
    dtype, numpy_dtype = _DTYPES[init.data_type]
    expected = math.prod(init.dims) * np.dtype(numpy_dtype).itemsize
    if init.offset is not None and init.nbytes != expected:
        raise OnnxWeightsError(thing, f"{init.name}: {init.nbytes} bytes for a {dtype} tensor of shape {init.dims}")
    if size is not None and init.offset is not None and init.offset + init.nbytes > size:
        raise OnnxWeightsError(thing, f"truncated: {init.name}'s bytes end past byte {size}")
    axes = (1, 0) if transposed and len(init.dims) == 2 else None
    shape = tuple(init.dims[a] for a in axes) if axes else init.dims
    return StoredTensor(name, init.name, dtype, init.dims, shape, axes, init.offset, numpy_dtype)


def _external(thing: str, init: _Init) -> tuple[str, _Init]:
    """(file, the tensor with its offset there) of a tensor stored outside the .onnx file."""
    location = init.external.get("location", "")
    if not location or location.startswith(("/", "\\")) or ".." in location.replace("\\", "/").split("/"):
        raise OnnxWeightsError(thing, f"{init.name}: external data at {location!r}: not a file beside the model")
    try:
        offset = int(init.external.get("offset", "0"))
        length = int(init.external["length"]) if "length" in init.external else None
    except ValueError:
        raise OnnxWeightsError(thing, f"{init.name}: external data offset / length are not integers") from None
    itemsize = np.dtype(_DTYPES.get(init.data_type, ("", "<u1"))[1]).itemsize
    nbytes = length if length is not None else math.prod(init.dims) * itemsize
    return location, replace(init, offset=offset, nbytes=nbytes)


def _small_value(thing: str, source_of: Callable[[str | None], ByteSource], init: _Init) -> np.ndarray:
    """A scale or zero point, whole (a scalar or one value per column)."""
    if init.data_type not in _DTYPES:
        raise OnnxWeightsError(thing, f"{init.name}: data type {init.data_type} is not a number type")
    if init.small is not None:
        if init.small.size != math.prod(init.dims):
            raise OnnxWeightsError(thing, f"{init.name}: {init.small.size} values for shape {init.dims}")
        return init.small.reshape(init.dims).astype(np.float64)
    location = None
    if init.external:
        location, init = _external(thing, init)
    if init.offset is None:
        raise OnnxWeightsError(thing, f"{init.name}: no values")
    numpy_dtype = np.dtype(_DTYPES[init.data_type][1])
    if init.nbytes != math.prod(init.dims) * numpy_dtype.itemsize or init.nbytes > MAX_SMALL_VALUES:
        raise OnnxWeightsError(thing, f"{init.name}: {init.nbytes} bytes for a scale or zero point of shape {init.dims}")
    raw = source_of(location).read(init.offset, init.offset + init.nbytes)
    values = np.frombuffer(raw, dtype=numpy_dtype)
    if _DTYPES[init.data_type][0] == "BF16":
        values = (values.astype("<u4") << 16).view("<f4")
    return values.reshape(init.dims).astype(np.float64)


def read_index(source: ByteSource, open_beside: Callable[[str], ByteSource] | None = None
               ) -> tuple[dict[str, OnnxTensor], dict[str, object]]:
    """({PyTorch name: tensor}, details) of an ONNX file, sorted; the weights' bytes are not read (scales and
    zero points are). `open_beside(file)` opens a file an external tensor names (None: such a file is refused)."""
    thing = source.name
    nodes, inits = _graph(thing, source)
    used, undecoded = _weights_of(nodes)

    def source_of(location: str | None) -> ByteSource:
        if location is None:
            return source
        if open_beside is None:
            raise OnnxWeightsError(thing, f"external data in {location!r}: not readable here")
        return open_beside(location)

    named: dict[str, list[OnnxTensor]] = {}
    # weights of ops not decoded here, and float8 / 4-bit element types (QDQ int4, FP8): left out, counted
    skipped = (undecoded & set(inits)) | {r for r, i in inits.items() if i.data_type in _NARROW_TYPES}
    codes = [raw[: -len("_quantized")] for raw in inits if raw.endswith("_quantized")]
    helpers = {f"{base}{suffix}" for base in codes for suffix in ("_scale", "_zero_point")}
    block_nodes = {n.inputs[1]: n for n in nodes if n.op == _BLOCK_OP and len(n.inputs) > 2 and n.inputs[1] in inits}
    helpers |= {i for n in block_nodes.values() for i in n.inputs[2:4]}
    for raw, node in block_nodes.items():
        if raw in skipped:
            continue
        block = _block_quantized(thing, raw, node, inits, source.size)
        if block is None:
            skipped.add(raw)
        else:
            named.setdefault(block[0], []).append(block[1])
    for raw, init in inits.items():
        quantized = _stem(raw)[1]
        if raw in skipped or raw in helpers or raw in block_nodes:
            continue
        name, transposed = _pt_name(raw, used.get(raw))
        dtype = _DTYPES.get(init.data_type, ("?", ""))[0]
        if name is None or (dtype not in _FLOATS and not quantized):
            continue
        location = None
        if init.external:
            location, init = _external(thing, init)
        stored = _stored(thing, init, name, transposed, source.size if location is None else None)
        tensor = OnnxTensor(stored, location)
        if quantized:
            tensor = _dequantizing(thing, tensor, inits, raw, source_of)
        named.setdefault(name, []).append(tensor)
    tensors = {n: ts[0] for n, ts in sorted(named.items()) if len(ts) == 1}
    ambiguous = sorted(n for n, ts in named.items() if len(ts) > 1)
    fixed = [n for n, t in tensors.items() if _POSITIONS.search(n) and _sinusoidal(source_of, t, "marian")]
    tensors = {n: t for n, t in tensors.items() if n not in fixed}
    folded = _folded_positions(thing, nodes, inits, tensors, source_of, source.size)
    tensors = dict(sorted({**tensors, **folded}.items()))
    if not tensors:
        raise OnnxWeightsError(thing, "no weight maps to a PyTorch name (not an export of a PyTorch model)")
    details: dict[str, object] = {"initializers": len(inits), "nodes": len(nodes)}
    if skipped or fixed:
        details["skipped"] = {"undecoded": len(skipped)} | ({"sinusoidal": len(fixed)} if fixed else {})
    if ambiguous:
        details["ambiguous"] = ambiguous[:8]
    return tensors, details


def _sinusoidal(source_of: Callable[[str | None], ByteSource], tensor: OnnxTensor,
                form: Literal["marian", "whisper"]) -> bool:
    """Whether a table is a fixed one of sines and cosines: sin of position x rate_k in the first half of a row,
    cos in the second, rate_k = 10000^(-2k/d) (Marian's and Pegasus' `embed_positions.weight`, which PyTorch
    recomputes and never saves: a constant of the export, not a weight) or 10000^(-k/(d/2 - 1)) (Whisper's
    encoder table, frozen, which PyTorch saves). Its first two rows are read to tell it from a learned table."""
    shape = tensor.stored.shape
    if tensor.scale is not None or tensor.blocks is not None or len(shape) != 2 or shape[0] < 2 or shape[1] % 2 \
            or shape[1] < 4:
        return False
    rows = read_onnx_tensor(source_of(tensor.location), tensor, (0, 2)).astype(np.float64)
    half = shape[1] // 2
    exponent = 2 * np.arange(half) / shape[1] if form == "marian" else np.arange(half) / (half - 1)
    angle = 1.0 / np.power(10000.0, exponent)
    want = np.stack([np.concatenate([np.zeros(half), np.ones(half)]), np.concatenate([np.sin(angle), np.cos(angle)])])
    return bool(np.allclose(rows, want, rtol=0, atol=1e-6))


def _folded_positions(thing: str, nodes: list[_Node], inits: Mapping[str, _Init], tensors: Mapping[str, OnnxTensor],
                      source_of: Callable[[str | None], ByteSource], size: int | None) -> dict[str, OnnxTensor]:
    """Whisper's encoder adds its whole frozen table (`embed_positions(arange(n))`), and the exporter folds that
    into an unnamed constant of the Add, in the module that owns the table: named back
    `<module>.embed_positions.weight` when its rows are Whisper's sines (`_sinusoidal`), as PyTorch saves it."""
    out: dict[str, OnnxTensor] = {}
    for node in (n for n in nodes if n.op == "Add"):
        for raw in node.inputs:
            init = inits.get(raw)
            if init is None or init.small is not None or len(init.dims) != 2 or _PARAMETER.match(_stem(raw)[0]) \
                    or _DTYPES.get(init.data_type, ("",))[0] not in _FLOATS:
                continue
            scope = module_path(node.name) or ""
            name = f"{scope}.embed_positions.weight" if scope else "embed_positions.weight"
            if name in tensors or name in out:
                continue
            location = None
            if init.external:
                location, init = _external(thing, init)
            tensor = OnnxTensor(_stored(thing, init, name, False, size if location is None else None), location)
            if _sinusoidal(source_of, tensor, "whisper"):
                out[name] = tensor
    return out


def _block_quantized(thing: str, raw: str, node: _Node, inits: Mapping[str, _Init], size: int | None
                     ) -> tuple[str, OnnxTensor] | None:
    """(PyTorch name, tensor) of a MatMulNBits weight; None for a variant not decoded here (a g_idx, float zero
    points: left out and counted). Refused in one line: attributes or shapes that disagree."""
    k, n, bits, block_size = (node.ints.get(a, 0) for a in ("K", "N", "bits", "block_size"))
    if len(node.inputs) > 4 and node.inputs[4]:
        return None  # act-order groups (g_idx): a block is not a run of consecutive inputs
    if bits not in _BLOCK_BITS or k <= 0 or n <= 0 or block_size < 16 or block_size & (block_size - 1):
        raise OnnxWeightsError(thing, f"{node.name}: MatMulNBits with K={k} N={n} bits={bits} block_size={block_size}")
    scales, zeros = inits.get(node.inputs[2]), inits.get(node.inputs[3]) if len(node.inputs) > 3 else None
    if scales is None or (len(node.inputs) > 3 and node.inputs[3] and zeros is None):
        raise OnnxWeightsError(thing, f"{node.name}: its scales or zero points are not initializers")
    if zeros is not None and zeros.data_type != 2:
        return None  # float zero points (HQQ): another dequantization formula
    codes, scales_at, zeros_at = inits[raw], None, None
    codes_at = None
    if codes.external:
        codes_at, codes = _external(thing, codes)
    if scales.external:
        scales_at, scales = _external(thing, scales)
    if zeros is not None and zeros.external:
        zeros_at, zeros = _external(thing, zeros)
    quant = BlockQuant(k, n, bits, block_size, scales, scales_at, zeros, zeros_at)
    want = {raw: (codes, (n, quant.blocks, quant.row_bytes // quant.blocks), 2),
            scales.name: (scales, (n, quant.blocks), None)}
    if zeros is not None:
        want[zeros.name] = (zeros, (n, quant.zero_row_bytes), 2)
    for name, (init, dims, dtype) in want.items():
        if math.prod(init.dims) != math.prod(dims) or (dtype is not None and init.data_type != dtype) or (
                dtype is None and _DTYPES.get(init.data_type, ("",))[0] not in _FLOATS):
            raise OnnxWeightsError(thing, f"{name}: shape {init.dims} (type {init.data_type}) does not fit "
                                          f"MatMulNBits K={k} N={n} bits={bits} block_size={block_size}")
        itemsize = np.dtype(_DTYPES[init.data_type][1]).itemsize
        if init.offset is None or init.nbytes != math.prod(dims) * itemsize:
            raise OnnxWeightsError(thing, f"{name}: {init.nbytes} bytes stored for shape {dims}")
        at = {raw: codes_at, scales.name: scales_at}.get(name, zeros_at)
        if at is None and size is not None and init.offset + init.nbytes > size:
            raise OnnxWeightsError(thing, f"truncated: {name}'s bytes end past byte {size}")
    stem = _MERGED.sub("", raw[: -len(f"_Q{bits}")] if raw.endswith(f"_Q{bits}") else raw)
    if _PARAMETER.match(stem):  # a parameter used as it is: (in, out) = (K, N) in PyTorch too
        name, transposed = stem, True
    else:
        path = module_path(node.name)
        if path is None:
            return None
        name, transposed = f"{path}.weight", False
    shape = (k, n) if transposed else (n, k)
    stored = StoredTensor(name, raw, "F32", (n, k), shape, (1, 0) if transposed else None, codes.offset, "<u1")
    return name, OnnxTensor(stored, codes_at, blocks=quant)


def _dequantizing(thing: str, tensor: OnnxTensor, inits: Mapping[str, _Init], raw: str,
                  source_of: Callable[[str | None], ByteSource]) -> OnnxTensor:
    """The tensor with its scale and zero point (onnxruntime's `<W>_scale`, `<W>_zero_point`)."""
    base = raw[: -len("_quantized")]
    scale_init, zero_init = inits.get(f"{base}_scale"), inits.get(f"{base}_zero_point")
    if scale_init is None:
        raise OnnxWeightsError(thing, f"{raw}: quantized codes without {base}_scale")
    if tensor.stored.dtype not in ("I8", "U8"):
        raise OnnxWeightsError(thing, f"{raw}: {tensor.stored.dtype} codes: only 8-bit weights are dequantized")
    scale = _small_value(thing, source_of, scale_init)
    zero = _small_value(thing, source_of, zero_init) if zero_init is not None else np.zeros(())
    dims = tensor.stored.stored
    axis = 1 if len(dims) == 2 and scale.size == dims[1] else 0
    if scale.size not in (1, dims[axis] if dims else 1) or zero.size not in (1, scale.size):
        raise OnnxWeightsError(thing, f"{raw}: a scale of {scale.size} values for a tensor of shape {dims}")
    if not np.isfinite(scale).all() or (scale <= 0).any():
        raise OnnxWeightsError(thing, f"{base}_scale: a scale that is not positive and finite")
    stored = replace(tensor.stored, dtype="F32")  # what it dequantizes to: a float weight
    return replace(tensor, stored=stored, scale=scale.reshape(-1), zero_point=zero.reshape(-1), axis=axis)


def read_onnx_tensor(source: ByteSource, tensor: OnnxTensor, rows: tuple[int, int] | None = None, *,
                     beside: Callable[[str | None], ByteSource] | None = None,
                     steps: list[float] | None = None) -> np.ndarray:
    """A tensor in PyTorch's layout, float32, dequantized: its rows [r0, r1) only when given (read by range
    when PyTorch's rows are the stored rows, else the whole tensor first). `source` holds the tensor's bytes;
    `beside(location)` the file of a MatMulNBits weight's scales and zero points (None: `source`). `steps`
    collects the RMS scale of the block-quantized rows read (their grid step, for `predicted_error`)."""
    if tensor.blocks is not None:
        values, step = _read_blocks(source, beside or (lambda _: source), tensor, rows)
        if steps is not None:
            steps.append(step)
        return values
    values = read_tensor(source, None, tensor.stored, rows)
    if tensor.scale is None:
        return values
    scale, zero = tensor.scale, tensor.zero_point if tensor.zero_point is not None else np.zeros(1)
    if scale.size > 1:
        # the per-channel axis in PyTorch's layout: a transposed matrix's stored axis 1 is its rows
        on_rows = (tensor.axis == 0) == (tensor.stored.axes is None)
        r0, r1 = rows if rows is not None else (0, values.shape[0])
        shape = (-1, 1) if on_rows else (1, -1)
        pick = slice(r0, r1) if on_rows else slice(None)
        scale = scale[pick].reshape(shape)
        zero = (zero[pick] if zero.size > 1 else zero).reshape(shape if zero.size > 1 else (1, 1))
    return ((values - zero) * scale).astype(np.float32)


def _read_blocks(source: ByteSource, beside: Callable[[str | None], ByteSource], tensor: OnnxTensor,
                 rows: tuple[int, int] | None) -> tuple[np.ndarray, float]:
    """A MatMulNBits weight's rows (PyTorch's layout), dequantized, and the RMS of their scales. Output rows
    are stored rows: read by range; a transposed parameter's rows are columns, so it is read whole."""
    quant, stored = tensor.blocks, tensor.stored
    assert quant is not None and stored.offset is not None
    r0, r1 = rows if rows is not None and stored.axes is None else (0, quant.n)

    def take(at: str | None, init: _Init, row_bytes: int) -> bytes:
        assert init.offset is not None
        return beside(at).read(init.offset + r0 * row_bytes, init.offset + r1 * row_bytes)

    count = r1 - r0
    codes = np.frombuffer(source.read(stored.offset + r0 * quant.row_bytes, stored.offset + r1 * quant.row_bytes),
                          dtype=np.uint8)
    values = _unpack(codes, quant.bits).reshape(count, quant.blocks, quant.block_size).astype(np.float32)
    dtype = np.dtype(_DTYPES[quant.scales.data_type][1])
    scale = np.frombuffer(take(quant.scales_at, quant.scales, quant.blocks * dtype.itemsize), dtype=dtype)
    if _DTYPES[quant.scales.data_type][0] == "BF16":
        scale = (scale.astype("<u4") << 16).view("<f4")
    scale = scale.astype(np.float32).reshape(count, quant.blocks)
    if quant.zeros is None:
        zero = np.full((count, quant.blocks), 2 ** (quant.bits - 1), np.float32)
    else:
        packed = np.frombuffer(take(quant.zeros_at, quant.zeros, quant.zero_row_bytes), dtype=np.uint8)
        zero = _unpack(packed, quant.bits).reshape(count, -1)[:, : quant.blocks].astype(np.float32)
    values = ((values - zero[..., None]) * scale[..., None]).reshape(count, -1)[:, : quant.k]
    if stored.axes is not None:
        values = values.T
        if rows is not None:
            values = values[rows[0]:rows[1]]
    step = float(np.sqrt(np.mean(np.square(scale, dtype=np.float64)))) if scale.size else 0.0
    return np.ascontiguousarray(values, dtype=np.float32), step


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """`bits`-bit codes packed into bytes, low bits first: one uint8 per code."""
    if bits == 8:
        return packed
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)


def predicted_error(tensor: OnnxTensor, values: np.ndarray, step: float | None = None) -> float:
    """RMS relative error of rounding to the tensor's grid (step = scale): scale / sqrt(12) over its RMS.
    `step`: the RMS scale of a block-quantized tensor's rows read (`read_onnx_tensor`'s `steps`)."""
    if tensor.scale is None and step is None:
        return 0.0
    rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) if values.size else 0.0
    step = step if step is not None else float(np.sqrt(np.mean(np.square(tensor.scale))))
    return step / math.sqrt(12.0) / rms if rms > 0 else 0.0


def choose_onnx(files: Iterable[str]) -> str | None:
    """The ONNX file of a repo to read (`ONNX_FILES`, best first, then a decoder-only model's `DECODER_FILES`; at
    the top or under `onnx/`, transformers.js' folder), or None when it has none of them."""
    present = set(files)
    found = next((f"{folder}{name}" for name in ONNX_FILES for folder in ("", "onnx/") if f"{folder}{name}" in present),
                 None)
    if found is not None:
        return found
    for folder in ("", "onnx/"):
        if any(f.startswith(f"{folder}encoder_model") and f.count("/") == folder.count("/") for f in present):
            continue
        found = next((f"{folder}{name}" for name in DECODER_FILES if f"{folder}{name}" in present), None)
        if found is not None:
            return found
    return None


def choose_onnx_files(files: Iterable[str]) -> tuple[str, ...] | None:
    """The ONNX files of a repo to read as one model: `choose_onnx`'s file, else an encoder-decoder export's
    two graphs of one variant (`encoder_model{v}.onnx` with `decoder_model{v}.onnx`, else optimum's
    `decoder_model_merged{v}.onnx`; the variants in `ONNX_FILES` order, at the top or under `onnx/`): t5, bart,
    marian, whisper as transformers.js and optimum publish them. None when it has neither."""
    present = set(files)
    single = choose_onnx(present)
    if single is not None:
        return (single,)
    for name in ONNX_FILES:
        variant = name[len("model"):-len(ONNX_SUFFIX)]  # "", "_fp16", "_quantized", ...
        for folder in ("", "onnx/"):
            encoder = f"{folder}encoder_model{variant}{ONNX_SUFFIX}"
            decoder = next((f"{folder}{d}" for d in (f"decoder_model{variant}{ONNX_SUFFIX}",
                                                     f"decoder_model_merged{variant}{ONNX_SUFFIX}")
                            if f"{folder}{d}" in present), None)
            if encoder in present and decoder is not None:
                return encoder, decoder
    return None


def join_halves(encoder: Mapping[str, OnnxTensor], decoder: Mapping[str, OnnxTensor]
                ) -> tuple[dict[str, tuple[int, OnnxTensor]], list[str]]:
    """An encoder-decoder export's two graphs as one model: {PyTorch name: (0 encoder / 1 decoder, tensor)} and
    the names both claim (dropped). optimum exports the encoder alone (`model.get_encoder()`: `block.0...`,
    `layers.0...`) and the decoder within the whole model (`decoder.block.0...`, `model.decoder.layers.0...`,
    `lm_head`), so the encoder's names get the prefix the decoder's show (`model.encoder.` beside
    `model.decoder.`, else `encoder.`). Its token embedding is the model's shared one, tied (the model saves
    `shared.weight` once): left out when the decoder holds a `shared.weight` of its shape."""
    prefix = "model.encoder." if any(n.startswith("model.decoder.") for n in decoder) else "encoder."
    shared = [t.stored.shape for n, t in decoder.items() if n == "shared.weight" or n.endswith(".shared.weight")]
    out = {n: (1, t) for n, t in decoder.items()}
    clashes = []
    for name, tensor in encoder.items():
        if name == "embed_tokens.weight" and tensor.stored.shape in shared:
            continue
        full = prefix + name
        if full in out:
            clashes.append(full)
            del out[full]
            continue
        out[full] = (0, replace(tensor, stored=replace(tensor.stored, name=full)))
    return dict(sorted(out.items())), sorted(clashes)


def other_onnx(files: Iterable[str]) -> list[str]:
    """The .onnx files a repo holds that `choose_onnx_files` does not read (an NF4 copy, a decoder alone)."""
    return sorted(f for f in files if f.endswith(ONNX_SUFFIX) and f.count("/") <= 1)


class OnnxWeights(ConvertedWeights):
    """A local ONNX export (`sketches.tfh5.ConvertedWeights`): walked on opening, each weight read (and
    dequantized) on `read`; `quantized` when onnxruntime's quantizer wrote any of them. Given a `decoder`
    too, `path` is an encoder-decoder export's encoder graph and the two are one model (`join_halves`)."""

    def __init__(self, path: str | os.PathLike[str], decoder: str | os.PathLike[str] | None = None) -> None:
        from sketches.safetensors import FileSource

        folder = Path(path).parent.resolve()
        self._beside: dict[str, ByteSource] = {}

        def open_beside(location: str) -> ByteSource:
            target = (folder / location).resolve()
            if not target.is_relative_to(folder) or not target.is_file():
                raise OnnxWeightsError(str(path), f"its weights are in {location!r}, not a file beside it")
            if location not in self._beside:
                self._beside[location] = FileSource(target)
            return self._beside[location]

        self._parts: list[ByteSource] = []
        try:
            for file in (path, decoder) if decoder is not None else (path,):
                self._parts.append(FileSource(file))
            indexes = [read_index(part, open_beside) for part in self._parts]
        except BaseException:
            for part in self._parts:
                part.close()  # type: ignore[attr-defined]
            raise
        if decoder is None:
            self._onnx = {n: (0, t) for n, t in indexes[0][0].items()}
            self.details = indexes[0][1]
        else:
            self._onnx, clashes = join_halves(indexes[0][0], indexes[1][0])
            self.details = {"files": [Path(path).name, Path(decoder).name], **({"ambiguous": clashes} if clashes else {})}
        self._open_beside = open_beside
        super().__init__(path, self._parts[0], {n: t.stored for n, (_, t) in self._onnx.items()})
        if decoder is not None:
            self.files = (Path(path).name, Path(decoder).name)

    @property
    def quantized(self) -> bool:
        return any(t.scale is not None or t.blocks is not None for _, t in self._onnx.values())

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> np.ndarray:
        if name not in self._onnx:
            raise OnnxWeightsError(self._source.name, f"no tensor maps to the PyTorch name {name!r}")
        part, tensor = self._onnx[name]

        def file(location: str | None) -> ByteSource:
            return self._parts[part] if location is None else self._open_beside(location)

        return read_onnx_tensor(file(tensor.location), tensor, rows, beside=file)

    def file_of(self, name: str) -> str:
        return self.files[self._onnx[name][0]] if name in self._onnx else self.files[0]

    @property
    def bytes_read(self) -> int:
        return sum(p.bytes_read for p in self._parts) + sum(s.bytes_read for s in self._beside.values())

    def close(self) -> None:
        for beside in self._beside.values():
            beside.close()  # type: ignore[attr-defined]
        for part in self._parts[1:]:
            part.close()  # type: ignore[attr-defined]
        super().close()
