"""The three recovery methods, on the in-memory weights of one architecture family.

- `mother-paper`: MoTHer exactly as DESIGN.md states it. Layers: the square attention matrices
  (distance `linf`) or the value matrices (distance `rank`). Trees: ward linkage on the L2 distance of
  those layers (the paper's "l2 pairwise distance"), `fcluster(K, "maxclust")`, K given. Per tree: D
  (L-inf with min/max over that tree's pairwise differences, or the summed rank), ku = summed excess
  kurtosis of the output projections (FT) / value matrices (LoRA), T[i, j] = 1 when ku(j) > ku(i),
  M = D + 0.3 * mean(D) * T where mean(D) is the mean of the off-diagonal entries of D, diagonal +inf,
  then Chu-Liu/Edmonds.
- `mother` (ours): every shared tensor; K chosen from the data unless given (relatives = median
  per-layer relative distance < 0.5, trees = connected components); per tree the distance is the rank
  distance on the layers whose nearest-neighbour differences are numerically low-rank with a singular
  value cliff (merged LoRA), else the spectral-tail distance (`tail`, see `spectral_tail_distance`) on
  the dense projections; the old layer-normalised L2 (`l2n`) stays available as an ablation; the
  direction cue is upload time (weight 3); kurtosis votes only in trees without upload times (with
  `kurtosis="always"` its sign and weight come per tree from its agreement with time, Kendall's tau).
- `phylogeny`: the Neural Phylogeny baseline (KMeans with "identify along clustering"), applied top-down
  to grow a tree; see `phylogeny`'s docstring for our reading of the slides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from scipy.stats import kendalltau

from errors import RecoveryError
from indexer.lineage.cluster import related_groups, ward_labels
from indexer.lineage.confidence import calibrated, edge_margins
from indexer.lineage.mdst import minimum_arborescence
from indexer.lineage.orient import centre_rooted_tree, norm_t_votes, norm_votes
from indexer.lineage.ties import (
    SNAKE_TAU,
    at_resolution,
    body_group_penalty,
    body_groups,
    duplicate_originals,
    extras_distance,
    model_digest,
    order_preference,
    snake_score,
)
from sketches.distances import (
    DEFAULT_MAX_ELEMENTS,
    Device,
    l2_distance,
    layer_normalised_l2,
    linf_minmax_distance,
    rank_distance,
    rank_gaps,
    resolve_device,
)
from sketches.gram import filter_count, spectrum, tail_from_spectrum, unit_filters
from sketches.gram import gram as difference_grams
from sketches.layers import LayerSelection, is_head
from sketches.relatedness import Z_RELATED, relatedness_matrix
from sketches.stats import ModelStats

logger = logging.getLogger(__name__)

Method = Literal["mother-paper", "mother", "phylogeny"]
DistanceKind = Literal["auto", "linf", "rank", "l2", "l2n", "tail"]
KurtosisUse = Literal["fallback", "always", "never"]
METHODS: tuple[Method, ...] = ("mother-paper", "mother", "phylogeny")
DISTANCES: tuple[DistanceKind, ...] = ("auto", "linf", "rank", "l2", "l2n", "tail")

# A difference is low-rank (merged LoRA) when its singular values fall off a cliff after the numerical
# rank: on the zoo LoRA cliffs are 1.7e3-2.9e5, full fine-tuning ratios at the same place 1.0-7.6.
LOW_RANK_GAP = 100.0
# Models of one tree sharing one upload time are ordered by their depth from the weights, this many seconds
# a level before that time: far below the Hub's millisecond timestamps, so no other model's order moves.
SHARED_TIME_STEP = 1e-4


@dataclass(frozen=True)
class Family:
    """The models of one architecture family, ready to compare: row i of every array is model i."""

    repo_ids: tuple[str, ...]
    layers: Mapping[str, np.ndarray]  # name -> (n, *shape) float32
    selection: LayerSelection
    stats: tuple[ModelStats, ...]
    created: tuple[float | None, ...]  # upload time, seconds since the epoch (None: unknown)
    # per model, its other tensors (heads, 1-D, layers not every member has): ties and duplicates only
    extras: tuple[Mapping[str, np.ndarray], ...] = ()
    dtypes: tuple[str, ...] = ()  # per model, the stored dtype of most of its values ("F32", "BF16", ...)
    copy_rank: tuple[tuple[int, int], ...] = ()  # per model, which of byte-identical copies is the original
    declared: tuple[tuple[str, ...], ...] = ()  # per model, the base models its card declares (duplicates only)

    @property
    def n(self) -> int:
        return len(self.repo_ids)


@dataclass(frozen=True)
class Options:
    """Everything a method may be told; the defaults are `mother`'s (ablations switch parts off)."""

    method: Method = "mother"
    trees: int | None = None  # K; None = choose from the data (mother, phylogeny)
    distance: DistanceKind = "auto"  # mother-paper: linf unless told rank
    use_time: bool = True
    # Kurtosis as a direction cue: "fallback" = only in trees without known upload times (with times it
    # did not help on the zoo: FT 0.87 with vs 0.88 without, LoRA-F 1.00 both), "always", or "never".
    kurtosis: KurtosisUse = "fallback"
    auto_sign: bool = True  # kurtosis sign and weight per tree from its agreement with upload time (else +1, 1)
    # Direction of a tree with no upload time: "center" roots the undirected minimum spanning tree at its
    # centre (indexer.lineage.orient); "kurtosis" is the paper's penalty in the directed tree.
    # "center-norm": the centre moved up to one hop by the row-norm cue (an ablation, not adopted: 481/510
    # edges against the centre's 489 on the 13 zoos, bench/RESULTS.md session 12).
    orient: Literal["center", "center-norm", "kurtosis"] = "center"
    include_1d: bool = False  # compare 1-D tensors (norms, biases) too
    dense_only: bool = True  # full-FT distance on the dense projections when the family has them
    lam: float = 0.3  # the paper's lambda
    time_weight: float = 3.0  # the upload-time penalty, in units of lambda * mean(D): outvotes kurtosis
    alpha: float = 0.5  # phylogeny: probability of the mean (not the min-norm member) as centroid
    seed: int = 0
    device: Device = "auto"
    # (merge, its heaviest merge parent): set aside as leaves before any tree is drawn, like duplicates
    # (the batch recovery's second pass, indexer.lineage.recover._merges: a merge dated like its parents,
    # or undated, sits between them in the spanning tree and takes its centre)
    set_aside: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Lineage:
    """One family's answer: parent index (-1 root), tree label, D to the parent, direction score."""

    parent: tuple[int, ...]
    cluster: tuple[int, ...]
    distance: tuple[float, ...]
    direction_score: tuple[float, ...]
    notes: tuple[str, ...] = field(default=())
    relation: tuple[str, ...] = ()  # per model: "finetune" | "duplicate" | "" (root); () = not set
    confidence: tuple[float, ...] = ()  # per model: the edge's calibrated confidence (NaN: root / not set)
    edge_score: tuple[float, ...] = ()  # per model: the relatedness test's Z with its parent (NaN: root)
    margin: tuple[float, ...] = ()  # per model: the relative margin over the runner-up (NaN: root)


# --- shared pieces -------------------------------------------------------------------------------


def offdiag_mean(matrix: np.ndarray) -> float:
    n = matrix.shape[0]
    if n < 2:
        return 0.0
    return float((matrix.sum() - np.trace(matrix)) / (n * (n - 1)))


def kurtosis_penalty(ku: np.ndarray, *, sign: float = 1.0) -> np.ndarray:
    """T[i, j] = 1 when sign * ku(j) > sign * ku(i): under specialisation a child is less heavy-tailed."""
    s = sign * ku
    return (s[None, :] > s[:, None]).astype(np.float64)


def time_penalty(created: Sequence[float | None]) -> np.ndarray:
    """T[i, j] = 1 when child j was uploaded strictly before parent i (unknown or equal times: 0)."""
    n = len(created)
    out = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            ti, tj = created[i], created[j]
            if ti is not None and tj is not None and tj < ti:
                out[i, j] = 1.0
    return out


def solve_tree(dist: np.ndarray, penalty: np.ndarray, *, lam: float, tie: np.ndarray | None = None) -> list[int]:
    """MDST of M = D + lam * mean(D) * T (+ a tie-break term) with an +inf diagonal."""
    return minimum_arborescence(tree_cost(dist, penalty, lam=lam, tie=tie))


def tree_cost(dist: np.ndarray, penalty: np.ndarray, *, lam: float, tie: np.ndarray | None = None) -> np.ndarray:
    """M = D + lam * mean(D) * T, plus `tie` scaled to a millionth of the smallest positive entry of D: it
    only orders candidates whose D (at 20 significant bits, `ties.at_resolution`) and T are equal
    (indexer.lineage.ties)."""
    cost = at_resolution(dist) + lam * offdiag_mean(dist) * penalty
    if tie is not None:
        positive = dist[dist > 0]
        unit = 1e-6 * float(positive.min()) if positive.size else 1e-12
        cost = cost + unit * tie
    np.fill_diagonal(cost, np.inf)
    return cost


def _stack(family: Family, names: Sequence[str], idx: np.ndarray) -> list[np.ndarray]:
    return [family.layers[name][idx] for name in names]


def _kurtosis(family: Family, names: Sequence[str]) -> np.ndarray:
    return np.array([s.kurtosis_sum(names) for s in family.stats], dtype=np.float64)


def _assemble(
    n: int, parts: Sequence[tuple[np.ndarray, list[int], np.ndarray]]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Map per-cluster (members, local parents, local D) back to family indices."""
    parent = [-1] * n
    dist = [math.nan] * n
    for idx, local, d in parts:
        for j, p in enumerate(local):
            if p >= 0:
                parent[int(idx[j])] = int(idx[p])
                dist[int(idx[j])] = float(d[p, j])
    return tuple(parent), tuple(dist)


def _clusters(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in sorted(set(labels.tolist()))]


# --- mother-paper ----------------------------------------------------------------------------------


def mother_paper(family: Family, options: Options) -> Lineage:
    """MoTHer as the paper states it; `options.trees` (K) is required."""
    if options.trees is None:
        raise RecoveryError("mother-paper assumes the number of trees is known: pass --trees K")
    kind = "linf" if options.distance in ("auto", "linf") else options.distance
    names = family.selection.distance
    all_idx = np.arange(family.n)
    labels = ward_labels(l2_distance(_stack(family, names, all_idx), device=options.device), options.trees)
    ku = _kurtosis(family, family.selection.direction)
    parts = []
    for idx in _clusters(labels):
        d, _, cost = paper_matrices(_stack(family, names, idx), ku[idx], kind=kind, lam=options.lam, device=options.device)
        parts.append((idx, minimum_arborescence(cost), d))
    parent, dist = _assemble(family.n, parts)
    notes = (f"K={options.trees} given; distance {kind} on {len(names)} layers",)
    return Lineage(parent, tuple(int(c) for c in labels), dist, tuple(float(k) for k in ku), notes)


def paper_matrices(
    layers: list[np.ndarray], ku: np.ndarray, *, kind: DistanceKind, lam: float, device: Device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """D, T and M = D + lam * mean(D) * T (diagonal +inf) of one tree, as the paper defines them."""
    d = _distance(kind, layers, device)
    t = kurtosis_penalty(ku)
    cost = d + lam * offdiag_mean(d) * t
    np.fill_diagonal(cost, np.inf)
    return d, t, cost


def _distance(kind: DistanceKind, layers: list[np.ndarray], device: Device) -> np.ndarray:
    if kind == "rank":
        return rank_distance([_as_matrix(layer) for layer in layers], device=device)
    if kind == "l2":
        return l2_distance(layers, device=device)
    if kind == "l2n":
        return layer_normalised_l2(layers, device=device)
    if kind == "tail":
        return spectral_tail_distance(layers, device=device)
    return linf_minmax_distance(layers, device=device)


def _as_matrix(layer: np.ndarray) -> np.ndarray:
    """(n, out, in, kh, kw) conv kernels -> (n, out, in*kh*kw); 2-D layers unchanged."""
    return layer.reshape(layer.shape[0], layer.shape[1], -1)


# --- mother (ours) ---------------------------------------------------------------------------------


# The spectral-tail distance drops the top 1/8 of a layer's singular directions (16 of 128 in the zoo).
# It must skip the few directions of one run's update that same-task runs share (entropy rank 4-6 on
# vthr-ft edges) and keep as much as it can of the rest above storage rounding: on vthr-ft / small-ft
# every k from 1/8 to 3/4 gives 1.00 in float32; with the weights rounded to float16 / bfloat16, 1/8
# keeps 1.00 / 1.00 (vthr-ft) and 0.94 / 0.94 (small-ft), 1/2 falls to 0.99 / 0.94 and 0.83 / 0.94.
TAIL_SKIP_FRACTION = 8


def tail_start(layer_shape: Sequence[int]) -> int:
    """k of a layer (one model's shape, conv kernels flattened to out x in*kh*kw): min(out, in) // 8."""
    rows, cols = int(layer_shape[0]), int(np.prod(layer_shape[1:]))
    return min(rows, cols) // TAIL_SKIP_FRACTION


def spectral_tail_distance(
    layers: Sequence[np.ndarray], *, device: Device = "auto", max_elements: int = DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """D[i, j] = sum_l tail_l(W_i,l - W_j,l) / rms(||W_i,l||, ||W_j,l||): pair-local and symmetric.

    tail_l(X) = sqrt(sum_{r >= k_l} s_r(X)^2), the singular values s (descending) of the layer's difference
    viewed as a matrix (conv kernels: out x in*kh*kw) past k_l = min(out, in) // 8 (`tail_start`);
    rms(a, b) = sqrt((a^2 + b^2) / 2) of the two layer norms, so every layer votes on one scale.
    Conv kernels (4-D) are compared by their filters' directions: each output filter is divided by its
    norm first (`sketches.gram.unit_filters`: normalisation layers make a filter's scale free, and weight
    decay shrinks it in every run), and a layer's norm is then sqrt(its number of nonzero filters).

    Why: one fine-tuning run moves a dense layer by a nearly low-rank update (median entropy rank 4-6 of
    128 on vthr-ft edges), and its top directions are the task's: runs on the same task from nearby
    starts converge there, so an L2 distance puts a grandchild nearer a same-task uncle or cousin than
    its parent (the 12 FT errors of `l2n`). The difference of two models that are not parent and child
    sums the updates of every run on the path between them, each with its own directions, so its
    spectrum is wider: on vthr-ft the median of this distance is 8.4e-4 for edges, 5.4e-3 at 2 hops,
    7.4e-3 at 3, 9.5e-3 at 4 (same-task pairs alike), a 6.4x step from 1 to 2 hops where the pair-local
    L2 steps 3.4x; the nearest earlier-uploaded rival is at least 1.016x (median 1.72x) as far as the
    true parent, against as little as 0.70x (median 1.15x) with L2. Pair-local: the value of a pair
    depends on that pair alone (the incremental index can use it as is).
    Computed as the smallest eigenvalues of the float64 Gram matrix of each difference (cheaper than an
    SVD, and exact enough: a tail of 1e-3 of the top singular value is 1e-6 in squares, far above
    float64 rounding). Caveat: weights stored in 16 bits add a full-rank rounding noise to every
    difference, which the tail also sees (see TAIL_SKIP_FRACTION).
    """
    if not layers:
        raise RecoveryError("no layers to compare: select at least one shared 2-D or 4-D tensor")
    n = int(np.shape(layers[0])[0])
    dev = resolve_device(device)
    total = np.zeros((n, n), dtype=np.float64)
    left_all, right_all = np.triu_indices(n, k=1)  # row-major: deterministic
    # A layer thinner than TAIL_SKIP_FRACTION (a 128 x 4 patch embedding) has no top directions to
    # drop: its whole difference would count, and that is the convergent L2 again (all shared layers of
    # vthr-ft with it: 0.65). Such layers are left out unless no other layer is there.
    tailed = [layer for layer in layers if tail_start(np.shape(layer)[1:]) > 0]
    for layer in tailed or layers:
        mats = torch.as_tensor(_as_matrix(np.asarray(layer)))
        if np.ndim(layer) == 5:  # conv kernels: the filters' directions (sketches.gram.unit_filters)
            mats, norms = unit_filters(mats), filter_count(mats)
        else:
            norms = torch.linalg.vector_norm(mats.reshape(n, -1).to(torch.float64), dim=1)
        keep = min(mats.shape[1:]) - tail_start(mats.shape[1:])  # how many of the smallest to sum
        step = max(1, max_elements // (mats.shape[1] * mats.shape[2]))
        for start in range(0, len(left_all), step):
            left = torch.as_tensor(left_all[start : start + step])
            right = torch.as_tensor(right_all[start : start + step])
            tails = tail_norms((mats[left] - mats[right]).to(dev, torch.float64), keep).cpu()
            scale = torch.sqrt((norms[left] ** 2 + norms[right] ** 2) / 2.0)
            vals = torch.where(scale > 0, tails / scale.clamp_min(1e-300), torch.zeros_like(tails)).numpy()
            total[left.numpy(), right.numpy()] += vals
    return total + total.T


def tail_norms(diffs: torch.Tensor, keep: int) -> torch.Tensor:
    """sqrt of the sum of the `keep` smallest squared singular values of each matrix in a (p, M, N) batch:
    the float64 Gram spectrum of sketches.gram (one thread on the CPU, eigensolves on the host)."""
    return tail_from_spectrum(spectrum(difference_grams(diffs)), keep).to(diffs.device)


def low_rank_layers(layers: Mapping[str, np.ndarray], names: Sequence[str], l2: np.ndarray) -> tuple[str, ...]:
    """Layers where each model differs from its nearest neighbour by a low-rank matrix (merged LoRA).

    For each layer (2-D or 4-D, heads excluded: a softmax head's update has rank C-1 by construction),
    take the difference of every model to its nearest neighbour (L2) that moved in that layer. The layer
    is low-rank when the median numerical rank is below full rank and the median singular-value cliff
    after it is at least LOW_RANK_GAP. Layers identical across all pairs are left out: no signal.
    """
    n = l2.shape[0]
    if n < 2:
        return ()
    nearest = np.argmin(l2 + np.diag(np.full(n, np.inf)), axis=1)
    keep, moved_layers = [], 0
    for name in names:
        if layers[name].ndim < 3 or is_head(name):
            continue
        mats = _as_matrix(layers[name])
        diffs = torch.as_tensor(np.stack([mats[i] - mats[int(nearest[i])] for i in range(n)]))
        ranks, gaps = rank_gaps(diffs)
        moved = ranks > 0
        if not bool(moved.any()):
            continue
        moved_layers += 1
        full = min(mats.shape[1:])
        if float(ranks[moved].double().median()) < full and float(gaps[moved].median()) >= LOW_RANK_GAP:
            keep.append(name)
    # LoRA regime only when most moved layers are low-rank: under full fine-tuning a stray layer whose
    # update is at float32 noise level can look rank-deficient (1 of 25 layers on the tiny zoo).
    return tuple(keep) if 2 * len(keep) > moved_layers else ()


def kurtosis_trust(ku: np.ndarray, created: Sequence[float | None]) -> tuple[float, float]:
    """(sign, weight) of the kurtosis cue in one tree, from its agreement with upload time.

    Kendall's tau between upload time and kurtosis over the models with a known time: kurtosis falling
    over time (tau < 0) is specialisation (sign +1), rising is generalisation (sign -1), and the cue is
    weighted by |tau|, so a kurtosis order that does not follow time (a coin flip on our full-FT zoo:
    8 of 18 edges) stops voting. Fewer than 3 distinct times: the paper's default, (+1, 1).
    """
    known = [(t, k) for t, k in zip(created, ku, strict=True) if t is not None]
    if len({t for t, _ in known}) < 3:
        return 1.0, 1.0
    tau = float(kendalltau([t for t, _ in known], [k for _, k in known]).statistic)
    if math.isnan(tau):
        return 1.0, 0.0
    return (-1.0 if tau > 0 else 1.0), abs(tau)


def _direction(family: Family, idx: np.ndarray, ku: np.ndarray, options: Options) -> tuple[np.ndarray, str]:
    created = [family.created[int(i)] for i in idx]
    penalty = np.zeros((len(idx), len(idx)), dtype=np.float64)
    note = []
    timed = options.use_time and any(t is not None for t in created)
    if options.kurtosis == "always" or (options.kurtosis == "fallback" and not timed):
        sign, weight = kurtosis_trust(ku[idx], created) if options.use_time and options.auto_sign else (1.0, 1.0)
        penalty += weight * kurtosis_penalty(ku[idx], sign=sign)
        note.append(f"kurtosis sign {sign:+.0f} weight {weight:.2f}")
    if options.use_time:
        penalty += options.time_weight * time_penalty(created)
        note.append("upload time")
    return penalty, ", ".join(note) or "no direction cue"


def mother(family: Family, options: Options, *, score: np.ndarray | None = None) -> Lineage:
    """Our MoTHer: shared layers, trees from the relatedness test (or K given), auto rank distance,
    upload-time (else kurtosis) direction, ties broken by the heads then by upload order."""
    names = family.selection.distance
    all_idx = np.arange(family.n)
    stacked = _stack(family, names, all_idx)
    l2 = l2_distance(stacked, device=options.device)
    if score is None:
        score = body_relatedness(family)[0]
    if options.trees is None:
        choice = related_groups(score, z_related=Z_RELATED)
        labels, notes = choice.labels, [f"K={choice.k} chosen: {choice.reason}"]
    else:
        labels, notes = ward_labels(l2, options.trees), [f"K={options.trees} given (ward)"]
    parts = []
    scores = np.zeros(family.n, dtype=np.float64)
    confidence = np.full(family.n, np.nan)
    margin = np.full(family.n, np.nan)
    for c, idx in enumerate(_clusters(labels)):
        kind, layer_names = _pick_distance(family, idx, l2[np.ix_(idx, idx)], options)
        d = _distance(kind, _stack(family, layer_names, idx), options.device)
        direction = layer_names if kind == "rank" else family.selection.direction
        ku = _kurtosis(family, direction)
        scores[idx] = ku[idx]
        # one upload time shared by all (the Hub dates every pre-2022-03-02 repo 2022-03-02T23:29:04Z) orders
        # nothing: such a tree is oriented from the weights, like one without times
        untimed = not options.use_time or len({family.created[int(i)] for i in idx} - {None}) < 2
        centred = untimed and options.orient in ("center", "center-norm") and options.kurtosis != "always"
        fam = family if untimed else _shared_times_ordered(family, idx, d, options)
        penalty, why = _direction(fam, idx, ku, options)
        tie, tie_why = _ties(fam, idx, d, options)
        if centred:
            cost, local = _centre_rooted(family, idx, d, tie, options)
            why = "no upload time: rooted at the centre of the spanning tree"
        else:
            cost = tree_cost(d, penalty, lam=options.lam, tie=tie)
            local = minimum_arborescence(cost)
        parts.append((idx, local, d))
        margin[idx] = edge_margins(cost, local, score[np.ix_(idx, idx)])
        confidence[idx] = [calibrated(m, timed=not untimed) if math.isfinite(m) else math.nan for m in margin[idx]]
        notes.append(f"tree {c}: {len(idx)} models, {kind} distance on {len(layer_names)} layers, {why}, {tie_why}")
    parent, dist = _assemble(family.n, parts)
    relation = tuple(_relation(family, p, j) for j, p in enumerate(parent))
    edge_score = tuple(float(score[p, j]) if p >= 0 else math.nan for j, p in enumerate(parent))
    return Lineage(parent, tuple(int(c) for c in labels), dist, tuple(float(s) for s in scores), tuple(notes),
                   relation, tuple(float(x) for x in confidence), edge_score, tuple(float(x) for x in margin))


def _centre_rooted(family: Family, idx: np.ndarray, d: np.ndarray, tie: np.ndarray,
                   options: Options) -> tuple[np.ndarray, list[int]]:
    """(cost, local parents) of the models `idx` oriented from the weights alone (indexer.lineage.orient)."""
    cost = tree_cost(d, np.zeros_like(d), lam=options.lam, tie=tie)
    shrink = norm_votes(_row_norms(family, idx)) if options.orient == "center-norm" else None
    return cost, centre_rooted_tree(cost, [_root_prior(family, int(i)) for i in idx], shrink,
                                    lambda: norm_t_votes(_row_norms(family, idx, min_ndim=2)))


def _shared_times_ordered(family: Family, idx: np.ndarray, d: np.ndarray, options: Options) -> Family:
    """`family` with the models of `idx` that share one upload time with others of the tree ordered from
    the weights. Real families mix the two: bert-base-uncased and its 2020 fine-tunes all read the Hub's
    2022-03-02T23:29:04Z, their 2023 fine-tunes their own days. Upload order says nothing among the first,
    so they are oriented as a tree without times (`_centre_rooted` on them alone: the earliest uploads of
    a tree hold its root and are closed under parents), and each gets its depth there as a fraction of a
    millisecond before the shared time: parents before children, siblings still equal, every model of
    another time as before."""
    if options.orient not in ("center", "center-norm") or options.kurtosis == "always":
        return family  # the ablations keep the zero-penalty ties they measure
    created = list(family.created)
    times = [created[int(i)] for i in idx]
    for t in sorted({t for t in times if t is not None and times.count(t) > 1}):
        local = np.flatnonzero([x == t for x in times])
        group, sub = idx[local], d[np.ix_(local, local)]
        tie, _ = _ties(family, group, sub, replace(options, use_time=False))
        _, parent = _centre_rooted(family, group, sub, tie, options)
        depth = [_depth(parent, j) for j in range(len(group))]
        for j, i in enumerate(group):
            created[int(i)] = t - (max(depth) - depth[j]) * SHARED_TIME_STEP
    return replace(family, created=tuple(created))


def _depth(parent: Sequence[int], j: int) -> int:
    hops = 0
    while parent[j] >= 0:
        j, hops = parent[j], hops + 1
    return hops


def _relation(family: Family, parent: int, child: int) -> str:
    """"quantized" for a dtype copy (the child, stored in 16 bits, is its parent cast to that dtype,
    bit for bit, in every compared layer and every other tensor, as the incremental's `cast_dtype` asks:
    a BF16 mergekit-moe holds its base's attention cast, and experts the base lacks), "finetune" for any
    other edge, "" for a root."""
    if parent < 0:
        return ""
    if family.dtypes and is_dtype_copy(family, parent, child) and _extras_cast_equal(family, parent, child):
        return "quantized"
    return "finetune"


def is_dtype_copy(family: Family, parent: int, child: int) -> bool:
    if family.dtypes[child] not in CAST_DTYPES or family.dtypes[parent] == family.dtypes[child]:
        return False
    return casts_all([(layer[parent], layer[child]) for layer in family.layers.values()], family.dtypes[child])


def casts_all(pairs: Sequence[tuple[np.ndarray, np.ndarray]], dtype: str) -> bool:
    """Every (source, copy) tensor pair is a cast to `dtype` (`cast_equal`); for F8, where a tensor may stay
    wider, at least one is narrowed for real (else two equal files would read as a cast: a duplicate)."""
    if not all(cast_equal(a, b, dtype) for a, b in pairs):
        return False
    return dtype not in F8_DTYPES or any(
        not np.array_equal(a, b) and np.array_equal(cast_to(a, dtype), b) for a, b in pairs)


def body_relatedness(family: Family) -> tuple[np.ndarray, np.ndarray]:
    """(Z, p) of the relatedness test over the family's compared body layers (heads left out: a class
    axis is not a permutable unit, and a new head is unrelated by construction)."""
    body = [family.layers[n] for n in family.selection.distance if not is_head(n)]
    return relatedness_matrix(body or [family.layers[n] for n in family.selection.distance])


def _ties(family: Family, idx: np.ndarray, d: np.ndarray, options: Options) -> tuple[np.ndarray, str]:
    """The tie-break term of one tree: the heads' distance, then upload order (fan or snake)."""
    # heads decide (their shapes and values are what a task changes); the other tensors outside the body
    # (norms, biases, running statistics) only order what the heads leave tied
    if family.extras:
        heads = extras_distance([{n: a for n, a in family.extras[int(i)].items() if is_head(n)} for i in idx])
        rest = extras_distance([{n: a for n, a in family.extras[int(i)].items() if not is_head(n)} for i in idx])
        extras = heads + 0.1 * rest
    else:
        heads = extras = np.ones_like(d)
    created = [family.created[int(i)] if options.use_time else None for i in idx]
    tau = snake_score(d, created)
    snake = bool(tau > SNAKE_TAU)
    why = f"ties: heads then {'latest (snake' if snake else 'earliest (fan'}, tau {tau:.2f})"
    tie = extras + 0.5 * order_preference(created, snake=snake)
    groups = body_groups([{n: family.layers[n][int(i)] for n in family.selection.distance} for i in idx])
    if groups:
        sizes = [_head_size(family.extras[int(i)]) if family.extras else (0, 0) for i in idx]
        tie = tie + body_group_penalty(groups, heads, created, sizes)
        why += f", {sum(len(g) for g in groups)} models in {len(groups)} bit-identical bod{'y' if len(groups) == 1 else 'ies'}"
    return tie, why


def _row_norms(family: Family, idx: np.ndarray, *, min_ndim: int = 3) -> list[np.ndarray]:
    """Each member's row norms over the compared body layers of at least `min_ndim` dims (conv kernels by
    default, their rows the output filters; 2: every matrix too, for `orient._central_edge`)."""
    names = [n for n in family.selection.distance if not is_head(n) and family.layers[n].ndim >= min_ndim]
    return [np.concatenate([np.linalg.norm(family.layers[n][int(i)].reshape(family.layers[n].shape[1], -1), axis=1)
                            for n in names]) if names else np.zeros(0) for i in idx]


def _root_prior(family: Family, i: int) -> tuple[float, float]:
    """Sort key of a candidate root, smaller first: the fewest head tensors, then the widest head."""
    count, values = _head_size(family.extras[i]) if family.extras else (0, 0)
    return float(count), -float(values)


def _head_size(extras: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(head tensors, head values) of one model (sketches.layers.is_head)."""
    heads = [a for n, a in extras.items() if is_head(n)]
    return len(heads), int(sum(a.size for a in heads))


def _pick_distance(
    family: Family, idx: np.ndarray, l2: np.ndarray, options: Options
) -> tuple[DistanceKind, tuple[str, ...]]:
    names = family.selection.distance
    dense = (family.selection.dense or names) if options.dense_only else names
    if options.distance != "auto":
        return options.distance, (names if options.distance == "rank" else dense)
    sub = {name: family.layers[name][idx] for name in names}
    low = low_rank_layers(sub, names, l2)
    return ("rank", low) if low else ("tail", dense)


# --- phylogeny -------------------------------------------------------------------------------------


def _gram(family: Family, names: Sequence[str]) -> np.ndarray:
    n = family.n
    gram = np.zeros((n, n), dtype=np.float64)
    for name in names:
        rows = family.layers[name].reshape(n, -1).astype(np.float64)
        gram += rows @ rows.T
    return gram


def _centroid_dist(gram: np.ndarray, points: np.ndarray, centroid: tuple[str, np.ndarray]) -> np.ndarray:
    """Squared distance of each point to a centroid that is one member or the mean of members."""
    kind, members = centroid
    diag = np.diag(gram)[points]
    if kind == "member":
        m = int(members[0])
        return diag + gram[m, m] - 2.0 * gram[points, m]
    cross = gram[np.ix_(points, members)].mean(axis=1)
    return diag - 2.0 * cross + gram[np.ix_(members, members)].mean()


def kmeans_along(
    gram: np.ndarray, points: np.ndarray, k: int, *, alpha: float, rng: np.random.Generator, iters: int = 50
) -> list[np.ndarray]:
    """KMeans whose centroid update is, with probability alpha, the cluster mean, else its min-norm member."""
    norms = np.diag(gram)
    first = int(points[np.argmin(norms[points])])
    centroids: list[tuple[str, np.ndarray]] = [("member", np.array([first]))]
    while len(centroids) < k:  # k-means++ seeding, seeded
        d2 = np.min([_centroid_dist(gram, points, c) for c in centroids], axis=0).clip(min=0)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(len(points), 1 / len(points))
        centroids.append(("member", np.array([int(rng.choice(points, p=probs))])))
    assign = np.full(len(points), -1)
    for _ in range(iters):
        new = np.argmin(np.stack([_centroid_dist(gram, points, c) for c in centroids]), axis=0)
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = points[assign == c]
            if len(members) == 0:
                continue  # an empty cluster keeps its centroid
            if rng.random() < alpha:
                centroids[c] = ("mean", members)
            else:
                centroids[c] = ("member", np.array([int(members[np.argmin(norms[members])])]))
    groups = [points[assign == c] for c in range(k)]
    return sorted((g for g in groups if len(g)), key=lambda g: int(g.min()))


def _silhouette(dist: np.ndarray, groups: list[np.ndarray]) -> float:
    label = {int(p): g for g, members in enumerate(groups) for p in members}
    points = sorted(label)
    scores = []
    for p in points:
        own = [q for q in groups[label[p]] if q != p]
        if not own:
            scores.append(0.0)
            continue
        a = float(np.mean(dist[p, own]))
        b = min(float(np.mean(dist[p, g])) for i, g in enumerate(groups) if i != label[p])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def _pick_children(gram: np.ndarray, dist: np.ndarray, points: np.ndarray, options: Options, rng: np.random.Generator) -> list[np.ndarray]:
    """Groups under one parent: the k in 2..8 with the best silhouette (>= 0.25), else all direct."""
    singles = [np.array([p]) for p in points]
    if len(points) <= 2:
        return singles
    best, best_score = singles, 0.25  # below 0.25 there is no real group structure
    for k in range(2, min(8, len(points) - 1) + 1):
        groups = kmeans_along(gram, points, k, alpha=options.alpha, rng=rng)
        if len(groups) > 1:
            score = _silhouette(dist, groups)
            if score > best_score:
                best, best_score = groups, score
    return best


def phylogeny(family: Family, options: Options) -> Lineage:
    """Neural Phylogeny, recursively: clusters of (parent + descendants), parent = min-norm member.

    Our reading of the slides (one level: parent + its children per cluster; KMeans over flattened
    parameters; "identify along clustering": with probability alpha the centroid is the cluster mean,
    else the min-norm member; the parent of a cluster is its min-norm member), grown top-down: the
    family is split into K trees (given, or our K choice), each tree's min-norm member is its root, the
    rest are split again under it (k by silhouette, or all direct children when no grouping reaches
    silhouette 0.25), and so on until every model has a parent.
    """
    names = family.selection.distance
    gram = _gram(family, names)
    sq = np.diag(gram)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * gram, 0, None))
    rng = np.random.default_rng(options.seed)
    k = options.trees or related_groups(body_relatedness(family)[0], z_related=Z_RELATED).k
    parent = [-1] * family.n
    labels = np.zeros(family.n, dtype=np.int64)
    top = kmeans_along(gram, np.arange(family.n), min(k, family.n), alpha=options.alpha, rng=rng)
    for c, group in enumerate(top):
        labels[group] = c
        _grow(gram, dist, group, -1, parent, options, rng)
    dists = tuple(float(dist[p, j]) if p >= 0 else math.nan for j, p in enumerate(parent))
    notes = (f"K={k}; alpha={options.alpha}; seed={options.seed}",)
    return Lineage(tuple(parent), tuple(int(x) for x in labels), dists, tuple(float(x) for x in np.sqrt(sq)), notes)


def _grow(gram: np.ndarray, dist: np.ndarray, group: np.ndarray, above: int, parent: list[int], options: Options, rng: np.random.Generator) -> None:
    norms = np.diag(gram)
    head = int(group[np.argmin(norms[group])])
    parent[head] = above
    rest = np.array(sorted(int(p) for p in group if p != head), dtype=np.int64)
    if len(rest) == 0:
        return
    for sub in _pick_children(gram, dist, rest, options, rng):
        _grow(gram, dist, sub, head, parent, options, rng)


def recover_family(family: Family, options: Options) -> Lineage:
    """Duplicates and 16-bit casts set aside (indexer.lineage.ties, `_cast_sources`), and the merges of
    `options.set_aside`, the rest through `options.method`, then put back as `duplicate` / `quantized` /
    `merge` leaves under their sources; a single model is a root on its own."""
    if options.method != "mother":  # the baselines stay as their papers state them
        return _dispatch(family, options)
    originals = _originals(family)
    relations = ["duplicate" if o >= 0 else "" for o in originals]
    for j, source in enumerate(_cast_sources(family)):
        if source >= 0 and originals[j] < 0:
            originals[j] = originals[source] if originals[source] >= 0 else source
            relations[j] = "quantized"
    at = {rid: i for i, rid in enumerate(family.repo_ids)}
    for merge, parent in options.set_aside:
        j, source = at.get(merge, -1), at.get(parent, -1)
        if j >= 0 and source >= 0 and originals[j] < 0 and originals[source] != j:
            originals[j] = originals[source] if originals[source] >= 0 else source
            relations[j] = "merge"
    keep = np.array([i for i, o in enumerate(originals) if o < 0], dtype=np.int64)
    inner = _dispatch(subset(family, keep), options) if len(keep) < family.n else _dispatch(family, options)
    if len(keep) == family.n:
        return inner
    return _with_duplicates(family, keep, originals, inner, relations)


def _cast_sources(family: Family) -> list[int]:
    """For each model stored in 16 or 8 bits, the model it is a cast of, else -1 (`is_dtype_copy`).

    A cast is set aside as a leaf like an exact duplicate, before any tree is drawn: rounding cannot
    create information, so the wider model is the source whatever the upload times say. Without times
    the spanning tree could otherwise hang the source under its own cast (wild-gpt2 seed 1: an F16
    copy sat between its F32 source and that source's parent, 2 edges wrong). A wider model whose values
    all fit the narrower dtype (an upcast of a 16-bit model) is no source: the pair is then left to the
    tree, which sees two models at distance 0."""
    if not family.dtypes:
        return [-1] * family.n
    out = [-1] * family.n
    for j in range(family.n):
        if family.dtypes[j] not in CAST_DTYPES:
            continue
        out[j] = next((i for i in range(family.n)
                       if i != j and is_dtype_copy(family, i, j) and _extras_cast_equal(family, i, j)
                       and not _fits(family, i, family.dtypes[j])), -1)
    return out


def cast_dtype(source: Mapping[str, np.ndarray], copy: Mapping[str, np.ndarray]) -> str:
    """"F16", "BF16", "F8_E4M3" or "F8_E5M2" when `copy` holds exactly `source`'s tensors cast to that dtype, bit for bit, and
    `source` does not already fit it (an upcast is no source); else "". The incremental index's test of
    `_cast_sources` (it keeps no stored dtypes: the values tell). Tensors are compared on their common
    first rows: a crawl plans rows by item size, so an F32 source and its BF16 copy read different counts."""
    if not source or source.keys() != copy.keys():
        return ""
    pairs = [_common_rows(np.asarray(source[n]), np.asarray(copy[n])) for n in sorted(source)]
    if any(a is None for a, _ in pairs):
        return ""
    for dtype in CAST_DTYPES:
        if casts_all(pairs, dtype) and not all(
                np.array_equal(cast_to(a, dtype), a) for a, _ in pairs):
            return dtype
    return ""


F8_PROBE = (8, 4096)  # matrices, values of each: a sample no float file fits by chance (2^-8 odds a value)


def fits_f8(arrays: Mapping[str, np.ndarray]) -> bool:
    """One of the first compared matrices holds, in its first values, only values an F8 type holds exactly (not
    all zeros): the arrays may be an F8 cast, some tensors kept wider (`cast_dtype` then says whose). It only
    widens which pairs the cast test reads, so a sample does: an arrival's test costs microseconds."""
    matrices = [a for a in map(np.asarray, arrays.values()) if a.ndim == 2][: F8_PROBE[0]]
    probes = [a.reshape(-1)[: F8_PROBE[1]] for a in matrices]
    return any(np.any(p) and any(np.array_equal(cast_to(p, d), p) for d in F8_DTYPES) for p in probes)


def _common_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Both tensors cut to their common first rows; (None, None) when more than the row count differs."""
    if a.ndim != b.ndim or a.ndim == 0 or a.shape[1:] != b.shape[1:]:
        return None, None
    rows = min(a.shape[0], b.shape[0])
    return a[:rows], b[:rows]


def _fits(family: Family, i: int, dtype: str) -> bool:
    """Every compared value of model i is exactly representable in `dtype`."""
    return all(np.array_equal(cast_to(layer[i], dtype), layer[i]) for layer in family.layers.values())


# onnxruntime's (and onnxconverter-common's) float16 converter, which writes transformers.js' `_fp16` files, clips
# before it casts: 0 < |x| < 2**-24 becomes +-2**-24 (not 0 or a subnormal), |x| > 65504 becomes +-65504 (not inf)
F16_CLIP_LOW, F16_CLIP_HIGH = 2.0 ** -24, 65504.0


# values of a pair tested first: every condition of `cast_equal` holds value by value, so a pair whose first
# values fail it fails it whole, and the full casts are made only for the pairs that may be casts (a fine-tune
# pair failed 10 whole-tensor casts a direction before: 7 % of the crawl's lineage CPU, bench/crawl_rate.py)
CAST_PREFIX = 256


def cast_equal(source: np.ndarray, copy: np.ndarray, dtype: str) -> bool:
    """`copy` is `source` cast to `dtype` bit for bit; for F16 also as the ONNX float16 converter casts (clipped
    at both ends first: a handful of values a model, which would otherwise make its F16 copy a fine-tune).
    An F8 cast may keep a tensor wider (ComfyUI's fp8 files keep norms, biases and some layers in 16 bits):
    that tensor is then the source's own or its 16-bit cast (`casts_all` asks for one truly narrowed)."""
    source, copy = np.asarray(source), np.asarray(copy)
    if source.shape != copy.shape:
        return False
    if source.size > CAST_PREFIX and not _cast_equal(source.reshape(-1)[:CAST_PREFIX], copy.reshape(-1)[:CAST_PREFIX],
                                                     dtype):
        return False
    return _cast_equal(source, copy, dtype)


def _cast_equal(source: np.ndarray, copy: np.ndarray, dtype: str) -> bool:
    off = cast_to(source, dtype) != copy
    if not off.any():
        return True
    if dtype in F8_DTYPES:
        return bool(np.array_equal(source, copy) or any(cast_equal(source, copy, d) for d in ("BF16", "F16")))
    if dtype != "F16":
        return False
    s, c = source[off].astype(np.float64), copy[off].astype(np.float64)
    clipped = ((np.abs(s) < F16_CLIP_LOW) & (s != 0) & (c == np.sign(s) * F16_CLIP_LOW)) | (
        (np.abs(s) > F16_CLIP_HIGH) & (c == np.sign(s) * F16_CLIP_HIGH))
    return bool(clipped.all())


# The narrow float types a file may be a plain cast of its source in: PyTorch's `.to(dtype)`, round to nearest
# even (F8 with no scale: ComfyUI's and Kijai's `*_fp8_e4m3fn` / `*_fp8_e5m2` checkpoints)
_NARROW = {"BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CAST_DTYPES = tuple(_NARROW)
F8_DTYPES = ("F8_E4M3", "F8_E5M2")


def cast_to(values: np.ndarray, dtype: str) -> np.ndarray:
    return torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32)).to(_NARROW[dtype]).to(torch.float32).numpy()


def _extras_cast_equal(family: Family, source: int, copy: int) -> bool:
    """The tensors outside the body (heads, norms) agree too: a frozen-backbone sibling shares the
    body bit for bit, and only its head tells it from the cast's real source."""
    if not family.extras:
        return True
    a, b = family.extras[source], family.extras[copy]
    return a.keys() == b.keys() and all(
        cast_equal(a[n], b[n], family.dtypes[copy]) for n in a)


def _dispatch(family: Family, options: Options) -> Lineage:
    if family.n == 1:
        return Lineage((-1,), (0,), (math.nan,), (float(_kurtosis(family, family.selection.direction)[0]),),
                       ("one model",), ("",), (math.nan,), (math.nan,), (math.nan,))
    if options.method == "mother-paper":
        return mother_paper(family, options)
    if options.method == "phylogeny":
        return phylogeny(family, options)
    return mother(family, options)


def _originals(family: Family) -> list[int]:
    if not family.extras:
        extras: tuple[Mapping[str, np.ndarray], ...] = tuple({} for _ in range(family.n))
    else:
        extras = family.extras
    digests = [model_digest({n: family.layers[n][i] for n in family.selection.distance}, extras[i])
               for i in range(family.n)]
    return duplicate_originals(digests, family.created, family.repo_ids, family.copy_rank, family.declared)


def subset(family: Family, idx: np.ndarray) -> Family:
    """The family restricted to the models `idx` (in that order)."""
    pick = [int(i) for i in idx]
    return Family(tuple(family.repo_ids[i] for i in pick), {n: a[idx] for n, a in family.layers.items()},
                  family.selection, tuple(family.stats[i] for i in pick), tuple(family.created[i] for i in pick),
                  tuple(family.extras[i] for i in pick) if family.extras else (),
                  tuple(family.dtypes[i] for i in pick) if family.dtypes else (),
                  tuple(family.copy_rank[i] for i in pick) if family.copy_rank else (),
                  tuple(family.declared[i] for i in pick) if family.declared else ())


def _with_duplicates(family: Family, keep: np.ndarray, originals: list[int], inner: Lineage,
                     relations: Sequence[str]) -> Lineage:
    n = family.n
    at = {int(k): j for j, k in enumerate(keep)}
    parent, cluster, dist, score = [-1] * n, [0] * n, [math.nan] * n, [math.nan] * n
    relation, conf, z, margin = [""] * n, [math.nan] * n, [math.nan] * n, [math.nan] * n
    for i in range(n):
        src = at.get(i, at.get(originals[i], 0))
        cluster[i], score[i] = inner.cluster[src], inner.direction_score[src]
        if i in at:
            p = inner.parent[src]
            parent[i] = int(keep[p]) if p >= 0 else -1
            dist[i] = inner.distance[src]
            relation[i] = inner.relation[src] if inner.relation else ("finetune" if p >= 0 else "")
            conf[i] = inner.confidence[src] if inner.confidence else math.nan
            z[i] = inner.edge_score[src] if inner.edge_score else math.nan
            margin[i] = inner.margin[src] if inner.margin else math.nan
        elif relations[i] == "merge":  # its distance, confidence and merge parents: the recovery's merge step
            parent[i], relation[i] = originals[i], relations[i]
        else:
            parent[i], dist[i], relation[i], conf[i], z[i] = originals[i], 0.0, relations[i], 1.0, math.inf
            margin[i] = 1.0
    dups = n - len(keep)
    return Lineage(tuple(parent), tuple(cluster), tuple(dist), tuple(score),
                   (*inner.notes, f"{dups} exact duplicate(s), 16-bit cast(s) and merge(s) set aside as leaves"),
                   tuple(relation), tuple(conf),
                   tuple(z), tuple(margin))
