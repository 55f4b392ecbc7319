"""Parent or sibling? A measured rule for the edges batch `mother` hangs under a near-copy sibling.

    .venv/bin/python bench/sibling_steps.py ZOO [ZOO ...] [--min-siblings 2]

The misses left on the wild conv zoos (bench/RESULTS.md sessions 9-21) are fine-tunes hung under a sibling
whose own step from their common parent is tiny (a short low-lr fine-tune, drift 0.001): the child's
update needs a cosine of only |dF| / (2 |dC|) with that sibling's step to sit nearer it than the parent,
and sibling updates from one base share directions (cosines 0.02-0.35 on wild-conv-s1). From three
models the two readings are the same point (child of F, with its own update correlated with F's step;
or sibling of F): only the other siblings tell them apart.

The rule measured here, on batch `mother`'s forest (with and without upload times): for each edge F -> C
whose F has a parent G and at least MIN_SIBLINGS other children S of G (no copy relation), take the
cosines, about G, of C's displacement with F's and with each S's (over the body tensors the three hold
with one shape). Under "C is a sibling of F" F is one of C's siblings, exchangeable with the others, so its
cosine is the largest with probability 1 / (m + 1); under "C comes from F" it carries all of F's step.
C moves to G when some S is at least as aligned with C as F is (F's step is nothing special to C).
Prints edge accuracy before and after per zoo and with / without times, and every edge the rule moves.
This is a bench, not the method: neither `mother` nor the incremental index applies the rule.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.evaluate import read_truth_csv  # noqa: E402
from indexer.incremental.folder import read_repo  # noqa: E402
from indexer.lineage.methods import Options  # noqa: E402
from indexer.lineage.recover import discover_repos, recover  # noqa: E402
from sketches.layers import is_head  # noqa: E402

MIN_SIBLINGS = 2  # F and C beside two others: the smallest set in which F can fail to be C's most aligned


def cosine(g: str, x: str, y: str, memo: dict) -> float:
    """cos of (x - g, y - g) over the body tensors all three hold with one shape (heads left out), float64."""
    key = (g, *sorted((x, y)))
    if key not in memo:
        a, b, c = models[g], models[x], models[y]
        names = sorted(n for n in a.keys() & b.keys() & c.keys() if not is_head(n) and a[n].shape == b[n].shape == c[n].shape)
        dx = np.concatenate([(b[n].astype(np.float64) - a[n]).ravel() for n in names]) if names else np.zeros(0)
        dy = np.concatenate([(c[n].astype(np.float64) - a[n]).ravel() for n in names]) if names else np.zeros(0)
        nx, ny = np.linalg.norm(dx), np.linalg.norm(dy)
        memo[key] = float(dx @ dy / (nx * ny)) if nx > 0 and ny > 0 else float("nan")
    return memo[key]


models: dict[str, dict[str, np.ndarray]] = {}


def apply_rule(parents: dict[str, str], copies: set[str], memo: dict, min_siblings: int = MIN_SIBLINGS
               ) -> tuple[dict[str, str], list[str]]:
    children: dict[str, list[str]] = {}
    for c, p in parents.items():
        if p:
            children.setdefault(p, []).append(c)
    out, moved = dict(parents), []
    for c, f in sorted(parents.items()):
        g = parents.get(f, "") if f else ""
        if not g or c in copies or f in copies:
            continue
        others = [s for s in children.get(g, []) if s not in (c, f) and s not in copies]
        if len(others) < min_siblings:
            continue
        mine = cosine(g, f, c, memo)
        theirs = [cosine(g, s, c, memo) for s in others]
        if np.isnan(mine):
            continue
        best = max((t for t in theirs if not np.isnan(t)), default=-1.0)
        if best >= mine:
            out[c] = g
            moved.append(f"{c}: {f} -> {g} (cos {mine:.3f}, best sibling {best:.3f} of {len(others)})")
    return out, moved


def accuracy(parents: dict[str, str], truth: dict[str, str]) -> tuple[int, int]:
    edges = [c for c in truth if truth[c]]
    return sum(parents.get(c) == truth[c] for c in edges), len(edges)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--min-siblings", type=int, default=MIN_SIBLINGS, help="other children of G the rule needs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| zoo | times | before | after | moved right | moved wrong |\n|---|---|---|---|---|---|")
    notes = []
    for zoo in args.zoos:
        truth = read_truth_csv(zoo / "truth.csv")
        models.clear()
        for repo, path in discover_repos(zoo):
            try:
                models[repo] = read_repo(path)[2]
            except Exception as exc:  # noqa: BLE001 -- an adapter or unreadable repo is left out of the rule
                logging.warning("%s: %s", repo, exc)
        memo: dict = {}
        for use_time in (True, False):
            forest = recover(zoo, Options(method="mother", use_time=use_time))
            parents = {r: p for r, p in forest.parents().items() if r in models}
            copies = {r.repo_id for r in forest.rows if r.relation in ("quantized", "duplicate")}  # as recovered
            after, moved = apply_rule(parents, copies, memo, args.min_siblings)
            b, n = accuracy(parents, truth)
            a, _ = accuracy(after, truth)
            right = sum(after[c] == truth.get(c) for c in after if after[c] != parents[c])
            wrong = sum(parents[c] == truth.get(c) for c in after if after[c] != parents[c])
            print(f"| {zoo.name} | {'with' if use_time else 'without'} | {b}/{n} | {a}/{n} | {right} | {wrong} |")
            notes += [f"{zoo.name} {'with' if use_time else 'without'} times: {m}"
                      f" [{'right' if after[m.split(':')[0]] == truth.get(m.split(':')[0]) else 'wrong'}]" for m in moved]
    print()
    for line in notes:
        print("-", line)


if __name__ == "__main__":
    main()
