"""Read planning: which tensors, and which rows of them, to read from a model within a byte budget.

Pure: input is a model's tensor list (from its safetensors headers), output is a `ReadPlan`, then
`coalesce` turns it into as few byte ranges as it can. No network, no storage.

The plan depends only on tensor names, shapes and dtypes, never on byte offsets, so every model of an
architecture family reads the same (tensor, rows) blocks and their blocks can be compared one to one.

    1. Candidates: every body matrix (2-D or 4-D, heads and vocabulary embeddings excluded: they are
       re-drawn per task). If they all fit the budget, read them whole (small models: nothing dropped).
    2. Otherwise only the square attention matrices (MoTHer's layers; Llama-2-7B: 4 x 32 = 128 of
       4096 x 4096), or the body matrices when the model has none.
    3. Rows: each candidate gets an equal share of the budget (Llama-2-7B in BF16: 64 MiB / 128 =
       512 KiB = its first 64 rows of 4096 values) and reads its first rows, one contiguous block (rows
       are contiguous in C order). A share below `min_block_bytes` (64 KiB) is raised to it: fewer
       layers, each still large enough for its extreme values and kurtosis to mean something.
    4. Order: layers in a spread order (first, last, middle, quarters, ... over depth), the tensors of
       a layer by name; the model reads the longest prefix of that list that fits the budget.
    5. Task heads (classifier, score, fc, pooler: `sketches.layers.is_task_head`, never a vocabulary
       matrix), the first HEAD_BLOCK_BYTES of each, in the budget left over. They never enter a distance:
       they break the ties of bit-identical bodies (frozen-backbone transfer), as in batch recovery.
Models of one family and dtype read identical blocks. Blocks always start at row 0, so a relative stored in
a wider dtype (F32 next to BF16) reads a row-prefix of the same blocks: compare them on the common rows.
(bench/budget_accuracy.py: at 0.5 % of a ViT zoo, one row of every attention matrix recovered the same
edges as the full weights, where two rows of half the matrices lost one.)
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from errors import UnsupportedModelError
from sketches.layers import is_head, is_task_head, select_layers
from sketches.safetensors import TensorInfo

__all__ = ["BlockRead", "Piece", "RangeRead", "ReadPlan", "coalesce", "plan_reads", "spread_order"]

PLAN_VERSION = 2  # 2: task heads read in the budget left over (step 5)
MIN_BLOCK_BYTES = 64 * 1024
HEAD_BLOCK_BYTES = 64 * 1024  # a 16-class head of width 1,024 in F32; a 1,000-class head reads its first rows
# Coalescing: two ranges closer than this are one request. A Hub range request costs ~50 ms of latency
# (CDN), i.e. a few MB at typical bandwidth; 256 KiB of gap is always cheaper than a request, and the
# budget caps the total gap bytes anyway.
DEFAULT_GAP_BYTES = 256 * 1024
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class BlockRead:
    """Rows [rows[0], rows[1]) of one tensor (all rows: `whole`)."""

    tensor: str
    rows: tuple[int, int]
    nbytes: int
    whole: bool


@dataclass(frozen=True)
class ReadPlan:
    family: str
    budget: int
    blocks: tuple[BlockRead, ...]  # sorted by tensor name
    candidates: int  # tensors the plan chose among (step 1 or 2)
    model_bytes: int  # bytes of all tensors of the model

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def fraction(self) -> float:
        return self.nbytes / self.model_bytes if self.model_bytes else 0.0

    def summary(self) -> dict[str, object]:
        return {"version": PLAN_VERSION, "family": self.family, "budget": self.budget, "bytes": self.nbytes,
                "blocks": [[b.tensor, b.rows[0], b.rows[1]] for b in self.blocks]}


@dataclass(frozen=True)
class Piece:
    """One block inside a range read: bytes [offset, offset + nbytes) of the range's body."""

    tensor: str
    rows: tuple[int, int]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RangeRead:
    file: str
    start: int
    end: int  # exclusive
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def spread_order(n: int) -> list[int]:
    """0..n-1 as first, last, then midpoints breadth-first: any prefix is spread over the whole depth."""
    order = [0, n - 1][: min(n, 2)]
    queue = deque([(0, n - 1)])
    while queue:
        lo, hi = queue.popleft()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        queue.extend([(lo, mid), (mid, hi)])
    return order


def _layer(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def _body_matrices(tensors: Mapping[str, TensorInfo]) -> list[str]:
    return sorted(n for n, t in tensors.items() if len(t.shape) in (2, 4) and t.numel and not is_head(n))


def _candidates(tensors: Mapping[str, TensorInfo], budget: int) -> tuple[list[str], bool]:
    """(names, whole): step 1 when every body matrix fits, else step 2."""
    body = _body_matrices(tensors)
    if not body:
        raise UnsupportedModelError("weights", "no body matrix (2-D or 4-D, heads excluded) to read")
    if sum(tensors[n].nbytes for n in body) <= budget:
        return body, True
    shapes = {n: t.shape for n, t in tensors.items()}
    try:
        attention = list(select_layers([shapes], scheme="attention").distance)
    except UnsupportedModelError:
        attention = []
    return (attention or body), False


def _priority(names: list[str]) -> list[str]:
    """Step 4's order: layers spread over depth, then by name; tensors without a layer index last."""
    layers = sorted({_layer(n) for n in names if _layer(n) >= 0})
    rank = {layers[pos]: i for i, pos in enumerate(spread_order(len(layers)))}
    return sorted(names, key=lambda n: (rank.get(_layer(n), len(layers)), n))


def _rows_for(info: TensorInfo, share: int, min_block_bytes: int) -> int:
    return max(1, min(info.shape[0], max(share, min_block_bytes) // info.row_bytes))


def plan_reads(tensors: Mapping[str, TensorInfo], *, family: str, budget: int,
               min_block_bytes: int = MIN_BLOCK_BYTES) -> ReadPlan:
    """The blocks to read from a model with these tensors (see the module docstring for the steps)."""
    if budget <= 0:
        raise UnsupportedModelError("budget", f"the byte budget must be positive, got {budget}")
    model_bytes = sum(t.nbytes for t in tensors.values())
    names, whole = _candidates(tensors, budget)
    if whole:
        blocks = [BlockRead(n, (0, tensors[n].shape[0]), tensors[n].nbytes, True) for n in names]
        blocks += _head_blocks(tensors, budget - sum(b.nbytes for b in blocks))
        return ReadPlan(family, budget, tuple(sorted(blocks, key=lambda b: b.tensor)), len(names), model_bytes)
    share = budget // len(names)
    chosen, used = [], 0
    for name in _priority(names):
        info = tensors[name]
        rows = _rows_for(info, share, min_block_bytes)
        nbytes = rows * info.row_bytes
        if used + nbytes > budget:
            break  # a prefix, not a best fit: smaller budgets read a subset of the same blocks
        chosen.append(BlockRead(name, (0, rows), nbytes, rows == info.shape[0]))
        used += nbytes
    if not chosen:
        raise UnsupportedModelError(family, f"a budget of {budget} bytes cannot hold one row of any candidate tensor")
    chosen += _head_blocks(tensors, budget - used)
    return ReadPlan(family, budget, tuple(sorted(chosen, key=lambda b: b.tensor)), len(names), model_bytes)


def _head_blocks(tensors: Mapping[str, TensorInfo], left: int) -> list[BlockRead]:
    """Step 5: the first HEAD_BLOCK_BYTES of each 2-D task head, by name, while the budget lasts."""
    out = []
    for name in sorted(n for n, t in tensors.items() if len(t.shape) == 2 and t.numel and is_task_head(n)):
        info = tensors[name]
        rows = max(1, min(info.shape[0], HEAD_BLOCK_BYTES // max(info.row_bytes, 1)))
        nbytes = rows * info.row_bytes
        if nbytes > left:
            break
        out.append(BlockRead(name, (0, rows), nbytes, rows == info.shape[0]))
        left -= nbytes
    return out


def coalesce(plan: ReadPlan, where: Mapping[str, tuple[str, TensorInfo]], *, gap: int = DEFAULT_GAP_BYTES,
             limit: int | None = None) -> tuple[RangeRead, ...]:
    """Merge the plan's blocks into ranges per file: neighbours at most `gap` bytes apart become one
    request, as long as planned bytes + gap bytes stay within `limit` (default: the plan's budget)."""
    limit = plan.budget if limit is None else limit
    spans = []
    for block in plan.blocks:
        file, info = where[block.tensor]
        start = info.begin + block.rows[0] * info.row_bytes
        spans.append((file, start, start + block.nbytes, block))
    spans.sort(key=lambda s: (s[0], s[1]))
    extra = 0
    ranges: list[tuple[str, int, int, list[tuple[int, BlockRead]]]] = []
    for file, start, end, block in spans:
        last = ranges[-1] if ranges else None
        if (last is not None and last[0] == file and 0 <= start - last[2] <= gap
                and plan.nbytes + extra + (start - last[2]) <= limit):
            extra += start - last[2]
            last[3].append((start, block))
            ranges[-1] = (file, last[1], end, last[3])
        else:
            ranges.append((file, start, end, [(start, block)]))
    return tuple(
        RangeRead(file, s, e, tuple(Piece(b.tensor, b.rows, at - s, b.nbytes) for at, b in members))
        for file, s, e, members in ranges
    )
