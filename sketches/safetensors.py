"""A safetensors reader that reads only the bytes it is asked for, from any byte source.

File layout (https://github.com/huggingface/safetensors):

    bytes [0, 8)          N, the header length, unsigned 64-bit little-endian
    bytes [8, 8 + N)      UTF-8 JSON object {name: {"dtype", "shape", "data_offsets": [b, e]}, ...}
                          plus an optional "__metadata__": {str: str}
    bytes [8 + N, size)   the data; tensor `name` is bytes [8 + N + b, 8 + N + e), C order, little-endian

Reading a header costs exactly two reads (the 8-byte length, then the N header bytes); reading a tensor,
or a block of its rows along dim 0 (rows are contiguous in C order), costs exactly one read of exactly
those bytes. A source is anything with `name`, `size`, `bytes_read` and `read(start, end)`: a local file
here (`FileSource`), an HTTP range reader later (`CallableSource`).

Every header is validated before a byte of tensor data is trusted: a declared size is compared with the
file size before anything is allocated from it, and every failure is a `SafetensorsError` naming the file.
Pickled weights (`.bin`, `.pt`, `.pkl`) are never loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from errors import BadInputError, SafetensorsError, UnsupportedModelError
from sketches.dtypes import DTYPE_SIZES, decode
from sketches.experts import expert_views
from sketches.flux import flux_views
from sketches.sd3 import sd3_views

__all__ = [
    "MAX_HEADER_BYTES",
    "DTYPE_SIZES",
    "ByteSource",
    "FileSource",
    "CallableSource",
    "TensorInfo",
    "SafetensorsHeader",
    "parse_header",
    "read_header",
    "decode",
    "read_tensor",
    "RepoWeights",
    "open_local_repo",
    "fused_views",
]

K = TypeVar("K")  # what a tensor location names its file by (a file name, a source)
logger = logging.getLogger(__name__)

# The reference implementation refuses headers over 100 MB too; the largest real headers (thousands of
# tensors with long names) are a few MB.
MAX_HEADER_BYTES: int = 100 * 1024 * 1024

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A diffusers pipeline (model_index.json at the top, one folder per component) is indexed by its denoiser:
# the component a fine-tune, a DreamBooth run or a merge changes (the text encoders and the autoencoder
# are most often the base's, bit for bit). In this order: SD 1.x / 2.x / XL, then SD3 / Flux / PixArt,
# then Wuerstchen / Kandinsky's prior and decoder.
PIPELINE_INDEX = "model_index.json"
DENOISERS = ("unet", "transformer", "prior", "decoder")
COMPONENT_INDEX = "diffusion_pytorch_model.safetensors.index.json"  # a component's shard index
# Weights we recognise but refuse to load: unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --- byte sources --------------------------------------------------------------------------------


@runtime_checkable
class ByteSource(Protocol):
    name: str  # file path or URL-ish name, used in error messages
    size: int  # total size in bytes
    bytes_read: int  # running count of bytes actually read from the source

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) exactly; a short read raises SafetensorsError("truncated ...")."""
        ...


def _check_range(name: str, size: int, start: int, end: int) -> None:
    if start < 0 or end < start:
        raise SafetensorsError(name, f"invalid byte range [{start}, {end})")
    if end > size:
        raise SafetensorsError(
            name, f"truncated: bytes [{start}, {end}) asked for but the source has {size}"
        )


def _check_length(name: str, start: int, end: int, data: bytes) -> bytes:
    if len(data) != end - start:
        raise SafetensorsError(
            name, f"truncated: bytes [{start}, {end}) asked for but {len(data)} bytes came back"
        )
    return data


class FileSource:
    """A local file as a ByteSource: sized at construction, opened at the first read, read with pread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd: int | None = None  # first, so that close() works even if stat() below fails
        self.path = Path(path)
        self.name = str(path)
        try:
            self.size = self.path.stat().st_size
        except OSError as exc:
            raise BadInputError(self.name, exc.strerror or str(exc)) from exc
        self.bytes_read = 0

    def read(self, start: int, end: int) -> bytes:
        _check_range(self.name, self.size, start, end)
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise BadInputError(self.name, exc.strerror or str(exc)) from exc
        chunks: list[bytes] = []
        pos = start
        while pos < end:  # pread may return fewer bytes than asked; 0 means end of file
            chunk = os.pread(self._fd, end - pos, pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
        data = b"".join(chunks)
        self.bytes_read += len(data)
        return _check_length(self.name, start, end, data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileSource({self.name!r}, size={self.size})"


class CallableSource:
    """A ByteSource over `read_range(start, end_exclusive) -> bytes` (HTTP range reads, test recorders)."""

    def __init__(self, name: str, size: int, read_range: Callable[[int, int], bytes]) -> None:
        self.name = name
        self.size = size
        self.bytes_read = 0
        self._read_range = read_range

    def read(self, start: int, end: int) -> bytes:
        _check_range(self.name, self.size, start, end)
        data = bytes(self._read_range(start, end))
        self.bytes_read += len(data)
        return _check_length(self.name, start, end, data)

    def __repr__(self) -> str:
        return f"CallableSource({self.name!r}, size={self.size})"


# --- header --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file: 8 + N + data_offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (a scalar has no rows: its whole size)."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * self.itemsize


@dataclass(frozen=True)
class SafetensorsHeader:
    name: str
    header_size: int  # N, the JSON bytes (without the 8-byte length)
    data_start: int  # 8 + N
    file_size: int
    tensors: tuple[TensorInfo, ...]  # sorted by name
    metadata: dict[str, str]
    _by_name: dict[str, TensorInfo] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    def get(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise SafetensorsError(self.name, f"no tensor named {name!r}") from None

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _load_json_object(thing: str, raw: bytes, what: str) -> dict[str, Any]:
    """Strict JSON: UTF-8, an object at the top, no duplicate keys; any failure is a SafetensorsError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafetensorsError(thing, f"{what} is not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        raise SafetensorsError(thing, f"{what} has a {exc}") from None
    except RecursionError:
        raise SafetensorsError(thing, f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise SafetensorsError(thing, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(thing, f"{what} is a JSON {type(obj).__name__}, not an object")
    return obj


def _is_uint(value: object) -> bool:
    return type(value) is int and value >= 0  # bool is not a number here


def _parse_entry(thing: str, name: str, entry: object, *, data_start: int, file_size: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(thing, f"{where}: entry is a {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise SafetensorsError(thing, f"{where}: missing {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise SafetensorsError(thing, f"{where}: dtype must be a string, got {dtype!r:.80}")
    if dtype not in DTYPE_SIZES:
        known = ", ".join(sorted(DTYPE_SIZES))
        raise SafetensorsError(thing, f"{where}: unknown dtype {dtype!r:.80} (known: {known})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise SafetensorsError(
            thing, f"{where}: shape must be a list of whole numbers >= 0, got {shape!r:.80}"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise SafetensorsError(
            thing, f"{where}: data_offsets must be [begin, end] of whole numbers >= 0, got {offsets!r:.80}"
        )
    begin, end = offsets
    if begin > end:
        raise SafetensorsError(thing, f"{where}: data_offsets begin {begin} > end {end}")
    if data_start + end > file_size:
        raise SafetensorsError(
            thing,
            f"{where}: data ends at byte {data_start + end} but the file has {file_size} (truncated?)",
        )
    # Python ints do not overflow; the product is only compared, never allocated.
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected != end - begin:
        raise SafetensorsError(
            thing, f"{where}: {dtype} {shape} needs {expected} bytes but data_offsets span {end - begin}"
        )
    return TensorInfo(
        name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end
    )


def _check_no_overlap(thing: str, tensors: list[TensorInfo]) -> None:
    # Gaps between tensors are tolerated (we only ever read ranges); shared bytes are not.
    ordered = sorted((t for t in tensors if t.nbytes), key=lambda t: (t.begin, t.end, t.name))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise SafetensorsError(
                thing, f"tensors {prev.name!r} and {cur.name!r} overlap (bytes {cur.begin}..{prev.end})"
            )


def _parse_metadata(thing: str, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(
            thing, f"__metadata__ must be an object of string -> string, got {metadata!r:.80}"
        )
    return dict(sorted(metadata.items()))


def parse_header(name: str, header_json: bytes, *, header_size: int, file_size: int) -> SafetensorsHeader:
    """Validate header bytes (the N bytes after the length) of a file of `file_size` bytes. Pure."""
    if len(header_json) != header_size:
        raise SafetensorsError(
            name, f"truncated: header declares {header_size} bytes but {len(header_json)} were given"
        )
    data_start = 8 + header_size
    if data_start > file_size:
        raise SafetensorsError(name, f"header declares {header_size} bytes but the file has {file_size}")
    obj = _load_json_object(name, header_json, "header")
    metadata = _parse_metadata(name, obj.pop("__metadata__")) if "__metadata__" in obj else {}
    tensors = [
        _parse_entry(name, key, entry, data_start=data_start, file_size=file_size)
        for key, entry in obj.items()
    ]
    _check_no_overlap(name, tensors)
    return SafetensorsHeader(
        name=name,
        header_size=header_size,
        data_start=data_start,
        file_size=file_size,
        tensors=tuple(sorted(tensors, key=lambda t: t.name)),  # deterministic
        metadata=metadata,
    )


def read_header(source: ByteSource) -> SafetensorsHeader:
    """Read and validate the header of `source`: exactly two reads, the length and the JSON."""
    # 1. The 8-byte length; check it against the cap and the file size before reading that many bytes.
    if source.size < 8:
        raise SafetensorsError(
            source.name,
            f"truncated: {source.size} bytes, fewer than the 8-byte header length (not a safetensors file?)",
        )
    header_size = int.from_bytes(source.read(0, 8), "little")
    if header_size > MAX_HEADER_BYTES:
        raise SafetensorsError(
            source.name,
            f"header declares {header_size} bytes, over the {MAX_HEADER_BYTES}-byte cap "
            "(not a safetensors file?)",
        )
    if 8 + header_size > source.size:
        raise SafetensorsError(
            source.name, f"header declares {header_size} bytes but the file has {source.size} (truncated?)"
        )
    # 2. The header itself.
    raw = source.read(8, 8 + header_size)
    return parse_header(source.name, raw, header_size=header_size, file_size=source.size)


def read_tensor(source: ByteSource, info: TensorInfo, *, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor (or its rows [r0, r1) along dim 0) as float32, in one read of exactly its bytes."""
    if rows is None:
        start, end, shape = info.begin, info.end, info.shape
    else:
        r0, r1 = rows
        if not info.shape:
            raise SafetensorsError(
                source.name, f"tensor {info.name!r} is a scalar: it has no rows to slice"
            )
        if not (0 <= r0 <= r1 <= info.shape[0]):
            raise SafetensorsError(
                source.name, f"tensor {info.name!r}: rows [{r0}, {r1}) outside its {info.shape[0]} rows"
            )
        start = info.begin + r0 * info.row_bytes
        end = info.begin + r1 * info.row_bytes
        shape = (r1 - r0, *info.shape[1:])
    raw = source.read(start, end)
    return decode(raw, info.dtype, shape, name=f"{source.name}: {info.name}")


# --- local repos ---------------------------------------------------------------------------------


class RepoWeights:
    """The safetensors weights of a local repo folder (one file, or shards) or of a single file.

    `root` is the folder; `files` are file names inside it, in the order read. Headers are read (and
    validated) when the repo is opened; tensor bytes only on `read`. Close it (or use `with`) to release
    the file descriptors.
    """

    def __init__(
        self, root: str, files: tuple[str, ...], *, weight_map: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self._sources = {f: FileSource(os.path.join(root, f)) for f in files}
        try:
            self.headers: dict[str, SafetensorsHeader] = {
                f: read_header(s) for f, s in self._sources.items()
            }
            if weight_map is None and len(files) > 1:  # variants of one model are not read twice
                files = choose_files(self.headers)
                for dropped in set(self._sources) - set(files):
                    self._sources.pop(dropped).close()
                    del self.headers[dropped]
            self.files = files
            self._where = self._locate(weight_map)
        except BaseException:
            self.close()
            raise

    def _locate(self, weight_map: dict[str, str] | None) -> dict[str, tuple[str, TensorInfo]]:
        where: dict[str, tuple[str, TensorInfo]] = {}
        if weight_map is not None:  # the index is the list of tensors; each must be in its shard
            for tensor, shard in weight_map.items():
                if tensor not in self.headers[shard]:
                    raise SafetensorsError(
                        self.root, f"the index lists tensor {tensor!r} in {shard}, which does not hold it"
                    )
                where[tensor] = (shard, self.headers[shard].get(tensor))
        else:
            for file, header in self.headers.items():
                for info in header.tensors:
                    if info.name in where:
                        raise SafetensorsError(
                            self.root, f"tensor {info.name!r} is in both {where[info.name][0]} and {file}"
                        )
                    where[info.name] = (file, info)
        return fused_views(where)  # sorted: deterministic

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: info for name, (_, info) in self._where.items()}

    def locations(self) -> dict[str, tuple[str, TensorInfo]]:
        """Tensor name -> (file, info), views included: what `indexer.readers.read_packed` takes."""
        return dict(self._where)

    def sources(self) -> dict[str, ByteSource]:
        """File -> its open byte source (closed with the repo)."""
        return dict(self._sources)

    def file_of(self, name: str) -> str:
        return self._entry(name)[0]

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> np.ndarray:
        file, info = self._entry(name)
        return read_tensor(self._sources[file], info, rows=rows)

    def _entry(self, name: str) -> tuple[str, TensorInfo]:
        try:
            return self._where[name]
        except KeyError:
            raise SafetensorsError(self.root, f"no tensor named {name!r}") from None

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self._sources.values())

    @property
    def header_bytes(self) -> int:
        """Bytes of the headers, 8-byte lengths included: what opening the repo read."""
        return sum(h.data_start for h in self.headers.values())

    def close(self) -> None:
        for source in self._sources.values():
            source.close()

    def __enter__(self) -> RepoWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __repr__(self) -> str:
        return f"RepoWeights({self.root!r}, files={list(self.files)!r})"


def fused_views(where: Mapping[str, tuple[K, TensorInfo]]) -> dict[str, tuple[K, TensorInfo]]:
    """A model's tensors with the fused ones split into the tensors they fuse, as views of their bytes
    (FLUX's and SD3's q/k/v: `sketches.flux`, `sketches.sd3`; MoE experts: `sketches.experts`), sorted by
    name. Every reader of safetensors headers applies it (local folders here, the crawl's `read_headers`)."""
    return expert_views(sd3_views(flux_views(where)))


def _plain_file_name(name: str) -> bool:
    if name in ("", ".", ".."):
        return False
    return not any(bad in name for bad in ("/", "\\", "\0"))


def _read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a sharded repo's index, validated: str -> plain file name in the folder."""
    thing = str(index_path)
    size = index_path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise SafetensorsError(thing, f"index is {size} bytes, over the {MAX_HEADER_BYTES}-byte cap")
    obj = _load_json_object(thing, index_path.read_bytes(), "index")
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SafetensorsError(thing, "weight_map must be an object of tensor name -> shard file name")
    if not weight_map:
        raise SafetensorsError(thing, "weight_map is empty: the index lists no tensors")
    folder = index_path.parent
    for shard in sorted(set(weight_map.values())):
        if not _plain_file_name(shard):
            raise SafetensorsError(thing, f"shard {shard!r:.80} is not a plain file name inside the folder")
        if not (folder / shard).is_file():
            raise SafetensorsError(thing, f"shard {shard!r} is listed but missing from {folder}")
    return weight_map


# Precision of a file's values, most precise first: of two variants of one model, the closer to its source.
_PRECISION = ("F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2")


def _precision(header: SafetensorsHeader) -> int:
    """Rank (0 best) of the dtype holding most of the file's bytes."""
    by_dtype: dict[str, int] = {}
    for info in header.tensors:
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    main = max(by_dtype, key=lambda d: (by_dtype[d], d)) if by_dtype else ""
    return _PRECISION.index(main) if main in _PRECISION else len(_PRECISION)


def choose_files(headers: Mapping[str, SafetensorsHeader]) -> tuple[str, ...]:
    """The files of an unindexed multi-file repo that make one model.

    Files that share no tensor name are parts of one model (a Flux transformer beside its autoencoder);
    files that share names are variants of it (`x.safetensors` beside `x.fp16.safetensors`, an SD
    `v1-5-pruned` beside `v1-5-pruned-emaonly`): reading both would hold two values for one name. Take
    the most precise file (then the one with more tensors, then the first by name), then every other
    file that shares no name with those taken; the variants left out are logged."""
    order = sorted(headers, key=lambda f: (_precision(headers[f]), -len(headers[f].tensors), f))
    taken: list[str] = []
    names: set[str] = set()
    for file in order:
        mine = set(headers[file].names())
        if names & mine:
            logger.info("%s: a variant of %s (same tensor names), not read", file, ", ".join(taken))
            continue
        taken.append(file)
        names |= mine
    return tuple(sorted(taken))


def denoiser_folder(files: Iterable[str]) -> str | None:
    """The denoiser folder of a diffusers pipeline (DENOISERS) given a repo's file paths; None when the
    repo is not a pipeline (no top-level model_index.json) or none of those folders holds safetensors."""
    present = set(files)
    if PIPELINE_INDEX not in present:
        return None
    for name in DENOISERS:
        if any(f.startswith(f"{name}/") and f.count("/") == 1 and f.endswith(".safetensors") for f in present):
            return name
        if f"{name}/{COMPONENT_INDEX}" in present:
            return name
    return None


def local_denoiser(folder: Path) -> str | None:
    """`denoiser_folder` of a local folder (its files and its subfolders' files)."""
    if not (folder / PIPELINE_INDEX).is_file():
        return None
    return denoiser_folder(f.relative_to(folder).as_posix() for f in (*folder.glob("*"), *folder.glob("*/*"))
                           if f.is_file())


def _folder_files(folder: Path) -> tuple[str, ...]:
    if (folder / SINGLE_FILE).is_file():
        return (SINGLE_FILE,)
    found = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if found:
        return tuple(found)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any((folder / f).is_file() for f in ("tf_model.h5", "flax_model.msgpack")):
        raise UnsupportedModelError(
            str(folder),
            f"no safetensors weights (pickled weights are never loaded): found {', '.join(pickles[:3])}",
        )
    raise UnsupportedModelError(str(folder), "no safetensors weights (no *.safetensors file in the folder)")


def _converted_file(p: Path) -> tuple[Path, ...] | None:
    """The TensorFlow (`tf_model.h5`), Flax (`flax_model.msgpack`) or ONNX (`sketches.onnx.choose_onnx_files`:
    one graph, or an encoder's and a decoder's) files to read: the path itself, or those a folder without
    safetensors holds (in that order), else None."""
    from sketches.onnx import choose_onnx_files  # it imports this module

    if p.is_file():
        return (p,) if p.suffix in (".h5", ".msgpack", ".onnx") else None
    if any(f.suffix == ".safetensors" for f in p.iterdir()) or local_denoiser(p) is not None:
        return None
    found = next(((p / f,) for f in ("tf_model.h5", "flax_model.msgpack") if (p / f).is_file()), None)
    onnx_files = choose_onnx_files(f.relative_to(p).as_posix() for f in (*p.glob("*.onnx"), *p.glob("onnx/*.onnx")))
    return found or (tuple(p / f for f in onnx_files) if onnx_files else None)


def open_local_repo(path: str | os.PathLike[str]) -> RepoWeights:
    """Open a .safetensors file, a sharded index file, or a repo folder; reads and validates headers only.

    A folder resolves, in this order, to model.safetensors, else the shards of
    model.safetensors.index.json, else a diffusers pipeline's denoiser (`denoiser_folder`), else every
    *.safetensors file in it (sorted; variants of one model: `choose_files`), else its TensorFlow
    `tf_model.h5`, Flax `flax_model.msgpack` or ONNX export (`sketches.onnx.choose_onnx`), each a
    `sketches.tfh5.ConvertedWeights` read like a RepoWeights.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(str(path), "no such file or directory")
    converted = _converted_file(p)
    if converted is not None:
        from sketches.flax import FlaxWeights  # they import this module
        from sketches.onnx import OnnxWeights
        from sketches.tfh5 import TFWeights

        opener = {".h5": TFWeights, ".msgpack": FlaxWeights, ".onnx": OnnxWeights}[converted[0].suffix]
        return opener(*converted)  # type: ignore[return-value,arg-type]
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _open_sharded(p)
        if p.suffix in PICKLE_SUFFIXES:
            raise UnsupportedModelError(
                str(path), "pickled weights are never loaded; convert to safetensors"
            )
        return RepoWeights(str(p.parent), (p.name,))
    if not (p / SINGLE_FILE).is_file() and (p / INDEX_FILE).is_file():
        return _open_sharded(p / INDEX_FILE)
    if not (p / SINGLE_FILE).is_file():
        denoiser = local_denoiser(p)
        if denoiser is not None:  # a diffusers pipeline: its denoiser (not a single-file checkpoint beside it)
            index = p / denoiser / COMPONENT_INDEX
            return _open_sharded(index) if index.is_file() else RepoWeights(str(p / denoiser), _folder_files(p / denoiser))
    return RepoWeights(str(p), _folder_files(p))


def _open_sharded(index_path: Path) -> RepoWeights:
    weight_map = _read_index(index_path)
    shards = tuple(sorted(set(weight_map.values())))
    return RepoWeights(str(index_path.parent), shards, weight_map=weight_map)
