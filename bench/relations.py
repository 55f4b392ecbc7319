"""Relations benchmark: crawl the relations zoo through the Hub emulator and score every edge type.

    .venv/bin/python bench/relations.py --zoo zoo/relations [--build] [--json] [--batch]

1. build the zoo (indexer.zoo.relations) unless it exists (or with --build: rebuild);
2. serve it with the Hub emulator and crawl it into a fresh store with the real client (`index crawl`'s path);
3. per true relation (finetune, duplicate, adapter, quantized, merge; roots apart): parent accuracy
   (the recovered parent is the true one; merges: is one of the merged models), merge parent-set accuracy
   (the recovered parents are exactly the merged models), relation-label accuracy, bytes read per model;
   the confusion matrix of relation labels (true x recovered; "root" when a model got no parent), and the
   adapters whose declared base is in the zoo and was resolved to it.
With --batch: 4. recover the same folder in batch (`index recover`: indexer.lineage.recover, the crawl's
readers over local files), score it the same way, and count the models whose parent, relation and merge
parent set agree between batch and incremental (the crawl).
Prints tables (stdout); --json prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.crawl import CrawlOptions, crawl
from indexer.hub_emulator import HubEmulator
from indexer.retry import RetryPolicy
from indexer.zoo.relations import make_relations_zoo, read_truth
from store.tables import read_records

TYPES = ("finetune", "duplicate", "adapter", "quantized", "merge")
LABELS = ("root", *TYPES)


def _crawl(zoo: Path, home: Path) -> float:
    started = time.perf_counter()
    with HubEmulator(zoo) as emu:
        options = CrawlOptions(endpoint=emu.url, progress=False, device="cpu", policy=RetryPolicy(sleep=lambda s: None))
        crawl(home, options)
    return time.perf_counter() - started


def _anchor(got: dict[str, Any], repo: str) -> str:
    """The first non-adapter up an adapter's chain of parents (its base as placed)."""
    seen = set()
    node = repo
    while node in got and got[node][1] == "adapter" and node not in seen:
        seen.add(node)
        node = got[node][0]
    return node


Got = dict[str, tuple[str, str, tuple[str, ...], int]]  # child -> (parent, relation, parents, bytes read)


def crawled(home: Path) -> Got:
    """What the crawl's store says of each model."""
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    return {r: (e.parent, e.relation or "root", tuple(p for p, _ in e.parents),  # type: ignore[attr-defined]
                models[r].bytes_read if r in models else 0) for r, e in edges.items()}  # type: ignore[attr-defined]


def batched(zoo: Path) -> tuple[Got, float, list[str]]:
    """What a batch recovery (`index recover`) says of each model, its seconds, and its failures."""
    from indexer.lineage.methods import Options
    from indexer.lineage.recover import recover

    started = time.perf_counter()
    forest = recover(zoo, Options(device="cpu"))
    seconds = time.perf_counter() - started
    got = {r.repo_id: (r.parent, r.relation or "root", tuple(p for p, _ in r.parents), r.bytes_read)
           for r in forest.rows if r.status == "ok"}
    return got, seconds, sorted(f"{r.repo_id}: {r.reason}" for r in forest.failures())


def agreement(truth: dict[str, Any], a: Got, b: Got) -> dict[str, Any]:
    """Models whose parent, relation and merge parent set agree between two recoveries, per true relation."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    differ = []
    for child, (_, relation) in sorted(truth.items()):
        same = child in a and child in b and a[child][:2] == b[child][:2] and set(a[child][2]) == set(b[child][2])
        per[relation or "root"][0] += same
        per[relation or "root"][1] += 1
        if not same:
            differ.append(f"{child}: {a.get(child, ('-',))[:3]} vs {b.get(child, ('-',))[:3]}")
    return {"per_relation": {k: f"{v[0]}/{v[1]}" for k, v in sorted(per.items())},
            "agree": sum(v[0] for v in per.values()), "models": sum(v[1] for v in per.values()), "differ": differ}


def score(zoo: Path, home: Path | None = None, *, got: Got | None = None) -> dict[str, Any]:
    truth = read_truth(zoo)
    got = got if got is not None else crawled(home)  # type: ignore[arg-type]
    models = {m.repo_id: m for m in read_records(home, "models")} if home is not None else {}  # type: ignore[union-attr]
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    confusion: Counter[tuple[str, str]] = Counter()
    resolved = [0, 0]
    for child, (parents, relation) in sorted(truth.items()):
        _, got_rel, got_parents, nbytes = got.get(child, ("", "not placed", (), 0))
        kind = relation or "root"
        confusion[(kind, got_rel)] += 1
        row = per[kind]
        row["bytes"].append(nbytes)
        row["label"].append(float(got_rel == kind))
        if parents:
            row["parent"].append(float(bool(got_parents) and got_parents[0] in parents))
        if relation == "merge":
            row["parent_set"].append(float(set(got_parents) == set(parents)))
        if relation == "adapter":
            declared = (json.loads(models[child].details).get("base_model", "") if child in models  # type: ignore[attr-defined]
                        else _declared_base(zoo / child))
            if declared in truth:  # the declared base is in the zoo: the adapter must hang under it
                resolved[0] += _anchor(got, child) == declared
                resolved[1] += 1
    table = {kind: {k: sum(v) / len(v) for k, v in row.items()} | {"n": len(row["label"])}
             for kind, row in sorted(per.items())}
    for kind, row in per.items():
        table[kind]["bytes_max"] = max(row["bytes"])
    labels = [float(got == want) for (want, got), n in confusion.items() for _ in range(n)]
    return {"per_relation": table, "label_accuracy": sum(labels) / len(labels),
            "confusion": {f"{want}->{rec}": n for (want, rec), n in sorted(confusion.items())},
            "adapter_bases_resolved": f"{resolved[0]}/{resolved[1]}",
            "failed": sorted(r for r, m in models.items() if m.status != "indexed")}  # type: ignore[attr-defined]


def _declared_base(folder: Path) -> str:
    try:
        return str(json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path", ""))
    except (OSError, ValueError):
        return ""


def big_quantized(budget_mib: int) -> dict[str, Any]:
    """Bytes read for bigger quantized repos (a 51M-parameter llama: hidden 1024, 4 layers): a Q8_0 GGUF and
    a GPTQ 4-bit checkpoint next to their F32 source, crawled at `budget_mib` of tensor bytes per model."""
    import numpy as np
    from safetensors.numpy import save_file

    from indexer.zoo.quantize import write_gptq, write_llama_gguf

    rng = np.random.default_rng(0)
    hidden, ffn, layers, heads = 1024, 2816, 4, 16
    shapes = {"model.embed_tokens.weight": (256, hidden), "lm_head.weight": (256, hidden), "model.norm.weight": (hidden,)}
    for b in range(layers):
        p = f"model.layers.{b}."
        shapes |= {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    state = {n: (rng.standard_t(4, s) * 0.02).astype(np.float32) for n, s in sorted(shapes.items())}
    out: dict[str, Any] = {"budget_mib": budget_mib}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        (root / "big/source").mkdir(parents=True)
        save_file(state, str(root / "big/source/model.safetensors"))
        (root / "big/source/config.json").write_text(json.dumps({"model_type": "llama"}))
        (root / "big/source-Q8_0-GGUF").mkdir(parents=True)
        write_llama_gguf(root / "big/source-Q8_0-GGUF/source-Q8_0.gguf", state, "Q8_0", heads=heads, kv_heads=heads)
        write_gptq(root / "big/source-GPTQ", state, {"model_type": "llama"}, bits=4, group=128)
        stamps = {"big/source": "2024-01-01", "big/source-Q8_0-GGUF": "2024-01-02", "big/source-GPTQ": "2024-01-03"}
        (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {r: {"createdAt": f"{d}T00:00:00.000Z"}
                                                                            for r, d in stamps.items()}}))
        home = Path(tmp) / "home"
        with HubEmulator(root) as emu:
            crawl(home, CrawlOptions(endpoint=emu.url, progress=False, device="cpu", budget=budget_mib << 20,
                                     policy=RetryPolicy(sleep=lambda s: None)))
        models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
        edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
        for repo in stamps:
            size = sum(f.stat().st_size for f in (root / repo).iterdir())
            out[repo] = {"bytes_read": models[repo].bytes_read, "repo_bytes": size,  # type: ignore[attr-defined]
                         "parent": edges[repo].parent, "relation": edges[repo].relation}  # type: ignore[attr-defined]
    return out


def _print(result: dict[str, Any]) -> None:
    print(f"zoo: {result['zoo']}  models: {result['models']}  crawl: {result['crawl_seconds']:.1f} s"
          f"  build: {result.get('build_seconds', 0):.0f} s")
    print(f"{'relation':<10} {'n':>3} {'parent':>7} {'set':>6} {'label':>6} {'bytes/model':>12} {'max':>10}")
    for kind, row in result["per_relation"].items():
        parent = f"{row['parent']:.2f}" if "parent" in row else "-"
        pset = f"{row['parent_set']:.2f}" if "parent_set" in row else "-"
        print(f"{kind:<10} {row['n']:>3} {parent:>7} {pset:>6} {row['label']:>6.2f} {row['bytes']:>12,.0f} {row['bytes_max']:>10,}")
    print(f"relation label accuracy (all models): {result['label_accuracy']:.3f}")
    print(f"adapter declared bases resolved: {result['adapter_bases_resolved']}")
    print("confusion (true -> recovered):")
    truth_labels = sorted({k.split('->')[0] for k in result["confusion"]}, key=LABELS.index)
    got_labels = sorted({k.split('->')[1] for k in result["confusion"]}, key=lambda x: LABELS.index(x) if x in LABELS else 99)
    print(f"{'':<10}" + "".join(f"{g:>11}" for g in got_labels))
    for t in truth_labels:
        print(f"{t:<10}" + "".join(f"{result['confusion'].get(f'{t}->{g}', 0):>11}" for g in got_labels))
    if result["failed"]:
        print(f"not indexed: {', '.join(result['failed'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/relations"))
    parser.add_argument("--build", action="store_true", help="rebuild the zoo even if it exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", action="store_true", help="also recover the folder in batch and compare")
    parser.add_argument("--big", type=int, metavar="MIB", default=0,
                        help="also crawl a 51M-parameter llama, its Q8_0 GGUF and GPTQ copies at this byte budget")
    args = parser.parse_args()
    if args.big:
        big = big_quantized(args.big)
        print(json.dumps(big, indent=1)) if args.json else [print(f"{k}: {v}") for k, v in big.items()]
    result: dict[str, Any] = {"zoo": str(args.zoo)}
    if args.build or not (args.zoo / "truth.csv").exists():
        result["build_seconds"] = make_relations_zoo(args.zoo, seed=args.seed, force=True).seconds
    with tempfile.TemporaryDirectory() as tmp:
        result["crawl_seconds"] = _crawl(args.zoo, Path(tmp) / "home")
        result |= score(args.zoo, Path(tmp) / "home")
        incremental = crawled(Path(tmp) / "home")
    result["models"] = sum(row["n"] for row in result["per_relation"].values())
    print(json.dumps(result, indent=1, sort_keys=True)) if args.json else _print(result)
    if args.batch:
        got, seconds, failed = batched(args.zoo)
        batch = score(args.zoo, got=got) | {"crawl_seconds": seconds, "zoo": str(args.zoo), "models": len(got),
                                             "failed": failed}
        same = agreement(read_truth(args.zoo), got, incremental)
        if args.json:
            print(json.dumps({"batch": batch, "batch_vs_incremental": same}, indent=1, sort_keys=True))
        else:
            print("\nbatch (index recover; 'crawl' = recover seconds):")
            _print(batch)
            print(f"batch == incremental (parent, relation, merge parent set): {same['agree']}/{same['models']} "
                  f"models; per relation {same['per_relation']}")
            for line in same["differ"]:
                print(f"  differ: {line}")


if __name__ == "__main__":
    main()
