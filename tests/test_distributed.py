"""The Dask scale-out against the Hub emulator over HTTP, on a real 2-worker LocalCluster: a distributed
crawl must write exactly what a single-process crawl writes, with the fetches really run by the workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from errors import BadInputError, TransientHubError
from indexer.crawl import CrawlOptions, crawl
from indexer.distributed import ClusterSpec, DaskHub, ReplayRepo, _Known, _Portable, connect, crawl_via, fetch_model
from indexer.hub_emulator import HubEmulator
from indexer.hub_emulator.faults import Fault
from indexer.retry import RetryPolicy
from store.cache import CACHE_DIR
from store.tables import read_records

CREATED = "2024-{m:02d}-01T00:00:00.000Z"
FAST = RetryPolicy(attempts=2, base_wait=0.01, max_wait=0.01)


def _weights(seed: int, *, dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {f"model.layers.{i}.self_attn.{p}_proj.weight": rng.normal(0, 0.02, (32, 32)).astype(dtype)
           for i in range(2) for p in "qkvo"}
    out["lm_head.weight"] = rng.normal(0, 0.02, (10, 32)).astype(dtype)
    return out


def _repo(root: Path, repo_id: str, month: int, files: dict[str, object], **meta: object) -> None:
    folder = root / repo_id
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            save_file(content, str(folder / name))
        else:
            (folder / name).write_bytes(content)  # type: ignore[arg-type]
    hub = root / "hub.json"
    doc = json.loads(hub.read_text()) if hub.exists() else {"version": 1, "repos": {}}
    doc["repos"][repo_id] = {"createdAt": CREATED.format(m=month), **meta}
    hub.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubEmulator]:
    root = tmp_path_factory.mktemp("hub")
    for i in range(6):
        _repo(root, f"acme/m{i}", i + 1, {"model.safetensors": _weights(i, dtype="float16" if i % 2 else "float32")})
    _repo(root, "acme/pickled", 7, {"pytorch_model.bin": b"\x80\x04 never unpickled"})
    # pickle-only, its safetensors in the conversion bot's PR: the worker reads the PR, the replay agrees
    _repo(root, "acme/converted", 10, {"pytorch_model.bin": b"\x80\x04 never unpickled",
                                       ".refs/pr/1/model.safetensors": _weights(10)},
          discussions=[{"num": 1, "title": "Adding `safetensors` variant of this model", "author": "SFconvertbot"}])
    bad = _weights(9)
    for array in bad.values():
        array[:, 0] = np.nan  # every row: whichever rows the plan picks, the read sees a NaN
    _repo(root, "acme/nan", 8, {"model.safetensors": bad})
    _repo(root, "acme/broken", 9, {"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"})
    with HubEmulator(root) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    with connect(ClusterSpec(workers=2, processes=False)) as c:
        yield c


def _options(emu: HubEmulator, **kw: object) -> CrawlOptions:
    return CrawlOptions(endpoint=emu.url, progress=False, policy=FAST, budget=4096, batch=3, **kw)  # type: ignore[arg-type]


WHEN = ("indexed_at", "updated_at", "run_id")  # the columns that depend on when (and as which run) it ran


def _rows(home: Path, table: str = "models") -> list[dict[str, object]]:
    rows = [{k: v for k, v in asdict(r).items() if k not in WHEN} for r in read_records(home, table)]  # type: ignore[call-overload]
    return sorted(rows, key=repr)


def _cache(home: Path) -> dict[str, bytes]:
    root = home / CACHE_DIR
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def _distributed(home: Path, options: CrawlOptions, client: object) -> tuple[dict[str, object], DaskHub]:
    from distributed import get_task_stream

    hub = DaskHub(options, client=client, known=_Known.read(home, have_token=False), window=4)
    with get_task_stream(client) as stream:  # type: ignore[arg-type]
        report = crawl_via(home, options, hub=hub).as_dict()
    hub.tasks = [t for t in stream.data if str(t.get("key", "")).startswith("fetch_model")]  # type: ignore[attr-defined]
    return report, hub


def test_distributed_crawl_writes_what_a_single_process_crawl_writes(emu: HubEmulator, client: object,
                                                                      tmp_path: Path) -> None:
    plain = crawl(tmp_path / "plain", _options(emu)).as_dict()
    report, hub = _distributed(tmp_path / "dask", _options(emu), client)
    assert plain["indexed"] == 7 and plain["skipped"] and plain["failed"]  # the zoo has every outcome
    for key in ("seen", "indexed", "unchanged", "skipped", "failed", "bytes_read_total", "bytes_read_max_per_model"):
        assert report[key] == plain[key], key
    for table in ("models", "sketches", "candidates", "edges", "crawl_state"):  # rows, lineage, cursors
        assert repr(_rows(tmp_path / "dask", table)) == repr(_rows(tmp_path / "plain", table)), table  # NaN == NaN
    assert len(_rows(tmp_path / "dask", "edges")) == 7  # the lineage step ran: every indexed model is placed
    converted = next(r for r in _rows(tmp_path / "dask", "models") if r["repo_id"] == "acme/converted")
    assert converted["status"] == "indexed" and json.loads(converted["details"])["weights_from"] == "refs/pr/1"
    cache = _cache(tmp_path / "dask")
    assert len(cache) >= 6 and cache == _cache(tmp_path / "plain")  # a block or more per indexed model
    # the fetches really ran on the cluster, on both workers (the pickle-only repo is triaged on a worker too)
    assert sum(hub.by_worker.values()) == 10 and len(hub.by_worker) == 2
    assert len({t["worker"] for t in hub.tasks}) == 2  # type: ignore[attr-defined]


def test_second_distributed_crawl_fetches_nothing_and_limit_is_honoured(emu: HubEmulator, client: object,
                                                                         tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, hub = _distributed(home, _options(emu, limit=3), client)
    assert first["indexed"] + sum(first["skipped"].values()) + sum(first["failed"].values()) == 3  # type: ignore[union-attr]
    assert sum(hub.by_worker.values()) == 3  # no speculative fetch past the limit was used
    crawl(home, _options(emu))  # the rest, single process: both paths share one store format
    emu.clear_requests()
    again, hub = _distributed(home, _options(emu), client)
    assert again["indexed"] == 0
    fetched = {r.path.split("/resolve/")[0].lstrip("/") for r in emu.requests() if "/resolve/" in r.path}
    assert fetched == {"acme/nan"}  # only the failed model is tried again, as a single-process crawl does
    assert sum(hub.by_worker.values()) == 1


def test_replay_raises_the_error_the_worker_saw(emu: HubEmulator, tmp_path: Path) -> None:
    from indexer.crawl import Indexer
    from indexer.sources import HubSource
    from store.tables import open_store

    entry = HubSource(emu.url, token=None).model_info("acme/m0")
    emu.faults.add("503", "/acme/m0/resolve/*", count=4)  # both attempts of the worker, both of the direct read
    fetched = fetch_model(entry, endpoint=emu.url, policy=FAST, budget=4096, have_token=False)
    (call,) = fetched.calls.values()
    assert call.error is not None and call.error.cls is TransientHubError
    with open_store(tmp_path / "a") as store:
        replayed = Indexer(store, 4096, False).index_model(ReplayRepo(fetched))
    with open_store(tmp_path / "b") as store:
        direct = Indexer(store, 4096, False).index_model(HubSource(emu.url, token=None, policy=FAST).repo(entry))
    assert replayed.status == "failed" and replayed.code == "http-503"
    fields = ("status", "reason", "family", "bytes_read", "header_bytes", "tensor_bytes", "model_bytes", "requests")
    assert [getattr(replayed, f) for f in fields] == [getattr(direct, f) for f in fields]


def test_our_errors_survive_the_trip_to_the_client() -> None:
    import pickle

    original = BadInputError("thing", "why")
    revived = pickle.loads(pickle.dumps(_Portable.of(original))).revive()
    assert type(revived) is BadInputError and (revived.thing, revived.reason, str(revived)) == ("thing", "why", "thing: why")


def test_unreachable_scheduler_is_one_line_and_writes_nothing(emu: HubEmulator, tmp_path: Path) -> None:
    from cli import index

    home = tmp_path / "home"
    with pytest.raises(BadInputError, match="no Dask scheduler answers at tcp://127.0.0.1:9"):
        with connect(ClusterSpec(address="tcp://127.0.0.1:9", timeout=1)):
            pass
    result = CliRunner().invoke(index, ["serve", "--once", "--endpoint", emu.url, "--home", str(home),
                                        "--dask", "tcp://127.0.0.1:9", "--dask-timeout", "1"])
    assert result.exit_code != 0 and "no Dask scheduler answers" in str(result.exception)
    assert not home.exists()


def test_cluster_spec_needs_exactly_one_target() -> None:
    with pytest.raises(BadInputError, match="exactly one"):
        ClusterSpec()
    with pytest.raises(BadInputError, match="exactly one"):
        ClusterSpec(address="tcp://x:8786", workers=2)


def _kill_when_fetching(emu: HubEmulator, slow: Fault, pid: int, done: threading.Event) -> None:
    """SIGKILL the worker once the emulator holds its (slowed) request for the model: mid-fetch."""
    deadline = time.monotonic() + 30
    while slow in emu.faults.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    done.set()


def _dated_hub(root: Path, months: int) -> None:
    """m0..m{months-1}, created a month apart, their files last modified then too: a crawl's two listing
    passes (createdAt, lastModified) re-list only what lies within the overlap (1 h) below their marks."""
    for i in range(months):
        _repo(root, f"acme/m{i}", i + 1, {"model.safetensors": _weights(i)})
        stamp = datetime.fromisoformat(CREATED.format(m=i + 1)).timestamp()
        for path in (root / f"acme/m{i}").iterdir():
            os.utime(path, (stamp, stamp))


def test_a_fetch_whose_worker_dies_is_transient_and_indexed_by_the_next_crawl(tmp_path: Path) -> None:
    """Regression: a model whose worker died under its fetch was recorded as a non-transient `error`, so the
    crawl's mark passed it and no later crawl listed it again. allowed-failures=0 makes the first death
    final (by default Dask re-runs the task on another worker up to 3 times before raising KilledWorker)."""
    import dask

    _dated_hub(tmp_path / "hub", 4)
    home = tmp_path / "home"
    with HubEmulator(tmp_path / "hub") as emu, dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            connect(ClusterSpec(workers=1, processes=True)) as client:  # a real worker process to kill
        (pid,) = client.run(os.getpid).values()  # type: ignore[attr-defined]
        slow = emu.faults.add("slow", "/acme/m1/resolve/*", count=1, seconds=2)
        killed = threading.Event()
        threading.Thread(target=_kill_when_fetching, args=(emu, slow, pid, killed), daemon=True).start()
        _distributed(home, _options(emu), client)
        assert killed.is_set()
        lost = {r["repo_id"]: r for r in _rows(home) if "worker lost" in str(r["reason"])}
        assert "acme/m1" in lost and lost["acme/m1"]["status"] == "failed"
        assert all(str(r["reason"]).startswith("network: worker lost: KilledWorker") for r in lost.values())
        again, _ = _distributed(home, _options(emu), client)  # the nanny has restarted the worker
    assert {r["repo_id"]: r["status"] for r in _rows(home)} == {f"acme/m{i}": "indexed" for i in range(4)}
    assert again["indexed"] == len(lost)  # every model lost with the worker, and only those
