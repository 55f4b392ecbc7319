"""Merges: is a model a combination of two or more of its relatives, and with which weights?

mergekit's methods all write each tensor as (close to) a weighted combination of the merged models'
tensors, possibly over a base: linear sum_i w_i W_i; SLERP, for the small angles between fine-tunes of
one base, ~ (1 - t) W_a + t W_b; TIES / DARE: W_base + sum_i w_i mask_i(W_i - W_base) (trimmed or randomly
dropped and rescaled task vectors), i.e. (1 - sum w_i) W_base + sum_i w_i W_i plus the masking noise.

So a model X is fitted, by least squares over the compared blocks (all layers at once, as mergekit applies
one weight per model unless told otherwise), as a combination of a few of its related relatives
(`fit`): every subset of at most MAX_PARENTS of the candidates, through their Gram matrix (never a
product larger than the candidates' count). The best single relative leaves r1^2 = min_i ||X - Y_i||^2;
the best subset of two or more leaves r2^2; at least two members must carry MIN_SHARE of the weight.
- Interpolating merges (linear, SLERP, soups) are explained exactly: r2^2 < INTERPOLATION_RATIO s1^2
  (measured 0.0-0.002), s1^2 = min_i min_a ||X - a Y_i||^2 the best single relative *rescaled*
  (`_scaled_single`: a run shrunk by weight decay is no merge of the relatives that share its direction). The ratio must be that strict because the middle of a chain (P -> X -> C) is
  "between" its parent and child too: X ~ (P + C) / 2 leaves half of r1^2 (0.5-0.63 on the zoo).
- Masked merges (TIES trims each task vector to its largest entries, DARE drops entries at random):
  where every task vector was dropped the merged entry IS the base's, bit for bit; a fine-tune's or a
  chain's changed layers share no entries with anything (measured: TIES 0.25, DARE 0.16, fine-tunes,
  chains, linear and SLERP merges 0.00). So a relative holding MASK_EQUAL of a changed layer's entries
  is a base candidate, and X - base is fitted on the others' task vectors Y_i - base; the masking noise
  remains (r2^2 / r1^2 0.47-0.53 measured), a fine-tune's independent update would not be explained
  at all (~1): MASKED_RATIO = 0.9. The base is not a parent (its weight is 1 - sum w_i).
  In BF16 relatives of large models share many bit-equal entries without any masking (sub-resolution
  updates, small deltas), and a model whose own parent is not among the candidates is "explained" by two
  siblings' task vectors (their common part is the missing parent's). What masking guarantees and
  they lack: every entry the model changed is changed by one of its merge parents (`uncovered_share`
  at most UNCOVERED_MAX).
Merges of merges: merges of the same parents pile up on the Hub, and a re-merge of P lies nearer an
earlier merge M of P than P itself (it is a combination of P, and so is M). Against M, a re-merge's
masking noise or nonlinearity (NuSLERP, DELLA) looks like an update of M's own, and {M, one of P}
explains it as well as P does. So a model is first explained by its candidates that are not known
merges (`fit(merges=...)`, statuses settled earlier in upload order), with the pool holding each
merge's parents (`indexer.relations.pool.merge_pool`), and by a merge among its candidates only when
those cannot; the interpolation is still judged against every candidate, merges included, so a
fine-tune of M (an update outside P's span) stays M's child. Held-out mergekit recipes: merge parent set
0.55 -> 0.91 (bench/merge_methods.py).
Weights by tensor, last (`_per_block`): mergekit's SLERP with t by layer and module is its parents tensor
by tensor with other weights in each; every moved tensor must then be explained on its own. BF16 / F16
merges (`_Stored`): a merge is saved rounded to its dtype, so a candidate interpolation is judged again
with the combination and the best single rounded alike, as the merge was.
Passthrough merges of another depth (frankenmerges): every tensor a copy of a source's, layers renumbered
(`_stacked`, an exact test on content digests across layer indices), asked when x has layers no candidate
has. Selection merges (Arcee Fusion, NearSwap where it swaps): x holds one relative's values entry by entry and
another's elsewhere, exactly (`_selected`): no weighted sum of them, so tested apart, last.
Masked merges whose members tie (x - base spans one affine space whichever member is the base: SCE's
base-a and a-ft1 read ratio 0.7559 both) take as the base the member with the smallest coefficient
on the entries x holds of none of them (`_base_of`): the base is what the merge does not mix in.
A quantized copy adds white noise (r2 ~ r1, no bit-equal entries); a duplicate leaves nothing (r1 = 0).
The parents: members with a positive weight of at least MIN_SHARE, normalised to sum 1, heaviest first
(to WEIGHT_DIGITS decimals; equal weights by id).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import (
    Callable,
    Collection,
    Container,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
from scipy import stats

from indexer.lineage.methods import cast_to
from sketches.experts import expert_alias, is_router
from sketches.plan import layer_template

MAX_PARENTS = 3
INTERPOLATION_RATIO = 0.1  # linear / SLERP: the combination leaves almost nothing (measured 0.0-0.002)
MASKED_RATIO = 0.9  # TIES / DARE over a base: the masking noise stays (measured 0.47-0.53)
# Values per model a fit reads: a prefix of every compared block, in proportion. A fit estimates at most
# MAX_PARENTS weights and two residual ratios, which 2**20 values pin to ~1e-3 (relative), far inside the
# gaps the thresholds separate (interpolation 0.002 vs 0.1, masking noise 0.5 vs 0.9). Every zoo model
# fits whole (the relations zoo reads ~8e4 values); a 7B plan reads 8e6, whose float64 Gram matrices took
# 0.36 s a call and 60 % of a one-process crawl's time (bench/crawl_rate.py profile, 2026-11-30).
MAX_FIT_VALUES = 1 << 20
# The raw weights (or, over a base, the task-vector weights) of a merge add up to about 1: mergekit's
# linear, SLERP and normalised TIES / DARE recipes combine whole models or whole task vectors. A
# sub-resolution fine-tune of a base (most entries bit-equal to it, so it passes MASK_EQUAL) leaves a
# task vector of BF16 rounding flips that two siblings' task vectors "explain" by 20-45 % (residual ratio
# 0.55-0.80, under MASKED_RATIO) with weights summing to ~1e-2: 13 false merges among 80 virtual 7B models
# (bench/crawl_rate.py, 2026-11-30). Below this sum the fit is not a merge.
MIN_WEIGHT_SUM = 0.25
# A TIES / DARE-style merge of k models at density d leaves about (1 - d)^k of a changed layer's entries at
# the base's value, bit for bit: TIES 0.25 and DARE 0.16 in the relations zoo, breadcrumbs-TIES at density
# 0.8 over 2 models 0.04 (bench/merge_methods.py). A float32 fine-tune or a chain shares 0.00 with any
# relative; BF16 relatives of large models share 10-70 % without any masking, which `rounding_flips` and
# `uncovered_share` (below) turn away, not this share. So this is only "some entries kept bit for bit".
MASK_EQUAL = 0.01
# A masked merge over a base moves only entries that some parent's task vector moves: where every parent
# holds the base's value bit for bit, each task vector is 0 and TIES / DARE / task arithmetic write the
# base's value back, exactly (`uncovered_share`; 0 on every TIES and DARE merge of the four relations
# zoos). The model's changed entries need not be independent of its relatives' (entries near 0 cross a
# BF16 rounding boundary in every relative; relatives share their ancestors' changes): non-merges left
# 1.0e-4 - 0.11 of their changed entries uncovered (median 1.1e-2) in the 5,226 (model, base, parents)
# that pass every other test of a masked merge among 40 virtual 7B models (bench/crawl_rate.py families,
# 2026-11-30), with 2 - 500 standard deviations *fewer* uncovered entries than independence predicts, even
# per BF16 exponent -- so "more overlap than chance" would call them merges; this exact test does not.
UNCOVERED_MAX = 1e-5  # 10x under the smallest non-merge share measured
SUBSET_ALPHA = 1e-3  # a larger merge-parent subset must beat the smaller by more than chance at this level
MIN_SHARE = 0.15  # a merge parent carries at least this share of the positive weight
# Two masked fits whose ratios agree to this (relative) explain x by one affine span: the same members,
# another of them taken as the base (`_base_of`)
AFFINE_TIE = 1e-6
# A selection merge (`_selected`): x holds, entry by entry, one of two relatives' values, all but this
# share of its entries (float32 arithmetic may move a selected value by an ulp of the base's: compared
# to 2^-20 of the larger magnitude)
SELECTION_MISS = 1e-3
WEIGHT_DIGITS = 2  # merge weights are reported (and their parents ordered) to 0.01: see `_parents`


@dataclass(frozen=True)
class MergeFit:
    parents: tuple[tuple[str, float], ...]  # (repo_id, weight), heaviest first; () when not a merge
    single: str  # the best single relative
    ratio: float  # r2^2 of the best combination / that of the best rescaled single (1.0: it adds nothing)
    base: str = ""  # a masked merge's base (TIES / DARE): the relative its untouched entries equal

    @property
    def is_merge(self) -> bool:
        return len(self.parents) >= 2


Arrays = Mapping[str, np.ndarray]


class PairCache:
    """What fits learn about pairs of models, kept between fits: the per-block float64 dot products
    <A_l, B_l> of their fit prefixes (`block_gram`), and a model's masked-merge verdicts over a base
    (`equal_share`, `rounding_flips`). The index fits a model again whenever its pool changes, and batch
    fits every model of a tree over an overlapping pool, so most of a fit's pairs were seen before: only
    a new member's are computed (bench/crawl_rate.py, 30 virtual 7B models: 171 fits of 5.7 models each,
    39 ms a fit in products). A key names the arrays it stands for (the index's: repo and revision);
    least recently used dropped first past `most` entries."""

    def __init__(self, most: int = 16_384) -> None:
        self._kept: OrderedDict[tuple[Hashable, Hashable, tuple[str, ...]], Any] = OrderedDict()
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple object per name list
        self._most = most

    def get(self, a: Hashable, b: Hashable, names: tuple[str, ...], compute: Callable[[], Any]) -> Any:
        key = (a, b, self._names.setdefault(names, names))
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        hit = self._kept[key] = compute()
        while len(self._kept) > self._most:
            self._kept.popitem(last=False)
        return hit


def _dots(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """<a_l, b_l> per block in float64, one pair at a time: the same bits whichever pool the pair is in
    (a product over a stack of candidates may sum in another order). numpy's own multiply and pairwise
    sum, not BLAS: OpenBLAS spreads a dot product over threads that wait for cores the crawl's other
    work holds (38 ms a pair on a busy 2-core box against 0.5 ms on one thread)."""
    return np.array([float(np.multiply(a[n], b[n]).sum()) for n in names])


@dataclass(frozen=True)
class _Keyed:
    """A fit's view of a PairCache: its models' keys (x's at ""), over its block names."""

    cache: PairCache
    keys: Mapping[str, Hashable]
    names: tuple[str, ...]

    def pair(self, kind: str, i: str, j: str, compute: Callable[[], Any]) -> Any:
        """A symmetric quantity of models i and j: one entry whichever is the fit's x."""
        first, second = sorted((self.keys[i], self.keys[j]), key=repr)
        return self.cache.get((kind, first), second, self.names, compute)

    def about(self, kind: str, base: str, compute: Callable[[], Any]) -> Any:
        """A verdict on x over the candidate `base`."""
        return self.cache.get((kind, self.keys[""]), self.keys[base], self.names, compute)


def block_gram(x: Arrays, candidates: Mapping[str, Arrays], keyed: _Keyed,
               wide: Callable[[str], Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The least-squares products per block over `keyed.names`, float64, candidates in sorted order:
    G (L, m, m) with G_ij = <Y_i, Y_j>, b (L, m) with b_i = <Y_i, x>, ||x_l||^2 (L,) and each block's
    value count (L,); summed over the blocks they are the whole fit's (G, b, ||x||^2), the task vectors'
    over a base follow from those (`_based`). A pair multiplied by an earlier fit sharing `keyed.cache`
    is not multiplied again. `wide`: a model's blocks in float64 by id ("" for x), `_Stored.wide`."""
    ids, names = sorted(candidates), keyed.names

    def pair(i: str, j: str) -> np.ndarray:
        return keyed.pair("dots", i, j, lambda: _dots(wide(i), wide(j), names))

    m = len(ids)
    g = np.zeros((len(names), m, m))
    for a in range(m):
        for c in range(a, m):
            g[:, a, c] = g[:, c, a] = pair(ids[a], ids[c])
    b = np.stack([pair(i, "") for i in ids], axis=1) if ids else np.zeros((len(names), 0))
    return g, b, pair("", ""), np.array([np.size(x[n]) for n in names])


class _Widened:
    """A fit's models' blocks in float64 (flat), converted once on first use and kept for the fit: its
    products (`block_gram`) and its rounded residuals (`_Stored.residuals`) read the same conversions."""

    def __init__(self, x: Arrays, candidates: Mapping[str, Arrays], names: Sequence[str]) -> None:
        self._arrays = {**candidates, "": x}  # "" cannot be a repo id
        self._names = names
        self._wide: dict[str, dict[str, np.ndarray]] = {}
        self._flat: dict[str, np.ndarray] = {}

    def __call__(self, i: str) -> dict[str, np.ndarray]:
        if i not in self._wide:
            self._wide[i] = {n: np.asarray(self._arrays[i][n], dtype=np.float64).ravel() for n in self._names}
        return self._wide[i]

    def flat(self, i: str) -> np.ndarray:
        """Every block of model i end to end (the entry-wise tests: selection, a masked tie's base)."""
        if i not in self._flat:
            self._flat[i] = np.concatenate([self(i)[n] for n in self._names])
        return self._flat[i]


def equal_share(x: Arrays, y: Arrays, names: Sequence[str]) -> float:
    """Median over the layers where x and y differ of the share of entries that are bit-equal."""
    shares = []
    for name in names:
        same = np.asarray(x[name]) == np.asarray(y[name])
        if not same.all():
            shares.append(float(same.mean()))
    return float(np.median(shares)) if shares else 0.0


def _residual(g: np.ndarray, b: np.ndarray, xx: float, subset: tuple[int, ...]) -> tuple[float, np.ndarray]:
    gs, bs = g[np.ix_(subset, subset)], b[list(subset)]
    coef, *_ = np.linalg.lstsq(gs, bs, rcond=None)
    return max(xx - 2 * float(coef @ bs) + float(coef @ gs @ coef), 0.0), coef


def _best_subset(residual: Callable[[tuple[int, ...]], tuple[float, np.ndarray]], count: int, r1: float, n: int,
                 df: int = 1) -> tuple[float, tuple[int, ...], np.ndarray]:
    """The least-squares subset of 2 to MAX_PARENTS of `count` candidates (`residual(subset)`: its r2 and
    coefficients; `df`: coefficients a member adds): the best of each size, a larger size taken only when
    its extra members lower the residual by more than chance (an F test at SUBSET_ALPHA over the n fitted
    values). Any relative lowers a least-squares residual a little -- a fine-tune of an earlier merge of
    the same parents took a third seat beside a DARE merge's two, and with it the test's baseline -- and
    an unrelated one by about r2 / n, which the test leaves out."""
    top: tuple[float, tuple[int, ...], np.ndarray] = (math.inf, (), np.zeros(0))
    for size in range(2, min(MAX_PARENTS, count) + 1):
        best: tuple[float, tuple[int, ...], np.ndarray] = (math.inf, (), np.zeros(0))
        for subset in itertools.combinations(range(count), size):
            r2, coef = residual(subset)
            if r2 < best[0] - 1e-12 * r1:  # strictly better: the first in order wins ties (deterministic)
                best = (r2, subset, coef)
        if not top[1] or _significant(top[0], best[0], len(top[1]) * df, size * df, n, r1):
            top = best
    return top


def _values(x: Arrays, names: Sequence[str]) -> int:
    return sum(int(np.size(x[n])) for n in names)


def _significant(r_small: float, r_big: float, p_small: int, p_big: int, n: int, r1: float) -> bool:
    """Do p_big - p_small more regressors lower the residual r_small to r_big by more than chance?"""
    gain = r_small - r_big
    if gain <= 1e-12 * r1:
        return False
    if r_big <= 1e-12 * r1 or n <= p_big:
        return True  # exact: nothing left for chance to explain
    f = (gain / (p_big - p_small)) / (r_big / (n - p_big))
    return bool(f > stats.f.isf(SUBSET_ALPHA, p_big - p_small, n - p_big))


def _parents(ids: Sequence[str], subset: tuple[int, ...], coef: np.ndarray, min_share: float) -> tuple[tuple[str, float], ...]:
    positive = {ids[i]: float(c) for i, c in zip(subset, coef, strict=True) if c > 0}
    total = sum(positive.values())
    if total < MIN_WEIGHT_SUM:
        return ()  # a small fraction of its "parents": a near-copy of something, not a merge of them
    kept = [(r, w / total) for r, w in positive.items() if total > 0 and w / total >= min_share]
    norm = sum(w for _, w in kept)
    # two decimals: the masking noise of TIES / DARE moves a weight by about 0.01 (0.60 / 0.40 recipes fit
    # as 0.596 / 0.404), so more digits are noise -- and would order a 0.50 / 0.50 merge's parents by that
    # noise, differently in batch and incremental (relations zoo seed 1, b-dare: 0.504 vs 0.496 one way,
    # the other way round the other); equal weights are ordered by id
    return tuple(sorted(((r, round(w / norm, WEIGHT_DIGITS)) for r, w in kept), key=lambda p: (-p[1], p[0])))


def fit(x: Arrays, candidates: Mapping[str, Arrays], *, merges: Collection[str] | Mapping[str, Sequence[str]] = (),
        min_share: float = MIN_SHARE, cache: PairCache | None = None,
        keys: Mapping[str, Hashable] | None = None, x_key: Hashable = None) -> MergeFit | None:
    """The module docstring's test; None with fewer than two candidates or no common block. `merges`: the
    candidates known to be merges themselves (fitted earlier in upload order), or a map of them to their
    merge parents: X is first explained by the others alone, and by a merge among its candidates only
    when they cannot (`_explain`); a known merge is no masked base of its own merge parents (`_masked`).
    `cache`: what fits learn about pairs, kept between them; `keys` (candidate id -> what names its arrays)
    and `x_key` (x's) address it. Without them the fit keeps its own for its two groups."""
    ids = sorted(candidates)
    names = sorted(n for n in x if all(n in c and np.shape(c[n]) == np.shape(x[n]) for c in candidates.values()))
    if len(ids) < 2 or not names:
        return None
    whole = (x, candidates)  # a stack of other depth has layers no candidate has by name (`_stacked`)
    x, candidates = fit_prefix(x, names), {r: fit_prefix(c, names) for r, c in candidates.items()}
    if cache is None or keys is None or x_key is None:
        cache, keys, x_key = PairCache(), {r: ("candidate", r) for r in ids}, ("x",)
    keyed = _Keyed(cache, {**{r: keys[r] for r in ids}, "": x_key}, tuple(names))
    merge_parents = {m: frozenset(ps) for m, ps in merges.items()} if isinstance(merges, Mapping) else {}
    stored = _Stored(x, candidates, ids, names, keyed, _Widened(x, candidates, names), merge_parents)
    blocks = block_gram(x, candidates, keyed, stored.wide)
    products = (blocks[0].sum(0), blocks[1].sum(0), float(blocks[2].sum()))
    g, b, xx = products
    singles = np.array([xx - 2 * b[i] + g[i, i] for i in range(len(ids))])  # ||X - Y_i||^2, no rescaling
    best = int(np.argmin(singles))
    originals = tuple(i for i, r in enumerate(ids) if r not in merges)
    groups = [originals, tuple(range(len(ids)))] if 2 <= len(originals) < len(ids) else [tuple(range(len(ids)))]
    # copies, first of the candidates that are no merges: a BF16 mergekit-moe's F32 twin holds every
    # tensor it holds, rounded, and would be its one source
    stacked = next((found for members in groups
                    if (found := _stacked(whole[0], {ids[i]: whole[1][ids[i]] for i in members}, names, ids[best]))), None)
    if stacked is not None:
        return stacked
    if singles[best] <= 1e-12 * max(xx, 1e-30):  # a duplicate: nothing left to explain
        return MergeFit((), ids[best], 1.0)
    # over every candidate, merges included: a fine-tune of a merge M is nearest M, and M's parents
    # explain it no better than M does (its own update is outside their span), so it stays M's child
    scaled = max(_scaled_single(g, b, xx), 1e-300)
    last = MergeFit((), ids[best], 1.0)
    for members in groups:
        last = _explain(stored, products, members, scaled, min_share, ids[best])
        if last.is_merge:
            return last
        per_block = _per_block(stored, blocks, members, min_share, ids[best])
        if per_block.is_merge:
            return per_block
        selected = _selected(stored, members, ids[best])
        if selected is not None:
            return selected
    return last


def _stacked(x: Arrays, candidates: Mapping[str, Arrays], common: Sequence[str], single: str) -> MergeFit | None:
    """A passthrough merge of another depth (mergekit's frankenmerges, depth up-scaling): x's layers are
    copies of its sources' layers, renumbered, and some of its layer indices exist in no candidate, so no
    fit over the common names sees the source of those (bench/merge_methods.py: a 3-layer stack of a-ft1's
    two layers and a-ft2's second read as a fine-tune of a-ft1). Asked only when x holds layer tensors no
    candidate has by name. Every compared tensor of x must be a bit-for-bit copy of some candidate's, at
    its name or at another layer index of the same module and shape; then the sources, taken greedily
    (the one copying the most tensors first), are the parents, weighted by the share of tensors each
    gave. One source only (its own layers repeated or dropped) is no merge; a tensor copied from none (a
    layer added and trained: a transfer-learning head) means no passthrough at all.
    A mergekit-moe is one too: its attention, norms and embeddings are its base's, each expert a copy of
    a relative's MLP at its layer (`sketches.experts.expert_alias`); its routers are skipped. A tensor x
    holds in BF16 or F16 (`stored_dtypes`) is a copy of a wider one rounded to that type (mergekit's out_dtype)."""
    own = [n for n in x if n not in common and layer_template(n) is not None and np.ndim(x[n]) >= 2]
    if not own:
        return None
    # a router is drawn at random or computed from prompts, no copy of anything (sketches.experts)
    copied = [n for n in sorted(x) if np.ndim(x[n]) >= 2 and not is_router(n)]
    stored = dict(zip(copied, stored_dtypes(x, copied), strict=True))  # a copy saved in BF16 is its source rounded
    index: dict[tuple[str, tuple[int, ...], bytes], set[str]] = {}
    for r, arrays in candidates.items():
        for n, a in arrays.items():
            if np.ndim(a) >= 2:
                for dtype in set(stored.values()):
                    index.setdefault(_content_key(n, cast_to(a, dtype) if dtype else a), set()).add(r)
    sources: dict[str, set[str]] = {}
    for n in copied:
        found = index.get(_content_key(n, x[n]), set())
        if not found:
            return None
        sources[n] = found
    parents: dict[str, int] = {}
    left = dict(sources)
    while left:
        top = max(sorted({r for found in left.values() for r in found}), key=lambda r: sum(r in f for f in left.values()))
        parents[top] = sum(top in f for f in left.values())
        left = {n: f for n, f in left.items() if top not in f}
    if len(parents) < 2:
        return None
    total = sum(parents.values())
    weights = sorted(((r, round(c / total, WEIGHT_DIGITS)) for r, c in parents.items()), key=lambda p: (-p[1], p[0]))
    return MergeFit(tuple(weights), single, 0.0)


def _content_key(name: str, a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """(module, shape, digest of the float32 bytes): equal for a tensor copied to another layer index, and
    for a dense MLP matrix copied into a MoE's expert (`sketches.experts.expert_alias`)."""
    values = np.ascontiguousarray(a, dtype=np.float32)
    name = expert_alias(name) or name
    return layer_template(name) or name, tuple(values.shape), hashlib.blake2b(values.tobytes(), digest_size=16).digest()


def _selected(stored: _Stored, members: tuple[int, ...], single: str) -> MergeFit | None:
    """A selection merge: x holds, entry by entry, the value of one relative or of another (Arcee Fusion
    keeps its base's values but where another model's differ most; NearSwap takes the other's where they
    are near). No least-squares fit sees it: x - base is the other's task vector masked, not scaled
    (bench/merge_methods.py: Arcee Fusion read as a fine-tune, ratio 1.00). The test is exact: all but
    SELECTION_MISS of x's entries are the base's bit for bit or the other's to 2^-20 of the larger value
    of the three (float32's base + (other - base) rounds at that scale), and each holds at
    least MASK_EQUAL of the entries where the two differ. A fine-tune's own entries are neither; a BF16
    sub-resolution fine-tune of the base (its flips one BF16 step each: `rounding_flips`) is turned away.
    The weights are the two shares of those entries (not held to MIN_SHARE: an exact share is no chance
    fit). The base: the one holding more of them."""
    wide, x, names = stored.wide, stored.x, stored.names
    # the base keeps most entries bit for bit: the masked test's cached per-layer share (median over the
    # layers where they differ) turns away nearly every pair before a value is compared
    bases = [k for k in members if stored.keyed.about("equal share", stored.ids[k],
                                                      lambda k=k: equal_share(x, stored.candidates[stored.ids[k]], names)) >= 0.5]
    if not bases:
        return None
    xs = wide.flat("")
    best: tuple[float, str, str, float] | None = None
    for k in bases:
        base = stored.ids[k]
        ys_b = wide.flat(base)
        from_base = xs == ys_b
        share_base = float(from_base.mean())
        if share_base < 0.5 or (best is not None and share_base <= best[0]) or stored.keyed.about(
                "rounding flips", base, lambda base=base: rounding_flips(x, stored.candidates[base], names)):
            continue
        rest = ~from_base  # the entries the other must hold
        for j in members:
            if j == k:
                continue
            ys_o = wide.flat(stored.ids[j])
            # base + (other - base) in float32 rounds at the scale of the larger of the two: an ulp of it
            scale = np.maximum(np.maximum(np.abs(xs[rest]), np.abs(ys_o[rest])), np.abs(ys_b[rest]))
            near = np.abs(xs[rest] - ys_o[rest]) <= 2.0 ** -20 * scale
            differ = ys_b != ys_o
            if float(np.sum(~near)) > SELECTION_MISS * xs.size or not differ.any():
                continue
            taken = float(np.sum(near & differ[rest])) / float(np.sum(differ))
            if taken >= MASK_EQUAL and (best is None or share_base > best[0]):
                best = (share_base, base, stored.ids[j], taken)
    if best is None:
        return None
    _, base, other, taken = best
    weights = sorted(((base, round(1.0 - taken, WEIGHT_DIGITS)), (other, round(taken, WEIGHT_DIGITS))), key=lambda p: (-p[1], p[0]))
    return MergeFit(tuple(weights), single, 0.0, base)


def _per_block(stored: _Stored, blocks: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
               members: tuple[int, ...], min_share: float, single: str) -> MergeFit:
    """An interpolation with a weight per model *per block*: mergekit's SLERP with t by layer and module
    (its README's example, t from 0 to 1 across the layers, attention and MLP opposed, copied by thousands
    of Hub merges) is its parents block by block, one global weight each explains it by no more than
    half. Judged as `_explain`'s interpolation, against the best single candidate rescaled per block;
    a larger subset adds a coefficient per block a member. Tried after the global fit: its L weights a
    member fit more, and a chain's middle whose two steps changed different layers would pass (the
    child, uploaded later, is outside the pool). The weights reported are the per-block ones averaged
    over the values."""
    gs, bs, xxs, sizes = blocks
    pick = list(members)
    gm, bm = gs[:, pick][:, :, pick], bs[:, pick]
    diag = np.einsum("lii->li", gs)
    scaled_all = np.where(diag > 0, xxs[:, None] - bs ** 2 / np.maximum(diag, 1e-300), xxs[:, None])  # (L, m)
    r1 = float(min(np.sum(xxs - 2 * bs[:, i] + diag[:, i]) for i in pick))
    r2, subset, coef = _best_subset(lambda sub: _block_residual(gm, bm, xxs, sub)[:2], len(pick), r1,
                                    int(sizes.sum()), df=len(sizes))
    if not subset:
        return MergeFit((), single, 1.0)
    model = int(np.argmin(scaled_all.sum(0)))  # the best single model, rescaled block by block
    per_block, alone = _block_residual(gm, bm, xxs, subset)[2], scaled_all[:, model]
    parents = _parents([stored.ids[i] for i in pick], subset, (sizes @ coef) / sizes.sum(), min_share)
    rounded = len(parents) >= 2 and stored.narrow  # judged on the combinations rounded as the model was stored
    if rounded:
        full = np.zeros((len(sizes), len(stored.ids)))
        full[:, [pick[i] for i in subset]] = coef
        per_block = stored.residuals(full)
        alone = stored.residuals(_scales(bs, diag, np.full(len(sizes), model)))
    ratio = float(per_block.sum()) / max(float(alone.sum()), 1e-300)
    if ratio >= INTERPOLATION_RATIO:  # decided: the nearest single per block (a third residual pass) is not read
        return MergeFit((), single, ratio)
    nearest = (stored.residuals(_scales(bs, diag, np.argmin(scaled_all, axis=1))) if rounded
               else np.min(scaled_all, axis=1))
    if _worst_block(per_block, nearest, xxs) >= INTERPOLATION_RATIO:
        return MergeFit((), single, ratio)
    return MergeFit(parents, single, ratio)


def _scales(bs: np.ndarray, diag: np.ndarray, which: np.ndarray) -> np.ndarray:
    """(L, candidates) coefficients: in each block l, candidate which[l] alone, rescaled to fit best."""
    rows = np.arange(len(which))
    coef = np.zeros_like(bs)
    coef[rows, which] = bs[rows, which] / np.maximum(diag[rows, which], 1e-300)
    return coef


def _block_residual(gs: np.ndarray, bs: np.ndarray, xxs: np.ndarray, subset: tuple[int, ...]
                    ) -> tuple[float, np.ndarray, np.ndarray]:
    """r2 summed over the blocks, the (L, |subset|) coefficients and r2 per block, each block solved on its
    own (one batched solve; a ridge of 1e-12 of the block's scale keeps a block where two candidates are
    equal -- a frozen layer -- solvable)."""
    sub = list(subset)
    a, rhs = gs[:, sub][:, :, sub], bs[:, sub]
    ridge = 1e-12 * np.einsum("lii->l", a)[:, None, None] / len(sub) + 1e-300
    coef = np.linalg.solve(a + ridge * np.eye(len(sub)), rhs[..., None])[..., 0]
    r2 = np.maximum(xxs - 2 * np.einsum("ls,ls->l", coef, rhs) + np.einsum("ls,lst,lt->l", coef, a, coef), 0.0)
    return float(r2.sum()), coef, r2


def _worst_block(per_block: np.ndarray, singles: np.ndarray, xxs: np.ndarray) -> float:
    """The largest per-block ratio of the subset's residual to the block's best rescaled single: a merge
    with weights by block is explained in *every* block (gradient SLERP: each block is its parents'
    interpolation), while a chain's middle X (P -> X -> C, a duplicate of X in its pool) is explained
    only in the blocks that one of its two steps dominates -- with one weight per block, relations zoo
    a-ft1-copy read 0.06 in all, half a block where both steps moved it alike."""
    moved = singles > 1e-12 * np.maximum(xxs, 1e-300)  # a block equal to a candidate's, rescaled: explained
    return float(np.max(per_block[moved] / singles[moved])) if moved.any() else 0.0


@dataclass(frozen=True)
class _Stored:
    """What a fit reads of the values themselves: the model's and its candidates' fit prefixes (ids sorted)
    and the dtype each of the model's blocks was stored in ("BF16", "F16", or "" for float32), as its
    values tell (`stored_dtypes`)."""

    x: Arrays
    candidates: Mapping[str, Arrays]
    ids: Sequence[str]
    names: Sequence[str]
    keyed: _Keyed  # x's verdicts over each base, measured once (both groups of a fit ask, later fits too)
    wide: _Widened  # the blocks in float64, converted once a fit
    merge_parents: Mapping[str, frozenset[str]] = field(default_factory=dict)  # known merges -> their parents

    @cached_property
    def dtypes(self) -> tuple[str, ...]:
        """Read when a fit needs it only: a candidate interpolation that missed (`stored_dtypes`)."""
        return stored_dtypes(self.x, self.names)

    @property
    def narrow(self) -> bool:
        return any(self.dtypes)

    def residuals(self, coef: np.ndarray) -> np.ndarray:
        """Per block, ||x_l - cast(sum_i coef[l, i] Y_il)||^2: the combination (coef: (L, candidates))
        rounded to the block's dtype, as a merge computed in float32 and saved in it is. A BF16 merge is
        its parents' combination only up to that rounding: a linear merge of fine-tunes that moved 1e-2 of
        a weight's size read 0.08 against its best single, of 3e-3 0.40 (tests/test_relations_merges.py),
        while rounded alike both read ~0; a fine-tune's own update is not undone by rounding."""
        out = []
        for block, name in enumerate(self.names):
            mix = np.zeros(np.size(self.x[name]), dtype=np.float64)
            for i in np.flatnonzero(coef[block]):
                mix += coef[block, i] * self.wide(self.ids[i])[name]
            if self.dtypes[block]:
                mix = cast_to(mix, self.dtypes[block]).astype(np.float64).ravel()
            left = self.wide("")[name] - mix
            out.append(float(np.square(left).sum()))  # not BLAS: see _dots
        return np.array(out)


def stored_dtypes(x: Arrays, names: Sequence[str]) -> tuple[str, ...]:
    """Each block's storage dtype, read off its values: BF16 when every value's low 16 bits are 0 (an F16
    value has them so with chance 1/8 each), else F16 when every value is one, else "" (float32)."""
    out = []
    for name in names:
        v = np.ascontiguousarray(x[name], dtype=np.float32).ravel()
        if not np.any(v.view(np.uint32) & np.uint32(0xFFFF)):
            out.append("BF16")
        elif np.array_equal(v.astype(np.float16).astype(np.float32), v):
            out.append("F16")
        else:
            out.append("")
    return tuple(out)


def _explain(stored: _Stored, products: tuple[np.ndarray, np.ndarray, float], members: tuple[int, ...],
             scaled: float, min_share: float, single: str) -> MergeFit:
    """X as a merge of the candidates `members` (indices into the sorted ids; `products`: `block_gram` summed,
    over all of them): an interpolation judged against `scaled` (the best rescaled single of every candidate),
    else a masked merge over one of them judged against the nearest of them. Merges of merges: when a
    merge M of the parents P is among the candidates, a re-merge of P lies near M -- nearer than any of
    P (relations zoo: breadcrumbs-TIES 8.1 from a linear merge of its parents, 27-31 from them) -- so
    against M the masking noise of the re-merge looks like an update of M's own; the masked test over
    P alone (`fit`'s first pass) is judged against P's nearest. A fine-tune of M shares no bit-equal
    entries with a base in float32, and in BF16 its sub-resolution flips where M kept the base are
    entries none of P moved (`uncovered_share`), so it does not pass as a masked merge of P."""
    g, b, xx = products
    pick = list(members)
    r1 = float(min(xx - 2 * b[i] + g[i, i] for i in members))
    gm, bm = g[np.ix_(pick, pick)], b[pick]
    r2, subset, coef = _best_subset(lambda sub: _residual(gm, bm, xx, sub), len(pick), r1, _values(stored.x, stored.names))
    found = MergeFit(_parents([stored.ids[i] for i in members], subset, coef, min_share), single, r2 / scaled)
    if found.is_merge and found.ratio >= INTERPOLATION_RATIO and stored.narrow:
        found = replace(found, ratio=_rounded_ratio(stored, products, [pick[i] for i in subset], coef))
    if found.is_merge and found.ratio < INTERPOLATION_RATIO:
        return found
    masked = _masked(stored, products, members, min_share)
    return masked if masked is not None else MergeFit((), single, found.ratio)


def _rounded_ratio(stored: _Stored, products: tuple[np.ndarray, np.ndarray, float], chosen: Sequence[int],
                   coef: np.ndarray) -> float:
    """`_explain`'s ratio with the combination and the best rescaled single each rounded to the model's
    own dtype (`_Stored.residuals`)."""
    g, b, xx = products
    blocks = len(stored.names)
    mix, alone = np.zeros((blocks, len(stored.ids))), np.zeros((blocks, len(stored.ids)))
    mix[:, list(chosen)] = coef
    near = _nearest_rescaled(g, b, xx)[0]
    alone[:, near] = b[near] / max(g[near, near], 1e-300)
    single = float(stored.residuals(alone).sum())
    return float(stored.residuals(mix).sum()) / single if single > 0 else 1.0


def _scaled_single(g: np.ndarray, b: np.ndarray, xx: float) -> float:
    """min_i min_a ||X - a Y_i||^2: the best single relative *rescaled*, what an interpolating merge must
    beat. A rescaling is no merge: weight decay shrinks a long high-lr run towards 0 (wild-conv-s1's drifted
    0.72 from its root), and two siblings then "explained" it with weights summing to ~0.4 at r2 / r1 < 0.1
    against the unscaled singles; against the rescaled parent the same fit leaves ~1. A linear / SLERP
    merge is not a rescaled parent, so its ratio barely moves (relations zoos: every merge still found)."""
    return _nearest_rescaled(g, b, xx)[1]


def _nearest_rescaled(g: np.ndarray, b: np.ndarray, xx: float) -> tuple[int, float]:
    """The candidate whose best rescaling leaves X the least, and what it leaves."""
    diag = np.diag(g)
    left = [(xx - b[i] ** 2 / diag[i]) if diag[i] > 0 else xx for i in range(len(b))]
    near = int(np.argmin(left))
    return near, float(left[near])


def fit_prefix(arrays: Arrays, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The first values of each block, MAX_FIT_VALUES in all (every block whole when they fit)."""
    total = sum(int(np.size(arrays[n])) for n in names)
    share = min(1.0, MAX_FIT_VALUES / max(total, 1))
    return {n: np.asarray(arrays[n]).reshape(-1)[:max(1, math.ceil(np.size(arrays[n]) * share))] for n in names}


def rounding_flips(x: Arrays, base: Arrays, names: Sequence[str]) -> bool:
    """x differs from `base` only by one BF16 step where it differs (median |x - base| at most 1.5 BF16
    ulps of the base's value): a sub-resolution fine-tune whose update crossed a rounding boundary here
    and there, not a masked merge, whose kept entries move by whole task-vector entries. Entries are
    bit-equal to the base in both, so MASK_EQUAL alone cannot tell them apart (bench/crawl_rate.py:
    13 false merges in 80 virtual 7B models; this gate alone left 12, whose base was not their parent:
    `uncovered_share` rejects those)."""
    steps = []
    for name in names:
        a, b = np.asarray(x[name], np.float32).ravel(), np.asarray(base[name], np.float32).ravel()
        moved = a != b
        if moved.any():
            kept = b[moved]
            steps.append(np.abs(a[moved] - kept) / _bf16_ulp(kept))
    return bool(steps) and float(np.median(np.concatenate(steps))) <= 1.5


def _bf16_ulp(values: np.ndarray) -> np.ndarray:
    """One BF16 step at each float32 value: 2^(exponent - 7) (8 bits of mantissa), read off the exponent
    bits (exact, where log2 in float32 rounds values just under a power of two up to it; 1.35x faster);
    magnitudes under 1e-30 count as 1e-30."""
    mag = np.maximum(np.abs(values), np.float32(1e-30))
    return (mag.view(np.uint32) & np.uint32(0x7F800000)).view(np.float32) * np.float32(2.0 ** -7)


def uncovered_share(x: Arrays, base: Arrays, parents: Sequence[Arrays], names: Sequence[str]) -> float:
    """Of the entries where x differs from `base`, the share where every one of `parents` equals it bit for
    bit: entries no parent's task vector touches, which no TIES / DARE / task-arithmetic merge of them can
    have moved (0 when x has no changed entry)."""
    changed = uncovered = 0
    for name in names:
        b = np.asarray(base[name])
        moved = np.asarray(x[name]) != b
        for parent in parents:
            moved &= np.asarray(parent[name]) == b
        uncovered += int(moved.sum())
        changed += int(np.count_nonzero(np.asarray(x[name]) != b))
    return uncovered / changed if changed else 0.0


def _masked(stored: _Stored, products: tuple[np.ndarray, np.ndarray, float], members: tuple[int, ...],
            min_share: float) -> MergeFit | None:
    """TIES / DARE: over each of `members` whose values the model keeps bit for bit in MASK_EQUAL of a
    changed layer's entries, fit the task vector x - base on the other members' (the base's weight is
    1 - sum w_i), judged against the nearest of the fit's own models (base and parents): a relative
    outside the fit may sit nearer -- an earlier merge of the same parents, or a fine-tune of one
    (bench/merge_methods.py: a DELLA merge 61 from a task-arithmetic merge of its parents, 88 from them)
    -- without being any explanation of the bit-equal entries. A fine-tune shares none of those in
    float32; in BF16 `rounding_flips` and `uncovered_share` turn away what masking did not make.
    The task vectors' products come from `fit`'s own (`products`, over the sorted candidates), not from
    a product per base: those took 60 % of a 7B crawl's merge step (0.04 s a base, 6 bases a fit)."""
    x, candidates, names, ids = stored.x, stored.candidates, stored.names, stored.ids
    g0, b0, xx0 = products
    singles = {i: max(xx0 - 2 * b0[i] + g0[i, i], 0.0) for i in members}
    best: MergeFit | None = None
    for k in members:
        base = ids[k]
        if len(members) < 3:
            break
        if stored.keyed.about("equal share", base, lambda: equal_share(x, candidates[base], names)) < MASK_EQUAL:  # noqa: B023
            continue
        others = [i for i in members if i != k]
        g, b, xx = _based(*products, k, others)
        r2, subset, coef = _best_subset(lambda sub: _residual(g, b, xx, sub), len(others), singles[k], _values(x, names))  # noqa: B023
        r1 = max(min([singles[k]] + [singles[others[i]] for i in subset]), 1e-300)
        fit_ = MergeFit(_parents([ids[i] for i in others], subset, coef, min_share), base, r2 / r1, base)
        if _descends(stored, base, fit_):
            continue
        if (fit_.is_merge and fit_.ratio < MASKED_RATIO
                and (best is None or fit_.ratio <= best.ratio * (1 + AFFINE_TIE))
                and not stored.keyed.about("rounding flips", base, lambda: rounding_flips(x, candidates[base], names))  # noqa: B023
                and uncovered_share(x, candidates[base], [candidates[p] for p, _ in fit_.parents], names) <= UNCOVERED_MAX):
            best = fit_ if best is None or fit_.ratio < best.ratio * (1 - AFFINE_TIE) else _base_of(stored, best, fit_)
    return best


def _descends(stored: _Stored, base: str, found: MergeFit) -> bool:
    """Whether `base` is a known merge of one of `found`'s parents. A masked merge's base is the ancestor its
    parents' task vectors start from; a merge descends from its own parents, so it is none of theirs.
    Without upload times nothing else bars it: a base fitted over its two fine-tunes came out a TIES merge of
    them over their own TIES merge (relations zoo undated: base-a as (a-ft1 0.53, a-ft2 0.47) over a-ties,
    ratio 0.49, inside the masking noise), and the family's source became a leaf."""
    return bool(stored.merge_parents.get(base, frozenset()) & {p for p, _ in found.parents})


def _base_of(stored: _Stored, first: MergeFit, second: MergeFit) -> MergeFit:
    """Two masked fits over different bases that explain x alike: with the same members, x - base is
    fitted over the same affine span whichever member is the base. The base is the member the merge did
    not mix in: on the entries x holds of none of its members (where task vectors were combined, not
    dropped nor kept alone) its coefficient is ~0 -- SCE's base-a 0.00 there against 0.41 over all
    entries, where its untouched half counts (bench/merge_methods.py). Else the first."""
    members = sorted({first.base, second.base} | {p for p, _ in first.parents} | {p for p, _ in second.parents})
    coef = _mixed_coefficients(stored, members)
    if coef is None:
        return first
    weight = dict(zip(members, np.abs(coef), strict=True))
    return second if weight[second.base] < weight[first.base] else first


def _mixed_coefficients(stored: _Stored, members: Sequence[str]) -> np.ndarray | None:
    """Least-squares coefficients of x over `members` on the entries x holds of none of them bit for bit."""
    xs = stored.wide.flat("")
    ys = np.stack([stored.wide.flat(m) for m in members])
    mixed = np.all(ys != xs[None, :], axis=0)
    if int(mixed.sum()) <= 4 * len(members):
        return None
    coef, *_ = np.linalg.lstsq(ys[:, mixed].T, xs[mixed], rcond=None)
    return coef


def _based(g: np.ndarray, b: np.ndarray, xx: float, k: int, keep: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """(G, b, ||x||^2) of the task vectors of candidates `keep` over candidate k, from the plain
    ones: <Y_i - Y_k, Y_j - Y_k> = G_ij - G_ik - G_jk + G_kk, <Y_i - Y_k, x - Y_k> = b_i - G_ik - b_k + G_kk.
    float64 over <= 2^20 values: rounding ~1e-13 of ||W||^2, against task vectors of >= 1e-6 of it (a
    sub-resolution BF16 update) -- far inside what the ratios and 0.01 weights resolve."""
    keep = list(keep)
    col = g[keep, k]
    gk = g[np.ix_(keep, keep)] - col[:, None] - col[None, :] + g[k, k]
    return gk, b[keep] - col - b[k] + g[k, k], float(xx - 2 * b[k] + g[k, k])


def set_aside_undated(links: Sequence[tuple[str, float]], others: Iterable[str],
                      distance: Callable[[str, str], float | None], merges: Container[str]) -> bool:
    """Whether a merge found without upload order (its time unknown or shared with its tree) is drawn out of
    its tree as a leaf and hung under its merge parents. One rule for both paths: batch's second pass
    (indexer.lineage.recover._merges) and the incremental's shown parents (index._shown_parents).

    Why set aside: a merge of two fine-tunes sits between them in the spanning tree (ft1 - merge - ft2),
    which is then rooted at it or beside it with the base below (relations zoo undated: 0.73). But only
    - merges of models that are no merges themselves (`merges`): without upload order a pile of merges fits
      over one another (held-out recipes undated), and drawing those out moved more rows wrong than right;
    - over a common base: another model (`others`) nearer each of the two heaviest parents than they are to
      each other, as fine-tunes of one base are (siblings of independent updates sit ~sqrt(2) times their
      base's distance apart). Without upload order a chain's middle P -> X -> C fits as a "merge" of P and
      C too (wild-tiny undated), and nothing but X lies between them.
    `links`: the merge parents; `distance(a, b)`: any metric, None when not measured."""
    if any(p in merges for p, _ in links):
        return False
    first, second = (p for p, _ in sorted(links, key=_heavier)[:2])
    apart = distance(first, second)
    if apart is None:
        return False

    def near(o: str, p: str) -> float:
        found = distance(o, p)
        return math.inf if found is None else found

    return any(max(near(o, first), near(o, second)) < apart for o in others if o not in (first, second))


def heaviest_parent(links: Sequence[tuple[str, float]]) -> str:
    """The merge parent of the largest weight (equal weights: the smaller id), whatever order a row holds
    the links in (`merge_row_parents` leads with the first usable one)."""
    return min(links, key=_heavier)[0]


def _heavier(link: tuple[str, float]) -> tuple[float, str]:
    return -link[1], link[0]


def merge_row_parents(node: str, links: Sequence[tuple[str, float]], parent_of: Mapping[str, str]
                      ) -> tuple[tuple[str, float], ...]:
    """A merge's parents for its row: heaviest first, led by the first one not below `node` in the tree
    (`parent_of`: child -> parent of every placed model; a merged model cannot be its own ancestor); ()
    when none is usable. One rule for both paths: the incremental index's `_merge_parents` and the batch
    recovery's merge rows call it."""
    def below(candidate: str) -> bool:
        seen, u = set(), candidate
        while u and u not in seen:
            if u == node:
                return True
            seen.add(u)
            u = parent_of.get(u, "")
        return False

    usable = [p for p in links if p[0] in parent_of and not below(p[0])]
    if len(links) < 2 or not usable:
        return ()
    first = usable[0]
    return (first, *[p for p in links if p != first])
