"""Ties the distance cannot break: exact duplicates, bit-identical bodies, equally close candidates.

- Duplicates: models whose tensors (normalised names, shapes and float32 values: the compared layers
  and every other tensor read) are bit-identical. The earliest upload is the original (without times:
  the copy a card does not declare a re-upload of the other, then `copy_rank`, then the smallest repo
  id; `duplicate_originals`); every later copy is a `duplicate` leaf under it and never a parent. A re-save without a
  buffer or under another prefix is a duplicate too: buffers are dropped and names normalised before
  the bytes are compared (sketches.layers.canonical_tensors).
- Bit-identical bodies (transfer learning with a frozen backbone): the body distance is 0 between the
  parent and every such child, and between the children. `extras_distance` breaks it with the tensors
  outside the compared body (heads, norms, a new block): their relative L2 over both sets, a tensor
  one side lacks (or holds in another shape) counting as wholly different; in [0, 1].
- Bit-identical bodies, as a group (`body_groups`): every member is at distance 0 from every other and
  equally far from everyone else, so a spanning tree may hang the family on any of them (on wild-conv,
  without times, the frozen child took 9 of the root's edges). The group's own root is decided first:
  the earliest upload; without times, a prior on heads (`group_root`: the fewest head tensors, then
  the widest head). `body_group_penalty` then makes the other members more costly
  as parents of outside models unless their heads are closer to that model's than the root's are (a
  full fine-tune of a frozen child keeps that child's head), and makes the group root the parent of its members.
- Equally close candidates (distances equal at 20 significant bits, `at_resolution`): prefer the earliest (a "fan": many fine-tunes of one base, the Hub's
  commonest shape: 79 % of models sit in groups of sibling leaves) unless the tree is a "snake" (a chain
  of checkpoints: the distance grows with the time gap), where the latest earlier one is the parent.
  `snake_score` is Kendall's tau between the time gap and the distance over the tree's pairs: a chain
  reads close to 1, a fan close to 0 (siblings are all about twice the edge length apart, whatever
  their upload order). A tree is a snake when tau > 1/2: more than three in four concordant pairs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau

SNAKE_TAU = 0.5
# Distances are computed from float32 weights, each stored to a relative rounding of 2^-24; a BatchNorm folded
# into a conv (an ONNX export) or the unit filters the pair rule divides by add a few roundings more. So two
# candidate parents whose distances to a child differ by a few parts in 10^7 are equally close, and which
# reads nearer is the rounding's choice (tests/test_onnx.py: a fine-tune's export hung under the base's
# export, 2e-9 nearer, or under the base, depending on the numpy build). Both lineage paths compare
# distances at 20 significant bits (`at_resolution`, 9.5e-7 relative), so such candidates tie exactly and
# the tie-breaks decide (the heads, then upload order).
RESOLUTION_BITS = 20
HUB_EPOCH = 1646263744.0  # 2022-03-02T23:29:04Z: every older repo's createdAt on the Hub


def at_resolution(distance: np.ndarray | float) -> np.ndarray:
    """`distance` rounded to RESOLUTION_BITS significant bits (0, inf and NaN as they are)."""
    mantissa, exponent = np.frexp(np.asarray(distance, dtype=np.float64))
    return np.ldexp(np.round(mantissa * 2.0**RESOLUTION_BITS) / 2.0**RESOLUTION_BITS, exponent)


def model_digest(layers: Mapping[str, np.ndarray], extras: Mapping[str, np.ndarray]) -> str:
    """blake2b over every (name, shape, float32 bytes) of one model, names sorted."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted({**layers, **extras}):
        array = np.ascontiguousarray(layers[name] if name in layers else extras[name], dtype=np.float32)
        h.update(f"{name}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def duplicate_originals(digests: Sequence[str], created: Sequence[float | None], repo_ids: Sequence[str],
                        copy_rank: Sequence[tuple[int, int]] = (),
                        declared: Sequence[Sequence[str]] = ()) -> list[int]:
    """For each model, the index of the original it duplicates, or -1 when it is itself an original.

    The earliest upload is the original. Between equal or unknown times the weights cannot tell which
    copy came first, so, in order:
    1. a copy whose card declares another copy of the same bytes as its base comes after it: the
       declaration is checked (the bytes are identical) and names the only thing the weights leave
       open (wild-gpt2 seeds 0 and 1: a re-upload declared its original; guessing by repo id put the
       whole tree under the re-upload, 12 of 21 edges);
    2. `copy_rank`, smaller first: (wrapper prefixes on its names, minus its tensor count). A re-save
       through a wrapper adds a prefix (`module.`, `0.auto_model.`, `model.`), and one by a newer
       library drops buffers such as `position_ids`; neither takes a prefix away or adds a buffer;
    3. the smaller repo id (arbitrary, but the same in every run)."""
    groups: dict[str, set[str]] = {}
    for digest, repo in zip(digests, repo_ids, strict=True):
        groups.setdefault(digest, set()).add(repo)

    def declares_a_copy(i: int) -> bool:
        copies = groups[digests[i]] - {repo_ids[i]}
        return bool(declared) and any(base in copies for base in declared[i])

    order = sorted(range(len(digests)), key=lambda i: (created[i] is None, created[i] or 0.0,
                                                       *copy_order(declares_a_copy(i), copy_rank[i] if copy_rank else (0, 0),
                                                                   repo_ids[i])))
    first: dict[str, int] = {}
    out = [-1] * len(digests)
    for i in order:
        if digests[i] in first:
            out[i] = first[digests[i]]
        else:
            first[digests[i]] = i
    return out


def copy_order(declares_a_copy: bool, copy_rank: tuple[int, int], repo_id: str) -> tuple[bool, tuple[int, int], str]:
    """Sort key among byte-identical copies of one upload time, the original first (`duplicate_originals`'
    rules 1-3); the incremental index orders its copies by it too (indexer.incremental.index._copy_key)."""
    return declares_a_copy, copy_rank, repo_id


def extras_distance(extras: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """(n, n) relative L2 over the tensors outside the body each pair has with one shape; 1: none shared."""
    n = len(extras)
    out = np.ones((n, n), dtype=np.float64)
    np.fill_diagonal(out, 0.0)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = _pair_extras(extras[i], extras[j])
    return out


def _pair_extras(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Relative L2 over the union of the two sets: a tensor one side lacks, or holds in another shape,
    counts as wholly different (its norm on both sides of the ratio). So a model that shares a task head
    with j is nearer j than one without that head, however little the latter's other tensors moved."""
    diff = scale = 0.0
    for name in sorted(set(a) | set(b)):
        x = np.asarray(a[name], np.float64) if name in a else None
        y = np.asarray(b[name], np.float64) if name in b else None
        if x is not None and y is not None and x.shape == y.shape:
            diff += float(np.linalg.norm(x - y))
            scale += math.sqrt((float(np.sum(x * x)) + float(np.sum(y * y))) / 2.0)
            continue
        for lone in (x, y):
            if lone is not None:
                diff += float(np.linalg.norm(lone))
                scale += float(np.linalg.norm(lone))
    return min(1.0, diff / scale) if scale > 0 else 1.0


def snake_score(dist: np.ndarray, created: Sequence[float | None]) -> float:
    """Kendall's tau between |time gap| and distance over the pairs with both times known (NaN: too few)."""
    known = [i for i, t in enumerate(created) if t is not None]
    gaps, dists = [], []
    for a, i in enumerate(known):
        for j in known[a + 1:]:
            gaps.append(abs(float(created[i]) - float(created[j])))  # type: ignore[arg-type]
            dists.append(float(min(dist[i, j], dist[j, i])))
    if len(set(gaps)) < 3:
        return math.nan
    return float(kendalltau(gaps, dists).statistic)


def order_preference(created: Sequence[float | None], *, snake: bool) -> np.ndarray:
    """P[i, j] in [0, 1): the rank of candidate parent i by upload time, earliest 0 (fan) or latest 0
    (snake), over the known times; unknown times rank last. Added at a scale far below any real
    distance gap, so it only decides exact ties."""
    n = len(created)
    keyed = sorted(range(n), key=lambda i: (created[i] is None, (-1 if snake else 1) * (created[i] or 0.0)))
    rank = np.empty(n, dtype=np.float64)
    for r, i in enumerate(keyed):
        rank[i] = r / max(n, 1)
    return np.repeat(rank[:, None], n, axis=1)


def body_groups(layers: Sequence[Mapping[str, np.ndarray]]) -> list[list[int]]:
    """Groups (of >= 2 models) whose compared layers are bit-identical, each sorted, in order of first member."""
    by_digest: dict[str, list[int]] = {}
    for i, model in enumerate(layers):
        by_digest.setdefault(model_digest(model, {}), []).append(i)
    return [g for g in sorted(by_digest.values()) if len(g) > 1]


def group_root(group: Sequence[int], extras: np.ndarray, created: Sequence[float | None],
               heads: Sequence[tuple[int, int]] = ()) -> int:
    """The member the others descend from: the earliest upload; without times, a prior on heads: the
    fewest head tensors (transfer learning adds a task head -- `classifier`, `score` -- above the base's,
    it does not remove the base's), then the widest head (a replaced head is narrower: pre-training is
    broader than the task a frozen backbone is moved to, 1,000 ImageNet classes above a 3-class head),
    then the best-matching heads, then the id. `heads[i]` = (head tensors, head values) of member i."""
    timed = [i for i in group if created[i] is not None]
    if timed and len({created[i] for i in timed}) > 1:
        return min(timed, key=lambda i: (created[i], i))
    outside = [j for j in range(extras.shape[0]) if j not in group]
    return min(group, key=lambda i: ((heads[i][0], -heads[i][1]) if heads else (0, 0),
                                     float(extras[i, outside].sum()) if outside else 0.0, i))


def body_group_penalty(groups: Sequence[Sequence[int]], extras: np.ndarray, created: Sequence[float | None],
                       heads: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Tie-break additions (same units as `extras`) steering each group's edges to its root, in both
    directions, so that the undirected tree (`indexer.lineage.orient`, which takes the costlier direction
    of each edge) sees them too: a member and its group root 3, two members 4, a member and an outside
    model 2 unless the member's heads are closer to that model's than the root's heads are."""
    n = extras.shape[0]
    out = np.zeros((n, n), dtype=np.float64)
    for group in groups:
        root = group_root(group, extras, created, heads)
        members = [m for m in group if m != root]
        for m in members:
            out[m, root] = 3.0  # never above its group's root
            for j in range(n):
                # m's heads no closer to j's than the root's are: no evidence for m, prefer the root
                if j not in group and extras[m, j] >= extras[root, j]:
                    out[m, j] += 2.0
                    out[j, m] += 2.0
            for o in members:
                if o != m:
                    out[o, m] += 4.0  # members hang off the root, not off each other
    return out
