"""Does a fine-tune's row norm shrink or grow from its parent's? The measurement behind the row-norm direction
cue (`index recover --no-time --orient center-norm`, an ablation that was not adopted).

    .venv/bin/python bench/norm_change.py ZOO [ZOO ...]

Per zoo, over the true fine-tune edges of truth.csv whose compared bodies differ (copies, duplicates and
frozen-backbone children have nothing to say): the share of rows (a conv kernel's output filters, else a
matrix's rows) of the body's conv kernels and matrices that are shorter in the child, and the ratio
of the child's to the parent's total norm. Weight decay shrinks filters a BatchNorm makes scale-free; an
update with no pull towards zero adds its own norm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402

from indexer.evaluate import read_relations_csv  # noqa: E402
from sketches.layers import canonical_tensors, is_head  # noqa: E402
from sketches.safetensors import open_local_repo  # noqa: E402


def body(folder: Path) -> dict[str, np.ndarray]:
    """The body matrices and conv kernels of a repo folder, under normalised names, in float32."""
    with open_local_repo(folder) as weights:
        infos = weights.tensors()
        stored = canonical_tensors(infos)
        return {n: weights.read(raw).astype(np.float32) for n, raw in stored.items()
                if len(infos[raw].shape) in (2, 4) and not is_head(n)}


def rows(model: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.linalg.norm(model[n].reshape(model[n].shape[0], -1), axis=1) for n in names])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    args = ap.parse_args()
    print("| zoo | layers | fine-tune edges | child's rows shorter in most rows | median share of shorter rows "
          "| child / parent norm: median (min - max) |")
    print("|---|---|---|---|---|---|")
    for zoo in args.zoos:
        shares, ratios, kinds = [], [], set()
        for child, (parents, relation) in sorted(read_relations_csv(zoo / "truth.csv").items()):
            if relation not in ("finetune", "") or len(parents) != 1:  # "": a zoo of fine-tunes only
                continue
            p, c = body(zoo / parents[0]), body(zoo / child)
            shared = [n for n in sorted(p) if n in c and p[n].shape == c[n].shape]
            if not shared or all(np.array_equal(p[n], c[n]) for n in shared):
                continue
            kinds.update("conv kernels" if p[n].ndim == 4 else "matrices" for n in shared)
            rp, rc = rows(p, shared), rows(c, shared)
            shares.append(float(np.mean(rc < rp)))
            ratios.append(float(np.sqrt((rc ** 2).sum() / (rp ** 2).sum())))
        if not shares:
            print(f"| {zoo.name} | - | 0 | - | - | - |")
            continue
        print(f"| {zoo.name} | {', '.join(sorted(kinds))} | {len(shares)} | {sum(s > 0.5 for s in shares)}/{len(shares)} "
              f"| {np.median(shares):.2f} | {np.median(ratios):.4f} ({min(ratios):.4f} - {max(ratios):.4f}) |")


if __name__ == "__main__":
    main()
