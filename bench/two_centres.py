"""The row-norm votes behind `orient._central_edge` on the arch sweep's path families (bench/arch_sweep.py).

    .venv/bin/python bench/two_centres.py --sweep /tmp/arch_sweep bert electra mamba wav2vec2 gpt2

Per architecture: `norm_votes` of each edge of the path ft2 - base - ft1 - ft1-ft over every body matrix the
four models share (-1: the child's rows longer, +1: shorter), their sum over the non-central edges (the
regime; |sum| >= 1 decides between the two centres), the central edge's vote, and each model's mean row norm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.lineage.orient import norm_votes
from sketches.layers import canonical_tensors, is_head
from sketches.safetensors import open_local_repo

MODELS = ("base", "ft1", "ft2", "ft1-ft")


def rows_of(folder: Path) -> dict[str, np.ndarray]:
    with open_local_repo(folder) as weights:
        infos = weights.tensors()
        stored = canonical_tensors(infos)
        return {n: np.asarray(weights.read(raw)) for n, raw in stored.items() if not is_head(n) and len(infos[raw].shape) >= 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, default=Path("/tmp/arch_sweep"), help="bench/arch_sweep.py's --out folder")
    ap.add_argument("arch", nargs="+")
    args = ap.parse_args()
    print("| arch | base -> ft2 | ft1 -> ft1-ft | regime (sum) | base -> ft1 | mean row norm base / ft1 / ft2 / ft1-ft |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch:
        arrays = [rows_of(args.sweep / arch / "sweep" / m) for m in MODELS]
        common = sorted(set.intersection(*(set(a) for a in arrays)))
        rows = [np.concatenate([np.linalg.norm(a[n].reshape(a[n].shape[0], -1), axis=1) for n in common]) for a in arrays]
        v = norm_votes(rows)
        means = " / ".join(f"{r.mean():.4f}" for r in rows)
        print(f"| {arch} | {v[0, 2]:+.2f} | {v[1, 3]:+.2f} | {v[0, 2] + v[1, 3]:+.2f} | {v[0, 1]:+.2f} | {means} |")


if __name__ == "__main__":
    main()
