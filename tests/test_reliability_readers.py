"""Concurrent readers: `index query`, `index export` and `index stats` (their store.query functions, in
threads) run in a loop while a real `index crawl` subprocess writes the store, with one model per part and
compaction after every 2 parts so that parts appear and vanish under the readers. They never fail (except
"no index yet" before the first write) and never see the store go backwards."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from errors import NoIndexError, UnknownModelError
from indexer.hub_emulator import HubEmulator
from store.query import export_forest, query_model, store_stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.crash import _env, crawl_command  # noqa: E402
from test_reliability_faults import TREE, build_hub  # noqa: E402


def _reader(home: Path, out: Path, stop: threading.Event, seen: dict[str, Any]) -> None:
    last = {"models": 0, "export": 0}
    while not stop.is_set():
        try:
            stats = store_stats(home)
            count = export_forest(home, out)
            rows = pq.read_table(out).to_pylist()
            for repo_id in sorted(TREE)[:3]:
                try:
                    query_model(home, repo_id)
                except UnknownModelError:
                    pass  # not indexed yet
        except NoIndexError:
            seen["no_index"] += 1
            if last["models"]:
                seen["errors"].append("no index after models were seen")
            continue
        except Exception as exc:  # noqa: BLE001 -- any other failure is what this test looks for
            seen["errors"].append(f"{type(exc).__name__}: {exc}")
            continue
        seen["reads"] += 1
        ids = {r["repo_id"] for r in rows}
        if len(ids) != len(rows) or count != len(rows):
            seen["errors"].append(f"export: {len(rows)} rows for {len(ids)} repos")
        if stats["models"] < last["models"] or count < last["export"]:
            seen["errors"].append(f"went backwards: {stats['models']} < {last['models']} or {count} < {last['export']}")
        seen["dangling"] += sum(1 for r in rows if r["parent"] and r["parent"] not in ids)
        last = {"models": stats["models"], "export": count}
        seen["max_models"] = max(seen["max_models"], stats["models"])


def test_readers_during_a_crawl_never_fail_nor_go_backwards(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    build_hub(hub)
    home = tmp_path / "home"
    seen: dict[str, Any] = {"errors": [], "reads": 0, "no_index": 0, "dangling": 0, "max_models": 0}
    stop = threading.Event()
    readers = [threading.Thread(target=_reader, args=(home, tmp_path / f"out{i}.parquet", stop, seen)) for i in range(2)]
    with HubEmulator(hub) as emu:
        for r in readers:
            r.start()
        try:
            done = subprocess.run(crawl_command(emu.url, home), env=_env(tmp_path / "trace", compact_after=2, batch=1),
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
            time.sleep(0.5)  # a few reads of the finished store
        finally:
            stop.set()
            for r in readers:
                r.join(timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compaction" in (tmp_path / "trace").read_text()  # parts really were merged under the readers
    assert seen["errors"] == [], seen["errors"][:5]
    assert seen["reads"] >= 5 and seen["max_models"] == len(TREE)
    # Models rows land before the lineage rows that mention them: never an edge to a parent with no row
    # (regression: the "dangling parent" of RELIABILITY.md).
    assert seen["dangling"] == 0
