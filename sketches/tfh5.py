"""TensorFlow checkpoints of `transformers` models (`tf_model.h5`), read without TensorFlow.

Many fine-tunes on the Hub were trained with Keras and pushed with `TFPreTrainedModel.push_to_hub`: their
repo holds `tf_model.h5` and no other weights (the Keras callback's model cards: "This model is a fine-tuned
version of distilbert-base-uncased ... Framework versions: TensorFlow 2.x"). Their bases are PyTorch models.

Layout (Keras 2's `save_weights` in HDF5, which `save_pretrained` writes):
- root attribute `layer_names`: the model's top-level Keras layers, as bytes, in order;
- one group per layer; its attribute `weight_names` lists the layer's variables by their full TF name
  (`tf_bert_for_sequence_classification/bert/encoder/layer_._0/attention/self/query/kernel:0`). An
  attribute over HDF5's 64 KiB object-header limit is split into `weight_names0`, `weight_names1`, ...;
- each variable is a dataset at `<layer>/<its name>` (the '/' in the name make the groups between).

Names map to PyTorch's as transformers' own TF -> PyTorch loader maps them
(`modeling_tf_pytorch_utils.convert_tf_weight_name_to_pt_weight_name`):
- ':0' is dropped, '<x>___<y>' becomes '<y>', '_._' is a level (a list index);
- level 0, the model's own scope, is dropped;
- a last level `kernel`, `embeddings` or `gamma` becomes `weight`, `beta` becomes `bias`;
- a `kernel` is stored transposed: 2-D (in, out) for PyTorch's (out, in), Conv1D (k, in, out) for
  (out, in, k), Conv2D (kh, kw, in, out) for (out, in, kh, kw). It is transposed back here.

Reading. Only the metadata goes through h5py: HDF5's object headers, read through a page cache over the
ByteSource (`PagedFile`; a remote file costs one range request a page touched). The values are read by
range at each dataset's offset (Keras stores them contiguous and unfiltered):
- a kernel whole (PyTorch's rows are its columns);
- any other tensor by its planned rows.
A dataset stored chunked or filtered is read whole through h5py.

Nothing is executed: HDF5 holds arrays and attributes only, and a Keras `model.save` file's `model_config`
(which names Python layer classes) is never read.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import SafetensorsError
from sketches.safetensors import ByteSource, TensorInfo

TF_FILE = "tf_model.h5"
# Metadata reads: HDF5 keeps each dataset's object header next to its data, so opening a file touches one
# small region per variable. A 418 MiB BERT-base file over the emulator (bench/tf_flax.py): 16 KiB pages cost
# 119 requests and 31 MiB read, 64 KiB 98 and 34 MiB, 256 KiB 95 and 49 MiB (16 and 27 MiB as safetensors).
PAGE_BYTES = 64 * 1024
MAX_PAGES = 256  # 16 MiB of pages kept
_DTYPES = {("f", 2): "F16", ("f", 4): "F32", ("f", 8): "F64", ("i", 4): "I32", ("i", 8): "I64", ("u", 1): "U8",
           ("b", 1): "BOOL"}
# PyTorch's axes of a transposed TF kernel, by its number of dimensions (transformers' apply_transpose)
_KERNEL_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


class KerasWeightsError(SafetensorsError):
    """A `tf_model.h5` that is not Keras' HDF5 weights layout (named, with the reason)."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a TensorFlow (or Flax: `sketches.flax`) checkpoint, under its PyTorch name, with the
    transpose that gives PyTorch's layout."""

    name: str  # the PyTorch name (transformers' rule), not yet normalised
    path: str  # the dataset's path in the file
    dtype: str  # safetensors' dtype name (F32, F16, ...), for `canonical_tensors`
    stored: tuple[int, ...]  # the dataset's shape
    shape: tuple[int, ...]  # PyTorch's shape (a kernel's transposed)
    axes: tuple[int, ...] | None  # the transpose that takes the stored array to PyTorch's layout; None: as stored
    offset: int | None  # first byte of the contiguous, unfiltered data; None: read through h5py
    numpy_dtype: str  # the stored element type with its byte order ('<f4')


def pt_name(tf_name: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """transformers' TF -> PyTorch name of a variable, and the axes that undo its transpose (None: none)."""
    name = tf_name.replace(":0", "")
    name = re.sub(r"/[^/]*___([^/]*)/", r"/\1/", name)
    name = re.sub(r"//+", "/", name.replace("_._", "/"))
    parts = name.split("/")
    if len(parts) > 1:
        parts = parts[1:]  # the model's own scope (tf_bert_for_sequence_classification)
    last = parts[-1]
    axes = None
    if last == "kernel" and ndim in _KERNEL_AXES:
        axes = _KERNEL_AXES[ndim]
    elif (last in ("pointwise_kernel", "depthwise_kernel") or "emb_projs" in parts or "out_projs" in parts) and ndim == 2:
        axes = (1, 0)
    if last in ("kernel", "embeddings", "gamma"):
        parts[-1] = "weight"
    elif last == "beta":
        parts[-1] = "bias"
    elif last in ("pointwise_kernel", "depthwise_kernel"):
        parts[-1] = last.replace("_kernel", ".weight")
    return ".".join(parts), axes


class PagedFile(io.RawIOBase):
    """A read-only, seekable file over a ByteSource, read in pages kept least recently used first out."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__()
        self._source, self._pos = source, 0
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        # h5py turns an exception raised in here into its own OSError: the first one is kept, so that a
        # network failure or a truncated file is reported as what it was
        self.error: Exception | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._source.size - self._pos))
        done = 0
        while done < n:
            page, within = divmod(self._pos + done, PAGE_BYTES)
            data = self._page(page)
            take = min(n - done, len(data) - within)
            view[done:done + take] = data[within:within + take]
            done += take
        self._pos += n
        return n

    def _page(self, page: int) -> bytes:
        if page in self._pages:
            self._pages.move_to_end(page)
            return self._pages[page]
        start = page * PAGE_BYTES
        try:
            data = self._source.read(start, min(self._source.size, start + PAGE_BYTES))
        except Exception as exc:
            self.error = self.error or exc
            raise
        self._pages[page] = data
        while len(self._pages) > MAX_PAGES:
            self._pages.popitem(last=False)
        return data


def _strings(thing: str, group: object, key: str) -> list[str]:
    """A Keras name-list attribute, whole or split in numbered chunks (`weight_names0`, ...)."""
    attrs = group.attrs  # type: ignore[attr-defined]
    if key in attrs:
        values = list(attrs[key])
    else:
        values, i = [], 0
        while f"{key}{i}" in attrs:
            values += list(attrs[f"{key}{i}"])
            i += 1
        if not i:
            raise KerasWeightsError(thing, f"no {key!r} attribute: not a Keras HDF5 weights file")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _tensor(thing: str, dataset: object, path: str, tf_name: str) -> StoredTensor:
    dtype = np.dtype(dataset.dtype)  # type: ignore[attr-defined]
    stored = tuple(int(d) for d in dataset.shape)  # type: ignore[attr-defined]
    kind = _DTYPES.get((dtype.kind, dtype.itemsize))
    if kind is None:
        raise KerasWeightsError(thing, f"{tf_name}: element type {dtype} is not a number type of a weights file")
    name, axes = pt_name(tf_name, len(stored))
    shape = tuple(stored[a] for a in axes) if axes else stored
    plain = dataset.chunks is None and dataset.compression is None and not dataset.id.get_create_plist().get_nfilters()  # type: ignore[attr-defined]
    offset = dataset.id.get_offset() if plain else None  # type: ignore[attr-defined]
    return StoredTensor(name, path, kind, stored, shape, axes, None if offset is None else int(offset), dtype.str)


@contextmanager
def open_checkpoint(source: ByteSource) -> Iterator[tuple[object, dict[str, StoredTensor]]]:
    """(the h5py file, {PyTorch name: tensor}) of a Keras weights file; the file stays open in the block."""
    import h5py  # only TF repos need it

    thing = source.name
    paged = PagedFile(source)
    try:
        handle = h5py.File(paged, "r")
    except OSError as exc:
        raise paged.error or KerasWeightsError(thing, f"not an HDF5 file ({exc})") from None
    try:
        tensors = _variables(thing, handle, h5py.Dataset)
    except OSError as exc:
        handle.close()
        raise paged.error or KerasWeightsError(thing, f"unreadable HDF5 metadata ({exc})") from None
    except BaseException:
        handle.close()
        raise
    try:
        yield handle, tensors
    finally:
        handle.close()


def _variables(thing: str, handle: object, dataset_type: type) -> dict[str, StoredTensor]:
    """Every listed variable under its PyTorch name (`layer_names`, then each layer's `weight_names`)."""
    tensors: dict[str, StoredTensor] = {}
    for layer in _strings(thing, handle, "layer_names"):
        if layer not in handle:
            raise KerasWeightsError(thing, f"layer {layer!r} is listed in layer_names but has no group")
        group = handle[layer]
        for tf_name in _strings(thing, group, "weight_names"):
            path = f"{layer}/{tf_name}"
            if tf_name not in group or not isinstance(group[tf_name], dataset_type):
                raise KerasWeightsError(thing, f"weight {tf_name!r} of layer {layer!r} is listed but not stored")
            t = _tensor(thing, group[tf_name], path, tf_name)
            if t.name in tensors:
                raise KerasWeightsError(thing, f"two variables map to the PyTorch name {t.name!r}")
            tensors[t.name] = t
    if not tensors:
        raise KerasWeightsError(thing, "no weights listed (layer_names / weight_names are empty)")
    return dict(sorted(tensors.items()))


def read_tensor(source: ByteSource, handle: object, tensor: StoredTensor, rows: tuple[int, int] | None = None) -> np.ndarray:
    """A tensor in PyTorch's layout, float32: its rows [r0, r1) only when given (read by range when the
    data is contiguous and PyTorch's rows are the stored rows; else the whole tensor is read first)."""
    dtype = np.dtype(tensor.numpy_dtype)
    if tensor.offset is None:
        array = np.asarray(handle[tensor.path][()], dtype=dtype)  # type: ignore[index]
    elif tensor.axes is None and rows is not None and tensor.stored:
        row_bytes = dtype.itemsize * math.prod(tensor.stored[1:])
        raw = source.read(tensor.offset + rows[0] * row_bytes, tensor.offset + rows[1] * row_bytes)
        return _values(raw, tensor, (rows[1] - rows[0], *tensor.stored[1:]))  # a copy, writable
    else:
        raw = source.read(tensor.offset, tensor.offset + dtype.itemsize * math.prod(tensor.stored))
        array = _values(raw, tensor, tensor.stored)
    if tensor.axes is not None:
        array = np.transpose(array, tensor.axes)
    if rows is not None:
        array = array[rows[0]:rows[1]]
    return np.array(array, dtype=np.float32, order="C")  # a copy: the bytes read are immutable


def _values(raw: bytes, tensor: StoredTensor, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of stored bytes (BF16: the 16 high bits of a float32, stored as `<u2`)."""
    array = np.frombuffer(raw, dtype=np.dtype(tensor.numpy_dtype)).reshape(shape)
    if tensor.dtype == "BF16":
        return (array.astype("<u4") << 16).view("<f4")
    return array.astype(np.float32)


def stored_infos(tensors: Mapping[str, StoredTensor]) -> dict[str, TensorInfo]:
    """The tensors as a safetensors header would list them: PyTorch's names, shapes and sizes (no byte range)."""
    return {n: TensorInfo(n, t.dtype, t.shape, 0, np.dtype(t.numpy_dtype).itemsize * math.prod(t.shape))
            for n, t in tensors.items()}


class ConvertedWeights:
    """A local TensorFlow or Flax checkpoint file as `sketches.safetensors.RepoWeights` reads a safetensors
    repo: its tensors (`tensors`, under PyTorch's names), each read on `read` in PyTorch's layout. Close it
    (or use `with`). `TFWeights` / `sketches.flax.FlaxWeights` open the file."""

    def __init__(self, path: str | os.PathLike[str], source: ByteSource, tensors: Mapping[str, StoredTensor],
                 handle: object = None) -> None:
        self.root, self.files = str(Path(path).parent), (Path(path).name,)
        self._source, self._tensors, self._handle = source, dict(tensors), handle
        self.header_bytes = source.bytes_read  # the metadata pages read on opening

    def tensors(self) -> dict[str, TensorInfo]:
        return stored_infos(self._tensors)

    def file_of(self, name: str) -> str:
        return self.files[0]

    def read(self, name: str, *, rows: tuple[int, int] | None = None) -> np.ndarray:
        if name not in self._tensors:
            raise SafetensorsError(self._source.name, f"no tensor maps to the PyTorch name {name!r}")
        return read_tensor(self._source, self._handle, self._tensors[name], rows)

    @property
    def bytes_read(self) -> int:
        return self._source.bytes_read

    def close(self) -> None:
        self._source.close()  # type: ignore[attr-defined]

    def __enter__(self) -> ConvertedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)


class TFWeights(ConvertedWeights):
    """A local `tf_model.h5` (`ConvertedWeights`), its HDF5 file open until closed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from sketches.safetensors import FileSource

        source = FileSource(path)
        self._context = open_checkpoint(source)
        try:
            handle, tensors = self._context.__enter__()
        except BaseException:
            source.close()
            raise
        super().__init__(path, source, tensors, handle)

    def close(self) -> None:
        self._context.__exit__(None, None, None)
        super().close()
