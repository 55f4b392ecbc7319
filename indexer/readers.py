"""Readers for the weight layouts beyond plain safetensors: PEFT adapters, GGUF files, packed quantized
safetensors (GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors), TensorFlow's `tf_model.h5` and Flax's
`flax_model.msgpack`. Each reads by range only what its plan selects and hands the crawl a `ModelRead` like the
plain reader does (`indexer.crawl.read_model` picks the reader from the file list and the headers).

Adapter repos (`adapter_config.json` + `adapter_model.safetensors`):
    1. the config, one small GET (`sketches.adapter.parse_adapter_config`: not JSON, no base -> AdapterError,
       a recorded failure with one line of reason);
    2. the adapter's safetensors header (one 100,000-byte range read, as for any model);
    3. the LoRA factors, whole, pair by pair (A with its B, and a DoRA pair's magnitudes: a half pair is
       useless), layers spread over depth (`sketches.plan.spread_order`) until the byte budget is
       spent; a real 7B LoRA at r = 16 on
       q/v is 8 MiB of factors, so a 16 MiB budget (the default) reads all of them. Full copies saved with
       `modules_to_save` are never read: their shapes (from the header) are enough to check them against
       the base, and a saved LM head is 250 MiB.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from errors import (
    AdapterError,
    ModelGraphError,
    QuantizedWeightsError,
    UnsupportedModelError,
)
from sketches.adapter import (
    MAX_CONFIG_BYTES,
    AdapterConfig,
    factor_sets,
    lora_alphas,
    lora_magnitudes,
    parse_adapter_config,
    saved_modules,
)
from sketches.flax import read_index as read_flax_index
from sketches.gguf import (
    GGUFHeader,
    declared_base_models,
    hf_names,
    hf_shape,
    merge_split,
    read_hf_tensor,
)
from sketches.gguf import predicted_relative_error as gguf_error
from sketches.gguf import read_header as read_gguf_header
from sketches.layers import canonical_tensors, family_key, normalise_name, tied_heads
from sketches.onnx import OnnxTensor, join_halves, read_onnx_tensor
from sketches.onnx import predicted_error as onnx_error
from sketches.onnx import read_index as read_onnx_index
from sketches.packed import (
    PackedModule,
    QuantScheme,
    bnb_quant_state,
    detect_scheme,
    mlx_anchors,
    native,
    packed_modules,
    part_rows,
    plain_tensors,
    reads_whole,
    unsupported_format,
)
from sketches.packed import dequantize as dequantize_packed
from sketches.packed import predicted_relative_error as packed_error
from sketches.plan import BlockRead, ReadPlan, plan_reads, spread_names
from sketches.safetensors import ByteSource, TensorInfo, decode
from sketches.tfh5 import StoredTensor, open_checkpoint, read_tensor, stored_infos

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FAMILY = "adapter"  # the plan's label; the adapter's family is its base's, decided by lineage


@dataclass(frozen=True)
class AdapterRead:
    """What an adapter repo gave: its config, the LoRA factors read, the shapes of its saved modules."""

    config: AdapterConfig
    saved: Mapping[str, tuple[int, ...]]  # base tensor name -> shape of the full copy the adapter saves
    pairs: int  # LoRA pairs in the file
    pairs_read: int  # ... of which the budget held
    details: Mapping[str, Any] = field(default_factory=dict)


def adapter_details(config: AdapterConfig, saved: Mapping[str, tuple[int, ...]], pairs: int, read: int) -> dict[str, Any]:
    """The models row's `details` for an adapter (JSON-ready, deterministic)."""
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    return {"base_model": config.base_model, "peft_type": config.peft_type, "r": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": targets, "modules_to_save": sorted(config.modules_to_save),
            "saved_tensors": len(saved), "lora_pairs": pairs, "lora_pairs_read": read,
            "use_rslora": config.use_rslora, "use_dora": config.use_dora, "fan_in_fan_out": config.fan_in_fan_out,
            "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
            "layout": config.layout}


def config_from_details(details: Mapping[str, Any]) -> AdapterConfig:
    """The AdapterConfig an adapter's `details` recorded (what its updates' scales need), for a restart."""
    targets = details.get("target_modules") or ()
    return AdapterConfig(
        base_model=str(details.get("base_model", "")), peft_type=str(details.get("peft_type") or "LORA"),
        r=int(details.get("r", 8)),
        lora_alpha=float(details.get("lora_alpha", 8)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        modules_to_save=tuple(details.get("modules_to_save") or ()), use_rslora=bool(details.get("use_rslora")),
        fan_in_fan_out=bool(details.get("fan_in_fan_out")), use_dora=bool(details.get("use_dora")),
        rank_pattern=tuple((k, int(v)) for k, v in (details.get("rank_pattern") or {}).items()),
        alpha_pattern=tuple((k, float(v)) for k, v in (details.get("alpha_pattern") or {}).items()),
        layout=str(details.get("layout") or "peft"))


def read_adapter_config(read_small: Any, repo_id: str, card_base: str = "") -> AdapterConfig:
    """Step 1: the config, parsed and validated (AdapterError names the file); `card_base`: the repo card's
    base_model, for a config that names none or only a path on the trainer's disk."""
    raw = read_small(ADAPTER_CONFIG, limit=MAX_CONFIG_BYTES)
    return parse_adapter_config(raw, name=f"{repo_id}/{ADAPTER_CONFIG}", card_base=card_base)


def plan_adapter(tensors: Mapping[str, TensorInfo], *, budget: int, repo_id: str, layout: str = "peft",
                 file: str = ADAPTER_WEIGHTS) -> tuple[ReadPlan, int, int]:
    """Step 3's plan: each updated weight's factors whole, within `budget`; (plan, updated weights in the
    file, of which the plan reads)."""
    sets = factor_sets(tensors, layout)  # AdapterError on an incomplete set (an A without its B)
    if not sets:
        raise AdapterError(f"{repo_id}/{file}", "holds no LoRA, LoHa or LoKr factors")
    # read with their factors, which need them: DoRA's magnitudes, a loose adapter file's alphas
    extras = [lora_magnitudes(tensors), lora_alphas(tensors, layout)]
    blocks, used, read = [], 0, 0
    for weight in spread_names(sets):  # step 3's order: layers spread over depth, then by name
        parts = [tensors[n] for n in sets[weight].names] + [tensors[e[weight]] for e in extras if weight in e]
        size = sum(t.nbytes for t in parts)
        if used + size > budget:
            break  # a prefix of the order, as the plain plan: smaller budgets read a subset
        blocks += [BlockRead(t.name, (0, t.shape[0] if t.shape else 1), t.nbytes, True) for t in parts]
        used, read = used + size, read + 1
    if not blocks:
        raise AdapterError(f"{repo_id}/{file}", f"a budget of {budget} bytes cannot hold one LoRA pair")
    model_bytes = sum(t.nbytes for t in tensors.values())
    count = sum(len(f.parts) for f in sets.values())
    return ReadPlan(ADAPTER_FAMILY, budget, tuple(sorted(blocks, key=lambda b: b.tensor)), count, model_bytes), len(sets), read


def loose_config(tensors: Mapping[str, TensorInfo], layout: str, declared: str, *, thing: str) -> AdapterConfig:
    """The config a LoRA file without adapter_config.json implies: its layout, s = 1 where no module has an
    `.alpha` (diffusers' default: lora_alpha = r), and the base its model card names (the first of several).
    A file whose card names no base cannot be placed: AdapterError."""
    base = declared.split(";")[0].strip()
    if not base:
        raise AdapterError(thing, f"a {layout} LoRA file without adapter_config.json, and its model card names no "
                                  "base_model: its base cannot be known")
    sets = factor_sets(tensors, layout)
    rank = max((tensors[f.parts["A"]].shape[0] for f in sets.values() if "A" in f.parts), default=1)
    return AdapterConfig(base_model=base, peft_type="LORA", r=rank, lora_alpha=float(rank), target_modules=(),
                         layout=layout)


def saved_shapes(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Base tensor name -> shape of each full copy (modules_to_save) the adapter holds."""
    return {base: tuple(tensors[name].shape) for base, name in saved_modules(tensors).items()}


def lora_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The factors as float64 (sketches.adapter works in float64)."""
    return {n: np.asarray(a, dtype=np.float64) for n, a in sorted(arrays.items())}


# --- quantized copies: GGUF and packed safetensors ------------------------------------------------------
#
# A quantized model is planned as if it were stored in BF16 under its Hugging Face names (its full-precision
# relatives are, mostly): the plan depends on names, shapes and the item size only, so it picks the same
# (tensor, rows) blocks as a BF16 relative, and the exact step compares them one to one. Then only those
# rows are read (GGUF: rows are whole quantization blocks; bnb / fp8 / compressed-tensors: the rows of each
# stored part, `sketches.packed.part_rows`; GPTQ / AWQ pack across output rows and are read whole: a 4-bit
# qweight is a quarter of the BF16 bytes) and dequantized to float32.
# Which GGUF file of a repo: the most precise one (closest to its source), by the type in its name; a
# complete gguf-split set counts as one file, read as one model (`read_gguf_split`).

PLAN_DTYPE = "BF16"
GGUF_PRECISION = ("F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_1", "Q5_0", "Q4_K_M",
                  "Q4_K_S", "Q4_K", "Q4_1", "Q4_0", "IQ4", "Q3_K", "IQ3", "Q2_K", "IQ2", "IQ1")
GGUF_FIRST_READ = 100_000  # indexer.sources.PREFIX_BYTES
# gguf-split shard names (llama.cpp's llama_split_path, gguf-py's SHARD_NAME_FORMAT: `%s-%05d-of-%05d.gguf`)
_GGUF_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)
QUANT_MARKERS = (".qweight", ".SCB", ".absmax", ".weight_packed", ".weight_scale", ".weight_scale_inv",
                 ".weight._scale", ".scale_weight", "._weight_qdata")


@dataclass(frozen=True)
class QuantInfo:
    """A quantized copy's scheme and the RMS relative error it predicts (over the blocks read)."""

    scheme: str
    predicted_error: float


def is_projector(file: str) -> bool:
    """llama.cpp's multimodal projector (`mmproj-*.gguf`, `*-mmproj-f16.gguf`): a vision-language model's image
    encoder beside its language model's files, never the model itself (an F16 mmproj outranked a Q4_K_M model)."""
    return "mmproj" in file.rsplit("/", 1)[-1].lower()


def gguf_candidates(files: Sequence[str]) -> tuple[list[tuple[str, ...]], list[str]]:
    """(candidates, missing) among the top-level .gguf files but projectors (`is_projector`): each single file
    as a 1-tuple and each complete gguf-split set `<stem>-0000i-of-0000N.gguf` (i = 1..N) as its shards in
    order; and the shards that incomplete sets lack, by name. Sorted: deterministic."""
    ggufs = sorted(f for f in files if "/" not in f and f.lower().endswith(".gguf") and not is_projector(f))
    candidates: list[tuple[str, ...]] = []
    sets: dict[tuple[str, int], dict[int, str]] = {}
    for name in ggufs:
        m = _GGUF_SHARD.match(name)
        if m is None or not 1 <= int(m["i"]) <= int(m["n"]):
            candidates.append((name,))
        else:
            sets.setdefault((m["stem"], int(m["n"])), {})[int(m["i"])] = name
    missing = []
    for (stem, n), shards in sorted(sets.items()):
        absent = [_shard_name(stem, i, n) for i in range(1, n + 1) if i not in shards]
        if absent:
            missing += absent
        else:
            candidates.append(tuple(shards[i] for i in range(1, n + 1)))
    return sorted(candidates), missing


def choose_gguf(files: Sequence[str]) -> tuple[str, ...] | None:
    """The GGUF candidate of highest precision (GGUF_PRECISION in the name, a split set's stem), else the
    first by name: one file, or a complete gguf-split set's shards in order. None without a candidate."""
    candidates, _ = gguf_candidates(files)
    if not candidates:
        return None

    def rank(candidate: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        m = _GGUF_SHARD.match(candidate[0]) if len(candidate) > 1 else None
        upper = (m["stem"] if m else candidate[0]).upper()
        return next((i for i, tag in enumerate(GGUF_PRECISION) if tag in upper), len(GGUF_PRECISION)), candidate

    return min(candidates, key=rank)


def _shard_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index:05d}-of-{count:05d}.gguf"  # gguf-split's and GGUFWriter's SHARD_NAME_FORMAT


def _virtual(name: str, shape: tuple[int, ...]) -> TensorInfo:
    """A tensor as a BF16 checkpoint would store it: what the plan sees of a quantized one."""
    return TensorInfo(name, PLAN_DTYPE, tuple(shape), 0, math.prod(shape) * 2)


def _rms(errors: Sequence[tuple[int, float]]) -> float:
    total = sum(n for n, _ in errors)
    return math.sqrt(sum(n * e * e for n, e in errors) / total) if total else 0.0


def _finite(name: str, array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise NonFiniteWeights(name)
    return array


class NonFiniteWeights(ModelGraphError):
    """NaN or infinite values in a dequantized block (the crawl records `non-finite`)."""

    def __init__(self, tensor: str) -> None:
        self.reason = f"non-finite: NaN or infinite weights in {tensor}"
        super().__init__(self.reason)


@dataclass(frozen=True)
class QuantizedRead:
    """A quantized model read: blocks dequantized under normalised HF names, and the plan that chose them."""

    family: str
    plan: ReadPlan
    shapes: Mapping[str, tuple[int, ...]]
    arrays: Mapping[str, np.ndarray]
    quant: QuantInfo
    details: Mapping[str, Any]
    header_bytes: int = 0  # GGUF: the bytes its header took (packed: the crawl counts the safetensors headers)


def read_gguf(source: ByteSource, *, budget: int) -> QuantizedRead:
    """Header by growing range reads, HF names, a BF16-equivalent plan, the planned rows dequantized."""
    # first read = the 100,000 bytes a remote open already holds: a GGUF without a tokenizer costs no
    # further request for its header, a Llama-3 one (7 MiB of tokenizer) grows x4 four times
    header = read_gguf_header(source, first_read=GGUF_FIRST_READ)
    header_bytes = source.bytes_read
    extra: dict[str, Any] = {}
    split = header.metadata.get("split.count")
    if type(split) is int and split > 1:  # a lone gguf-split shard (a whole set: read_gguf_split)
        place = int(header.metadata.get("split.no", 0)) + 1  # type: ignore[call-overload]
        extra["split"] = {"file": place, "of": split, "tensors_here": len(header.tensors)}
        logger.info("%s: shard %d of a %d-file GGUF; only its tensors are compared", source.name, place, split)
    return _read_gguf_blocks(header, {name: (source, header) for name in header.names()}, budget=budget,
                             file=source.name.rsplit("/", 1)[-1], header_bytes=header_bytes, extra=extra)


def read_gguf_split(sources: Sequence[ByteSource], *, budget: int) -> QuantizedRead:
    """A complete gguf-split set (its shards in order) read as one model: every shard's header, checked to
    be one set (`sketches.gguf.merge_split`), then `read_gguf`'s plan over all the tensors, each block
    read from the shard that holds it."""
    headers = [read_gguf_header(source, first_read=GGUF_FIRST_READ) for source in sources]
    header_bytes = sum(source.bytes_read for source in sources)
    view = merge_split(headers)
    holder = {name: (source, header) for source, header in zip(sources, headers, strict=True)
              for name in header.names()}
    return _read_gguf_blocks(view, holder, budget=budget, file=sources[0].name.rsplit("/", 1)[-1],
                             header_bytes=header_bytes, extra={"split": {"files": len(sources)}})


def _read_gguf_blocks(view: GGUFHeader, holder: Mapping[str, tuple[ByteSource, GGUFHeader]], *, budget: int,
                      file: str, header_bytes: int, extra: Mapping[str, Any]) -> QuantizedRead:
    """The read of a GGUF model given its header (a split set's merged view) and, per tensor, the source and
    header that hold it; `extra` is added to its details."""
    if view.metadata.get("general.type") == "mmproj":  # llama.cpp's projector under a name without "mmproj"
        raise UnsupportedModelError(view.name, "a GGUF multimodal projector (general.type mmproj): the image "
                                               "encoder of a vision-language model, not a model of its own")
    if view.metadata.get("general.type") == "adapter":  # llama.cpp's convert_lora_to_gguf: lora_a / lora_b
        raise UnsupportedModelError(view.name, f"a GGUF {view.metadata.get('adapter.type', 'adapter')} adapter "
                                               f"({view.architecture}): adapters are read from PEFT or LoRA "
                                               "safetensors files, not from GGUF")
    names = {normalise_name(h.hf_name): h for h in hf_names(view).values()}
    if not names:
        raise UnsupportedModelError(view.name, f"GGUF architecture {view.architecture!r} has no Hugging Face "
                                               "name map in the gguf package")
    shapes = {n: hf_shape(view, h) for n, h in sorted(names.items())}
    family = family_key(shapes)
    plan = plan_reads({n: _virtual(n, s) for n, s in shapes.items()}, family=family, budget=budget)
    arrays, errors = {}, []
    for block in plan.blocks:
        hf = names[block.tensor]
        source, header = holder[hf.gguf_name]
        array = read_hf_tensor(source, header, hf, rows=None if block.whole else block.rows)
        arrays[block.tensor] = _finite(block.tensor, array)
        errors.append((array.size, gguf_error(header.get(hf.gguf_name).qtype)))
    qtypes = view.qtypes()
    main = max(qtypes, key=lambda q: (qtypes[q], q))
    quant = QuantInfo(f"gguf-{main}", _rms(errors))
    details = {"scheme": quant.scheme, "predicted_error": round(quant.predicted_error, 6), "qtypes": qtypes,
               "architecture": view.architecture, "file": file,
               "declared_bases": list(declared_base_models(view))} | dict(extra)
    return QuantizedRead(family, plan, shapes, dict(sorted(arrays.items())), quant, details, header_bytes)


@dataclass(frozen=True)
class ConvertedRead:
    """A TensorFlow or Flax checkpoint read: its tensors under normalised PyTorch names and shapes, the plan,
    the blocks."""

    family: str
    plan: ReadPlan
    tensors: Mapping[str, TensorInfo]
    arrays: Mapping[str, np.ndarray]
    details: Mapping[str, Any]


def read_keras(source: ByteSource, *, budget: int) -> ConvertedRead:
    """A Keras weights file (`sketches.tfh5`): each variable under transformers' PyTorch name, in PyTorch's
    layout (kernels transposed back), planned as a safetensors file of the same tensors would be, and the
    planned rows read by range."""
    with open_checkpoint(source) as (handle, stored):
        return _read_converted(stored, lambda t, rows: read_tensor(source, handle, t, rows), budget=budget,
                               details={"framework": "tensorflow", "file": source.name.rsplit("/", 1)[-1]})


def read_flax(source: ByteSource, *, budget: int) -> ConvertedRead:
    """A Flax checkpoint (`sketches.flax`): walked for its arrays' headers, then as `read_keras`."""
    stored = read_flax_index(source)
    return _read_converted(stored, lambda t, rows: read_tensor(source, None, t, rows), budget=budget,
                           details={"framework": "flax", "file": source.name.rsplit("/", 1)[-1]})


def read_onnx(parts: Sequence[ByteSource], open_beside: Callable[[str], ByteSource], *, budget: int
              ) -> ConvertedRead | QuantizedRead:
    """An ONNX export (`sketches.onnx`): walked for its weights' headers, then planned and read as `read_keras`;
    an 8-bit or 4-bit copy (onnxruntime's quantizers) dequantized, with the error its scales predict, as a
    QuantizedRead. `parts`: the graph, or an encoder-decoder export's encoder and decoder graphs, one model under
    the whole model's names (`sketches.onnx.join_halves`). `open_beside(file)` opens a file its external tensors
    name (beside the graphs)."""
    opened: dict[str, ByteSource] = {}

    def beside(location: str) -> ByteSource:  # each external file opened once, for scales and tensors alike
        if location not in opened:
            opened[location] = open_beside(location)
        return opened[location]

    indexes = [read_onnx_index(part, beside) for part in parts]
    if len(parts) == 2:
        found, clashes = join_halves(indexes[0][0], indexes[1][0])
        details: dict[str, Any] = {"initializers": sum(int(d["initializers"]) for _, d in indexes),  # type: ignore[call-overload]
                                   "nodes": sum(int(d["nodes"]) for _, d in indexes)}  # type: ignore[call-overload]
        skipped: dict[str, int] = {}
        for _, d in indexes:
            for why, count in dict(d.get("skipped") or {}).items():  # type: ignore[call-overload]
                skipped[why] = skipped.get(why, 0) + int(count)
        if skipped:
            details["skipped"] = skipped
        if clashes:
            details["ambiguous"] = clashes[:8]
    else:
        found, details = {n: (0, t) for n, t in indexes[0][0].items()}, dict(indexes[0][1])
    quantized = {n for n, (_, t) in found.items() if t.scale is not None or t.blocks is not None}
    errors: list[tuple[int, float]] = []

    def file_of(part: int) -> Callable[[str | None], ByteSource]:
        return lambda location: parts[part] if location is None else beside(location)

    def read_stored(t: StoredTensor, rows: tuple[int, int] | None) -> np.ndarray:
        part, tensor = found[t.name]  # stored under its PyTorch name
        steps: list[float] = []
        values = read_onnx_tensor(file_of(part)(tensor.location), tensor, rows, beside=file_of(part), steps=steps)
        if t.name in quantized:
            errors.append((values.size, onnx_error(tensor, values, steps[0] if steps else None)))
        return values

    file = "+".join(part.name.rsplit("/", 1)[-1] for part in parts)
    converted = _read_converted({n: t.stored for n, (_, t) in found.items()}, read_stored, budget=budget,
                                details={"framework": "onnx", "file": file, **details})
    if not quantized:
        return converted
    codes = sorted({_onnx_code(found[n][1]) for n in quantized})
    quant = QuantInfo("onnx-" + "+".join(codes), _rms(errors))
    shapes = {n: t.shape for n, t in converted.tensors.items()}
    return QuantizedRead(converted.family, converted.plan, shapes, converted.arrays, quant,
                         {**converted.details, "scheme": quant.scheme, "predicted_error": round(quant.predicted_error, 6),
                          "quantized_tensors": len(quantized)}, sum(part.bytes_read for part in parts))


def _onnx_code(tensor: OnnxTensor) -> str:
    """A quantized ONNX weight's scheme: onnxruntime's 8-bit (uint8, int8) or block codes (int4-b32)."""
    if tensor.blocks is not None:
        return f"int{tensor.blocks.bits}-b{tensor.blocks.block_size}"
    return "uint8" if tensor.stored.numpy_dtype == "<u1" else "int8"


def _read_converted(stored: Mapping[str, StoredTensor],
                    read: Callable[[StoredTensor, tuple[int, int] | None], np.ndarray], *, budget: int,
                    details: Mapping[str, Any]) -> ConvertedRead:
    infos = stored_infos(stored)
    names = canonical_tensors(infos)  # normalised -> stored: float weights only, known buffers dropped
    # an output head the export wrote out (an ONNX lm_head / proj_out: the embedding, transposed back) is the
    # embedding, once (sketches.layers.tied_heads), as a safetensors file's: the end rows of both read to tell
    for tied in tied_heads({n: infos[raw].shape for n, raw in names.items()},
                           lambda name, rows: read(stored[names[name]], rows)):
        del names[tied]
    tensors = {norm: replace(infos[raw], name=norm) for norm, raw in names.items()}
    family = family_key({n: t.shape for n, t in tensors.items()})
    plan = plan_reads(tensors, family=family, budget=budget)
    arrays = {block.tensor: _finite(block.tensor, read(stored[names[block.tensor]], None if block.whole else block.rows))
              for block in plan.blocks}
    return ConvertedRead(family, plan, tensors, dict(sorted(arrays.items())), {**details, "tensors": len(stored)})


def looks_packed(tensors: Mapping[str, TensorInfo]) -> bool:
    """Tensors of a packed quantized checkpoint (the scheme itself: `sketches.packed.detect_scheme`). F8 weights
    without a scale beside them are no such checkpoint: a plain cast (ComfyUI's `*_fp8_e4m3fn` files), read as
    floats like an F16 copy (`indexer.lineage.methods.cast_dtype` tells it a cast of its source). F8 weights
    with any scale-named tensor beside them (Mistral's `qscale_weight`, ...) are one, refused unless known."""
    scaled = {n.rpartition(".")[0] for n in tensors if "scale" in n.rpartition(".")[2]}
    return (any(n.endswith(QUANT_MARKERS) for n in tensors)
            or any(t.dtype in ("F8_E4M3", "F8_E5M2") and n.rpartition(".")[0] in scaled for n, t in tensors.items())
            or bool(mlx_anchors(tensors)) or unsupported_format(tensors) is not None)


MAX_CONFIG_REPEATS = 1024  # layers or experts a config.json may ask `linear_shapes` to build (real ones: <= 256)


def linear_shapes(config: Mapping[str, Any] | None) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear weight of the transformers architecture config.json names, by name: the
    model built on the meta device (no memory, no weights), as optimum-quanto itself rebuilds a checkpoint
    before loading it. Only transformers' own classes (never remote code); {} without transformers, for an
    architecture it lacks, or a config it cannot build."""
    arch = next(iter((config or {}).get("architectures") or []), None)
    try:
        import torch
        import transformers
    except ImportError:
        return {}
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        return {}
    fields = {k: v for k, v in (config or {}).items() if k not in ("quantization_config", "auto_map")}
    fields["use_pretrained_backbone"] = False  # a DETR-style config would fetch a timm backbone's weights
    counts = [v for k, v in fields.items() if ("layers" in k or "experts" in k) and type(v) is int]
    if any(v > MAX_CONFIG_REPEATS for v in counts):  # a config built module by module: bound what it may ask
        logger.info("config.json asks for %d repeated modules, over %d: not built", max(counts), MAX_CONFIG_REPEATS)
        return {}
    try:
        with torch.device("meta"):
            model = cls(transformers.AutoConfig.for_model(**fields))
    except Exception as exc:  # noqa: BLE001 -- any config the library refuses: the shapes stay unknown
        logger.info("config.json's %s could not be built on the meta device: %s", arch, exc)
        return {}
    return {f"{name}.weight": (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


WEIGHTS_FORMATS = {"gptq": "gptq", "awq": "awq", "bnb-int8": "bnb-int8", "bnb-4bit": "bnb-4bit", "fp8": "fp8",
                   "ct-pack": "compressed-tensors", "ct-int": "compressed-tensors", "ct-fp4": "compressed-tensors",
                   "mlx": "mlx", "quanto": "quanto", "torchao": "torchao"}


def read_packed(source_of: Mapping[str, ByteSource], where: Mapping[str, tuple[str, TensorInfo]],
                config: Mapping[str, Any] | None, *, budget: int) -> tuple[QuantizedRead, str]:
    """A packed checkpoint: modules dequantized by rows, plain float tensors read as they are."""
    tensors = {n: info for n, (_, info) in where.items()}
    scheme = detect_scheme(tensors, config)
    if scheme is None:
        raise QuantizedWeightsError("weights", "quantization markers but no scheme detected")
    modules = packed_modules(tensors, scheme, functools.cache(lambda: linear_shapes(config)))
    read = _PartReader(source_of, where)
    module_shapes = {normalise_name(w): _module_shape(m, scheme, read) for w, m in modules.items()}
    plain = canonical_tensors({n: tensors[n] for n in plain_tensors(tensors, scheme, modules)})
    virtual = {n: _virtual(n, s) for n, s in module_shapes.items()} | {n: tensors[raw] for n, raw in plain.items()}
    shapes = {n: tuple(t.shape) for n, t in sorted(virtual.items())}
    family = family_key(shapes)
    plan = plan_reads(virtual, family=family, budget=budget)
    by_norm = {normalise_name(w): m for w, m in modules.items()}
    arrays, kept, spent, errors = {}, [], 0, []
    for block in plan.blocks:
        rows = None if block.whole else block.rows
        module = by_norm.get(block.tensor)
        # GPTQ / AWQ / quanto 4-bit modules are read whole whatever rows the plan wants: keep the budget by blocks
        cost = sum(where[n][1].nbytes for n in module.parts.values()) if module is not None and reads_whole(
            module, scheme) else block.nbytes
        if kept and spent + cost > budget:
            continue
        spent += cost
        if module is not None:
            arrays[block.tensor] = read.module(module, scheme, rows)
            errors.append((arrays[block.tensor].size, packed_error(module.scheme or scheme)))
        else:
            arrays[block.tensor] = read.plain(plain[block.tensor], rows)
        _finite(block.tensor, arrays[block.tensor])
        kept.append(block)
    plan = replace(plan, blocks=tuple(kept))
    # modules differ in bits only in an MLX mixed recipe: then the RMS over the modules read
    mixed = len({e for _, e in errors}) > 1
    quant = QuantInfo(scheme.name, _rms(errors) if mixed else packed_error(scheme))
    details = {"scheme": scheme.name, "predicted_error": quant.predicted_error, "modules": len(modules),
               "group_size": scheme.group_size}
    return QuantizedRead(family, plan, shapes, dict(sorted(arrays.items())), quant, details), WEIGHTS_FORMATS[scheme.method]


class _PartReader:
    """Range reads of stored safetensors tensors, whole or by rows along dim 0, decoded exactly."""

    def __init__(self, source_of: Mapping[str, ByteSource], where: Mapping[str, tuple[str, TensorInfo]]) -> None:
        self.source_of, self.where = source_of, where

    def rows(self, name: str, span: tuple[int, int] | None) -> np.ndarray:
        file, info = self.where[name]
        if span is None or not info.shape:
            return native(self.source_of[file].read(info.begin, info.end), info.dtype, info.shape, name=name)
        r0, r1 = span[0], min(span[1], info.shape[0])
        raw = self.source_of[file].read(info.begin + r0 * info.row_bytes, info.begin + r1 * info.row_bytes)
        return native(raw, info.dtype, (r1 - r0, *info.shape[1:]), name=name)

    def plain(self, name: str, span: tuple[int, int] | None) -> np.ndarray:
        file, info = self.where[name]
        r0, r1 = span if span is not None else (0, info.shape[0] if info.shape else 1)
        raw = self.source_of[file].read(info.begin + r0 * info.row_bytes, info.begin + r1 * info.row_bytes)
        return decode(raw, info.dtype, (r1 - r0, *info.shape[1:]) if info.shape else (), name=name)

    def module(self, module: PackedModule, scheme: QuantScheme, rows: tuple[int, int] | None) -> np.ndarray:
        if rows is None or reads_whole(module, scheme):
            arrays = {role: self.rows(n, None) for role, n in module.parts.items()}
            return dequantize_packed(module, arrays, scheme, rows=rows)
        state = bnb_quant_state(self.rows(module.parts["quant_state"], None)) if "quant_state" in module.parts else None
        shapes = {role: tuple(self.where[n][1].shape) for role, n in module.parts.items()}
        spans = part_rows(module, scheme, rows, shapes=shapes, quant_state=state)
        arrays = {role: self.rows(module.parts[role], span) for role, span in spans.items()}
        return dequantize_packed(module, arrays, scheme, rows=rows)


def _module_shape(module: PackedModule, scheme: QuantScheme, read: _PartReader) -> tuple[int, int]:
    """(out, in) of a module: from its stored shapes, else the small tensors that hold it (bnb 4-bit's JSON
    quant state, compressed-tensors' weight_shape)."""
    if module.shape is not None:
        return module.shape
    if "quant_state" in module.parts:
        out, n_in = bnb_quant_state(read.rows(module.parts["quant_state"], None))["shape"]
        return int(out), int(n_in)
    if "weight_shape" in module.parts:
        out, n_in = (int(v) for v in read.rows(module.parts["weight_shape"], None).ravel()[:2])
        return out, n_in
    raise QuantizedWeightsError(module.weight, f"{scheme.method}: the module's shape is stored nowhere")
