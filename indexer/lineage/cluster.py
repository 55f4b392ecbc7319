"""Splitting one architecture family into trees: ward clustering with K known, or K chosen from data.

Input is a symmetric (n, n) Euclidean distance matrix (the L2 distance between flattened weights, the
"l2 pairwise distance" the MoTHer paper clusters on). scipy's `linkage(condensed, method="ward")` treats
the condensed entries as Euclidean distances, which these are.

K unknown (`choose_k`): two models are relatives when their median per-layer relative L2 distance
is below 0.5 (unrelated models read ~1 in every layer, relatives ~0); the trees are the connected
components of that "related" graph (single linkage cut at 0.5). No ward gap heuristic is needed: the
scale-free ratio already separates the two populations by three orders of magnitude on the zoos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform

from errors import RecoveryError

logger = logging.getLogger(__name__)


# Median per-layer relative distance (sketches.distances.median_relative_distance): unrelated models
# read ~1 (>= 0.998 on the zoos), relatives ~0 (<= 0.002); 0.5 sits in the middle of that gap.
RELATED_BELOW = 0.5


@dataclass(frozen=True)
class KChoice:
    """The trees picked from the data and why (`reason` goes to the log and the benchmark notes)."""

    k: int
    reason: str
    labels: np.ndarray = field(compare=False)


def canonical_labels(raw: np.ndarray) -> np.ndarray:
    """Relabel clusters 0..k-1 in order of their first member (deterministic, scipy-id free)."""
    order: dict[int, int] = {}
    out = np.empty(len(raw), dtype=np.int64)
    for idx, label in enumerate(raw.tolist()):
        out[idx] = order.setdefault(int(label), len(order))
    return out


def ward_tree(dist: np.ndarray) -> np.ndarray:
    """scipy's ward linkage matrix of a square distance matrix (symmetrised by the max of both halves)."""
    sym = np.maximum(dist, dist.T).astype(np.float64)
    np.fill_diagonal(sym, 0.0)
    return linkage(squareform(sym, checks=False), method="ward")


def ward_labels(dist: np.ndarray, k: int) -> np.ndarray:
    """fcluster(linkage(ward), k, "maxclust") with canonical labels; k is clipped to [1, n]."""
    n = dist.shape[0]
    if k < 1:
        raise RecoveryError(f"the number of trees must be at least 1, got {k}")
    if n == 1 or k == 1:
        return np.zeros(n, dtype=np.int64)
    raw = fcluster(ward_tree(dist), t=min(k, n), criterion="maxclust")
    return canonical_labels(raw)


def choose_k(relative: np.ndarray, *, threshold: float = RELATED_BELOW) -> KChoice:
    """Trees = connected components of the "related" graph (relative distance below `threshold`)."""
    n = relative.shape[0]
    sym = np.maximum(relative, relative.T)
    graph = csr_matrix(sym < threshold)
    k, raw = connected_components(graph, directed=False)
    labels = canonical_labels(raw)
    off = sym[~np.eye(n, dtype=bool)]
    inside = [float(sym[np.ix_(labels == c, labels == c)].max()) for c in range(k)]
    cross = off[off >= threshold]
    reason = (f"{k} group(s) of relatives: within-tree relative distance <= {max(inside):.3f}, "
              f"between trees >= {float(cross.min()) if cross.size else float('nan'):.3f} (threshold {threshold})")
    return KChoice(k, reason, labels)


def related_groups(score: np.ndarray, *, z_related: float) -> KChoice:
    """Trees = connected components of the graph of pairs the relatedness test calls related (Z above
    `z_related`, sketches.relatedness); the reason quotes the weakest link kept and the strongest cut."""
    n = score.shape[0]
    sym = np.minimum(score, score.T)
    related = sym > z_related
    np.fill_diagonal(related, True)
    k, raw = connected_components(csr_matrix(related), directed=False)
    labels = canonical_labels(raw)
    off = ~np.eye(n, dtype=bool)
    same = labels[:, None] == labels[None, :]
    kept = sym[related & off]
    cut = sym[off & ~same]
    reason = (f"{k} group(s) of relatives by the permutation test (related: Z > {z_related:.2f}); "
              f"weakest related pair Z = {float(kept.min()) if kept.size else float('nan'):.1f}, "
              f"strongest unrelated pair Z = {float(cut.max()) if cut.size else float('nan'):.1f}")
    return KChoice(k, reason, labels)
