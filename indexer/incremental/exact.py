"""Exact distance and direction between a new model and its nominees: the candidate edges' weights.

`mother` (indexer.lineage.methods) normalises per tree (its l2n scale is each layer's median pairwise
distance in the tree, its penalty scale the tree's mean D, its kurtosis sign fitted per tree), which
moves every edge weight whenever a tree grows. The incremental index needs a weight that depends on the
pair alone, so that an edge computed tonight is still the same edge next month; each pair is therefore
measured with `mother`'s own ingredients, made pair-local:

- Related (mother's trees, `sketches.relatedness`): the row-permutation test of the pair's shared body
  layers (heads left out), the median-based Z over the layers, related when its one-sided p-value is below
  ALPHA = 1e-6. A statistic with a known null replaces rule 2's "median relative L2 < 0.5", a constant
  that declared strangers every real fine-tune drifted past 0.5. Only related pairs become candidate
  edges.
- Regime (mother's `low_rank_layers`, per pair): the difference is *low-rank* when, over the layers that
  moved (2-D / 4-D, heads excluded), most have a numerical rank below full with a singular-value cliff
  of at least LOW_RANK_GAP after it (merged LoRA: a sum of a few LoRA updates).
- Distance: low-rank pairs (tier 0): summed rank / summed full rank, in (0, 1], plus 1e-3 x the relative
  L2 distance to break the many integer ties. Full-rank pairs (tier 1): mother's `tail` distance
  (`indexer.lineage.methods.spectral_tail_distance`, already pair-local) on the dense projections
  (`sketches.layers` selection.dense; every shared layer when a family has none): per layer, the norm of
  the difference's singular values past the top min(out, in) // 8 (the directions a fine-tuning run
  shares with same-task runs), divided by the RMS of the two models' norms of that layer; summed over
  the layers (layers too thin to have a tail are left out unless all are; then it is the L2 distance
  over that scale, which was this tier before, `l2n`). Measured (Edmonds on all related pairs, time
  penalty, no kurtosis): `l2n` 0.880 on vthr-ft / 0.944 on small-ft; `tail` see bench/RESULTS.md.
  The stored `distance` is TIER_GAP x tier + that.
- Direction (parent a -> child b), in log units on log(distance) (scale-free: a factor e^x on the
  distance, the same for close and far pairs; mother's penalty is on its tree's mean D instead):
  upload time known for both: TIME_WEIGHT x DEFAULT_PENALTY = 3.0 when the child was uploaded first (a
  factor 20, mother's time_weight 3 dominating); kurtosis then does not vote. On vthr-ft any time penalty
  from 0.3 to 10 gives 0.880; adding the kurtosis cue (paper sign +1) on top costs accuracy: 0.860 at 0.1,
  0.810 at 0.3 (small-ft: 0.944 at 0.2, 0.889 at 0.4) -- kurtosis is a coin flip on our zoo, and mother's
  per-tree |tau| weighting needs a tree, not a pair. Both times equal, or both unknown: no penalty either
  way; the edges rows orient those models' subtree from its centre (`penalty_count`). One time unknown:
  the paper's kurtosis cue, DEFAULT_PENALTY when ku(b) > ku(a) (specialisation lowers kurtosis; ku summed
  over the output projections, or over the pair's low-rank layers as mother does for LoRA).

Batching: `measure_many` takes the short lists of many arriving models at once. Each pair's result
depends on that pair alone (its layers, walked in sorted order, and its own regime counters), so the pairs
of every job are batched per layer, on CUDA when present; `measure` is the one-job case. On the CPU the
numbers are bit-identical to measuring job by job (tests/test_exact_batch.py).

Kernel (issue 14; method "gram", the default): the SVD path spent 80 % of its flops projecting both
sides of every pair for the relatedness test (two (64 x 4096) x (4096 x 128) float64 products a pair and
layer) and the rest on float32 SVDs and float64 copies. Now (sketches.gram):
- the relatedness units are per model: projected once per model and layer, and kept (`_UNITS`) while
  the array lives, so a nominee compared by many arrivals is projected once;
- one float64 Gram matrix of the difference (64 x 64 for a 7B block) and its `eigvalsh` answer both the
  rank test (singular values = square roots of its eigenvalues; `rank_gaps_of`, the same tolerance) and
  the spectral tail, where the SVD path ran a float32 SVD and a Gram of its own;
- the per-layer L2 distance is a float32 sum of squares (1e-8 of the float64 one, exact zeros kept);
- on the CPU no stack of the models' blocks is copied, buffers are reused across chunks (fresh pages
  cost as much as the arithmetic on the shared box), chunks are cache-sized and the work runs on one
  thread (CPU_THREADS).
Same decisions as the SVD path, pair by pair, on the test zoos and the bench zoos (tests/test_exact_fast.py,
bench/exact_cpu.py: 0 of 6,648 pairs differ): the Gram resolves singular values far below the rank
tolerance and more finely than the float32 SVD did (sketches.gram). Distances: tails and z agree to
1e-12, the float32 norms to 1e-7; the one larger difference is a rank: on vthr-lora-v one layer of one
pair (of 1,680) has a singular value 3.5e-6 below the tolerance (float64 SVD), which the float32 SVD
read 7e-5 too high, so its rank was 94 where the Gram (and a float64 SVD) say 93: that low-rank pair's
distance moves by 1.3e-3 relative (one rank in its summed rank fraction). The rule (numpy's tolerance
on the float32 difference) is unchanged and the new value is the more exact one, so PAIR_RULE stayed 3:
an index built with the SVD kernel holds such pairs 1/summed-full-rank off, far below the rank gaps
that separate candidates. `method="svd"` keeps the previous kernel as the reference. Speed:
bench/RESULTS.md ("The exact step on the CPU").

Two savings since (issue 14 part 4; `method="gram64"` keeps the kernel before them as their reference):
- two passes: every pair's z first (per-model units, cheap), then the spectra of the *related* pairs only
  (`_related_rows`): no edge reads an unrelated pair's regime or tail, and in a crawl a model's first
  nominees are strangers until its relatives arrive;
- the tail of a pair whose regime is decided from a float32 Gram (SINGLE_TAIL_NORMS).
Related pairs keep every decision and their distances to 1e-7 (bench/RESULTS.md, session 6). Since session 9
the index does not difference the unrelated pairs at all (`measure_many(strangers=False)`: their distances
are NaN), and a chunk's Gram matrices are read in place (sketches.gram.gram's `which`), bit for bit the same.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from errors import BadInputError, UnsupportedModelError
from indexer.lineage.methods import LOW_RANK_GAP, tail_norms, tail_start
from indexer.lineage.ties import HUB_EPOCH, at_resolution, extras_distance
from sketches.distances import (
    Device,
    _one_thread_on_cpu,
    rank_gaps,
    rank_gaps_of,
    resolve_device,
)
from sketches.experts import expert_alias
from sketches.gram import (
    filter_count,
    gram,
    singular_values,
    spectrum,
    tail_from_spectrum,
    unit_filters,
    units,
    usable_for_relatedness,
)
from sketches.layers import is_head, select_layers
from sketches.relatedness import MIN_ROWS, combine, permutation_z

logger = logging.getLogger(__name__)

# The version of the rule below (relatedness, regime, distance, direction -> weight). Stored with each
# sketch; an index built under another rule is refused (indexer.incremental.index._check_pair_rule).
# 1: session 1, full-rank tier = l2n; 2: full-rank tier = the spectral tail; 3: related by the
# permutation test, names normalised, ties to the earlier parent; 4: a conv kernel's tail is taken on its
# unit filters (sketches.gram.unit_filters), the same in batch `mother`; 5: an edge out of a quantized copy
# costs LEAF_PENALTY = 1000 (was 10: lexicographic now, as batch), and a copy's stored `relative` is judged
# with its row / column scales fitted (indexer.relations.rules.copy_relative). A rule-3 or -4 index is
# refused like any other (a family's stored rows do not say whether it has conv kernels: its tensors may
# be evicted). 6: a MoE's experts count as heads (`heads_distance`), and a model holding tensors the other
# lacks is no copy of it (`_pair`'s `identical`); both change no pair of two dense models, so a rule-5
# family is accepted when its first model has no expert (indexer.incremental.index._check_pair_rule):
# before rule 6 a MoE never joined a dense family (sketches.experts). 7: the index measures an arrival's
# nominees of the other layout kind (with experts or without) in a job of their own, and its later
# comparisons (second hop, late children) on the body layers of its first (indexer.incremental.index
# `_by_layout`, `_compared`); pairs of a family whose models all hold one body layout read as under rule 6,
# so such a rule-6 family is kept, and a rule-5 one when that layout has no expert (`_check_pair_rule`).
PAIR_RULE = 7
DENSE_COMPATIBLE_RULES = frozenset({5})


DEFAULT_PENALTY = 0.4  # log units per unit of T: the kurtosis cue, a factor 1.5 (~ mother's 0.3 x mean(D))
TIME_WEIGHT = 7.5  # units of T for "child uploaded first": 7.5 x 0.4 = 3.0 log units (module docstring)
TIE_BREAK = 1e-3
TIER_GAP = 100.0  # > any spread of log distances (1e-12 .. 1e3: 34)
FLOOR = 1e-12  # identical weights (re-uploads) have distance 0: log of the floor instead of -inf
# Exact ties (duplicates, frozen backbones: distance 0 to several candidates) go to the earliest upload
# (a "fan", indexer.lineage.ties): a weight of TIE_PER_YEAR per year of the parent's upload time since
# 2022-03-02, pair-local and far below any real gap between log distances (>= 1e-3 on the zoos).
TIE_PER_YEAR = 1e-6
# Bit-identical bodies with other heads (frozen-backbone transfer): the tier distance is
# FLOOR * (2 + HEAD_TIE_SCALE * h), h the heads' relative distance in [0, 1] (indexer.lineage.ties): a
# log weight from -27 to -20, below any real difference and above a duplicate's log(FLOOR), so that the
# candidate whose heads match best wins before upload order does (batch mother's order of tie-breaks).
HEAD_TIE_SCALE = 1000.0
# Every other tie (two candidates at one distance: a full fine-tune of a frozen-backbone child is as far
# from that child as from its base) is broken by the heads too, as batch mother does: HEAD_TIE log units
# per unit of heads distance, above the upload-order tie (at most 1e-5 over ten years) and far below
# any real gap between candidates.
HEAD_TIE = 1e-4
HEAD_PRIOR = 1e-8
COPY_TIE = 1e-8  # two byte-identical copies of one upload time: on the edge into the original (index._copy_tie)
REGIME_LAYERS = 4  # layers whose SVD decides low-rank vs full-rank; the rest only for low-rank pairs


@dataclass(frozen=True)
class ModelView:
    """What the exact step needs of one model: its selected tensors, per-layer kurtosis, upload time."""

    repo_id: str
    arrays: Mapping[str, np.ndarray]
    kurtosis: Mapping[str, float]
    norms: Mapping[str, float]
    created: float | None
    direction_layers: tuple[str, ...]
    # What names the arrays' content, for per-model work kept after the arrays are freed (the index's
    # (repo_id, revision): a nominee's arrays come back from the disk cache as new objects); None: the
    # arrays' own identity, while they live
    content: Hashable = None
    head_names: tuple[str, ...] = ()  # its head tensors, recalled with its selected ones after a restart
    head_values: int = 0  # the values they hold
    copy_rank: tuple[int, int] = (0, 0)  # indexer.crawl.ModelRead.copy_rank: orders copies of one time

    @property
    def heads(self) -> tuple[int, int]:
        """(head tensors, head values): between two centres of a subtree without upload order, the fewer and
        then the wider is the root, as batch mother's prior (indexer.lineage.methods._root_prior)."""
        return len(self.head_names), self.head_values


@dataclass(frozen=True)
class PairMeasure:
    """The exact comparison of the new model with one nominee (symmetric parts only)."""

    other: str
    relative: float  # whole-model L2 distance / RMS norm
    median_relative: float  # median per-layer ||a - b|| / sqrt(||a||^2 + ||b||^2): choose_k's statistic
    low_rank: bool
    tier_distance: float  # rank fraction (+ tie break) for tier 0, pair-scaled l2n on the dense layers for tier 1
    related: bool
    ku_new: float
    ku_other: float
    score: float = math.nan  # the relatedness test's Stouffer Z (sketches.relatedness)
    identical: bool = False  # every compared layer bit-identical (a duplicate or a frozen body)
    heads: float = 0.0  # the heads' distance (indexer.lineage.ties), 0 when neither side read heads

    @property
    def distance(self) -> float:
        return (0.0 if self.low_rank else TIER_GAP) + self.tier_distance

    @property
    def base_weight(self) -> float:
        # at 20 significant bits, as batch's tree cost: candidates nearer by a rounding tie (indexer.lineage.ties)
        return (0.0 if self.low_rank else TIER_GAP) + math.log(max(float(at_resolution(self.tier_distance)), FLOOR))


def _ku(view: ModelView, names: Sequence[str]) -> float:
    vals = [view.kurtosis.get(n, math.nan) for n in sorted(names)]
    return float(sum(v for v in vals if not math.isnan(v)))


def common_layers(a: ModelView, b: ModelView) -> tuple[str, ...]:
    return tuple(sorted(n for n in a.arrays if n in b.arrays and np.shape(a.arrays[n]) == np.shape(b.arrays[n])))


def dense_layers(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[str, ...]:
    """mother's full-FT distance layers among `names`: the dense projections, else all of `names`."""
    try:
        dense = select_layers([{n: tuple(np.shape(arrays[n])) for n in names}], scheme="shared").dense
    except UnsupportedModelError:  # no shared 2-D/4-D tensor: nothing to narrow
        dense = ()
    return dense or tuple(names)


# Device memory of one layer's step (`measure_many`'s max_bytes): half for the distinct models' tensors of
# that layer, stacked once, half for the pairs' work. A pair holds its float32 difference (4 bytes an
# element), that difference in float64 for the norm (8), the SVD's copy of the still-undecided rows (4)
# and the spectral tail's float64 copy (8): 24 bytes an element. 1 GiB: chunks of 85 pairs of a 7B-shaped
# block (64 x 4096, 1 MiB in float32) next to up to 512 stacked models.
DEFAULT_MAX_BYTES = 1 << 30
PAIR_BYTES_PER_ELEMENT = 24
# Method "gram" on the CPU: chunks of at most CPU_CHUNK_BYTES / 8 bytes an element (8 pairs of 7B blocks: 8 MiB
# of float32 differences since session 9, which converts each matrix into one reused float64 buffer instead
# of the chunk), so that a chunk stays in the 32 MiB L3 cache between the passes that read it (norm, Gram).
CPU_CHUNK_BYTES = 16 << 20
# CPU_THREADS: method "gram" runs its layer work on one thread (sketches.distances._one_thread_on_cpu). Its
# products are small (a 64 x 4096 block at a time) and on the shared 2-core box a second MKL/OpenMP thread
# made them 2-10x slower, not faster (spinning workers: one model's units 33 ms on two threads, 3.8 ms on
# one, load average 10); the SVD path's eigensolvers already ran on one thread for the same reason.
SOURCE_BYTES_PER_ELEMENT = 4  # float32

# Method "gram": the tail of a pair whose regime is already decided (`_open`) comes from a float32 Gram, half
# the flops of the float64 one and no float64 copy (0.36 against 0.89 ms a 64 x 4096 block on this box).
# The tail is a distance, not a threshold test: a float32 Gram moves its eigenvalues by at most ~sqrt(N) x
# eps32 x lambda_max (4e-6 of it for N = 4096), and the tails, sums of many eigenvalues, move far less:
# distances by 6e-11 (7B blocks) to 4e-8 (small-ft) relative against all-float64 ("gram64"), no decision
# and no order of a job's related nominees changed (bench/exact_cpu.py, bench/RESULTS.md session 6). The
# rank test keeps float64: its tolerance is 2.4e-7 of lambda_max (sketches.gram), under that rounding.
# Only where a pair's layer norm is in SINGLE_TAIL_NORMS: no square underflows (4096 x 1e-38 against
# >= 1e-16) or overflows float32.
SINGLE_TAIL_NORMS = (1e-8, 1e18)

Job = tuple[ModelView, Sequence[ModelView]]
# "gram": one Gram spectrum per (pair, layer) for the rank test and the tail, relatedness units projected
# once per model (sketches.gram), float32 tails (SINGLE_TAIL_NORMS). "gram64": every Gram in float64 (the
# kernel before the float32 tails), their reference. "svd": the previous kernel (a float32 SVD for the rank test,
# both sides projected for every pair), kept as the reference the tests and bench/exact_cpu.py compare to.
Method = Literal["gram", "gram64", "svd"]
METHODS: tuple[Method, ...] = ("gram", "gram64", "svd")


@dataclass(frozen=True)
class _Job:
    """One new model and its nominees; its pairs are rows first .. first + k of the accumulators."""

    new: ModelView
    others: tuple[ModelView, ...]
    names: tuple[str, ...]  # layers common to the new model and *all* its nominees, sorted
    columns: Mapping[str, int]  # name -> its position in `names`
    first: int  # its first pair row
    dist_first: int  # its first entry in the flat per-(pair, layer) distances: row-major (k, len(names))


@dataclass(frozen=True)
class _Sums:
    """Per-pair accumulators of one `measure_many` call (row p: the p-th pair over all jobs)."""

    layer_dist: torch.Tensor  # flat float64: each job's (k, L) L2 distances per layer, row-major
    layer_tail: torch.Tensor  # the same slots: spectral tail norms (NaN: no tail, e.g. a 1-D or thin layer)
    low: torch.Tensor
    moved: torch.Tensor
    rank_sum: torch.Tensor
    full_sum: torch.Tensor
    low_names: list[list[str]]
    layer_z: torch.Tensor  # the same slots as layer_dist: the relatedness test's z (NaN: layer not usable)
    # the same slots: the scale a conv layer's tail is divided by, the RMS of the two models' filter counts'
    # square roots (its tail is taken on unit filters, sketches.gram.unit_filters); NaN: the layer norms'
    tail_scale: torch.Tensor

    @classmethod
    def zeros(cls, pairs: int, dists: int) -> _Sums:
        return cls(torch.zeros(dists, dtype=torch.float64), torch.full((dists,), math.nan, dtype=torch.float64),
                   torch.zeros(pairs, dtype=torch.int64),
                   torch.zeros(pairs, dtype=torch.int64), torch.zeros(pairs, dtype=torch.float64),
                   torch.zeros(pairs, dtype=torch.float64), [[] for _ in range(pairs)],
                   torch.full((dists,), math.nan, dtype=torch.float64),
                   torch.full((dists,), math.nan, dtype=torch.float64))


@dataclass(frozen=True)
class _Pairs:
    """The pairs that compare one layer of one shape: accumulator rows, distance slots and both sides."""

    rows: list[int]
    slots: list[int]
    left: list[ModelView]  # the new model
    right: list[ModelView]  # the nominee


def measure(new: ModelView, others: Sequence[ModelView], *, device: Device = "auto",
            method: Method = "gram", strangers: bool = True) -> list[PairMeasure]:
    """One exact comparison per nominee, batched over the nominees per layer (torch; CUDA when asked)."""
    return measure_many([(new, others)], device=device, method=method, strangers=strangers)[0]


def measure_many(jobs: Sequence[Job], *, device: Device = "auto", max_bytes: int = DEFAULT_MAX_BYTES,
                 method: Method = "gram", strangers: bool = True) -> list[list[PairMeasure]]:
    """`measure` for many (new model, nominees) jobs at once: one list per job, the same numbers.

    Every pair is independent (its layers in sorted order, its own regime counters), so the pairs of all
    jobs are batched per layer: each distinct model's tensor is stacked once on the device and the pairs
    index into the stack, in chunks that keep one step within `max_bytes` of device memory (at least one
    pair per chunk, whatever the budget).

    `strangers=False` (method "gram"): pairs the relatedness test calls unrelated are not differenced at
    all; their distances are NaN (relative, median_relative, tier_distance) and only their test (score,
    related) and heads are measured. The index reads nothing else of an unrelated pair, and in a crawl of
    interleaved families 40 % of the pairs are strangers (bench/crawl_rate.py, 200 virtual 7B models:
    1,224 of 3,064): their differences and norms were a fifth of the exact step."""
    if max_bytes <= 0:
        raise BadInputError("max_bytes", f"must be positive, got {max_bytes}; the default is {DEFAULT_MAX_BYTES}")
    if method not in METHODS:
        raise BadInputError("method", f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    dev = resolve_device(device)
    plan = _plan(jobs)
    sums = _Sums.zeros(sum(len(j.others) for j in plan), sum(len(j.others) * len(j.names) for j in plan))
    # tails only where a job's full-rank distance reads them: on a 7B plan the dense layers are a quarter
    # of the blocks read, and a tail is an eigen-decomposition per pair and block
    dense = {n for job in plan for n in dense_layers(job.new.arrays, job.names)}
    names = sorted({n for job in plan for n in job.names})  # sorted: each pair sees its layers in order
    related = None
    if method != "svd":  # first every pair's relatedness: method "gram" takes spectra of related pairs only
        for name in names:
            for pairs in _layer_pairs(plan, name):
                _relatedness_layer(sums, name, pairs, dev=dev, max_bytes=max_bytes)
        related = _related_rows(plan, sums) if method == "gram" else None
    keep = None
    if related is not None and not strangers:
        keep = related
        sums.layer_dist[_slots(plan, ~related)] = math.nan
    for name in names:
        for pairs in _layer_pairs(plan, name, keep):
            _measure_layer(sums, name, pairs, dev=dev, max_bytes=max_bytes, tails=name in dense, method=method,
                           related=related)
    return [_job_measures(job, sums) for job in plan]


def _related_rows(plan: Sequence[_Job], sums: _Sums) -> torch.Tensor:
    """Each pair's relatedness test (as `_pair` reads it) from the per-layer z's of the first pass.

    Method "gram" measures the regime and tail of related pairs only: an unrelated pair is never a
    candidate edge (indexer.incremental.index reads `related` first: edges, casts, merges, second hop), so
    its spectra were work for nothing, and a crawl has many (a model's first nominees are strangers
    until its relatives have arrived). Such a pair keeps its distances and z; it reads full-rank (no
    moved layer counted) with the l2n tier (no tail)."""
    out = torch.zeros(sum(len(j.others) for j in plan), dtype=torch.bool)
    for job in plan:
        width = len(job.names)
        for i in range(len(job.others)):
            at = job.dist_first + i * width
            out[job.first + i] = combine(sums.layer_z[at:at + width].numpy()).related
    return out


def _plan(jobs: Sequence[Job]) -> list[_Job]:
    plan, first, dist_first = [], 0, 0
    for new, others in jobs:
        nominees = tuple(others)
        shared = set.intersection(*(set(common_layers(new, o)) for o in nominees)) if nominees else set()
        names = tuple(sorted(n for n in shared if not is_head(n)))  # heads: only to break body ties (_pair)
        plan.append(_Job(new, nominees, names, {n: i for i, n in enumerate(names)}, first, dist_first))
        first += len(nominees)
        dist_first += len(nominees) * len(names)
    return plan


def _slots(plan: Sequence[_Job], rows: torch.Tensor) -> torch.Tensor:
    """Every per-layer slot of the pair rows `rows` (a mask over all pairs)."""
    out = [job.dist_first + i * len(job.names) + c for job in plan for i in range(len(job.others))
           if rows[job.first + i] for c in range(len(job.names))]
    return torch.tensor(out, dtype=torch.int64)


def _layer_pairs(plan: Sequence[_Job], name: str, keep: torch.Tensor | None = None) -> list[_Pairs]:
    """The pairs of every job that compares `name` (of those `keep`: a mask over all pairs, None: all), one
    group per shape (jobs of other families may share a tensor name with another shape), shapes in sorted
    order; no group without a pair."""
    by_shape: dict[tuple[int, ...], _Pairs] = {}
    for job in plan:
        col, width = job.columns.get(name), len(job.names)
        if col is None:
            continue
        group = by_shape.setdefault(tuple(np.shape(job.new.arrays[name])), _Pairs([], [], [], []))
        for i, other in enumerate(job.others):
            if keep is not None and not keep[job.first + i]:
                continue
            group.rows.append(job.first + i)
            group.slots.append(job.dist_first + i * width + col)
            group.left.append(job.new)
            group.right.append(other)
    return [by_shape[shape] for shape in sorted(by_shape) if by_shape[shape].rows]


def _groups(pairs: _Pairs, name: str, *, dev: torch.device, max_bytes: int, method: Method
            ) -> Iterator[tuple[list[np.ndarray], list[ModelView], list[_Chunk]]]:
    """The layer's source groups (`_source_groups`): their models' float32 arrays, the models, and the
    chunks of pairs that keep one step within `max_bytes`."""
    shape = tuple(np.shape(pairs.left[0].arrays[name]))
    elements = max(1, math.prod(shape))
    most_sources = max(2, max_bytes // 2 // (SOURCE_BYTES_PER_ELEMENT * elements))
    per_chunk = max(1, max_bytes // 2 // (PAIR_BYTES_PER_ELEMENT * elements))
    if method != "svd" and dev.type == "cpu":  # cache-sized chunks (CPU_CHUNK_BYTES)
        per_chunk = max(1, min(per_chunk, CPU_CHUNK_BYTES // (8 * elements)))
    for lo, hi, views in _source_groups(pairs, most_sources):
        arrays = [np.asarray(v.arrays[name], dtype=np.float32) for v in views]
        where = {id(v): i for i, v in enumerate(views)}
        yield arrays, views, [_chunk(pairs, where, start, min(hi, start + per_chunk), dev)
                              for start in range(lo, hi, per_chunk)]


def _relatedness_layer(sums: _Sums, name: str, pairs: _Pairs, *, dev: torch.device, max_bytes: int) -> None:
    """The Gram kernels' first pass: each pair's z in this layer, from its models' units."""
    for arrays, views, chunks in _groups(pairs, name, dev=dev, max_bytes=max_bytes, method="gram"):
        with _one_thread_on_cpu(torch.empty(0, device=dev)):  # see CPU_THREADS
            own = _own_units(views, name, arrays, dev)
            for chunk in chunks if own is not None else ():
                sums.layer_z[chunk.slots] = permutation_z(own[chunk.left], own[chunk.right]).cpu()


def _measure_layer(sums: _Sums, name: str, pairs: _Pairs, *, dev: torch.device, max_bytes: int, tails: bool,
                   method: Method, related: torch.Tensor | None) -> None:
    for arrays, _, chunks in _groups(pairs, name, dev=dev, max_bytes=max_bytes, method=method):
        if method == "svd":
            stack = _stack(arrays, dev)
            for chunk in chunks:
                _svd_chunk(sums, name, stack, chunk, tails=tails)
            continue
        with _one_thread_on_cpu(torch.empty(0, device=dev)):  # see CPU_THREADS
            _gram_group(sums, name, arrays, chunks, dev=dev, tails=tails, single=method == "gram", related=related)


def _gram_group(sums: _Sums, name: str, arrays: Sequence[np.ndarray], chunks: Sequence[_Chunk], *,
                dev: torch.device, tails: bool, single: bool, related: torch.Tensor | None) -> None:
    """The Gram kernels' second pass on one group of models (`_source_groups`) and its chunks of pairs;
    `related`: the pairs whose spectra are measured (None: all)."""
    sources = _Sources.of(arrays, dev)
    most, shape = max(len(c.rows) for c in chunks), arrays[0].shape
    out = torch.empty((most, *shape), device=dev)  # reused by every chunk: no fresh pages to fault in
    filters = _Filters.of(sources.tensors) if tails and len(shape) == 4 else None
    for chunk in chunks:
        need = torch.ones(len(chunk.rows), dtype=torch.bool) if related is None else related[chunk.rows]
        _gram_chunk(sums, name, sources, chunk, out=out, tails=tails, single=single, filters=filters, need=need)


def _chunk(pairs: _Pairs, where: Mapping[int, int], start: int, stop: int, dev: torch.device) -> _Chunk:
    return _Chunk(torch.tensor([where[id(v)] for v in pairs.left[start:stop]], device=dev),
                  torch.tensor([where[id(v)] for v in pairs.right[start:stop]], device=dev),
                  torch.tensor(pairs.rows[start:stop]), torch.tensor(pairs.slots[start:stop]))


@dataclass(frozen=True)
class _Chunk:
    """Pairs measured together in one layer: indexes into the layer's sources, accumulator rows and slots."""

    left: torch.Tensor  # on the device
    right: torch.Tensor
    rows: torch.Tensor  # on the host
    slots: torch.Tensor

    def only(self, keep: torch.Tensor) -> _Chunk:
        """The pairs `keep` (a host mask) of this chunk."""
        on = keep.to(self.left.device)
        return _Chunk(self.left[on], self.right[on], self.rows[keep], self.slots[keep])


@dataclass(frozen=True)
class _Sources:
    """One layer of the distinct models of a group, on the device. On the CPU the models' own arrays, not
    copied (a stack copied every model's block once more per layer: 27 % of the time on the 2-core box);
    on CUDA one stacked tensor, so that a chunk's differences are two gathers, not a launch per pair."""

    tensors: list[torch.Tensor]
    stack: torch.Tensor | None

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray], dev: torch.device) -> _Sources:
        if dev.type == "cpu":
            return cls([torch.as_tensor(a) for a in arrays], None)
        stack = _stack(arrays, dev)
        return cls(list(stack.unbind()), stack)

    def differences(self, chunk: _Chunk, out: torch.Tensor) -> torch.Tensor:
        """left - right of each pair in float32 (as the SVD path took it: mother's rank convention), in the
        first rows of `out`."""
        out = out[: len(chunk.rows)]
        if self.stack is not None:
            return torch.sub(self.stack[chunk.left], self.stack[chunk.right], out=out)
        for slot, a, b in zip(out, chunk.left.tolist(), chunk.right.tolist(), strict=True):
            torch.sub(self.tensors[a], self.tensors[b], out=slot)
        return out


@dataclass(frozen=True)
class _Filters:
    """A conv layer's models as unit filters (sketches.gram.unit_filters: (out, in*kh*kw) float64 each, on
    the device) and the norm of each, sqrt(its nonzero filters): what its tail is taken on."""

    units: torch.Tensor  # (n, out, in*kh*kw)
    counts: torch.Tensor  # (n,) on the host

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> _Filters:
        stack = torch.stack([t.reshape(t.shape[0], -1) for t in tensors])
        return cls(unit_filters(stack), filter_count(stack).cpu())


def _filter_tail(sums: _Sums, filters: _Filters, chunk: _Chunk) -> None:
    """The tail of each pair's unit-filter difference in a conv layer, and the scale it is divided by (both
    kernels, "gram" and "svd", call this: conv layers are small, one eigensolve each)."""
    diff = filters.units[chunk.left] - filters.units[chunk.right]
    skip = tail_start(diff.shape[1:])
    if skip > 0:
        sums.layer_tail[chunk.slots] = tail_from_spectrum(spectrum(gram(diff)), min(diff.shape[1:]) - skip)
        # the scale: RMS of the two models' unit-filter norms (indexer.lineage.methods.spectral_tail_distance)
        left, right = filters.counts[chunk.left.cpu()], filters.counts[chunk.right.cpu()]
        sums.tail_scale[chunk.slots] = torch.sqrt((left**2 + right**2) / 2.0)


# Relatedness units per model and layer (sketches.gram.units), kept while the array they were computed
# from lives: keyed by the array's identity, dropped by a finalizer when it is freed, so an id is never
# reused for another array. The index keeps its nominees' arrays in memory between calls, so a nominee's
# units are computed once, not once per arrival that nominates it. Arrays are never modified in place
# (decoded weights). Units are 1/16 of the block they summarise (64 x 128 float64 of 64 x 4096 float32).
_UNITS: dict[tuple[int, str], torch.Tensor] = {}
# ... and by content (ModelView.content) for the index's views, least recently used out past KEPT_UNITS_BYTES:
# a crawl holds 32 7B models' arrays in memory, the rest come back from the disk cache as new arrays, and
# recomputing their units was 35 of 120 s of a 120-model virtual 7B crawl (bench/crawl_rate.py, cProfile)
KEPT_UNITS_BYTES = 512 << 20  # 256 7B models at the default read (2 MiB of units each)
_KEPT: OrderedDict[tuple[Hashable, str, tuple[int, ...], str], torch.Tensor] = OrderedDict()
_kept_bytes = 0


def forget_units() -> None:
    """Drop every cached relatedness unit (benchmarks: time the cold case)."""
    global _kept_bytes
    _UNITS.clear()
    _KEPT.clear()
    _kept_bytes = 0


def _own_units(views: Sequence[ModelView], name: str, arrays: Sequence[np.ndarray], dev: torch.device
               ) -> torch.Tensor | None:
    """(n, m, c) relatedness units of the group's models' layer `name` (`arrays`: theirs in float32),
    from the caches or computed together on `dev` (only the missing ones travel there)."""
    if not usable_for_relatedness(torch.as_tensor(arrays[0])):
        return None
    found: list[torch.Tensor | None] = [_units_of(v, name, dev) for v in views]
    missing = [i for i, u in enumerate(found) if u is None]
    if missing:
        for i, u in zip(missing, units([torch.as_tensor(arrays[i]).to(dev) for i in missing]), strict=True):
            _keep_units(views[i], name, dev, u)
            found[i] = u
    return torch.stack(found)  # type: ignore[arg-type]


def _units_of(view: ModelView, name: str, dev: torch.device) -> torch.Tensor | None:
    if view.content is None:
        return _UNITS.get((id(view.arrays[name]), str(dev)))
    hit = _KEPT.get(key := _kept_key(view, name, dev))
    if hit is not None:
        _KEPT.move_to_end(key)
    return hit


def _kept_key(view: ModelView, name: str, dev: torch.device) -> tuple[Hashable, str, tuple[int, ...], str]:
    """The shape too: `index._aligned` cuts a view's blocks to the rows every model of a job holds."""
    return view.content, name, tuple(np.shape(view.arrays[name])), str(dev)


def _keep_units(view: ModelView, name: str, dev: torch.device, u: torch.Tensor) -> None:
    global _kept_bytes
    if view.content is None:
        key = (id(view.arrays[name]), str(dev))
        _UNITS[key] = u
        weakref.finalize(view.arrays[name], _UNITS.pop, key, None)
        return
    old = _KEPT.pop(kept := _kept_key(view, name, dev), None)
    _kept_bytes += u.numel() * u.element_size() - (old.numel() * old.element_size() if old is not None else 0)
    _KEPT[kept] = u
    while _kept_bytes > KEPT_UNITS_BYTES and len(_KEPT) > 1:
        _, dropped = _KEPT.popitem(last=False)
        _kept_bytes -= dropped.numel() * dropped.element_size()


def _svd_chunk(sums: _Sums, name: str, stack: torch.Tensor, chunk: _Chunk, *, tails: bool) -> None:
    """The previous kernel (method "svd"), the reference of tests/test_exact_fast.py."""
    diff = stack[chunk.left] - stack[chunk.right]  # float32, as the weights were stored (mother's rank convention)
    sums.layer_dist[chunk.slots] = diff.reshape(diff.shape[0], -1).double().pow_(2).sum(dim=1).sqrt().cpu()
    if not is_head(name):
        _relatedness(sums, chunk.slots, stack[chunk.left], stack[chunk.right])
    if diff.ndim >= 3 and not is_head(name):
        _regime(sums, chunk.rows, name, diff)
        if tails and diff.ndim == 5:  # conv kernels: the tail of the unit filters' difference
            _filter_tail(sums, _Filters.of(list(stack.unbind())), chunk)
        elif tails:
            _tail(sums, chunk.slots, diff)


def _gram_chunk(sums: _Sums, name: str, sources: _Sources, chunk: _Chunk, *,
                out: torch.Tensor, tails: bool, single: bool, need: torch.Tensor,
                filters: _Filters | None = None) -> None:
    """The Gram kernels' second pass: the distance from the difference, and for the pairs `need`s one Gram
    spectrum answering both the rank test and the tail (sketches.gram); a conv layer's tail from a second
    spectrum, of its unit filters' difference (`filters`). `out`: a float32 buffer of at least the chunk's
    size."""
    diff = sources.differences(chunk, out)
    dist = _norms(diff.reshape(diff.shape[0], -1))
    sums.layer_dist[chunk.slots] = dist
    if diff.ndim >= 3 and need.any():
        mats = diff.reshape(diff.shape[0], diff.shape[1], -1)
        _spectra(sums, name, mats, chunk, dist=dist, tails=tails and filters is None, single=single, need=need)
    if filters is not None and need.any():
        _filter_tail(sums, filters, chunk.only(need))


def _norms(flat: torch.Tensor) -> torch.Tensor:
    """Frobenius norms of (k, n) float32 rows, float64 on the host; 0 exactly when a row is all zeros.

    Squares summed in float32 (ATen's cascade sum: 8e-9 of the float64 norm on a 64 x 4096 block, against
    1.5e-6 for `vector_norm`'s float32 path) instead of a float64 copy (a quarter of the time: the copy is
    made only for the rows that need a Gram matrix). A nonzero float32 below 4e-23 squares to 0: rows
    that read 0 and still hold a nonzero entry get their float64 norm, so "moved" stays exact."""
    sq = (flat * flat).sum(dim=1)
    dist = sq.double().sqrt().cpu()
    zero = torch.nonzero(dist == 0).flatten()
    if len(zero):
        rows = flat[zero.to(flat.device)]
        dist[zero] = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).cpu()
    return dist


def _spectra(sums: _Sums, name: str, mats: torch.Tensor, chunk: _Chunk, *, dist: torch.Tensor, tails: bool,
             single: bool, need: torch.Tensor) -> None:
    """Gram spectra of the pairs that need one (of the pairs `need`): every pair for the tail of a dense
    layer, else the pairs whose regime is still open (`_open`). `single`: the tails of pairs whose regime
    is decided from a float32 Gram (SINGLE_TAIL_NORMS)."""
    regime = _open(sums, chunk.rows, dist > 0) & need
    skip = tail_start(mats.shape[1:])
    tailed = tails and skip > 0  # thinner than TAIL_SKIP_FRACTION: no tail (`_tail`)
    keep = min(mats.shape[1:]) - skip
    quick = need & ~regime & (dist >= SINGLE_TAIL_NORMS[0]) & (dist <= SINGLE_TAIL_NORMS[1]) & (tailed and single)
    if quick.any():
        fast = torch.nonzero(quick).flatten()
        eig = spectrum(gram(mats, torch.float32, fast))
        sums.layer_tail[chunk.slots[fast]] = tail_from_spectrum(eig, keep)
    local = torch.nonzero(need & ~quick if tailed else regime).flatten()
    if len(local) == 0:
        return
    eig = spectrum(gram(mats, torch.float64, local))  # float32 differences in float64 (exact), ascending, on the host
    if tailed:
        sums.layer_tail[chunk.slots[local]] = tail_from_spectrum(eig, keep)
    decide = regime[local]
    if decide.any():
        ranks, gaps = rank_gaps_of(singular_values(eig[decide]), max(mats.shape[1:]))
        _count_regime(sums, chunk.rows[local[decide]], name, ranks, gaps, min(mats.shape[1:]))


def _open(sums: _Sums, rows: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Pairs whose regime this layer still decides: it moved, and either fewer than REGIME_LAYERS moved
    layers were seen or one of them was low-rank (a pair whose first REGIME_LAYERS moved layers are all
    full-rank is full fine-tuning: no more spectra for the regime)."""
    return moved & ((sums.moved[rows] < REGIME_LAYERS) | (sums.low[rows] > 0))


def _stack(arrays: Sequence[np.ndarray], dev: torch.device) -> torch.Tensor:
    """(n, ...) float32 on `dev`. On a GPU each array goes straight to its slot: stacking on the CPU first
    would copy every model's layer once more in host memory before the transfer."""
    if dev.type == "cpu":
        return torch.stack([torch.as_tensor(a) for a in arrays])
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.float32, device=dev)
    for slot, array in zip(out, arrays, strict=True):
        slot.copy_(torch.as_tensor(array))
    return out


def _source_groups(pairs: _Pairs, most: int) -> list[tuple[int, int, list[ModelView]]]:
    """Consecutive runs [lo, hi) of pairs whose distinct models (by identity) number at most `most`."""
    groups: list[tuple[int, int, list[ModelView]]] = []
    lo, views = 0, {}
    for p, (a, b) in enumerate(zip(pairs.left, pairs.right, strict=True)):
        fresh = {id(v): v for v in (a, b) if id(v) not in views}
        if views and len(views) + len(fresh) > most:
            groups.append((lo, p, list(views.values())))
            lo, views, fresh = p, {}, {id(v): v for v in (a, b)}
        views.update(fresh)
    groups.append((lo, len(pairs.rows), list(views.values())))
    return groups


def _relatedness(sums: _Sums, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Each pair's permutation z in this layer (sketches.relatedness), on its first MAX_ROWS rows: both
    sides' units again for every pair, as this reference kernel always did."""
    if a.ndim < 3 or a.shape[1] < MIN_ROWS:
        return
    sums.layer_z[slots] = permutation_z(units(list(a)), units(list(b))).cpu()


def _regime(sums: _Sums, rows: torch.Tensor, name: str, diff: torch.Tensor) -> None:
    """Rank and singular-value cliff of one layer's differences (pair rows `rows`), for the pairs still
    undecided (method "svd": a float32 SVD each)."""
    k = diff.shape[0]
    mats = diff.reshape(k, diff.shape[1], -1)
    nonzero = mats.reshape(k, -1).abs().amax(dim=1).cpu() > 0
    local = torch.nonzero(_open(sums, rows, nonzero)).flatten()
    if len(local) == 0:
        return
    ranks, gaps = rank_gaps(mats[local.to(mats.device)])
    _count_regime(sums, rows[local], name, ranks.cpu(), gaps.cpu(), min(mats.shape[1:]))


def _count_regime(sums: _Sums, hit: torch.Tensor, name: str, ranks: torch.Tensor, gaps: torch.Tensor,
                  full: int) -> None:
    """Add one layer's rank test to the pairs `hit` (distinct rows: the in-place adds touch each once)."""
    is_low = (ranks < full) & (gaps >= LOW_RANK_GAP)
    sums.moved[hit] += 1
    sums.low[hit] += is_low.long()
    sums.rank_sum[hit] += ranks.double()
    sums.full_sum[hit] += float(full)
    for i in hit[is_low].tolist():
        sums.low_names[i].append(name)


def _tail(sums: _Sums, slots: torch.Tensor, diff: torch.Tensor) -> None:
    """The spectral tail norm of each pair's difference in this layer (mother's `tail` distance)."""
    mats = diff.reshape(diff.shape[0], diff.shape[1], -1)
    skip = tail_start(mats.shape[1:])
    if skip > 0:  # thinner than TAIL_SKIP_FRACTION: no top directions to drop, no tail
        sums.layer_tail[slots] = tail_norms(mats.double(), min(mats.shape[1:]) - skip).cpu()


def _job_measures(job: _Job, sums: _Sums) -> list[PairMeasure]:
    if not job.others:
        return []
    dense = set(dense_layers(job.new.arrays, job.names))
    width = len(job.names)
    out = []
    for i, other in enumerate(job.others):
        at = job.dist_first + i * width
        dist = sums.layer_dist[at:at + width].numpy()
        tail = sums.layer_tail[at:at + width].numpy()
        zs = sums.layer_z[at:at + width].numpy()
        scale = sums.tail_scale[at:at + width].numpy()
        out.append(_pair(job.new, other, job.first + i, (dist, tail, zs, scale), sums, job.names, dense))
    return out


def _pair(new: ModelView, other: ModelView, i: int,
          per_layer: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
          sums: _Sums, names: Sequence[str], dense: set[str]) -> PairMeasure:
    dist, tail, zs, tail_scale = per_layer
    na = np.array([new.norms.get(n, 0.0) for n in names], dtype=np.float64)
    nb = np.array([other.norms.get(n, 0.0) for n in names], dtype=np.float64)
    rms = np.sqrt((na**2 + nb**2) / 2.0)  # the pair-local per-layer scale (module docstring)
    ratio = np.divide(dist, np.sqrt(2.0) * rms, out=np.zeros_like(dist), where=rms > 0)
    median_relative = float(np.median(ratio)) if len(names) else 1.0
    relative = float(np.sqrt((dist**2).sum()) / (math.sqrt(float((rms**2).sum())) or 1.0))
    low, moved = int(sums.low[i]), int(sums.moved[i])
    low_rank = moved > 0 and 2 * low > moved  # mother's "most moved layers are low-rank"
    if low_rank:
        tier = float(sums.rank_sum[i] / sums.full_sum[i]) + TIE_BREAK * relative
        direction = sums.low_names[i]
    else:
        keep = np.array([n in dense for n in names]) & (rms > 0)
        tailed = keep & ~np.isnan(tail)
        if tailed.any():
            scale = np.where(np.isnan(tail_scale), rms, tail_scale)  # conv layers: their unit filters' scale
            tier = float((tail[tailed] / scale[tailed]).sum())
        else:  # no layer has a tail: its whole difference (mother's `tailed or layers`)
            tier = float((dist[keep] / rms[keep]).sum())
        direction = [n for n in new.direction_layers if n in names] or list(names)
    test = combine(zs)  # sketches.relatedness: median z over the usable layers, its p-value
    score, related = test.score, test.related
    identical = bool(len(names) > 0 and not dist.any())
    heads = heads_distance(new.arrays, other.arrays)
    if identical and not low_rank:  # one body (a duplicate, or frozen-backbone transfer): the heads decide
        # and a model holding tensors the other lacks (a MoE's experts over its base's attention) is no copy
        identical = heads == 0.0 and new.arrays.keys() == other.arrays.keys()
        tier = 0.0 if identical else FLOOR * (2.0 + HEAD_TIE_SCALE * heads)
    return PairMeasure(other.repo_id, relative, median_relative, low_rank, tier, related,
                       _ku(new, direction), _ku(other, direction), score, identical, heads)


def penalty_count(ku_parent: float, ku_child: float, t_parent: float | None, t_child: float | None,
                  *, time_weight: float = TIME_WEIGHT) -> float:
    """T of the edge parent -> child, in units of the penalty (module docstring, "Direction").

    Both upload times known and different: time_weight when the child was uploaded first, else 0 (kurtosis
    does not vote: it cost 0.02-0.07 of accuracy on vthr-ft). Equal (every pre-2022-03-02 Hub repo shares
    one createdAt) or unknown: 0 both ways when the two times are alike, so the weights carry no direction
    and the forest's tree among such models is their minimum spanning tree, which the edges rows orient
    from its centre (indexer.incremental.index._shown_parents), as batch mother does. The kurtosis cue this
    replaced oriented 0.48-0.62 of the edges of wild-bert and wild-gpt2 dated so (bench/hub_epoch.py). A
    time known on one side only: 1 when kurtosis rises towards the child."""
    if t_parent is not None and t_child is not None and t_parent != t_child:
        return time_weight if t_child < t_parent else 0.0
    if t_parent == t_child:
        return 0.0
    return 1.0 if ku_child > ku_parent else 0.0


def edge_weights(pair: PairMeasure, t_new: float | None, t_other: float | None, *,
                 penalty: float = DEFAULT_PENALTY, heads_new: tuple[int, int] = (0, 0),
                 heads_other: tuple[int, int] = (0, 0)) -> tuple[tuple[float, float], tuple[float, float]]:
    """((T, weight) of other -> new, (T, weight) of new -> other). `heads_*`: each model's (head tensors,
    head values), the prior that orders an exact tie between two models of one upload time (`head_prior`)."""
    into_new = penalty_count(pair.ku_other, pair.ku_new, t_other, t_new)
    out_of_new = penalty_count(pair.ku_new, pair.ku_other, t_new, t_other)
    base = pair.base_weight + HEAD_TIE * pair.heads
    prior_in = head_prior(heads_other) if _prior_orders(t_other, t_new, heads_other, heads_new) else 0.0
    prior_out = head_prior(heads_new) if _prior_orders(t_new, t_other, heads_new, heads_other) else 0.0
    return ((into_new, base + penalty * into_new + tie_weight(t_other) + prior_in),
            (out_of_new, base + penalty * out_of_new + tie_weight(t_new) + prior_out))


def _prior_orders(t_parent: float | None, t_child: float | None, heads_parent: tuple[int, int],
                  heads_child: tuple[int, int]) -> bool:
    """Whether `head_prior` weighs an edge: upload order says nothing of the parent's rank among its ties,
    because the child shares its time or the parent's time is unknown or the Hub's legacy one (a later
    fine-tune of a pre-2022 base ties exactly between the base and its frozen-backbone transfers, all dated
    alike: batch hangs it under the body group's root, `ties.body_group_penalty`). Both with a head: a
    model whose head no name rule knows reads as headless."""
    untimed = t_parent is None or t_parent <= HUB_EPOCH
    return (t_parent == t_child or untimed) and heads_parent[0] > 0 and heads_child[0] > 0


def head_prior(heads: tuple[int, int]) -> float:
    """The weight a parent of (head tensors, head values) adds to its edges towards a model of its own upload
    time: fewer head tensors, then a wider head, is the likelier source, as batch mother's root prior says
    (indexer.lineage.methods._root_prior). Frozen-backbone transfers of one base dated alike (the Hub's
    pre-2022 repos) tie exactly on their bodies and, with heads of other shapes, on their heads too; upload
    order, which breaks that tie otherwise, says nothing then. HEAD_PRIOR a unit: far below HEAD_TIE, so a
    real difference of the heads still decides first."""
    count, values = heads
    return HEAD_PRIOR * (count + 1.0 / (1.0 + values))


def heads_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """indexer.lineage.ties' extras distance over the heads each side read (0 when neither read any), a
    MoE's experts counted as heads: a tensor one side lacks counts as wholly different, so a dense model
    is farther than a MoE from a copy of that MoE (a GGUF of a mergekit-moe holds its base's attention
    too), and two MoEs over one base differ by their experts where a plan read only the base's rows."""
    ha = {n: x for n, x in a.items() if is_head(n) or expert_alias(n)}
    hb = {n: x for n, x in b.items() if is_head(n) or expert_alias(n)}
    if not ha and not hb:
        return 0.0
    return float(extras_distance([ha, hb])[0, 1])


def tie_weight(t_parent: float | None) -> float:
    """The earliest-parent tie-break of an edge (TIE_PER_YEAR); an unknown time ranks as the Hub's epoch."""
    years = max(0.0, ((t_parent if t_parent is not None else HUB_EPOCH) - HUB_EPOCH) / (365.25 * 86400))
    return TIE_PER_YEAR * years


def decisions(pair: PairMeasure) -> tuple[bool, bool, bool, int]:
    """The discrete outcome of a pair, what a faster kernel must not change: related, low-rank tier,
    identical, and the kurtosis direction (the sign of ku_new - ku_other, `penalty_count`'s cue)."""
    return pair.related, pair.low_rank, pair.identical, int(np.sign(pair.ku_new - pair.ku_other))
