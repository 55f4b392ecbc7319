"""What real fine-tuning updates look like: the numbers behind the virtual families' update model
(`indexer.hub_emulator.virtual`, issue 14).

For every (parent, child) edge of a zoo's truth.csv whose tensors share shapes, and for every 2-D body
matrix of at least 16 x 16, the update dW = W_child - W_parent is measured:

- rel: ||dW||_F / ||W_parent||_F, the update's size;
- top8: share of ||dW||_F^2 in its 8 largest singular values (low-rank dominance; a Gaussian matrix of
  the same shape has about 8 / min(shape) of it);
- alpha: slope of log s_k against log k over k = 1..min(16, min(shape) / 4) (s_k ~ k^-alpha);
- layer sigma: per child and module kind, the standard deviation of ln(rel) across layers (how much the
  update's size varies with depth), and the median ratio of a kind's rel to the model's median rel;
- same16: share of elements whose BF16 roundings of parent and child are equal (sub-resolution updates).

`--made-pair` also trains a pair here (transformers' LlamaForCausalLM, hidden 128, 4 layers, byte
tokens, batches of 8 x 64): a root "pre-trained" on this repository's Python sources, then a full fine-tune, a continued
pre-training (more steps, higher lr) and a rank-16 LoRA on q/v merged into the weights, each on the
repository's Markdown. A few minutes on 2 CPU cores.

    .venv/bin/python bench/update_stats.py --zoo /work/zoo/small-ft --zoo /work/zoo/wild-gpt2 [--made-pair]
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from indexer.lineage.recover import discover_repos
from sketches.layers import is_head
from sketches.safetensors import open_local_repo

_LAYER = re.compile(r"\.(\d+)\.")


def bf16(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def kind_of(name: str) -> str:
    """Module kind without the layer index: 'attention.attention.query.weight' -> 'query' etc."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias") and not p.isdigit()]
    return ".".join(parts[-2:]) if parts else name


def measure(parent: np.ndarray, child: np.ndarray) -> dict[str, float]:
    delta = (child.astype(np.float64) - parent.astype(np.float64)).reshape(parent.shape[0], -1)
    norm_w = float(np.linalg.norm(parent))
    s = np.linalg.svd(delta, compute_uv=False)
    energy = float((s**2).sum())
    m = min(16, max(2, len(s) // 4))
    k = np.arange(1, m + 1)
    ok = s[:m] > 0
    alpha = float(-np.polyfit(np.log(k[ok]), np.log(s[:m][ok]), 1)[0]) if ok.sum() >= 2 else math.nan
    return {
        "rel": float(np.sqrt(energy)) / norm_w if norm_w else math.nan,
        "top8": float((s[:8] ** 2).sum() / energy) if energy else math.nan,
        "top8_gauss": 8 / min(delta.shape),
        "alpha": alpha,
        "same16": float(np.mean(bf16(parent) == bf16(child))),
        "same": float(np.mean(parent == child)),
    }


def pair_rows(parent: dict[str, np.ndarray], child: dict[str, np.ndarray], tag: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in sorted(set(parent) & set(child)):
        a, b = parent[name], child[name]
        if a.shape != b.shape or a.ndim < 2 or min(a.shape[0], int(np.prod(a.shape[1:]))) < 16 or is_head(name):
            continue
        if "embed" in name or "wte" in name or "wpe" in name:
            continue  # vocabularies: a different question (rows of unseen tokens never move)
        layer = _LAYER.search(name)
        rows.append({"edge": tag, "tensor": name, "kind": kind_of(name), "layer": int(layer.group(1)) if layer else -1,
                     **measure(a, b)})
    return rows


def load(folder: Path) -> dict[str, np.ndarray]:
    with open_local_repo(folder) as weights:
        return {n: weights.read(n) for n, t in weights.tensors().items() if len(t.shape) >= 2}


def zoo_rows(zoo: Path) -> list[dict[str, object]]:
    folders = dict(discover_repos(zoo))
    rows: list[dict[str, object]] = []
    with open(zoo / "truth.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            if not rec["parent"] or rec.get("relation", "finetune") not in ("finetune", "", None):
                continue
            if rec["parent"] not in folders or rec["child"] not in folders:
                continue
            try:
                rows += pair_rows(load(folders[rec["parent"]]), load(folders[rec["child"]]), f"{zoo.name}:{rec['child']}")
            except Exception as exc:  # noqa: BLE001 - one odd model (quantized, adapter-only) must not stop the survey
                print(f"skip {rec['child']}: {exc}", file=sys.stderr)
    return rows


def summarise(rows: list[dict[str, object]], label: str) -> None:
    if not rows:
        print(f"{label}: no comparable edges")
        return
    untouched = float(np.mean([float(r["rel"]) == 0 for r in rows]))
    rows = [r for r in rows if float(r["rel"]) > 0]  # frozen matrices have no spectrum: counted apart
    if not rows:
        print(f"{label}: every matrix untouched")
        return
    col = {k: np.array([float(r[k]) for r in rows]) for k in ("rel", "top8", "top8_gauss", "alpha", "same16", "same")}
    q = lambda v: f"{np.nanmedian(v):.3g} [{np.nanpercentile(v, 10):.3g}, {np.nanpercentile(v, 90):.3g}]"
    sig, kind_ratio = layer_spread(rows)
    print(f"| {label} | {len({r['edge'] for r in rows})} | {len(rows)} | {q(col['rel'])} | {q(col['top8'])} "
          f"(gauss {np.median(col['top8_gauss']):.2f}) | {q(col['alpha'])} | {sig:.2f} | {q(col['same16'])} | {untouched:.2f} |")
    print("  per-kind median rel / model median: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kind_ratio.items())))


def layer_spread(rows: list[dict[str, object]]) -> tuple[float, dict[str, float]]:
    """(median over (edge, kind) of the std of ln rel across layers, median per kind of rel / edge median)."""
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_edge: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by[(str(r["edge"]), str(r["kind"]))].append(float(r["rel"]))
        per_edge[str(r["edge"])].append(float(r["rel"]))
    sigmas = [float(np.std(np.log(v))) for v in by.values() if len(v) >= 3 and min(v) > 0]
    ratios: dict[str, list[float]] = defaultdict(list)
    for (edge, kind), v in by.items():
        ratios[kind].append(float(np.median(v) / np.median(per_edge[edge])))
    return (float(np.median(sigmas)) if sigmas else math.nan), {k: float(np.median(v)) for k, v in ratios.items()}


# --- a pair made here ------------------------------------------------------------------------------


def _corpus(pattern: str, limit: int) -> np.ndarray:
    root = Path(__file__).resolve().parents[1]
    files = [p for top in ("indexer", "sketches", "store", "bench", "docs", "tests") for p in sorted((root / top).glob(pattern))]
    text = b"".join(p.read_bytes() for p in files + sorted(root.glob(pattern.split("/")[-1])))
    return np.frombuffer(text[:limit], dtype=np.uint8).astype(np.int64)


def _train(model, data: np.ndarray, *, steps: int, lr: float, seed: int, params=None) -> float:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr, weight_decay=0.0)
    tokens = torch.from_numpy(data)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - 65, (8,), generator=gen)
        batch = torch.stack([tokens[s:s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def made_pair_rows(steps: int) -> list[dict[str, object]]:
    """Root: `steps` AdamW steps at 1e-3 on Python source; children on Markdown (see module docstring)."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    root = LlamaForCausalLM(config)
    code, prose = _corpus("**/*.py", 4_000_000), _corpus("**/*.md", 2_000_000)
    print(f"root loss {_train(root, code, steps=steps, lr=1e-3, seed=1):.3f}", file=sys.stderr)
    state = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items() if v.ndim == 2}
    base = state(root)
    rows: list[dict[str, object]] = []
    for tag, n, lr in (("full-ft", steps // 2, 1e-4), ("continued-pt", steps, 5e-4)):
        child = copy.deepcopy(root)
        print(f"{tag} loss {_train(child, prose, steps=n, lr=lr, seed=2):.3f}", file=sys.stderr)
        rows += pair_rows(base, state(child), f"made:{tag}")
    rows += pair_rows(base, _merged_lora(root, prose, steps=steps // 2), "made:lora-qv")
    return rows


def _merged_lora(root, prose: np.ndarray, *, steps: int) -> dict[str, np.ndarray]:
    """Rank-16 LoRA (alpha 16) on q and v, trained, merged: W + B @ A."""
    import copy

    import torch

    model = copy.deepcopy(root)
    for p in model.parameters():
        p.requires_grad_(False)
    factors = []
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            a = torch.nn.Parameter(torch.randn(16, proj.in_features) / math.sqrt(proj.in_features))
            b = torch.nn.Parameter(torch.zeros(proj.out_features, 16))
            base = proj.forward
            proj.forward = (lambda x, base=base, a=a, b=b: base(x) + (x @ a.T) @ b.T)  # type: ignore[method-assign]
            factors.append((proj, a, b))
    print(f"lora loss {_train(model, prose, steps=steps, lr=1e-3, seed=3, params=[p for _, a, b in factors for p in (a, b)]):.3f}",
          file=sys.stderr)
    with torch.no_grad():
        for proj, a, b in factors:
            proj.weight += b @ a
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.ndim == 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, action="append", default=[])
    parser.add_argument("--made-pair", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print("| source | edges | matrices | rel = ||dW||/||W|| (median [p10, p90]) | top-8 energy share | alpha "
          "(s_k ~ k^-alpha) | layer sigma (ln rel) | BF16-identical share | untouched matrices |")
    print("|---|---|---|---|---|---|---|---|---|")
    for zoo in args.zoo:
        summarise(zoo_rows(zoo), zoo.name)
    if args.made_pair:
        rows = made_pair_rows(args.steps)
        for tag in sorted({str(r["edge"]) for r in rows}):
            summarise([r for r in rows if r["edge"] == tag], tag)


if __name__ == "__main__":
    main()
