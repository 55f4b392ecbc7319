"""The GGUF reader: real files from gguf.GGUFWriter, read back by range reads from bytes and from a file.

K-quant blocks (Q2_K .. Q6_K) have no quantizer in the gguf package; they come from ggml's own
ggml_quantize_chunk (the libggml-python wheel's libggml-base, indexer.zoo.quantize.ggml_quantize) and are
decoded by gguf.quants.dequantize, an independent implementation: two codebases agreeing on the bytes.
The wrapper is pinned to be ggml's by agreeing bit for bit with gguf.quants' ports on the legacy types.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import GGUFError, UnsupportedModelError
from indexer.zoo.quantize import _ggml, ggml_quantize, quantize_blocks
from sketches.gguf import (
    QUANT_RELATIVE_ERROR,
    ArraySummary,
    HFName,
    declared_base_models,
    dequantize,
    hf_names,
    parse_header,
    predicted_relative_error,
    read_header,
    read_hf_tensor,
    read_tensor,
)
from sketches.safetensors import CallableSource, FileSource

# --- quantizers: gguf.quants' ports of llama.cpp's reference quantizers, and ggml's own for the K-quants ---

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """x (float32, last dim whole blocks) -> the array GGUFWriter stores for `qtype`."""
    return quantize_blocks(x.astype(np.float32), qtype)


# --- writing and reading files -------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, str]], *,
               meta: dict[str, object] | None = None) -> Path:
    """A real GGUF file: metadata through GGUFWriter's typed adders, each tensor quantized to its type."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, int(value))
    for name, (array, qtype) in tensors.items():
        q = quantize(array, qtype)
        raw_dtype = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, q, raw_dtype=raw_dtype)  # uint8 blocks: the writer derives the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Recorder:
    """A byte source over an in-memory buffer that records every range asked of it."""

    def __init__(self, raw: bytes, name: str = "mem.gguf") -> None:
        self.raw = raw
        self.calls: list[tuple[int, int]] = []
        self.source = CallableSource(name, len(raw), self._read)

    def _read(self, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        return self.raw[start:end]


def gaussian(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture()
def mixed(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """One file with a 16 x 512 matrix of every tested type."""
    arrays = {f"t.{q}.weight": gaussian(16, 512, seed=i) for i, q in enumerate(TYPES)}
    tensors = {name: (a, name.split(".")[1]) for name, a in arrays.items()}
    return write_gguf(tmp_path / "mixed.gguf", "llama", tensors), arrays


# --- header ------------------------------------------------------------------------------------------


def test_header_fields_types_and_byte_ranges(mixed: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, arrays = mixed
    with FileSource(path) as src:
        header = read_header(src)
    assert header.version == 3 and header.alignment == 32 and header.architecture == "llama"
    assert header.names() == sorted(arrays)
    assert header.qtypes() == {q: 1 for q in sorted(TYPES)}
    info = header.get("t.Q4_K.weight")
    assert info.qtype == "Q4_K" and info.dims == (512, 16) and info.shape == (16, 512)
    assert info.nbytes == 16 * 2 * 144 and info.row_bytes == 2 * 144  # two 256-value blocks per row
    assert header.data_start % 32 == 0 and all(t.begin % 32 == 0 for t in header.tensors)
    # the reference reader agrees on every offset
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {t.name: t.begin for t in header.tensors} == {n: t.data_offset for n, t in ref.items()}
    assert {t.name: t.nbytes for t in header.tensors} == {n: int(t.n_bytes) for n, t in ref.items()}


def test_header_is_one_read_when_small(mixed: tuple[Path, dict[str, np.ndarray]]) -> None:
    rec = Recorder(mixed[0].read_bytes())
    read_header(rec.source)
    assert rec.calls == [(0, len(rec.raw))]  # the file is under the 1 MiB first read


def test_header_grows_by_reading_only_new_bytes(tmp_path: Path) -> None:
    tokens = [f"token-{i:05d}" for i in range(20_000)]  # ~360 KB of strings in front of the tensor infos
    path = write_gguf(tmp_path / "tok.gguf", "llama", {"w": (gaussian(4, 32), "Q8_0")},
                      meta={"tokenizer.ggml.tokens": tokens, "general.name": "tiny"})
    rec = Recorder(path.read_bytes())
    header = read_header(rec.source, first_read=4096)
    assert rec.calls[0] == (0, 4096)
    assert all(b[0] == a[1] for a, b in zip(rec.calls, rec.calls[1:]))  # contiguous: nothing read twice
    assert rec.calls[1][1] >= 4 * 4096 and len(rec.calls) <= 5
    assert header.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 20_000)
    assert header.metadata["general.name"] == "tiny"
    np.testing.assert_array_equal(read_tensor(rec.source, header.get("w")),
                                  gguf.quants.dequantize(quantize(gaussian(4, 32), "Q8_0"), gguf.GGMLQuantizationType.Q8_0))


def test_short_arrays_are_kept(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", "llama", {"w": (gaussian(2, 32), "F32")},
                      meta={"some.ints": [3, 1, 2], "some.strs": ["a", "b"]})
    header = parse_header("a", path.read_bytes(), file_size=path.stat().st_size)
    assert header.metadata["some.ints"] == (3, 1, 2) and header.metadata["some.strs"] == ("a", "b")


def test_declared_base_models(tmp_path: Path) -> None:
    meta = {"general.base_model.count": 2, "general.base_model.0.repo_url": "https://huggingface.co/org/base",
            "general.base_model.1.organization": "acme", "general.base_model.1.name": "other"}
    path = write_gguf(tmp_path / "b.gguf", "llama", {"w": (gaussian(2, 32), "F32")}, meta=meta)
    header = parse_header("b", path.read_bytes(), file_size=path.stat().st_size)
    assert declared_base_models(header) == ("org/base", "acme/other")


# --- decoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_decode_matches_gguf_and_the_data(mixed: tuple[Path, dict[str, np.ndarray]], qtype: str) -> None:
    path, arrays = mixed
    rec = Recorder(path.read_bytes())
    header = read_header(rec.source)
    info = header.get(f"t.{qtype}.weight")
    got = read_tensor(rec.source, info)
    original = arrays[info.name]
    expected = gguf.quants.dequantize(quantize(original, qtype), gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32 and got.shape == (16, 512) and got.flags.writeable
    assert rel(got, original) <= 1.5 * predicted_relative_error(qtype) + 1e-9


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "BF16"])
def test_row_range_reads_exactly_its_blocks(mixed: tuple[Path, dict[str, np.ndarray]], qtype: str) -> None:
    path, _ = mixed
    rec = Recorder(path.read_bytes())
    header = read_header(rec.source)
    info = header.get(f"t.{qtype}.weight")
    full = read_tensor(rec.source, info)
    rec.calls.clear()
    part = read_tensor(rec.source, info, rows=(3, 7))
    np.testing.assert_array_equal(part, full[3:7])
    assert rec.calls == [(info.begin + 3 * info.row_bytes, info.begin + 7 * info.row_bytes)]


def test_file_and_buffer_sources_agree(mixed: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = mixed
    rec = Recorder(path.read_bytes())
    with FileSource(path) as src:
        header = read_header(src)
        for info in header.tensors:
            np.testing.assert_array_equal(read_tensor(src, info, rows=(1, 2)), read_tensor(rec.source, info, rows=(1, 2)))


def test_bad_rows_and_bad_block_bytes(mixed: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = mixed
    rec = Recorder(path.read_bytes())
    info = read_header(rec.source).get("t.Q8_0.weight")
    with pytest.raises(GGUFError, match="outside its 16 rows"):
        read_tensor(rec.source, info, rows=(2, 17))
    with pytest.raises(GGUFError, match="needs 68 bytes but 67"):
        dequantize(b"\0" * 67, "Q8_0", (2, 32))
    with pytest.raises(GGUFError, match="not whole blocks"):
        dequantize(b"\0" * 34, "Q8_0", (1, 31))
    with pytest.raises(GGUFError, match="unknown quantization type 'Q9_9'"):
        dequantize(b"", "Q9_9", (0, 32))


def test_relative_error_table() -> None:
    """The documented errors are what quantizing N(0, 1) data gives (64 x 4096 values, seed 0)."""
    x = gaussian(64, 4096)
    for qtype in ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        kind = gguf.GGMLQuantizationType[qtype]
        measured = rel(gguf.quants.dequantize(quantize(x, qtype), kind), x)
        assert measured == pytest.approx(QUANT_RELATIVE_ERROR[qtype], rel=0.05), qtype
    for qtype in I_QUANTS:  # ggml's quantizer; a uniform importance matrix where one is required
        kind = gguf.GGMLQuantizationType[qtype]
        assert _ggml().ggml_quantize_requires_imatrix(int(kind)) == (qtype in NEED_IMATRIX)
        importance = np.ones(4096) if qtype in NEED_IMATRIX else None
        measured = rel(gguf.quants.dequantize(ggml_quantize(x, qtype, importance=importance), kind), x)
        assert measured == pytest.approx(QUANT_RELATIVE_ERROR[qtype], rel=0.05), qtype
    with pytest.raises(GGUFError, match="no predicted error"):
        predicted_relative_error("Q8_K")  # ggml's intermediate type, never stored in a file


I_QUANTS = ["IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M", "MXFP4", "NVFP4",
            "TQ1_0", "TQ2_0"]
NEED_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}


@pytest.mark.parametrize("qtype", I_QUANTS)
def test_i_quants_decode_through_our_reader_within_their_error(qtype: str) -> None:
    """The types llama-quantize writes beside the K-quants (IQ4_XS / IQ3_S repos, IQ4_NL rows in Q2_K and
    Q3_K files): ggml's blocks of weight-like rows, decoded by our reader exactly as by gguf.quants."""
    x = (np.random.default_rng(5).standard_t(4, (3, 1024)) * 0.02).astype(np.float32)
    blocks = ggml_quantize(x, qtype, importance=np.ones(1024) if qtype in NEED_IMATRIX else None)
    ours = dequantize(blocks.tobytes(), qtype, x.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]))
    assert 0 < rel(ours, x) <= 1.5 * predicted_relative_error(qtype) or qtype.startswith("TQ")
    with pytest.raises(ValueError, match="needs an importance matrix"):
        ggml_quantize(x, "IQ2_XXS")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_ggml_quantizer_is_bit_identical_to_gguf_py_on_the_legacy_types(qtype: str) -> None:
    """Pins the ctypes wrapper (argument order, row layout, type ids) to ggml's real quantizer: on the types
    both implement, ggml_quantize_chunk and gguf.quants' ports of llama.cpp's reference write the same bytes."""
    x = gaussian(8, 512, seed=3) * 0.02
    np.testing.assert_array_equal(ggml_quantize(x, qtype), gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_from_ggml_decode_within_their_error(qtype: str) -> None:
    """ggml's K-quant blocks of heavy-tailed weight-like rows (t with 4 degrees of freedom, 3 x 1024), decoded
    by gguf.quants and by our reader, which agree bit for bit, within 1.5x the scheme's predicted error."""
    x = (np.random.default_rng(5).standard_t(4, (3, 1024)) * 0.02).astype(np.float32)
    blocks = ggml_quantize(x, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert blocks.shape == (3, 1024 // block * type_size)
    ours = dequantize(blocks.tobytes(), qtype, x.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]))
    assert 0 < rel(ours, x) <= 1.5 * predicted_relative_error(qtype)


def test_ggml_quantizer_refuses_what_it_cannot_make() -> None:
    with pytest.raises(ValueError, match="importance matrix"):
        ggml_quantize(gaussian(1, 256), "IQ2_XXS")
    with pytest.raises(ValueError, match="not whole blocks"):
        ggml_quantize(gaussian(1, 64), "Q4_K")


# --- Hugging Face names --------------------------------------------------------------------------------


def hf_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k before writing them."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{b}.attn_norm.weight": "model.layers.{b}.input_layernorm.weight",
    "blk.{b}.ffn_norm.weight": "model.layers.{b}.post_attention_layernorm.weight",
    "blk.{b}.attn_q.weight": "model.layers.{b}.self_attn.q_proj.weight",
    "blk.{b}.attn_k.weight": "model.layers.{b}.self_attn.k_proj.weight",
    "blk.{b}.attn_v.weight": "model.layers.{b}.self_attn.v_proj.weight",
    "blk.{b}.attn_output.weight": "model.layers.{b}.self_attn.o_proj.weight",
    "blk.{b}.ffn_gate.weight": "model.layers.{b}.mlp.gate_proj.weight",
    "blk.{b}.ffn_up.weight": "model.layers.{b}.mlp.up_proj.weight",
    "blk.{b}.ffn_down.weight": "model.layers.{b}.mlp.down_proj.weight",
}


def tiny_llama(*, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 96, vocab: int = 40,
               layers: int = 2) -> dict[str, np.ndarray]:
    """An HF llama state dict with GQA (k/v have kv_heads heads of hidden // heads)."""
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for b in range(layers):
        p = f"model.layers.{b}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn)}
    return {name: gaussian(*shape, seed=i) for i, (name, shape) in enumerate(sorted(shapes.items()))}


def llama_to_gguf(path: Path, state: dict[str, np.ndarray], *, heads: int = 4, kv_heads: int = 2,
                  arch: str = "llama") -> Path:
    """A llama GGUF in F32 as llama.cpp's converter writes it: gguf names, q/k permuted (its LlamaModel and
    the subclasses that keep `undo_permute`: granite, smollm3, arcee, ...)."""
    layers = 1 + max(int(n.split(".")[2]) for n in state if n.startswith("model.layers."))
    to_gguf = {hf.format(b=b): g.format(b=b) for b in range(layers) for g, hf in LLAMA_NAMES.items()}
    tensors = {}
    for name, w in state.items():
        if name.endswith("q_proj.weight"):
            w = hf_permute(w, heads, heads)
        elif name.endswith("k_proj.weight"):
            w = hf_permute(w, heads, kv_heads)
        tensors[to_gguf[name]] = (w, "F32")
    meta = {f"{arch}.block_count": layers, f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads}
    return write_gguf(path, arch, tensors, meta=meta)


def test_llama_names_and_unpermuted_qk(tmp_path: Path) -> None:
    state = tiny_llama()
    rec = Recorder(llama_to_gguf(tmp_path / "llama.gguf", state).read_bytes())
    header = read_header(rec.source)
    names = hf_names(header)
    assert {m.hf_name for m in names.values()} == set(state)
    assert names["blk.1.attn_q.weight"] == HFName("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", False, 4)
    assert names["blk.0.attn_k.weight"].heads == 2 and names["blk.0.attn_v.weight"].heads is None
    for gguf_name, mapping in names.items():
        np.testing.assert_array_equal(read_hf_tensor(rec.source, header, mapping), state[mapping.hf_name], err_msg=gguf_name)
    # row prefixes and windows of permuted matrices: the same rows as the HF checkpoint
    for name, rows in [("blk.0.attn_q.weight", (0, 3)), ("blk.1.attn_q.weight", (5, 29)), ("blk.0.attn_k.weight", (16, 17))]:
        got = read_hf_tensor(rec.source, header, names[name], rows=rows)
        np.testing.assert_array_equal(got, state[names[name].hf_name][rows[0] : rows[1]])
    rec.calls.clear()
    read_hf_tensor(rec.source, header, names["blk.0.attn_q.weight"], rows=(0, 4))
    info = header.get("blk.0.attn_q.weight")
    assert rec.calls == [(info.begin, info.begin + 7 * info.row_bytes)]  # HF rows 0..3 = GGUF rows 0, 2, 4, 6


@pytest.mark.parametrize("arch", ["granite", "granitemoe", "smollm3", "arcee", "minicpm"])
def test_llamas_by_other_names_are_unpermuted_too(tmp_path: Path, arch: str) -> None:
    """llama.cpp's converters for these subclass LlamaModel and keep its q/k permutation (convert_hf_to_gguf:
    GraniteModel, GraniteMoeModel, SmolLM3Model, ArceeModel; MiniCPMModel permutes in its own modify_tensors)."""
    state = tiny_llama(layers=1)
    rec = Recorder(llama_to_gguf(tmp_path / f"{arch}.gguf", state, arch=arch).read_bytes())
    header = read_header(rec.source)
    names = hf_names(header)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        np.testing.assert_array_equal(read_hf_tensor(rec.source, header, names[name]), state[names[name].hf_name])


def neox_to_gguf(path: Path, state: dict[str, np.ndarray], *, heads: int, arch: str = "gptneox") -> Path:
    """A GPT-NeoX GGUF as llama.cpp's GPTNeoXModel writes it: query_key_value's rows regrouped from (head, part,
    dim) to (part, head, dim), its bias likewise."""
    names = {"gpt_neox.embed_in.weight": "token_embd.weight", "gpt_neox.final_layer_norm.weight": "output_norm.weight",
             "embed_out.weight": "output.weight", "gpt_neox.layers.0.attention.query_key_value.weight": "blk.0.attn_qkv.weight",
             "gpt_neox.layers.0.attention.query_key_value.bias": "blk.0.attn_qkv.bias",
             "gpt_neox.layers.0.attention.dense.weight": "blk.0.attn_output.weight",
             "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": "blk.0.ffn_up.weight",
             "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": "blk.0.ffn_down.weight"}
    tensors = {}
    for name, w in state.items():
        if ".query_key_value." in name:
            w = w.reshape(heads, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        tensors[names[name]] = (w, "F32")
    meta = {f"{arch}.block_count": 1, f"{arch}.attention.head_count": heads}
    return write_gguf(path, arch, tensors, meta=meta)


def test_gpt_neox_names_and_its_fused_qkv_rows_regrouped(tmp_path: Path) -> None:
    hidden, heads = 32, 4
    state = {"gpt_neox.embed_in.weight": gaussian(40, hidden), "gpt_neox.final_layer_norm.weight": gaussian(hidden),
             "embed_out.weight": gaussian(40, hidden, seed=1),
             "gpt_neox.layers.0.attention.query_key_value.weight": gaussian(3 * hidden, hidden, seed=2),
             "gpt_neox.layers.0.attention.query_key_value.bias": gaussian(3 * hidden, seed=3),
             "gpt_neox.layers.0.attention.dense.weight": gaussian(hidden, hidden, seed=4),
             "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": gaussian(4 * hidden, hidden, seed=5),
             "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": gaussian(hidden, 4 * hidden, seed=6)}
    rec = Recorder(neox_to_gguf(tmp_path / "neox.gguf", state, heads=heads).read_bytes())
    header = read_header(rec.source)
    names = hf_names(header)
    assert {m.hf_name for m in names.values()} == set(state)  # gpt_neox.* names, not a llama spelling
    for gguf_name, mapping in names.items():
        np.testing.assert_array_equal(read_hf_tensor(rec.source, header, mapping), state[mapping.hf_name], err_msg=gguf_name)
    qkv = names["blk.0.attn_qkv.weight"]
    rec.calls.clear()
    got = read_hf_tensor(rec.source, header, qkv, rows=(5, 29))  # across heads 0 and 1, all three parts
    np.testing.assert_array_equal(got, state[qkv.hf_name][5:29])
    info = header.get("blk.0.attn_qkv.weight")
    assert len(rec.calls) <= 3 and sum(b - a for a, b in rec.calls) < info.end - info.begin  # runs, not the whole
    bloom = {m.hf_name for m in hf_names(read_header(Recorder(neox_to_gguf(
        tmp_path / "b.gguf", state, heads=heads, arch="bloom").read_bytes()).source)).values()}
    assert "transformer.h.0.self_attention.query_key_value.weight" in bloom


def test_falcon_fused_qkv_of_kv_groups_regrouped(tmp_path: Path) -> None:
    """Falcon-40B-style attention: 8 q heads in 2 kv groups; llama.cpp's FalconModel views the rows as
    (kv, q per kv + 2, d) and writes all q, then all k, then all v."""
    heads, kv, d = 8, 2, 4
    hidden = heads * d
    qkv = gaussian((heads + 2 * kv) * d, hidden, seed=7)
    grouped = qkv.reshape(kv, heads // kv + 2, d, hidden)
    converted = np.concatenate([grouped[:, :-2].reshape(heads * d, hidden), grouped[:, -2].reshape(kv * d, hidden),
                                grouped[:, -1].reshape(kv * d, hidden)])
    tensors = {"blk.0.attn_qkv.weight": (converted, "F32"), "blk.0.attn_output.weight": (gaussian(hidden, hidden), "F32")}
    meta = {"falcon.block_count": 1, "falcon.attention.head_count": heads, "falcon.attention.head_count_kv": kv}
    rec = Recorder(write_gguf(tmp_path / "falcon.gguf", "falcon", tensors, meta=meta).read_bytes())
    header = read_header(rec.source)
    name = hf_names(header)["blk.0.attn_qkv.weight"]
    assert name.hf_name == "transformer.h.0.self_attention.query_key_value.weight" and name.qkv_heads == (heads, kv)
    np.testing.assert_array_equal(read_hf_tensor(rec.source, header, name), qkv)
    np.testing.assert_array_equal(read_hf_tensor(rec.source, header, name, rows=(10, 30)), qkv[10:30])


def test_a_gguf_lora_adapter_is_refused_by_name(tmp_path: Path) -> None:
    """llama.cpp's convert_lora_to_gguf writes general.type = adapter and blk.N.attn_q.weight.lora_a / _b: not a
    model whose architecture lacks a name map, a LoRA adapter this reader does not take."""
    from indexer.readers import read_gguf
    from sketches.safetensors import FileSource

    meta = {"general.type": "adapter", "adapter.type": "lora", "llama.block_count": 1}
    path = write_gguf(tmp_path / "lora.gguf", "llama", {"blk.0.attn_q.weight.lora_a": (gaussian(4, 32), "F32"),
                                                        "blk.0.attn_q.weight.lora_b": (gaussian(32, 4), "F32")}, meta=meta)
    with pytest.raises(UnsupportedModelError, match="a GGUF lora adapter"):
        read_gguf(FileSource(str(path)), budget=1 << 20)


def test_permutation_can_be_turned_off(tmp_path: Path) -> None:
    state = tiny_llama(layers=1)
    rec = Recorder(llama_to_gguf(tmp_path / "l.gguf", state).read_bytes())
    header = read_header(rec.source)
    mapping = hf_names(header, permuted=False)["blk.0.attn_q.weight"]
    assert mapping.heads is None
    np.testing.assert_array_equal(read_hf_tensor(rec.source, header, mapping),
                                  hf_permute(state["model.layers.0.self_attn.q_proj.weight"], 4))


def test_gpt2_names_and_transposed_conv1d(tmp_path: Path) -> None:
    hf = {"transformer.h.0.attn.c_attn.weight": gaussian(32, 96), "transformer.h.0.attn.c_attn.bias": gaussian(96),
          "transformer.h.0.mlp.c_fc.weight": gaussian(32, 128, seed=1), "transformer.wte.weight": gaussian(50, 32, seed=2),
          "transformer.ln_f.weight": gaussian(32, seed=3)}
    to_gguf = {"transformer.h.0.attn.c_attn.weight": "blk.0.attn_qkv.weight", "transformer.h.0.attn.c_attn.bias": "blk.0.attn_qkv.bias",
               "transformer.h.0.mlp.c_fc.weight": "blk.0.ffn_up.weight", "transformer.wte.weight": "token_embd.weight",
               "transformer.ln_f.weight": "output_norm.weight"}
    tensors = {to_gguf[n]: ((w.T.copy() if n.endswith(("c_attn.weight", "c_fc.weight")) else w), "F32") for n, w in hf.items()}
    rec = Recorder(write_gguf(tmp_path / "gpt2.gguf", "gpt2", tensors, meta={"gpt2.block_count": 1}).read_bytes())
    header = read_header(rec.source)
    names = hf_names(header)
    assert {m.hf_name for m in names.values()} == set(hf)
    assert names["blk.0.attn_qkv.weight"].transposed and not names["blk.0.attn_qkv.bias"].transposed
    for mapping in names.values():
        np.testing.assert_array_equal(read_hf_tensor(rec.source, header, mapping), hf[mapping.hf_name])
    got = read_hf_tensor(rec.source, header, names["blk.0.ffn_up.weight"], rows=(2, 5))
    np.testing.assert_array_equal(got, hf["transformer.h.0.mlp.c_fc.weight"][2:5])


def test_unknown_architecture_maps_nothing(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "x.gguf", "no-such-arch", {"blk.0.attn_q.weight": (gaussian(2, 32), "F32")})
    assert hf_names(parse_header("x", path.read_bytes(), file_size=path.stat().st_size)) == {}


# --- bad input ------------------------------------------------------------------------------------------


def one_tensor_file(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "one.gguf", "llama", {"blk.0.attn_q.weight": (gaussian(4, 64), "Q8_0")}).read_bytes()


def info_field_offset(raw: bytes, name: str) -> int:
    """Byte offset of the tensor info's (n_dims, dims, type, offset) fields, right after its name."""
    encoded = name.encode()
    at = raw.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def patched(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    return raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt) :]


def error_of(raw: bytes) -> str:
    rec = Recorder(raw)
    with pytest.raises(GGUFError) as info:
        read_header(rec.source)
    return info.value.reason


def test_truncated_header(tmp_path: Path) -> None:
    raw = one_tensor_file(tmp_path)
    data_start = parse_header("f", raw, file_size=len(raw)).data_start
    for cut in [0, 3, 10, 23, 40, data_start - 9, data_start - 30]:
        assert error_of(raw[:cut]).startswith(("truncated", "not a GGUF")), cut
    with pytest.raises(GGUFError, match=r"truncated: the header needs at least \d+ bytes, 30 given"):
        parse_header("f", raw[:30], file_size=len(raw))


def test_unknown_quantization_type(tmp_path: Path) -> None:
    raw = one_tensor_file(tmp_path)
    at = info_field_offset(raw, "blk.0.attn_q.weight") + 4 + 2 * 8  # past n_dims and two dims
    assert error_of(patched(raw, at, "<I", 99)) == "tensor 'blk.0.attn_q.weight': unknown quantization type 99"


def test_tensor_past_the_end_of_the_file(tmp_path: Path) -> None:
    raw = one_tensor_file(tmp_path)
    at = info_field_offset(raw, "blk.0.attn_q.weight") + 4 + 2 * 8 + 4
    assert "past the end of the file" in error_of(patched(raw, at, "<Q", 1 << 20))
    assert "past the end of the file" in error_of(raw[:-32])  # the data section cut short
    assert "not a multiple of the alignment" in error_of(patched(raw, at, "<Q", 3))


def test_other_bad_headers(tmp_path: Path) -> None:
    raw = one_tensor_file(tmp_path)
    assert "not a GGUF file" in error_of(b"GGML" + raw[4:])
    assert "version 1 is not supported" in error_of(patched(raw, 4, "<I", 1))
    assert "big-endian" in error_of(patched(raw, 4, ">I", 3))
    assert "tensor count is" in error_of(patched(raw, 8, "<Q", 1 << 40))
    at = info_field_offset(raw, "blk.0.attn_q.weight")
    assert "5 dimensions" in error_of(patched(raw, at, "<I", 5))


def test_header_over_the_cap_is_refused_before_reading_it() -> None:
    """A key 300 MB long in a 1 TB "file": refused at the cap, after reading no more than the cap."""
    preamble = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 300 << 20)
    asked: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        asked.append((start, end))
        return (preamble + bytes(max(0, end - len(preamble))))[start:end]

    with pytest.raises(GGUFError, match="over the 268435456-byte cap"):
        read_header(CallableSource("huge.gguf", 1 << 40, read))
    assert asked[-1][1] <= 256 << 20


VALID: bytes | None = None


def valid_file() -> bytes:
    global VALID
    if VALID is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            VALID = write_gguf(Path(tmp) / "v.gguf", "llama", {"blk.0.attn_q.weight": (gaussian(2, 64), "Q4_0"),
                                                                "output_norm.weight": (gaussian(64), "F32")},
                               meta={"general.name": "v", "some.list": [1, 2]}).read_bytes()
    return VALID


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_gguf_errors(raw: bytes) -> None:
    for data in (raw, b"GGUF\x03\0\0\0" + raw):
        try:
            parse_header("fuzz", data, file_size=len(data))
        except GGUFError:
            pass


@FAST
@given(st.data())
def test_mutated_files_raise_only_gguf_errors(data: st.DataObject) -> None:
    raw = bytearray(valid_file())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    rec = Recorder(bytes(raw[:cut]))
    try:
        header = read_header(rec.source, first_read=data.draw(st.integers(1, 64)))
    except GGUFError:
        return
    for info in header.tensors:  # a header that parses has tensors that decode
        try:
            read_tensor(rec.source, info)
        except GGUFError:
            pass


def test_a_gguf_split_shard_says_it_holds_part_of_the_model(tmp_path: Path) -> None:
    """gguf-split's shard 1 of 3 holds only its tensors: it is read, and its details say so (never a silent part)."""
    from indexer.readers import read_gguf

    x = gaussian(64, 64)
    path = write_gguf(tmp_path / "m-00001-of-00003.gguf", "llama",
                      {"blk.0.attn_q.weight": (x, "F32"), "blk.0.attn_v.weight": (x, "F32")},
                      meta={"llama.block_count": 3, "llama.attention.head_count": 4, "split.no": 0, "split.count": 3})
    with FileSource(path) as src:
        read = read_gguf(src, budget=1 << 30)
    assert read.details["split"] == {"file": 1, "of": 3, "tensors_here": 2}
