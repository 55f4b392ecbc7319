"""Which tensors a method compares, and which models may be compared at all (architecture family).

Input everywhere is a model's tensor shapes, `{name: shape}`, as read from a safetensors header.

Family key. Two models can only be relatives when their body has the same tensors with the same shapes.
The heads (classifier, lm_head, score, ...) and the vocabulary-sized embeddings are re-drawn or resized
per task, so they are left out of the key: a ViT fine-tuned from 10 to 3 classes stays in its parent's
family. The key is `<arch>-<16 hex of blake2b over the sorted (name, shape) body list>`, where `arch` is
a readable guess (vit, bert, llama, conv, generic) used only for display.

Layer selection, per scheme:
- `attention` (MoTHer full fine-tuning, DESIGN.md): the square attention matrices named like
  `attention.attention.{query,key,value}.weight` / `attention.output.dense.weight` (ViT, 48 in ViT-B),
  `attention.self.{query,key,value}.weight` (BERT) or `self_attn.{q,k,v,o}_proj.weight` (Llama).
- `value` (MoTHer LoRA): the value matrices only (`...value.weight`, `self_attn.v_proj.weight`).
- `shared` (ours): every tensor present with the same shape in all models compared, 2-D matrices and
  4-D conv kernels (1-D norms and biases only with `include_1d`), heads included when their shapes agree
  (a kept head is inherited from the parent, so it carries lineage like any other layer).
`dense` lists the dense projections among the selected layers (the paper's own full-FT set, "all
the dense layers"): on the full-FT zoo each of them alone finds the true parent of 30-39 of 41
models, against 24-28 for the patch embedding and the query/key matrices.
Direction (kurtosis) layers: the attention output projections (`attention.output.dense`, `o_proj`) for
full fine-tuning, the value matrices for LoRA; a model with neither falls back to all selected layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from errors import UnsupportedModelError

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
Scheme = Literal["attention", "value", "shared"]

_ATTENTION = re.compile(
    r"(?:^|\.)(?:attention\.(?:attention|self)\.(?:query|key|value)"
    r"|attention\.output\.dense"
    r"|self_attn\.[qkvo]_proj)\.weight$"
)
_VALUE = re.compile(r"(?:^|\.)(?:attention\.(?:attention|self)\.value|self_attn\.v_proj)\.weight$")
_OUTPUT = re.compile(r"(?:^|\.)(?:attention\.output\.dense|self_attn\.o_proj)\.weight$")
# The "dense" projections (the paper's full-FT layer set, "all the dense layers"): ViT/BERT `*.dense`,
# Llama-style `o_proj`/`gate_proj`/`up_proj`/`down_proj`, GPT-2 `c_proj`/`c_fc`, `fc1`/`fc2`, `out_proj`.
_DENSE = re.compile(r"(?:^|\.)(?:dense|[o]_proj|gate_proj|up_proj|down_proj|c_proj|c_fc|fc1|fc2|out_proj)\.weight$")
# Heads and vocabulary-sized tensors: resized or re-drawn per task, never part of the family key.
_HEAD = re.compile(
    r"(?:^|\.)(?:classifier|lm_head|score|qa_outputs|head|heads|fc_out|pooler)(?:\.|$)"
    r"|(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|embed_out)\.weight$"
)
_ARCH_HINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vit", re.compile(r"attention\.attention\.query\.weight$")),
    ("bert", re.compile(r"attention\.self\.query\.weight$")),
    ("llama", re.compile(r"self_attn\.q_proj\.weight$")),
)


@dataclass(frozen=True)
class LayerSelection:
    """The tensors to compare (`distance`) and those whose kurtosis orders an edge (`direction`)."""

    distance: tuple[str, ...]
    direction: tuple[str, ...]
    dense: tuple[str, ...] = ()  # the dense projections among `distance` (mother's full-FT distance)


def is_head(name: str) -> bool:
    return _HEAD.search(name) is not None


def architecture_hint(shapes: Mapping[str, Shape]) -> str:
    for arch, pattern in _ARCH_HINTS:
        if any(pattern.search(name) for name in shapes):
            return arch
    if any(len(shape) == 4 for shape in shapes.values()):
        return "conv"
    return "generic"


def family_key(shapes: Mapping[str, Shape]) -> str:
    """`<arch>-<digest>` over the body tensors (heads and vocab embeddings excluded), order-free."""
    body = sorted((name, list(shape)) for name, shape in shapes.items() if not is_head(name))
    if not body:
        raise UnsupportedModelError("weights", "no body tensors: only heads or embeddings were found")
    digest = hashlib.blake2b(json.dumps(body).encode(), digest_size=8).hexdigest()
    return f"{architecture_hint(shapes)}-{digest}"


def shared_tensors(models: Sequence[Mapping[str, Shape]], *, include_1d: bool = False) -> tuple[str, ...]:
    """Names present with one shape in every model; 2-D and 4-D (plus 1-D when asked), sorted."""
    if not models:
        return ()
    first = models[0]
    keep = []
    for name in sorted(first):
        shape = first[name]
        if len(shape) not in ((1, 2, 4) if include_1d else (2, 4)):
            continue
        if all(other.get(name) == shape for other in models[1:]):
            keep.append(name)
    return tuple(keep)


def _square_matching(pattern: re.Pattern[str], names: Sequence[str], shapes: Mapping[str, Shape]) -> tuple[str, ...]:
    return tuple(n for n in names if pattern.search(n) and len(shapes[n]) == 2 and shapes[n][0] == shapes[n][1])


def select_layers(
    models: Sequence[Mapping[str, Shape]], *, scheme: Scheme, include_1d: bool = False
) -> LayerSelection:
    """The layers `scheme` compares across `models` (only tensors they all share with one shape)."""
    common = shared_tensors(models, include_1d=include_1d)
    if not common:
        raise UnsupportedModelError("models", "they share no tensor of equal shape: nothing to compare")
    shapes = models[0]
    if scheme == "attention":
        distance = _square_matching(_ATTENTION, common, shapes)
        direction = _square_matching(_OUTPUT, common, shapes)
    elif scheme == "value":
        distance = _square_matching(_VALUE, common, shapes)
        direction = distance
    else:
        distance = common
        direction = _square_matching(_OUTPUT, common, shapes)
    if not distance:
        raise UnsupportedModelError(
            "models", f"no tensor matches the {scheme!r} layer pattern; use --method mother (any architecture)"
        )
    dense = tuple(n for n in distance if _DENSE.search(n) and not is_head(n))
    return LayerSelection(distance=distance, direction=direction or distance, dense=dense)
