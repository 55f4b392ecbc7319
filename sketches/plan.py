"""Read planning: which tensors, and which rows of them, to read from a model within a byte budget.

Pure: input is a model's tensor list (from its safetensors headers), output is a `ReadPlan`, then
`coalesce` turns it into as few byte ranges as it can. No network, no storage.

The plan depends only on tensor names and shapes, never on byte offsets nor dtypes: the budget counts
BF16 bytes (2 per element), so every model of an architecture family, whether stored in BF16, F16 or
F32, reads the same (tensor, rows) blocks and their blocks compare one to one (an F32 copy reads twice
the bytes).

    1. Candidates: every body matrix (2-D or 4-D, heads and vocabulary embeddings excluded: they are
       re-drawn per task). If they all fit the budget, read them whole (small models: nothing dropped).
    2. Otherwise the spec's tensors (`PlanSpec.tensors`; the default: the value matrices, Llama-2-7B:
       32 of 4096 x 4096), else the square attention matrices, else every body matrix.
    3. Rows: each candidate gets an equal share of the budget and reads its first rows, one contiguous
       block (rows are contiguous in C order). A share below the spec's smallest block is raised to it:
       fewer layers, each block tall enough to hold the update's top directions and a tail beyond them
       (default 262,144 elements = 64 rows of 4096 = 512 KiB of BF16; Llama-2-7B at 16 MiB: the first 64
       rows of all 32 value matrices; at 1 MiB: 2 of them). 3b: when not even the first block fits, the
       rows of it that do: a model is indexed on what fits (the crawl records the fraction read).
    4. Order: layers in a spread order (first, last, middle, quarters, ... over depth), the tensors of
       a layer by name; the model reads the longest prefix of that list that fits the budget.
    5. Task heads (classifier, score, fc, pooler: `sketches.layers.is_task_head`, never a vocabulary
       matrix), the first HEAD_BLOCK_ELEMENTS of each, in the budget left over. They never enter a distance:
       they break the ties of bit-identical bodies (frozen-backbone transfer), as in batch recovery.
    6. A MoE's experts (`sketches.experts`): a small block of every expert's gate matrix at the first
       layer read, beyond the budget (`_expert_blocks`).

Why value matrices in tall blocks (bench/budget_7b.py, RESULTS.md "Accuracy per byte at 7B scale"): every
kind of fine-tuning step moves them (full, merged LoRA on q/v or on every linear layer, continued
pre-training), by one of the largest updates per module; the previous plan (version 2: the first rows
of all 128 attention matrices) lost merged LoRA-qv children, because `mother` measures full fine-tuning
on the dense projections only (o_proj there), where such a child is bit-identical to its parent. The
output projections alone (o_proj + down_proj) lost them too.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from errors import UnsupportedModelError
from sketches.experts import expert_alias
from sketches.layers import is_head, is_task_head, normalise_name, select_layers
from sketches.safetensors import TensorInfo

__all__ = ["PLAN_V2", "PLAN_V3", "BlockRead", "Piece", "PlanSpec", "RangeRead", "ReadPlan", "coalesce", "layer_template", "plan_reads",
           "spread_names", "spread_order"]

# 2: task heads read in the budget left over (step 5). 3: the budget counts BF16 elements (BF16, F16 and F32
# relatives read the same rows); a budget below the smallest block reads what fits of the first tensor;
# value matrices in blocks of >= 64 rows of 4096 (PLAN_V3), chosen on virtual 7B families (issue 14).
PLAN_VERSION = 3
# The budget is counted in BF16 bytes (the Hub's dtype for large models): a plan is in elements, so BF16,
# F16 and F32 relatives read the same elements (an F32 copy at twice the bytes) and compare one to one.
PLAN_ITEMSIZE = 2
MIN_BLOCK_BYTES = 64 * 1024
HEAD_BLOCK_ELEMENTS = 16 * 1024  # a 16-class head of width 1,024; a 1,000-class head reads its first rows
EXPERT_BLOCK_ELEMENTS = 64 * 1024  # 16 rows of width 4,096 per expert (step 6)
# Output projections: the modules fine-tuning moves most (bench/update_stats.py: o / attention-output 1.2-1.7x
# and MLP-out 1.2-1.3x a model's median update, q and k 0.2-0.7x), in Llama, ViT/BERT and GPT-2 names.
OUTPUT_PROJECTIONS = r"(?:^|\.)(?:o_proj|down_proj|out_proj|c_proj|fc2|dense)\.weight$"
# Value matrices: the one module every kind of step moves, by one of the largest updates (1.25 / 1.33 /
# 0.89x the model's median, bench/update_stats.py), and MoTHer's LoRA layer (LoRA-V and -F both train it).
VALUE_PROJECTIONS = r"(?:^|\.)(?:v_proj|value)\.weight$"


@dataclass(frozen=True)
class PlanSpec:
    """Which tensors a large model is sampled from, and how: steps 2-4 of the module docstring.

    `tensors`: "attention" (the square q/k/v/o matrices), or a regular expression over tensor names;
    a model with none of them falls back to the attention matrices, then to every body matrix.
    `min_block_elements`: the smallest block; `max_blocks`: the budget is shared among at most this many
    blocks (taller blocks, fewer layers), None = among all candidates.
    """

    tensors: str = "attention"
    min_block_elements: int = MIN_BLOCK_BYTES // PLAN_ITEMSIZE
    max_blocks: int | None = None


PLAN_V2 = PlanSpec()  # version 2: first rows of every attention matrix, 64 KiB blocks at least
# version 3: the first rows of the value matrices, at least 262,144 elements (64 rows of 4096) a block
PLAN_V3 = PlanSpec(VALUE_PROJECTIONS, min_block_elements=64 * 4096)
DEFAULT_SPEC = PLAN_V3
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


def layer_template(name: str) -> str | None:
    """The name with its layer index left out (`model.layers.{}.mlp.up_proj.weight`), None without one:
    one module at every depth (a passthrough merge copies layers to other indices)."""
    return _LAYER_INDEX.sub(".{}.", name, count=1) if _LAYER_INDEX.search(name) else None


def _body_matrices(tensors: Mapping[str, TensorInfo]) -> list[str]:
    return sorted(n for n, t in tensors.items() if len(t.shape) in (2, 4) and t.numel and not is_head(n))


def _candidates(tensors: Mapping[str, TensorInfo], elements: int, spec: PlanSpec) -> tuple[list[str], bool]:
    """(names, whole): step 1 when every body matrix fits, else step 2 (the spec's tensors, falling back
    to the attention matrices, then to every body matrix, when the model has none of them)."""
    body = _body_matrices(tensors)
    if not body:
        raise UnsupportedModelError("weights", "no body matrix (2-D or 4-D, heads excluded) to read")
    if sum(tensors[n].numel for n in body) <= elements:
        return body, True
    if spec.tensors != "attention":
        pattern = re.compile(spec.tensors)
        named = [n for n in body if pattern.search(n)]
        if named:
            return named, False
    shapes = {n: t.shape for n, t in tensors.items()}
    try:
        attention = list(select_layers([shapes], scheme="attention").distance)
    except UnsupportedModelError:
        attention = []
    return (attention or body), False


def spread_names(names: Iterable[str]) -> list[str]:
    """Step 4's order: layers spread over depth, then by name; tensors without a layer index last (an
    adapter's factors are read, and a DoRA test's base rows chosen, in the same order)."""
    names = list(names)
    layers = sorted({_layer(n) for n in names if _layer(n) >= 0})
    rank = {layers[pos]: i for i, pos in enumerate(spread_order(len(layers)))}
    return sorted(names, key=lambda n: (rank.get(_layer(n), len(layers)), n))


def _row_elements(info: TensorInfo) -> int:
    return math.prod(info.shape[1:]) if info.shape else 1


def _rows_for(info: TensorInfo, share: int, min_block: int) -> int:
    return max(1, min(info.shape[0], max(share, min_block) // _row_elements(info)))


def plan_reads(tensors: Mapping[str, TensorInfo], *, family: str, budget: int, spec: PlanSpec | None = None,
               min_block_bytes: int | None = None) -> ReadPlan:
    """The blocks to read from a model with these tensors (see the module docstring for the steps).
    `min_block_bytes` (BF16 bytes) overrides the spec's minimum block, for scaled-down benchmarks."""
    if budget <= 0:
        raise UnsupportedModelError("budget", f"the byte budget must be positive, got {budget}")
    spec = spec or DEFAULT_SPEC
    if min_block_bytes is not None:
        spec = replace(spec, min_block_elements=max(1, min_block_bytes // PLAN_ITEMSIZE))
    elements = budget // PLAN_ITEMSIZE  # dtype-invariant: BF16, F16 and F32 relatives read the same elements
    model_bytes = sum(t.nbytes for t in tensors.values())
    names, whole = _candidates(tensors, elements, spec)
    if whole:
        blocks = [BlockRead(n, (0, tensors[n].shape[0]), tensors[n].nbytes, True) for n in names]
        blocks += _head_blocks(tensors, elements - sum(tensors[n].numel for n in names))
        return ReadPlan(family, budget, tuple(sorted(blocks, key=lambda b: b.tensor)), len(names), model_bytes)
    chosen, used = _body_blocks(tensors, spread_names(names), elements, spec)
    if not chosen:  # no row of a candidate fits: any body matrix whose row does (rows of 1M values, 1 MiB)
        chosen, used = _body_blocks(tensors, spread_names(_body_matrices(tensors)), elements, spec)
    if not chosen:
        raise UnsupportedModelError(family, f"a budget of {budget} bytes cannot hold one row of any candidate tensor")
    chosen += _head_blocks(tensors, elements - used) + _expert_blocks(tensors, chosen)
    return ReadPlan(family, budget, tuple(sorted(chosen, key=lambda b: b.tensor)), len(names), model_bytes)


def _expert_blocks(tensors: Mapping[str, TensorInfo], chosen: list[BlockRead]) -> list[BlockRead]:
    """Step 6: a MoE's experts, beyond the budget: the first EXPERT_BLOCK_ELEMENTS of every expert's gate
    matrix at the first layer read (Mixtral-8x7B: 8 x 128 KiB of BF16). Its dense relatives read no MLP
    row, so these compare MoEs with MoEs only: two merges over one base read the base's attention and
    would be one model bit for bit without them (`indexer.incremental.exact`: a model holding tensors
    the other lacks is no copy of it)."""
    layers = [_layer(b.tensor) for b in chosen if _layer(b.tensor) >= 0]
    if not layers:
        return []
    out = []
    for name in sorted(tensors):
        alias = expert_alias(normalise_name(name))
        if alias is None or not alias.endswith("gate_proj.weight") or _layer(name) != layers[0]:
            continue
        info = tensors[name]
        rows = max(1, min(info.shape[0], EXPERT_BLOCK_ELEMENTS // max(_row_elements(info), 1)))
        out.append(BlockRead(name, (0, rows), rows * info.row_bytes, rows == info.shape[0]))
    return out


def _body_blocks(tensors: Mapping[str, TensorInfo], names: list[str], elements: int,
                 spec: PlanSpec) -> tuple[list[BlockRead], int]:
    """Steps 3-4: (blocks, elements used). A prefix of the priority list, not a best fit, so smaller budgets
    read a subset of the same blocks; when not even the first block fits, the rows of it that do (step 3b)."""
    share = elements // min(len(names), spec.max_blocks or len(names))
    chosen, used = [], 0
    for name in names:
        info = tensors[name]
        rows = _rows_for(info, share, spec.min_block_elements)
        if used + rows * _row_elements(info) > elements:
            break
        chosen.append(BlockRead(name, (0, rows), rows * info.row_bytes, rows == info.shape[0]))
        used += rows * _row_elements(info)
    if chosen:
        return chosen, used
    for name in names:  # 3b: what fits of the first candidate whose single row does
        info = tensors[name]
        rows = min(info.shape[0], elements // _row_elements(info))
        if rows >= 1:
            return [BlockRead(name, (0, rows), rows * info.row_bytes, rows == info.shape[0])], rows * _row_elements(info)
    return [], 0


def _head_blocks(tensors: Mapping[str, TensorInfo], left: int) -> list[BlockRead]:
    """Step 5: the first HEAD_BLOCK_ELEMENTS of each 2-D task head, by name, while `left` elements last."""
    out = []
    for name in sorted(n for n, t in tensors.items() if len(t.shape) == 2 and t.numel and is_task_head(n)):
        info = tensors[name]
        rows = max(1, min(info.shape[0], HEAD_BLOCK_ELEMENTS // max(_row_elements(info), 1)))
        if rows * _row_elements(info) > left:
            break
        out.append(BlockRead(name, (0, rows), rows * info.row_bytes, rows == info.shape[0]))
        left -= rows * _row_elements(info)
    return out


def coalesce(plan: ReadPlan, where: Mapping[str, tuple[str, TensorInfo]], *, gap: int = DEFAULT_GAP_BYTES,
             limit: int | None = None) -> tuple[RangeRead, ...]:
    """Merge the plan's blocks into ranges per file: neighbours at most `gap` bytes apart become one
    request, as long as planned bytes + gap bytes stay within `limit` (default: the plan's budget)."""
    limit = max(plan.budget, plan.nbytes) if limit is None else limit  # F32 reads 2x the BF16 budget
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
