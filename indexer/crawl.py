"""The crawl: list new models, read their safetensors headers and a planned few MiB of their weights by
range, and record every model (indexed, skipped or failed, with the reason) in the store.

Per model (`index_model`, shared by `index crawl` and `index add`):
    1. Triage from the file list alone, nothing fetched: gated without a token, pickle-only and
       safetensors-less repos are skipped here (pickles are never downloaded, never unpickled), a pickle-only
       Hub repo unless the conversion bot's safetensors PR is on its current commit (then read from that
       PR: indexer.sources, "Pickle-only repos"), and a GGUF repo holding only incomplete split sets. Adapter
       repos (adapter_config.json + adapter_model.safetensors) go to `indexer.readers` (config, header,
       LoRA factors by range) and to the lineage step as adapters of their declared base.
    2. Headers: one 100,000-byte range read per safetensors file (sharded: model.safetensors.index.json
       first); the family key from the body shapes (`sketches.layers.family_key`).
    3. Plan (`sketches.plan`): which tensors and rows fit the byte budget; coalesce into range reads.
    4. Read and decode those ranges; a NaN or infinite value fails the model.
    5. Cache the blocks (`store.cache.TensorCache`), call the `on_indexed` hook (the sketch / lineage step
       plugs in here; the default does nothing), then queue the `models` row.

The crawl (`crawl`) lists newest first by createdAt and stops a little (`overlap`, 1 h) below the saved
high-water mark (createdAt, id); entries whose (repo_id, sha) is already indexed or skipped are passed over
without a request, so the overlap costs listing only. A second pass lists by lastModified down to its own
mark, so a repo that got a new commit (new sha, old createdAt) is re-indexed. Rows are written in batches;
a pass's mark moves only when the pass listed everything down to the old mark and every row it covers is
durably written (`Store.append`: temp file, fsync, rename). `--limit` counts models fetched, not listed,
so successive limited runs make progress. Marks live in `crawl_state`, one row per (endpoint, filters,
sort): key `<endpoint>?filter=a,b` (created pass) and the same plus `#lastModified` (whose
`cursor_created_at` column then holds a lastModified time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np

from errors import (
    AdapterError,
    BadInputError,
    GatedRepoError,
    GGUFError,
    HubError,
    ModelGraphError,
    QuantizedWeightsError,
    RateLimitedError,
    RepoNotFoundError,
    SafetensorsError,
    StoreError,
    UnsupportedModelError,
)
from indexer.readers import (
    ADAPTER_CONFIG,
    ADAPTER_FAMILY,
    ADAPTER_WEIGHTS,
    AdapterRead,
    NonFiniteWeights,
    QuantInfo,
    QuantizedRead,
    adapter_details,
    choose_gguf,
    gguf_candidates,
    is_projector,
    looks_packed,
    loose_config,
    plan_adapter,
    read_adapter_config,
    read_flax,
    read_gguf,
    read_gguf_split,
    read_keras,
    read_onnx,
    read_packed,
    saved_shapes,
)
from indexer.retry import RetryPolicy
from indexer.sources import (
    CONVERSION_BOT,
    Calls,
    HubRepo,
    HubSource,
    LocalRepo,
    ModelEntry,
    RepoFiles,
    declared_bases,
    reachable,
    read_spans,
)
from settings import DEFAULT_PREFETCH, DEFAULT_THREADS
from sketches.adapter import has_factors, loose_layout
from sketches.flax import FLAX_FILE, FlaxWeightsError
from sketches.layers import canonical_tensors, family_key, tied_heads, wrapper_depth
from sketches.onnx import (
    ONNX_FILES,
    ONNX_SUFFIX,
    OnnxWeightsError,
    choose_onnx_files,
    other_onnx,
)
from sketches.plan import BlockRead, ReadPlan, coalesce, plan_reads
from sketches.safetensors import (
    COMPONENT_INDEX,
    MAX_HEADER_BYTES,
    ByteSource,
    SafetensorsHeader,
    TensorInfo,
    choose_files,
    decode,
    denoiser_folder,
    fused_views,
    read_header,
)
from sketches.tfh5 import TF_FILE, KerasWeightsError
from store.cache import CACHE_DIR, TensorCache
from store.cache import DEFAULT_MAX_BYTES as DEFAULT_CACHE_BYTES
from store.schema import CrawlStateRecord, ModelRecord, Status
from store.tables import Store, open_store, read_records, read_table

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_OVERLAP = timedelta(hours=1)  # the Hub's listing lags uploads by minutes; re-list an hour below the mark
_SHA = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_K = 16  # nominees per arrival: recall@16 of the true parent was 1.0 on the small zoo
DEFAULT_BATCH = 16  # models per Parquet part: a part per model would make the store compact every 64 models
# Reason codes, the part of `reason` before the first ":" (the CLI's --json summary counts them).
SkipCode = Literal["gated", "adapter", "pickle-only", "no-safetensors", "gguf-incomplete", "unsupported-architecture",
                   "header-invalid"]
FailCode = Literal["rate-limited", "network", "truncated", "non-finite", "not-found", "http", "adapter-invalid",
                   "gguf-invalid", "quantized-invalid", "tf-invalid", "flax-invalid", "onnx-invalid", "error"]
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config.json with a quantization_config is a few kB


@dataclass(frozen=True)
class IndexedModel:
    """What the `on_indexed` hook gets: the planned blocks of one model, decoded to float32."""

    entry: ModelEntry
    family: str
    plan: ReadPlan
    shapes: Mapping[str, tuple[int, ...]]  # every tensor of the model, from its headers
    arrays: Mapping[str, np.ndarray]  # tensor -> rows plan-block of it (float32), sorted by name
    weights_format: str = "safetensors"  # the models row's weights_format (store.schema)
    adapter: AdapterRead | None = None  # an adapter repo: its config and saved modules; arrays = LoRA factors
    quant: QuantInfo | None = None  # a quantized copy (GGUF, packed): its scheme and predicted error
    copy_rank: tuple[int, int] = (0, 0)  # ModelRead.copy_rank


@dataclass(frozen=True)
class Placement:
    """What the lineage hook learnt that the models row records: a family decided there (an adapter's is
    its base's) and details to add (an adapter's verdict against its base)."""

    family: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


OnIndexed = Callable[[IndexedModel], "Placement | None"]


def no_sketch(model: IndexedModel) -> None:
    """The default hook: sketches and lineage (the next step of the data flow) plug in here."""


@dataclass(frozen=True)
class Outcome:
    """One model's result. `reason` is "<code>: <detail>" ("" when indexed)."""

    repo_id: str
    revision: str
    status: Status
    reason: str
    family: str
    bytes_read: int  # everything fetched for it: headers + index JSON + tensor ranges
    header_bytes: int
    tensor_bytes: int
    model_bytes: int  # bytes of all its tensors (what a full download would cost)
    requests: int
    seconds: float
    resolver_calls: int = 0  # of `requests`: Hub /resolve/ hits (a 302 to the CDN, or a small file)
    cdn_calls: int = 0  # of `requests`: CDN range reads (0 for a local folder)

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


CONVERTED_STEPS = 1  # a converted file's first copy_rank: as many steps from the original as one wrapper prefix


@dataclass(frozen=True)
class ModelRead:
    """Steps 2-4 done: headers, plan, decoded blocks."""

    family: str
    plan: ReadPlan
    tensors: Mapping[str, TensorInfo]
    arrays: Mapping[str, np.ndarray]
    header_bytes: int
    weights_format: str = "safetensors"
    details: Mapping[str, Any] = field(default_factory=dict)  # the models row's details (JSON-ready)
    adapter: AdapterRead | None = None
    quant: QuantInfo | None = None
    # (wrapper prefixes on its stored names, minus its tensors): which of byte-identical copies is the original
    # when upload times cannot tell (indexer.lineage.ties.duplicate_originals)
    copy_rank: tuple[int, int] = (0, 0)


class _Skip(UnsupportedModelError):
    """Step 1's verdict; `reason` starts with a SkipCode."""


# --- step 1: triage from the file list ---------------------------------------------------------------


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def shard_set(files: Sequence[str]) -> tuple[str, ...] | None:
    """The top-level safetensors files when they are exactly one complete shard set (`x-00001-of-00003`,
    `-00002-`, `-00003-`, nothing else), else None."""
    weights = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    found = [_SHARD.match(f) for f in weights]
    if not weights or not all(found):
        return None
    stems = {(m.group("stem"), int(m.group("n"))) for m in found if m}
    indices = sorted(int(m.group("i")) for m in found if m)
    if len(stems) != 1 or indices != list(range(1, next(iter(stems))[1] + 1)):
        return None
    return tuple(weights)


def weight_layout(entry: ModelEntry, *, have_token: bool) -> tuple[str, ...]:
    """The safetensors files to read (a complete shard set itself, else its index file first), or raise
    _Skip with the reason."""
    top = sorted(f for f in entry.files if "/" not in f)
    if entry.gated and not have_token:
        raise _Skip(entry.repo_id, "gated: gated repo and no token (set HF_TOKEN after accepting its terms)")
    if ADAPTER_FILES[0] in top and SINGLE_FILE not in top and INDEX_FILE not in top:
        if ADAPTER_FILES[1] in top:
            return ADAPTER_FILES  # indexer.readers: config, header, LoRA factors by range
        raise _Skip(entry.repo_id, "adapter: adapter_config.json without adapter_model.safetensors "
                                   "(a pickled adapter_model.bin is never read)")
    if INDEX_FILE in top:
        # every shard's header is read anyway, and together they name every tensor: the index would only
        # cost a resolver call (3 -> 2 for a two-shard 7B, the Hub's rate limit binding). Kept when the
        # top-level files are not exactly one complete `-0000i-of-0000N` set (a stale shard, a second set).
        return shard_set(top) or (INDEX_FILE,)
    if SINGLE_FILE in top:
        return (SINGLE_FILE,)
    denoiser = denoiser_folder(entry.files)
    if denoiser is not None:  # a diffusers pipeline: its denoiser's shard index, else its files
        # before top-level files: SD 1.5 / SDXL base repos carry a single-file checkpoint (original
        # LDM names) beside the pipeline, and their diffusers-format fine-tunes hold the pipeline's names
        if f"{denoiser}/{COMPONENT_INDEX}" in entry.files:
            return (f"{denoiser}/{COMPONENT_INDEX}",)
        return tuple(sorted(f for f in entry.files if f.startswith(f"{denoiser}/") and f.count("/") == 1
                            and f.endswith(".safetensors")))
    weights = tuple(f for f in top if f.endswith(".safetensors"))
    if weights:
        return weights
    gguf_files = choose_gguf(top)
    if gguf_files is not None:
        return gguf_files  # a GGUF repo (no safetensors; usually no config.json either): a file or a split set
    missing = gguf_candidates(top)[1]
    if missing:  # only incomplete gguf-split sets: a part of a model would never join its family
        raise _Skip(entry.repo_id, f"gguf-incomplete: gguf-split set without {', '.join(missing[:3])}")
    projectors = [f for f in top if f.lower().endswith(".gguf") and is_projector(f)]
    if projectors:
        raise _Skip(entry.repo_id, f"gguf-projector-only: {', '.join(projectors[:3])} is a vision-language "
                                   "model's image encoder (mmproj), and no language model file is beside it")
    pickles = [f for f in top if f.endswith(PICKLE_SUFFIXES)]
    if pickles:  # the bot's safetensors PR (exactly PyTorch's weights) first, else its TF file (`repo_layout`)
        raise _Skip(entry.repo_id, f"pickle-only: pickled weights are never downloaded ({', '.join(pickles[:3])})")
    if TF_FILE in top:
        return (TF_FILE,)  # a TensorFlow-only repo: Keras' HDF5 weights (sketches.tfh5)
    if FLAX_FILE in top:
        return (FLAX_FILE,)  # a Flax-only repo: the msgpack parameter tree (sketches.flax)
    onnx_files = choose_onnx_files(entry.files)
    if onnx_files is not None:
        return onnx_files  # an ONNX-only repo (transformers.js, optimum): one graph, or an encoder's and decoder's
    unread = other_onnx(entry.files)
    if unread:
        raise _Skip(entry.repo_id, "onnx-unsupported: no ONNX export to read (found "
                                   f"{', '.join(unread[:3])}; read: {', '.join(ONNX_FILES)}, or an encoder_ and a "
                                   "decoder_ graph of one of them)")
    if any(f.startswith("tf_model-") and f.endswith(".h5") for f in top):
        raise _Skip(entry.repo_id, "no-safetensors: sharded TensorFlow weights (tf_model-0000i-of-0000n.h5) are not read")
    raise _Skip(entry.repo_id, "no-safetensors: no top-level *.safetensors file")


# --- step 2: headers ---------------------------------------------------------------------------------


def _weight_map(thing: str, raw: bytes, files: Sequence[str], folder: str = "") -> dict[str, str]:
    """tensor -> shard path of a shard index (paths relative to the repo: under `folder` for a component's)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(thing, f"index is not JSON ({exc})") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SafetensorsError(thing, "weight_map must be a non-empty object of tensor name -> shard file name")
    weight_map = {k: f"{folder}/{v}" if folder else v for k, v in weight_map.items()}
    missing = sorted(set(weight_map.values()) - set(files))
    if missing:
        raise SafetensorsError(thing, f"shard {missing[0]!r} is listed but not in the repo")
    return dict(sorted(weight_map.items()))


def read_headers(repo: RepoFiles, layout: tuple[str, ...]) -> tuple[dict[str, ByteSource], dict[str, tuple[str, TensorInfo]]]:
    """(sources by file, tensor -> (file, info)) for the layout's files, headers validated."""
    weight_map = None
    files = layout
    if len(layout) == 1 and layout[0].endswith(".safetensors.index.json"):  # the repo's, or a component's
        thing = f"{repo.entry.repo_id}/{layout[0]}"
        folder = layout[0].rpartition("/")[0]
        weight_map = _weight_map(thing, repo.read_small(layout[0], limit=MAX_HEADER_BYTES), repo.entry.files, folder)
        files = tuple(sorted(set(weight_map.values())))
    sources = {f: repo.open(f) for f in files}
    headers: dict[str, SafetensorsHeader] = {f: read_header(s) for f, s in sources.items()}
    if weight_map is None and len(files) > 1 and shard_set(files) is None:  # variants (x, x.fp16): read once
        kept = choose_files(headers)
        sources, headers = {f: sources[f] for f in kept}, {f: headers[f] for f in kept}
    where: dict[str, tuple[str, TensorInfo]] = {}
    for file, header in sorted(headers.items()):
        for info in header.tensors:
            if info.name in where:
                raise SafetensorsError(repo.entry.repo_id, f"tensor {info.name!r} is in both {where[info.name][0]} and {file}")
            if weight_map is not None and weight_map.get(info.name, file) != file:
                continue  # the index is authoritative about which shard holds a tensor
            where[info.name] = (file, info)
    if weight_map is not None and (lost := sorted(set(weight_map) - set(where))):
        raise SafetensorsError(repo.entry.repo_id, f"the index lists {lost[0]!r} but its shard does not hold it")
    return sources, fused_views(where)  # fused MoE experts and FLUX q/k/v split into views, sorted


# --- steps 3-4: plan, read, decode ---------------------------------------------------------------------


def read_planned(sources: Mapping[str, ByteSource], where: Mapping[str, tuple[str, TensorInfo]], plan: ReadPlan) -> dict[str, np.ndarray]:
    """Read the plan's coalesced ranges and decode each block; NaN/Inf raises a 'non-finite' error."""
    arrays: dict[str, np.ndarray] = {}
    ranges = coalesce(plan, where)
    raws: dict[int, bytes] = {}
    for file in dict.fromkeys(r.file for r in ranges):  # files in plan order; a file's ranges in parallel
        mine = [i for i, r in enumerate(ranges) if r.file == file]
        raws.update(zip(mine, read_spans(sources[file], [(ranges[i].start, ranges[i].end) for i in mine]), strict=True))
    for i, rng in enumerate(ranges):
        raw = raws[i]
        for piece in rng.pieces:
            info = where[piece.tensor][1]
            shape = (piece.rows[1] - piece.rows[0], *info.shape[1:])
            array = decode(raw[piece.offset: piece.offset + piece.nbytes], info.dtype, shape, name=piece.tensor)
            if not np.isfinite(array).all():
                raise _NonFinite(piece.tensor, "non-finite: NaN or infinite weights")
            arrays[piece.tensor] = array
    return dict(sorted(arrays.items()))


class _NonFinite(ModelGraphError):
    def __init__(self, tensor: str, reason: str) -> None:
        self.reason = f"{reason} in {tensor}"
        super().__init__(self.reason)


def read_adapter(repo: RepoFiles, *, budget: int) -> ModelRead:
    """Steps 2-4 for an adapter repo (indexer.readers): config, header, LoRA factor pairs within the budget."""
    config = read_adapter_config(repo.read_small, repo.entry.repo_id, repo.entry.declared_base_model)
    sources, where = read_headers(repo, (ADAPTER_WEIGHTS,))
    header_bytes = repo.bytes_read
    tensors = {name: info for name, (_, info) in where.items()}
    if has_factors(config):
        plan, pairs, read = plan_adapter(tensors, budget=budget, repo_id=repo.entry.repo_id)
        saved = saved_shapes(tensors)
    else:  # IA3, prompt tuning, ...: the base it declares is all that is placed; full copies still checked
        plan, pairs, read = ReadPlan(ADAPTER_FAMILY, budget, (), 0, sum(t.nbytes for t in tensors.values())), 0, 0
        saved = saved_shapes({n: t for n, t in tensors.items() if ".modules_to_save." in n})
    arrays = read_planned(sources, where, plan)
    details = adapter_details(config, saved, pairs, read)
    return ModelRead("", plan, tensors, arrays, header_bytes, "adapter", details,
                     AdapterRead(config, saved, pairs, read, details))


def read_loose_adapter(repo: RepoFiles, sources: Mapping[str, ByteSource], where: Mapping[str, tuple[str, TensorInfo]],
                       layout: str, *, budget: int) -> ModelRead:
    """A LoRA file without a config (`sketches.adapter.loose_layout`): its base from the model card, its
    factor pairs (and alphas) within the budget; no saved modules. Of several such files (the same
    adapter in two layouts), the one with the most tensors."""
    header_bytes = repo.bytes_read
    files = sorted({f for f, _ in where.values()})
    if len(files) > 1:  # one adapter saved twice (diffusers' file beside its kohya conversion): read one
        count = {f: sum(1 for g, _ in where.values() if g == f) for f in files}
        files = [min(files, key=lambda f: (-count[f], f))]
        where = {n: v for n, v in where.items() if v[0] == files[0]}
        layout = loose_layout(where) or layout
    tensors = {name: info for name, (_, info) in where.items()}
    config = loose_config(tensors, layout, repo.entry.declared_base_model, thing=f"{repo.entry.repo_id}/{files[0]}")
    plan, pairs, read = plan_adapter(tensors, budget=budget, repo_id=repo.entry.repo_id, layout=layout, file=files[0])
    arrays = read_planned(sources, where, plan)
    details = adapter_details(config, {}, pairs, read) | {"base_from": "model card"}
    return ModelRead("", plan, tensors, arrays, header_bytes, "adapter", details,
                     AdapterRead(config, {}, pairs, read, details))


def _quantized(read: QuantizedRead, header_bytes: int, weights_format: str) -> ModelRead:
    tensors = {n: TensorInfo(n, "BF16", s, 0, 2 * math.prod(s)) for n, s in read.shapes.items()}  # as planned
    return ModelRead(read.family, read.plan, tensors, read.arrays, header_bytes, weights_format, read.details,
                     quant=read.quant)


def read_gguf_model(repo: RepoFiles, files: Sequence[str], *, budget: int) -> ModelRead:
    """A GGUF repo (indexer.readers.read_gguf): header by range, the planned rows dequantized; a gguf-split
    set (several files) read as one model (indexer.readers.read_gguf_split)."""
    if len(files) == 1:
        read = read_gguf(repo.open(files[0]), budget=budget)
    else:
        read = read_gguf_split([repo.open(f) for f in files], budget=budget)
    return _quantized(read, read.header_bytes, "gguf")


def read_converted_model(repo: RepoFiles, file: str, *, budget: int) -> ModelRead:
    """A TensorFlow repo's `tf_model.h5` or a Flax repo's `flax_model.msgpack` (indexer.readers.read_keras,
    read_flax): the metadata through a page cache, the planned rows by range, under PyTorch's names and
    layout."""
    try:
        read = (read_keras if file == TF_FILE else read_flax)(repo.open(file), budget=budget)
    except UnsupportedModelError as exc:
        raise _Skip(repo.entry.repo_id, f"unsupported-architecture: {exc.reason}") from None
    weights_format = "tf-h5" if file == TF_FILE else "flax-msgpack"
    return ModelRead(read.family, read.plan, read.tensors, read.arrays, repo.bytes_read, weights_format, read.details,
                     copy_rank=converted_rank(read.details))


def read_onnx_model(repo: RepoFiles, files: Sequence[str], *, budget: int) -> ModelRead:
    """An ONNX export (indexer.readers.read_onnx): nodes and weight headers through a page cache, the planned
    rows by range, under PyTorch's names and layout; an 8-bit or 4-bit copy dequantized and labelled quantized;
    an encoder-decoder export's two graphs as one model. A tensor stored in another file (`model.onnx_data`)
    is read from that file of the repo."""
    file = files[0]
    folder = file.rsplit("/", 1)[0] + "/" if "/" in file else ""

    def open_beside(location: str) -> ByteSource:
        path = f"{folder}{location}"
        if path not in repo.entry.files:
            raise OnnxWeightsError(f"{repo.entry.repo_id}/{file}", f"its weights are in {path!r}, not in the repo")
        return repo.open(path)

    try:
        read = read_onnx([repo.open(f) for f in files], open_beside, budget=budget)
    except UnsupportedModelError as exc:
        raise _Skip(repo.entry.repo_id, f"unsupported-architecture: {exc.reason}") from None
    if isinstance(read, QuantizedRead):
        return _quantized(read, repo.bytes_read, "onnx")
    return ModelRead(read.family, read.plan, read.tensors, read.arrays, repo.bytes_read, "onnx", read.details,
                     copy_rank=converted_rank(read.details))


def converted_rank(details: Mapping[str, Any]) -> tuple[int, int]:
    """`ModelRead.copy_rank` of a TensorFlow, Flax or ONNX file: one conversion away from the PyTorch weights it
    was made from, so of two byte-identical copies without upload times the safetensors one is the original
    (an ONNX T5 reads its tied lm_head apart, one tensor more, and took its source's place)."""
    return CONVERTED_STEPS, -int(details.get("tensors", 0))


def _config(repo: RepoFiles) -> dict[str, Any] | None:
    """config.json (its quantization_config decides a packed scheme), or None when the repo has none."""
    if CONFIG_FILE not in repo.entry.files:
        return None
    raw = repo.read_small(CONFIG_FILE, limit=MAX_CONFIG_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise QuantizedWeightsError(f"{repo.entry.repo_id}/{CONFIG_FILE}", f"not JSON ({exc})") from None
    return doc if isinstance(doc, dict) else None


def repo_layout(repo: RepoFiles, *, have_token: bool) -> tuple[str, ...]:
    """`weight_layout` of the repo; a pickle-only Hub repo with the conversion bot's safetensors PR on its
    current commit is read from that PR (`HubRepo.convert`), else skipped as pickle-only."""
    try:
        return weight_layout(repo.entry, have_token=have_token)
    except _Skip as skip:
        convert = getattr(repo, "convert", None)
        # a pickle-only diffusers pipeline (unet/diffusion_pytorch_model.bin) reads "no-safetensors": the
        # bot converts those too
        pickled = skip.reason.startswith("pickle-only") or (
            skip.reason.startswith("no-safetensors") and any(f.endswith(PICKLE_SUFFIXES) for f in repo.entry.files))
        if not pickled or convert is None:
            if pickled and (safe := _safe_twin(repo.entry.files)):
                return safe
            raise
        files = convert()
        if files is None and (safe := _safe_twin(repo.entry.files)):
            return safe  # PyTorch's pickle and TensorFlow's HDF5 or Flax's msgpack: the one safe to read
        if files is None:
            raise _Skip(repo.entry.repo_id, f"{skip.reason}; no open {CONVERSION_BOT} safetensors PR on its "
                                            "current commit") from None
        return weight_layout(replace(repo.entry, files=files), have_token=have_token)


def _safe_twin(files: Sequence[str]) -> tuple[str, ...] | None:
    """The TensorFlow, Flax or ONNX weights of a repo whose PyTorch weights are a pickle (never read)."""
    return next(((f,) for f in (TF_FILE, FLAX_FILE) if f in files), choose_onnx_files(files))


def read_model(repo: RepoFiles, *, budget: int, have_token: bool) -> ModelRead:
    """Steps 1-4 for one model (raises on skip or failure; `classify` turns that into a reason)."""
    layout = repo_layout(repo, have_token=have_token)
    if layout == ADAPTER_FILES:
        return read_adapter(repo, budget=budget)
    if layout[0].endswith(".gguf"):
        return read_gguf_model(repo, layout, budget=budget)
    if layout in ((TF_FILE,), (FLAX_FILE,)):
        return read_converted_model(repo, layout[0], budget=budget)
    if layout[0].endswith(ONNX_SUFFIX):
        return read_onnx_model(repo, layout, budget=budget)
    sources, where = read_headers(repo, layout)
    header_bytes = repo.bytes_read
    lora_layout = loose_layout(where)  # a LoRA file without adapter_config.json (diffusers, kohya)
    if lora_layout is not None:
        return read_loose_adapter(repo, sources, where, lora_layout, budget=budget)
    if looks_packed({name: info for name, (_, info) in where.items()}):
        quant, weights_format = read_packed(sources, where, _config(repo), budget=budget)
        return _quantized(quant, header_bytes, weights_format)
    # compared under normalised names, learned float tensors only (sketches.layers.canonical_tensors)
    stored = canonical_tensors({name: info for name, (_, info) in where.items()})
    where = {name: where[raw] for name, raw in stored.items()}
    tensors = {name: info for name, (_, info) in where.items()}
    try:
        family = family_key({name: info.shape for name, info in tensors.items()})
    except UnsupportedModelError as exc:
        raise _Skip(repo.entry.repo_id, f"unsupported-architecture: {exc.reason}") from None
    try:
        plan = plan_reads(tensors, family=family, budget=budget)
    except UnsupportedModelError as exc:
        raise _Skip(repo.entry.repo_id, f"unsupported-architecture: {exc.reason}") from None
    arrays, tensors = _untied(read_planned(sources, where, plan), tensors)
    # a model larger than the budget is indexed on what fits: the models row says how much that was
    partial = {"read_fraction": round(plan.fraction, 6)} if not all(b.whole for b in plan.blocks) else {}
    return ModelRead(family, plan, tensors, arrays, header_bytes, details=partial,
                     copy_rank=(max((wrapper_depth(n) for n in where), default=0), -len(where)))


def _untied(arrays: Mapping[str, np.ndarray], tensors: Mapping[str, Any]
            ) -> tuple[Mapping[str, np.ndarray], Mapping[str, Any]]:
    """A tied lm_head saved twice is the embedding, once (sketches.layers.tied_heads): dropped from both. Checked
    on what the plan read of both, so it costs no request (a converted file: `indexer.readers._read_converted`)."""
    kept_arrays, kept_tensors = arrays, tensors
    for tied in tied_heads({name: tuple(np.shape(a)) for name, a in arrays.items()},
                           lambda name, rows: arrays[name][rows[0]:rows[1]]):
        kept_arrays, kept_tensors = _without(kept_arrays, tied), _without(kept_tensors, tied)
    return kept_arrays, kept_tensors


def _without(mapping: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != name}


def read_folder(folder: Path, *, budget: int) -> tuple[ModelRead, ModelEntry]:
    """`read_model` of a local repo folder (indexer.sources.LocalRepo), its files closed after; and the
    folder's entry (local revision, upload time from a zoo's hub.json)."""
    repo = LocalRepo(folder)
    try:
        return read_model(repo, budget=budget, have_token=True), repo.entry
    finally:
        repo.close()


class ReadAhead:
    """A model's `read_model` started ahead of the crawl (distributed.ThreadHub): the RepoFiles it reads
    through (bytes and calls counted there) and the future of its read; `read()` returns it or raises its
    error, which `Indexer.index_model` classifies as if it had read the model itself."""

    def __init__(self, repo: HubRepo, future: Future[ModelRead]) -> None:
        self.entry, self._repo, self._future = repo.entry, repo, future

    def read(self) -> ModelRead:
        return self._future.result()

    @property
    def weights_from(self) -> str:
        return getattr(self._repo, "weights_from", "")

    def cancel(self) -> bool:
        return self._future.cancel()

    @property
    def bytes_read(self) -> int:
        return self._repo.bytes_read

    @property
    def requests(self) -> int:
        return self._repo.requests

    @property
    def calls(self) -> Calls:
        return self._repo.calls


def classify(exc: Exception) -> tuple[Status, str]:
    """An exception from `read_model` -> (status, "<code>: <detail>")."""
    if isinstance(exc, _Skip):
        return "skipped", exc.reason
    if isinstance(exc, _NonFinite):
        return "failed", exc.reason
    if isinstance(exc, AdapterError):  # before SafetensorsError's siblings: a BadInputError too
        return "failed", f"adapter-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, KerasWeightsError):  # before SafetensorsError: it is one
        return "failed", f"tf-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, FlaxWeightsError):  # likewise
        return "failed", f"flax-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, OnnxWeightsError):  # likewise
        return "failed", f"onnx-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, GGUFError):
        return "failed", f"gguf-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, QuantizedWeightsError):
        return "failed", f"quantized-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, NonFiniteWeights):
        return "failed", exc.reason
    if isinstance(exc, SafetensorsError):
        if "truncated" in exc.reason:
            return "failed", f"truncated: {exc.reason}"
        return "skipped", f"header-invalid: {exc.thing}: {exc.reason}"
    if isinstance(exc, UnsupportedModelError):
        return "skipped", f"unsupported-architecture: {exc.reason}"
    if isinstance(exc, GatedRepoError):
        return "skipped", f"gated: {exc.reason}"
    if isinstance(exc, RateLimitedError):
        return "failed", f"rate-limited: {exc.reason}"
    if isinstance(exc, RepoNotFoundError):
        return "failed", f"not-found: {exc.reason}"
    if isinstance(exc, HubError):
        code = exc.reason.split(":", 1)[0]
        return "failed", exc.reason if code in ("network", "truncated") or code.startswith("http-") else f"http: {exc.reason}"
    if isinstance(exc, ModelGraphError):
        return "failed", f"error: {exc}"
    # A bug on one odd model must not stop a nightly crawl: recorded, logged with its traceback.
    logger.exception("unexpected error while indexing")
    return "failed", f"error: {type(exc).__name__}: {exc}"


# --- one model, end to end -----------------------------------------------------------------------------


@dataclass
class Indexer:
    """Runs `index_model` against one open store: cache, hook, row batching."""

    store: Store
    budget: int
    have_token: bool
    on_indexed: OnIndexed = no_sketch
    batch: int = DEFAULT_BATCH
    cache: TensorCache | None = None
    on_flush: Callable[[], None] | None = None  # the lineage step's own rows, written after the models rows
    pending: list[ModelRecord] = field(default_factory=list)
    known: dict[tuple[str, str], tuple[Status, str]] = field(default_factory=dict)  # -> (status, reason code)

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = TensorCache(self.store.home / CACHE_DIR)
        self._writer = _CacheWriter(self.cache)
        placed = self._placed() if self.on_flush is not None else None
        for record in self.store.records("models"):
            key = (record.repo_id, record.revision)  # type: ignore[union-attr]
            if placed is not None and record.status == "indexed" and key not in placed:  # type: ignore[union-attr]
                continue  # a crash came between its models row and its lineage rows: index it again
            self.known[key] = (record.status, record.reason.split(":", 1)[0])  # type: ignore[union-attr]

    def _placed(self) -> set[tuple[str, str]]:
        """(repo_id, revision) of every model the lineage step has committed: its sketch row is the mark, or
        for a model that has no sketch (an adapter: its LoRA factors are not weights) its edges row."""
        sketched = {(r.repo_id, r.revision) for r in self.store.records("sketches")}  # type: ignore[union-attr]
        edges = read_table(self.store.home, "edges", columns=["repo_id", "revision", "relation"]).to_pylist()
        return sketched | {(e["repo_id"], e["revision"]) for e in edges if e["relation"] == "adapter"}

    def is_done(self, entry: ModelEntry) -> bool:
        """Already indexed or skipped at this revision. A failed one is tried again, and so is one skipped
        as gated once we have a token (the user may have accepted its terms since)."""
        status, code = self.known.get((entry.repo_id, entry.revision), ("failed", ""))
        return status == "indexed" or (status == "skipped" and not (code == "gated" and self.have_token))

    def index_model(self, repo: RepoFiles) -> Outcome:
        entry, started = repo.entry, time.perf_counter()
        family, plan_bytes, header_bytes, model_bytes = "", 0, 0, 0
        weights_format, details = "", "{}"
        try:
            read = repo.read() if isinstance(repo, ReadAhead) else read_model(repo, budget=self.budget,
                                                                               have_token=self.have_token)
            family, header_bytes = read.family, read.header_bytes
            model_bytes = read.plan.model_bytes
            placed = self._keep(entry, read)
            family = placed.family if placed is not None and placed.family is not None else family
            weights_format = read.weights_format
            converted = {"weights_from": repo.weights_from} if getattr(repo, "weights_from", "") else {}
            details = json.dumps({**read.details, **(placed.details if placed is not None else {}), **converted},
                                 sort_keys=True)
            status, reason = "indexed", ""
        except StoreError:
            raise  # the store is broken: stop, the cursor stays where it was
        except Exception as exc:  # noqa: BLE001 -- one model never stops the crawl; see classify
            status, reason = classify(exc)
            logger.info("%s: %s %s", entry.repo_id, status, reason)
        total = repo.bytes_read
        plan_bytes = total - header_bytes if status == "indexed" else 0
        self._queue(entry, family=family, status=status, reason=reason, bytes_read=total,
                    weights_format=weights_format, details=details)
        calls = getattr(repo, "calls", None) or Calls()  # per host (a Hub read or its replay): the crawl rate's "calls per model"
        return Outcome(entry.repo_id, entry.revision, status, reason, family, total, header_bytes, plan_bytes,
                       model_bytes, repo.requests, time.perf_counter() - started, calls.resolver, calls.cdn)

    def _keep(self, entry: ModelEntry, read: ModelRead) -> Placement | None:
        self._writer.put_all([((entry.repo_id, entry.revision, b.tensor, b.rows[0]), read.arrays[b.tensor])
                              for b in read.plan.blocks])
        shapes = {name: info.shape for name, info in read.tensors.items()}
        return self.on_indexed(IndexedModel(entry, read.family, read.plan, shapes, read.arrays,
                                            read.weights_format, read.adapter, read.quant, read.copy_rank))

    def _queue(self, entry: ModelEntry, *, family: str, status: Status, reason: str, bytes_read: int,
               weights_format: str = "", details: str = "{}") -> None:
        self.pending.append(ModelRecord(
            repo_id=entry.repo_id, revision=entry.revision, family=family, status=status,
            indexed_at=datetime.now(UTC), created_at=entry.created_at, last_modified=entry.last_modified,
            reason=reason, declared_base_model=entry.declared_base_model, declared_relation=entry.declared_relation,
            library=entry.library, pipeline_tag=entry.pipeline_tag, n_parameters=entry.n_parameters,
            bytes_read=bytes_read, source=entry.source, weights_format=weights_format, details=details,
        ))
        self.known[(entry.repo_id, entry.revision)] = (status, reason.split(":", 1)[0])
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows as one Parquet part (durable when this returns); finish cache writes."""
        self._writer.drain()
        # The models rows first, then the lineage rows: a reader then never sees an edge whose parent has
        # no models row yet (regression: RELIABILITY.md "dangling parent", seen after 8 of 25 kills).
        if self.pending:
            self.store.append("models", self.pending)
            self.pending = []
        if self.on_flush is not None:
            self.on_flush()

    def close(self) -> None:
        """Flush the rows and stop the cache writer."""
        self.flush()
        self._writer.close()


class _CacheWriter:
    """Cache writes on one background thread, overlapped with the next model's range reads: a 7B model's
    64 MiB of BF16 is 128 MiB of float32 .npy files, each fsynced, which otherwise took half the crawl time
    (bench/crawl.py). At most one model's blocks are in flight, so memory stays bounded. The cache is
    best-effort: a failed write is logged, never fatal (the bytes can be read again by range)."""

    def __init__(self, cache: TensorCache) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._cache = cache
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensor-cache")
        self._inflight: object = None

    def put_all(self, items: list[tuple[tuple[str, str, str, int], np.ndarray]]) -> None:
        self.drain()
        self._inflight = self._pool.submit(self._write, items)

    def _write(self, items: list[tuple[tuple[str, str, str, int], np.ndarray]]) -> None:
        for key, array in items:
            try:
                self._cache.put(key, array)
            except (OSError, ModelGraphError) as exc:
                logger.warning("tensor cache: %s not kept (%s)", key[2], exc)

    def drain(self) -> None:
        if self._inflight is not None:
            self._inflight.result()  # type: ignore[attr-defined]
            self._inflight = None

    def close(self) -> None:
        self.drain()
        self._pool.shutdown()


# --- reports -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrawlReport:
    outcomes: tuple[Outcome, ...]
    seen: int  # listed entries examined (already-indexed ones included)
    unchanged: int  # listed but already indexed / skipped at that revision: nothing fetched
    seconds: float
    cursors: Mapping[str, str]  # cursor key -> "moved to <ts> <id>" | "kept" | "new"

    def as_dict(self) -> dict[str, object]:
        by: dict[str, dict[str, int]] = {"skipped": {}, "failed": {}}
        for o in self.outcomes:
            if o.status in by:
                by[o.status][o.code] = by[o.status].get(o.code, 0) + 1
        return {
            "seen": self.seen,
            "indexed": sum(o.status == "indexed" for o in self.outcomes),
            "unchanged": self.unchanged,
            "skipped": dict(sorted(by["skipped"].items())),
            "failed": dict(sorted(by["failed"].items())),
            "bytes_read_total": sum(o.bytes_read for o in self.outcomes),
            "bytes_read_max_per_model": max((o.bytes_read for o in self.outcomes), default=0),
            "calls": {"resolver": sum(o.resolver_calls for o in self.outcomes),  # Hub /resolve/ hits
                      "cdn": sum(o.cdn_calls for o in self.outcomes)},  # range reads on the CDN
            "seconds": round(self.seconds, 3),
            "cursors": dict(sorted(self.cursors.items())),
        }


def _progress(enabled: bool, unit: str = "model") -> object:
    from tqdm import tqdm

    return tqdm(unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)  # stderr by default


# --- the Hub crawl ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrawlOptions:
    endpoint: str
    token: str | None = field(default=None, repr=False)
    archs: tuple[str, ...] = ()
    library: str | None = None
    limit: int | None = None  # models fetched (not merely listed) this run
    since: datetime | None = None  # never list below this createdAt
    budget: int = 16 * 1024 * 1024  # settings.DEFAULT_BUDGET_MIB (plan v3, issue 14)
    overlap: timedelta = DEFAULT_OVERLAP
    batch: int = DEFAULT_BATCH
    progress: bool = True
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    k: int = DEFAULT_K  # parent nominees per arriving model
    device: str = "auto"  # exact distances: auto uses CUDA when present
    cache_bytes: int = DEFAULT_CACHE_BYTES  # the on-disk tensor cache's bound (misses are read again by range)
    prefetch: int = DEFAULT_PREFETCH  # threads reading ahead (DEFAULT_PREFETCH); 0: none
    threads: int = DEFAULT_THREADS  # the numeric libraries' threads during the crawl (DEFAULT_THREADS)
    revisit: int = 0  # pickle-only repos skipped by earlier crawls looked at again (`_revisit`)


# Entries of the models indexed this run, by (repo_id, revision), for the lineage step's re-reads of evicted
# nominees: with the entry (its file list) at hand a re-read costs no model_info call, an API call each
# (bench/crawl_rate.py: 0.79 re-reads a model on 80 virtual 7B models, which made the Hub's API bucket
# bind before the resolver bucket). An entry is about 1 KB: 65,536 of them, 64 MB at most.
RECENT_ENTRIES = 65_536


class _Recent(OrderedDict[tuple[str, str], ModelEntry]):
    """The last RECENT_ENTRIES entries indexed, oldest dropped first."""

    def note(self, entry: ModelEntry) -> None:
        self[(entry.repo_id, entry.revision)] = entry
        self.move_to_end((entry.repo_id, entry.revision))
        while len(self) > RECENT_ENTRIES:
            self.popitem(last=False)


@dataclass
class _Run:
    indexer: Indexer
    hub: HubSource
    options: CrawlOptions
    recent: _Recent = field(default_factory=_Recent)  # entries for re-reads (hub_refetch)
    outcomes: list[Outcome] = field(default_factory=list)
    seen: int = 0
    unchanged: int = 0
    bar: object = None
    listed: set[tuple[str, str]] = field(default_factory=set)  # (repo_id, revision) listed this run

    def budget_left(self) -> bool:
        return self.options.limit is None or len(self.outcomes) < self.options.limit


def cursor_key(endpoint: str, filters: Sequence[str], sort: str = "created_at") -> str:
    key = f"{endpoint.rstrip('/')}?filter={','.join(filters)}"
    return key if sort == "created_at" else f"{key}#lastModified"


def _stop_at(mark: CrawlStateRecord | None, options: CrawlOptions, sort: str) -> datetime | None:
    floor = options.since if sort == "created_at" else None
    if mark is None:
        return floor
    below = mark.cursor_created_at - options.overlap
    return max(below, floor) if floor is not None else below


def _pass(run: _Run, *, filters: Sequence[str], sort: Literal["created_at", "last_modified"],
          mark: CrawlStateRecord | None) -> tuple[bool, tuple[datetime, str] | None, datetime | None]:
    """One listing pass; returns (complete, newest (time, id) listed, newest lastModified listed)."""
    stop = _stop_at(mark, run.options, sort)
    complete = True  # False once a model is left out: the mark must not pass it
    retry_from: tuple[datetime, str] | None = None  # the oldest model that failed transiently
    newest: tuple[datetime, str] | None = None
    newest_modified: datetime | None = None
    for entry in run.hub.list_models(sort=sort, filters=filters):
        moment = entry.created_at if sort == "created_at" else entry.last_modified
        if stop is not None and moment is not None and moment < stop:
            return complete, retry_from or newest, newest_modified
        if newest is None and moment is not None:
            newest = (moment, entry.repo_id)
        if entry.last_modified is not None:
            newest_modified = max(newest_modified or entry.last_modified, entry.last_modified)
        if not _SHA.match(entry.revision):  # a listing without the sha: ask model_info (retried)
            try:
                entry = run.hub.model_info(entry.repo_id)
            except HubError as exc:
                logger.warning("%s: no revision (%s); left for the next crawl", entry.repo_id, exc.reason)
                run.seen += (entry.repo_id, entry.revision) not in run.listed
                run.listed.add((entry.repo_id, entry.revision))
                complete = False
                continue
        first = (entry.repo_id, entry.revision) not in run.listed  # both passes list the overlap: count once
        run.listed.add((entry.repo_id, entry.revision))
        run.seen += first
        if run.indexer.is_done(entry):
            run.unchanged += first  # indexed earlier in this run (the other pass) is not "unchanged"
            continue
        if not run.budget_left():
            return False, retry_from or newest, newest_modified
        run.recent.note(entry)
        outcome = run.indexer.index_model(run.hub.repo(entry))
        run.outcomes.append(outcome)
        if moment is not None and _retry_later(outcome):
            retry_from = (moment, entry.repo_id)  # listed newest first: the last one seen is the oldest
        run.bar.update(1)  # type: ignore[attr-defined]
        run.bar.set_postfix_str(f"{outcome.status} {entry.repo_id}", refresh=False)  # type: ignore[attr-defined]
    # A mark at a transiently failed model keeps it inside the next crawl's listing (stop = mark - overlap);
    # a mark at the newest model would pass it, and it would never be tried again (regression: see
    # tests/test_reliability_faults.py::test_a_failed_model_months_older_than_the_newest_is_retried).
    return complete, retry_from or newest, newest_modified


def _revisit(run: _Run, store: Store) -> None:
    """Up to `options.revisit` pickle-only repos that earlier crawls skipped, looked at again: the conversion
    bot may have opened its safetensors PR since (it does when someone loads the repo with transformers),
    and neither listing pass meets an old repo again. A model_info call each, then the PR lookup. Which
    ones: a sample that changes every day (a hash of the date and the repo), so every repo comes up in turn
    with no state kept."""
    if run.options.revisit <= 0:
        return
    run.indexer.flush()  # this run's own skips are on disk too
    source = run.options.endpoint.rstrip("/")
    skipped = {r.repo_id for r in read_records(store.home, "models", status="skipped")  # type: ignore[union-attr]
               if r.reason.startswith("pickle-only") and r.source == source}  # type: ignore[union-attr]
    day = datetime.now(UTC).date().isoformat()
    decided = {(o.repo_id, o.revision) for o in run.outcomes}
    for repo_id in sorted(skipped, key=lambda r: hashlib.sha1(f"{day} {r}".encode()).hexdigest())[:run.options.revisit]:
        try:
            entry = run.hub.model_info(repo_id)
        except HubError as exc:  # gone, made private, or the Hub failing: the next day's sample differs
            logger.info("%s: not revisited (%s)", repo_id, exc.reason)
            continue
        if (entry.repo_id, entry.revision) in decided:
            continue  # read by this run's listing already
        outcome = run.indexer.index_model(run.hub.repo(entry))
        run.outcomes.append(outcome)
        run.bar.update(1)  # type: ignore[attr-defined]


def _retry_later(outcome: Outcome) -> bool:
    """Failed for a reason that may clear (429, 5xx, resets, truncated bodies), not for its content."""
    if outcome.status != "failed":
        return False
    return outcome.code in ("rate-limited", "network", "truncated") or bool(re.fullmatch(r"http-(408|5\d\d)", outcome.code))


def _save_cursor(store: Store, key: str, moment: datetime, repo_id: str, run_id: str) -> str:
    store.append("crawl_state", [CrawlStateRecord(key, moment, repo_id, datetime.now(UTC), run_id)])
    return f"moved to {moment.isoformat()} {repo_id}"


def _crawl_filters(options: CrawlOptions) -> list[list[str]]:
    """One listing per --arch (the Hub ANDs filters; archs are alternatives), each with --library."""
    extra = [options.library] if options.library else []
    return [[arch, *extra] for arch in sorted(options.archs)] or [extra]


def _crawl_one(run: _Run, store: Store, filters: list[str], run_id: str, cursors: dict[str, str]) -> None:
    created_key = cursor_key(run.options.endpoint, filters)
    modified_key = cursor_key(run.options.endpoint, filters, "last_modified")
    created_mark = store.get("crawl_state", (created_key,))
    modified_mark = store.get("crawl_state", (modified_key,))
    complete, newest, newest_modified = _pass(run, filters=filters, sort="created_at", mark=created_mark)  # type: ignore[arg-type]
    if modified_mark is not None:
        complete_m, newest_m, _ = _pass(run, filters=filters, sort="last_modified", mark=modified_mark)  # type: ignore[arg-type]
    else:  # first crawl: the created pass saw every repo; start the lastModified mark from it
        complete_m, newest_m = complete, (newest_modified, "") if newest_modified is not None else None
    run.indexer.flush()  # the rows first: a mark may only cover rows that are on disk
    for key, done, top, old in ((created_key, complete, newest, created_mark),
                                (modified_key, complete_m, newest_m, modified_mark)):
        if not done or top is None:
            cursors[key] = "kept"
        elif old is None or top[0] > old.cursor_created_at:  # type: ignore[union-attr]
            cursors[key] = _save_cursor(store, key, top[0], top[1], run_id)
        else:
            cursors[key] = "unchanged"


LINEAGE_BATCH = 8  # arrivals placed together: one FAISS search per family, one batched exact kernel call
LINEAGE_BATCH_BYTES = 1 << 30  # ... or fewer, once their float32 tensors reach this (a 7B model: 128 MiB)


def lineage_step(store: Store, *, k: int, device: str, cache: TensorCache,
                 refetch: Callable[[str, str], Mapping[str, np.ndarray]] | None = None,
                 bases: BaseReader | None = None) -> tuple[OnIndexed, Callable[[], None]]:
    """The sketch -> nominate -> exact re-rank -> MDST update step, as the crawl's hook and flush.

    The hook collects arrivals and places them `LINEAGE_BATCH` at a time (`LineageIndex.add_many`: the
    same result as one by one, with the exact kernel batched over all their short lists -- on the GPU
    when there is one); the flush places the rest, then writes the lineage rows after the models rows."""
    from indexer.incremental.index import (  # torch + faiss: only when lineage runs
        Arrival,
        LineageIndex,
    )
    from indexer.incremental.satellites import AdapterArrival

    lineage = LineageIndex(store, k=k, device=device, flush_every=1 << 30, cache=cache,  # flushed with the models rows
                           refetch=refetch, keep_arrays=False,  # the Indexer caches every planned block
                           bases=bases)
    waiting: list[Arrival] = []

    def place() -> None:
        if waiting:
            lineage.add_many(waiting)
            waiting.clear()

    def hook(model: IndexedModel) -> Placement | None:
        entry = model.entry
        if model.adapter is not None:  # placed at once, after the models before it (its base may be among them)
            place()
            family, details = lineage.add_adapter(AdapterArrival(entry.repo_id, entry.revision, entry.created_at,
                                                                 model.adapter, model.arrays))
            return Placement(family, details)
        waiting.append(Arrival(entry.repo_id, entry.revision, model.family, model.arrays, entry.created_at,
                               model.quant, declared_bases(entry), model.copy_rank))
        held = sum(a.nbytes for arrival in waiting for a in arrival.arrays.values())
        if len(waiting) >= LINEAGE_BATCH or held >= LINEAGE_BATCH_BYTES:
            place()
        return None

    def flush() -> None:
        place()
        lineage.flush()

    return hook, flush


def _steps(store: Store, on_indexed: OnIndexed | None, *, k: int, device: str, cache: TensorCache,
           refetch: Callable[[str, str], Mapping[str, np.ndarray]] | None = None,
           bases: BaseReader | None = None) -> tuple[OnIndexed, Callable[[], None] | None]:
    if on_indexed is not None:  # a caller's own hook (tests, benchmarks): no lineage
        return on_indexed, None
    return lineage_step(store, k=k, device=device, cache=cache, refetch=refetch, bases=bases)


def header_shapes(repo: RepoFiles, *, have_token: bool) -> dict[str, tuple[int, ...]] | None:
    """Every tensor shape of a full model from its headers (normalised names); None for what has none."""
    found = _float_headers(repo, have_token=have_token)
    if found is None:
        return None
    _, where, stored = found
    return {name: tuple(where[raw][1].shape) for name, raw in sorted(stored.items())}


def _float_headers(repo: RepoFiles, *, have_token: bool
                   ) -> tuple[dict[str, ByteSource], dict[str, tuple[str, TensorInfo]], dict[str, str]] | None:
    """(sources, tensor -> (file, info), normalised name -> stored name) of a full model; None for an
    adapter or what cannot be read as safetensors (logged)."""
    try:
        layout = repo_layout(repo, have_token=have_token)
        if layout == ADAPTER_FILES:
            return None
        sources, where = read_headers(repo, layout)
    except ModelGraphError as exc:
        logger.info("%s: no header shapes (%s)", repo.entry.repo_id, exc)
        return None
    return sources, where, canonical_tensors({name: info for name, (_, info) in where.items()})


def first_rows(repo: RepoFiles, wanted: Mapping[str, int], *, have_token: bool) -> dict[str, np.ndarray] | None:
    """The first rows of the named tensors (normalised names -> row count), by range; only float tensors
    stored as such (a packed quantized base has none to give). None when the model has no readable headers."""
    found = _float_headers(repo, have_token=have_token)
    if found is None:
        return None
    sources, where, stored = found
    blocks = []
    for name, count in sorted(wanted.items()):
        raw = stored.get(name)
        if raw is None or not where[raw][1].shape:
            continue
        info = where[raw][1]
        rows = min(count, info.shape[0])
        blocks.append(BlockRead(raw, (0, rows), rows * info.row_bytes, rows == info.shape[0]))
    if not blocks:
        return {}
    plan = ReadPlan("base rows", sum(b.nbytes for b in blocks), tuple(sorted(blocks, key=lambda b: b.tensor)),
                    len(blocks), sum(i.nbytes for _, i in where.values()))
    arrays = read_planned(sources, where, plan)
    by_raw = {raw: name for name, raw in stored.items()}
    return {by_raw[raw]: a for raw, a in arrays.items()}


class BaseReader:
    """An adapter's declared base, read from where the adapter came from (the Hub by range, or the folders
    given): its header shapes, for the verdict, and the first rows of a few tensors, which a DoRA
    adapter's magnitudes are tested against (`indexer.relations.adapters.with_magnitudes`). `open_repo`
    answers a repo id with its files, or None when there is no such repo; `close`: close what it opened
    after each read (not when it hands out repos the crawl also reads). Headers are read once per base
    per run (a popular base has thousands of adapters); rows once per (base, tensors asked)."""

    def __init__(self, open_repo: Callable[[str], RepoFiles | None], *, have_token: bool, close: bool = True) -> None:
        self._open, self._have_token, self._close = open_repo, have_token, close
        self._shapes: dict[str, dict[str, tuple[int, ...]] | None] = {}
        self._rows: dict[tuple[str, tuple[tuple[str, int], ...]], dict[str, np.ndarray] | None] = {}

    def shapes(self, repo_id: str) -> dict[str, tuple[int, ...]] | None:
        if repo_id not in self._shapes:
            self._shapes[repo_id] = self._with_repo(repo_id, lambda repo: header_shapes(repo, have_token=self._have_token))
        return self._shapes[repo_id]

    def rows(self, repo_id: str, wanted: Mapping[str, int]) -> dict[str, np.ndarray] | None:
        key = (repo_id, tuple(sorted(wanted.items())))
        if key not in self._rows:
            self._rows[key] = self._with_repo(repo_id, lambda repo: first_rows(repo, wanted, have_token=self._have_token))
        return self._rows[key]

    def _with_repo(self, repo_id: str, read: Callable[[RepoFiles], Any]) -> Any:
        repo = self._open(repo_id)
        if repo is None:
            return None
        try:
            return read(repo)
        finally:
            if self._close and isinstance(repo, LocalRepo):
                repo.close()


def hub_bases(hub: HubSource, *, have_token: bool) -> BaseReader:
    """Adapters' bases read from the Hub by range (headers: ~100 kB, 1-2 requests; DoRA rows: ~2 MiB)."""

    def open_repo(repo_id: str) -> RepoFiles | None:
        try:
            entry = hub.model_info(repo_id)
        except HubError as exc:
            logger.info("base %s: not on the Hub (%s)", repo_id, exc.reason)
            return None
        return HubSource.repo(hub, entry)

    return BaseReader(open_repo, have_token=have_token, close=False)


def local_bases(folders: Mapping[str, Path]) -> BaseReader:
    """Adapters' bases among the folders given (repo id -> folder: batch recovery, bench folders)."""
    return BaseReader(lambda repo_id: LocalRepo(folders[repo_id]) if repo_id in folders else None, have_token=True)


def _given_bases(repos: Sequence[LocalRepo]) -> BaseReader:
    """`index add`: the bases among the repos given, as already opened (their revision hashed once)."""
    by_id = {r.entry.repo_id: r for r in repos}
    return BaseReader(by_id.get, have_token=True, close=False)


def hub_refetch(hub: HubSource, *, budget: int, have_token: bool,
                recent: Mapping[tuple[str, str], ModelEntry] | None = None) -> Callable[[str, str], Mapping[str, np.ndarray]]:
    """Read a model's selected tensors again, by range, at the revision it was indexed at: the same plan
    (it depends on the header and the budget only), so the same blocks. The entry comes from `recent`
    (indexed this run) when it is there, else from model_info."""

    def refetch(repo_id: str, revision: str) -> Mapping[str, np.ndarray]:
        entry = (recent or {}).get((repo_id, revision)) or hub.model_info(repo_id, revision=revision)
        # HubSource.repo, not an override: a Dask hub would send this one read to a worker and count it
        return read_model(HubSource.repo(hub, entry), budget=budget, have_token=have_token).arrays

    return refetch


def default_hub(home: Path, options: CrawlOptions, stop: threading.Event | None = None) -> HubSource:
    """The crawl's Hub: reading `options.prefetch` models ahead on threads (distributed.ThreadHub), or none."""
    if options.prefetch < 0:
        raise BadInputError("--prefetch", f"must be 0 or more, got {options.prefetch}")
    if options.prefetch == 0:
        from indexer.distributed import StoppableHub

        return StoppableHub(options.endpoint, token=options.token, policy=options.policy, stop=stop)
    from indexer.distributed import ThreadHub, _Known  # distributed imports this module

    return ThreadHub(options, known=_Known.read(home, have_token=options.token is not None),
                     threads=options.prefetch, stop=stop)


def crawl(home: Path, options: CrawlOptions, *, on_indexed: OnIndexed | None = None,
          hub: HubSource | None = None) -> CrawlReport:
    """Crawl `options.endpoint` into the store at `home` (see the module docstring)."""
    if options.limit is not None and options.limit < 0:
        raise BadInputError("--limit", f"must be 0 or more, got {options.limit}")
    if options.threads < 1:
        raise BadInputError("--threads", f"must be 1 or more, got {options.threads}")
    from sketches.distances import (
        library_threads,  # torch: loaded when a crawl runs, not when the CLI starts
    )

    with library_threads(options.threads):
        return _crawl(home, options, on_indexed=on_indexed, hub=hub)


def _crawl(home: Path, options: CrawlOptions, *, on_indexed: OnIndexed | None, hub: HubSource | None) -> CrawlReport:
    started, run_id = time.perf_counter(), uuid.uuid4().hex[:12]
    owned = hub is None
    if hub is None:
        reachable(options.endpoint, token=options.token, policy=options.policy)  # before the store is touched
        hub = default_hub(home, options)
    cursors: dict[str, str] = {}
    with open_store(home) as store:
        cache = TensorCache(store.home / CACHE_DIR, max_bytes=options.cache_bytes)  # one bound: crawl + lineage
        recent = _Recent()
        refetch = hub_refetch(hub, budget=options.budget, have_token=options.token is not None, recent=recent)
        hook, on_flush = _steps(store, on_indexed, k=options.k, device=options.device, cache=cache, refetch=refetch,
                                bases=hub_bases(hub, have_token=options.token is not None))
        indexer = Indexer(store, options.budget, options.token is not None, hook, options.batch, cache=cache,
                          on_flush=on_flush)
        run = _Run(indexer, hub, options, recent=recent)
        with _progress(options.progress) as bar:  # type: ignore[attr-defined]
            run.bar = bar
            try:
                for filters in _crawl_filters(options):
                    _crawl_one(run, store, filters, run_id, cursors)
                _revisit(run, store)
            finally:
                indexer.close()  # rows of finished models survive a crash; marks did not move
                if owned:
                    hub.close()
    return CrawlReport(tuple(run.outcomes), run.seen, run.unchanged, time.perf_counter() - started, cursors)


# --- local folders ---------------------------------------------------------------------------------------------


def add_local(home: Path, paths: Iterable[Path], *, budget: int, on_indexed: OnIndexed | None = None,
              k: int = DEFAULT_K, device: str = "auto",
              progress: bool = True) -> CrawlReport:
    """`index add`: the same pipeline over local repo folders (revision = content hash; see LocalRepo)."""
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    seen = unchanged = 0
    repos = [LocalRepo(Path(p)) for p in paths]  # bad paths fail here, before the store is touched
    with open_store(home) as store:
        cache = TensorCache(store.home / CACHE_DIR)  # one cache (one size bound) for the crawl and lineage
        hook, on_flush = _steps(store, on_indexed, k=k, device=device, cache=cache, bases=_given_bases(repos))
        indexer = Indexer(store, budget, True, hook, cache=cache, on_flush=on_flush)
        with _progress(progress) as bar:  # type: ignore[attr-defined]
            try:
                for repo in sorted(repos, key=lambda r: r.entry.repo_id):
                    seen += 1
                    if indexer.is_done(repo.entry):
                        unchanged += 1
                        continue
                    try:
                        outcomes.append(indexer.index_model(repo))
                    finally:
                        repo.close()
                    bar.update(1)
            finally:
                indexer.close()
    return CrawlReport(tuple(outcomes), seen, unchanged, time.perf_counter() - started, {})


__all__ = ["CrawlOptions", "CrawlReport", "IndexedModel", "Indexer", "OnIndexed", "Outcome", "add_local", "classify",
           "crawl", "cursor_key", "no_sketch", "read_headers", "read_model", "read_planned", "repo_layout",
           "weight_layout"]
