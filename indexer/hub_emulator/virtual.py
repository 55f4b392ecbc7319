"""Virtual large models: real Llama-2 layouts whose tensor bytes are generated on demand, never stored.
(`llama-tiny` keeps their structure at 20 M parameters, for benchmarks of many models.)

A virtual repo looks exactly like the real one on the Hub (config.json, README.md, sharded BF16
safetensors + model.safetensors.index.json), but each shard is computed: the header is real JSON and
the tensor data for any byte range is generated from (seed, tensor, block). Reading 1 MiB out of the
middle of a 10 GB shard costs about as much as generating 1 MiB.

Values. Element e of tensor t lies in block e // 32768 (64 KiB of BF16). Each block draws from its own
numpy Philox stream keyed by (seed, crc32(tensor name), root or noise) with counter = block, so any block is
reproducible alone. A root model's weights are N(0, 0.02) with 0.2 % of them scaled by 8 (a heavy tail,
excess kurtosis ~19, like real pre-trained weights); norm vectors are 1 + N(0, 0.02). A child is its
parent's values plus N(0, 0.02 * delta) from its own seed, rounded to BF16 again, so fine-tuning
lowers kurtosis as the MoTHer direction rule expects, and children of children work the same way.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

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


@dataclass(frozen=True)
class Lineage:
    """Who a virtual model is: its seed, and the chain of (seed, delta) perturbations above its root."""

    layout: Layout
    root_seed: int
    steps: tuple[tuple[int, float], ...] = ()  # (seed, delta) from the root's child down to this model

    def child(self, seed: int, delta: float) -> Lineage:
        return Lineage(self.layout, self.root_seed, self.steps + ((seed, delta),))

    def token(self) -> str:
        """A stable digest of everything the bytes depend on (used for ETags and the repo sha)."""
        raw = json.dumps([self.layout.name, self.root_seed, list(self.steps)]).encode()
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


def _stream(seed: int, tensor: str, block: int, *, noise: bool = False) -> np.random.Generator:
    # The high word separates root draws from fine-tune noise: a child seeded like its root still
    # gets noise independent of the root's weights.
    key = np.array([seed & (2**64 - 1), zlib.crc32(tensor.encode()) | (int(noise) << 32)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=np.array([block, 0, 0, 0], dtype=np.uint64)))


def _root_block(seed: int, tensor: str, is_vector: bool, block: int, n: int) -> np.ndarray:
    rng = _stream(seed, tensor, block)
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(STD)
    if is_vector:
        return values + np.float32(1.0)  # norm weights sit around 1, as in trained RMSNorm layers
    outliers = rng.random(n, dtype=np.float32) < OUTLIER_RATE
    values[outliers] *= np.float32(OUTLIER_SCALE)
    return values


def block_values(lineage: Lineage, tensor: str, is_vector: bool, block: int, n: int) -> np.ndarray:
    """The first n BF16 values (as uint16) of one block of one tensor of the model `lineage` names."""
    values = _root_block(lineage.root_seed, tensor, is_vector, block, n)
    halves = _to_bf16(values)
    for seed, delta in lineage.steps:
        noise = _stream(seed, tensor, block, noise=True).standard_normal(n, dtype=np.float32) * np.float32(STD * delta)
        halves = _to_bf16(bf16_to_f32(halves) + noise)
    return halves


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
            values = block_values(self.lineage, entry.name, len(entry.shape) == 1, block, n)
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
