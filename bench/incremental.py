"""Incremental index vs truth and vs the batch `mother` recovery, on the zoos, in several arrival orders.

    .venv/bin/python bench/incremental.py [--zoo DIR ...] [--orders 3 | --order upload --order 1 ...] [--k 16] [--device auto]

Default zoos: zoo/vthr-ft, zoo/vthr-lora-f, zoo/vthr-lora-v when their zoo.json says complete, else
zoo/small-ft. Per zoo and order (upload = hub.json createdAt; then seeded random permutations):
edge accuracy vs truth.csv, agreement with batch mother (share of models with the same parent),
recall@k (share of true parent-child pairs that were compared exactly, i.e. one was among the other's
k nominees when it arrived), exact computations per arrival (max, mean), arrival paths, seconds.
Prints a markdown table (stdout); progress on stderr via logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.evaluate import read_truth_csv  # noqa: E402
from indexer.incremental.folder import ingest_folder  # noqa: E402
from indexer.incremental.index import DEFAULT_EXPAND  # noqa: E402
from indexer.lineage.methods import Options  # noqa: E402
from indexer.lineage.recover import recover  # noqa: E402

logger = logging.getLogger("bench.incremental")
ROOT = Path(__file__).resolve().parents[1]


def default_zoos() -> list[Path]:
    out = []
    for name in ("vthr-ft", "vthr-lora-f", "vthr-lora-v"):
        meta = ROOT / "zoo" / name / "zoo.json"
        if meta.is_file() and (ROOT / "zoo" / name / "truth.csv").is_file():
            doc = json.loads(meta.read_text())
            if doc.get("status", "complete") != "building" and doc.get("total_seconds") is not None:
                out.append(meta.parent)
    return out or [ROOT / "zoo" / "small-ft"]


def accuracy(parents: dict[str, str], truth: dict[str, str]) -> float:
    edges = [c for c in sorted(truth) if truth[c]]
    return sum(parents.get(c) == truth[c] for c in edges) / len(edges) if edges else 1.0


def run_zoo(zoo: Path, orders: list[str | int], k: int, device: str, expand: int = DEFAULT_EXPAND, batch_too: bool = True) -> list[str]:
    truth = read_truth_csv(zoo / "truth.csv")
    batch = recover(zoo, Options(method="mother", device=device)).parents() if batch_too else {}  # type: ignore[arg-type]
    rows = [f"| {zoo.name} | batch mother | {accuracy(batch, truth):.3f} | 1.000 | - | - | - | - | - |"] if batch_too else []
    for order in orders:
        with tempfile.TemporaryDirectory() as home:
            rep = ingest_folder(Path(home), zoo, order=order, k=k, device=device, expand=expand)
        arrived: set[str] = set()
        compared = 0
        true_pairs = [(truth[c], c) for c in sorted(truth) if truth[c]]
        nominated: dict[str, set[str]] = {a.repo_id: set(a.nominees) for a in rep.arrivals}
        for parent, child in true_pairs:
            compared += int(parent in nominated[child] or child in nominated[parent])
        del arrived
        exact = [a.exact for a in rep.arrivals]
        paths = Counter(a.path for a in rep.arrivals)
        agree = f"{sum(rep.parents.get(m) == batch.get(m) for m in sorted(truth)) / len(truth):.3f}" if batch else "n/a"
        label = f"order {order}" + (f", expand {expand} (compared incl. hop {_compared(rep, truth):.3f})" if expand else "")
        rows.append(f"| {zoo.name} | incremental, {label} | {accuracy(rep.parents, truth):.3f} | {agree} | "
                    f"{compared / len(true_pairs):.3f} | {max(exact)} | {sum(exact) / len(exact):.1f} | "
                    f"{paths['new']}/{paths['attach']}/{paths['recompute']} | {rep.seconds:.1f} |")
        logger.info(rows[-1])
    return rows


def _compared(rep: object, truth: dict[str, str]) -> float:
    """Share of true pairs compared exactly, nominees and second-hop comparisons both."""
    seen = {a.repo_id: set(a.nominees) | set(a.second_hop) for a in rep.arrivals}  # type: ignore[attr-defined]
    pairs = [(truth[c], c) for c in sorted(truth) if truth[c]]
    return sum(p in seen[c] or c in seen[p] for p, c in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, action="append")
    parser.add_argument("--orders", type=int, default=3, help="random orders besides upload order")
    parser.add_argument("--order", action="append", help="run only these orders ('upload' or a seed); repeatable")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--expand", type=int, default=DEFAULT_EXPAND, help="second-hop exact comparisons per arrival (LineageIndex)")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch mother row (agreement then n/a)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for name in ("indexer", "store", "sketches"):
        logging.getLogger(name).setLevel(logging.WARNING)
    orders: list[str | int] = ["upload", *range(args.orders)]
    if args.order:  # e.g. the seeds a previous run left out
        orders = [o if o == "upload" else int(o) for o in args.order]
    lines = ["| zoo | run | accuracy vs truth | same parent as batch | recall@k (true pair compared) | "
             "exact/arrival max | exact/arrival mean | paths new/attach/recompute | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for zoo in args.zoo or default_zoos():
        lines += run_zoo(zoo, orders, args.k, args.device, args.expand, not args.no_batch)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
