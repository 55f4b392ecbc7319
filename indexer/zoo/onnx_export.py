"""ONNX copies of zoo models as transformers.js and optimum publish them, made by the real tools.

A repo of `onnx/` exports beside config.json and no other weights (`Xenova/...`, `onnx-community/...`):
- `model.onnx`: PyTorch's own exporter (`torch.onnx.export`, the TorchScript one optimum runs), which keeps a
  parameter's name where it is used as it is and folds each Linear weight into an anonymous transposed constant;
- `model_fp16.onnx`: onnxruntime's float16 converter (`onnxruntime.transformers.float16`), as transformers.js'
  `fp16` files;
- `model_quantized.onnx` / `model_int8.onnx`: onnxruntime's dynamic quantizer (`quantize_dynamic`), uint8 per
  tensor (transformers.js' `q8` default) or int8 per output channel;
- `model_q4.onnx`: onnxruntime's 4-bit block quantizer (`MatMulNBitsQuantizer`, block 32, symmetric), as
  transformers.js' `q4` files: every MatMul with a constant weight becomes MatMulNBits;
- `external`: the full-precision graph with its weights in `model.onnx_data` (files over 2 GiB are saved so).

Read back by `sketches.onnx`. Needs the `zoo` extra (transformers, onnx, onnxruntime); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Variant = Literal["fp32", "fp16", "uint8", "int8", "q4", "external"]
FILE_OF: dict[str, str] = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "uint8": "model_quantized.onnx",
                           "int8": "model_int8.onnx", "q4": "model_q4.onnx", "external": "model.onnx"}
Q4_BLOCK = 32  # transformers.js' block size
OPSET = 17


def _model(state: dict[str, Any], config: dict[str, Any]) -> Any:
    """The transformers model of `config` (its first architecture) holding `state`, in eval mode."""
    import torch
    import transformers

    arch = (config.get("architectures") or [""])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"architecture {arch!r} is not a transformers class")
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    model = cls(cfg).eval()
    tensors = {n: torch.as_tensor(np.asarray(a)) for n, a in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if not m.endswith(("position_ids", "lm_head.weight"))]:
        raise ValueError(f"{arch}: the state does not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model


def _inputs(config: dict[str, Any]) -> dict[str, Any]:
    import torch

    if "image_size" in config:
        size = int(config["image_size"])
        return {"pixel_values": torch.zeros(1, int(config.get("num_channels", 3)), size, size)}
    ids = torch.ones(1, 8, dtype=torch.long)
    # an attention mask: without one transformers' masking looks for packed sequences (aten::diff, no ONNX op)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def export(model: Any, path: Path, config: dict[str, Any]) -> Path:
    """`torch.onnx.export` of `model` (TorchScript exporter, as optimum; constant folding on) to `path`."""
    import torch

    inputs = _inputs(config)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=inputs, input_names=list(inputs), dynamo=False,
                          opset_version=OPSET, do_constant_folding=True)
    return path


def write_onnx(folder: Path, state: dict[str, Any], config: dict[str, Any], *, variant: Variant = "fp32") -> Path:
    """A transformers.js-style repo at `folder`: config.json and `onnx/<FILE_OF[variant]>` of the model."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    target = folder / "onnx" / FILE_OF[variant]
    target.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = export(_model(state, config), Path(tmp) / "model.onnx", config)
        if variant == "fp32":
            shutil.copyfile(plain, target)
        elif variant == "external":
            onnx.save(onnx.load(str(plain)), str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{target.name}_data", size_threshold=0)
        elif variant == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(plain)), keep_io_types=True), str(target))
        elif variant == "q4":
            _quantize_q4(plain, target)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            root = logging.getLogger()
            level = root.level
            root.setLevel(max(level, logging.ERROR))  # its advice to pre-process, logged on the root logger
            try:
                quantize_dynamic(str(plain), str(target), per_channel=variant == "int8",
                                 weight_type=QuantType.QInt8 if variant == "int8" else QuantType.QUInt8)
            finally:
                root.setLevel(level)
    logger.info("%s: %s", folder, target.name)
    return target


def _quantize_q4(plain: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(plain)),
                                     algo_config=DefaultWeightOnlyQuantConfig(block_size=Q4_BLOCK, is_symmetric=True))
    level = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a MatMul
    try:
        quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(level)
    quantizer.model.save_model_to_file(str(target), False)
