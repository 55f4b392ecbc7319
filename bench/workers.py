"""Scale-out benchmark: the same crawl single-process and with fetches on a 2-worker Dask LocalCluster.

Scenarios, served over real HTTP by the Hub emulator in its own process (`index hub serve`, so its work
does not share our GIL):
  (a) a zoo folder (default zoo/small-ft: 21 ViTs of ~2 MB, read whole);
  (b) N virtual Llama models (`--virtual`, i.e. `HubEmulator.add_virtual(repo_id, layout=LAYOUT, seed=i,
      created_at=...)`: BF16, 2 shards, generated on demand), read at the byte budget. Each is its own root
      (seed i, no parent), one a day apart. `--layout llama-2-7b` (default) measures bandwidth;
      `--layout llama-tiny` (20 M parameters, 39 MB) measures the per-model overhead over 1,000 models.
Each row is a fresh store. The cluster's start-up (process spawn + imports) is timed apart and left out of
models/s: a nightly run pays it once. `--latency` adds a delay to every file request (emulator fault
`slow`), the regime of the real Hub, where fetching waits on the network and workers overlap the waits.

    .venv/bin/python bench/workers.py [--zoo zoo/small-ft] [--n 8] [--layout llama-2-7b] [--budget-mib 16]
                                      [--latency 0.05]

A --zoo that is not a folder (e.g. `--zoo none`) leaves scenario (a) out.

Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.crawl import CrawlOptions, crawl  # noqa: E402
from indexer.distributed import DaskHub, ClusterSpec, _Known, connect, crawl_via  # noqa: E402
from indexer.hub_emulator import LAYOUTS, emulator_process  # noqa: E402

MIB = 1024 * 1024


def emulator(root: Path, virtual: list[str], latency: float):  # type: ignore[no-untyped-def]
    args = [a for spec in virtual for a in ("--virtual", spec)]
    if latency > 0:
        args += ["--fault", f"slow:*/resolve/*:count=1000000:seconds={latency}"]
    return emulator_process(root, args=args)


def _virtual(n: int, layout: str) -> list[str]:
    first = datetime(2024, 1, 1)  # a day apart, so 1,000 models still have distinct, valid dates
    return [f"{layout}:bench/{layout}-{i}:seed={i}:created={first + timedelta(days=i):%Y-%m-%dT%H:%M:%S}.000Z"
            for i in range(n)]


def _row(scenario: str, mode: str, summary: dict[str, object], seconds: float, startup: float) -> dict[str, object]:
    n = int(summary["indexed"]) + sum(summary["skipped"].values()) + sum(summary["failed"].values())  # type: ignore[union-attr,arg-type]
    total = int(summary["bytes_read_total"])  # type: ignore[arg-type]
    return {"scenario": scenario, "mode": mode, "models": n, "indexed": summary["indexed"], "seconds": seconds,
            "models/s": n / seconds, "MB/s": total / 1e6 / seconds, "MB read": total / 1e6, "startup": startup}


def run(scenario: str, root: Path, virtual: list[str], *, budget: int, workers: int, latency: float) -> list[dict[str, object]]:
    rows = []
    with emulator(root, virtual, latency) as url:
        options = CrawlOptions(endpoint=url, budget=budget, progress=False)
        with tempfile.TemporaryDirectory() as home:
            t = time.perf_counter()
            summary = crawl(Path(home), options).as_dict()
            rows.append(_row(scenario, "1 process", summary, time.perf_counter() - t, 0.0))
        with tempfile.TemporaryDirectory() as home:
            t = time.perf_counter()
            with connect(ClusterSpec(workers=workers, processes=True)) as client:
                client.wait_for_workers(workers)
                startup = time.perf_counter() - t
                hub = DaskHub(options, client=client, known=_Known.read(Path(home), have_token=False),
                              window=2 * workers)
                t = time.perf_counter()
                summary = crawl_via(Path(home), options, hub=hub).as_dict()
                seconds = time.perf_counter() - t
            rows.append(_row(scenario, f"{workers} Dask workers", summary, seconds, startup))
    return rows


def table(rows: list[dict[str, object]]) -> str:
    head = "| scenario | mode | models | indexed | seconds | models/s | MB/s | MB read | cluster start s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['mode']} | {r['models']} | {r['indexed']} | {r['seconds']:.2f} | "
                     f"{r['models/s']:.2f} | {r['MB/s']:.1f} | {r['MB read']:.1f} | {r['startup']:.1f} |")
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.platform()}; {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); "
            f"Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/small-ft"))
    parser.add_argument("--n", type=int, default=8, help="virtual models")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="llama-2-7b", help="their virtual layout")
    parser.add_argument("--budget-mib", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every file request")
    args = parser.parse_args()
    rows = []
    kw = {"budget": args.budget_mib * MIB, "workers": args.workers, "latency": args.latency}
    if args.zoo.is_dir():
        rows += run(f"(a) zoo {args.zoo.name}", args.zoo, [], **kw)  # type: ignore[arg-type]
    if args.n > 0:
        with tempfile.TemporaryDirectory() as empty:
            rows += run(f"(b) virtual {args.layout} x{args.n}", Path(empty), _virtual(args.n, args.layout),
                        **kw)  # type: ignore[arg-type]
    print(f"command: bench/workers.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    print(f"budget {args.budget_mib} MiB per model; added latency {args.latency * 1000:.0f} ms per file request\n")
    print(table(rows))


if __name__ == "__main__":
    main()
