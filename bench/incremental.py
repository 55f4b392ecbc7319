"""Incremental index vs truth and vs the batch `mother` recovery, on the zoos, in several arrival orders.

    .venv/bin/python bench/incremental.py [--zoo DIR ...] [--orders 3 | --order upload --order 1 ...] [--k 16] [--device auto]

Default zoos: zoo/vthr-ft, zoo/vthr-lora-f, zoo/vthr-lora-v when their zoo.json says complete, else
zoo/small-ft. Per zoo and order (upload = hub.json createdAt; then seeded random permutations):
edge accuracy vs truth.csv, agreement with batch mother (share of models with the same parent),
recall@k (share of true parent-child pairs that were compared exactly, i.e. one was among the other's
k nominees when it arrived; "compared in all" adds the second hop and the late-children rounds, where
a source's copies beyond the first are compared since nomination counts them once), exact computations per arrival (max, mean), arrival paths, seconds; then
the share of models whose whole edges row (parent, relation, merge parent set) equals batch's, and the
relation label accuracy vs truth.csv when it has a `relation` column (a relations zoo: adapters, GGUF
and packed quantized copies, merges -- every repo read by the crawl's reader, as `index add` does).
Adapters are satellites, not forest arrivals: recall@k and exact/arrival cover the forest's models and
the pairs between them (an adapter compares at most k other adapters of its base). Models that differ
from batch are logged. Prints a markdown table (stdout); progress on stderr via logging.
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

from indexer.evaluate import read_relations_csv, read_truth_csv
from indexer.incremental.folder import ingest_folder
from indexer.incremental.index import DEFAULT_EXPAND
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover

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


Row = tuple[str, str, frozenset[str]]  # parent, relation, merge parent set (the parents column's ids)


def run_zoo(zoo: Path, orders: list[str | int], k: int, device: str, expand: int = DEFAULT_EXPAND, batch_too: bool = True) -> list[str]:
    truth = read_truth_csv(zoo / "truth.csv")
    relations = {c: rel for c, (_, rel) in read_relations_csv(zoo / "truth.csv").items()}
    forest = recover(zoo, Options(method="mother", device=device)) if batch_too else None  # type: ignore[arg-type]
    batch = forest.parents() if forest is not None else {}
    batch_rows: dict[str, Row] = {r.repo_id: (r.parent, r.relation, frozenset(p for p, _ in r.parents))
                                  for r in (forest.rows if forest is not None else ()) if r.status == "ok"}
    rows = [(f"| {zoo.name} | batch mother | {accuracy(batch, truth):.3f} | 1.000 | - | - | - | - | - | 1.000 | "
            f"{_labels({r: v[1] for r, v in batch_rows.items()}, relations)} |")] if batch_too else []
    for order in orders:
        with tempfile.TemporaryDirectory() as home:
            rep = ingest_folder(Path(home), zoo, order=order, k=k, device=device, expand=expand)
        for repo, reason in sorted(rep.failed.items()):
            logger.warning("%s: not indexed: %s", repo, reason)
        placed = {a.repo_id for a in rep.arrivals}  # the forest's models; adapters are satellites
        true_pairs = [(truth[c], c) for c in sorted(truth) if truth[c] and c in placed and truth[c] in placed]
        nominated: dict[str, set[str]] = {a.repo_id: set(a.nominees) for a in rep.arrivals}
        compared = sum(int(parent in nominated[child] or child in nominated[parent]) for parent, child in true_pairs)
        exact = [a.exact for a in rep.arrivals]
        paths = Counter(a.path for a in rep.arrivals)
        agree = f"{sum(rep.parents.get(m) == batch.get(m) for m in sorted(truth)) / len(truth):.3f}" if batch else "n/a"
        mine: dict[str, Row] = {r: (e.parent, e.relation, frozenset(p for p, _ in e.parents)) for r, e in rep.edges.items()}
        differ = sorted(m for m in truth if mine.get(m) != batch_rows.get(m))
        for m in differ if batch_too else ():
            logger.warning("%s, order %s: %s: batch %s, incremental %s", zoo.name, order, m, batch_rows.get(m), mine.get(m))
        same_row = f"{1 - len(differ) / len(truth):.3f}" if batch_too else "n/a"
        label = f"order {order}" + (f", expand {expand} (compared in all {_compared(rep, true_pairs):.3f})" if expand else "")
        rows.append(f"| {zoo.name} | incremental, {label} | {accuracy(rep.parents, truth):.3f} | {agree} | "
                    f"{compared / max(1, len(true_pairs)):.3f} | {max(exact)} | {sum(exact) / len(exact):.1f} | "
                    f"{paths['new']}/{paths['attach']}/{paths['recompute']} | {rep.seconds:.1f} | {same_row} | "
                    f"{_labels({r: v[1] for r, v in mine.items()}, relations)} |")
        logger.info(rows[-1])
    return rows


def _labels(got: dict[str, str], relations: dict[str, str]) -> str:
    """Relation label accuracy vs truth (roots: ""), or n/a when the truth names no relation."""
    if not any(relations.values()):
        return "n/a"
    return f"{sum(got.get(c, '?') == rel for c, rel in relations.items()) / len(relations):.3f}"


def _compared(rep: object, pairs: list[tuple[str, str]]) -> float:
    """Share of true pairs compared exactly: nominees, second-hop and late-children comparisons."""
    seen = {a.repo_id: set(a.nominees) | set(a.second_hop) | set(a.late) for a in rep.arrivals}  # type: ignore[attr-defined]
    return sum(p in seen[c] or c in seen[p] for p, c in pairs) / max(1, len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, action="append")
    parser.add_argument("--orders", type=int, default=3, help="random orders besides upload order")
    parser.add_argument("--order", action="append", help="run only these orders ('upload', 'newest' or a seed); repeatable")
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
        orders = [o if o in ("upload", "newest") else int(o) for o in args.order]
    lines = [("| zoo | run | accuracy vs truth | same parent as batch | recall@k (true pair compared) | "
             "exact/arrival max | exact/arrival mean | paths new/attach/recompute | seconds | "
             "same row as batch (parent, relation, merge parents) | relation label vs truth |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for zoo in args.zoo or default_zoos():
        lines += run_zoo(zoo, orders, args.k, args.device, args.expand, not args.no_batch)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
