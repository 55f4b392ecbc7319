"""Does lineage survive the byte budget? Batch `mother` recovery on only what the read plan reads, versus on
the full weights, for every model of a zoo.

For each repo of the zoo, the plan (`sketches.plan.plan_reads`) is applied to its headers and only the
planned blocks are read (`FileSource`, the same range reads the crawler makes); they are written as a
"planned zoo" (same repo ids, README.md and hub.json, each tensor cut to its planned rows), and
`indexer.evaluate.evaluate_folder` runs on both zoos with the same options.

Budgets: zoo models are tiny next to a Llama-2-7B (13.5 GB in BF16), whose 16 MiB budget is 0.12 % of it.
`--fraction` scales the budget (and the plan's smallest block) by each model's size so that the plan drops
as much as it would on a 7B model; the default budget is reported too (zoo models then fit whole).
`--plan v2` is the plan before issue 14 (first rows of every attention matrix), `v3` the default.

    .venv/bin/python bench/budget_accuracy.py [--zoo zoo/vthr-ft] [--fraction 0.00124] [--plan v3]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from safetensors.numpy import save_file

from indexer.evaluate import evaluate_folder
from indexer.lineage.methods import Options
from indexer.lineage.recover import discover_repos
from sketches.layers import family_key
from sketches.plan import PLAN_ITEMSIZE, PLAN_V2, PLAN_V3, PlanSpec, plan_reads
from sketches.safetensors import open_local_repo

MIB = 1024 * 1024
LLAMA_7B_BYTES = 13_476_831_232  # BF16 tensors of Llama-2-7B (the emulator's layout, as on the Hub)
DEFAULT_BUDGET = 16 * MIB  # settings.py's default since plan v3
PLANS = {"v2": PLAN_V2, "v3": PLAN_V3}


def planned_copy(zoo: Path, out: Path, *, fraction: float | None, budget: int, spec: PlanSpec) -> tuple[int, int]:
    """Write the planned zoo to `out`; returns (bytes read, bytes of all tensors) over the zoo."""
    read = total = 0
    for repo_id, folder in discover_repos(zoo):
        with open_local_repo(folder) as weights:
            tensors = weights.tensors()
            size = sum(t.nbytes for t in tensors.values())
            cap, min_block = budget, spec.min_block_elements * PLAN_ITEMSIZE
            if fraction is not None:  # the 7B's proportions: budget and smallest block scaled alike
                cap = max(1, math.floor(size * fraction))
                min_block = max(1, math.floor(min_block * cap / DEFAULT_BUDGET))
            family = family_key({n: t.shape for n, t in tensors.items()})
            plan = plan_reads(tensors, family=family, budget=cap, spec=spec, min_block_bytes=min_block)
            before = weights.bytes_read
            arrays = {b.tensor: np.ascontiguousarray(weights.read(b.tensor, rows=b.rows)) for b in plan.blocks}
            read += weights.bytes_read - before
            total += size
        target = out / repo_id
        target.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(target / "model.safetensors"))
        if (folder / "README.md").is_file():
            shutil.copy(folder / "README.md", target / "README.md")
    if (zoo / "hub.json").is_file():
        shutil.copy(zoo / "hub.json", out / "hub.json")
    return read, total


def accuracy(folder: Path, options: Options) -> tuple[float, float]:
    t = time.perf_counter()
    report = evaluate_folder(folder, options)
    return report.accuracy, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/vthr-ft"))
    parser.add_argument("--fraction", type=float, default=DEFAULT_BUDGET / LLAMA_7B_BYTES)
    parser.add_argument("--method", default="mother", choices=["mother", "mother-paper", "phylogeny"])
    parser.add_argument("--trees", type=int, default=None)
    parser.add_argument("--plan", default="v3", choices=sorted(PLANS))
    parser.add_argument("--scaled-only", action="store_true",
                        help="only the scaled row (full weights and the default budget cost minutes on 2 cores)")
    args = parser.parse_args()
    options = Options(method=args.method, trees=args.trees, device="cpu")  # type: ignore[arg-type]
    full_acc, full_s = (math.nan, math.nan) if args.scaled_only else accuracy(args.zoo, options)
    rows = [("full weights", 1.0, full_acc, full_s)]
    mib = DEFAULT_BUDGET // MIB
    at_7b = args.fraction * LLAMA_7B_BYTES / MIB
    configs = [(f"plan {args.plan}, scaled to {100 * args.fraction:.3f} % of each model (7B at {at_7b:.0f} MiB)", args.fraction)]
    if not args.scaled_only:
        configs.append((f"plan {args.plan}, default budget, {mib} MiB per model", None))
    for label, fraction in configs:
        with tempfile.TemporaryDirectory() as tmp:
            read, total = planned_copy(args.zoo, Path(tmp), fraction=fraction, budget=DEFAULT_BUDGET,
                                       spec=PLANS[args.plan])
            acc, secs = accuracy(Path(tmp), options)
        rows.append((label, read / total, acc, secs))
    print(f"zoo {args.zoo} ({len(discover_repos(args.zoo))} models), method {args.method}\n")
    print("| weights used | bytes read / model size | edge accuracy | delta vs full | recovery (s) |")
    print("|---|---|---|---|---|")
    for label, frac, acc, secs in rows:
        print(f"| {label} | {100 * frac:.3f} % | {acc:.3f} | {acc - full_acc:+.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
