"""The siblings test (indexer.lineage.siblings) switched off and on: batch `mother` on each zoo, with and without
upload times, edge accuracy both ways and every edge the test moves, right or wrong.

    .venv/bin/python bench/sibling_steps.py ZOO [ZOO ...]

Off: `siblings.MIN_SIBLINGS` set past any family, so no edge qualifies (the method before session 21's change).
Prints a markdown table and the list of moved edges (model: parent off -> parent on [right / wrong / neither]).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexer.lineage.siblings as siblings  # noqa: E402
from indexer.evaluate import read_truth_csv  # noqa: E402
from indexer.lineage.methods import Options  # noqa: E402
from indexer.lineage.recover import recover  # noqa: E402


def parents(zoo: Path, use_time: bool, on: bool) -> dict[str, str]:
    kept = siblings.MIN_SIBLINGS
    siblings.MIN_SIBLINGS = kept if on else 10**9
    try:
        return {r.repo_id: r.parent for r in recover(zoo, Options(method="mother", use_time=use_time)).rows}
    finally:
        siblings.MIN_SIBLINGS = kept


def _verdict(true: str | None, off: str | None, on: str) -> str:
    return "right" if on == true else "wrong" if off == true else "neither"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| zoo | times | test off | test on | moved right | moved wrong |\n|---|---|---|---|---|---|")
    notes, pooled = [], {True: [0, 0, 0], False: [0, 0, 0]}
    for zoo in args.zoos:
        truth = read_truth_csv(zoo / "truth.csv")
        edges = [c for c in sorted(truth) if truth[c]]
        for use_time in (True, False):
            off, on = parents(zoo, use_time, False), parents(zoo, use_time, True)
            a, b = sum(off.get(c) == truth[c] for c in edges), sum(on.get(c) == truth[c] for c in edges)
            moved = sorted(c for c in on if on[c] != off.get(c))
            right = sum(on[c] == truth.get(c) for c in moved)
            wrong = sum(off.get(c) == truth.get(c) for c in moved)
            print(f"| {zoo.name} | {'with' if use_time else 'without'} | {a}/{len(edges)} | {b}/{len(edges)} | {right} | {wrong} |")
            pooled[use_time] = [pooled[use_time][0] + a, pooled[use_time][1] + b, pooled[use_time][2] + len(edges)]
            notes += [f"{zoo.name} {'with' if use_time else 'without'} times: {c}: {off.get(c) or '(root)'} -> "
                      f"{on[c] or '(root)'} [{_verdict(truth.get(c), off.get(c), on[c])}]" for c in moved]
    for use_time, (a, b, n) in pooled.items():
        print(f"| pooled | {'with' if use_time else 'without'} | {a}/{n} ({a / max(n, 1):.3f}) | {b}/{n} ({b / max(n, 1):.3f}) | | |")
    print()
    for line in notes:
        print("-", line)


if __name__ == "__main__":
    main()
