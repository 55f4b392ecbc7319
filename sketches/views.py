"""Tensors read as views of a stored one: a run of whole rows of a safetensors tensor is one contiguous byte
range of its file, so a fused tensor (MoE experts, FLUX's and SD3's q/k/v) splits into the tensors it fuses
without reading a byte (`sketches.experts`, `sketches.flux`, `sketches.sd3`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from errors import SafetensorsError

if TYPE_CHECKING:  # sketches.safetensors applies the views to its headers
    from sketches.safetensors import TensorInfo

K = TypeVar("K")
Parts = list[tuple[str, tuple[int, int] | None]]  # (new name, (first row, rows) or None for the whole tensor)


def row_view(info: TensorInfo, name: str, first: int, rows: int, row_shape: tuple[int, ...]) -> TensorInfo:
    """Rows [first, first + rows) of `info` seen as (-1, *row_shape): a (rows, *row_shape) tensor named
    `name` over its bytes."""
    row_bytes = math.prod(row_shape) * info.itemsize
    begin = info.begin + first * row_bytes
    return replace(info, name=name, shape=(rows, *row_shape), begin=begin, end=begin + rows * row_bytes)


def split_views(own: Mapping[str, tuple[K, TensorInfo]], parts_of: Callable[[str, int], Parts], *, prefix: str,
                kind: str) -> dict[str, tuple[K, TensorInfo]]:
    """A checkpoint in an original layout (`own`: its names without `prefix`) as the tensors `parts_of(name,
    rows)` maps each to, a part of a fused tensor as a `row_view`. A tensor that does not split (ValueError)
    is refused naming its file and stored name."""
    out: dict[str, tuple[K, TensorInfo]] = {}
    for name, (file, info) in sorted(own.items()):
        try:
            parts = parts_of(name, info.shape[0] if info.shape else 0)
        except ValueError as exc:
            raise SafetensorsError(f"{file}: {prefix}{name}", f"a {kind} tensor that does not split: {exc}") from None
        for new, part in parts:
            out[new] = (file, info if part is None else row_view(info, new, *part, info.shape[1:]))
    return out
