"""FLUX.1 single-file checkpoints (Black Forest Labs' layout) as the diffusers transformer they convert to.

A FLUX.1 fine-tune is published either as a diffusers pipeline (`transformer/`, names like
`transformer_blocks.0.attn.to_q.weight`, the denoiser the index reads) or as one file in the original
layout (`flux1-dev.safetensors` and most community checkpoints: `double_blocks.0.img_attn.qkv.weight`,
sometimes under ComfyUI's `model.diffusion_model.`). Without a map the two are separate families, never
compared. The original fuses what diffusers splits: a double block's image and text attention hold q, k
and v in one matrix (`img_attn.qkv`, rows q then k then v), a single block's `linear1` holds q, k, v and
the MLP's input rows. Each split is a run of whole rows, so each diffusers tensor is a view of the stored
one over a contiguous byte range (the way `sketches.experts` splits fused MoE experts): nothing is copied
and a crawl reads the rows it plans by range.

The names and splits are diffusers' own converter's (`convert_flux_transformer_checkpoint_to_diffusers`,
checked against it in tests/test_flux.py). The inner width comes from the shapes (a single block's
`modulation.lin` has 3 x inner rows; diffusers' converter assumes FLUX.1's 3,072), and the MLP rows of
`linear1` are what is left after q, k and v. One tensor is left out: `final_layer.adaLN_modulation.1`,
whose two halves diffusers swaps (shift, scale -> scale, shift), no single row range. A file holding other
models beside the transformer (text encoders, autoencoder) is read as its transformer alone, as a
pipeline is read as its denoiser.

kohya's FLUX LoRAs (`lora_unet_double_blocks_0_img_attn_qkv.lora_down / lora_up`) name the same original
modules: `flux_updates` puts their updates under the diffusers names, a fused module's split by rows (B's
rows per part, A shared), as diffusers' own `_convert_kohya_flux_lora_to_diffusers` does (checked against
it), so such a LoRA resolves against a diffusers pipeline base."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from sketches.views import split_views

if TYPE_CHECKING:  # sketches.safetensors applies the views to its headers
    from sketches.safetensors import TensorInfo

K = TypeVar("K")
U = TypeVar("U", bound=Any)  # sketches.adapter.LoraUpdate (imported there: adapter reads this module)
COMFY = "model.diffusion_model."
_MARKER = "double_blocks.0.img_attn.qkv.weight"
_FIXED = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
          "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
          "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
          "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
          "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
          "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
           "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
           "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
           "txt_mlp.2": "ff_context.net.2", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out"}
_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
           "linear2": "proj_out"}
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)\.(weight|bias|scale)$")


def is_bfl_flux(names: Collection[str]) -> bool:
    return _MARKER in names or COMFY + _MARKER in names


def flux_views(where: Mapping[str, tuple[K, TensorInfo]]) -> dict[str, tuple[K, TensorInfo]]:
    """`where` (stored name -> (file, info)) of an original-layout FLUX checkpoint as the diffusers
    transformer's tensors (module docstring); any other checkpoint as it is."""
    if not is_bfl_flux(where):
        return dict(where)
    prefix = COMFY if COMFY + _MARKER in where else ""
    own = {name[len(prefix):]: entry for name, entry in where.items() if name.startswith(prefix)}
    inner = flux_inner({n: info.shape for n, (_, info) in own.items()})
    return split_views(own, lambda name, rows: flux_parts(name, rows, inner), prefix=prefix, kind="FLUX")


def flux_inner(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The transformer's inner width: a single block's `modulation.lin` has 3 x inner rows."""
    rows = shapes.get("single_blocks.0.modulation.lin.weight", (0,))[0]
    return rows // 3 if rows and rows % 3 == 0 else None


def flux_parts(name: str, rows: int, inner: int | None) -> list[tuple[str, tuple[int, int] | None]]:
    """The diffusers tensors an original-layout tensor of `rows` rows holds: [(name, (first row, rows))], the
    part None when it is the whole tensor; [] for what is left out (module docstring). ValueError for a
    fused tensor whose rows do not split as FLUX's do."""
    stem, _, suffix = name.rpartition(".")
    suffix = "weight" if suffix == "scale" else suffix  # RMSNorm scales are diffusers' norm weights
    if stem in _FIXED:
        return [(f"{_FIXED[stem]}.{suffix}", None)]
    m = _BLOCK.match(name)
    if m is None:
        return []  # final_layer.adaLN_modulation.1 (halves swapped by diffusers), and anything unknown
    kind, i, module = m.group(1), m.group(2), m.group(3)
    if kind == "double":
        target = f"transformer_blocks.{i}."
        if module in _QKV:
            return _runs([f"{target}{p}.{suffix}" for p in _QKV[module]], [rows // 3] * 3, rows)
        return [(f"{target}{_DOUBLE[module]}.{suffix}", None)] if module in _DOUBLE else []
    target = f"single_transformer_blocks.{i}."
    if module == "linear1":
        if inner is None or rows <= 3 * inner:
            raise ValueError(f"linear1 has {rows} rows, not q, k, v of the inner width "
                             f"({inner or 'unknown: no single_blocks.0.modulation.lin'}) and MLP rows")
        parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return _runs([f"{target}{p}.{suffix}" for p in parts], [inner, inner, inner, rows - 3 * inner], rows)
    return [(f"{target}{_SINGLE[module]}.{suffix}", None)] if module in _SINGLE else []


def _runs(names: list[str], counts: list[int], rows: int) -> list[tuple[str, tuple[int, int] | None]]:
    """Consecutive row runs, one per name. Raises ValueError when they do not split the tensor's rows: a
    fused tensor of another shape is no FLUX tensor, and dropping it would read the model as less than it is."""
    if sum(counts) != rows or min(counts) < 1:
        raise ValueError(f"{rows} rows do not split into {', '.join(n.rsplit('.', 2)[-2] for n in names)} "
                         f"of {counts} rows")
    return [(name, (sum(counts[:k]), count)) for k, (name, count) in enumerate(zip(names, counts, strict=True))]


# kohya's FLUX LoRAs name the original modules, flattened (`lora_unet_double_blocks_0_img_attn_qkv`): the
# module keys above with `_` for `.`, and a fused q/k/v (or linear1) update is the diffusers parts' updates
# stacked by rows, each B's rows a part's with A shared (diffusers' _convert_kohya_flux_lora_to_diffusers)
_KOHYA = re.compile(r"^(double|single)_blocks_(\d+)_(.+)\.weight$")
_KOHYA_DOUBLE = {k.replace(".", "_"): v for k, v in _DOUBLE.items()}
_KOHYA_QKV = {k.replace(".", "_"): v for k, v in _QKV.items()}
_KOHYA_SINGLE = {k.replace(".", "_"): v for k, v in _SINGLE.items()}
_KOHYA_FIXED = {k.replace(".", "_") + ".weight": v + ".weight" for k, v in _FIXED.items()}
MLP_RATIO = 4  # FLUX.1: a single block's linear1 holds q, k, v and 4 x inner MLP rows


def flux_updates(updates: Mapping[str, U]) -> dict[str, U]:
    """A kohya FLUX LoRA's updates under the diffusers transformer's weight names, fused ones split by
    rows (B's rows, A shared; a DoRA magnitude by rows too); any other adapter's as they are. `updates`:
    weight name -> `sketches.adapter.LoraUpdate`."""
    if not any(_KOHYA.match(w) or w in _KOHYA_FIXED for w in updates):
        return dict(updates)
    out: dict[str, U] = {}
    for weight, update in updates.items():
        for name, part in _kohya_parts(weight, update):
            out[name] = part
    return dict(sorted(out.items()))


def _kohya_parts(weight: str, update: U) -> list[tuple[str, U]]:
    if weight in _KOHYA_FIXED:
        return [(_KOHYA_FIXED[weight], replace(update, weight=_KOHYA_FIXED[weight]))]
    m = _KOHYA.match(weight)
    if m is None:
        return [(weight, update)]
    kind, i, module = m.group(1), m.group(2), m.group(3)
    rows = update.weight_shape[0]
    if kind == "double":
        target = f"transformer_blocks.{i}."
        if module in _KOHYA_QKV and rows % 3 == 0:
            return _rows_split(update, [f"{target}{p}.weight" for p in _KOHYA_QKV[module]], [rows // 3] * 3)
        names = {k: f"{target}{v}.weight" for k, v in _KOHYA_DOUBLE.items()}
    else:
        target = f"single_transformer_blocks.{i}."
        if module == "linear1" and rows % (3 + MLP_RATIO) == 0:
            inner = rows // (3 + MLP_RATIO)
            parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            return _rows_split(update, [f"{target}{p}.weight" for p in parts], [inner, inner, inner, MLP_RATIO * inner])
        names = {k: f"{target}{v}.weight" for k, v in _KOHYA_SINGLE.items()}
    if module not in names:
        return [(weight, update)]
    return [(names[module], replace(update, weight=names[module]))]


def _rows_split(update: U, names: list[str], rows: list[int]) -> list[tuple[str, U]]:
    out, first = [], 0
    for name, count in zip(names, rows, strict=True):
        magnitude = update.magnitude[first:first + count] if update.magnitude is not None else None
        out.append((name, replace(update, weight=name, b=update.b[first:first + count],
                                  weight_shape=(count, *update.weight_shape[1:]), magnitude=magnitude)))
        first += count
    return out
