"""Does a model's update contain a sibling's? The near-copy ambiguity of issue 11, measured on the wild zoos.

    .venv/bin/python bench/near_copy.py /work/zoo/wild-conv-s1 [more zoos]

For every trained model q under a parent p (truth.csv; copies and frozen-body children left out) and every
x that is either q's own child ("grandchild") or a later child of p ("sibling"), over the body's shared
weight matrices and kernels (heads and classifiers left out): u = q - p, v = x - p,
    c      = <v, u> / |u|^2  -- 1 when x holds q's update exactly as a descendant does, 0 for an update
             independent of q's;
    c_perp = the same after projecting u and v off the span of p's other children's updates (the
             direction fine-tuning from p takes whatever the task), with z = cos(u_perp, v_perp) sqrt(n).
Prints one line per triple, grandchildren first, by c. An analysis of the zoos, not a rule of the method.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

HEADS = ("fc", "classifier", "head", "pooler", "lm_head")


def body(zoo: Path, repo_id: str) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted((zoo / repo_id).glob("*.safetensors")):
        for name, value in load_file(str(path)).items():
            if value.dtype.kind == "f" and value.ndim >= 2 and not any(h in name for h in HEADS):
                out[name] = value.astype(np.float64)
    return out


def flat(arrays: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([arrays[n].ravel() for n in names])


def _tag(meta: dict) -> str:
    return meta.get("tag") or f"level {meta.get('level')}"


def triples(zoo: Path) -> list[tuple]:
    parent = {r["child"]: r["parent"] for r in csv.DictReader(open(zoo / "truth.csv"))}
    meta = json.load(open(zoo / "zoo.json"))["models"]
    # the vthr preset records no drift (every model trained) nor tag (its level stands for it)
    trained = {r for r, m in meta.items() if m.get("copy") is None and (m.get("drift") is None or m["drift"] > 0)}
    kids: dict[str, list[str]] = {}
    for child, p in parent.items():
        if p and child in trained:
            kids.setdefault(p, []).append(child)
    loaded: dict[str, dict[str, np.ndarray]] = {}

    def weights(r: str) -> dict[str, np.ndarray]:
        return loaded.setdefault(r, body(zoo, r))

    rows = []
    for p, children in sorted(kids.items()):
        for q in children:
            xs = [(x, "grandchild") for x in kids.get(q, [])]
            xs += [(x, "sibling") for x in children if x != q and meta[x]["created_at"] > meta[q]["created_at"]]
            for x, kind in xs:
                P, Q, X = weights(p), weights(q), weights(x)
                names = sorted(n for n in P if n in Q and n in X and P[n].shape == Q[n].shape == X[n].shape)
                if len(names) < len(P) / 2:
                    continue
                base = flat(P, names)
                u, v = flat(Q, names) - base, flat(X, names) - base
                if not u.any():
                    continue
                c = float(v @ u / (u @ u))
                others = [o for o in children if o not in (x, q)]
                c_perp = z = float("nan")
                if others:
                    basis, _ = np.linalg.qr(np.stack([flat(weights(o), names) - base for o in others]).T)
                    up, vp = u - basis @ (basis.T @ u), v - basis @ (basis.T @ v)
                    c_perp = float(vp @ up / (up @ up))
                    z = float(vp @ up / (np.linalg.norm(up) * np.linalg.norm(vp)) * np.sqrt(len(up)))
                scale = np.linalg.norm(base)
                rows.append((zoo.name, kind, x, q, _tag(meta[x]), _tag(meta[q]), np.linalg.norm(u) / scale,
                             np.linalg.norm(v) / scale, c, c_perp, z, len(others)))
    return rows


def main() -> None:
    rows = [r for zoo in sys.argv[1:] for r in triples(Path(zoo))]
    print("| zoo | x is q's | x | q | x's tag | q's tag | drift q | drift x | c | c_perp | z | others |")
    print("|" + "---|" * 12)
    for r in sorted(rows, key=lambda r: (r[1] != "grandchild", r[8])):
        print("| {} | {} | {} | {} | {} | {} | {:.4f} | {:.4f} | {:.2f} | {:.2f} | {:.1f} | {} |".format(*r))


if __name__ == "__main__":
    main()
