"""Relations benchmark: crawl the relations zoo through the Hub emulator and score every edge type.

    .venv/bin/python bench/relations.py --zoo zoo/relations [--build] [--json]

1. build the zoo (indexer.zoo.relations) unless it exists (or with --build: rebuild);
2. serve it with the Hub emulator and crawl it into a fresh store with the real client (`index crawl`'s path);
3. per true relation (finetune, duplicate, adapter, quantized, merge; roots apart): parent accuracy
   (the recovered parent is the true one; merges: is one of the merged models), merge parent-set accuracy
   (the recovered parents are exactly the merged models), relation-label accuracy, bytes read per model;
   the confusion matrix of relation labels (true x recovered; "root" when a model got no parent), and the
   adapters whose declared base is in the zoo and was resolved to it.
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

from indexer.crawl import CrawlOptions, crawl  # noqa: E402
from indexer.hub_emulator import HubEmulator  # noqa: E402
from indexer.retry import RetryPolicy  # noqa: E402
from indexer.zoo.relations import make_relations_zoo, read_truth  # noqa: E402
from store.tables import read_records  # noqa: E402

TYPES = ("finetune", "duplicate", "adapter", "quantized", "merge")
LABELS = ("root", *TYPES)


def _crawl(zoo: Path, home: Path) -> float:
    started = time.perf_counter()
    with HubEmulator(zoo) as emu:
        options = CrawlOptions(endpoint=emu.url, progress=False, device="cpu", policy=RetryPolicy(sleep=lambda s: None))
        crawl(home, options)
    return time.perf_counter() - started


def _anchor(edges: dict[str, Any], repo: str) -> str:
    """The first non-adapter up an adapter's chain of parents (its base as placed)."""
    seen = set()
    node = repo
    while node in edges and edges[node].relation == "adapter" and node not in seen:
        seen.add(node)
        node = edges[node].parent
    return node


def score(zoo: Path, home: Path) -> dict[str, Any]:
    truth = read_truth(zoo)
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    confusion: Counter[tuple[str, str]] = Counter()
    resolved = [0, 0]
    for child, (parents, relation) in sorted(truth.items()):
        edge = edges.get(child)
        got_rel = (edge.relation or "root") if edge is not None else "not placed"  # type: ignore[attr-defined]
        got_parents = tuple(p for p, _ in edge.parents) if edge is not None else ()  # type: ignore[attr-defined]
        kind = relation or "root"
        confusion[(kind, got_rel)] += 1
        row = per[kind]
        row["bytes"].append(models[child].bytes_read if child in models else 0)  # type: ignore[attr-defined]
        row["label"].append(float(got_rel == kind))
        if parents:
            row["parent"].append(float(bool(got_parents) and got_parents[0] in parents))
        if relation == "merge":
            row["parent_set"].append(float(set(got_parents) == set(parents)))
        if relation == "adapter" and child in models:
            declared = json.loads(models[child].details).get("base_model", "")  # type: ignore[attr-defined]
            if declared in truth:  # the declared base is in the zoo: the adapter must hang under it
                resolved[0] += _anchor(edges, child) == declared
                resolved[1] += 1
    table = {kind: {k: sum(v) / len(v) for k, v in row.items()} | {"n": len(row["label"])}
             for kind, row in sorted(per.items())}
    for kind, row in per.items():
        table[kind]["bytes_max"] = max(row["bytes"])
    labels = [float(got == want) for (want, got), n in confusion.items() for _ in range(n)]
    return {"per_relation": table, "label_accuracy": sum(labels) / len(labels),
            "confusion": {f"{want}->{got}": n for (want, got), n in sorted(confusion.items())},
            "adapter_bases_resolved": f"{resolved[0]}/{resolved[1]}",
            "failed": sorted(r for r, m in models.items() if m.status != "indexed")}  # type: ignore[attr-defined]


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
    result["models"] = sum(row["n"] for row in result["per_relation"].values())
    print(json.dumps(result, indent=1, sort_keys=True)) if args.json else _print(result)


if __name__ == "__main__":
    main()
