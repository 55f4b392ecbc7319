"""`index compare A B`: an auditor's question, "is B derived from A?", answered from the weights.

Steps:
    1. Load each side: a local repo folder (every learned float tensor, whole) or a Hub repo read by range
       with the crawl's plan (its headers, then at most the byte budget of planned rows; heads are not in
       the plan, so they are reported as not read). Names normalised (sketches.layers). A quantized copy
       (GGUF, GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors, MLX) is read by the crawl's reader and
       dequantized, locally too. An adapter (PEFT's, or a LoRA / LyCORIS file) is read by the crawl's
       reader as its factors, and compared as an adapter (`compare_adapter`): against a model, "was it
       trained on B?" -- B's shapes against its updates, its declared base, and a DoRA adapter's
       magnitudes against B's rows (a permutation test); against another adapter, "is one the other
       trained further?" -- the chain ratio of their updates (indexer.relations.adapters).
    2. Comparable: the two cores overlap by at least CORE_SHARE (sketches.layers.core_overlap); else the
       answer is "not comparable" and nothing else is computed.
    3. Related: the row-permutation test on the shared body layers (sketches.relatedness): Z, p-value.
    4. Distance: the spectral-tail distance on the shared dense layers (the pair rule's full-rank tier)
       and the relative L2 over all shared layers.
    5. Direction: bit-identical -> duplicate (the earlier upload is the original); else, when exactly one
       side is a quantized copy, that side is the child if it is within its scheme's predicted error of
       the other (indexer.relations.rules.copy_relative: AWQ's folded scales fitted away): "quantized";
       else the earlier upload is the parent when both times are known and differ; else kurtosis
       (specialisation lowers it: the model with the lower summed excess kurtosis of its output
       projections is the child), which is a weak cue (a coin flip on our full fine-tuning zoo) and is
       labelled so.
    6. Heads: every head tensor both have, with its two shapes, whether they match, and their distance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from errors import BadInputError, RepoNotFoundError
from indexer.lineage.methods import cast_dtype, cast_to, spectral_tail_distance
from indexer.readers import AdapterRead, QuantInfo, lora_arrays
from indexer.relations.merges import stored_dtypes
from indexer.relations.rules import (
    QUANT_FLOOR,
    QUANT_MULTIPLE,
    copy_relative,
    within_quantization_error,
)
from indexer.sources import local_created_at
from sketches.adapter import loose_layout
from sketches.experts import expert_alias, expert_index
from sketches.layers import (
    CORE_SHARE,
    canonical_tensors,
    core_overlap,
    is_head,
    select_layers,
)
from sketches.relatedness import relate
from sketches.safetensors import open_local_repo
from sketches.stats import model_stats

WHOLE = 1 << 60  # a local quantized copy is read whole, as `index recover` reads it


@dataclass(frozen=True)
class Side:
    """One model as loaded for a comparison."""

    name: str
    shapes: dict[str, tuple[int, ...]]  # every learned float tensor named in its headers (normalised)
    arrays: dict[str, np.ndarray]  # the tensors actually read
    created: datetime | None
    source: str  # "local" or the endpoint
    quant: QuantInfo | None = None  # a quantized copy: its scheme and predicted error
    adapter: AdapterRead | None = None  # an adapter: its config (arrays: its factors)


@dataclass(frozen=True)
class HeadMatch:
    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    match: bool
    relative_distance: float | None  # None: shapes differ or not read


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    comparable: bool
    core_overlap: float
    shared_layers: tuple[str, ...] = ()
    related: bool = False
    score: float = math.nan
    p_value: float = math.nan
    direction: str = "unknown"  # "A -> B", "B -> A", "duplicate", "unknown", "none" (not related)
    direction_why: str = ""
    tail_distance: float = math.nan
    relative_l2: float = math.nan
    identical: bool = False
    heads: tuple[HeadMatch, ...] = field(default=())
    quantized: str = ""  # "A" or "B": the side that is a quantized copy ("" when neither or both)
    scheme: str = ""  # its scheme (gguf-Q4_K, awq-4bit, mlx-4bit ...)
    copy_distance: float = math.nan  # the relative distance its label is judged on (scales fitted)
    copy_limit: float = math.nan  # QUANT_MULTIPLE x the scheme's predicted error + QUANT_FLOOR
    only_a: int = 0  # body matrices A holds and B lacks (a MoE's experts against a dense model, a new block)
    only_b: int = 0
    # a MoE against a dense model: the MoE's experts whose every matrix read is the other's MLP matrix of
    # that name, bit for bit (rounded to the MoE's dtype): mergekit-moe's copies (sketches.experts)
    expert_copies: tuple[int, ...] = ()
    experts_of: str = ""  # "A" or "B": the MoE side of `expert_copies`
    # "B" (or "A") and the dtype when that side holds the other's tensors cast to it, bit for bit (a BF16, F16
    # or plain F8 copy: `indexer.lineage.methods.cast_dtype`, the test batch and the index label by)
    cast_of: str = ""
    cast_dtype: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("score", "p_value", "tail_distance", "relative_l2", "copy_distance", "copy_limit"):
            if isinstance(out[key], float) and not math.isfinite(out[key]):
                out[key] = None if math.isnan(out[key]) else ("inf" if out[key] > 0 else "-inf")
        return out


# --- 1. loading ----------------------------------------------------------------------------------


def load_local(folder: Path) -> Side:
    from indexer.lineage.recover import _special, _untie
    from indexer.readers import looks_packed

    if _special(folder):  # GGUF, or a PEFT adapter
        return _load_with_reader(folder)
    with open_local_repo(folder) as weights:
        infos = weights.tensors()
        # a packed copy or an ONNX 8-bit one (dequantized), a LoRA file (its factors)
        if looks_packed(infos) or loose_layout(infos) or getattr(weights, "quantized", False):
            return _load_with_reader(folder)
        stored = canonical_tensors(infos)
        shapes = {n: tuple(infos[raw].shape) for n, raw in stored.items()}
        _untie(weights, stored, shapes)  # a tied lm_head saved twice, read once as the batch reads it
        arrays = {n: np.asarray(weights.read(stored[n]), dtype=np.float32) for n in sorted(stored)}
    return Side(str(folder), shapes, arrays, local_created_at(folder), "local")


def _load_with_reader(folder: Path) -> Side:
    """A GGUF or packed quantized folder through the crawl's reader, dequantized whole."""
    from indexer.crawl import read_folder

    read, _ = read_folder(folder, budget=WHOLE)
    shapes = {n: tuple(info.shape) for n, info in read.tensors.items()}
    return Side(str(folder), shapes, {n: np.asarray(a, np.float32) for n, a in read.arrays.items()},
                local_created_at(folder), "local", read.quant, read.adapter)


def load_hub(repo_id: str, *, endpoint: str, token: str | None, budget: int) -> Side:
    from indexer.crawl import read_model
    from indexer.sources import HubSource

    hub = HubSource(endpoint, token=token)
    entry = hub.model_info(repo_id)
    read = read_model(hub.repo(entry), budget=budget, have_token=token is not None)
    shapes = {n: tuple(info.shape) for n, info in read.tensors.items()}
    return Side(repo_id, shapes, {n: np.asarray(a, np.float32) for n, a in read.arrays.items()}, entry.created_at,
                endpoint, read.quant, read.adapter)


def load_side(spec: str, *, endpoint: str, token: str | None, budget: int) -> Side:
    """A folder when `spec` is one, else a Hub repo id (ORG/NAME); neither -> one line naming it."""
    path = Path(spec)
    if path.is_dir():
        return load_local(path)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/")):
        raise BadInputError(spec, "no such folder, and not a Hub repo id of the form ORG/NAME")
    try:
        return load_hub(spec, endpoint=endpoint, token=token, budget=budget)
    except RepoNotFoundError:
        raise BadInputError(spec, f"no such folder here and no such repo on {endpoint}") from None


# --- 2-6. the comparison ---------------------------------------------------------------------------


def compare(a: Side, b: Side) -> Comparison | AdapterComparison:
    if a.adapter is not None or b.adapter is not None:
        return compare_adapter(a, b)
    overlap = core_overlap(a.shapes, b.shapes)
    if overlap < CORE_SHARE:
        return Comparison(a.name, b.name, False, overlap)
    shared = tuple(sorted(n for n in a.arrays if n in b.arrays and a.arrays[n].shape == b.arrays[n].shape
                          and a.arrays[n].ndim in (2, 4)))
    body = [n for n in shared if not is_head(n)]
    if not body:
        return Comparison(a.name, b.name, False, overlap)
    test = relate([a.arrays[n] for n in body], [b.arrays[n] for n in body])
    tail, rel = _distances(a, b, body)
    identical = _identical(a, b)
    copy = _copy(a, b, body, rel)
    cast_of, dtype = _cast(a, b) if not identical else ("", "")
    if cast_of:
        source = "A" if cast_of == "B" else "B"
        direction = "A -> B" if cast_of == "B" else "B -> A"
        why = (f"{cast_of} is {source} cast to {dtype}, bit for bit: rounding makes no information, so the wider "
               f"one is the source whatever the upload times say")
    elif copy is not None and copy[2] and test.related and not identical:
        side = copy[0]
        direction = "A -> B" if side == "B" else "B -> A"
        other = "A" if side == "B" else "B"
        why = (f"{side} is a quantized copy ({copy[1]}) of {other}, or of a fine-tune of {other} closer than its "
               f"rounding: within its scheme's predicted error (distance {copy[3]:.3g} <= {copy[4]:.3g}); "
               "quantized models are leaves (99.4 % on the Hub)")
    elif test.related or identical:
        direction, why = _direction(a, b, body, identical)
    else:
        direction, why = "none", "not related: there is no lineage to orient"
    side, scheme, _, distance, limit = copy if copy is not None else ("", "", False, math.nan, math.nan)
    only_a, only_b = (len(_body_matrices(x) - _body_matrices(y)) for x, y in ((a, b), (b, a)))
    experts_of, copies = _expert_copies(a, b)
    return Comparison(a.name, b.name, True, overlap, tuple(body), test.related, test.score, test.p_value,
                      direction, why, tail, rel, identical, _heads(a, b), side, scheme, distance, limit,
                      only_a, only_b, copies, experts_of, cast_of, dtype)


def _cast(a: Side, b: Side) -> tuple[str, str]:
    """("B", dtype) when B is A cast to dtype bit for bit (every tensor both read), ("A", dtype) the other way."""
    common = sorted(n for n in a.arrays if n in b.arrays)
    x, y = {n: a.arrays[n] for n in common}, {n: b.arrays[n] for n in common}
    for label, source, copy in (("B", x, y), ("A", y, x)):
        dtype = cast_dtype(source, copy)
        if dtype:
            return label, dtype
    return "", ""


def _body_matrices(side: Side) -> set[str]:
    return {n for n, shape in side.shapes.items() if len(shape) in (2, 4) and not is_head(n)}


def _expert_copies(a: Side, b: Side) -> tuple[str, tuple[int, ...]]:
    """("A" or "B", the experts of that side that are the other side's MLP, bit for bit), or ("", ())."""
    for label, moe, dense in (("A", a, b), ("B", b, a)):
        matrices: dict[int, list[bool]] = {}
        for name, array in moe.arrays.items():
            alias, expert = expert_alias(name), expert_index(name)
            if alias is None or expert is None or alias not in dense.arrays or dense.arrays[alias].shape != array.shape:
                continue
            source = np.asarray(dense.arrays[alias], dtype=np.float32)
            dtype = stored_dtypes({name: array}, [name])[0]  # a BF16 MoE of F32 sources holds them rounded
            matrices.setdefault(expert, []).append(
                bool(np.array_equal(cast_to(source, dtype) if dtype else source, array)))
        if matrices:
            return label, tuple(e for e, same in sorted(matrices.items()) if all(same))
    return "", ()


def _copy(a: Side, b: Side, body: list[str], rel: float) -> tuple[str, str, bool, float, float] | None:
    """(side, scheme, within its error, the distance judged, the limit) when exactly one side is a
    quantized copy, else None."""
    if (a.quant is None) == (b.quant is None):
        return None
    side, quant = ("A", a.quant) if a.quant is not None else ("B", b.quant)
    assert quant is not None
    distance = copy_relative(rel, {n: a.arrays[n] for n in body}, {n: b.arrays[n] for n in body}, quant.predicted_error)
    limit = QUANT_MULTIPLE * quant.predicted_error + QUANT_FLOOR
    return side, quant.scheme, within_quantization_error(distance, quant.predicted_error), distance, limit


def _distances(a: Side, b: Side, body: list[str]) -> tuple[float, float]:
    dense = select_layers([{n: a.arrays[n].shape for n in body}], scheme="shared").dense or tuple(body)
    stacked = [np.stack([a.arrays[n], b.arrays[n]]) for n in dense]
    tail = float(spectral_tail_distance(stacked, device="cpu")[0, 1])
    diff = sum(float(np.sum((a.arrays[n].astype(np.float64) - b.arrays[n]) ** 2)) for n in body)
    scale = sum((float(np.sum(a.arrays[n].astype(np.float64) ** 2)) + float(np.sum(b.arrays[n].astype(np.float64) ** 2))) / 2
                for n in body)
    return tail, math.sqrt(diff / scale) if scale > 0 else 0.0


def _identical(a: Side, b: Side) -> bool:
    names = set(a.arrays) | set(b.arrays)
    return set(a.shapes) == set(b.shapes) and all(
        n in a.arrays and n in b.arrays and a.arrays[n].shape == b.arrays[n].shape
        and np.array_equal(a.arrays[n], b.arrays[n]) for n in names)


def _direction(a: Side, b: Side, body: list[str], identical: bool) -> tuple[str, str]:
    if identical:
        first = _earlier(a, b)
        return "duplicate", (f"bit-identical; the original is {first} (uploaded first)" if first
                             else "bit-identical; upload times do not say which is the original")
    first = _earlier(a, b)
    if first is not None:
        return ("A -> B" if first == a.name else "B -> A"), "upload time: a parent is uploaded before its child (99.7 % on the Hub)"
    layers = select_layers([{n: a.arrays[n].shape for n in body}], scheme="shared").direction
    ku_a = model_stats({n: a.arrays[n] for n in layers}).kurtosis_sum(layers)
    ku_b = model_stats({n: b.arrays[n] for n in layers}).kurtosis_sum(layers)
    if not (math.isfinite(ku_a) and math.isfinite(ku_b)) or ku_a == ku_b:
        return "unknown", "no upload times and no kurtosis difference"
    arrow = "A -> B" if ku_a > ku_b else "B -> A"
    return arrow, (f"weak cue: kurtosis {ku_a:.3g} (A) vs {ku_b:.3g} (B), specialisation lowers it; "
                   "no upload times to confirm")


def _earlier(a: Side, b: Side) -> str | None:
    if a.created is None or b.created is None or a.created == b.created:
        return None
    return a.name if a.created < b.created else b.name


def _heads(a: Side, b: Side) -> tuple[HeadMatch, ...]:
    out = []
    for name in sorted(n for n in a.shapes if n in b.shapes and is_head(n)):
        sa, sb = a.shapes[name], b.shapes[name]
        dist = None
        if sa == sb and name in a.arrays and name in b.arrays:
            x, y = a.arrays[name].astype(np.float64), b.arrays[name].astype(np.float64)
            scale = math.sqrt((float(np.sum(x * x)) + float(np.sum(y * y))) / 2)
            dist = float(np.linalg.norm(x - y)) / scale if scale > 0 else 0.0
        out.append(HeadMatch(name, sa, sb, sa == sb, dist))
    return tuple(out)


def render(c: Comparison | AdapterComparison) -> str:
    """The comparison as a few readable lines."""
    if isinstance(c, AdapterComparison):
        return _render_adapter(c)
    if not c.comparable:
        return f"not comparable: {c.a} and {c.b} share {c.core_overlap:.0%} of their core (need {CORE_SHARE:.0%})"
    p = "< 1e-300" if c.p_value == 0 else f"{c.p_value:.3g}"
    lines = [
        f"comparable: {len(c.shared_layers)} shared layers ({c.core_overlap:.0%} of the smaller core)",
        f"related: {'yes' if c.related else 'no'} (Z = {c.score:.1f}, p = {p})",
        f"direction: {c.direction} ({c.direction_why})",
        f"distance: spectral tail {c.tail_distance:.4g}, relative L2 {c.relative_l2:.4g}"
        + (" (bit-identical)" if c.identical else ""),
    ]
    if c.quantized:
        lines.append(f"quantized: {c.quantized} is quantized ({c.scheme}); distance {c.copy_distance:.3g} against the "
                     f"{c.copy_limit:.3g} its scheme allows ({'within' if c.copy_distance <= c.copy_limit else 'beyond'}"
                     " it: " + ("a quantized copy" if c.copy_distance <= c.copy_limit else "a fine-tune of a quantized copy, or of a relative") + ")")
    if c.cast_of:
        lines.append(f"cast: {c.cast_of} is {'A' if c.cast_of == 'B' else 'B'} cast to {c.cast_dtype}, bit for bit")
    if c.only_a or c.only_b:
        lines.append(f"not compared: {c.only_a} matrices only in A, {c.only_b} only in B")
    if c.experts_of:
        dense = "B" if c.experts_of == "A" else "A"
        lines.append(f"experts: {c.experts_of}'s experts {list(c.expert_copies)} are {dense}'s MLP, bit for bit"
                     if c.expert_copies else f"experts: none of {c.experts_of}'s experts is {dense}'s MLP")
    heads = [f"{h.name} {list(h.shape_a)} vs {list(h.shape_b)}: "
             + ("same shape" + (f", relative distance {h.relative_distance:.3g}" if h.relative_distance is not None else ", not read")
                if h.match else "different shapes")
             for h in c.heads]
    lines.append("heads: " + ("; ".join(heads) if heads else "none in common"))
    return "\n".join(lines)


def side_summary(side: Side) -> Mapping[str, object]:
    return {"name": side.name, "tensors": len(side.shapes), "read": len(side.arrays), "source": side.source}


# --- adapters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterComparison:
    """`compare_adapter`'s answer: an adapter against a model, or two adapters."""

    a: str
    b: str
    kind: str  # "adapter-model" (A or B the adapter) or "adapter-adapter"
    adapter: str  # "A", "B" or "both"
    declared_base: str  # what the adapter (A's, when both) names as its base
    verdict: str = "unknown"  # adapter-model: compatible / incompatible with the model's shapes
    matched: int = 0  # updated tensors found in the model with the update's shape
    updates: int = 0  # updated tensors the adapter holds (that were read)
    reasons: tuple[str, ...] = ()
    magnitudes: dict[str, object] | None = None  # a DoRA adapter's magnitudes against the model's rows
    chain_ratio: float = math.nan  # adapter-adapter: sum ||U - V||^2 / sum (||U||^2 + ||V||^2)
    continued: bool = False  # ... below CHAIN_RATIO: one run trained further
    direction: str = "unknown"
    conclusion: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not math.isfinite(self.chain_ratio):
            out["chain_ratio"] = None
        return out


def compare_adapter(a: Side, b: Side) -> AdapterComparison:
    """An adapter against a model (was it trained on B?) or against another adapter (is one the other
    trained further?), from the indexer's own rules (indexer.relations.adapters)."""
    from indexer.relations.adapters import (
        CHAIN_RATIO,
        Peer,
        base_confidence,
        base_verdict,
        chain_ratio,
        decisive,
        earlier,
        total_norm,
        with_magnitudes,
    )
    from sketches.adapter import lora_updates

    if a.adapter is not None and b.adapter is not None:
        ua, ub = (lora_updates(s.adapter.config, lora_arrays(s.arrays)) for s in (a, b))  # type: ignore[union-attr]
        ratio = chain_ratio(ua, ub)
        continued = ratio is not None and ratio < CHAIN_RATIO
        direction, conclusion = "none", "independent runs: their updates share nothing (ratio ~1)"
        if ratio is None:
            conclusion = "no updated tensor in common: not comparable"
        elif continued:
            pa = Peer(a.name, a.created.timestamp() if a.created else None, total_norm(ua))
            pb = Peer(b.name, b.created.timestamp() if b.created else None, total_norm(ub))
            direction = "A -> B" if earlier(pa, pb) else "B -> A"
            why = "upload time" if pa.created is not None and pb.created is not None and pa.created != pb.created \
                else "update norm (training further grows it)"
            conclusion = f"one run trained further ({direction}, by {why})"
        return AdapterComparison(a.name, b.name, "adapter-adapter", "both", a.adapter.config.base_model,
                                 updates=len(set(ua) & set(ub)), chain_ratio=math.nan if ratio is None else ratio,
                                 continued=continued, direction=direction, conclusion=conclusion)
    side, ad, model = ("A", a, b) if a.adapter is not None else ("B", b, a)
    assert ad.adapter is not None
    updates = lora_updates(ad.adapter.config, lora_arrays(ad.arrays))
    compat = base_verdict(updates, ad.adapter.saved, model.shapes, layout=ad.adapter.config.layout)
    fit = with_magnitudes(compat, updates, model.arrays) if compat is not None else None
    confidence = base_confidence(compat, fit)
    declared = ad.adapter.config.base_model
    names_it = model.name.lower().rstrip("/").endswith(declared.lower().rstrip("/"))
    conclusion = {1.0: "fits: B's shapes take every update" if side == "A" else "fits: A's shapes take every update",
                  0.0: "does not fit: an update has no tensor of its shape in the model",
                  0.5: "unknown: the model's names are none of the adapter's"}[confidence]
    if fit is not None and not fit.related and decisive(fit):
        conclusion = ("shapes fit, but the DoRA magnitudes do not follow the model's rows: trained on another "
                      "model of this shape, or moved far by a long run")
    elif fit is not None and fit.related:
        conclusion += "; the DoRA magnitudes follow its rows (trained on it or on a relative of it)"
    return AdapterComparison(
        a.name, b.name, "adapter-model", side, declared, compat.verdict if compat else "unknown",
        compat.matched if compat else 0, len(updates), compat.reasons[:3] if compat else (),
        None if fit is None else fit.details() | {"decisive": decisive(fit)},
        direction=("A -> B" if side == "B" else "B -> A") if confidence == 1.0 else "unknown",
        conclusion=conclusion + ("" if names_it else f" (it declares {declared!r})"))


def _render_adapter(c: AdapterComparison) -> str:
    if c.kind == "adapter-adapter":
        ratio = "n/a" if math.isnan(c.chain_ratio) else f"{c.chain_ratio:.3g}"
        return "\n".join([f"adapters: both (A declares {c.declared_base!r})",
                          f"chain ratio: {ratio} over {c.updates} shared updates (a continued run < 0.5, independent ~1)",
                          f"direction: {c.direction}", f"conclusion: {c.conclusion}"])
    lines = [f"adapter: {c.adapter} (declares base {c.declared_base!r})",
             f"shapes: {c.verdict}, {c.matched} of {c.updates} updates fit" + (f" ({'; '.join(c.reasons)})" if c.reasons else "")]
    if c.magnitudes is not None:
        m = c.magnitudes
        lines.append(f"DoRA magnitudes: {'follow' if m['related'] else 'do not follow'} the model's rows "
                     f"(Z = {m['score']}, p = {m['p_value']}, {m['modules']} weights, {m['rows']} rows"
                     + ("" if m["decisive"] else "; too few rows to tell") + ")")
    lines += [f"direction: {c.direction}", f"conclusion: {c.conclusion}"]
    return "\n".join(lines)
