"""Stable Diffusion single-file checkpoints (the original LDM / SGM layout) under diffusers' UNet names.

The Hub holds SD 1.x, 2.x and SDXL models in two layouts. A diffusers pipeline keeps the UNet in `unet/`
under names like `down_blocks.1.attentions.0.proj_in.weight`. A single-file checkpoint (the original
repositories' layout, and most community fine-tunes) holds the same UNet under
`model.diffusion_model.input_blocks.4.1.proj_in.weight`, beside its autoencoder (`first_stage_model.`) and
text encoders (`cond_stage_model.`, `conditioner.`). A fine-tune is published in either layout whatever
its base's was, so without one name map the two are separate families and never compared; kohya's SDXL
LoRAs name the LDM modules too (flattened: `lora_unet_input_blocks_4_1_proj_in`).

The map renumbers blocks, nothing else: the LDM UNet is a flat list of input blocks, each one resnet (`.0`)
with an optional attention (`.1`), or a downsampler (`.0.op`); then a middle block; then output blocks,
each one resnet with an optional attention and an optional upsampler (`.1.conv` or `.2.conv`). diffusers
groups the same modules into levels. A resnet's own layers are renamed (`in_layers.0` -> `norm1`, ...);
attentions keep their inner names. The level structure (layers per level, which levels hold attentions,
down- and upsamplers) is read from the names themselves, so no config is needed, and a layout that does
not parse as that structure is left alone (its names unchanged). tests/test_ldm.py checks the map against
diffusers' own converter (`convert_ldm_unet_checkpoint`) on SD- and SDXL-shaped UNets.

Only the UNet of a single-file checkpoint is compared, as only a pipeline's denoiser is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

LDM_UNET = "model.diffusion_model."
# A resnet's layers: LDM name -> diffusers name (diffusers' `update_unet_resnet_ldm_to_diffusers`).
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# Modules outside the levels: LDM prefix -> (diffusers prefix, is a resnet).
_FIXED = {"time_embed.0": ("time_embedding.linear_1", False), "time_embed.2": ("time_embedding.linear_2", False),
          "label_emb.0.0": ("add_embedding.linear_1", False), "label_emb.0.2": ("add_embedding.linear_2", False),
          "input_blocks.0.0": ("conv_in", False), "out.0": ("conv_norm_out", False), "out.2": ("conv_out", False),
          "middle_block.0": ("mid_block.resnets.0", True), "middle_block.1": ("mid_block.attentions.0", False),
          "middle_block.2": ("mid_block.resnets.1", True)}
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


@dataclass(frozen=True)
class UNetLayout:
    """The level structure both layouts share: resnets per down level (an up level has one more), and
    per level whether it holds attentions and a down- (up-) sampler."""

    per_level: int
    down: tuple[tuple[bool, bool], ...]
    up: tuple[tuple[bool, bool], ...]


Pairs = dict[str, tuple[str, bool]]  # LDM prefix -> (diffusers prefix, is a resnet)


def _pairs(layout: UNetLayout) -> Pairs:
    out = dict(_FIXED)
    i = 1  # input_blocks.0 is conv_in
    for b, (attention, sampler) in enumerate(layout.down):
        for k in range(layout.per_level):
            out[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{k}", True)
            if attention:
                out[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{k}", False)
            i += 1
        if sampler:
            out[f"input_blocks.{i}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", False)
            i += 1
    i = 0
    for b, (attention, sampler) in enumerate(layout.up):
        for k in range(layout.per_level + 1):
            out[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{k}", True)
            if attention:
                out[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{k}", False)
            i += 1
        if sampler:  # the level's last output block ends with the upsampler, after its attention if any
            out[f"output_blocks.{i - 1}.{2 if attention else 1}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", False)
    return out


def _ldm_layout(names: Iterable[str]) -> UNetLayout | None:
    """The structure of LDM UNet names (without `model.diffusion_model.`), None when they do not have it."""
    parts: dict[tuple[str, int], set[str]] = {}
    for name in names:
        m = _LDM_BLOCK.match(name)
        if m is not None:
            rest = m.group(4)
            tag = "op" if rest.startswith("op.") else "conv" if rest.startswith("conv.") else "module"
            parts.setdefault((m.group(1), int(m.group(2))), set()).add(f"{m.group(3)}.{tag}")
    inputs = [parts.get(("input_blocks", i), set()) for i in range(1, 1 + _count(parts, "input_blocks") - 1)]
    outputs = [parts.get(("output_blocks", i), set()) for i in range(_count(parts, "output_blocks"))]
    down, down_sizes, k, attention = [], [], 0, False
    for subs in inputs:
        if "0.op" in subs:
            down.append((attention, True))
            down_sizes.append(k)
            k, attention = 0, False
        elif "0.module" in subs:
            k, attention = k + 1, attention or "1.module" in subs
        else:
            return None
    down.append((attention, False))
    down_sizes.append(k)
    up, up_sizes, k, attention = [], [], 0, False
    for subs in outputs:
        if "0.module" not in subs:
            return None
        k, attention = k + 1, attention or "1.module" in subs
        if "1.conv" in subs or "2.conv" in subs:
            up.append((attention, True))
            up_sizes.append(k)
            k, attention = 0, False
    if k:
        up.append((attention, False))
        up_sizes.append(k)
    per_level = down_sizes[0]
    if not per_level or set(down_sizes) != {per_level} or set(up_sizes) != {per_level + 1} or len(up) != len(down):
        return None
    return UNetLayout(per_level, tuple(down), tuple(up))


def _count(keys: Iterable[tuple[str, int]], kind: str) -> int:
    """How many blocks (levels) of `kind` the (kind, index) keys number: 1 + the largest index."""
    return 1 + max((i for k, i in keys if k == kind), default=-1)


def _diffusers_layout(names: Iterable[str]) -> UNetLayout | None:
    """The structure of diffusers UNet names, None when they are not a UNet's."""
    seen: dict[tuple[str, int], dict[str, set[int]]] = {}
    for name in names:
        m = _DIFFUSERS_BLOCK.match(name)
        if m is not None:
            seen.setdefault((m.group(1), int(m.group(2))), {}).setdefault(m.group(3), set()).add(int(m.group(4)))
    down = [seen.get(("down_blocks", b), {}) for b in range(_count(seen, "down_blocks"))]
    up = [seen.get(("up_blocks", b), {}) for b in range(_count(seen, "up_blocks"))]
    if not down or len(up) != len(down):
        return None
    per_level = len(down[0].get("resnets", ()))
    if any(len(level.get("resnets", ())) != per_level for level in down) or \
            any(len(level.get("resnets", ())) != per_level + 1 for level in up):
        return None
    return UNetLayout(per_level, tuple(("attentions" in lv, "downsamplers" in lv) for lv in down),
                      tuple(("attentions" in lv, "upsamplers" in lv) for lv in up))


def _rename(name: str, prefixes: Pairs, inner: dict[str, str]) -> str | None:
    """`name` under the other layout's prefix (the longest that matches), its resnet layers renamed by
    `inner`; None when no prefix matches."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found = prefixes.get(".".join(parts[:cut]))
        if found is None:
            continue
        new, resnet = found
        rest = ".".join(parts[cut:])
        if resnet:
            for old_layer, new_layer in inner.items():
                if rest.startswith(old_layer + "."):
                    rest = new_layer + rest[len(old_layer):]
                    break
        return f"{new}.{rest}"
    return None


def unet_names(names: Iterable[str]) -> dict[str, str]:
    """{stored name: diffusers UNet name} of a single-file checkpoint's UNet tensors; {} when `names` are
    not a single-file SD checkpoint whose UNet parses as one (then nothing is renamed or left out)."""
    inner = {n.removeprefix(LDM_UNET): n for n in names if n.startswith(LDM_UNET)}
    layout = _ldm_layout(inner) if inner else None
    if layout is None:
        return {}
    pairs = _pairs(layout)
    return {stored: _rename(name, pairs, _RESNET) or name for name, stored in sorted(inner.items())}


def ldm_names(names: Iterable[str]) -> dict[str, str]:
    """{diffusers UNet name: its LDM name (without `model.diffusion_model.`)} for the names that have one;
    {} when `names` are not a diffusers UNet's."""
    names = sorted(names)
    layout = _diffusers_layout(names)
    if layout is None:
        return {}
    back = {new: (old, resnet) for old, (new, resnet) in _pairs(layout).items()}
    inner = {new: old for old, new in _RESNET.items()}
    out = {}
    for name in names:
        old = _rename(name, back, inner)
        if old is not None:
            out[name] = old
    return out
