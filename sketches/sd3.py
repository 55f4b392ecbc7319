"""Stable Diffusion 3 / 3.5 single-file checkpoints (Stability AI's MMDiT layout) as the diffusers transformer
they convert to.

An SD3 fine-tune is published either as a diffusers pipeline (`transformer/`, names like
`transformer_blocks.0.attn.to_q.weight`, the denoiser the index reads) or as one file in the original layout
(`sd3.5_large.safetensors` and most community checkpoints: `joint_blocks.0.x_block.attn.qkv.weight`, under
`model.diffusion_model.` beside the text encoders and the autoencoder in an all-in-one file). Without a map the
two are separate families, never compared. The original fuses what diffusers splits: each attention's q, k
and v are one matrix (`attn.qkv`, rows q then k then v; SD3.5 Medium's second image attention `attn2.qkv`
alike). Each part is a run of whole rows, so each diffusers tensor is a view of the stored one over a
contiguous byte range (`sketches.views.row_view`, as `sketches.flux` splits FLUX's): nothing is copied, and a
crawl reads the rows it plans by range.

The names and splits are diffusers' own converter's (`convert_sd3_transformer_checkpoint_to_diffusers`,
checked against it in tests/test_sd3.py). Left out, as FLUX's final modulation is: the last joint block's
context modulation and `final_layer.adaLN_modulation.1`, whose halves diffusers swaps (shift, scale ->
scale, shift), no single row range. A file's text encoders and autoencoder are not read: under the
`model.diffusion_model.` prefix only the transformer is, as a pipeline is read as its denoiser.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, TypeVar

from sketches.views import split_views

if TYPE_CHECKING:  # sketches.safetensors applies the views to its headers
    from sketches.safetensors import TensorInfo

K = TypeVar("K")
PREFIX = "model.diffusion_model."
_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
_FIXED = {"pos_embed": "pos_embed.pos_embed", "x_embedder.proj": "pos_embed.proj",
          "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
          "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
          "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
          "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
          "context_embedder": "context_embedder", "final_layer.linear": "proj_out"}
# (block side, module) -> diffusers module; the context side of the last block has no output projection
# and no MLP (pre-only), and its modulation is left out (halves swapped)
_BLOCK_MODULES = {("x_block", "attn.proj"): "attn.to_out.0", ("context_block", "attn.proj"): "attn.to_add_out",
                  ("x_block", "attn2.proj"): "attn2.to_out.0",
                  ("x_block", "attn.ln_q"): "attn.norm_q", ("x_block", "attn.ln_k"): "attn.norm_k",
                  ("context_block", "attn.ln_q"): "attn.norm_added_q", ("context_block", "attn.ln_k"): "attn.norm_added_k",
                  ("x_block", "attn2.ln_q"): "attn2.norm_q", ("x_block", "attn2.ln_k"): "attn2.norm_k",
                  ("x_block", "adaLN_modulation.1"): "norm1.linear",
                  ("context_block", "adaLN_modulation.1"): "norm1_context.linear",
                  ("x_block", "mlp.fc1"): "ff.net.0.proj", ("x_block", "mlp.fc2"): "ff.net.2",
                  ("context_block", "mlp.fc1"): "ff_context.net.0.proj", ("context_block", "mlp.fc2"): "ff_context.net.2"}
_QKV = {("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
        ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)$")


def is_sd3(names: Collection[str]) -> bool:
    return _MARKER in names or PREFIX + _MARKER in names


def sd3_views(where: Mapping[str, tuple[K, TensorInfo]]) -> dict[str, tuple[K, TensorInfo]]:
    """`where` (stored name -> (file, info)) of an original-layout SD3 checkpoint as the diffusers
    transformer's tensors (module docstring); any other checkpoint as it is."""
    if not is_sd3(where):
        return dict(where)
    prefix = PREFIX if PREFIX + _MARKER in where else ""
    own = {name[len(prefix):]: entry for name, entry in where.items() if name.startswith(prefix)}
    last = max(int(m.group(1)) for n in own if (m := _BLOCK.match(n)))
    return split_views(own, lambda name, rows: sd3_parts(name, rows, last), prefix=prefix, kind="SD3")


def sd3_parts(name: str, rows: int, last: int) -> list[tuple[str, tuple[int, int] | None]]:
    """The diffusers tensors an original-layout tensor of `rows` rows holds: [(name, (first row, rows))], the
    part None for the whole tensor; [] for what is left out (module docstring). `last`: the last joint
    block's index. ValueError for a q/k/v matrix whose rows do not split in three."""
    if name == "pos_embed":
        return [("pos_embed.pos_embed", None)]
    stem, _, suffix = name.rpartition(".")
    if stem in _FIXED:
        return [(f"{_FIXED[stem]}.{suffix}", None)]
    m = _BLOCK.match(name)
    if m is None:
        return []  # final_layer.adaLN_modulation.1 (halves swapped by diffusers), and anything unknown
    i, side, module, suffix = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    target = f"transformer_blocks.{i}."
    if (side, module) in _QKV:
        if rows % 3 or not rows:
            raise ValueError(f"{side}.{module} has {rows} rows, not q, k and v of equal rows")
        third = rows // 3
        return [(f"{target}{p}.{suffix}", (k * third, third)) for k, p in enumerate(_QKV[side, module])]
    if side == "context_block" and i == last and module == "adaLN_modulation.1":
        return []  # diffusers swaps its halves (swap_scale_shift)
    mapped = _BLOCK_MODULES.get((side, module))
    return [(f"{target}{mapped}.{suffix}", None)] if mapped else []
