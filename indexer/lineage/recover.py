"""Recover the forest of a local folder of model repos: load, group by family, run a method, report rows.

Folder layout: any directory under DIR that holds `*.safetensors` (or a sharded index), a top-level
`*.gguf` or an `adapter_config.json` is one repo, its id the relative path (`org/name`); so is a diffusers
pipeline (`model_index.json`), read through its denoiser folder as the crawl reads it. `DIR/hub.json` ({"version": 1, "repos": {id: {"createdAt": ...}}}),
when present, gives each repo's upload time. Model cards (README.md) are never opened here: the declared
`base_model` is for `indexer.evaluate` only.

Steps, per model: 1. read the safetensors header (shapes only); 2. family key from the body shapes;
per family: 3. choose the layers the method compares; 4. read only those tensors and compute their
statistics in the same pass; a model with a NaN or infinite weight becomes a failed row; 5. run the
method; 6. relations (indexer.relations.batch, the incremental index's rules): merges among the method's
trees, quantized copies and adapters placed beside them; 7. one `ForestRow` per model, sorted by repo id.

Repos that are not plain safetensors -- adapters, GGUF files, packed quantized safetensors (GPTQ, AWQ,
bitsandbytes, FP8, compressed-tensors) -- are read by the crawl's own reader (`indexer.crawl.read_model`
over `indexer.sources.LocalRepo`, a budget large enough to read every planned tensor whole): one parser
per format, and a bad file (a GGUF cut in its header, an unknown quantization type, a tensor past the
end, an adapter_config.json that is not JSON or names no base) is the same one-line failure the crawl
records (`indexer.crawl.classify`), the rest of the folder recovered.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import norm

from errors import (
    AdapterError,
    BadInputError,
    ModelGraphError,
    RecoveryError,
    UnsupportedModelError,
)
from indexer.hub_emulator.repos import PULL_REQUEST_DIR
from indexer.lineage.cluster import ward_tree
from indexer.lineage.methods import Family, Lineage, Options, recover_family
from indexer.readers import lora_arrays
from indexer.relations.batch import (
    AdapterRepo,
    Placed,
    QuantCopy,
    compared_arrays,
    find_merges,
    pair_view,
    place_adapters,
    place_quantized,
)
from indexer.relations.merges import (
    heaviest_parent,
    merge_row_parents,
    set_aside_undated,
)
from indexer.relations.pool import squared_distance
from indexer.sources import (
    hf_cache_repo_id,
    hf_cache_snapshot,
    local_conversion,
    local_declared_bases,
)
from sketches.adapter import lora_updates
from sketches.distances import l2_distance
from sketches.layers import (
    Scheme,
    canonical_tensors,
    family_key,
    merge_families,
    select_layers,
    tied_heads,
    wrapper_depth,
)
from sketches.safetensors import local_denoiser, open_local_repo
from sketches.stats import model_stats

logger = logging.getLogger(__name__)

Status = Literal["ok", "failed"]
FOREST_VERSION = 3  # 2: relation, confidence, related_score, p_value, margin columns; 3: parents, bytes_read
# Batch reads every planned tensor whole: a budget no model reaches (the plan then reads its tensors whole)
WHOLE_MODEL = 1 << 60


@dataclass(frozen=True)
class ForestRow:
    """One model: its recovered parent ("" for a root), tree, distance and direction score."""

    repo_id: str
    parent: str
    cluster: int  # global tree id; -1 for a failed model
    distance: float  # D(parent, model) before the direction penalty; NaN for a root
    direction_score: float  # the method's direction statistic (summed kurtosis; parameter norm for phylogeny)
    family: str
    method: str
    status: Status = "ok"
    reason: str = ""
    relation: str = ""  # finetune | duplicate | adapter | quantized | merge for an edge, "" for a root or a failure
    confidence: float = math.nan  # the probability the parent is right (indexer.lineage.confidence)
    related_score: float = math.nan  # the relatedness test's Z with the parent (sketches.relatedness)
    p_value: float = math.nan  # its one-sided p-value
    margin: float = math.nan  # the relative margin of the parent over the runner-up (confidence's input)
    # (repo_id, weight), heaviest first, as the export's `parents`: ((parent, 1.0),) for one parent, several
    # for a merge, () for a root
    parents: tuple[tuple[str, float], ...] = ()
    bytes_read: int = 0  # bytes read from its files (headers and tensors)


@dataclass(frozen=True)
class Forest:
    rows: tuple[ForestRow, ...]
    notes: tuple[str, ...] = ()

    def parents(self) -> dict[str, str]:
        return {r.repo_id: r.parent for r in self.rows if r.status == "ok"}

    def failures(self) -> tuple[ForestRow, ...]:
        return tuple(r for r in self.rows if r.status == "failed")


@dataclass(frozen=True)
class _Loaded:
    repo_id: str
    path: Path
    shapes: dict[str, tuple[int, ...]]  # normalised name -> shape, learned float tensors only
    family: str
    stored: dict[str, str]  # normalised name -> the name in the file
    dtype: str = "F32"  # the stored dtype of most of its values (a dtype copy is told by it)
    copy_rank: tuple[int, int] = (0, 0)  # (wrapper prefixes, -tensors in its files): which copy is the original


# --- discovery -----------------------------------------------------------------------------------


REPO_MARKERS = ("model.safetensors.index.json", "adapter_config.json", "tf_model.h5",  # sketches.tfh5
                "flax_model.msgpack")  # sketches.flax


def _is_repo(folder: Path) -> bool:
    """Weights or an adapter at the top, an ONNX export (at the top or in `onnx/`, sketches.onnx), or PR
    revisions (a pickle-only repo's conversion PR: the crawl's reader decides, `indexer.crawl.repo_layout`)."""
    return (any(f.suffix in (".safetensors", ".gguf") or f.name in REPO_MARKERS for f in folder.iterdir() if f.is_file())
            or (folder / PULL_REQUEST_DIR).is_dir() or _onnx_export(folder))


def _onnx_export(folder: Path) -> bool:
    """An ONNX export's files (`sketches.onnx.choose_onnx_files`): read by the crawl's reader."""
    from sketches.onnx import choose_onnx_files

    return choose_onnx_files(f.relative_to(folder).as_posix() for f in (*folder.glob("*.onnx"), *folder.glob("onnx/*.onnx"))
                       if f.is_file()) is not None


def _weights_folder(folder: Path, repo_id: str) -> Path:
    """Where a repo's safetensors are: a pickle-only zoo repo's conversion PR folder, as the crawl reads it
    (indexer.sources.local_conversion), else the repo's own folder."""
    if any(f.suffix == ".safetensors" for f in folder.iterdir()):
        return folder
    found = local_conversion(folder, repo_id)
    return found[1] if found is not None else folder


def _is_pipeline(folder: Path) -> bool:
    """A diffusers pipeline folder: one repo, read through its denoiser (sketches.safetensors.denoiser_folder)."""
    return local_denoiser(folder) is not None


def _special(folder: Path) -> bool:
    """An adapter, GGUF or packed repo (the crawl's triage, `indexer.crawl.weight_layout`): read by the crawl's
    reader."""
    from indexer.crawl import ADAPTER_FILES, INDEX_FILE, SINGLE_FILE

    top = {f.name for f in folder.iterdir() if f.is_file()}
    if ADAPTER_FILES[0] in top and SINGLE_FILE not in top and INDEX_FILE not in top:
        return True
    if ({"tf_model.h5", "flax_model.msgpack"} & top or _onnx_export(folder)) and not any(
            n.endswith((".safetensors", ".gguf")) for n in top):
        return False  # a TensorFlow, Flax or ONNX repo: read like safetensors (sketches.tfh5.ConvertedWeights)
    return not any(n.endswith(".safetensors") for n in top) and INDEX_FILE not in top and not _is_pipeline(folder)


def discover_repos(root: Path) -> list[tuple[str, Path]]:
    """(repo_id, folder) of every folder holding safetensors under `root`, sorted by id."""
    if not root.is_dir():
        raise BadInputError(str(root), "not a folder; pass a folder of model repos (DIR/<org>/<name>/)")
    found, seen = [], set()
    for folder, dirs, _ in os.walk(root, followlinks=True):  # symlinked repos count (a link farm, the HF cache)
        real = os.path.realpath(folder)
        if real in seen:  # a link loop: do not walk it twice
            dirs[:] = []
            continue
        seen.add(real)
        # deterministic; skip .git etc. and a huggingface_hub cache's datasets and spaces
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "datasets--", "spaces--")))
        path = Path(folder)
        if path.name.startswith("models--") and (path / "snapshots").is_dir():
            chosen = hf_cache_snapshot(path)  # a huggingface_hub cache: the snapshot refs/main names, only
            dirs[:] = ["snapshots"] if chosen is not None else []
            continue
        if path.name == "snapshots" and path.parent.name.startswith("models--"):
            chosen = hf_cache_snapshot(path.parent)
            dirs[:] = [chosen.name] if chosen is not None else []
            continue
        pipeline = _is_pipeline(path)
        if pipeline:
            dirs[:] = []  # its components are read as one model, not as repos of their own
        if path.name == "onnx" and _onnx_export(path.parent):
            continue  # transformers.js' folder of one repo's exports, read with that repo
        if pipeline or _is_repo(path):
            rel = hf_cache_repo_id(path) or path.relative_to(root).as_posix()
            repo_id = rel if rel != "." else path.name
            found.append((repo_id, _weights_folder(path, repo_id)))
    if not found:
        raise BadInputError(str(root), "no safetensors, GGUF, TensorFlow, Flax, ONNX or adapter weights found in any folder under it")
    return sorted(found)


def upload_times(root: Path) -> dict[str, float]:
    """repo_id -> createdAt (epoch seconds) from `root/hub.json`; empty when there is no such file.

    The same parser as the Hub emulator's (`load_hub_json`), so that the two never disagree on a file:
    one that is not in the documented form is refused by both with one line naming it."""
    from indexer.hub_emulator.repos import load_hub_json

    metas = load_hub_json(root / "hub.json")
    return {rid: datetime.fromisoformat(meta.created_at).timestamp()
            for rid, meta in sorted(metas.items()) if meta.created_at}


# --- loading ---------------------------------------------------------------------------------------


def _failed(repo_id: str, family: str, method: str, reason: str) -> ForestRow:
    logger.warning("%s: %s", repo_id, reason)
    return ForestRow(repo_id, "", -1, math.nan, math.nan, family, method, "failed", reason)


def _headers(repos: Sequence[tuple[str, Path]], method: str,
             packed: list[tuple[str, Path]] | None = None) -> tuple[list[_Loaded], list[ForestRow]]:
    """Headers of plain safetensors repos; with `packed`, quantized ones (indexer.readers.looks_packed)
    and LoRA files without a config (sketches.adapter.loose_layout) go there instead, for the crawl's reader."""
    from indexer.crawl import CONVERTED_STEPS
    from indexer.readers import looks_packed
    from sketches.adapter import loose_layout
    from sketches.tfh5 import ConvertedWeights

    loaded, failed = [], []
    for repo_id, path in repos:
        try:
            with open_local_repo(path) as weights:
                infos = weights.tensors()
                # loose: a LoRA file; quantized: an ONNX 8-bit copy (sketches.onnx.OnnxWeights)
                if packed is not None and (looks_packed(infos) or loose_layout(infos) or getattr(weights, "quantized", False)):
                    packed.append((repo_id, path))
                    continue
                stored = canonical_tensors(infos)
                shapes = {name: infos[raw].shape for name, raw in stored.items()}
                _untie(weights, stored, shapes)
            steps = CONVERTED_STEPS if isinstance(weights, ConvertedWeights) else 0  # indexer.crawl.converted_rank
            loaded.append(_Loaded(repo_id, path, shapes, family_key(shapes), stored, _main_dtype(infos, stored),
                                  (steps + max((wrapper_depth(n) for n in infos), default=0), -len(infos))))
        except ModelGraphError as exc:
            failed.append(_failed(repo_id, "", method, str(exc)))
    return loaded, failed


def _untie(weights: object, stored: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Drop a tied lm_head saved twice (sketches.layers.tied_heads): the embedding, once."""
    raw_of = dict(stored)
    for tied in tied_heads(shapes, lambda name, rows: weights.read(raw_of[name], rows=rows)):  # type: ignore[attr-defined]
        del stored[tied], shapes[tied]


def _main_dtype(infos: dict, stored: dict[str, str]) -> str:
    sizes: dict[str, int] = {}
    for raw in stored.values():
        sizes[infos[raw].dtype] = sizes.get(infos[raw].dtype, 0) + infos[raw].nbytes
    return max(sorted(sizes), key=lambda d: sizes[d]) if sizes else "F32"


def _scheme(options: Options) -> Scheme:
    if options.method != "mother-paper":
        return "shared"
    return "value" if options.distance == "rank" else "attention"


def _read_family(members: list[_Loaded], options: Options, times: dict[str, float],
                 spent: dict[str, int] | None = None) -> tuple[Family | None, list[ForestRow]]:
    """Read the selected tensors of each member once; NaN/Inf models become failures. `spent` collects
    the bytes read per model."""
    family = members[0].family
    selection = select_layers([m.shapes for m in members], scheme=_scheme(options), include_1d=options.include_1d)
    ok, arrays, extras, stats, failed = [], [], [], [], []
    for m in members:
        try:
            with open_local_repo(m.path) as weights:
                layers = {name: weights.read(m.stored[name]) for name in selection.distance}
                # the rest (heads, 1-D tensors, layers not all members have): ties and duplicates only
                rest = {name: weights.read(m.stored[name]) for name in sorted(m.shapes) if name not in layers}
                if spent is not None:
                    spent[m.repo_id] = weights.bytes_read
        except ModelGraphError as exc:
            failed.append(_failed(m.repo_id, family, options.method, str(exc)))
            continue
        st = model_stats(layers)
        bad = next((layer.name for layer in st.layers if not layer.finite), None)
        bad = bad or next((name for name, a in rest.items() if not np.isfinite(a).all()), None)
        if bad is not None:
            failed.append(_failed(m.repo_id, family, options.method, f"NaN or infinite weights in {bad}"))
            continue
        ok.append(m)
        arrays.append(layers)
        extras.append(rest)
        stats.append(st)
    if not ok:
        return None, failed
    stacked = {name: np.stack([a[name] for a in arrays]) for name in selection.distance}
    ids = tuple(m.repo_id for m in ok)
    return Family(ids, stacked, selection, tuple(stats), tuple(times.get(i) for i in ids), tuple(extras),
                  tuple(m.dtype for m in ok), tuple(m.copy_rank for m in ok),
                  tuple(local_declared_bases(m.path) for m in ok)), failed


# --- repos the crawl's readers read (adapters, GGUF, packed quantized) ------------------------------


def _read_special(repos: Sequence[tuple[str, Path]], method: str, times: Mapping[str, float]
                  ) -> tuple[list[QuantCopy], list[AdapterRepo], list[ForestRow], dict[str, int]]:
    """Each repo through `indexer.crawl.read_model` over a LocalRepo (one parser per format); whatever it
    raises becomes the crawl's own one-line reason (`indexer.crawl.classify`) on a failed row."""
    from indexer.crawl import classify, read_model
    from indexer.sources import LocalRepo

    copies, adapters, failed, spent = [], [], [], {}
    for repo_id, path in repos:
        repo = None
        try:
            repo = LocalRepo(path)
            read = read_model(repo, budget=WHOLE_MODEL, have_token=True)
        except Exception as exc:  # noqa: BLE001 -- the crawl's rule: one bad model is a recorded failure
            failed.append(_failed(repo_id, "", method, classify(exc)[1]))
            continue
        finally:
            if repo is not None:
                spent[repo_id] = repo.bytes_read
                repo.close()
        if read.adapter is not None:
            adapters.append(AdapterRepo(repo_id, read.adapter, read.arrays, times.get(repo_id)))
        elif read.quant is not None:
            shapes = {n: tuple(t.shape) for n, t in read.tensors.items()}
            copies.append(QuantCopy(repo_id, read.family, shapes, read.arrays, read.quant, times.get(repo_id)))
        else:  # weight_layout and _special disagree: a bug, not the model's fault
            failed.append(_failed(repo_id, read.family, method, "error: read as neither an adapter nor a quantized copy"))
    return copies, adapters, failed, spent


# --- trees across families -------------------------------------------------------------------------


def allocate_trees(families: Sequence[Family], trees: int | None, *, device: str = "auto") -> list[int | None]:
    """Split a folder-wide K over families: one tree each, the rest to the largest relative ward gaps.

    A family's next split is worth its next-highest ward merge height over its RMS weight norm, which
    makes heights comparable across architectures of different scale.
    """
    if trees is None:
        return [None] * len(families)
    if trees < len(families):
        raise BadInputError("--trees", f"{trees} trees but the folder holds {len(families)} architecture families, which are never one tree")
    if len(families) == 1:
        return [trees]
    heights = []
    for fam in families:
        if fam.n < 2:
            heights.append([])
            continue
        layers = [fam.layers[n] for n in fam.selection.distance]
        scale = float(np.sqrt(np.mean([s.l2_norm(fam.selection.distance) ** 2 for s in fam.stats]))) or 1.0
        heights.append(sorted((ward_tree(l2_distance(layers, device=device))[:, 2] / scale).tolist(), reverse=True))  # type: ignore[arg-type]
    alloc = [1] * len(families)
    for _ in range(trees - len(families)):
        best = max(range(len(families)), key=lambda f: (heights[f][alloc[f] - 1] if alloc[f] - 1 < len(heights[f]) else -1.0, -f))
        alloc[best] += 1
    return [min(a, f.n) for a, f in zip(alloc, families, strict=True)]


# --- the whole folder ------------------------------------------------------------------------------


def _rows(family: Family, key: str, lineage: Lineage, method: str, offset: int) -> list[ForestRow]:
    n = family.n
    relation = lineage.relation or tuple("finetune" if p >= 0 else "" for p in lineage.parent)
    confidence = lineage.confidence or (math.nan,) * n
    score = lineage.edge_score or (math.nan,) * n
    margins = lineage.margin or (math.nan,) * n
    return [
        ForestRow(
            repo_id=rid,
            parent=family.repo_ids[p] if p >= 0 else "",
            cluster=offset + c,
            distance=d,
            direction_score=s,
            family=key,
            method=method,
            relation=rel,
            confidence=_nan_is_one(conf),
            related_score=_nan_is_one(z),
            p_value=float(norm.sf(z)) if not math.isnan(z) else math.nan,
            margin=_nan_is_one(m),
            parents=((family.repo_ids[p], 1.0),) if p >= 0 else (),
        )
        for rid, p, c, d, s, rel, conf, z, m in zip(family.repo_ids, lineage.parent, lineage.cluster, lineage.distance,
                                                     lineage.direction_score, relation, confidence, score, margins,
                                                     strict=True)
    ]


def _nan_is_one(x: float) -> float:
    """NaN as the one `math.nan` object, so that rows compare equal (dataclass == uses `is` first)."""
    return math.nan if math.isnan(x) else float(x)


def recover(root: str | os.PathLike[str], options: Options) -> Forest:
    """Recover the forest of every repo under `root` (see the module docstring for the steps)."""
    root = Path(root)
    repos = discover_repos(root)
    times = upload_times(root) if options.use_time else {}
    special = [(r, p) for r, p in repos if _special(p)]
    packed: list[tuple[str, Path]] = []
    loaded, failed = _headers([r for r in repos if r not in special], options.method, packed)
    copies, adapters, bad, spent = _read_special(sorted(special + packed), options.method, times)
    failed += bad
    by_family, merged = _group(loaded, {c.family: c.shapes for c in copies})
    copies = [replace(c, family=merged[c.family]) for c in copies]
    families: list[tuple[str, Family]] = []
    keys: dict[str, str] = {}  # a compared group's key -> its family's (quantized copies join by it)
    for key in sorted(by_family):  # deterministic
        for sub_key, members in _comparable_groups(key, by_family[key], options):
            fam, bad = _read_family(members, options, times, spent)
            failed += bad
            if fam is not None:
                families.append((sub_key, fam))
                keys[sub_key] = key
    if not families and not copies and not adapters:
        raise RecoveryError(f"{root}: every model failed to load; first reason: {failed[0].reason}")
    forest = _solve(families, failed, options) if families else Forest(tuple(failed))
    result, aside = _with_relations(forest, families, keys, copies, adapters, options, spent, dict(repos))
    if aside and not options.set_aside:  # merges the trees were drawn through, without upload order (`_merges`)
        again = replace(options, set_aside=aside)
        result, _ = _with_relations(_solve(families, failed, again), families, keys, copies, adapters, again,
                                    spent, dict(repos))
    return result


def group_families(loaded: Sequence[_Loaded]) -> dict[str, list[_Loaded]]:
    """Models by family: equal body keys first, then keys whose cores overlap (sketches.layers.merge_families)."""
    return _group(loaded, {})[0]


def _group(loaded: Sequence[_Loaded], extra: Mapping[str, Mapping[str, tuple[int, ...]]]
           ) -> tuple[dict[str, list[_Loaded]], dict[str, str]]:
    """group_families, with the bodies of models read otherwise (quantized copies) taking part in the
    overlap: (models by family, every body key -> its family's key)."""
    bodies: dict[str, Mapping[str, tuple[int, ...]]] = {}
    for m in loaded:
        bodies.setdefault(m.family, m.shapes)
    for key in sorted(extra):
        bodies.setdefault(key, extra[key])
    merged = merge_families(bodies)  # type: ignore[arg-type]
    by_family: dict[str, list[_Loaded]] = {}
    for m in loaded:
        by_family.setdefault(merged[m.family], []).append(m)
    return by_family, merged


def _comparable_groups(key: str, members: list[_Loaded], options: Options) -> list[tuple[str, list[_Loaded]]]:
    """The family as one group when its members share a layer the method compares; else (a chain of
    overlaps, A ~ B ~ C with nothing common to all) one group per exact body key, logged."""
    try:
        select_layers([m.shapes for m in members], scheme=_scheme(options), include_1d=options.include_1d)
        return [(key, members)]
    except UnsupportedModelError as exc:
        if len({m.family for m in members}) == 1:
            return [(key, members)]  # nothing to split: _read_family reports it
        logger.warning("%s: %s; comparing each body key on its own", key, exc.reason)
    by_key: dict[str, list[_Loaded]] = {}
    for m in members:
        by_key.setdefault(m.family, []).append(m)
    return sorted(by_key.items())


def _solve(families: list[tuple[str, Family]], failed: list[ForestRow], options: Options) -> Forest:
    rows, notes, offset = list(failed), [], 0
    ks = allocate_trees([f for _, f in families], options.trees, device=options.device)
    for (key, fam), k in zip(families, ks, strict=True):
        lineage = recover_family(fam, replace(options, trees=k))
        rows += _rows(fam, key, lineage, options.method, offset)
        offset += max(lineage.cluster) + 1
        notes += [f"{key}: {note}" for note in lineage.notes]
        logger.info("%s: %d models, %s", key, fam.n, "; ".join(lineage.notes))
    return Forest(tuple(sorted(rows, key=lambda r: r.repo_id)), tuple(notes))


# --- relations: merges, quantized copies, adapters (indexer.relations.batch) ------------------------


def _member_arrays(family: Family, i: int) -> dict[str, np.ndarray]:
    return {n: family.layers[n][i] for n in family.selection.distance} | dict(family.extras[i] if family.extras else {})


def _with_relations(forest: Forest, families: Sequence[tuple[str, Family]], keys: Mapping[str, str],
                    copies: Sequence[QuantCopy], adapters: Sequence[AdapterRepo], options: Options,
                    spent: Mapping[str, int], folders: Mapping[str, Path]) -> tuple[Forest, tuple[tuple[str, str], ...]]:
    """Step 6 (the module docstring); every row gets its bytes read. `folders`: repo id -> folder, where a
    DoRA adapter's base rows are read from (as `index add` reads them). Also the merges to set aside in a
    second pass (`_merges`)."""
    rows = {r.repo_id: r for r in forest.rows}
    arrays = {rid: _member_arrays(fam, i) for _, fam in families for i, rid in enumerate(fam.repo_ids)}
    created = {rid: t for _, fam in families for rid, t in zip(fam.repo_ids, fam.created, strict=True)}
    aside: tuple[tuple[str, str], ...] = ()
    if options.method == "mother":  # the paper methods stay as the papers define them
        aside = _merges(rows, {rid: compared_arrays(a) for rid, a in arrays.items()}, created,
                        {rid: local_declared_bases(folders[rid]) for rid in arrays if rid in folders})
    placed = _quantized(rows, families, keys, copies, arrays, options)
    shapes = {rid: {n: tuple(np.shape(a)) for n, a in arrays[rid].items()} for rid in arrays}
    shapes |= {c.repo_id: dict(c.shapes) for c in copies}
    home = {r.repo_id: r.family for r in rows.values() if r.status == "ok"} | {c.repo_id: c.family for c in copies}
    family_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for rid in sorted(shapes):
        if rid in home:
            family_shapes.setdefault(home[rid], {}).update(shapes[rid])
    usable = []
    for a in adapters:  # an adapter whose updates cannot be read is one failed row, as in the crawl
        try:
            lora_updates(a.read.config, lora_arrays(a.arrays))
            usable.append(a)
        except AdapterError as exc:  # the crawl's own one-line reason (imported here: a cycle at module level)
            from indexer.crawl import classify

            rows[a.repo_id] = _failed(a.repo_id, "", options.method, classify(exc)[1])
    from indexer.crawl import (
        local_bases,  # the crawl's readers: a cycle at module level
    )

    placed |= place_adapters(usable, {rid: (home[rid], shapes[rid]) for rid in home if rid in shapes}, family_shapes,
                             local_bases(folders))
    rows |= _placed_rows(placed, rows, options)
    return Forest(tuple(replace(r, bytes_read=spent.get(r.repo_id, 0)) for _, r in sorted(rows.items())), forest.notes), aside


def _merges(rows: dict[str, ForestRow], arrays: Mapping[str, Mapping[str, np.ndarray]],
            created: Mapping[str, float | None], declared: Mapping[str, tuple[str, ...]]) -> tuple[tuple[str, str], ...]:
    """Merges among each tree (indexer.relations.batch.find_merges); a merge's row takes its parents.

    Returns (merge, heaviest merge parent) for every merge whose tree gave it no upload order (its time
    unknown or shared with another model of its tree: a folder without times) and that
    `merges.set_aside_undated` draws out of its tree. The recovery draws those trees again with the merges
    set aside as leaves, as duplicates are, and this step hangs them under their parents. With distinct
    times a merge comes after its parents and the direction penalty keeps it out of their way."""
    ok = {r.repo_id: r for r in rows.values() if r.status == "ok" and r.repo_id in arrays}
    trees: dict[tuple[str, int], list[str]] = {}
    for r in ok.values():
        trees.setdefault((r.family, r.cluster), []).append(r.repo_id)
    parent_of = {rid: r.parent for rid, r in ok.items()}  # the method's tree, before any merge row moves
    tree_of = {rid: tuple(t) for t in trees.values() for rid in t}

    def distance(a: str, b: str) -> float:
        return squared_distance(arrays[a], arrays[b])

    aside = []
    found = find_merges([sorted(t) for _, t in sorted(trees.items())], arrays, created, declared)
    for x, links in sorted(found.items()):
        parents = merge_row_parents(x, links, parent_of)
        if parents:
            moved = parents[0][0] != rows[x].parent or rows[x].relation == "merge"  # set aside: no distance
            rows[x] = replace(rows[x], parent=parents[0][0], relation="merge", parents=parents,
                              distance=math.nan if moved else rows[x].distance)
        undated = created.get(x) is None or any(created.get(o) == created[x] for o in tree_of[x] if o != x)
        if undated and set_aside_undated(links, [o for o in tree_of[x] if o != x], distance, found):
            aside.append((x, heaviest_parent(links)))
    return tuple(aside)


def _quantized(rows: Mapping[str, ForestRow], families: Sequence[tuple[str, Family]], keys: Mapping[str, str],
               copies: Sequence[QuantCopy], arrays: Mapping[str, Mapping[str, np.ndarray]], options: Options) -> dict[str, Placed]:
    """Each family's quantized copies beside its full-precision models (indexer.relations.batch.place_quantized)."""
    placed: dict[str, Placed] = {}
    device = "cpu" if options.device == "auto" else options.device
    for key in sorted({c.family for c in copies}):
        # a duplicate or a dtype cast is a leaf, never a parent (indexer.lineage.ties, methods._cast_sources):
        # an F16 GGUF of a base equals the base's F16 ONNX export bit for bit, uploaded after it or not
        members = sorted(rid for sub, fam in families if keys.get(sub) == key for rid in fam.repo_ids
                         if rows.get(rid) is not None and rows[rid].status == "ok"
                         and rows[rid].relation not in ("duplicate", "quantized"))
        created = {rid: t for _, fam in families for rid, t in zip(fam.repo_ids, fam.created, strict=True)}
        views = {rid: pair_view(rid, arrays[rid], created.get(rid)) for rid in members}
        placed |= place_quantized([c for c in copies if c.family == key], views, device=device)
    return placed


def _placed_rows(placed: Mapping[str, Placed], rows: Mapping[str, ForestRow], options: Options) -> dict[str, ForestRow]:
    """Rows of the models placed beside the trees: the tree of what they hang under, followed up through
    other placed models; a root or an external base gets a tree of its own (numbered after the others)."""
    out: dict[str, ForestRow] = {}
    fresh = max((r.cluster for r in rows.values()), default=-1) + 1
    trees: dict[str, int] = {}

    def tree(rid: str) -> int:
        nonlocal fresh
        seen = set()
        while rid in placed and placed[rid].parent and rid not in seen:
            seen.add(rid)
            rid = placed[rid].parent
        if rid in rows and rows[rid].status == "ok":
            return rows[rid].cluster
        if rid not in trees:
            trees[rid], fresh = fresh, fresh + 1
        return trees[rid]

    for rid in sorted(placed):
        p = placed[rid]
        family = p.family or (rows[p.anchor].family if p.anchor in rows else "")
        out[rid] = ForestRow(rid, p.parent, tree(rid), p.distance, math.nan, family, options.method,
                             relation=p.relation, confidence=p.confidence, parents=p.parents)
    return out


# --- output ----------------------------------------------------------------------------------------


def row_dicts(forest: Forest) -> list[dict[str, object]]:
    """The rows as plain dicts (NaN as None, so that JSON stays valid)."""
    out = []
    for r in forest.rows:
        d = dict(r.__dict__)
        for k in ("distance", "direction_score", "confidence", "related_score", "p_value", "margin"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        out.append(d)
    return out


def write_parquet(forest: Forest, path: str | os.PathLike[str]) -> None:
    """One row per model; schema version in the file metadata; written to a temp file then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[object]] = {f: [getattr(r, f) for r in forest.rows] for f in ForestRow.__dataclass_fields__}
    # as the export's edges.parents (store.layout.PARENTS_SQL): a list of struct<repo_id, weight>
    cols["parents"] = [[{"repo_id": p, "weight": w} for p, w in r.parents] for r in forest.rows]
    schema = pa.schema(
        [("repo_id", pa.string()), ("parent", pa.string()), ("cluster", pa.int64()), ("distance", pa.float64()),
         ("direction_score", pa.float64()), ("family", pa.string()), ("method", pa.string()),
         ("status", pa.string()), ("reason", pa.string()), ("relation", pa.string()),
         ("confidence", pa.float64()), ("related_score", pa.float64()), ("p_value", pa.float64()),
         ("margin", pa.float64()),
         ("parents", pa.list_(pa.struct([("repo_id", pa.string()), ("weight", pa.float64())]))),
         ("bytes_read", pa.int64())],
        metadata={b"model_graph_index.forest_version": str(FOREST_VERSION).encode()},
    )
    table = pa.table(cols, schema=schema)
    tmp = Path(f"{path}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def render_forest(forest: Forest) -> str:
    """A readable tree per cluster (children sorted by id), then the failed models."""
    ok = [r for r in forest.rows if r.status == "ok"]
    children: dict[str, list[ForestRow]] = {}
    for r in ok:
        children.setdefault(r.parent, []).append(r)
    lines: list[str] = []
    for root in sorted(children.get("", []), key=lambda r: (r.family, r.cluster, r.repo_id)):
        lines.append(f"[{root.family} tree {root.cluster}] {root.repo_id}")
        _render(root.repo_id, children, "", lines)
    placed = {r.repo_id for r in ok}
    for name in sorted(p for p in children if p and p not in placed):  # an adapter's base not in the folder
        first = children[name][0]
        lines.append(f"[{first.family} tree {first.cluster}] {name}  (external: not in the folder)")
        _render(name, children, "", lines)
    for r in forest.failures():
        lines.append(f"failed: {r.repo_id}: {r.reason}")
    return "\n".join(lines)


def _render(node: str, children: dict[str, list[ForestRow]], prefix: str, lines: list[str]) -> None:
    kids = sorted(children.get(node, []), key=lambda r: r.repo_id)
    for i, kid in enumerate(kids):
        last = i == len(kids) - 1
        lines.append(f"{prefix}{'└── ' if last else '├── '}{kid.repo_id}  ({_edge_label(kid)})")
        _render(kid.repo_id, children, prefix + ("    " if last else "│   "), lines)


def _edge_label(row: ForestRow) -> str:
    parts = [f"d={row.distance:.4g}"] if not math.isnan(row.distance) else []
    if row.relation and row.relation != "finetune":
        parts.insert(0, row.relation)
    if len(row.parents) > 1:  # a merge: every parent with its weight
        parts.insert(1, "of " + " + ".join(f"{w:.2f} {p}" for p, w in row.parents))
    if not math.isnan(row.confidence):
        parts.append(f"conf={row.confidence:.2f}")
    return ", ".join(parts)
