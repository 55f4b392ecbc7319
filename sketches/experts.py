"""Mixture-of-experts layouts: every expert as a 2-D matrix under one name, and the dense module it stands for.

The Hub stores a MoE's experts two ways, and mergekit-moe writes whichever its transformers writes:
- one 2-D matrix per expert (transformers 4.x; every 2024 "4x7B" merge): Mixtral's
  `layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight` (gate, up, down), Qwen2-MoE / DeepSeek / OLMoE's
  `layers.L.mlp.experts.E.{gate,up,down}_proj.weight`;
- fused 3-D tensors (transformers 5): `layers.L.mlp.experts.gate_up_proj` of (E, 2I, H), each expert's
  gate rows then its up rows, and `layers.L.mlp.experts.down_proj` of (E, H, I); Granite's MoEs store the same
  pair as `layers.L.block_sparse_moe.input_linear.weight` / `output_linear.weight`.
Both read here as `layers.L.mlp.experts.E.{gate,up,down}_proj.weight` (`normalise_name` maps Mixtral's
names, `expert_views` splits the fused tensors), so a re-save in the other layout is a duplicate, and
MoEs compare expert by expert.

A fused tensor is split without reading it: expert E's gate matrix is rows [2IE, 2IE + I) of the tensor seen
as (2IE, H) -- one contiguous byte range of the file -- so each view is a `TensorInfo` over that range,
read (or range-read by the crawl) like any stored tensor. Only the (E, 2I, H) / (E, H, I) pair is split; a
fused layout of other orientation (GPT-OSS and Llama 4's (E, H, 2I) with interleaved columns) stays as
stored, a 3-D tensor the plan does not read.

`expert_alias` names the dense module an expert stands for (`layers.L.mlp.gate_proj.weight`): mergekit-moe
copies each expert from a dense model's MLP and the attention from its base, so a MoE is comparable with
its dense relatives (`sketches.layers.core_overlap` counts a dense MLP matrix as held by a MoE holding an
expert of that name and shape) and a merge of them (`indexer.relations.merges`: every expert a copy of a
relative's MLP). Routers (`mlp.gate.weight`) are no copy of anything: drawn at random or computed from
prompts' hidden states."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from sketches.views import row_view

if TYPE_CHECKING:  # sketches.safetensors splits its headers' fused experts with this module
    from sketches.safetensors import TensorInfo

_MIXTRAL = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$")
_MIXTRAL_ROUTER = re.compile(r"\.block_sparse_moe\.gate\.weight$")
_W = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_EXPERT = re.compile(r"\.mlp\.(?:experts\.\d+|shared_experts?)\.((?:gate|up|down)_proj\.weight)$")
_ROUTER = re.compile(r"\.mlp\.(?:gate|shared_expert_gate)\.weight$")
_INDEX = re.compile(r"\.mlp\.experts\.(\d+)\.")
# fused (E, 2I, H) gate_up / (E, H, I) down pairs: (gate_up suffix, down suffix, what the views' names put after
# the stem): transformers 5's experts, and Granite MoE's (granitemoe, granitemoehybrid: Granite 3 MoEs and
# Granite 4.0-H) block_sparse_moe.input_linear / output_linear, each expert's gate rows then its up rows
_FUSED = ((".experts.gate_up_proj", ".experts.down_proj", ".experts."),
          (".block_sparse_moe.input_linear.weight", ".block_sparse_moe.output_linear.weight", ".mlp.experts."))

K = TypeVar("K")


def mixtral_name(name: str) -> str:
    """Mixtral's per-expert names as every other MoE's (module docstring); other names unchanged."""
    name = _MIXTRAL.sub(lambda m: f".mlp.experts.{m.group(1)}.{_W[m.group(2)]}.weight", name)
    return _MIXTRAL_ROUTER.sub(".mlp.gate.weight", name)


def expert_alias(name: str) -> str | None:
    """The dense MLP matrix an expert (or a shared expert) stands for, None for any other tensor."""
    m = _EXPERT.search(name)
    return name[:m.start()] + ".mlp." + m.group(1) if m else None


def expert_index(name: str) -> int | None:
    """Which expert a routed expert's matrix belongs to (None: a shared expert, or no expert at all)."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


def is_router(name: str) -> bool:
    return _ROUTER.search(name) is not None


# mlx-lm's MoE layout (its models' `sanitize` stacks every expert's matrix: mlx-community's Qwen3-MoE, Mixtral,
# OLMoE, Jamba, Nemotron-H copies): `<stem>.switch_mlp.<proj>.<part>` (`<stem>.experts.<proj>.<part>` in its
# AFMoE, dots1 and gpt-oss models) of (E, out, ...) -- the weight, or when
# quantized its packed words, `scales` and `biases` alike -- expert E's being rows [E out, (E + 1) out).
# Nemotron-H's up / down are fc1 / fc2; Mixtral's stem is its block_sparse_moe, elsewhere the experts' module.
_SWITCH = re.compile(r"^(?:(.*?)(\.block_sparse_moe)?\.)?(switch_mlp|experts)\.(gate_proj|up_proj|down_proj|fc1|fc2)"
                     r"\.(weight|scales|biases|bias)$")
_SWITCH_PROJ = {"fc1": "up_proj", "fc2": "down_proj"}


def _expert_slice(info: TensorInfo, name: str, e: int) -> TensorInfo:
    """Expert `e`'s part of a stacked (E, ...) tensor: a view of its bytes, one dimension less."""
    rest = info.shape[1:]
    if len(rest) == 1:
        return replace(row_view(info, name, e, 1, rest), shape=rest)
    return row_view(info, name, e * rest[0], rest[0], rest[1:])


_SWITCH_VIEW = re.compile(r"^(.*)\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


def switch_sources(module: str) -> tuple[str, ...]:
    """The stored `switch_mlp` modules an expert's view (`<stem>.experts.E.<proj>`, no suffix) may come from:
    mlx-lm's config.json names its per-module quantization by them."""
    m = _SWITCH_VIEW.match(module)
    if m is None:
        return ()
    stem, proj = m.groups()
    projs = [proj] + [k for k, v in _SWITCH_PROJ.items() if v == proj]
    stems = [stem] + ([stem.removesuffix(".mlp") + ".block_sparse_moe"] if stem.endswith(".mlp") else [])
    return tuple(f"{s}.{kind}.{p}" for s in stems for kind in ("switch_mlp", "experts") for p in projs)


def _stacked(where: Mapping[str, tuple[K, TensorInfo]], name: str, part: str) -> bool:
    """An `experts.<proj>.<part>` tensor is mlx-lm's stack (its AFMoE, dots1, gpt-oss models name their
    SwitchGLU `experts`) when its weight is 3-D: (E, out, in or words)."""
    weight = where.get(name[: -len(part)] + "weight")
    return weight is not None and len(weight[1].shape) == 3


def switch_views(where: Mapping[str, tuple[K, TensorInfo]]) -> dict[str, tuple[K, TensorInfo]]:
    """`where` with each of mlx-lm's stacked `switch_mlp` tensors as one view per expert, under the names every
    other MoE layout reads as (`<stem>.experts.E.<proj>.<part>`); anything else as it is."""
    out = dict(where)
    for name, (file, info) in where.items():
        m = _SWITCH.match(name)
        if m is None or len(info.shape) < 2 or (m.group(3) == "experts" and not _stacked(where, name, m.group(5))):
            continue
        stem = (m.group(1) or "") + (".mlp" if m.group(2) else "")
        proj = _SWITCH_PROJ.get(m.group(4), m.group(4))
        for e in range(info.shape[0]):
            view = f"{stem}.experts.{e}.{proj}.{m.group(5)}".removeprefix(".")
            out[view] = (file, _expert_slice(info, view, e))
        del out[name]
    return out  # expert_views sorts


def expert_views(where: Mapping[str, tuple[K, TensorInfo]]) -> dict[str, tuple[K, TensorInfo]]:
    """`where` (stored name -> (file, info)) with each fused (E, 2I, H) gate_up / (E, H, I) down pair replaced by
    one 2-D view per expert and matrix (module docstring), and mlx-lm's stacked experts split (`switch_views`);
    anything else as it is."""
    where = switch_views(where)
    out = dict(where)
    for name, (file, gate_up) in where.items():
        layout = next((f for f in _FUSED if name.endswith(f[0])), None)
        if layout is None:
            continue
        stem = name[: -len(layout[0])]
        down = where.get(stem + layout[1])
        if down is None or not _fused_pair(gate_up, down[1]):
            continue
        experts, two_i, hidden = gate_up.shape
        inner = two_i // 2
        for e in range(experts):
            for part, first in (("gate_proj", 2 * inner * e), ("up_proj", 2 * inner * e + inner)):
                view = f"{stem}{layout[2]}{e}.{part}.weight"
                out[view] = (file, row_view(gate_up, view, first, inner, (hidden,)))
            view = f"{stem}{layout[2]}{e}.down_proj.weight"
            out[view] = (down[0], row_view(down[1], view, hidden * e, hidden, (inner,)))
        del out[name], out[stem + layout[1]]
    return dict(sorted(out.items()))


def _fused_pair(gate_up: TensorInfo, down: TensorInfo) -> bool:
    if len(gate_up.shape) != 3 or len(down.shape) != 3 or gate_up.dtype != down.dtype:
        return False
    experts, two_i, hidden = gate_up.shape
    return two_i % 2 == 0 and down.shape == (experts, hidden, two_i // 2)
