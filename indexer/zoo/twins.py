"""A PyTorch `transformers` model written as its TensorFlow twin's `tf_model.h5` or its Flax twin's
`flax_model.msgpack`, for the zoos and tests (read back by `sketches.tfh5` and `sketches.flax`).

Flax (`write_flax_msgpack`): `flax.serialization.to_bytes` of the parameter tree, as
`FlaxPreTrainedModel.save_pretrained` writes it: nested msgpack maps by module path (`layer.0` is
`layer` / `0`), each array a msgpack extension of type 1 holding `[shape, dtype name, bytes]`; a Linear's
weight as its transposed `kernel` (GPT-2's Conv1D too: FlaxConv1D keeps (out, in)), a Conv2d's as (kh, kw,
in, out), a LayerNorm's as `scale`, an Embedding's as `embedding`; a tied weight once.

TensorFlow: transformers 5 has no TensorFlow classes, so the file is written with h5py in the layout Keras 2's
`save_weights` gives a `TFPreTrainedModel` (read back by `sketches.tfh5`):
- the root lists the top-level Keras layers (`layer_names`), each a group whose `weight_names` attribute
  lists its variables by full TF name, each variable a dataset at `<layer>/<name>`;
- names are the TF twin's: the model's scope first (`tf_distil_bert_for_sequence_classification`), list
  indices as `_._N`, a Linear's `weight` as its transposed `kernel`, a LayerNorm's as `gamma` / `beta`, an
  Embedding's as `embeddings` (BERT-style `word_embeddings` keep `weight`, as the TF classes name them);
- GPT-2's Conv1D keeps `weight` in its own (in, out) layout, as TFConv1D stores it;
- a Conv2d's kernel is stored (kh, kw, in, out);
- a dropout layer with no variable is listed with an empty `weight_names`, as Keras lists it;
- buffers are not variables of the TF model and are left out, and a tied weight is one variable (GPT-2's
  `lm_head` is its `wte`, as in TFGPT2LMHeadModel).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

KERAS_VERSION = b"2.13.1"


def tf_scope(model: Any) -> str:
    """The TF twin's scope: its class name in Keras' snake case (TFDistilBertForSequenceClassification ->
    tf_distil_bert_for_sequence_classification)."""
    name = "TF" + type(model).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _tf_levels(module_name: str) -> list[str]:
    """A PyTorch module path as TF scopes: a list index joins its list (`layer.0` -> `layer_._0`)."""
    levels: list[str] = []
    for part in module_name.split(".") if module_name else []:
        if part.isdigit() and levels:
            levels[-1] += f"_._{part}"
        else:
            levels.append(part)
    return levels


def _variables(model: Any) -> dict[str, np.ndarray]:
    """{TF variable name without the scope: array in TF's layout} of every parameter."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out: dict[str, np.ndarray] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied weight (GPT-2's lm_head is its wte): one Keras variable
                continue
            seen.add(id(param))
            array = param.detach().to(torch.float32).numpy()
            leaf = param_name
            if isinstance(module, torch.nn.Linear) and param_name == "weight":
                leaf, array = "kernel", array.T
            elif isinstance(module, torch.nn.Conv2d) and param_name == "weight":
                leaf, array = "kernel", array.transpose(2, 3, 1, 0)
            elif isinstance(module, torch.nn.LayerNorm):
                leaf = {"weight": "gamma", "bias": "beta"}[param_name]
            elif isinstance(module, torch.nn.Embedding) and not module_name.endswith("word_embeddings"):
                leaf = "embeddings"
            elif isinstance(module, Conv1D):
                leaf = param_name  # TFConv1D stores (in, out), as PyTorch's Conv1D does
            path = "/".join(_tf_levels(module_name))
            out[f"{path}/{leaf}:0" if path else f"{leaf}:0"] = np.ascontiguousarray(array)
    return out


def write_tf_h5(path: Path, model: Any, *, dtype: str = "float32", extra_layers: tuple[str, ...] = ("dropout_19",)) -> Path:
    """`model`'s weights as its TF twin's tf_model.h5 (module docstring); `extra_layers`: variable-less layers listed."""
    import h5py

    scope = tf_scope(model)
    variables = _variables(model)
    layers: dict[str, list[str]] = {}
    for name in variables:
        layers.setdefault(name.split("/", 1)[0].removesuffix(":0"), []).append(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        names = [*layers, *extra_layers]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = KERAS_VERSION
        for layer in names:
            group = f.create_group(layer)
            full = [f"{scope}/{v}" for v in layers.get(layer, [])]
            group.attrs["weight_names"] = np.array([n.encode() for n in full])
            for name, short in zip(full, layers.get(layer, []), strict=True):
                group.create_dataset(name, data=variables[short].astype(dtype))
    return path


def _flax_tree(model: Any) -> dict[str, Any]:
    """The Flax twin's parameter tree: nested by module path, leaves in Flax's layout and names."""
    import torch

    tree: dict[str, Any] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            array = param.detach().to(torch.float32).numpy()
            leaf = param_name
            if param_name == "weight" and array.ndim == 2 and not isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)):
                leaf, array = "kernel", array.T  # nn.Linear, and GPT-2's Conv1D (FlaxConv1D keeps (out, in))
            elif param_name == "weight" and array.ndim == 4:
                leaf, array = "kernel", array.transpose(2, 3, 1, 0)
            elif isinstance(module, torch.nn.LayerNorm) and param_name == "weight":
                leaf = "scale"
            elif isinstance(module, torch.nn.Embedding):
                leaf = "embedding"
            node = tree
            for level in module_name.split(".") if module_name else []:
                node = node.setdefault(level, {})
            node[leaf] = np.ascontiguousarray(array)
    return tree


def write_flax_msgpack(path: Path, model: Any, *, dtype: str = "float32") -> Path:
    """`model`'s parameters as its Flax twin's flax_model.msgpack (module docstring)."""
    import msgpack

    import torch

    def raw(value: np.ndarray) -> bytes:  # numpy has no bfloat16: torch rounds, its bits are stored
        if dtype == "bfloat16":
            return torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        return value.astype(dtype).tobytes("C")

    def ext(value: object) -> msgpack.ExtType:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"not an array: {type(value).__name__}")
        return msgpack.ExtType(1, msgpack.packb((value.shape, dtype, raw(value)), use_bin_type=True))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb(_flax_tree(model), default=ext, use_bin_type=True, strict_types=True))
    return path
