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

An encoder-decoder model (T5, BART, Marian, Whisper) is written as optimum writes it (`write_seq2seq_onnx`):
`encoder_model.onnx`, the encoder alone (`model.get_encoder()`, its weights named inside it: `block.0...`),
`decoder_model.onnx`, the whole model run from the encoder's output (its decoder and lm_head, named inside the
whole model: `decoder.block.0...`), and optionally `decoder_model_merged.onnx`, both decoder graphs as the
branches of one If over the weights, renamed `<name>_merged_0`, as optimum's merger lays them out. Names
checked against optimum-onnx 0.1.0's own exports of the same models (bench/RESULTS.md, session 18).

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


def write_seq2seq_onnx(folder: Path, model: Any, *, merged: bool = False) -> tuple[Path, Path]:
    """An encoder-decoder `model`'s optimum-style export at `folder/onnx/` (module docstring): the encoder's and
    the decoder's graph (the merged one with `merged`), and config.json. Returns the two files read."""
    import onnx
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model.config.to_json_string())
    target = folder / "onnx"
    target.mkdir(exist_ok=True)
    ids = torch.ones(1, 8, dtype=torch.long)
    text = model.main_input_name == "input_ids"
    # a speech encoder (Whisper) reads log-mel features, no attention mask
    first = ids if text else torch.zeros(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    mask = (torch.ones_like(ids),) if text else ()
    encoder = model.get_encoder().eval()
    run_encoder, run_model = encoder.forward, model.forward
    # each module is traced itself, so its weights keep the names they have inside it, with a forward of
    # positional tensors (as optimum's ModelPatcher does; the tracer mixes up keyword arguments)
    encoder.forward = lambda features, *mask: run_encoder(
        **{model.main_input_name: features}, **({"attention_mask": mask[0]} if mask else {})).last_hidden_state
    # a decoder mask, else transformers' masking looks for packed sequences (aten::diff, no ONNX op)
    model.forward = lambda decoder_input_ids, encoder_hidden_states, *mask: run_model(
        decoder_input_ids=decoder_input_ids, encoder_outputs=(encoder_hidden_states,),
        **({"attention_mask": mask[0]} if mask else {"decoder_attention_mask": torch.ones_like(decoder_input_ids)}),
        use_cache=False).logits
    try:
        with torch.no_grad():
            hidden = encoder(first, *mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (first, *mask), str(target / "encoder_model.onnx"),
                              input_names=[model.main_input_name, "attention_mask"][: 1 + len(mask)], dynamo=False,
                              opset_version=OPSET, do_constant_folding=True)
            torch.onnx.export(model, (ids, hidden, *mask), str(target / "decoder_model.onnx"),
                              input_names=["input_ids", "encoder_hidden_states", "encoder_attention_mask"][: 2 + len(mask)],
                              dynamo=False, opset_version=OPSET, do_constant_folding=True)
    finally:
        del encoder.forward, model.forward
    decoder = target / "decoder_model.onnx"
    if merged:
        onnx.save(merged_decoder(onnx.load(str(decoder))), str(target / "decoder_model_merged.onnx"))
        decoder.unlink()
        decoder = target / "decoder_model_merged.onnx"
    return target / "encoder_model.onnx", decoder


def merged_decoder(plain: Any) -> Any:
    """optimum's merged decoder: one If on `use_cache_branch` whose two branches hold the decoder's nodes, over
    the main graph's weights renamed `<name>_merged_0`. (optimum's branches differ: with and without the cache;
    the weights and their use are the same.)"""
    import copy

    from onnx import TensorProto, helper

    graph = plain.graph
    renamed = {init.name: f"{init.name}_merged_0" for init in graph.initializer}
    weights = []
    for init in graph.initializer:
        kept = copy.deepcopy(init)
        kept.name = renamed[init.name]
        weights.append(kept)

    def branch(name: str, tag: str) -> Any:
        nodes = []
        for node in graph.node:
            kept = copy.deepcopy(node)
            kept.input[:] = [renamed.get(i, i if i in inputs else f"{i}{tag}") for i in node.input]
            kept.output[:] = [o if o in outputs else f"{o}{tag}" for o in node.output]
            nodes.append(kept)
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None)
                                                   for o in graph.output])

    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in graph.output], name="optimum::if",
                            then_branch=branch("then", "_then"), else_branch=branch("else", "_else"))
    main = helper.make_graph([node], "merged", [*graph.input, flag], list(graph.output), weights)
    return helper.make_model(main, opset_imports=list(plain.opset_import), ir_version=plain.ir_version)


def _quantize_q4(plain: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    quantizer = MatMulNBitsQuantizer(onnx.load(str(plain)),
                                     algo_config=DefaultWeightOnlyQuantConfig(block_size=Q4_BLOCK, is_symmetric=True))
    level = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a MatMul
    try:
        quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(level)
    quantizer.model.save_model_to_file(str(target), False)
