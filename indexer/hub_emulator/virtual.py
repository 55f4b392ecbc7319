"""Virtual large models: real Llama-2 layouts whose tensor bytes are generated on demand, never stored.
(`llama-tiny` keeps their structure at 20 M parameters, for benchmarks of many models.)

A virtual repo looks exactly like the real one on the Hub (config.json, README.md, sharded BF16
safetensors + model.safetensors.index.json), but each shard is computed: the header is real JSON and
the tensor data for any byte range is generated from (seed, tensor, block). Reading 1 MiB out of the
middle of a 10 GB shard costs about as much as generating 1 MiB.

Values. Element e of tensor t lies in block e // 32768 (64 KiB of BF16). A root model's weights are
N(0, 0.02) with 0.2 % of them scaled by 8 (a heavy tail, excess kurtosis ~19, like real pre-trained
weights); norm vectors are 1 + N(0, 0.02). Each block draws from its own numpy Philox stream keyed by
(seed, crc32(tensor name), purpose) with the block number in the counter, so any block is reproducible
alone.

Update model 2 (issue 14). A child is its parent's BF16 values plus one step's update, rounded to BF16
again (a child starts from its parent's file), so children of children work the same way. A step
(`Step`: seed, delta, kind) updates a matrix W (rows x cols) by

    dW = 0.02 * delta * m(module) * exp(0.25 z_layer + 0.15 z_tensor) * (sqrt(1 - f) U diag(s) V^T + sqrt(f) N)

U (rows x r) and V (cols x r) are N(0, 1), s_k ~ k^-alpha for k = 1..r normalised to sum s_k^2 = 1 (so the
low-rank part has unit RMS per element), N is i.i.d. N(0, 1), z ~ N(0, 1) per (step, layer) and per (step,
tensor). A block of 32,768 elements covers a few rows: it needs those rows of U (drawn 256 rows per
stream) and all of V (drawn once per (seed, tensor), kept in a bounded cache). Vectors get the N part only.

    kind       r   alpha  f (full-rank share)  updates
    full       32  1.3    0.03                 every tensor
    lora-qv    16  1.7    0                    q_proj, v_proj (merged LoRA; the rest bit-identical)
    lora-all   16  1.7    0                    the 7 linear matrices of each layer
    continued  64  0.5    0.3                  every tensor (longer, broader training: use a larger delta)
    subres     32  1.3    0.03                 every tensor, meant with delta ~ 2e-4 - 6e-4: most |dW| fall
                                               below half a BF16 ulp and 85-95 % of weights stay bit-identical

Where the numbers come from (`bench/update_stats.py` on the zoos' real fine-tunes, 2026-11-30, and a
pair trained here; table in bench/RESULTS.md): the share of dW's energy in its top 8 singular values
is 0.998 / 0.986 / 0.967 / 0.666 (median over matrices: small-ft / vthr-ft / wild-bert / wild-gpt2;
an i.i.d. matrix of the same shape: 0.06-0.12), hence a low-rank part with f = 0.03 (the median of 1 -
top-8 share over the four zoos, ~0.02); the fitted decay alpha is 1.99 / 1.43 / 1.16 / 0.44, median 1.3
(the Llama-shaped pair trained here, 100 AdamW steps at 1e-4: 0.72, top-8 share 0.83; with it the median
is 1.16); merged LoRA: 1.72 (vthr-lora-f, rank 16) and 1.47 (the pair's rank-16 q/v LoRA), hence 1.7;
continued training is broader (the pair's 200 steps at 5e-4: alpha 0.43, top-8 share 0.66; the wild
zoos' longer runs: 0.44-1.16, 0.67-0.97), hence alpha 0.5, f 0.3, r 64. Module factors m and the layer
spread: MODULE_SCALE and LAYER_SIGMA below. Size: the median update is ||dW|| / ||W|| = 1.4e-3 (small-ft)
and 2.2e-3 (vthr-ft), where 69 % and 57 % of weights are BF16-identical to the parent's; the 10-90 %
range 7e-5 - 1.4e-2. `delta` is the caller's: bench/budget_7b.py draws it per kind from those ranges.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Literal

import numpy as np

from errors import BadInputError
from indexer.hub_emulator.blobs import git_blob_sha1

BLOCK_ELEMS = 32768  # 64 KiB of BF16 per PRNG block
STD = 0.02  # typical init / trained weight scale of Llama-2 linear layers
OUTLIER_RATE = 0.002
OUTLIER_SCALE = 8.0
MAX_SHARD_BYTES = 10 * 1000**3  # transformers' max_shard_size="10GB", as in the real Llama-2 repos


@dataclass(frozen=True)
class Layout:
    """Shapes of one architecture, enough to rebuild the real tensor list and config.json."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    real_repo: str
    # Shards fill up to this many bytes. A tiny layout lowers it so that it is still served sharded (index
    # JSON + 2 shards), the path a crawl of real Llama repos takes.
    shard_bytes: int = MAX_SHARD_BYTES

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in transformers' state_dict order (the order shards are filled in)."""
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for b in range(self.layers):
            p = f"model.layers.{b}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.31.0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


LAYOUTS: dict[str, Layout] = {
    "llama-2-7b": Layout("llama-2-7b", 4096, 11008, 32, 32, 32000, "meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": Layout("llama-2-13b", 5120, 13824, 40, 40, 32000, "meta-llama/Llama-2-13b-hf"),
    # Llama-2-7B's tensor names and structure at 19.6 M parameters (39 MB of BF16, 2 shards of ~20 MB):
    # a crawl of 1,000 of them measures the per-model overhead (listing, headers, range reads, decode,
    # lineage) rather than the bandwidth of generating 7B weights.
    "llama-tiny": Layout("llama-tiny", 256, 688, 4, 4, 32000, "meta-llama/Llama-2-7b-hf", shard_bytes=20 * 1000**2),
}


def layout_named(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise BadInputError(f"layout {name!r}", f"unknown virtual layout; use one of: {known}") from None


StepKind = Literal["full", "lora-qv", "lora-all", "continued", "subres"]
STEP_KINDS: tuple[StepKind, ...] = ("full", "lora-qv", "lora-all", "continued", "subres")


@dataclass(frozen=True)
class UpdateShape:
    """The shape of one kind of step's update (its size is the step's `delta`). Numbers: module docstring."""

    rank: int  # r of the low-rank part U diag(s) V^T
    alpha: float  # s_k ~ k^-alpha, k = 1..r
    full_share: float  # share of the update's energy in an i.i.d. full-rank part
    targets: frozenset[str] | None  # module kinds updated (None: every tensor, vectors and vocabularies too)


_LINEAR = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
UPDATE_SHAPES: dict[StepKind, UpdateShape] = {
    "full": UpdateShape(rank=32, alpha=1.3, full_share=0.03, targets=None),
    "lora-qv": UpdateShape(rank=16, alpha=1.7, full_share=0.0, targets=frozenset({"q_proj", "v_proj"})),
    "lora-all": UpdateShape(rank=16, alpha=1.7, full_share=0.0, targets=_LINEAR),
    "continued": UpdateShape(rank=64, alpha=0.5, full_share=0.3, targets=None),
    "subres": UpdateShape(rank=32, alpha=1.3, full_share=0.03, targets=None),
}
# Update size per module kind, relative to the step's delta: fine-tuning moves the output projections
# most and the query/key projections least. bench/update_stats.py, median over a zoo's matrices of a
# kind's update size / its model's median: q 0.24 / 0.45 / 0.69 (small-ft / vthr-ft / wild-bert), k 0.29
# / 0.54 / 0.74, v 1.25 / 1.33 / 0.89, attention and MLP output 1.46 / 1.30 / 1.22 (GPT-2: attn.c_proj
# 1.65, mlp.c_proj 1.25), MLP input 0.67 / 0.67 / 1.35 (GPT-2 c_fc 0.73).
MODULE_SCALE: dict[str, float] = {"q_proj": 0.5, "k_proj": 0.55, "v_proj": 1.2, "o_proj": 1.4, "gate_proj": 0.7,
                                  "up_proj": 0.7, "down_proj": 1.25}
# ln(update size) across the layers of one module kind, per model: 0.48 / 0.43 / 0.11 / 0.06 (small-ft /
# vthr-ft / wild-bert / wild-gpt2; the pair trained here 0.11-0.17), about 0.3 all told: 0.25 per layer and
# 0.15 per tensor on top. (The pair's module ratios agree: q 0.63, k 0.64, v 0.98, o 1.10, gate/up 1.1, down 1.21.)
LAYER_SIGMA = 0.25
TENSOR_SIGMA = 0.15
UPDATE_MODEL = 2  # 1: i.i.d. N(0, 0.02 * delta) noise per step; 2: structured updates (issue 14)
_ROW_CHUNK = 256  # rows of U drawn per Philox stream (one block of 7B's q_proj covers 8 rows)
_LAYER_NAME = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Step:
    """One fine-tuning step above the root: its seed, its size (RMS update / 0.02 at scale 1) and kind."""

    seed: int
    delta: float
    kind: StepKind = "full"

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_SHAPES:
            raise BadInputError(f"step kind {self.kind!r}", f"use one of: {', '.join(STEP_KINDS)}")
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise BadInputError(f"step delta {self.delta!r}", "must be a finite number >= 0")


@dataclass(frozen=True)
class Lineage:
    """Who a virtual model is: its root seed, and the chain of steps from the root's child down to it."""

    layout: Layout
    root_seed: int
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        # (seed, delta) pairs, the form before update model 2, still mean full fine-tuning steps
        object.__setattr__(self, "steps", tuple(s if isinstance(s, Step) else Step(*s) for s in self.steps))

    def child(self, seed: int, delta: float, kind: StepKind = "full") -> Lineage:
        return Lineage(self.layout, self.root_seed, self.steps + (Step(seed, delta, kind),))

    def token(self) -> str:
        """A stable digest of everything the bytes depend on (used for ETags and the repo sha)."""
        raw = json.dumps([UPDATE_MODEL, self.layout.name, self.root_seed,
                          [[s.seed, s.delta, s.kind] for s in self.steps]]).encode()
        return hashlib.sha256(raw).hexdigest()


def _to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), round to nearest even, as torch does."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_to_f32(raw: bytes | np.ndarray) -> np.ndarray:
    """BF16 little-endian bytes -> float32 (shift the 16 bits into the high half)."""
    halves = np.frombuffer(raw, dtype="<u2") if isinstance(raw, bytes) else raw
    return (halves.astype(np.uint32) << np.uint32(16)).view(np.float32)


# Streams. Philox's counter is 256 bits and a draw advances its lowest word, so the block (or row chunk)
# goes in the second word: streams of neighbouring blocks never overlap. (Update model 1 put the block in
# the lowest word, which made block b + 1 block b's draws shifted by one counter step.)
_ROOT, _NOISE, _U, _V, _SCALE = range(5)


def _stream(seed: int, tensor: str, purpose: int, counter: int = 0) -> np.random.Generator:
    key = np.array([seed & (2**64 - 1), zlib.crc32(tensor.encode()) | (purpose << 32)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=np.array([0, counter, 0, 0], dtype=np.uint64)))


def _root_block(seed: int, tensor: str, is_vector: bool, block: int, n: int) -> np.ndarray:
    rng = _stream(seed, tensor, _ROOT, block)
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(STD)
    if is_vector:
        return values + np.float32(1.0)  # norm weights sit around 1, as in trained RMSNorm layers
    outliers = rng.random(n, dtype=np.float32) < OUTLIER_RATE
    values[outliers] *= np.float32(OUTLIER_SCALE)
    return values


def module_kind(tensor: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'; vectors and vocabularies by their last name."""
    parts = tensor.split(".")
    return parts[-2] if len(parts) >= 2 else tensor


@lru_cache(maxsize=4096)
def _update_scale(step: Step, tensor: str) -> float:
    """RMS of this step's update of this tensor: 0.02 * delta * module * layer * tensor factors (0: frozen)."""
    shape = UPDATE_SHAPES[step.kind]
    kind = module_kind(tensor)
    if shape.targets is not None and kind not in shape.targets:
        return 0.0
    layer = _LAYER_NAME.search(tensor)
    z_layer = _stream(step.seed, f"layer.{layer.group(1) if layer else -1}", _SCALE).standard_normal()
    z_tensor = _stream(step.seed, tensor, _SCALE).standard_normal()
    return STD * step.delta * MODULE_SCALE.get(kind, 1.0) * math.exp(LAYER_SIGMA * z_layer + TENSOR_SIGMA * z_tensor)


def _spectrum(shape: UpdateShape) -> np.ndarray:
    """s_k ~ k^-alpha scaled so that sum s_k^2 = 1: U s V^T with N(0, 1) factors has unit element RMS."""
    s = np.arange(1, shape.rank + 1, dtype=np.float64) ** -shape.alpha
    return (s / np.sqrt((s**2).sum())).astype(np.float32)


def _right_factor(seed: int, tensor: str, cols: int, rank: int) -> np.ndarray:
    """V (cols x rank), N(0, 1): every block of the tensor needs all of it."""
    return _stream(seed, tensor, _V).standard_normal((cols, rank), dtype=np.float32)


@lru_cache(maxsize=128)
def _right_scaled(seed: int, tensor: str, cols: int, kind: StepKind) -> np.ndarray:
    """(V diag(s))^T (rank x cols), C-contiguous, kept in a bounded cache: 128 x (64 x 11008 float32) at
    most = 360 MB; a sequential read of one tensor hits it once per block. Scaled once, not per block (the
    scaling copied all of V per block: up to 2.8 MB for a `continued` down_proj). Same products, same values
    as before (checked block for block on every kind; tests/test_virtual.py pins them). The product's cost
    is BLAS threading, not flops: see emulator.emulator_process."""
    shape = UPDATE_SHAPES[kind]
    return np.ascontiguousarray((_right_factor(seed, tensor, cols, shape.rank) * _spectrum(shape)).T)


@lru_cache(maxsize=256)
def _left_chunk(seed: int, tensor: str, chunk: int, rank: int) -> np.ndarray:
    """Rows [chunk * 256, chunk * 256 + 256) of U, N(0, 1): a block needs only the rows it covers."""
    return _stream(seed, tensor, _U, chunk).standard_normal((_ROW_CHUNK, rank), dtype=np.float32)


def _low_rank_rows(step: Step, tensor: str, rows: tuple[int, int], cols: int) -> np.ndarray:
    """Rows [r0, r1) of U diag(s) V^T (unit element RMS)."""
    rank = UPDATE_SHAPES[step.kind].rank
    r0, r1 = rows
    u = np.concatenate([_left_chunk(step.seed, tensor, c, rank)
                        for c in range(r0 // _ROW_CHUNK, (r1 - 1) // _ROW_CHUNK + 1)])
    first = r0 - (r0 // _ROW_CHUNK) * _ROW_CHUNK
    return u[first:first + (r1 - r0)] @ _right_scaled(step.seed, tensor, cols, step.kind)


def update_block(step: Step, tensor: str, shape: tuple[int, ...], block: int, n: int) -> np.ndarray:
    """This step's update of elements [block * 32768, + n) of the tensor (float32; zeros if frozen)."""
    scale = _update_scale(step, tensor)
    if scale == 0.0:
        return np.zeros(n, dtype=np.float32)
    kind = UPDATE_SHAPES[step.kind]
    full = (math.sqrt(kind.full_share) if len(shape) == 2 else 1.0)  # a vector has no low-rank structure
    out = _stream(step.seed, tensor, _NOISE, block).standard_normal(n, dtype=np.float32) * np.float32(full)
    if len(shape) == 2 and kind.full_share < 1.0:
        cols = shape[1]
        e0 = block * BLOCK_ELEMS
        rows = (e0 // cols, (e0 + n - 1) // cols + 1)
        low = _low_rank_rows(step, tensor, rows, cols).reshape(-1)[e0 - rows[0] * cols:e0 - rows[0] * cols + n]
        out += np.float32(math.sqrt(1.0 - kind.full_share)) * low
    return out * np.float32(scale)


def block_values(lineage: Lineage, tensor: str, shape: tuple[int, ...], block: int, n: int) -> np.ndarray:
    """The first n BF16 values (as uint16) of one block of one tensor of the model `lineage` names."""
    values = _cached_block(lineage, tensor, shape, block, n)
    values.flags.writeable = False  # shared through the cache
    return values


def _block(lineage: Lineage, tensor: str, shape: tuple[int, ...], block: int, n: int) -> np.ndarray:
    if not lineage.steps:
        return _to_bf16(_root_block(lineage.root_seed, tensor, len(shape) == 1, block, n))
    # each model is saved in BF16 and its children start from that file; the parent's block comes from
    # the cache when a relative was read just before (a crawl meets a family's members close together)
    parent = _cached_block(Lineage(lineage.layout, lineage.root_seed, lineage.steps[:-1]), tensor, shape, block, n)
    return _to_bf16(bf16_to_f32(parent) + update_block(lineage.steps[-1], tensor, shape, block, n))


def set_block_cache(blocks: int) -> None:
    """Bound the cache of generated blocks (64 KiB each; default 1,024 = 64 MiB). Benchmarks that read a
    family's members at large budgets raise it so that a child finds its parent's blocks."""
    global _cached_block
    _cached_block = lru_cache(maxsize=blocks)(_block)


_cached_block = lru_cache(maxsize=1024)(_block)


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor data inside the file
    nbytes: int


class VirtualShard:
    """One generated safetensors file: a real header followed by generated BF16 data. A Blob."""

    lfs = True

    def __init__(self, lineage: Lineage, filename: str, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
        self.lineage = lineage
        self.filename = filename
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        placed: list[tuple[str, tuple[int, ...], int, int]] = []
        for name, shape in sorted(tensors):  # safetensors writes names (and data) in sorted order
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            placed.append((name, shape, offset, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
        self.prefix = struct.pack("<Q", len(raw)) + raw
        base = len(self.prefix)
        self.entries = [_Entry(n, s, base + o, nb) for n, s, o, nb in placed]
        self._starts = [e.start for e in self.entries]
        self.data_bytes = offset
        self.size = base + offset

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + max(0, length))
        parts: list[bytes] = []
        if offset < len(self.prefix):
            parts.append(self.prefix[offset:min(end, len(self.prefix))])
        pos = max(offset, len(self.prefix))
        index = max(0, bisect_right(self._starts, pos) - 1)
        while pos < end and index < len(self.entries):
            entry = self.entries[index]
            stop = min(end, entry.start + entry.nbytes)
            if stop > pos:
                parts.append(self._tensor_bytes(entry, pos - entry.start, stop - entry.start))
                pos = stop
            index += 1
        return b"".join(parts)

    def _tensor_bytes(self, entry: _Entry, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of one tensor's data, generated block by block."""
        first, last = lo // 2, (hi + 1) // 2  # element range covering the (maybe odd) byte range
        total = entry.nbytes // 2
        chunks: list[np.ndarray] = []
        for block in range(first // BLOCK_ELEMS, (last - 1) // BLOCK_ELEMS + 1):
            n = min(BLOCK_ELEMS, total - block * BLOCK_ELEMS)
            values = block_values(self.lineage, entry.name, entry.shape, block, n)
            b0 = block * BLOCK_ELEMS
            chunks.append(values[max(first, b0) - b0:min(last, b0 + n) - b0])
        data = np.concatenate(chunks).astype("<u2").tobytes()
        skip = lo - 2 * first
        return data[skip:skip + (hi - lo)]

    def git_sha1(self) -> str:
        return git_blob_sha1(self.fingerprint().encode())

    def sha256(self) -> str:
        # Not the digest of the bytes (that would mean generating GBs): a stable stand-in that changes
        # exactly when the bytes would. Clients only compare ETags, they never recompute them for LFS.
        return hashlib.sha256(f"{self.lineage.token()}/{self.filename}".encode()).hexdigest()

    def fingerprint(self) -> str:
        return self.sha256()


class MemoryBlob:
    """A small generated file (config.json, README.md, the shard index). A Blob."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.lfs = False

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + max(0, length)]

    def git_sha1(self) -> str:
        return git_blob_sha1(self.data)

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def fingerprint(self) -> str:
        return self.git_sha1()


def _shard_plan(layout: Layout) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Fill shards in state_dict order up to `shard_bytes` each (10 GB), like transformers' save_pretrained."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in layout.tensors():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and used + nbytes > layout.shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def _readme(repo_id: str, layout: Layout, parent: str | None) -> bytes:
    lines = ["---", "license: llama2", "library_name: transformers", "pipeline_tag: text-generation"]
    if parent is not None:
        lines += [f"base_model: {parent}", "base_model_relation: finetune"]
    lines += ["tags:", "- llama", "- virtual", "---", "", f"# {repo_id}", ""]
    shaped = layout.real_repo if layout.name in layout.real_repo.lower() else f"a scaled-down {layout.real_repo}"
    what = f"a fine-tune of {parent}" if parent else f"shaped like {shaped}"
    lines.append(f"Virtual model served by the Model Graph Index Hub emulator: {what}. Weights are generated.")
    return ("\n".join(lines) + "\n").encode()


class VirtualRepo:
    """The files of one virtual model repo, built once at registration (headers only, no tensor bytes)."""

    def __init__(self, repo_id: str, lineage: Lineage, *, created_at: str, parent: str | None) -> None:
        self.repo_id = repo_id
        self.lineage = lineage
        self.created_at = created_at
        self.parent = parent

    @cached_property
    def files(self) -> Mapping[str, Any]:
        layout = self.lineage.layout
        plan = _shard_plan(layout)
        files: dict[str, Any] = {}
        weight_map: dict[str, str] = {}
        total = 0
        for number, tensors in enumerate(plan, start=1):
            name = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
            shard = VirtualShard(self.lineage, name, tensors)
            files[name] = shard
            total += shard.data_bytes
            weight_map.update({t: name for t, _ in tensors})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        files["model.safetensors.index.json"] = MemoryBlob(json.dumps(index, indent=2).encode() + b"\n")
        files["config.json"] = MemoryBlob(json.dumps(layout.config(), indent=2).encode() + b"\n")
        files["README.md"] = MemoryBlob(_readme(self.repo_id, layout, self.parent))
        return dict(sorted(files.items()))

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"virtual/{self.repo_id}/{self.lineage.token()}".encode()).hexdigest()
