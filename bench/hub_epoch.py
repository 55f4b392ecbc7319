"""Families whose oldest repos share the Hub's legacy upload time: batch `mother` on each zoo with its
earliest uploads re-dated to 2022-03-02T23:29:04Z, the `createdAt` the real Hub gives every repo older
than that day.

    .venv/bin/python bench/hub_epoch.py ZOO [ZOO ...] [--fractions 0,0.25,0.5,0.75,1] [--work /tmp/hub_epoch]

Real families mix the two: bert-base-uncased and its 2020 fine-tunes share one time, their 2023
fine-tunes have their own. For each fraction f, the earliest ceil(f * n) repos of a zoo (by its own
hub.json) get the legacy time, the rest keep theirs; the zoo's folders are hard-linked into `--work`
(nothing is copied or changed in the zoo). Prints edge and root accuracy per zoo and fraction: f = 0 is
the zoo as built, f = 1 a family with no usable time at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from indexer.evaluate import evaluate, read_truth_csv  # noqa: E402
from indexer.incremental.folder import ingest_folder  # noqa: E402
from indexer.lineage import recover as rec  # noqa: E402
from indexer.lineage.methods import Options  # noqa: E402

LEGACY = "2022-03-02T23:29:04.000Z"


def redated(zoo: Path, fraction: float, work: Path) -> Path:
    """A hard-linked view of `zoo` whose earliest ceil(fraction * n) repos carry the legacy time."""
    out = work / f"{zoo.name}-f{fraction:.2f}"
    if out.exists():
        shutil.rmtree(out)
    subprocess.run(["cp", "-al", str(zoo), str(out)], check=True)
    hub = json.loads((zoo / "hub.json").read_text())
    repos = hub["repos"]
    order = sorted(repos, key=lambda r: (repos[r]["createdAt"], r))
    for rid in order[:math.ceil(fraction * len(order))]:
        repos[rid] = dict(repos[rid], createdAt=LEGACY)
    (out / "hub.json").unlink()  # a hard link to the zoo's own file: replace, never write through
    (out / "hub.json").write_text(json.dumps(hub, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--fractions", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hub_epoch"))
    ap.add_argument("--incremental", action="store_true", help="also the incremental index in upload order "
                    "(`index add` / the crawl's), after the batch figure in each cell")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    fractions = [float(f) for f in args.fractions.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    print("| zoo | " + " | ".join(f"legacy {f:.0%}: edges / roots" for f in fractions) + " |")
    print("|---|" + "---|" * len(fractions))
    totals = [[0, 0] for _ in fractions]
    inc = [[0, 0] for _ in fractions]
    for zoo in args.zoos:
        truth = read_truth_csv(zoo / "truth.csv")
        roots = [c for c, p in truth.items() if not p]
        cells = []
        for k, f in enumerate(fractions):
            view = redated(zoo, f, args.work)
            forest = rec.recover(view, Options())
            report = evaluate(forest, truth)
            found = dict(forest.parents())
            ok_roots = sum(1 for r in roots if found.get(r) == "")
            cell = f"{report.correct / max(1, report.edges):.3f} ({report.correct}/{report.edges}) / {ok_roots}/{len(roots)}"
            if args.incremental:
                with tempfile.TemporaryDirectory() as home:
                    rep = ingest_folder(Path(home), view, order="upload")
                edges = [c for c, p in truth.items() if p]
                right = sum(rep.parents.get(c) == truth[c] for c in edges)
                inc[k][0] += right
                inc[k][1] += len(edges)
                cell += f"; incremental {right / max(1, len(edges)):.3f}"
            cells.append(cell)
            totals[k][0] += report.correct
            totals[k][1] += report.edges
            shutil.rmtree(view)
        print(f"| {zoo.name} | " + " | ".join(cells) + " |", flush=True)
    print("| pooled | " + " | ".join(f"{c / max(1, n):.3f} ({c}/{n})" + (f"; incremental {i / max(1, m):.3f}" if args.incremental else "")
                                     for (c, n), (i, m) in zip(totals, inc, strict=True)) + " |")


if __name__ == "__main__":
    main()
