"""Quantized copies as the real tools write them, for the relations zoo and the tests.

- GGUF: llama.cpp's layout through the `gguf` package's own writer (GGUFWriter) and quantizers
  (gguf.quants.quantize: F16, BF16, Q8_0, Q4_0, Q5_0 ... bit-exact ports of llama.cpp's reference
  quantizers). The package has no K-quant quantizer: Q2_K..Q6_K blocks come from ggml itself,
  `ggml_quantize_chunk` in the libggml-base shared library that the `libggml-python` wheel ships (the
  code llama-quantize runs; without an importance matrix it is quantize_row_q4_K_ref & co.). Names are
  llama.cpp's (`blk.N.attn_q.weight`), q/k rows permuted as convert_hf_to_gguf.py's LlamaModel.permute
  does, norms kept in F32 as llama.cpp does, and no config.json beside it: a GGUF repo on the Hub has the
  .gguf file (and a card) only.
- GPTQ: AutoGPTQ's v1 checkpoint layout (qweight int32 packed along the input rows, qzeros packed along
  the output columns and stored minus one, fp16 scales per group of input rows, g_idx), with
  round-to-nearest codes (what GPTQ starts from; its error-feedback pass needs calibration data) and the
  `quantization_config` transformers writes into config.json. Layout as in tests/test_packed.py's packer.
- MLX: mlx's own quantizer (`mlx.core.quantize`, the one `mlx_lm.convert -q` runs) and writer
  (`mlx.core.save_safetensors`, metadata format "mlx"), as mlx-lm lays a quantized model out: every Linear
  and Embedding whose rows split into groups (projections, embed_tokens, lm_head) as U32 codes + scales +
  biases in F16, norms in F16, config.json's "quantization" (and its copy as "quantization_config") with
  the defaults and, for a mixed recipe, per-module entries. An optional extra (mlx[cpu] on Linux).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file

LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{b}.input_layernorm.weight": "blk.{b}.attn_norm.weight",
    "model.layers.{b}.post_attention_layernorm.weight": "blk.{b}.ffn_norm.weight",
    "model.layers.{b}.self_attn.q_proj.weight": "blk.{b}.attn_q.weight",
    "model.layers.{b}.self_attn.k_proj.weight": "blk.{b}.attn_k.weight",
    "model.layers.{b}.self_attn.v_proj.weight": "blk.{b}.attn_v.weight",
    "model.layers.{b}.self_attn.o_proj.weight": "blk.{b}.attn_output.weight",
    "model.layers.{b}.mlp.gate_proj.weight": "blk.{b}.ffn_gate.weight",
    "model.layers.{b}.mlp.up_proj.weight": "blk.{b}.ffn_up.weight",
    "model.layers.{b}.mlp.down_proj.weight": "blk.{b}.ffn_down.weight",
    "model.layers.{b}.mlp.gate.weight": "blk.{b}.ffn_gate_inp.weight",  # a MoE's router, and its stacked experts
    "model.layers.{b}.mlp.experts.gate_proj.weight": "blk.{b}.ffn_gate_exps.weight",
    "model.layers.{b}.mlp.experts.up_proj.weight": "blk.{b}.ffn_up_exps.weight",
    "model.layers.{b}.mlp.experts.down_proj.weight": "blk.{b}.ffn_down_exps.weight",
}


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: within each head, rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stacked_experts(state: Mapping[str, np.ndarray], writer: gguf.GGUFWriter, arch: str) -> dict[str, np.ndarray]:
    """A MoE's experts as convert_hf_to_gguf.py writes them (Mixtral): every expert's gate, up and down
    matrix stacked into blk.N.ffn_{gate,up,down}_exps of numpy shape (experts, out, in), the router as
    blk.N.ffn_gate_inp, and the expert counts in the metadata. `state` holds transformers 5's fused
    experts (mlp.experts.gate_up_proj: (E, 2I, H), each expert's gate rows then its up rows;
    mlp.experts.down_proj: (E, H, I)); a dense state is returned as it is."""
    out = dict(state)
    fused = sorted(n for n in state if n.endswith(".mlp.experts.gate_up_proj"))
    for name in fused:
        stem = name[: -len(".mlp.experts.gate_up_proj")]
        gate_up, down = np.asarray(out.pop(name)), np.asarray(out.pop(stem + ".mlp.experts.down_proj"))
        inner = gate_up.shape[1] // 2
        out[stem + ".mlp.experts.gate_proj.weight"] = gate_up[:, :inner]
        out[stem + ".mlp.experts.up_proj.weight"] = gate_up[:, inner:]
        out[stem + ".mlp.experts.down_proj.weight"] = down
    if fused:
        writer.add_uint32(f"{arch}.expert_count", int(np.asarray(state[fused[0]]).shape[0]))
        writer.add_uint32(f"{arch}.expert_used_count", 2)
    return out


def _gguf_name(hf: str) -> str | None:
    parts = hf.split(".")
    if hf.endswith("_proj.bias"):  # qwen2's q / k / v biases, beside their weights
        weight = _gguf_name(hf[: -len(".bias")] + ".weight")
        return weight[: -len(".weight")] + ".bias" if weight else None
    if hf.startswith("model.layers.") and len(parts) > 3:
        key = ".".join(parts[:2] + ["{b}"] + parts[3:])
        return LLAMA_NAMES[key].format(b=parts[2]) if key in LLAMA_NAMES else None
    return LLAMA_NAMES.get(hf)


# Types gguf.quants cannot quantize, made by ggml's own quantizer instead (ggml_quantize).
GGML_QUANTIZED = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"})
# llama-quantize (llama_tensor_get_type): a tensor whose rows are not whole 256-value super-blocks gets a
# legacy type instead of its K-quant, and F16 when the rows are not whole blocks of that either.
K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# general.file_type of each file type we write ("Q4_K_M" is a mixture: _tensor_qtype)
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_K": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_S",
              "Q6_K": "MOSTLY_Q6_K", "Q3_K": "MOSTLY_Q3_K_S", "Q2_K": "MOSTLY_Q2_K"}


@cache
def _ggml() -> Any:
    """libggml-base from the libggml-python wheel, with ggml_quantize_chunk's and ggml_row_size's C types."""
    try:
        import libggml
    except ImportError as exc:
        raise ImportError("K-quant GGUF copies need ggml's quantizer: pip install -e '.[zoo]' "
                          "(libggml-python)") from exc
    lib = ctypes.CDLL(str(Path(libggml.__file__).parent / "lib64" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]  # the IQ types' grids, built once per type
    return lib


def ggml_quantize(array: np.ndarray, qtype: str, *, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows (last dim whole blocks) -> ggml's blocks of `qtype` as uint8, shaped like
    gguf.quants.quantize's output. Without `importance` (one weight per column: llama-quantize's
    --imatrix) what `llama-quantize` writes without one; IQ1_S, IQ2_XXS and IQ2_XS refuse to go without."""
    kind = gguf.GGMLQuantizationType[qtype]
    lib = _ggml()
    if importance is None and lib.ggml_quantize_requires_imatrix(int(kind)):
        raise ValueError(f"{qtype} needs an importance matrix; use a K-quant or a legacy type")
    x = np.ascontiguousarray(array, dtype=np.float32)
    n_per_row = x.shape[-1]
    if n_per_row % gguf.GGML_QUANT_SIZES[kind][0]:
        raise ValueError(f"{qtype}: rows of {n_per_row} values are not whole blocks")
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32).reshape(n_per_row)
    lib.ggml_quantize_init(int(kind))
    rows = x.size // n_per_row if n_per_row else 0
    out = np.empty((*x.shape[:-1], lib.ggml_row_size(int(kind), n_per_row)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(kind), x.ctypes.data, out.ctypes.data, 0, rows, n_per_row,
                                      None if weights is None else weights.ctypes.data)
    assert written == out.nbytes, (written, out.nbytes)  # ggml's row size and ours agree
    return out


def quantize_blocks(array: np.ndarray, qtype: str) -> np.ndarray:
    """The blocks GGUFWriter stores for `qtype`: gguf.quants' ports where it has one, else ggml's own."""
    if qtype in GGML_QUANTIZED:
        return ggml_quantize(array, qtype)
    return gguf.quants.quantize(np.asarray(array, dtype=np.float32), gguf.GGMLQuantizationType[qtype])


def _more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's use_more_bits (C int division): the first and last eighth of the layers and every
    third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _tensor_qtype(target: str, qtype: str, layers: int) -> str:
    """The type llama-quantize gives one tensor of a `qtype` file. Q4_K_M: output, attn_v and ffn_down
    (in the layers _more_bits picks) in Q6_K, the rest Q4_K; every other file type is uniform."""
    if qtype != "Q4_K_M":
        return qtype
    if target == "output.weight":
        return "Q6_K"
    if target.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(int(target.split(".")[1]), layers):
        return "Q6_K"
    return "Q4_K"


def _stored(array: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(what GGUFWriter stores, raw dtype): norms and 1-D tensors in F32; a K-quant whose rows are not whole
    super-blocks in K_FALLBACK's type, and any other type that does not fit in F16, as llama-quantize does."""
    if array.ndim < 2 or qtype == "F32":
        return array.astype(np.float32), None
    if array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] and qtype in K_FALLBACK:
        qtype = K_FALLBACK[qtype]
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F16" or array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return array.astype(np.float16), None
    return quantize_blocks(array, qtype), kind


def write_llama_gguf(path: Path, state: Mapping[str, np.ndarray], qtype: str, *, heads: int, kv_heads: int,
                     base_model: str | None = None, arch: str = "llama", split_max_tensors: int = 0) -> Path:
    """A llama GGUF of an HF state dict (float32 numpy), quantized to `qtype` (a block type, or the file type
    Q4_K_M), as llama.cpp writes it. `arch` "qwen2": convert_hf_to_gguf.py's Qwen2Model, the same names plus
    the q / k / v biases, and no rotary permutation of q and k. `split_max_tensors` > 0: a gguf-split set of
    that many tensors a shard, which GGUFWriter names `<stem>-0000i-of-0000N.gguf` beside `path` (then
    `path` itself is not written)."""
    layers = 1 + max(int(n.split(".")[2]) for n in state if n.startswith("model.layers."))
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_uint32(f"{arch}.block_count", layers)
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    file_type = FILE_TYPES.get(qtype, f"MOSTLY_{qtype}")
    if file_type not in gguf.LlamaFileType.__members__:
        raise ValueError(f"no llama.cpp file type for {qtype!r} (known: {', '.join(sorted(FILE_TYPES))})")
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType[file_type]))
    if base_model:  # the converter's declared lineage (general.base_model.*): audited, never trusted
        writer.add_uint32("general.base_model.count", 1)
        writer.add_string("general.base_model.0.repo_url", f"https://huggingface.co/{base_model}")
    state = _stacked_experts(state, writer, arch)
    for name in sorted(state):
        target = _gguf_name(name)
        if target is None:
            continue
        w = np.asarray(state[name], dtype=np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = hf_permute(w, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = hf_permute(w, kv_heads)
        data, raw = _stored(w, _tensor_qtype(target, qtype, layers))
        writer.add_tensor(target, data, raw_dtype=raw)
    return _written(writer, path)


def _written(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_flux_gguf(path: Path, state: Mapping[str, np.ndarray], qtype: str, *, arch: str = "flux") -> Path:
    """A FLUX (or, with arch `sd3`, SD3) GGUF as city96's ComfyUI-GGUF converter writes one: the original
    layout's tensor names as they are (`double_blocks.0.img_attn.qkv.weight`,
    `joint_blocks.0.x_block.attn.qkv.weight`), matrices quantized to `qtype` where their rows are whole
    blocks (else F16), 1-D tensors in F32."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType[FILE_TYPES.get(qtype, f"MOSTLY_{qtype}")]))
    for name in sorted(state):
        data, raw = _stored(np.asarray(state[name], dtype=np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    return _written(writer, path)


def write_hf_gguf(path: Path, state: Mapping[str, np.ndarray], qtype: str, *, arch: str) -> Path:
    """A GGUF of an HF checkpoint whose converter only renames (convert_hf_to_gguf.py's BertModel, NomicBertModel:
    `map_tensor_name` through gguf's TensorNameMap, a leading `bert.` dropped, tensors without a GGUF name --
    the pooler, an MLM head -- left out), matrices in `qtype` where their rows are whole blocks."""
    kinds = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not kinds:
        raise ValueError(f"{arch!r} is no llama.cpp architecture")
    blocks = 1 + max((int(n) for name in state for n in name.split(".") if n.isdigit()), default=0)
    names = gguf.TensorNameMap(kinds[0], blocks)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.block_count", blocks)
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType[FILE_TYPES.get(qtype, f"MOSTLY_{qtype}")]))
    for name in sorted(state):
        target = names.get_name(name.removeprefix("bert."), try_suffixes=(".weight", ".bias"))
        if target is None:
            continue
        data, raw = _stored(np.asarray(state[name], dtype=np.float32), qtype)
        writer.add_tensor(target, data, raw_dtype=raw)
    return _written(writer, path)


COMFY_REARRANGE_THRESHOLD = 512  # ComfyUI-GGUF's convert.py: tensors this big whose rows are no 256-multiple


def write_comfy_gguf(path: Path, state: Mapping[str, np.ndarray], qtype: str, *, arch: str,
                     prefix: str = "") -> Path:
    """A diffusion model's GGUF as city96's ComfyUI-GGUF converter writes one for `arch` (its `shape_fix`
    architectures: Wan, HunyuanVideo, LTX-Video, SDXL, ...): the checkpoint's own names (under `prefix`), a
    tensor of 512+ values whose last dimension is no multiple of 256 flattened to rows of 256 with its shape
    in `comfy.gguf.orig_shape.<name>` (conv kernels; a 5-D patch embedding GGUF could not hold), matrices in
    `qtype` where their rows are whole blocks (else F16), 1-D tensors in F32."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType[FILE_TYPES.get(qtype, f"MOSTLY_{qtype}")]))
    for name in sorted(state):
        w = np.asarray(state[name], dtype=np.float32)
        if (w.ndim > 1 and w.size >= COMFY_REARRANGE_THRESHOLD and w.size % 256 == 0 and w.shape[-1] % 256) or w.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{name}", [int(d) for d in w.shape])
            w = w.reshape(-1, 256) if w.size % 256 == 0 else w.reshape(-1)  # a small 5-D tensor: one row
        data, raw = _stored(w, qtype)
        writer.add_tensor(prefix + name, data, raw_dtype=raw)
    return _written(writer, path)


# --- GPTQ ------------------------------------------------------------------------------------------------


def _rtn(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest with a zero point over the last axis: (codes, scale, zero) as GPTQ stores them."""
    maxq = (1 << bits) - 1
    lo, hi = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / maxq, 1.0).astype(np.float16).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 1, maxq)  # >= 1: v1 stores zero - 1 in `bits` bits
    codes = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, maxq)
    return codes.astype(np.int64), scale, zero.astype(np.int64)


def _pack_words(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    k = 32 // bits
    c = np.moveaxis(codes, axis, -1)
    c = c.reshape(*c.shape[:-1], -1, k)
    words = sum((c[..., j].astype(np.uint64) << np.uint64(bits * j)) for j in range(k))
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def pack_gptq(w: np.ndarray, *, bits: int = 4, group: int = 128) -> dict[str, np.ndarray]:
    """One Linear weight (out, in) -> {qweight, qzeros, scales, g_idx} in GPTQ's v1 layout."""
    out, n_in = w.shape
    g_idx = np.arange(n_in) // group
    n_groups = int(g_idx.max()) + 1
    codes = np.empty((n_in, out), dtype=np.int64)
    scales = np.empty((n_groups, out), dtype=np.float32)
    zeros = np.empty((n_groups, out), dtype=np.int64)
    for g in range(n_groups):
        cols = np.flatnonzero(g_idx == g)
        c, s, z = _rtn(w[:, cols], bits)
        codes[cols], scales[g], zeros[g] = c.T, s, z
    return {"qweight": _pack_words(codes, bits, 0), "qzeros": _pack_words(zeros - 1, bits, 1),
            "scales": scales.astype(np.float16), "g_idx": g_idx.astype(np.int32)}


def write_gptq(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *, bits: int = 4,
               group: int = 32) -> Path:
    """A GPTQ checkpoint folder: the attention and MLP projections packed, the rest in F16, config.json
    with transformers' quantization_config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, w in sorted(state.items()):
        if name.endswith("_proj.weight") and w.ndim == 2 and w.shape[1] % group == 0:
            prefix = name[: -len(".weight")]
            tensors |= {f"{prefix}.{role}": a for role, a in pack_gptq(np.asarray(w, np.float32), bits=bits, group=group).items()}
        else:
            tensors[name] = np.asarray(w, dtype=np.float16)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    quant = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    return folder


# --- bitsandbytes and FP8: the real libraries' own quantizers and serialisations (optional) --------------
#
# Neither library is a runtime dependency: the `quant` extra (`pip install -e '.[quant]'`, which `make
# test` installs) brings them; both run on CPU (bitsandbytes >= 0.45 has a CPU backend, compressed-tensors
# is plain torch). The relations zoo adds these copies only when both import (`optional_quantizers`).


# --- AWQ ----------------------------------------------------------------------------------------------------


def _awq_scale(rng: np.random.Generator, weights: Sequence[np.ndarray], spread: float) -> np.ndarray:
    """AWQ's per-input-channel scale s = x_mean^a / w_mean^(1 - a) at a = 0.5, normalised by sqrt(max * min)
    (AutoAWQ's _search_best_scale at one grid point), over the matrices that read those channels. The
    activation means are drawn (log-normal, `spread`): this zoo has no calibration text to run."""
    w_mean = np.mean([np.abs(w).mean(axis=0) / np.abs(w).max() for w in weights], axis=0)
    x_mean = np.exp(rng.normal(0.0, spread, w_mean.shape[0]))
    s = np.sqrt(x_mean) / np.sqrt(np.maximum(w_mean, 1e-4))
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def awq_fold(state: Mapping[str, np.ndarray], *, seed: int, spread: float = 1.0) -> dict[str, np.ndarray]:
    """A Llama state with AWQ's scales folded in, as AutoAWQ's apply_scale leaves it before packing:
    input_layernorm / s, q, k, v columns * s; post_attention_layernorm / s, gate, up columns * s; up rows / s,
    down columns * s; v rows / s, o columns * s where their widths agree (no grouped-query attention)."""
    rng = np.random.default_rng(seed)
    out = {n: np.asarray(a, np.float32).copy() for n, a in state.items()}
    blocks = sorted({n.split(".")[2] for n in out if n.startswith("model.layers.")}, key=int)

    def fold(prev: str, rows: bool, users: Sequence[str]) -> None:
        s = _awq_scale(rng, [out[u] for u in users], spread)
        out[prev] = out[prev] / (s[:, None] if rows else s)
        for u in users:
            out[u] = out[u] * s
    for b in blocks:
        p = f"model.layers.{b}."
        fold(p + "input_layernorm.weight", False, [p + f"self_attn.{m}_proj.weight" for m in "qkv"])
        if out[p + "self_attn.v_proj.weight"].shape[0] == out[p + "self_attn.o_proj.weight"].shape[1]:
            fold(p + "self_attn.v_proj.weight", True, [p + "self_attn.o_proj.weight"])
        fold(p + "post_attention_layernorm.weight", False, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        fold(p + "mlp.up_proj.weight", True, [p + "mlp.down_proj.weight"])
    return out


def pack_awq(w: np.ndarray, *, group: int = 32) -> dict[str, np.ndarray]:
    """One Linear weight (out, in) -> AutoAWQ's GEMM layout: 4-bit codes packed along the output columns
    in its nibble order (sketches.packed.AWQ_ORDER), zero points likewise, F16 scales per input group."""
    from sketches.packed import AWQ_ORDER

    out, n_in = w.shape
    codes, scale, zero = _rtn(w.reshape(out, n_in // group, group), 4)
    codes = codes.reshape(out, n_in).T  # (in, out)

    def words(c: np.ndarray) -> np.ndarray:
        c = c.reshape(c.shape[0], -1, 8)[..., list(AWQ_ORDER)]
        packed = sum((c[..., j].astype(np.uint64) << np.uint64(4 * j)) for j in range(8))
        return packed.astype(np.uint32).view(np.int32)
    return {"qweight": words(codes), "qzeros": words(zero.T), "scales": scale.T.astype(np.float16)}


def write_awq(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *, group: int = 32,
              fold_seed: int | None = None, spread: float = 1.0) -> Path:
    """An AWQ (GEMM, 4-bit) checkpoint folder: with `fold_seed`, AWQ's scales folded in first (`awq_fold`);
    the projections packed with round-to-nearest codes (AutoAWQ also clips each group's range, not done
    here), the rest in F16, config.json with AutoAWQ's quantization_config."""
    if fold_seed is not None:
        state = awq_fold(state, seed=fold_seed, spread=spread)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, w in sorted(state.items()):
        if name.endswith("_proj.weight") and w.ndim == 2 and w.shape[1] % group == 0 and w.shape[0] % 8 == 0:
            tensors |= {f"{name[: -len('.weight')]}.{k}": a for k, a in pack_awq(np.asarray(w, np.float32), group=group).items()}
        else:
            tensors[name] = np.asarray(w, dtype=np.float16)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    quant = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    return folder


def optional_quantizers() -> str:
    """"" when bitsandbytes and compressed-tensors import, else why not (one line)."""
    try:
        import bitsandbytes  # noqa: F401
        import compressed_tensors  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- an optional extra: any import failure means "not here"
        return f"{type(exc).__name__}: {exc}"
    return ""


def write_mlx(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *, bits: int = 4,
              group_size: int = 64, mode: str = "affine", module_bits: Mapping[str, int] | None = None) -> Path:
    """An MLX-quantized checkpoint written by mlx itself (see the module docstring). `module_bits`: module
    path -> bits of a mixed recipe (mlx-lm's mixed_3_6 and friends keep some layers at more bits)."""
    import mlx.core as mx

    module_bits = dict(module_bits or {})
    tensors: dict[str, Any] = {}
    quantization: dict[str, Any] = {"group_size": group_size, "bits": bits}
    if mode != "affine":
        quantization["mode"] = mode
    for name, w in sorted(state.items()):
        array = mx.array(np.asarray(w, dtype=np.float32)).astype(mx.float16)  # mlx-lm casts, then quantizes
        prefix = name[: -len(".weight")]
        if not name.endswith(".weight") or np.ndim(w) != 2 or np.shape(w)[-1] % group_size:
            tensors[name] = array
            continue
        own = module_bits.get(prefix, bits)
        if own != bits:
            quantization[prefix] = {"group_size": group_size, "bits": own}
        parts = mx.quantize(array, group_size=group_size, bits=own, mode=mode)
        tensors |= dict(zip((name, f"{prefix}.scales", f"{prefix}.biases"), parts, strict=False))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "mlx"})
    doc = {**config, "quantization": quantization, "quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(doc, indent=1))
    return folder


TORCHAO_KINDS = ("int8", "float8")


def write_torchao(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *,
                  kind: str = "int8") -> Path:
    """A torchao checkpoint as transformers' TorchAoConfig saves one: each projection an nn.Linear through
    torchao's own `quantize_` (Int8WeightOnlyConfig or Float8WeightOnlyConfig, per row), the state dict
    flattened by torchao's flatten_tensor_state_dict (`_weight_qdata`, `_weight_scale`, `_weight_zero_point`,
    each weight's subclass in the file's metadata), the rest in BF16, config.json with its quantization_config."""
    import torch
    from safetensors.torch import save_file as save_torch
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict,
    )
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if kind not in TORCHAO_KINDS:
        raise ValueError(f"torchao kind {kind!r} is not one of {TORCHAO_KINDS}")
    config_class = Int8WeightOnlyConfig if kind == "int8" else Float8WeightOnlyConfig
    quantized = set(_projections(state))
    tensors: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for name, a in sorted(state.items()):
        weight = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)
        if name not in quantized:
            tensors[name] = weight
            continue
        holder = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16))
        with torch.no_grad():
            holder[0].weight.copy_(weight)
        quantize_(holder, config_class())
        flat, meta = flatten_tensor_state_dict({name: holder[0].weight})
        tensors |= flat
        metadata |= {k: v for k, v in meta.items() if k != "tensor_names"}
    metadata["tensor_names"] = json.dumps(sorted(state))
    folder.mkdir(parents=True, exist_ok=True)
    save_torch({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
               metadata={"format": "pt", **metadata})
    quant = {"quant_method": "torchao", "quant_type": {"default": {"_type": config_class.__name__}}}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    return folder


COMFY_FP8 = ("e4m3fn", "e5m2", "scaled")


def comfy_fp8(state: Mapping[str, np.ndarray], fmt: str, *, kept: Sequence[str] = ()) -> dict[str, Any]:
    """A state dict as ComfyUI's fp8 checkpoints hold it (torch tensors): "e4m3fn" / "e5m2" each matrix cast
    with PyTorch's `.to(torch.float8_*)`, no scale (Kijai's and Comfy-Org's `*_fp8_e4m3fn` files); "scaled"
    each matrix divided by its absmax / 448, cast to E4M3, the scale beside it as `<p>.scale_weight` and an
    empty `scaled_fp8` marker (Comfy's `*_fp8_scaled`). 1-D tensors and the matrices named in `kept` in BF16."""
    import torch

    if fmt not in COMFY_FP8:
        raise ValueError(f"ComfyUI fp8 format {fmt!r} is not one of {COMFY_FP8}")
    narrow = torch.float8_e5m2 if fmt == "e5m2" else torch.float8_e4m3fn
    out: dict[str, Any] = {"scaled_fp8": torch.empty(0, dtype=narrow)} if fmt == "scaled" else {}
    for name, a in sorted(state.items()):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if t.ndim != 2 or name in kept:
            out[name] = t.to(torch.bfloat16)
        elif fmt == "scaled":
            scale = t.abs().max() / 448.0
            out[name], out[name.removesuffix(".weight") + ".scale_weight"] = (t / scale).to(narrow), scale.reshape(())
        else:
            out[name] = t.to(narrow)
    return out


def write_comfy_fp8(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *,
                    fmt: str = "e4m3fn") -> Path:
    """A folder holding `comfy_fp8(state, fmt)` as model.safetensors, config.json beside it."""
    from safetensors.torch import save_file as save_torch

    folder.mkdir(parents=True, exist_ok=True)
    save_torch(comfy_fp8(state, fmt), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(config), indent=1))
    return folder


QUANTO_WEIGHTS = ("qint8", "qfloat8", "qfloat8_e5m2", "qint4", "qint2")


def write_quanto(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *,
                 weights: str = "qint8") -> Path:
    """An optimum-quanto checkpoint as its QuantizedModelForCausalLM.save_pretrained writes one: each projection
    an nn.Linear (with its `.bias` when the state has one) through quanto's own `quantize` and `freeze`, its
    state dict as quanto serialises it (`weight._data`, `weight._scale`, qint4 / qint2 `weight._data._data`
    and `weight._shift`, the activation scales), the rest in F16, quanto_qmap.json beside config.json."""
    import torch
    from optimum import quanto
    from safetensors.torch import save_file as save_torch

    if weights not in QUANTO_WEIGHTS:
        raise ValueError(f"quanto weights {weights!r} is not one of {QUANTO_WEIGHTS}")
    qtype = getattr(quanto, weights)
    qmap: dict[str, dict[str, str]] = {}
    biases = {n for n in state if n.endswith(".bias")}

    def quantize(prefix: str, weight: Any) -> dict[str, Any]:
        out, n_in = weight.shape
        layer = torch.nn.Linear(n_in, out, bias=f"{prefix}.bias" in biases)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.copy_(torch.from_numpy(np.asarray(state[f"{prefix}.bias"], np.float32)))
        holder = torch.nn.Sequential(layer)  # quantize replaces a model's Linear children: give it a parent
        quanto.quantize(holder, weights=qtype)
        quanto.freeze(holder)
        qmap[prefix] = {"weights": qtype.name, "activations": "none"}
        return {f"{prefix}.{key[2:]}": value.detach().contiguous() for key, value in holder.state_dict().items()}

    tensors = _each_projection({n: w for n, w in state.items() if n not in biases}, quantize)
    for name in biases - set(tensors):  # a bias no projection took
        tensors[name] = np.asarray(state[name], dtype=np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    save_torch({k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                for k, v in sorted(tensors.items())}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "quanto_qmap.json").write_text(json.dumps(qmap, indent=4))
    (folder / "config.json").write_text(json.dumps(dict(config), indent=1))
    return folder


def _projections(state: Mapping[str, np.ndarray]) -> list[str]:
    """The Linear weights transformers quantizes (every projection; embeddings, norms and lm_head stay)."""
    return sorted(n for n, w in state.items() if n.endswith("_proj.weight") and np.ndim(w) == 2)


def _each_projection(state: Mapping[str, np.ndarray], quantize: Callable[[str, Any], Mapping[str, np.ndarray]]
                     ) -> dict[str, np.ndarray]:
    """Every projection through `quantize(prefix, float32 torch weight)` -> {stored name: array}; the rest
    in F16, as transformers saves the modules it does not quantize."""
    import torch

    tensors: dict[str, np.ndarray] = {}
    quantized = set(_projections(state))
    for name, w in sorted(state.items()):
        if name in quantized:
            tensors |= quantize(name[: -len(".weight")], torch.from_numpy(np.asarray(w, np.float32).copy()))
        else:
            tensors[name] = np.asarray(w, dtype=np.float16)
    return tensors


def write_bnb(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *, kind: str) -> Path:
    """A bitsandbytes checkpoint as transformers saves one: each projection through bitsandbytes' own
    Linear8bitLt (int8 weight + SCB row absmax + weight_format) or Linear4bit (nf4, blocksize 64, nested
    absmax: weight, weight.absmax, weight.quant_map, weight.nested_*, weight.quant_state.bitsandbytes__nf4)
    state_dict, the rest in F16, config.json with transformers' quantization_config."""
    import bitsandbytes as bnb

    def quantize(prefix: str, weight: Any) -> dict[str, np.ndarray]:
        out, n_in = weight.shape
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(n_in, out, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
            layer = layer.to("cpu")  # quantizes: int8 codes and SCB
        else:
            layer = bnb.nn.Linear4bit(n_in, out, bias=False, quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64,
                                             compress_statistics=True)._quantize("cpu")
        return {f"{prefix}.{key}": value.detach().cpu().numpy() for key, value in layer.state_dict().items()}

    folder.mkdir(parents=True, exist_ok=True)
    tensors = _each_projection(state, quantize)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    quant = ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0} if kind == "int8" else
             {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"})
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    return folder


def write_fp8(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object]) -> Path:
    """An FP8 checkpoint in compressed-tensors' float-quantized format: each projection's per-channel scale
    from compressed-tensors' calculate_qparams, the weight cast to F8_E4M3 by its FloatQuantizationCompressor
    (weight + weight_scale), the rest in F16, config.json with the quantization_config it documents."""
    import torch
    from compressed_tensors.compressors.naive_quantized.base import (
        FloatQuantizationCompressor,
    )
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.CHANNEL, symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def quantize(prefix: str, weight: Any) -> dict[str, np.ndarray]:
        scale, zero = calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), args)
        packed = FloatQuantizationCompressor().compress({"weight": weight, "weight_scale": scale,
                                                         "weight_zero_point": zero}, scheme)
        return {f"{prefix}.weight": packed["weight"].view(torch.uint8).numpy(),  # numpy has no float8: bytes
                f"{prefix}.weight_scale": packed["weight_scale"].float().numpy()}

    folder.mkdir(parents=True, exist_ok=True)
    tensors = _each_projection(state, quantize)
    quantized = set(_projections(state))
    _save_f8(folder / "model.safetensors", tensors, {f"{n[: -len('.weight')]}.weight" for n in quantized})
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json")}},
             "ignore": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    return folder


MICROSCALED = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}


def ct_microscaled(weight: Any, fmt: str) -> tuple[dict[str, Any], Any, Any]:
    """One Linear weight (float32 torch) through compressed-tensors' own NVFP4 / MXFP4 / MXFP8 compressor (its
    CPU path): (the compressed state dict, the QuantizationScheme, the compressor class). Scales from its
    calculate_qparams over groups of 16 (nvfp4, under generate_gparam's global scale) or 32 (mx, E8M0)."""
    import torch
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    bits, group, compressor = {"nvfp4": (4, 16, NVFP4PackedCompressor), "mxfp4": (4, 32, MXFP4PackedCompressor),
                               "mxfp8": (8, 32, MXFP8QuantizationCompressor)}[fmt]
    strategy = QuantizationStrategy.TENSOR_GROUP if fmt == "nvfp4" else QuantizationStrategy.GROUP
    args = QuantizationArgs(num_bits=bits, type="float", strategy=strategy, group_size=group, symmetric=True,
                            **({} if fmt == "nvfp4" else {"scale_dtype": torch.uint8}))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    gs = generate_gparam(weight.min(), weight.max()) if fmt == "nvfp4" else None
    g = weight.reshape(weight.shape[0], -1, group)
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero}
    if gs is not None:
        state["weight_global_scale"] = gs
    return dict(compressor.compress(state, scheme)), scheme, compressor


def write_microscaled(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, object], *,
                      fmt: str = "nvfp4") -> Path:
    """A compressed-tensors NVFP4 / MXFP4 / MXFP8 checkpoint (`ct_microscaled` per projection, the rest in
    F16), config.json with the quantization_config llm-compressor writes for it."""
    import torch

    f8: set[str] = set()

    def quantize(prefix: str, weight: Any) -> dict[str, np.ndarray]:
        packed, _, _ = ct_microscaled(weight, fmt)
        out = {}
        for key, value in packed.items():
            if value.dtype == torch.float8_e4m3fn:  # numpy has no float8: bytes, viewed back when saved
                f8.add(f"{prefix}.{key}")
                value = value.view(torch.uint8)
            out[f"{prefix}.{key}"] = value.numpy()
        return out

    folder.mkdir(parents=True, exist_ok=True)
    tensors = _each_projection(state, quantize)
    _save_f8(folder / "model.safetensors", tensors, f8)
    weights = {"num_bits": 8 if fmt == "mxfp8" else 4, "type": "float", "symmetric": True,
               "group_size": 16 if fmt == "nvfp4" else 32, "strategy": "tensor_group" if fmt == "nvfp4" else "group"}
    quant = {"quant_method": "compressed-tensors", "format": MICROSCALED[fmt], "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    return folder


def _save_f8(path: Path, tensors: Mapping[str, np.ndarray], f8: set[str]) -> None:
    """safetensors through torch (numpy has no float8): the F8 tensors' bytes viewed back as float8_e4m3fn."""
    import torch
    from safetensors.torch import save_file as save_torch

    out = {}
    for name, a in sorted(tensors.items()):
        t = torch.from_numpy(np.ascontiguousarray(a))
        out[name] = t.view(torch.float8_e4m3fn) if name in f8 else t
    save_torch(out, str(path))


# --- a K-quant folder: llama-quantize's K types need rows of whole 256-value super-blocks ---------------
#
# The relations zoo's llamas are 64 wide, so llama-quantize (and write_llama_gguf) would write every matrix
# of a K-quant file in its fallback type (K_FALLBACK): no K block at all. This folder has llamas 256 wide
# (random heavy-tailed weights, fine-tunes as perturbations: the quantizer is the real part under test).

KQUANT_COPIES = (("q/a-Q4_K_M-GGUF", "m/a", "Q4_K_M"), ("q/b-Q6_K-GGUF", "m/b", "Q6_K"),
                 ("q/base-Q4_K-GGUF", "m/base", "Q4_K"))
KQUANT_SHAPE = {"hidden": 256, "heads": 4, "kv_heads": 2, "ffn": 512, "vocab": 48, "layers": 2}


def wide_llama_state(seed: int, *, hidden: int = 256, heads: int = 4, kv_heads: int = 2, ffn: int = 512,
                     vocab: int = 48, layers: int = 2) -> dict[str, np.ndarray]:
    """An HF llama state dict with GQA, heavy-tailed (t, 4 degrees of freedom) like trained weights."""
    rng = np.random.default_rng(seed)
    kv = kv_heads * hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for b in range(layers):
        p = f"model.layers.{b}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn)}
    return {n: (rng.standard_t(4, s) * 0.05).astype(np.float32) if len(s) == 2 else np.ones(s, np.float32)
            for n, s in sorted(shapes.items())}


def _perturbed(state: Mapping[str, np.ndarray], seed: int, step: float = 0.3) -> dict[str, np.ndarray]:
    """A fine-tune stand-in: each matrix plus Gaussian noise of `step` times its standard deviation."""
    rng = np.random.default_rng(seed)
    return {n: (a + step * a.std() * rng.standard_normal(a.shape)).astype(np.float32) if a.ndim == 2 else a
            for n, a in state.items()}


def write_kquant_folder(root: Path, *, seed: int = 1) -> dict[str, tuple[str, str]]:
    """`root/<org>/<name>/` repos as `index recover` reads them: a base, two fine-tunes, an unrelated model
    (safetensors) and KQUANT_COPIES (a .gguf alone), hub.json upload times (copies last), truth.csv.
    Returns child -> (parent, relation)."""
    base = wide_llama_state(seed)
    states = {"m/base": base, "m/a": _perturbed(base, seed + 1), "m/b": _perturbed(base, seed + 2),
              "m/other": wide_llama_state(seed + 3)}
    truth = {"m/base": ("", ""), "m/a": ("m/base", "finetune"), "m/b": ("m/base", "finetune"), "m/other": ("", "")}
    for repo, state in states.items():
        (root / repo).mkdir(parents=True, exist_ok=True)
        save_file(state, str(root / repo / "model.safetensors"))
    for repo, source, qtype in KQUANT_COPIES:
        (root / repo).mkdir(parents=True, exist_ok=True)
        write_llama_gguf(root / repo / f"model-{qtype}.gguf", states[source], qtype, heads=KQUANT_SHAPE["heads"],
                         kv_heads=KQUANT_SHAPE["kv_heads"], base_model=source)
        truth[repo] = (source, "quantized")
    stamps = {repo: {"createdAt": f"2024-{i + 1:02d}-01T00:00:00.000Z"} for i, repo in enumerate(truth)}
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": stamps}, indent=1, sort_keys=True))
    (root / "truth.csv").write_text("child,parents,relation\n" + "".join(f"{c},{p},{r}\n" for c, (p, r) in truth.items()))
    return truth
