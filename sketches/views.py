"""Tensors read as views of a stored one: a run of whole rows of a safetensors tensor is one contiguous byte
range of its file, so a fused tensor (MoE experts, FLUX's q/k/v) splits into the tensors it fuses without
reading a byte (`sketches.experts`, `sketches.flux`)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sketches.safetensors applies the views to its headers
    from sketches.safetensors import TensorInfo


def row_view(info: TensorInfo, name: str, first: int, rows: int, row_shape: tuple[int, ...]) -> TensorInfo:
    """Rows [first, first + rows) of `info` seen as (-1, *row_shape): a (rows, *row_shape) tensor named
    `name` over its bytes."""
    row_bytes = math.prod(row_shape) * info.itemsize
    begin = info.begin + first * row_bytes
    return replace(info, name=name, shape=(rows, *row_shape), begin=begin, end=begin + rows * row_bytes)
