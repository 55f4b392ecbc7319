"""Held-out merge methods: merges made by mergekit methods the merge test was not built on, next to the
relations zoo's own merges, recovered in batch and scored per merge.

    .venv/bin/python bench/merge_methods.py --zoo /work/zoo/relations --out /tmp/relx

The relations zoo (indexer.zoo.relations) holds linear, SLERP, TIES and DARE-TIES merges, the four methods
`indexer.relations.merges` was designed and checked on. This copies the zoo to OUT and adds, with
mergekit's own `run_merge` (CPU, float32), merges by seven more recipes of its fine-tunes, uploaded after
everything else (so every earlier merge is in their pools, as on the Hub, where merges of the same
parents pile up): task arithmetic, breadcrumbs-TIES, DELLA, model stock (three models over the base), DARE
linear, a three-model linear merge, NuSLERP and a SLERP whose t varies by layer and module (mergekit's README
example); then (session 11) Karcher, Multi-SLERP, SCE, RAM, DELLA linear, plain breadcrumbs, Arcee Fusion,
NearSwap, and two passthrough frankenmerges (a layer swap, and a 3-layer stack); then (session 13) two
mergekit-moe Mixtrals (F32 over base-a, BF16 with three experts over b-ft1) and a Q8_0 GGUF of the first
(its quantized child). Then `index recover OUT` and, per merge, the recovered
relation and parents against the true ones; the `index eval` summary last.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.evaluate import evaluate, read_relations_csv, read_truth_csv, render_report
from indexer.lineage import recover as rec
from indexer.lineage.methods import Options
from indexer.zoo.quantize import write_llama_gguf
from indexer.zoo.relations import HEADS, KV_HEADS, mergekit_moe, word_tokenizer

ORG = "rel"
# (name, mergekit method, models, base, weights, parameters): none of these methods is in the zoo's recipe
RECIPES: tuple[tuple[str, str, tuple[str, ...], str | None, tuple[float, ...] | None, dict[str, Any]], ...] = (
    ("a-task-arith", "task_arithmetic", ("a-ft1", "a-ft2"), "base-a", (0.7, 0.5), {}),
    ("a-breadcrumbs", "breadcrumbs_ties", ("a-ft1", "a-ft2"), "base-a", (0.5, 0.5), {"density": 0.8, "gamma": 0.05}),
    ("a-della", "della", ("a-ft1", "a-ft2"), "base-a", (0.5, 0.5), {"density": 0.6, "epsilon": 0.1}),
    ("a-model-stock", "model_stock", ("a-ft1", "a-ft2", "a-ft1-ft"), "base-a", None, {}),
    ("b-dare-linear", "dare_linear", ("b-ft1", "b-ft2"), "base-b", (0.5, 0.5), {"density": 0.7}),
    ("a-linear3", "linear", ("a-ft1", "a-ft2", "a-ft1-ft"), None, (0.4, 0.3, 0.3), {}),
    ("b-nuslerp", "nuslerp", ("b-ft1", "b-ft2"), None, (0.6, 0.4), {}),
    # mergekit's README example, copied by thousands of Hub merges: t per layer, attention and MLP opposed
    ("a-slerp-grad", "slerp", ("a-ft1", "a-ft2"), "a-ft1", None,
     {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}),
    # session 11: mergekit 0.1.5's methods not tried before (held out: nothing was built on them)
    ("a-karcher", "karcher", ("a-ft1", "a-ft2"), None, None, {}),
    ("b-multislerp", "multislerp", ("b-ft1", "b-ft2"), None, (0.6, 0.4), {}),
    ("a-sce", "sce", ("a-ft1", "a-ft2"), "base-a", None, {"select_topk": 0.5}),
    ("a-ram", "ram", ("a-ft1", "a-ft2"), "base-a", None, {}),
    ("b-della-linear", "della_linear", ("b-ft1", "b-ft2"), "base-b", (0.5, 0.5), {"density": 0.6, "epsilon": 0.1}),
    ("a-breadcrumbs-plain", "breadcrumbs", ("a-ft1", "a-ft2"), "base-a", (0.5, 0.5), {"density": 0.8, "gamma": 0.05}),
    ("b-arcee-fusion", "arcee_fusion", ("b-ft1", "b-ft2"), "b-ft1", None, {}),
    ("a-nearswap", "nearswap", ("a-ft1", "a-ft2"), "a-ft1", None, {"t": 0.01}),
    # passthrough (frankenmerges): layer 0 of one model, layer 1 of the other; then a 3-layer stack of
    # a-ft1's two layers and a-ft2's second (the zoo's models have 2 layers: "slices" are layer ranges)
    ("a-passthrough-swap", "passthrough", ("a-ft1", "a-ft2"), None, None, {"slices": [(0, 1), (1, 2)]}),
    ("a-passthrough-up", "passthrough", ("a-ft1", "a-ft2"), None, None, {"slices": [(0, 2), (1, 2)]}),
    # session 13: mergekit-moe Mixtrals (attention from the base, one expert per model's MLP, random
    # routers): two experts in F32; three in BF16 over a fine-tune as the base (one of the experts' own
    # models); the parents are the base and every expert's model
    ("a-moe", "moe", ("a-ft1", "a-ft2"), "base-a", None, {"dtype": "float32"}),
    ("b-moe3-bf16", "moe", ("b-ft1", "b-ft2", "base-b"), "b-ft1", None, {"dtype": "bfloat16"}),
)
# a Q8_0 GGUF of a MoE merge (convert_hf_to_gguf's stacked experts), uploaded after it: its quantized child
GGUF_OF = ("a-moe", "a-moe-Q8_0-GGUF")


def merge(rel: Path, name: str, method: str, models: tuple[str, ...], base: str | None,
          weights: tuple[float, ...] | None, params: dict[str, Any]) -> None:
    if method == "moe":  # models: the experts' models; the base gives the rest
        assert base is not None
        word_tokenizer(rel / base)
        mergekit_moe(rel / name, rel / base, tuple(rel / m for m in models), dtype=params["dtype"])
        for f in (rel / name).iterdir():  # as the zoo's repos: weights and config only
            if f.name.startswith("tokenizer") or f.suffix == ".yml":
                f.unlink()
        return
    if method == "passthrough":  # one source per slice, in order
        stack = {"merge_method": method, "dtype": "float32", "slices": [
            {"sources": [{"model": str(rel / m), "layer_range": list(r)}]} for m, r in zip(models, params["slices"], strict=True)]}
        _run(rel, name, stack)
        return
    entries: list[dict[str, Any]] = []
    # SLERP's / NearSwap's t and SCE's select_topk are the whole merge's; the rest are each model's
    whole = {k: v for k, v in params.items() if k in ("t", "select_topk")}
    per_model = {k: v for k, v in params.items() if k not in whole}
    for i, m in enumerate(models):
        p = ({"weight": weights[i]} if weights is not None else {}) | per_model
        entries.append({"model": str(rel / m), **({"parameters": p} if p else {})})
    doc: dict[str, Any] = {"merge_method": method, "dtype": "float32", "models": entries}
    if whole:
        doc["parameters"] = whole
    if base is not None:
        doc["base_model"] = str(rel / base)
    _run(rel, name, doc)


def _run(rel: Path, name: str, doc: dict[str, Any]) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    tmp, out = rel.parent / f".{name}", rel / name
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    run_merge(MergeConfiguration.model_validate(doc), str(tmp),
              MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0, quiet=True))
    out.mkdir()
    for f in sorted(tmp.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            shutil.move(str(f), out / f.name)
    shutil.rmtree(tmp)


def build(zoo: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(zoo, out)
    hub = json.loads((out / "hub.json").read_text())
    with (out / "truth.csv").open("a", newline="") as f:
        w = csv.writer(f)
        for i, (name, method, models, base, weights, params) in enumerate(RECIPES):
            merge(out / ORG, name, method, models, base, weights, params)
            hub["repos"][f"{ORG}/{name}"] = {"createdAt": f"2024-01-02T{i:02d}:00:00.000Z"}
            parents = models + ((base,) if method == "moe" and base not in models else ())
            w.writerow([f"{ORG}/{name}", ";".join(f"{ORG}/{m}" for m in parents), "merge"])
        source, copy = GGUF_OF
        (out / ORG / copy).mkdir()
        write_llama_gguf(out / ORG / copy / f"{copy}.gguf", load_file(str(out / ORG / source / "model.safetensors")),
                         "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
        hub["repos"][f"{ORG}/{copy}"] = {"createdAt": f"2024-01-02T{len(RECIPES):02d}:00:00.000Z"}
        w.writerow([f"{ORG}/{copy}", f"{ORG}/{source}", "quantized"])
    (out / "hub.json").write_text(json.dumps(hub))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True, help="a relations zoo (index zoo make DIR --preset relations)")
    ap.add_argument("--out", type=Path, required=True, help="where the extended copy is written (replaced)")
    args = ap.parse_args()
    build(args.zoo, args.out)
    forest = rec.recover(args.out, Options())
    truth = read_relations_csv(args.out / "truth.csv")
    rows = {r.repo_id: r for r in forest.rows}
    methods = {f"{ORG}/{name}": method for name, method, *_ in RECIPES}
    print("| merge | method | recovered relation | recovered parents | parent set right |")
    print("|---|---|---|---|---|")
    for child, (parents, relation) in sorted(truth.items()):
        if relation != "merge" and child != f"{ORG}/{GGUF_OF[1]}":
            continue
        row = rows[child]
        got = [p for p, _ in row.parents] if row.relation == "merge" else [row.parent]
        method = methods.get(child, "gguf Q8_0" if relation == "quantized" else "zoo recipe")
        shown = ", ".join(f"{p} {w:.2f}" for p, w in row.parents) if row.relation == "merge" else row.parent
        print(f"| {child} | {method} | {row.relation} | {shown} | {set(got) == set(parents)} |")
    print()
    print(render_report(evaluate(forest, read_truth_csv(args.out / "truth.csv"), truth)))


if __name__ == "__main__":
    main()
