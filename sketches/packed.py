"""Dequantizers for quantized safetensors checkpoints: GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors, MLX,
optimum-quanto, torchao.

Pure: arrays in (the checkpoint's tensors, as `native` decodes their bytes), float32 out, shaped like
the Hugging Face Linear weight they replace: (out, in). Which scheme a checkpoint uses is read from its
`quantization_config` (config.json) when there is one, else from its tensor names, dtypes and shapes.

Layouts, per module `<p>` (a Linear whose `<p>.weight` is gone), W[o, i] the dequantized weight:

    gptq        <p>.qweight int32 (in*bits/32, out)   bits-wide codes packed along the INPUT rows:
                                                      code[r*k + j, o] = qweight[r, o] >> (bits*j), k = 32/bits
                <p>.qzeros  int32 (groups, out*bits/32)  zero points packed the same way along OUTPUT columns
                <p>.scales  f16   (groups, out)
                <p>.g_idx   int32 (in,)               group of each input row (act-order); else i // group_size
                W[o, i] = scales[g, o] * (code[i, o] - (zero[g, o] + z0)),  g = g_idx[i]
                z0 = 1 for checkpoint_format "gptq" (v1 stores zero - 1; AutoGPTQ's off-by-one), 0 for "gptq_v2"
    awq (gemm)  <p>.qweight int32 (in, out/8)         4-bit codes packed along OUTPUT columns, nibble j of
                                                      word c holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][j]
                <p>.qzeros  int32 (in/group, out/8)   same packing;  <p>.scales f16 (in/group, out)
                W[o, i] = scales[i // group, o] * (code[i, o] - zero[i // group, o])
    bnb int8    <p>.weight int8 (out, in), <p>.SCB f32 (out,)       W = weight * SCB[o] / 127
    bnb 4-bit   <p>.weight uint8 (numel/2, 1): two codes a byte, the first in the HIGH nibble, row-major
                <p>.weight.absmax (numel/blocksize,) f32, or uint8 when nested ("compress_statistics"):
                    absmax = nested_quant_map[absmax] * nested_absmax[b // nested_blocksize] + nested_offset
                <p>.weight.quant_map f32 (16,) (nf4 or fp4 code), <p>.weight.quant_state.bitsandbytes__nf4:
                uint8 bytes of a JSON object {quant_type, blocksize, dtype, shape, nested_*}
                W.flat[n] = quant_map[code[n]] * absmax[n // blocksize]
    fp8         <p>.weight F8_E4M3 (out, in) + <p>.weight_scale (HF fbgemm / compressed-tensors) or
                <p>.weight_scale_inv (DeepSeek, HF "fp8"; multiplied too, despite its name) or <p>.scale_weight
                (ComfyUI's scaled fp8, beside an empty `scaled_fp8` marker; <p>.scale_input its activation
                scale, not read): a scalar, a (out, 1) column, (out, in/group) groups, or (ceil(out/128),
                ceil(in/128)) blocks. F8 weights with no scale at all are a plain cast, not read here.
    compressed-tensors "pack-quantized": <p>.weight_packed int32 (out, ceil(in*bits/32)), codes as one
                little-endian bit stream per row, stored as value + 2**(bits-1); <p>.weight_shape (2,);
                <p>.weight_scale (out, groups) or (out, 1); <p>.weight_zero_point packed along dim 0 (asym.);
                <p>.weight_g_idx (act-order).  "int-quantized": <p>.weight int8 + weight_scale (+ zero point).
                "float-quantized": the fp8 layout above; "mxfp8-quantized": fp8 with U8 E8M0 scales (2**(s - 127)) per 32.
    ct-fp4      compressed-tensors "nvfp4-pack-quantized" / "mxfp4-pack-quantized": <p>.weight_packed U8 (out, in/2),
                two FP4 E2M1 codes a byte, the first in the LOW nibble (bit 3 the sign); <p>.weight_scale per
                group: F8_E4M3 per 16 divided by the F32 <p>.weight_global_scale (nvfp4), or U8 E8M0 per 32 (mxfp4).
    mlx         <p>.weight U32 (out, in*bits/32)      codes as one little-endian bit stream per row (as
                                                      compressed-tensors', unsigned), bits 1-8
                <p>.scales (out, in/group), <p>.biases (out, in/group), in the model's float dtype:
                "affine" (mlx-lm's default, group 64, 4 bits)   W[o, i] = scales[o, g] * code[o, i] + biases[o, g]
                "mxfp4" / "nvfp4": FP4 E2M1 codes, no biases; scales U8: E8M0 (2**(s - 127), group 32) /
                F8 E4M3 (group 16).  "mxfp8": F8 E4M3 codes, E8M0 scales, group 32.
                config.json's "quantization" {group_size, bits, mode} holds the defaults, and per module
                path ("model.layers.0.mlp.down_proj": {group_size, bits}) mlx-lm's mixed-precision recipes.
                Embeddings are quantized like Linears; stacked experts (3-D) are refused.
    quanto      optimum-quanto (`quantize` + `freeze`, saved by save_pretrained beside quanto_qmap.json, or by
                diffusers' QuantoConfig). qint8 / qfloat8: <p>.weight._data I8 / F8_E4M3 / F8_E5M2 (out, in),
                <p>.weight._scale (out, 1):  W = data * scale.
                qint4 / qint2: <p>.weight._data._data U8 (ceil(groups / k), group), k = 8 / bits codes a byte,
                byte row j holding group j + i * rows in bits [i * bits, (i + 1) * bits); <p>.weight._scale and
                <p>.weight._shift (groups, 1). The groups are W's rows cut in runs of `group` columns (a whole
                row when in <= 128): W.reshape(groups, group) = code * scale - shift (a float shift), or
                (code - shift) * scale (an integer zero point). (out, in) is stored nowhere: out is the length
                of <p>.bias, else groups (one a row) unless the group is one quanto cuts a longer row into
                (32, 64, 96 or 128 columns); then the architecture config.json names says (`packed_modules`'
                `shapes`), else the module is refused. <p>.input_scale / <p>.output_scale are activation
                scales, not read.
    torchao     transformers' TorchAoConfig saved as safetensors (torchao's flatten_tensor_state_dict; the tensor
                subclass of each weight named in the file's metadata): Int8Tensor <p>._weight_qdata I8 (out, in),
                <p>._weight_scale and <p>._weight_zero_point per block (block_size [1, in]: one a row);
                Float8Tensor _weight_qdata F8_E4M3 / F8_E5M2 and _weight_scale.  W = (qdata - zero_point) * scale.
                Packed subclasses (Int4Tensor and its preshuffled / tile-packed kin) are refused by their codes'
                dtype.

Row reads. A plan reads the first rows of W. Where a scheme stores W row-major by output (bnb, fp8,
compressed-tensors, mlx, quanto's 8-bit) `part_rows` says which rows of each stored tensor hold W's rows
[r0, r1), and `dequantize(..., rows=(r0, r1))` decodes from just those. GPTQ, AWQ and quanto's 4- and 2-bit
codes pack across output rows, so they are read whole (`reads_whole`: a quarter of the F16 weight's bytes).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np

from errors import QuantizedWeightsError
from sketches.dtypes import DTYPE_SIZES, decode
from sketches.experts import switch_sources

__all__ = [
    "PACKED_RELATIVE_ERROR",
    "PackedModule",
    "QuantScheme",
    "bnb_quant_state",
    "dequantize",
    "detect_scheme",
    "native",
    "packed_modules",
    "part_rows",
    "plain_tensors",
    "predicted_relative_error",
    "reads_whole",
]

logger = logging.getLogger(__name__)

Method = Literal["gptq", "awq", "bnb-int8", "bnb-4bit", "fp8", "ct-pack", "ct-int", "ct-fp4", "mlx", "quanto",
                 "torchao"]
MlxMode = Literal["affine", "mxfp4", "mxfp8", "nvfp4", "e4m3", "e5m2"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # logical column held by nibble j of a word
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding logical column k
DEFAULT_FP8_BLOCK = 128  # DeepSeek-V3 / HF FineGrainedFP8 weight_block_size [128, 128]
# MLX (mlx.core.quantize): each mode's bits and group size; affine takes any group of 32/64/128 and 1-8 bits
MLX_MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)), "mxfp4": ((4,), (32,)), "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,))}
MLX_DEFAULTS = {"affine": (4, 64), "mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}  # (bits, group)
FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)

# RMS relative error of each scheme on N(0, 1) data, ||W_hat - W|| / ||W||, measured once with the
# round-to-nearest reference packers of tests/test_packed.py (test_relative_error_table re-measures:
# 256 x 1024 values, seed 0), on the default group / block sizes shown. GPTQ optimises the layer's
# OUTPUT error, not the weights': expect its weight error near RTN's or somewhat above. The group size
# matters (4-bit asymmetric, same data: g32 0.081, g64 0.091, g128 0.101, per-channel over 1024 inputs
# 0.126, over 4096 0.140); real weights with outliers raise the absmax-scaled ones (bnb, fp8) the most.
PACKED_RELATIVE_ERROR: dict[str, float] = {
    "gptq-2bit": 5.0e-1,  # group 128, asymmetric (zero point), like the 4- and 8-bit ones
    "gptq-4bit": 1.01e-1,
    "gptq-8bit": 5.9e-3,
    "awq-4bit": 1.01e-1,  # group 128, asymmetric
    "bnb-int8": 7.9e-3,  # per-row absmax
    "bnb-4bit": 9.2e-2,  # nf4, blocksize 64, nested absmax
    "fp8-8bit": 2.6e-2,  # e4m3, per-tensor scale or 128 x 128 blocks (both 2.6e-2)
    "ct-pack-4bit": 1.18e-1,  # symmetric, group 128
    "ct-pack-8bit": 6.5e-3,
    "ct-int-8bit": 7.9e-3,  # per-channel
    # compressed-tensors' own NVFP4 / MXFP4 / MXFP8 compressors (tests/test_packed.py measures with them)
    "ct-fp4-nvfp4": 9.77e-2,  # E2M1, an F8 scale per 16 under a per-tensor global scale
    "ct-fp4-mxfp4": 1.12e-1,  # E2M1, a power-of-two scale per 32 (mlx-mxfp4 above: 1.18e-1, its own scale rule)
    "fp8-mxfp8": 2.65e-2,  # E4M3, a power-of-two scale per 32
    # MLX affine at mlx-lm's default group 64 (min / max per group, codes unsigned), its modes at their
    # fixed groups: measured with mlx.core.quantize itself (tests/test_mlx.py, where mlx installs)
    "mlx-1bit": 1.66,  # min / max of a group as the two codes: more error than signal on N(0, 1)
    "mlx-2bit": 4.11e-1,
    "mlx-3bit": 1.96e-1,
    "mlx-4bit": 9.43e-2,
    "mlx-5bit": 4.42e-2,
    "mlx-6bit": 2.22e-2,
    "mlx-8bit": 5.58e-3,
    "mlx-mxfp4": 1.18e-1,  # E2M1 codes, power-of-two scale per 32
    "mlx-mxfp8": 2.67e-2,
    "mlx-nvfp4": 9.56e-2,  # E2M1 codes, E4M3 scale per 16
    # optimum-quanto's own quantize + freeze (tests/test_quanto.py re-measures with it): qint8 / qfloat8 per row
    # (absmax), qint4 / qint2 affine per group of 128 (min / max)
    "quanto-8bit": 7.88e-3,
    "quanto-e4m3": 2.64e-2,
    "quanto-e5m2": 5.26e-2,
    "quanto-4bit": 1.00e-1,
    "quanto-2bit": 5.01e-1,
    # torchao's own Int8WeightOnlyConfig / Float8WeightOnlyConfig (tests/test_torchao.py re-measures): per row
    "torchao-8bit": 7.88e-3,
    "torchao-e4m3": 2.64e-2,
}


class _Tensor(Protocol):
    """What the detection needs of a checkpoint tensor: its safetensors dtype and shape (TensorInfo)."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class QuantScheme:
    method: Method
    bits: int
    group_size: int | None = None  # input columns per scale; None: per output row, or found from shapes
    zero_offset: int = 0  # added to stored zero points (GPTQ v1: 1)
    block: tuple[int, int] | None = None  # fp8 block-wise scales: rows x columns per scale
    mode: MlxMode = "affine"  # mlx; ct-fp4 (nvfp4 / mxfp4) and fp8 (mxfp8: E8M0 scales) name their microscaling,
    # quanto its float8 codes (e4m3 / e5m2)
    overrides: tuple[tuple[str, int, int], ...] = ()  # mlx only: (module path, bits, group) of mixed recipes

    @property
    def name(self) -> str:
        """gptq-4bit, awq-4bit, fp8-8bit, ct-pack-4bit, mlx-4bit, mlx-mxfp4 ...; bnb carries its width already."""
        if self.mode != "affine":
            return f"{self.method}-{self.mode}"
        return self.method if self.method.startswith("bnb-") else f"{self.method}-{self.bits}bit"


@dataclass(frozen=True)
class PackedModule:
    """One quantized Linear: the HF weight it stands for and its stored tensors, by role."""

    weight: str  # "<prefix>.weight"
    parts: dict[str, str]  # role -> tensor name: qweight/qzeros/scales/g_idx, weight/SCB/absmax/..., ...
    shape: tuple[int, int] | None  # (out, in) when the stored shapes tell it (bnb 4-bit: the JSON does)
    scheme: QuantScheme | None = None  # its own bits / group when they differ from the checkpoint's (mlx mixed)


def _error(thing: str, reason: str) -> QuantizedWeightsError:
    return QuantizedWeightsError(thing, reason)


# --- raw bytes -> arrays ------------------------------------------------------------------------------

_NATIVE = {"I8": "i1", "U8": "u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8",
           "U64": "<u8", "F16": "<f2", "F32": "<f4", "F64": "<f8", "BOOL": "u1"}


def native(raw: bytes, dtype: str, shape: tuple[int, ...], *, name: str = "") -> np.ndarray:
    """Raw safetensors bytes -> a numpy array that keeps integers exact (the codes of packed words).

    `sketches.dtypes.decode` casts every dtype to float32, which would round int32 words above 2**24;
    here integers keep their dtype, F16/F32/F64 theirs, BF16 and F8 become float32.
    """
    thing = name or "<tensor>"
    if dtype not in DTYPE_SIZES:
        raise _error(thing, f"unknown dtype {dtype!r}")
    if len(raw) != math.prod(shape) * DTYPE_SIZES[dtype]:
        need = math.prod(shape) * DTYPE_SIZES[dtype]
        raise _error(thing, f"{dtype} {list(shape)} needs {need} bytes, got {len(raw)}")
    if dtype in _NATIVE:
        return np.frombuffer(raw, dtype=_NATIVE[dtype]).reshape(shape).copy()
    return decode(raw, dtype, shape, name=thing)


# --- detection --------------------------------------------------------------------------------------


def _quant_config(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Accept config.json as a dict, or its quantization_config alone."""
    if not config:
        return {}
    inner = config.get("quantization_config", config)
    if not isinstance(inner, Mapping):
        raise _error("quantization_config", f"must be a JSON object, got {type(inner).__name__}")
    return inner


def _int(qc: Mapping[str, Any], key: str, default: int) -> int:
    value = qc.get(key, default)
    if value is None:
        return default
    if type(value) is not int:
        raise _error("quantization_config", f"{key} must be a whole number, got {value!r:.40}")
    return value


def _bits(bits: int, allowed: tuple[int, ...], method: str) -> int:
    if bits not in allowed:
        raise _error("quantization_config", f"{method} with {bits} bits is not supported (supported: {allowed})")
    return bits


def _from_config(qc: Mapping[str, Any]) -> QuantScheme | None:
    method = str(qc.get("quant_method", "")).lower()
    if not method:
        return None
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _error("quantization_config", f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        group = _int(qc, "group_size", 128)
        return QuantScheme("gptq", _bits(_int(qc, "bits", 4), (2, 4, 8), "GPTQ"), None if group <= 0 else group,
                           zero_offset=1 if fmt == "gptq" else 0)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _error("quantization_config", f"AWQ version {version!r} is not supported (only gemm)")
        group = _int(qc, "group_size", 128)
        bits = _bits(_int(qc, "bits", _int(qc, "w_bit", 4)), (4,), "AWQ")
        return QuantScheme("awq", bits, None if group <= 0 else group)
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return QuantScheme("bnb-4bit", 4)
        if qc.get("load_in_8bit"):
            return QuantScheme("bnb-int8", 8)
        raise _error("quantization_config", "bitsandbytes config with neither load_in_4bit nor load_in_8bit")
    if method in ("fp8", "fbgemm_fp8"):
        block = qc.get("weight_block_size")
        return QuantScheme("fp8", 8, block=tuple(block) if isinstance(block, list) and len(block) == 2 else None)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method in ("auto-round", "intel/auto-round"):
        return _auto_round(qc)
    if method == "quanto":
        return _quanto_from_config(qc)
    if method == "torchao":
        return None  # its config names a torchao config class; the stored codes say what can be read
    raise _error("quantization_config", f"quant_method {method!r} is not supported "
                 "(gptq, awq, bitsandbytes, fp8, fbgemm_fp8, compressed-tensors, auto-round, quanto, torchao)")


# quanto's weight types, as diffusers' QuantoConfig (weights_dtype) and transformers' (weights) name them
QUANTO_TYPES: dict[str, tuple[int, MlxMode]] = {
    "int8": (8, "affine"), "float8": (8, "e4m3"), "float8_e4m3fn": (8, "e4m3"), "float8_e5m2": (8, "e5m2"),
    "int4": (4, "affine"), "int2": (2, "affine")}


def _quanto_from_config(qc: Mapping[str, Any]) -> QuantScheme:
    """diffusers' {"quant_method": "quanto", "weights_dtype": "int8"}; transformers' says "weights". The
    stored tensors decide each module's own type (`_quanto_module`); this is the checkpoint's."""
    kind = qc.get("weights_dtype", qc.get("weights", "int8"))
    if kind not in QUANTO_TYPES:
        raise _error("quantization_config", f"quanto weights {kind!r:.40} is not supported ({', '.join(QUANTO_TYPES)})")
    bits, mode = QUANTO_TYPES[kind]
    return QuantScheme("quanto", bits, mode=mode)


def _auto_round(qc: Mapping[str, Any]) -> QuantScheme:
    """AutoRound (Intel) exports in AutoGPTQ's or AutoAWQ's layout, says `packing_format` (vLLM reads them
    with its GPTQ / AWQ kernels alike); its own native packing is not read."""
    fmt = str(qc.get("packing_format", "auto_round:auto_gptq")).lower()
    group = _int(qc, "group_size", 128)
    if fmt.endswith("auto_gptq"):
        return QuantScheme("gptq", _bits(_int(qc, "bits", 4), (2, 4, 8), "AutoRound (GPTQ layout)"),
                           None if group <= 0 else group, zero_offset=1)
    if fmt.endswith("auto_awq"):
        return QuantScheme("awq", _bits(_int(qc, "bits", 4), (4,), "AutoRound (AWQ layout)"), None if group <= 0 else group)
    raise _error("quantization_config", f"AutoRound packing_format {fmt!r} is not supported "
                 "(auto_round:auto_gptq, auto_round:auto_awq)")


def _compressed_tensors(qc: Mapping[str, Any]) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    weights = next((g.get("weights") for _, g in sorted(groups.items())
                    if isinstance(g, Mapping) and g.get("weights")), None)
    if not isinstance(weights, Mapping):
        raise _error("quantization_config", "compressed-tensors config has no config_groups.*.weights")
    fmt = str(qc.get("format") or next((g.get("format") for g in groups.values() if isinstance(g, Mapping)), "") or "")
    bits = _int(weights, "num_bits", 8)
    group = weights.get("group_size")
    group = group if type(group) is int and group > 0 else None
    block = weights.get("block_structure")
    block = tuple(block) if isinstance(block, list) and len(block) == 2 else None
    if fmt == "pack-quantized":
        return QuantScheme("ct-pack", _bits(bits, tuple(range(1, 9)), "pack-quantized"), group)
    if fmt in ("int-quantized", "naive-quantized") and weights.get("type", "int") == "int":
        return QuantScheme("ct-int", _bits(bits, (8,), "int-quantized"), group, block=block)
    if fmt in ("float-quantized", "naive-quantized"):
        return QuantScheme("fp8", _bits(bits, (8,), "float-quantized"), group, block=block)
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        mode = "nvfp4" if fmt.startswith("nv") else "mxfp4"
        return QuantScheme("ct-fp4", _bits(bits, (4,), fmt), group or (16 if mode == "nvfp4" else 32), mode=mode)
    if fmt == "mxfp8-quantized":
        return QuantScheme("fp8", _bits(bits, (8,), fmt), group or 32, mode="mxfp8")
    raise _error("quantization_config", f"compressed-tensors format {fmt!r} is not supported "
                 "(pack-quantized, int-quantized, float-quantized, naive-quantized, nvfp4-pack-quantized, "
                 "mxfp4-pack-quantized, mxfp8-quantized)")


# Packed formats we do not decode, told by an integer tensor's name suffix (their packed codes): refused by
# name, never read as if their few float tensors (norms, scales, embeddings) were the model. Integer only,
# so that a float parameter that happens to end so is never taken for one.
UNSUPPORTED_MARKERS: dict[str, str] = {
    ".q_weight": "EXL2 (exllamav2)", ".trellis": "EXL3 (exllamav3)", ".codes": "AQLM",
    ".W_q": "HQQ", ".Qidxs": "QuIP#",
}
_INTEGER_DTYPES = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"})


def unsupported_format(tensors: Mapping[str, _Tensor]) -> str | None:
    """The name of an unsupported packed format the tensor names show, or None."""
    for name in sorted(tensors):
        if tensors[name].dtype not in _INTEGER_DTYPES:
            continue
        for suffix, fmt in UNSUPPORTED_MARKERS.items():
            if name.endswith(suffix):
                return fmt
    return None


def _from_tensors(tensors: Mapping[str, _Tensor]) -> QuantScheme | None:
    names = sorted(tensors)
    fmt = unsupported_format(tensors)
    if fmt is not None:
        raise _error("weights", f"{fmt} quantized weights are not supported (supported: GPTQ, AWQ, bitsandbytes, "
                                "FP8, compressed-tensors, MLX, optimum-quanto, GGUF)")
    anchors = quanto_anchors(tensors)
    if anchors:  # the checkpoint's type is its first module's; a module of another carries its own
        return _quanto_type(tensors, anchors[0][: -len(_QUANTO_SCALE)], 8)
    torchao = [n for n in names if n.endswith(_TORCHAO_CODES)]
    if torchao:
        packed = sorted({tensors[n].dtype for n in torchao} - {"I8", *_QUANTO_FLOAT8})
        if packed:
            raise _error(torchao[0], f"torchao codes stored as {', '.join(packed)} (Int4Tensor and other packed "
                                     "layouts) are not supported (supported: Int8Tensor, Float8Tensor)")
        return QuantScheme("torchao", 8, mode=_QUANTO_FLOAT8.get(tensors[torchao[0]].dtype, "affine"))
    qweights = [n for n in names if n.endswith(".qweight")]
    if qweights:
        return _gptq_or_awq(tensors, qweights[0])
    if any(n.endswith(".SCB") for n in names):
        return QuantScheme("bnb-int8", 8)
    if any(re.search(r"\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$", n) for n in names):
        return QuantScheme("bnb-4bit", 4)
    packed = [n for n in names if n.endswith(".weight_packed")]
    if packed and tensors[packed[0]].dtype == "U8":  # FP4 codes two a byte: NVFP4 has a global scale
        nv = any(n.endswith(".weight_global_scale") for n in names)
        return QuantScheme("ct-fp4", 4, 16 if nv else 32, mode="nvfp4" if nv else "mxfp4")
    if packed:
        return QuantScheme("ct-pack", 4)  # the real bit width comes from weight_shape at decode time
    for n in names:
        if n.endswith((".weight_scale", ".weight_scale_inv", ".scale_weight")):
            weight = tensors.get(n.rsplit(".", 1)[0] + ".weight")
            if weight is not None and weight.dtype in ("F8_E4M3", "F8_E5M2"):
                mx = tensors[n].dtype == "U8"  # E8M0 exponents: MXFP8
                return QuantScheme("fp8", 8, 32 if mx else None, mode="mxfp8" if mx else "affine")
            if weight is not None and weight.dtype == "I8":
                return QuantScheme("ct-int", 8)
    return None


def _gptq_or_awq(tensors: Mapping[str, _Tensor], qweight: str) -> QuantScheme:
    prefix = qweight[: -len(".qweight")]
    scales = tensors.get(prefix + ".scales")
    q = tensors[qweight]
    if scales is None or len(scales.shape) != 2 or len(q.shape) != 2:
        raise _error(qweight, "a qweight without a 2-D scales tensor beside it")
    if prefix + ".g_idx" in tensors or q.shape[1] == scales.shape[1]:  # GPTQ: (in*bits/32, out) vs (groups, out)
        zeros = tensors.get(prefix + ".qzeros")
        pack = scales.shape[1] // zeros.shape[1] if zeros is not None and zeros.shape[1] else 8
        return QuantScheme("gptq", 32 // pack if pack in (4, 8, 16) else 4, zero_offset=1)
    return QuantScheme("awq", 4)  # AWQ: (in, out/8) vs (in/group, out)


def detect_scheme(tensors: Mapping[str, _Tensor], config: Mapping[str, Any] | None = None) -> QuantScheme | None:
    """The quantization scheme of a checkpoint, or None for plain float weights.

    `config` is config.json (or its `quantization_config`); it decides when present, the tensors
    otherwise. MLX weights need config.json's "quantization": their group size and bits are stored
    nowhere else. An unsupported method or layout raises QuantizedWeightsError saying which.
    """
    scheme = _from_config(_quant_config(config))
    if scheme is None and mlx_anchors(tensors):
        return _mlx_from_config(config)
    return scheme if scheme is not None else _from_tensors(tensors)


# --- MLX ------------------------------------------------------------------------------------------------


def mlx_anchors(tensors: Mapping[str, _Tensor]) -> list[str]:
    """The `<p>.scales` of every MLX-quantized module: a U32 `<p>.weight` beside it (sorted)."""
    out = []
    for name in sorted(tensors):
        if name.endswith(".scales"):
            weight = tensors.get(name[: -len(".scales")] + ".weight")
            if weight is not None and weight.dtype == "U32":
                out.append(name)
    return out


def _mlx_error(reason: str) -> QuantizedWeightsError:
    return _error("config.json quantization", reason)


def _mlx_bits_group(q: Mapping[str, Any], mode: str, default: tuple[int, int], where: str) -> tuple[int, int]:
    bits, group = q.get("bits", default[0]), q.get("group_size", default[1])
    allowed_bits, allowed_groups = MLX_MODES[mode]
    if type(bits) is not int or bits not in allowed_bits:
        raise _mlx_error(f"{where}bits {bits!r:.20} is not one of {allowed_bits} for mode {mode!r}")
    if type(group) is not int or group not in allowed_groups:
        raise _mlx_error(f"{where}group_size {group!r:.20} is not one of {allowed_groups} for mode {mode!r}")
    return bits, group


def _mlx_from_config(config: Mapping[str, Any] | None) -> QuantScheme:
    """mlx-lm's config.json "quantization" (or its copy as a quantization_config without quant_method):
    {group_size, bits, mode?, "<module path>": {group_size, bits} | false, ...}."""
    q = (config or {}).get("quantization", (config or {}).get("quantization_config"))
    if q is None:
        raise _mlx_error("MLX-quantized weights (U32 .weight beside .scales) but config.json has no 'quantization' "
                         "(group_size, bits): the codes cannot be read without them")
    if not isinstance(q, Mapping):
        raise _mlx_error(f"must be a JSON object, got {type(q).__name__}")
    mode = q.get("mode", "affine")
    if mode not in MLX_MODES:
        raise _mlx_error(f"MLX mode {mode!r:.40} is not supported ({', '.join(MLX_MODES)})")
    bits, group = _mlx_bits_group(q, mode, MLX_DEFAULTS[mode], "")
    overrides = []
    for path, value in sorted(q.items()):
        if path in ("bits", "group_size", "mode", "quant_method") or value is False:
            continue  # False: the module is stored in floats
        if not isinstance(value, Mapping):
            raise _mlx_error(f"entry {path!r:.80} must be an object or false, got {value!r:.40}")
        if value.get("mode", mode) != mode:
            raise _mlx_error(f"entry {path!r:.80} mixes mode {value.get('mode')!r:.20} into a {mode!r} checkpoint")
        overrides.append((path, *_mlx_bits_group(value, mode, (bits, group), f"entry {path!r:.80}: ")))
    return QuantScheme("mlx", bits, group, mode=mode, overrides=tuple(overrides))


def _mlx_module(tensors: Mapping[str, _Tensor], scheme: QuantScheme, anchor: str) -> PackedModule:
    prefix = anchor[: -len(".scales")]
    parts = {role: prefix + suffix for role, suffix in (("weight", ".weight"), ("scales", ".scales"),
                                                          ("biases", ".biases")) if prefix + suffix in tensors}
    if scheme.mode == "affine" and "biases" not in parts:
        raise _error(anchor, f"mlx affine module {prefix!r} lacks .biases")
    stored = (prefix, *switch_sources(prefix))  # an expert of mlx-lm's stacked switch_mlp: that module's entry
    own = next(((b, g) for path, b, g in scheme.overrides if path in stored), None)
    module_scheme = replace(scheme, bits=own[0], group_size=own[1], overrides=()) if own else None
    bits, group = (module_scheme or scheme).bits, (module_scheme or scheme).group_size or 64
    w, sc = tuple(tensors[parts["weight"]].shape), tuple(tensors[parts["scales"]].shape)
    if len(w) != 2 or len(sc) != 2 or sc[0] != w[0]:
        raise _error(anchor, f"mlx module {prefix!r}: weight {list(w)} and scales {list(sc)} are not (out, words) "
                             "and (out, groups)")
    n_in = sc[1] * group
    if w[1] * 32 != n_in * bits:
        raise _error(anchor, f"mlx module {prefix!r}: {w[1]} words a row do not hold {n_in} codes of {bits} bits "
                             f"(group {group}: config.json's quantization does not describe this tensor)")
    return PackedModule(prefix + ".weight", dict(sorted(parts.items())), (w[0], n_in), module_scheme)


def _mlx(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme) -> np.ndarray:
    own = module.scheme or scheme
    bits, group = own.bits, own.group_size or 64
    scales = _need(arrays, module, "scales")
    n_in = scales.shape[1] * group
    codes = _bitstream(_need(arrays, module, "weight"), bits, n_in, thing=module.weight)
    g = np.arange(n_in) // group
    if own.mode == "affine":
        biases = _f32(_need(arrays, module, "biases"))
        return codes.astype(np.float32) * _f32(scales)[:, g] + biases[:, g]
    return _microscaled(codes, np.asarray(scales).astype(np.uint8), own.mode, bits, module.weight)


# --- optimum-quanto ------------------------------------------------------------------------------------

_QUANTO_SCALE = ".weight._scale"
_QUANTO_PARTS = {"data": ".weight._data", "packed": ".weight._data._data", "scale": _QUANTO_SCALE,
                 "shift": ".weight._shift", "input_scale": ".input_scale", "output_scale": ".output_scale"}
_QUANTO_FLOAT8 = {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}
_QUANTO_ROW_CUTS = (32, 64, 96, 128)  # groups quanto cuts an input row longer than 128 into (nn/qmodule.py)


def quanto_anchors(tensors: Mapping[str, _Tensor]) -> list[str]:
    """The `<p>.weight._scale` of every quanto module: its codes (`.weight._data`, or `._data._data` packed)
    beside it (sorted)."""
    return [n for n in sorted(tensors) if n.endswith(_QUANTO_SCALE)
            and any(n[: -len("._scale")] + s in tensors for s in ("._data", "._data._data"))]


# (out, in) of a model's Linear weights by name, from outside the checkpoint (the architecture config.json
# names: `indexer.readers.linear_shapes`); asked only for a module whose stored shapes leave it open
ShapeSource = Callable[[], Mapping[str, tuple[int, int]]]


def _quanto_type(tensors: Mapping[str, _Tensor], prefix: str, bits: int) -> QuantScheme:
    """A module's quanto type from its codes: I8 qint8, F8 qfloat8, packed bytes qint4 / qint2 (byte rows
    against groups; `bits` when both fit)."""
    data, packed = tensors.get(prefix + ".weight._data"), tensors.get(prefix + ".weight._data._data")
    if packed is None:
        assert data is not None  # quanto_anchors: one or the other
        if data.dtype not in ("I8", *_QUANTO_FLOAT8) or len(data.shape) != 2:
            raise _error(prefix + ".weight._data", f"quanto codes must be a 2-D I8, F8_E4M3 or F8_E5M2 tensor, got "
                                                   f"{data.dtype} {list(data.shape)}")
        return QuantScheme("quanto", 8, mode=_QUANTO_FLOAT8.get(data.dtype, "affine"))
    scale, shift = tuple(tensors[prefix + _QUANTO_SCALE].shape), prefix + ".weight._shift" in tensors
    if not shift or len(packed.shape) != 2 or len(scale) != 2 or scale[1] != 1:
        raise _error(prefix + ".weight._data._data", f"quanto packed codes {list(packed.shape)} need a 2-D (groups, 1) "
                     f"scale and shift beside them (scale {list(scale)}, shift {'present' if shift else 'missing'})")
    widths = [b for b in (4, 2) if _ceil(scale[0], 8 // b) == packed.shape[0]]
    if not widths:
        raise _error(prefix + ".weight._data._data", f"{packed.shape[0]} byte rows hold {scale[0]} groups at no "
                                                     "width (4 or 2 bits)")
    return QuantScheme("quanto", bits if bits in widths else widths[0])


def _quanto_module(tensors: Mapping[str, _Tensor], scheme: QuantScheme, anchor: str,
                   shapes: ShapeSource | None) -> PackedModule:
    prefix = anchor[: -len(_QUANTO_SCALE)]
    parts = {role: prefix + suffix for role, suffix in _QUANTO_PARTS.items() if prefix + suffix in tensors}
    own = _quanto_type(tensors, prefix, scheme.bits)
    scale = tuple(tensors[anchor].shape)
    if "packed" in parts:
        shape = _quanto_shape(tensors, prefix, scale[0], tensors[parts["packed"]].shape[1], own.bits, shapes)
    else:
        data = tensors[parts["data"]].shape
        if math.prod(scale) not in (1, data[0]):
            raise _error(anchor, f"quanto scale {list(scale)} is neither one per row of {list(data)} nor one")
        shape = (data[0], data[1])
    return PackedModule(prefix + ".weight", dict(sorted(parts.items())), shape, None if own == scheme else own)


def _quanto_shape(tensors: Mapping[str, _Tensor], prefix: str, groups: int, group: int, bits: int,
                  shapes: ShapeSource | None) -> tuple[int, int]:
    """(out, in) of a qint4 / qint2 module (see the layout): the bias's length, else one group a row when
    the group is no cut quanto makes, else the architecture's own shapes."""
    bias = tensors.get(prefix + ".bias")
    if bias is not None and len(bias.shape) == 1 and bias.shape[0] and (groups * group) % bias.shape[0] == 0:
        return bias.shape[0], groups * group // bias.shape[0]
    if group not in _QUANTO_ROW_CUTS:
        return groups, group
    known = (shapes() if shapes is not None else {}).get(prefix + ".weight")
    if known is not None and known[0] * known[1] == groups * group:
        return known
    raise _error(prefix + ".weight._data._data", f"quanto {bits}-bit module {prefix!r}: groups of {group} columns may "
                 "be whole rows or runs of longer ones, and neither a bias nor the architecture in config.json "
                 "tells its (out, in)")


def _quanto_codes(packed: np.ndarray, bits: int, groups: int) -> np.ndarray:
    """quanto's PackedTensor: byte row j holds rows j, j + R, ... (R byte rows) in its low bits first."""
    words = np.asarray(packed).astype(np.uint8)
    mask = (1 << bits) - 1
    planes = [(words >> (bits * i)) & mask for i in range(8 // bits)]
    return np.concatenate(planes, axis=0)[:groups]


def _quanto(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme, first_row: int) -> np.ndarray:
    own = module.scheme or scheme
    scale = _f32(_need(arrays, module, "scale"))
    if "packed" not in module.parts:
        data = _f32(_need(arrays, module, "data"))
        return data * _expand_scale(scale, data.shape, None, first_row, module.weight)
    codes = _quanto_codes(_need(arrays, module, "packed"), own.bits, scale.shape[0]).astype(np.float32)
    shift = np.asarray(_need(arrays, module, "shift"))
    grouped = codes * scale - _f32(shift) if shift.dtype.kind == "f" else (codes - _f32(shift)) * scale
    return grouped.reshape(module.shape or (-1, grouped.shape[1]))


def reads_whole(module: PackedModule, scheme: QuantScheme) -> bool:
    """Codes or groups packed across output rows (GPTQ, AWQ, quanto's 4- and 2-bit): read the module whole."""
    return scheme.method in ("gptq", "awq") or (scheme.method == "quanto" and "packed" in module.parts)


# --- modules ----------------------------------------------------------------------------------------

_TORCHAO_CODES = "._weight_qdata"
# anchor suffix -> (role of the anchor, {role: suffix}) ; suffixes are appended to the module prefix
_GPTQ_PARTS = {"qweight": ".qweight", "qzeros": ".qzeros", "scales": ".scales", "g_idx": ".g_idx"}
_PARTS: dict[Method, tuple[str, dict[str, str], tuple[str, ...]]] = {
    # method: (anchor suffix, role -> suffix, required roles)
    "gptq": (".qweight", _GPTQ_PARTS, ("qweight", "qzeros", "scales")),
    "awq": (".qweight", _GPTQ_PARTS, ("qweight", "scales")),
    "bnb-int8": (".SCB", {"weight": ".weight", "SCB": ".SCB"}, ("weight", "SCB")),
    "bnb-4bit": (".weight.absmax", {"weight": ".weight", "absmax": ".weight.absmax", "quant_map": ".weight.quant_map",
                                    "nested_absmax": ".weight.nested_absmax",
                                    "nested_quant_map": ".weight.nested_quant_map",
                                    "quant_state": ".weight.quant_state.bitsandbytes__nf4",
                                    "quant_state_fp4": ".weight.quant_state.bitsandbytes__fp4"},
                 ("weight", "absmax", "quant_map")),
    "fp8": (".weight", {"weight": ".weight", "scale": ".weight_scale", "scale_inv": ".weight_scale_inv",
                        "scale_weight": ".scale_weight", "scale_input": ".scale_input"}, ("weight",)),
    "ct-pack": (".weight_packed", {"weight_packed": ".weight_packed", "weight_shape": ".weight_shape",
                                   "weight_scale": ".weight_scale", "weight_zero_point": ".weight_zero_point",
                                   "weight_g_idx": ".weight_g_idx"}, ("weight_packed", "weight_shape", "weight_scale")),
    "ct-int": (".weight", {"weight": ".weight", "weight_scale": ".weight_scale",
                           "weight_zero_point": ".weight_zero_point"},
               ("weight", "weight_scale")),
    "ct-fp4": (".weight_packed", {"weight_packed": ".weight_packed", "weight_scale": ".weight_scale",
                                  "weight_global_scale": ".weight_global_scale"}, ("weight_packed", "weight_scale")),
    # torchao's roles named as compressed-tensors' int-quantized ones, which it decodes the same way
    "torchao": (_TORCHAO_CODES, {"weight": _TORCHAO_CODES, "weight_scale": "._weight_scale",
                                 "weight_zero_point": "._weight_zero_point"}, ("weight", "weight_scale")),
}


def _anchors(tensors: Mapping[str, _Tensor], scheme: QuantScheme) -> list[str]:
    if scheme.method == "mlx":
        return mlx_anchors(tensors)
    if scheme.method == "quanto":
        return quanto_anchors(tensors)
    suffix = _PARTS[scheme.method][0]
    found = sorted(n for n in tensors if n.endswith(suffix))
    if scheme.method == "fp8":  # weights stored in float8; the unquantized ones (norms, heads) are not modules
        return [n for n in found if tensors[n].dtype in ("F8_E4M3", "F8_E5M2")]
    if scheme.method == "ct-int":
        return [n for n in found if tensors[n].dtype == "I8"]
    if scheme.method == "torchao":  # _from_tensors refused any other codes
        return [n for n in found if tensors[n].dtype in ("I8", *_QUANTO_FLOAT8)]
    if scheme.method in ("ct-fp4", "ct-pack"):  # FP4 codes are bytes, pack-quantized words int32
        return [n for n in found if (tensors[n].dtype == "U8") == (scheme.method == "ct-fp4")]
    return found


def _module(tensors: Mapping[str, _Tensor], scheme: QuantScheme, anchor: str,
            shapes: ShapeSource | None = None) -> PackedModule:
    if scheme.method == "mlx":
        return _mlx_module(tensors, scheme, anchor)
    if scheme.method == "quanto":
        return _quanto_module(tensors, scheme, anchor, shapes)
    suffix, roles, required = _PARTS[scheme.method]
    prefix = anchor[: -len(suffix)]
    parts = {role: prefix + s for role, s in roles.items() if prefix + s in tensors}
    if "quant_state_fp4" in parts:
        parts["quant_state"] = parts.pop("quant_state_fp4")
    missing = [roles[r] for r in required if r not in parts]
    if scheme.method == "fp8" and not {"scale", "scale_inv", "scale_weight"} & parts.keys():
        missing.append(".weight_scale, .weight_scale_inv or .scale_weight")
    if scheme.method == "bnb-4bit" and "quant_state" not in parts:
        missing.append(".weight.quant_state.bitsandbytes__nf4 (or __fp4)")
    if scheme.method == "ct-fp4" and scheme.mode == "nvfp4" and "weight_global_scale" not in parts:
        missing.append(".weight_global_scale")
    if missing:
        raise _error(anchor, f"{scheme.method} module {prefix!r} lacks {', '.join(missing)}")
    own = _gptq_module_bits(tensors, scheme, parts, anchor) if scheme.method == "gptq" else (
        _torchao_own(tensors, scheme, parts) if scheme.method == "torchao" else None)
    return PackedModule(prefix + ".weight", dict(sorted(parts.items())), _shape(tensors, own or scheme, parts), own)


def _torchao_own(tensors: Mapping[str, _Tensor], scheme: QuantScheme, parts: Mapping[str, str]) -> QuantScheme | None:
    """A torchao module's codes type and scale blocks (block_size from the shapes: [out / scale rows, in /
    scale columns]; None when one scale a row, or a few along each), when not the checkpoint's."""
    codes, scale = tuple(tensors[parts["weight"]].shape), tuple(tensors[parts["weight_scale"]].shape)
    per_tensor = math.prod(scale) == 1
    if len(codes) != 2 or (not per_tensor and (len(scale) != 2 or not all(scale))):
        raise _error(parts["weight"], f"torchao codes {list(codes)} and scale {list(scale)} are not 2-D")
    block = None if per_tensor or scale[0] == codes[0] else (_ceil(codes[0], scale[0]), _ceil(codes[1], scale[1]))
    own = replace(scheme, mode=_QUANTO_FLOAT8.get(tensors[parts["weight"]].dtype, "affine"), block=block)
    return None if own == scheme else own


def _gptq_module_bits(tensors: Mapping[str, _Tensor], scheme: QuantScheme, parts: Mapping[str, str],
                      anchor: str) -> QuantScheme | None:
    """A GPTQ module's own width when it is not the checkpoint's (gptqmodel's `dynamic`, AutoRound's
    extra_config: some layers at 8 bits): its qzeros pack `out` zero points into out * bits / 32 words.
    Reading it at the checkpoint's width would decode garbage without an error."""
    zeros, scales = tensors[parts["qzeros"]].shape, tensors[parts["scales"]].shape
    if len(zeros) != 2 or len(scales) != 2 or not zeros[1]:
        return None
    bits = next((b for b in (2, 4, 8) if _ceil(scales[1] * b, 32) == zeros[1]), None)
    if bits is None:
        raise _error(anchor, f"qzeros {list(zeros)} fit no bit width for {scales[1]} outputs (2, 4 or 8 bits)")
    return replace(scheme, bits=bits) if bits != scheme.bits else None


def _shape(tensors: Mapping[str, _Tensor], scheme: QuantScheme, parts: Mapping[str, str]) -> tuple[int, int] | None:
    shape = lambda role: tuple(tensors[parts[role]].shape)  # noqa: E731
    if scheme.method == "gptq":
        rows, out = shape("qweight")
        return (out, shape("g_idx")[0]) if "g_idx" in parts else (out, rows * 32 // scheme.bits)
    if scheme.method == "awq":
        rows, cols = shape("qweight")
        return (cols * 32 // scheme.bits, rows)
    if scheme.method in ("bnb-int8", "fp8", "ct-int", "torchao"):
        dims = shape("weight")
        return (dims[0], dims[1]) if len(dims) == 2 else None
    if scheme.method == "ct-fp4":
        dims = shape("weight_packed")
        return (dims[0], 2 * dims[1]) if len(dims) == 2 else None
    return None  # bnb-4bit: in the JSON blob; ct-pack: in the weight_shape tensor


def packed_modules(tensors: Mapping[str, _Tensor], scheme: QuantScheme,
                   shapes: ShapeSource | None = None) -> dict[str, PackedModule]:
    """Every quantized Linear of the checkpoint, keyed by the HF weight name it replaces (sorted). `shapes`:
    (out, in) from outside the checkpoint, asked only where quanto's 4- and 2-bit codes leave it open."""
    modules = [_module(tensors, scheme, anchor, shapes) for anchor in _anchors(tensors, scheme)]
    return {m.weight: m for m in sorted(modules, key=lambda m: m.weight)}


def plain_tensors(tensors: Mapping[str, _Tensor], scheme: QuantScheme,
                  modules: Mapping[str, PackedModule] | None = None) -> list[str]:
    """The tensors no module owns: stored as plain floats (norms, embeddings, often lm_head), read as usual.
    `modules`: `packed_modules` already found."""
    found = packed_modules(tensors, scheme) if modules is None else modules
    owned = {name for m in found.values() for name in m.parts.values()}
    return sorted(n for n in tensors if n not in owned)


def bnb_quant_state(raw: bytes | np.ndarray, *, name: str = "quant_state") -> dict[str, Any]:
    """The JSON object bitsandbytes stores as the bytes of `<p>.weight.quant_state.bitsandbytes__*`."""
    data = raw.tobytes() if isinstance(raw, np.ndarray) else bytes(raw)
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _error(name, "the bitsandbytes quant_state is not a UTF-8 JSON object") from None
    if not isinstance(state, dict):
        raise _error(name, "the bitsandbytes quant_state is not a JSON object")
    for key in ("blocksize", "shape"):
        if key not in state:
            raise _error(name, f"the bitsandbytes quant_state lacks {key!r}")
    shape = state["shape"]
    if not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int and d > 0 for d in shape):
        raise _error(name, f"the bitsandbytes quant_state shape must be [out, in], got {shape!r:.60}")
    if type(state["blocksize"]) is not int or state["blocksize"] <= 0:
        raise _error(name, f"the bitsandbytes blocksize must be a positive whole number, "
                           f"got {state['blocksize']!r:.40}")
    return state


# --- unpacking --------------------------------------------------------------------------------------


def _unsigned(words: np.ndarray) -> np.ndarray:
    """Packed integer words as unsigned of the same width (shifts must not drag the sign in)."""
    if words.dtype.kind not in "iu":
        raise _error("packed words", f"must be integers, got {words.dtype}")
    return words.view(f"u{words.dtype.itemsize}")


def _codes_along_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """(R, C) words -> (R*k, C) codes: code[r*k + j, c] = word[r, c] >> (bits*j), k = width/bits (GPTQ)."""
    u = _unsigned(words)
    k = u.dtype.itemsize * 8 // bits
    shifts = (np.arange(k, dtype=u.dtype) * bits)[None, :, None]
    return ((u[:, None, :] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(-1, u.shape[1])


def _codes_along_cols(words: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """(R, C) words -> (R, C*k) codes: code[r, c*k + j] = word[r, c] >> (bits*order[j]) (order: 0..k-1)."""
    u = _unsigned(words)
    k = u.dtype.itemsize * 8 // bits
    slots = np.arange(k) if order is None else np.asarray(order)
    shifts = (slots.astype(u.dtype) * bits)[None, None, :]
    return ((u[:, :, None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(u.shape[0], -1)


def _bitstream(words: np.ndarray, bits: int, count: int, *, thing: str = "weight_packed") -> np.ndarray:
    """Each row of words as one little-endian bit stream of `bits`-wide codes; the first `count` of a row."""
    u = np.ascontiguousarray(_unsigned(words)).astype("<u4")
    if u.ndim != 2 or u.shape[1] * 32 < count * bits:
        raise _error(thing, f"{u.shape[-1]} words a row cannot hold {count} codes of {bits} bits")
    if bits in (4, 8):  # whole nibbles / bytes: no bit unpacking
        if bits == 8:
            return u.view(np.uint8)[:, :count].copy()
        b = u.view(np.uint8)
        return np.stack([b & 0xF, b >> 4], axis=-1).reshape(u.shape[0], -1)[:, :count]
    stream = np.unpackbits(u.view(np.uint8), axis=1, bitorder="little")[:, : count * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16))
    return (stream.reshape(u.shape[0], count, bits).astype(np.uint16) @ weights).astype(np.uint8)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _need(arrays: Mapping[str, np.ndarray], module: PackedModule, role: str) -> np.ndarray:
    if role not in arrays:
        raise _error(module.weight, f"the {role!r} tensor ({module.parts.get(role, '?')}) was not given")
    return arrays[role]


def _groups(n_in: int, n_groups: int, g_idx: np.ndarray | None, thing: str) -> np.ndarray:
    """Group index of each input column: g_idx when stored, else consecutive groups of n_in / n_groups."""
    if g_idx is not None:
        g = np.asarray(g_idx).astype(np.int64).reshape(-1)
        if len(g) != n_in or (len(g) and (g.min() < 0 or g.max() >= n_groups)):
            raise _error(thing, f"g_idx must hold {n_in} group numbers in [0, {n_groups})")
        return g
    size = -(-n_in // n_groups)  # ceil: a last partial group (in not a multiple of group_size)
    if n_groups != -(-n_in // size):
        raise _error(thing, f"{n_groups} groups do not split {n_in} input columns evenly")
    return np.arange(n_in) // size


# --- per scheme --------------------------------------------------------------------------------------


def _gptq(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme) -> np.ndarray:
    scheme = module.scheme or scheme
    codes = _codes_along_rows(_need(arrays, module, "qweight"), scheme.bits)  # (in', out)
    scales = _f32(_need(arrays, module, "scales"))
    n_out = scales.shape[1]
    g_idx = arrays.get("g_idx")
    n_in = len(g_idx) if g_idx is not None else codes.shape[0]
    if codes.shape[0] < n_in or codes.shape[1] != n_out:
        raise _error(module.weight, f"qweight {codes.shape} codes do not cover scales {scales.shape} / {n_in} inputs")
    zeros = _codes_along_cols(_need(arrays, module, "qzeros"), scheme.bits)[:, :n_out].astype(np.float32)
    if zeros.shape != scales.shape:
        raise _error(module.weight, f"qzeros unpack to {zeros.shape}, scales are {scales.shape}")
    g = _groups(n_in, scales.shape[0], g_idx, module.weight)
    w_t = (codes[:n_in].astype(np.float32) - (zeros[g] + scheme.zero_offset)) * scales[g]
    return np.ascontiguousarray(w_t.T)


def _awq(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme) -> np.ndarray:
    # logical column 8c + k sits in nibble AWQ_REVERSE_ORDER[k] of word c: shift by that, no gather
    codes = _codes_along_cols(_need(arrays, module, "qweight"), 4, AWQ_REVERSE_ORDER).astype(np.float32)  # (in, out)
    scales = _f32(_need(arrays, module, "scales"))
    if scales.shape[1] != codes.shape[1]:
        raise _error(module.weight, f"qweight unpacks to {codes.shape[1]} outputs, scales have {scales.shape[1]}")
    if "qzeros" in arrays:
        zeros = _codes_along_cols(arrays["qzeros"], 4, AWQ_REVERSE_ORDER).astype(np.float32)
        if zeros.shape != scales.shape:
            raise _error(module.weight, f"qzeros unpack to {zeros.shape}, scales are {scales.shape}")
    else:  # zero_point false: symmetric around the middle code
        zeros = np.full(scales.shape, 8.0, dtype=np.float32)
    g = _groups(codes.shape[0], scales.shape[0], None, module.weight)
    return np.ascontiguousarray(((codes - zeros[g]) * scales[g]).T)


def _bnb_int8(module: PackedModule, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    weight, scb = _f32(_need(arrays, module, "weight")), _f32(_need(arrays, module, "SCB")).reshape(-1)
    if weight.ndim != 2 or len(scb) != weight.shape[0]:
        raise _error(module.weight, f"SCB has {len(scb)} values for a weight of shape {weight.shape}")
    return weight * (scb[:, None] / 127.0)


def _bnb_absmax(module: PackedModule, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any],
                first_block: int) -> np.ndarray:
    absmax = _need(arrays, module, "absmax")
    if "nested_absmax" not in arrays:
        return _f32(absmax).reshape(-1)
    nested_bs = state.get("nested_blocksize")
    if type(nested_bs) is not int or nested_bs <= 0:
        raise _error(module.weight, "nested absmax without a positive nested_blocksize in the quant_state")
    codes = np.asarray(absmax).reshape(-1).astype(np.int64)
    qmap = _f32(_need(arrays, module, "nested_quant_map")).reshape(-1)
    nested = _f32(arrays["nested_absmax"]).reshape(-1)
    block_of = (first_block + np.arange(len(codes))) // nested_bs - first_block // nested_bs
    if len(codes) and (codes.max() >= len(qmap) or block_of.max() >= len(nested)):
        raise _error(module.weight, "nested absmax codes or blocks out of range")
    return qmap[codes] * nested[block_of] + np.float32(state.get("nested_offset", 0.0))


def _bnb_4bit(module: PackedModule, arrays: Mapping[str, np.ndarray], rows: tuple[int, int] | None) -> np.ndarray:
    state = bnb_quant_state(_need(arrays, module, "quant_state"), name=module.parts.get("quant_state", module.weight))
    out, n_in = state["shape"]
    r0, r1 = rows if rows is not None else (0, out)
    start, count, bs = r0 * n_in, (r1 - r0) * n_in, state["blocksize"]
    packed = np.ascontiguousarray(_need(arrays, module, "weight")).view(np.uint8).reshape(-1)
    skip = start % 2  # a row range starting mid-byte (odd in): the byte holds the row before's last code
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[skip : skip + count]
    qmap = _f32(_need(arrays, module, "quant_map")).reshape(-1)
    absmax = _bnb_absmax(module, arrays, state, start // bs)
    blocks = (start + np.arange(count)) // bs - start // bs
    if len(codes) != count or (count and (blocks[-1] >= len(absmax) or codes.max() >= len(qmap))):
        raise _error(module.weight, f"4-bit data does not cover {count} values of shape {state['shape']}")
    return (qmap[codes] * absmax[blocks]).reshape(r1 - r0, n_in)


def _expand_scale(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int] | None,
                  first_row: int, thing: str) -> np.ndarray:
    """A stored scale broadcast to rows [first_row, first_row + shape[0]) of W: scalar, per row, per
    group of columns, or per block of rows x columns (scale rows given from block first_row // b0)."""
    rows, cols = shape
    s = _f32(scale)
    if s.size == 1:
        return np.full(shape, s.reshape(-1)[0], dtype=np.float32)
    s = s.reshape(-1, 1) if s.ndim == 1 else s
    if s.ndim != 2:
        raise _error(thing, f"a scale of shape {scale.shape} is not a scalar, column, group or block layout")
    if block is None and s.shape[0] == rows:  # per row, or per group of columns along each row
        return np.repeat(s, -(-cols // s.shape[1]), axis=1)[:, :cols]
    b0, b1 = block or (DEFAULT_FP8_BLOCK, DEFAULT_FP8_BLOCK)
    offset = first_row % b0
    full = np.repeat(np.repeat(s, b0, axis=0), b1, axis=1)[offset : offset + rows, :cols]
    if full.shape != shape:
        raise _error(thing, f"scale {scale.shape} with blocks {b0} x {b1} does not cover {rows} x {cols}")
    return full


def _e8m0(exponents: np.ndarray) -> np.ndarray:
    """MX scales: U8 biased exponents, 2 ** (e - 127)."""
    return np.ldexp(np.float32(1), np.asarray(exponents).astype(np.int32) - 127).astype(np.float32)


def _fp8(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme, first_row: int) -> np.ndarray:
    weight = _f32(_need(arrays, module, "weight"))
    scale = next((arrays[r] for r in ("scale", "scale_inv", "scale_weight") if r in arrays), None)
    if scale is None or weight.ndim != 2:
        raise _error(module.weight, "an fp8 weight needs a 2-D weight and weight_scale, weight_scale_inv or "
                                    "scale_weight")
    if scheme.mode == "mxfp8":
        scale = _e8m0(scale)
    return weight * _expand_scale(scale, weight.shape, scheme.block, first_row, module.weight)


def _ct_int(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme, first_row: int) -> np.ndarray:
    q = _f32(_need(arrays, module, "weight"))
    if q.ndim != 2:
        raise _error(module.weight, f"an int-quantized weight must be 2-D, got {q.shape}")
    scale = _expand_scale(_need(arrays, module, "weight_scale"), q.shape, scheme.block, first_row, module.weight)
    zp = arrays.get("weight_zero_point")
    zero = 0.0 if zp is None else _expand_scale(zp, q.shape, scheme.block, first_row, module.weight)
    return (q - zero) * scale


def _ct_pack(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme,
             rows: tuple[int, int] | None) -> np.ndarray:
    out, n_in = (int(d) for d in np.asarray(_need(arrays, module, "weight_shape")).reshape(-1)[:2])
    packed = _need(arrays, module, "weight_packed")
    # the config's width when the words agree; without a config (or a wrong one) the row width tells it
    bits = scheme.bits if packed.shape[-1] == _ceil(n_in * scheme.bits, 32) else _ct_bits(packed, n_in)
    offset = 1 << (bits - 1)
    q = _bitstream(packed, bits, n_in).astype(np.float32) - offset
    scale = _f32(_need(arrays, module, "weight_scale"))
    scale = scale.reshape(-1, 1) if scale.ndim < 2 else scale
    if scale.shape[0] == 1 and q.shape[0] > 1:  # per-tensor
        scale = np.repeat(scale, q.shape[0], axis=0)
    g = _groups(n_in, scale.shape[1], arrays.get("weight_g_idx"), module.weight)
    zero = 0.0
    if "weight_zero_point" in arrays:
        zp = arrays["weight_zero_point"]
        r0 = 0 if rows is None else rows[0]
        zeros = _bitstream(np.ascontiguousarray(zp.T), bits, out).T.astype(np.float32) - offset  # (out, groups)
        zero = zeros[r0 : r0 + q.shape[0]][:, g]
    if scale.shape[0] != q.shape[0]:
        raise _error(module.weight, f"weight_scale has {scale.shape[0]} rows for {q.shape[0]} weight rows")
    return (q - zero) * scale[:, g]


def _ct_fp4(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme) -> np.ndarray:
    packed = np.asarray(_need(arrays, module, "weight_packed"))
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise _error(module.weight, f"FP4 codes must be a 2-D U8 tensor, got {packed.dtype} {packed.shape}")
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)  # low nibble first
    glob = _f32(_need(arrays, module, "weight_global_scale")).reshape(-1)[0] if scheme.mode == "nvfp4" else None
    return _microscaled(codes, _need(arrays, module, "weight_scale"), scheme.mode, 4, module.weight, glob)


def _microscaled(codes: np.ndarray, raw_scale: np.ndarray, mode: str, bits: int, thing: str,
                 global_scale: np.floating | None = None) -> np.ndarray:
    """MX / NV codes (FP4 E2M1 at 4 bits, F8 E4M3 at 8) times their group's scale: E8M0 exponents (mx modes),
    else F8 E4M3 (its U8 bytes, or already decoded), divided by the per-tensor global scale when there is one.
    MLX's modes and compressed-tensors' NVFP4 / MXFP4 alike; groups from the scale's width."""
    values = FP4_E2M1[codes] if bits == 4 else decode(codes.tobytes(), "F8_E4M3", codes.shape, name=thing)
    raw = np.asarray(raw_scale)
    if mode.startswith("mx"):
        scale = _e8m0(raw)
    else:
        scale = decode(raw.tobytes(), "F8_E4M3", raw.shape, name=thing) if raw.dtype == np.uint8 else _f32(raw)
    if global_scale is not None:
        scale = scale / global_scale
    scale = scale.reshape(-1, 1) if scale.ndim < 2 else scale
    return values * scale.astype(np.float32)[:, _groups(codes.shape[1], scale.shape[1], None, thing)]


def _ct_bits(packed: np.ndarray, n_in: int) -> int:
    """pack-quantized without a config: the bit width the row's word count implies (ceil(in*bits/32))."""
    for bits in (4, 8, 2, 3, 5, 6, 7, 1):
        if packed.shape[-1] == _ceil(n_in * bits, 32):
            return bits
    raise _error("weight_packed", f"{packed.shape[-1]} words a row fit no bit width for {n_in} columns")


def dequantize(module: PackedModule, arrays: Mapping[str, np.ndarray], scheme: QuantScheme, *,
               rows: tuple[int, int] | None = None) -> np.ndarray:
    """W (float32, (out, in), or its rows [r0, r1)) of one module from its stored tensors, by role.

    `arrays` holds each role's tensor as `native` decodes it (integers exact). With `rows`, each array
    must be the slice `part_rows(module, scheme, rows)` names (whole tensors where it says None).
    """
    try:
        if reads_whole(module, scheme):
            whole = (_gptq(module, arrays, scheme) if scheme.method == "gptq" else
                     _awq(module, arrays, scheme) if scheme.method == "awq" else _quanto(module, arrays, scheme, 0))
            return whole if rows is None else np.ascontiguousarray(whole[rows[0] : rows[1]])
        first = 0 if rows is None else rows[0]
        if scheme.method == "bnb-int8":
            return _bnb_int8(module, arrays)
        if scheme.method == "bnb-4bit":
            return _bnb_4bit(module, arrays, rows)
        if scheme.method == "fp8":
            return _fp8(module, arrays, scheme, first)
        if scheme.method in ("ct-int", "torchao"):
            return _ct_int(module, arrays, module.scheme or scheme, first)
        if scheme.method == "mlx":
            return _mlx(module, arrays, scheme)
        if scheme.method == "ct-fp4":
            return _ct_fp4(module, arrays, scheme)
        if scheme.method == "quanto":
            return _quanto(module, arrays, scheme, first)
        return _ct_pack(module, arrays, scheme, rows)
    except (ValueError, IndexError, TypeError) as exc:  # shapes that broadcast nowhere: a bad checkpoint
        raise _error(module.weight, f"{scheme.method} tensors are inconsistent ({exc})") from None


def part_rows(module: PackedModule, scheme: QuantScheme, rows: tuple[int, int], *,
              shapes: Mapping[str, tuple[int, ...]],
              quant_state: Mapping[str, Any] | None = None) -> dict[str, tuple[int, int] | None]:
    """Which rows (along dim 0) of each stored tensor hold W's rows [r0, r1); None: read it whole.

    `shapes` are the stored tensors' shapes by role (from the safetensors header); bnb 4-bit also needs
    its parsed `quant_state` (`bnb_quant_state`), which holds W's shape and the block sizes.
    """
    r0, r1 = rows
    spans: dict[str, tuple[int, int] | None] = {role: None for role in module.parts}
    if reads_whole(module, scheme):
        return spans  # codes or groups packed across output rows: whole
    if scheme.method == "bnb-4bit":
        if quant_state is None:
            raise _error(module.weight, "bnb 4-bit row ranges need the parsed quant_state (bnb_quant_state)")
        out, n_in = quant_state["shape"]
    else:
        anchor = {"ct-pack": "weight_packed", "ct-fp4": "weight_packed", "quanto": "data"}.get(scheme.method, "weight")
        out, n_in = shapes[anchor][0], 0
    if not 0 <= r0 <= r1 <= out:
        raise _error(module.weight, f"rows [{r0}, {r1}) outside its {out} rows")
    if scheme.method == "bnb-4bit":
        return _bnb_rows(module, (r0, r1), n_in, quant_state or {}, spans)
    for role in ("weight", "SCB", "weight_packed", "scales", "biases", "data"):  # mlx: scales, biases per row too
        if role in module.parts:
            spans[role] = (r0, r1)
    block = (module.scheme or scheme).block
    for role in ("scale", "scale_inv", "weight_scale", "scale_weight"):  # quanto's `scale`: one a row, or one
        if role in module.parts:
            spans[role] = _scale_rows(shapes[role], out, block, (r0, r1))
    if "weight_zero_point" in module.parts and scheme.method in ("ct-int", "torchao"):
        spans["weight_zero_point"] = _scale_rows(shapes["weight_zero_point"], out, block, (r0, r1))
    return spans


def _scale_rows(stored: tuple[int, ...], out: int, block: tuple[int, int] | None,
                rows: tuple[int, int]) -> tuple[int, int] | None:
    if math.prod(stored) == 1:
        return None  # per tensor
    if stored[0] == out and block is None:
        return rows  # per row (and per group along it)
    b0 = (block or (DEFAULT_FP8_BLOCK, DEFAULT_FP8_BLOCK))[0]
    return (rows[0] // b0, -(-rows[1] // b0))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _bnb_rows(module: PackedModule, rows: tuple[int, int], n_in: int, state: Mapping[str, Any],
              spans: dict[str, tuple[int, int] | None]) -> dict[str, tuple[int, int] | None]:
    """Rows of the (numel/2, 1) byte tensor, the absmax vector and the nested absmax holding W's rows."""
    bs = int(state["blocksize"])
    start, end = rows[0] * n_in, rows[1] * n_in
    spans["weight"] = (start // 2, _ceil(end, 2))
    first, last = start // bs, _ceil(end, bs)  # absmax blocks [first, last)
    spans["absmax"] = (first, last)
    nested = state.get("nested_blocksize")
    if "nested_absmax" in module.parts and type(nested) is int and nested > 0:
        spans["nested_absmax"] = (first // nested, _ceil(last, nested))
    return spans


def predicted_relative_error(scheme: QuantScheme) -> float:
    """RMS relative error the scheme predicts (PACKED_RELATIVE_ERROR, see there for the conditions)."""
    try:
        return PACKED_RELATIVE_ERROR[scheme.name]
    except KeyError:
        known = ", ".join(sorted(PACKED_RELATIVE_ERROR))
        raise _error(scheme.name, f"no predicted error for this scheme (known: {known})") from None
