"""Exact distance and direction between a new model and its nominees: the candidate edges' weights.

`mother` (indexer.lineage.methods) normalises per tree (its penalty scale is the tree's mean D and its
kurtosis sign is fitted per tree), which moves every edge weight whenever a tree grows. The incremental
index needs a weight that depends on the pair alone, so that an edge computed tonight is still the same
edge next month; each pair is therefore measured with `mother`'s own ingredients, made pair-local:

- Regime (mother's `low_rank_layers`, per pair): the difference is *low-rank* when, over the layers that
  moved (2-D / 4-D, heads excluded), most have a numerical rank below full with a singular-value cliff
  of at least LOW_RANK_GAP after it (merged LoRA: a sum of a few LoRA updates).
- Distance: low-rank pairs (tier 0): summed rank / summed full rank, in (0, 1], plus 1e-3 x the relative
  L2 distance to break the many integer ties; full-rank pairs (tier 1): the relative L2 distance, the
  L2 distance over the RMS of the two models' norms. The stored `distance` is TIER_GAP x tier + that.
  A tier-0 edge always beats a tier-1 edge; the tier constant cancels inside a tree of one regime
  (every arborescence has n - 1 edges).
- Direction (parent a -> child b): T = [ku(b) > ku(a)] (specialisation lowers kurtosis; ku summed over
  the output projections, or over the pair's low-rank layers as mother does for LoRA) + [t_b < t_a]
  (a child is uploaded after its parent). Weight = TIER_GAP x tier + log(within-tier distance) + penalty x T.
  Why the log: mother's penalty 0.3 x mean(D) is on the tree's scale, which moves as the tree grows; a
  scale-free weight needs no scale. In log units the penalty is a factor e^penalty on the distance, the
  same for close and far pairs (a per-pair additive penalty, pen x d, vanishes on the closest pairs and
  made the tiny zoo's roots the farthest leaves). Placement by nearest parent is unchanged (log is
  monotone); mother's 0.3 x mean(D) on a parent edge of ~mean(D) / 1.5 is a factor ~1.45, log ~0.37.
- Related: tier 0, or a relative L2 distance below MIN_RELATIVE (mother's `choose_k` guard: unrelated
  models are ~sqrt(2) norms apart). Only related pairs become candidate edges.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from indexer.lineage.methods import LOW_RANK_GAP
from sketches.distances import Device, rank_gaps, resolve_device
from sketches.layers import is_head

logger = logging.getLogger(__name__)

MIN_RELATIVE = 0.5  # indexer.lineage.cluster.choose_k's min_relative
DEFAULT_PENALTY = 0.4  # log units: a factor 1.5 per unit of T (see the module docstring)
TIE_BREAK = 1e-3
TIER_GAP = 100.0  # > any spread of log distances (1e-12 .. 1e3: 34)
FLOOR = 1e-12  # identical weights (re-uploads) have distance 0: log of the floor instead of -inf
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


@dataclass(frozen=True)
class PairMeasure:
    """The exact comparison of the new model with one nominee (symmetric parts only)."""

    other: str
    relative: float  # L2 distance / RMS norm
    low_rank: bool
    tier_distance: float  # rank fraction (+ tie break) for tier 0, relative L2 for tier 1
    related: bool
    ku_new: float
    ku_other: float

    @property
    def distance(self) -> float:
        return (0.0 if self.low_rank else TIER_GAP) + self.tier_distance

    @property
    def base_weight(self) -> float:
        return (0.0 if self.low_rank else TIER_GAP) + math.log(max(self.tier_distance, FLOOR))


def _ku(view: ModelView, names: Sequence[str]) -> float:
    vals = [view.kurtosis.get(n, math.nan) for n in sorted(names)]
    return float(sum(v for v in vals if not math.isnan(v)))


def common_layers(a: ModelView, b: ModelView) -> tuple[str, ...]:
    return tuple(sorted(n for n in a.arrays if n in b.arrays and np.shape(a.arrays[n]) == np.shape(b.arrays[n])))


def measure(new: ModelView, others: Sequence[ModelView], *, device: Device = "auto") -> list[PairMeasure]:
    """One exact comparison per nominee, batched over the nominees per layer (torch; CUDA when asked)."""
    if not others:
        return []
    dev = resolve_device(device)
    names = sorted(set.intersection(*(set(common_layers(new, o)) for o in others)))
    k = len(others)
    sq = torch.zeros(k, dtype=torch.float64)
    low, moved = torch.zeros(k, dtype=torch.int64), torch.zeros(k, dtype=torch.int64)
    rank_sum, full_sum = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    low_names: list[list[str]] = [[] for _ in range(k)]
    for name in names:
        mine = torch.as_tensor(np.asarray(new.arrays[name], dtype=np.float32)).to(dev)
        theirs = torch.stack([torch.as_tensor(np.asarray(o.arrays[name], dtype=np.float32)) for o in others]).to(dev)
        diff = mine[None] - theirs  # float32, as the weights were stored (mother's rank convention)
        sq += diff.reshape(k, -1).double().pow(2).sum(dim=1).cpu()
        if diff.ndim < 3 or is_head(name):
            continue
        mats = diff.reshape(k, diff.shape[1], -1)
        nonzero = mats.reshape(k, -1).abs().amax(dim=1).cpu() > 0
        # a pair whose first REGIME_LAYERS moved layers are all full-rank is full fine-tuning: no more SVDs
        open_ = nonzero & ((moved < REGIME_LAYERS) | (low > 0))
        rows = torch.nonzero(open_).flatten()
        if len(rows) == 0:
            continue
        ranks, gaps = rank_gaps(mats[rows.to(mats.device)])
        full = min(mats.shape[1:])
        is_low = (ranks.cpu() < full) & (gaps.cpu() >= LOW_RANK_GAP)
        moved[rows] += 1
        low[rows] += is_low.long()
        rank_sum[rows] += ranks.cpu().double()
        full_sum[rows] += float(full)
        for i in rows[is_low].tolist():
            low_names[i].append(name)
    return [_pair(new, o, i, float(sq[i]), int(low[i]), int(moved[i]), float(rank_sum[i]), float(full_sum[i]),
                  low_names[i], names) for i, o in enumerate(others)]


def _pair(new: ModelView, other: ModelView, i: int, sq: float, low: int, moved: int, rank_sum: float,
          full_sum: float, low_names: list[str], names: Sequence[str]) -> PairMeasure:
    norm_new = math.sqrt(sum(new.norms.get(n, 0.0) ** 2 for n in names))
    norm_other = math.sqrt(sum(other.norms.get(n, 0.0) ** 2 for n in names))
    rms = math.sqrt((norm_new**2 + norm_other**2) / 2.0) or 1.0
    relative = math.sqrt(sq) / rms
    low_rank = moved > 0 and 2 * low > moved  # mother's "most moved layers are low-rank"
    if low_rank:
        tier = rank_sum / full_sum + TIE_BREAK * relative
        direction = low_names
    else:
        tier = relative
        direction = [n for n in new.direction_layers if n in names] or list(names)
    return PairMeasure(other.repo_id, relative, low_rank, tier, low_rank or relative < MIN_RELATIVE,
                       _ku(new, direction), _ku(other, direction))


def penalty_count(ku_parent: float, ku_child: float, t_parent: float | None, t_child: float | None,
                  *, time_weight: float = 1.0) -> float:
    """T of the edge parent -> child: kurtosis rises towards the child, and/or it was uploaded first."""
    t = 1.0 if ku_child > ku_parent else 0.0
    if t_parent is not None and t_child is not None and t_child < t_parent:
        t += time_weight
    return t


def edge_weights(pair: PairMeasure, t_new: float | None, t_other: float | None, *,
                 penalty: float = DEFAULT_PENALTY) -> tuple[tuple[float, float], tuple[float, float]]:
    """((T, weight) of other -> new, (T, weight) of new -> other)."""
    into_new = penalty_count(pair.ku_other, pair.ku_new, t_other, t_new)
    out_of_new = penalty_count(pair.ku_new, pair.ku_other, t_new, t_other)
    base = pair.base_weight
    return (into_new, base + penalty * into_new), (out_of_new, base + penalty * out_of_new)
