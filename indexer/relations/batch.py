"""Relations in a batch recovery (`indexer.lineage.recover`): the incremental index's rules
(indexer.incremental.index), applied once to a whole folder, so that batch == incremental per model
(parent, relation, merge parents).

Quantized copies (GGUF, packed safetensors; read and dequantized by `indexer.readers`, the crawl's own
readers) stay out of the method's tree: the incremental index makes them leaves by a penalty on every
edge out of them (Hub: quantized models are leaves in 99.41 % of documented edges). Each hangs under the
relative whose edge into it is cheapest, measured by the incremental's pair step itself
(`indexer.incremental.exact.measure` and `edge_weights`): among the related full-precision models; only
when none relates, among the related quantized copies listed before it (upload time, then predicted
error, then id: a strict order, so no cycle). Label: `quantized` when its relative distance to that
parent is within QUANT_MULTIPLE x the scheme's predicted error (+ QUANT_FLOOR), else `finetune`. These
numbers, LEAF_PENALTY and MERGE_CANDIDATES are `indexer.relations.rules`', shared with the index.

Merges: every model of a `mother` tree is fitted (`indexer.relations.merges.fit`) over its pool among
the rest of the tree (`indexer.relations.pool.merge_pool`: the MERGE_CANDIDATES nearest uploaded no
later, no re-uploads, then the likeliest TIES / DARE base), the rule the incremental index applies to
the related models it has measured. A merge's row takes as parent its heaviest merge parent that is not below it in the tree
(`indexer.relations.merges.merge_row_parents`, which the index's `_merge_parents` calls too), and lists
every parent with its weight.

Adapters: the declared base is resolved among the folder's models (`indexer.relations.adapters.
resolve_base`: exact id, any case, the tail of a local path), else kept as an external parent by name;
the family is the base's, else the one whose shapes the LoRA updates fit; the verdict checks the updates
(and `modules_to_save`) against the base's header shapes, and a DoRA adapter's magnitudes against the
base's rows (`indexer.relations.adapters.base_magnitudes`). Chains: the parent is the related adapter of
the same base (update ratio < CHAIN_RATIO) uploaded before it (`earlier`) with the smallest ratio, which
is where the incremental's `_chain` leaves every adapter once all have arrived (it compares the k
nearest in update norm; a base with more than k adapters may differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from errors import BadInputError
from indexer.incremental.exact import (
    DEFAULT_PENALTY,
    ModelView,
    PairMeasure,
    edge_weights,
    measure,
)
from indexer.lineage.confidence import calibrated
from indexer.readers import AdapterRead, QuantInfo, lora_arrays
from indexer.relations.adapters import (
    CHAIN_RATIO,
    Bases,
    Peer,
    base_confidence,
    base_magnitudes,
    base_verdict,
    chain_ratio,
    earlier,
    family_by_shapes,
    resolve_base,
    total_norm,
)
from indexer.relations.merges import PairCache, fit
from indexer.relations.pool import fit_order, pair_table, tree_pool
from indexer.relations.rules import (
    LEAF_PENALTY,
    copy_relative,
    within_quantization_error,
)
from sketches.adapter import (
    Compatibility,
    LoraUpdate,
    lora_updates,
)
from sketches.layers import is_head, select_layers
from sketches.sketch import sketch_layers
from sketches.stats import model_stats

Arrays = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class QuantCopy:
    """A quantized repo, dequantized: blocks under normalised Hugging Face names."""

    repo_id: str
    family: str
    shapes: Shapes
    arrays: Arrays
    quant: QuantInfo
    created: float | None


@dataclass(frozen=True)
class AdapterRepo:
    """An adapter repo: its config and saved-module shapes (AdapterRead) and its LoRA factors."""

    repo_id: str
    read: AdapterRead
    arrays: Arrays
    created: float | None


@dataclass(frozen=True)
class Placed:
    """Where a relation step put a model: parent ("" root), relation, and the rest of its row."""

    repo_id: str
    parent: str
    relation: str
    distance: float = math.nan
    confidence: float = math.nan
    parents: tuple[tuple[str, float], ...] = ()  # (repo_id, weight), heaviest first
    anchor: str = ""  # adapters: the base (a folder model, or the declared name when external)
    external: bool = False
    family: str = ""
    verdict: str = ""  # adapters: compatible | incompatible | unknown


# --- the views the pair step compares --------------------------------------------------------------


def compared_arrays(arrays: Arrays) -> dict[str, np.ndarray]:
    """What the incremental compares of a model (its `_prepare`): the sketched body layers and the heads,
    float32. The merge fit runs on these too, so that batch and incremental fit the same numbers
    (relations zoo seed 1: on every tensor, b-dare's 0.50 / 0.50 weights came out in the other order)."""
    kept = {n: np.asarray(arrays[n], dtype=np.float32) for n in sketch_layers(arrays)}
    return kept | {n: np.asarray(a, dtype=np.float32) for n, a in arrays.items() if is_head(n)}


def pair_view(repo_id: str, arrays: Arrays, created: float | None) -> ModelView:
    """The incremental's view of a model: `compared_arrays`, the sketched layers' kurtosis and norms, and
    mother's direction layers."""
    names = sketch_layers(arrays)
    stats = model_stats({n: arrays[n] for n in names})
    kept = compared_arrays(arrays)
    try:
        direction = select_layers([{n: tuple(np.shape(arrays[n])) for n in names}], scheme="shared").direction
    except BadInputError:  # as the index's `_direction_layers`: no shared layer to narrow
        direction = tuple(names)
    return ModelView(repo_id, kept, {s.name: s.kurtosis for s in stats.layers}, {s.name: s.l2 for s in stats.layers},
                     created, direction)


# --- quantized copies --------------------------------------------------------------------------------


def quantized_label(relative: float, quant: QuantInfo) -> str:
    """The incremental's `_relation` for a quantized child: within its scheme's predicted error."""
    return "quantized" if within_quantization_error(relative, quant.predicted_error) else "finetune"


def _before(a: QuantCopy, b: QuantCopy) -> bool:
    """a listed before b: upload time, then the more precise copy, then id (a strict order)."""
    if a.created is not None and b.created is not None and a.created != b.created:
        return a.created < b.created
    if a.quant.predicted_error != b.quant.predicted_error:
        return a.quant.predicted_error < b.quant.predicted_error
    return a.repo_id < b.repo_id


def _cheapest(copy: QuantCopy, pairs: Sequence[PairMeasure], created: Mapping[str, float | None],
              extra: float) -> tuple[PairMeasure, float] | None:
    """The related pair whose edge into the copy weighs least, and its margin over the runner-up (the
    index's `_confidence`: tanh of half the gap in log units; 1 without a rival)."""
    ranked = []
    for pair in pairs:
        if pair.related:
            (_, w_in), _ = edge_weights(pair, copy.created, created[pair.other], penalty=DEFAULT_PENALTY)
            ranked.append((w_in + extra, pair.other, pair))
    if not ranked:
        return None
    ranked.sort(key=lambda t: (t[0], t[1]))  # deterministic: weight, then id
    margin = 1.0 if len(ranked) == 1 else math.tanh(max(0.0, ranked[1][0] - ranked[0][0]) / 2.0)
    return ranked[0][2], margin


def place_quantized(copies: Sequence[QuantCopy], views: Mapping[str, ModelView], *, device: str = "cpu") -> dict[str, Placed]:
    """Each copy under its cheapest related relative (module docstring); a root when nothing relates."""
    out: dict[str, Placed] = {}
    own = {c.repo_id: pair_view(c.repo_id, c.arrays, c.created) for c in copies}
    created = {r: v.created for r, v in views.items()} | {c.repo_id: c.created for c in copies}
    for copy in sorted(copies, key=lambda c: c.repo_id):
        full = measure(own[copy.repo_id], [views[r] for r in sorted(views)], device=device) if views else []  # type: ignore[arg-type]
        found = _cheapest(copy, full, created, 0.0)
        if found is None:  # no full-precision relative: an earlier quantized copy, penalised as the index does
            earlier_copies = [own[c.repo_id] for c in copies if c.family == copy.family and _before(c, copy)]
            found = _cheapest(copy, measure(own[copy.repo_id], earlier_copies, device=device), created,  # type: ignore[arg-type]
                              LEAF_PENALTY) if earlier_copies else None
        if found is None:
            out[copy.repo_id] = Placed(copy.repo_id, "", "", family=copy.family)
            continue
        pair, margin = found
        timed = copy.created is not None and created[pair.other] is not None
        other = views.get(pair.other) or own[pair.other]
        predicted = min([copy.quant.predicted_error] + [c.quant.predicted_error for c in copies if c.repo_id == pair.other])
        relative = copy_relative(pair.relative, own[copy.repo_id].arrays, other.arrays, predicted)
        out[copy.repo_id] = Placed(copy.repo_id, pair.other, quantized_label(relative, copy.quant),
                                   distance=pair.tier_distance, confidence=calibrated(margin, timed=timed),
                                   parents=((pair.other, 1.0),), family=copy.family)
    return out


# --- merges ------------------------------------------------------------------------------------------


def find_merges(trees: Sequence[Sequence[str]], arrays: Mapping[str, Arrays],
                created: Mapping[str, float | None],
                declared: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[tuple[str, float], ...]]:
    """merge -> its parents with weights, over each tree (module docstring), fitted in `fit_order`: each
    fit knows which of its earlier relatives are merges themselves. `declared`: the base models each
    model's card names (the pool takes them first, `indexer.relations.pool.declared_relatives`)."""
    declared = declared or {}
    found: dict[str, tuple[tuple[str, float], ...]] = {}
    known: dict[str, list[str]] = {}  # merge -> its parents' ids, as the pool and the fit read them
    cache = PairCache()  # pools overlap: a pair is multiplied once
    for tree in trees:
        stats = pair_table(tree, arrays)
        for x in sorted(tree, key=lambda r: fit_order(created.get(r), r)):
            pool = tree_pool(x, tree, stats, arrays, created, known, declared.get(x, ()))
            result = (fit(arrays[x], {r: arrays[r] for r in pool}, merges={r: known[r] for r in pool if r in known},
                          cache=cache, keys={r: r for r in pool}, x_key=x)
                      if len(pool) >= 2 else None)
            if result is not None and result.is_merge:
                found[x] = result.parents
                known[x] = [p for p, _ in result.parents]
    return found


# --- adapters ------------------------------------------------------------------------------------------


def place_adapters(adapters: Sequence[AdapterRepo], models: Mapping[str, tuple[str, Shapes]],
                   families: Mapping[str, Shapes], bases: Bases | None = None) -> dict[str, Placed]:
    """Every adapter under its base or the adapter it continues (module docstring). `models`: every placed
    model of the folder -> (family, header shapes); `families`: family -> shapes (for unresolved bases);
    `bases`: where a DoRA adapter's base rows are read from (`base_magnitudes`)."""
    lowered: dict[str, str] = {}
    for r in sorted(models, reverse=True):  # the smallest id wins a case-insensitive clash, as the index's
        lowered[r.lower()] = r

    def known(name: str) -> str | None:
        return name if name in models else lowered.get(name.lower())

    updates: dict[str, dict[str, LoraUpdate]] = {}
    first: dict[str, tuple[str, bool, str, Compatibility | None, float]] = {}
    for a in sorted(adapters, key=lambda a: a.repo_id):
        updates[a.repo_id] = lora_updates(a.read.config, lora_arrays(a.arrays))
        declared = a.read.config.base_model.strip()
        anchor = resolve_base(declared, known)
        family = models[anchor][0] if anchor else family_by_shapes(updates[a.repo_id], a.read.saved, families)
        # the base's header, the shapes the index checks against, else those of the arrays batch read
        header = bases.shapes(anchor) if anchor and bases is not None else None
        shapes = header or (models[anchor][1] if anchor else families.get(family))
        compat = base_verdict(updates[a.repo_id], a.read.saved, shapes, layout=a.read.config.layout)
        magnitudes = base_magnitudes(compat, updates[a.repo_id], bases, anchor) if anchor else None
        first[a.repo_id] = (anchor or declared, anchor is None, family, compat, base_confidence(compat, magnitudes))
    return {a.repo_id: _chain_place(a, first, updates, adapters) for a in adapters}


def _chain_place(a: AdapterRepo, first: Mapping[str, tuple[str, bool, str, Compatibility | None, float]],
                 updates: Mapping[str, Mapping[str, LoraUpdate]], adapters: Sequence[AdapterRepo]) -> Placed:
    anchor, external, family, compat, confidence = first[a.repo_id]
    me = Peer(a.repo_id, a.created, total_norm(updates[a.repo_id]))
    best: tuple[float, str] | None = None
    for b in adapters:
        if b.repo_id == a.repo_id or first[b.repo_id][0] != anchor:
            continue
        peer = Peer(b.repo_id, b.created, total_norm(updates[b.repo_id]))
        ratio = chain_ratio(updates[a.repo_id], updates[b.repo_id])
        if ratio is not None and ratio < CHAIN_RATIO and earlier(peer, me) and (best is None or (ratio, b.repo_id) < best):
            best = (ratio, b.repo_id)
    verdict = compat.verdict if compat is not None else "unknown"
    if best is not None:
        return Placed(a.repo_id, best[1], "adapter", best[0], 1.0 - best[0] / CHAIN_RATIO, ((best[1], 1.0),),
                      anchor, external, family, verdict)
    return Placed(a.repo_id, anchor, "adapter", math.nan, confidence, ((anchor, 1.0),), anchor, external, family, verdict)
