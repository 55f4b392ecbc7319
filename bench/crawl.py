"""Crawl benchmark: bytes read per model and models per second, over real HTTP from the Hub emulator.

Scenarios:
  (a) a zoo folder served by the emulator (default: zoo/small-ft, 21 ViTs of ~2 MB: read whole);
  (b) N virtual Llama-2-7B and N Llama-2-13B models (BF16, sharded 2 / 3 files, generated on demand).
The emulator runs in its own process (`index hub serve`), so its work (generating BF16 data, sending it)
and ours (client, planning, decoding, caching, Parquet) do not share a GIL; the time split below comes from
timers around our HTTP calls ("waiting on the emulator") versus the rest of the crawl.

    .venv/bin/python bench/crawl.py [--zoo zoo/small-ft] [--n 4] [--budget-mib 64]

Prints a markdown table (copy it to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexer.crawl as crawl_module  # noqa: E402
from indexer.crawl import CrawlOptions, crawl  # noqa: E402
from indexer.hub_emulator import emulator_process  # noqa: E402
from indexer.sources import HubSource  # noqa: E402
from store.cache import TensorCache  # noqa: E402

MIB = 1024 * 1024


@dataclass
class Timers:
    http: float = 0.0  # main thread, waiting on the emulator
    decode: float = 0.0  # main thread
    cache: float = 0.0  # main thread, waiting for the background cache writer to finish the previous model
    cache_busy: float = 0.0  # background thread, writing .npy files (overlaps the rest)


def _timed(timers: Timers, field: str, fn: Callable[..., object]) -> Callable[..., object]:
    def wrapper(*args: object, **kwargs: object) -> object:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(timers, field, getattr(timers, field) + time.perf_counter() - t)
    return wrapper


@contextmanager
def instrument(timers: Timers) -> Iterator[None]:
    """Time our HTTP waits, decoding and cache writes (bench only: plain wrappers, restored after)."""
    writer = crawl_module._CacheWriter
    saved = (HubSource.get, crawl_module.decode, TensorCache.put, writer.drain)
    HubSource.get = _timed(timers, "http", HubSource.get)  # type: ignore[method-assign]
    crawl_module.decode = _timed(timers, "decode", crawl_module.decode)  # type: ignore[assignment]
    TensorCache.put = _timed(timers, "cache_busy", TensorCache.put)  # type: ignore[method-assign]
    writer.drain = _timed(timers, "cache", writer.drain)  # type: ignore[method-assign]
    try:
        yield
    finally:
        HubSource.get, crawl_module.decode, TensorCache.put, writer.drain = saved  # type: ignore[method-assign,assignment]


def serve(root: Path, virtual: list[str]):  # type: ignore[no-untyped-def]
    return emulator_process(root, args=[a for spec in virtual for a in ("--virtual", spec)])


def run(name: str, root: Path, virtual: list[str], budget: int) -> dict[str, object]:
    timers = Timers()
    with serve(root, virtual) as url, tempfile.TemporaryDirectory() as home, instrument(timers):
        t = time.perf_counter()
        report = crawl(Path(home), CrawlOptions(endpoint=url, budget=budget, progress=False))
        wall = time.perf_counter() - t
    indexed = [o for o in report.outcomes if o.status == "indexed"]
    n = len(indexed)
    return {
        "scenario": name, "models": n, "failed": len(report.outcomes) - n,
        "model_mib": sum(o.model_bytes for o in indexed) / n / MIB,
        "read_mib": sum(o.bytes_read for o in indexed) / n / MIB,
        "max_read_mib": max(o.bytes_read for o in indexed) / MIB,
        "header_kib": sum(o.header_bytes for o in indexed) / n / 1024,
        "fraction": sum(o.bytes_read for o in indexed) / sum(o.model_bytes for o in indexed),
        "requests": sum(o.requests for o in indexed) / n,
        "models_per_s": n / wall, "mib_per_s": sum(o.bytes_read for o in indexed) / MIB / wall,
        "wall": wall, "http": timers.http, "decode": timers.decode, "cache": timers.cache,
        "cache_busy": timers.cache_busy,
    }


def table(rows: list[dict[str, object]]) -> str:
    head = ("| scenario | models | size/model (MiB) | read/model (MiB) | max read (MiB) | headers (KiB) | read / size "
            "| requests/model | models/s | MiB/s | wall (s) | HTTP wait | decode | cache wait | rest (plan, Parquet, listing) | cache writer busy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        wall = float(r["wall"])  # type: ignore[arg-type]
        share = {k: f"{100 * float(r[k]) / wall:.0f} %" for k in ("http", "decode", "cache")}  # type: ignore[arg-type]
        rest = wall - sum(float(r[k]) for k in ("http", "decode", "cache"))  # type: ignore[arg-type]
        lines.append(
            f"| {r['scenario']} | {r['models']} | {r['model_mib']:,.1f} | {r['read_mib']:.2f} | {r['max_read_mib']:.2f} "
            f"| {r['header_kib']:.0f} | {100 * float(r['fraction']):.3f} % | {r['requests']:.0f} | {r['models_per_s']:.2f} "  # type: ignore[arg-type]
            f"| {r['mib_per_s']:.0f} | {wall:.1f} | {share['http']} | {share['decode']} | {share['cache']} "
            f"| {100 * rest / wall:.0f} % | {100 * float(r['cache_busy']) / wall:.0f} % |"  # type: ignore[arg-type]
        )
    return "\n".join(lines)


def _virtual(layout: str, n: int) -> list[str]:
    """One root and n - 1 fine-tunes of it (each a day after its parent), as `--virtual` specs."""
    org = layout.replace("llama-2-", "l")
    specs = [f"{layout}:{org}/root:seed=1:created=2023-07-18T00:00:00.000Z"]
    specs += [f"{layout}:{org}/ft-{i}:seed={i + 1}:parent={org}/root" for i in range(1, n)]
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/small-ft"))
    parser.add_argument("--n", type=int, default=4, help="virtual models per layout")
    parser.add_argument("--budget-mib", type=int, default=64)
    args = parser.parse_args()
    budget = args.budget_mib * MIB
    rows = []
    if args.zoo.is_dir():
        rows.append(run(f"(a) zoo {args.zoo.name}", args.zoo, [], budget))
    with tempfile.TemporaryDirectory() as empty:
        for layout in ("llama-2-7b", "llama-2-13b"):
            rows.append(run(f"(b) virtual {layout} x{args.n}", Path(empty), _virtual(layout, args.n), budget))
    print(f"budget {args.budget_mib} MiB per model; CPU count {os.cpu_count()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
