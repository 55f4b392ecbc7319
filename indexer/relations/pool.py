"""The merge pool: which relatives a model is fitted over (`indexer.relations.merges.fit`). One rule for
the batch recovery (`indexer.relations.batch.find_merges`, over a `mother` tree) and the incremental
index (`LineageIndex._fit_merge`, over the related models measured so far), so that, given the same
relatives, both fit the same pool in the same order.

A model x's relatives are ranked by one statistic per pair (`PairStats`, symmetric, computed once per
pair on the fit's own value prefix, `indexer.relations.merges.fit_prefix`):
0. The relatives x's card names as its base models come first, uncounted (`declared_relatives`): a
   hint, which the fit checks as it checks every candidate.
1. Relatives uploaded after x are left out (a merge is made of existing models: the parent came first
   in 99.73 % of documented pairs); a missing time keeps the relative.
2. Relatives bit-identical to x are left out (a duplicate, not a parent).
3. The nearest in squared L2 (ties by id) until MERGE_CANDIDATES that are no known merges are taken,
   skipping a re-upload of one already taken: the same column twice in the least-squares fit adds
   nothing and would push a real candidate out. A known merge is taken uncounted and brings its merge
   parents (and theirs) along, uncounted, all while the pool is under 2 x MERGE_CANDIDATES: merges of
   the same parents pile up near a re-merge of them and would leave no room for the models it is made
   of (`indexer.relations.merges`, merges of merges).
4. Then the relative sharing the most bit-equal entries with x (MASK_EQUAL or more; ties by id) that
   is neither taken nor a re-upload of one taken (a TIES merge shares bit-equal entries with its
   parents as much as with its base: where one parent's entry alone is kept, the merge holds it): a TIES / DARE merge is told by its base, which need not be among the nearest
   (relations zoo: a-ties sits nearer a linear merge, both fine-tunes, a re-upload of one and its child
   than its base).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from indexer.relations.merges import MASK_EQUAL, equal_share, fit_prefix
from indexer.relations.rules import MERGE_CANDIDATES
from sketches.plan import layer_template

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class PairStats:
    """What the pool rule knows of a pair of models; the same whichever of the two is passed first."""

    d2: float  # squared L2 distance over the common blocks' fit prefix (float64)
    share: float  # `equal_share` over that prefix: median share of bit-equal entries in the changed blocks
    same: bool  # bit-identical in every common block (whole blocks, not the prefix)


def common_blocks(a: Arrays, b: Arrays) -> list[str]:
    """The blocks both hold with the same shape, sorted (deterministic)."""
    return sorted(n for n in a if n in b and np.shape(a[n]) == np.shape(b[n]))


def identical(a: Arrays, b: Arrays) -> bool:
    """Bit-identical in every common block (and at least one), with the same layers: stops at the first
    block that differs. A model holding layers the other lacks is no re-upload of it, however its common
    blocks compare: a passthrough stack of another depth holds its first source's layers bit for bit
    (`indexer.relations.merges._stacked` needs that source in its pool)."""
    names = common_blocks(a, b)
    if not names or _layers(a) != _layers(b):
        return False
    return all(np.array_equal(a[n], b[n]) for n in names)


def _layers(arrays: Arrays) -> set[str]:
    return {n for n in arrays if layer_template(n) is not None and np.ndim(arrays[n]) >= 2}


def pair_stats(a: Arrays, b: Arrays) -> PairStats | None:
    """The pair's PairStats; None when the two share no block. Symmetric: (a, b) and (b, a) give the same
    numbers bit for bit (the squared differences and the bit-equal shares do not depend on the order)."""
    names = common_blocks(a, b)
    if not names:
        return None
    pa, pb = fit_prefix(a, names), fit_prefix(b, names)
    return PairStats(sum(_squared_distance(pa[n], pb[n]) for n in names), equal_share(pa, pb, names), identical(a, b))


def squared_distance(a: Arrays, b: Arrays) -> float:
    """||a - b||^2 over every block both hold with one shape (whole blocks, not the fit prefix)."""
    return sum(_squared_distance(a[n], b[n]) for n in common_blocks(a, b))


def _squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||^2 in float64: the difference cast on the fly (no float64 copy of either side), squared in
    place, summed pairwise -- the same bits as squaring the float64 copies' difference."""
    diff = np.subtract(a, b, dtype=np.float64)
    return float(np.square(diff, out=diff).sum())


def fit_order(created: float | None, repo_id: str) -> tuple[bool, float, str]:
    """The order models are fitted in, on both paths: upload time, then id (models without a time after
    the timed ones, by id). A relative's merge status counts in x's fit only when it comes before x in
    this order, so that every status a fit uses was settled before it, whatever the arrival order."""
    return (created is None, created or 0.0, repo_id)


def merge_parents_of(r: str, merges: Mapping[str, Sequence[str]]) -> list[str]:
    """A known merge's parents, and theirs when they are merges too (first seen first); [] for a model
    that is no known merge."""
    out: list[str] = []
    todo = list(merges.get(r, ()))
    while todo:
        p = todo.pop(0)
        if p not in out and p != r:
            out.append(p)
            todo += merges.get(p, ())
    return out


def merge_pool(created: float | None, relatives: Mapping[str, tuple[float | None, PairStats]],
               same: Callable[[str, str], bool], merges: Mapping[str, Sequence[str]] | None = None,
               declared: Collection[str] = ()) -> list[str]:
    """The relatives x is fitted over (module docstring). `relatives`: repo_id -> (upload time, its
    PairStats with x); `same(a, b)`: are two relatives bit-identical (asked only of relatives at exactly
    the same distance from x, which every re-upload of a relative is); `merges`: the relatives known to be
    merges (fitted before x, `fit_order`) -> their merge parents; `declared`: the relatives x's card names
    as its base models (`declared_relatives`)."""
    merges = merges or {}
    if any(s.same and (created is None or t is None or t <= created) for t, s in relatives.values()):
        # a bit-identical copy of an earlier relative is that relative re-uploaded (a duplicate: a leaf, never a
        # merge). Its pool would leave the original out (below) and fit what is left: a cardless ONNX export of
        # a base came out a "merge" of the base's two fine-tunes, whose mean is near the base
        return []
    scored = sorted((s.d2, r, s.share) for r, (t, s) in relatives.items()
                    if not s.same and (created is None or t is None or t <= created))
    where = {r: d2 for d2, r, _ in scored}
    pool: list[str] = []
    taken: dict[float, list[str]] = {}  # d2 -> the relatives taken at that distance

    def take(d2: float, r: str) -> bool:
        if r in pool or any(same(p, r) for p in taken.get(d2, ())):
            return False
        pool.append(r)
        taken.setdefault(d2, []).append(r)
        return True

    for d2, r, _ in scored:  # 0. the card's base models, uncounted: a hint the fit checks, never an answer
        if r in declared and len(pool) < MERGE_CANDIDATES:
            take(d2, r)
    counted = 0
    for d2, r, _ in scored:
        if counted == MERGE_CANDIDATES or len(pool) >= 2 * MERGE_CANDIDATES:
            break
        if take(d2, r):
            counted += r not in merges
            # a merge and its parents join uncounted: merges of the same parents pile up near a re-merge of
            # them (relations zoo + held-out recipes: the 5 nearest of a DELLA merge were 4 earlier merges
            # and one parent) and would leave no room for the models it is made of
            for p in merge_parents_of(r, merges):
                if p in where and len(pool) < 2 * MERGE_CANDIDATES:  # bounded: fits grow with C(pool, 3)
                    take(where[p], p)
    bases = sorted((-share, r, d2) for d2, r, share in scored if r not in pool and share >= MASK_EQUAL)
    for _, r, d2 in bases:
        if take(d2, r):  # a TIES merge shares bit-equal entries with its parents too
            break
    return pool


def pair_table(members: Sequence[str], arrays: Mapping[str, Arrays]) -> dict[tuple[str, str], PairStats]:
    """Every pair of a tree measured once ((a, b), a < b); pairs that share no block are left out."""
    stats: dict[tuple[str, str], PairStats] = {}
    ordered = sorted(members)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            found = pair_stats(arrays[a], arrays[b])
            if found is not None:
                stats[(a, b)] = found
    return stats


def tree_pool(x: str, members: Sequence[str], stats: Mapping[tuple[str, str], PairStats],
              arrays: Mapping[str, Arrays], created: Mapping[str, float | None],
              merges: Mapping[str, Sequence[str]], declared: Sequence[str] = ()) -> list[str]:
    """x's pool over the rest of its tree (the batch side), with the merges found so far before x."""
    relatives = {o: (created.get(o), stats[(min(x, o), max(x, o))]) for o in members
                 if o != x and (min(x, o), max(x, o)) in stats}
    mine = fit_order(created.get(x), x)
    known = {m: ps for m, ps in merges.items() if fit_order(created.get(m), m) < mine}
    return merge_pool(created.get(x), relatives, lambda a, b: identical(arrays[a], arrays[b]), known,
                      declared_relatives(declared, relatives))


def declared_relatives(declared: Sequence[str], relatives: Collection[str]) -> set[str]:
    """The relatives a model's card names as its base models (`base_model`, a list for a merge; ids
    matched without case, as `indexer.relations.adapters.resolve_base` matches an adapter's). mergekit-moe's
    sources are rarely among a MoE's nearest relatives -- its attention is its base's, and a plan at 7B
    compares nothing else with a dense model -- so its pool takes them first; the fit still tests each
    expert bit for bit (`indexer.relations.merges._stacked`): a card that names a wrong model is no merge."""
    wanted = {d.strip().lower() for d in declared if d.strip()}
    return {r for r in relatives if r.lower() in wanted}
