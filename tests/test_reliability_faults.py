"""Network faults, injected by the Hub emulator over real HTTP and met by the real client.

Every case is crawled next to a clean crawl of the same repos: after the faults clear, one more crawl must
leave a store equal to the clean one (same models, same sketches, same forest) and nothing corrupt may be
stored meanwhile (a failed model has no sketch, no edge, no cached tensor). Waits are recorded through
`RetryPolicy(sleep=...)`, never slept, and requests are counted from the emulator's log.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from indexer.crawl import CrawlOptions, CrawlReport, crawl, cursor_key
from indexer.hub_emulator import HubEmulator
from indexer.retry import RetryPolicy
from indexer.sources import HubSource, ModelEntry
from store.cache import CACHE_DIR, TensorCache
from store.tables import read_table

WIDTH = 16
LAYERS = 2
# One tree: r0 -> {c1, c2}, c1 -> {g3, g4}, c2 -> {g5}; plus an unrelated root u6 and its child u7.
TREE: dict[str, tuple[str | None, int]] = {  # repo -> (parent, month created)
    "acme/r0": (None, 1), "acme/c1": ("acme/r0", 2), "acme/c2": ("acme/r0", 3), "acme/g3": ("acme/c1", 4),
    "acme/g4": ("acme/c1", 5), "acme/g5": ("acme/c2", 6), "other/u6": (None, 7), "other/u7": ("other/u6", 8),
}


def _weights(rng: np.random.Generator, parent: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(LAYERS) for p in "qkvo"]
    if parent is None:
        return {n: rng.normal(0, 0.02, (WIDTH, WIDTH)).astype(np.float32) for n in names}
    return {n: (parent[n] + rng.normal(0, 0.002, (WIDTH, WIDTH))).astype(np.float32) for n in names}


def build_hub(root: Path, tree: dict[str, tuple[str | None, int]] = TREE, *, seed: int = 0) -> None:
    """Real safetensors repos and a hub.json; children are their parent plus small noise (seeded)."""
    rng = np.random.default_rng(seed)
    made: dict[str, dict[str, np.ndarray]] = {}
    repos: dict[str, dict[str, Any]] = {}
    for repo_id, (parent, month) in tree.items():  # parents come first in TREE
        made[repo_id] = _weights(rng, made[parent] if parent else None)
        folder = root / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        save_file(made[repo_id], str(folder / "model.safetensors"))
        # lastModified comes from file mtimes: date them like their createdAt, months apart as on the Hub
        # (files written a second apart would all fall inside the crawl's one-hour overlap).
        moment = datetime(2024, month, 1, tzinfo=UTC).timestamp()
        os.utime(folder / "model.safetensors", (moment, moment))
        repos[repo_id] = {"createdAt": f"2024-{month:02d}-01T00:00:00.000Z"}
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}))


def snapshot(home: Path) -> dict[str, Any]:
    """What a clean crawl and a recovered crawl must agree on. Times, run ids and revisions are left out: the
    emulator's sha covers file ctimes, and each test serves its own copy of the hub folder."""
    models = read_table(home, "models").to_pylist()
    sketches = read_table(home, "sketches").to_pylist()
    edges = read_table(home, "edges").to_pylist()
    return {
        "models": sorted((m["repo_id"], m["status"], m["family"]) for m in models),
        "sketches": sorted((s["repo_id"], tuple(s["vector"])) for s in sketches),
        "edges": sorted((e["repo_id"], e["parent"], e["root"], e["depth"]) for e in edges),
    }


def cached_files(home: Path) -> int:
    return sum(1 for _ in (home / CACHE_DIR).rglob("*.npy"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The hub folder and the snapshot of a fault-free crawl of it (built once for the module)."""
    base = tmp_path_factory.mktemp("clean")
    build_hub(base / "hub")
    with HubEmulator(base / "hub") as emu:
        report = crawl(base / "home", CrawlOptions(endpoint=emu.url, progress=False, device="cpu"))
    assert report.as_dict()["indexed"] == len(TREE)
    shot = snapshot(base / "home")
    assert len(shot["edges"]) == len(TREE) and sum(1 for e in shot["edges"] if e[1]) == len(TREE) - 2
    return base / "hub", shot


@pytest.fixture()
def hub(clean: tuple[Path, dict[str, Any]], tmp_path: Path) -> Iterator[HubEmulator]:
    root = tmp_path / "hub"
    shutil.copytree(clean[0], root)
    with HubEmulator(root) as emulator:
        yield emulator


def _crawl(emu: HubEmulator, home: Path, waits: list[float], *, timeout: float = 60.0,
           hub: HubSource | None = None, **kw: Any) -> CrawlReport:
    policy = RetryPolicy(sleep=waits.append)  # record the waits instead of sleeping them
    options = CrawlOptions(endpoint=emu.url, progress=False, device="cpu", policy=policy, **kw)
    source = hub or HubSource(emu.url, token=options.token, policy=policy, timeout=timeout)
    return crawl(home, options, hub=source)


def _resolves(emu: HubEmulator, repo_id: str) -> list[int]:
    """The status that ended each try at a file of `repo_id`: the Hub's 302 to the CDN is a hop within a try,
    so it is left out (the answer that follows it, on the CDN, ends the try)."""
    return [r.status for r in emu.requests() if r.path.startswith(f"/{repo_id}/resolve/") and r.status != 302]


def _status(home: Path) -> dict[str, tuple[str, str]]:
    return {m["repo_id"]: (m["status"], m["reason"].split(":", 1)[0]) for m in read_table(home, "models").to_pylist()}


def _assert_nothing_stored_for(home: Path, failed: set[str]) -> None:
    """A failed model has a models row and nothing else: no sketch, no edge, no candidate."""
    for table in ("sketches", "edges"):
        assert not failed & set(read_table(home, table).column("repo_id").to_pylist()), table
    cands = read_table(home, "candidates").to_pylist()
    assert not failed & ({c["parent"] for c in cands} | {c["child"] for c in cands})
    revisions = {m["repo_id"]: m["revision"] for m in read_table(home, "models").to_pylist()}
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(LAYERS) for p in "qkvo"]
    for repo in sorted(failed):  # no tensor block of a failed model reached the cache
        paths = [TensorCache(home / CACHE_DIR)._path((repo, revisions[repo], n, 0)) for n in names]
        assert not any(p.exists() for p in paths), repo
    assert cached_files(home) > 0  # the check above looks where the cache really writes


# --- the faults, one kind at a time ----------------------------------------------------------------


def test_429_waits_the_servers_reset_and_never_hammers(hub: HubEmulator, tmp_path: Path) -> None:
    hub.faults.add("429", "/acme/r0/resolve/*", count=2, retry=7)
    waits: list[float] = []
    report = _crawl(hub, tmp_path / "home", waits).as_dict()
    assert report["indexed"] == len(TREE)
    assert _resolves(hub, "acme/r0") == [429, 429, 206]  # one try per reset, not a burst
    assert waits == [8.0, 8.0]  # RateLimit t=7 (and Retry-After 7), + 1 s as the client does


def test_429_with_a_reset_beyond_the_cap_fails_the_model_without_waiting(hub: HubEmulator, tmp_path: Path) -> None:
    hub.faults.add("429", "/acme/c1/resolve/*", count=1, retry=3600)  # an hour: over max_rate_wait (300 s)
    waits: list[float] = []
    report = _crawl(hub, tmp_path / "home", waits).as_dict()
    assert report["failed"] == {"rate-limited": 1} and waits == []
    assert _resolves(hub, "acme/c1") == [429]
    _assert_nothing_stored_for(tmp_path / "home", {"acme/c1"})


@pytest.mark.parametrize("kind", ["500", "502", "503", "504"])
def test_5xx_is_retried_with_backoff_then_recorded_failed(hub: HubEmulator, tmp_path: Path, kind: str) -> None:
    hub.faults.add(kind, "/acme/g3/resolve/*", count=None)
    waits: list[float] = []
    report = _crawl(hub, tmp_path / "home", waits).as_dict()
    attempts = RetryPolicy().attempts
    assert report["failed"] == {f"http-{kind}": 1}
    assert _resolves(hub, "acme/g3") == [int(kind)] * attempts
    assert waits == [1.0, 2.0, 4.0, 8.0]  # exponential, capped at max_wait
    assert _status(tmp_path / "home")["acme/g3"] == ("failed", f"http-{kind}")
    _assert_nothing_stored_for(tmp_path / "home", {"acme/g3"})


def test_reset_mid_body_and_truncated_body_are_never_stored(hub: HubEmulator, tmp_path: Path) -> None:
    hub.faults.add("reset", "/acme/c2/resolve/*", count=None, after=500)
    hub.faults.add("truncate", "/acme/g4/resolve/*", count=None, after=500)
    report = _crawl(hub, tmp_path / "home", []).as_dict()
    assert report["failed"] == {"network": 2}
    assert report["indexed"] == len(TREE) - 2
    for repo in ("acme/c2", "acme/g4"):
        assert len(_resolves(hub, repo)) == RetryPolicy().attempts
    _assert_nothing_stored_for(tmp_path / "home", {"acme/c2", "acme/g4"})


def test_a_transient_reset_then_success_stores_the_exact_bytes(hub: HubEmulator, tmp_path: Path,
                                                              clean: tuple[Path, dict[str, Any]]) -> None:
    hub.faults.add("reset", "/acme/c2/resolve/*", count=2, after=100)
    hub.faults.add("truncate", "/acme/g5/resolve/*", count=1, after=100)
    waits: list[float] = []
    assert _crawl(hub, tmp_path / "home", waits).as_dict()["indexed"] == len(TREE)
    assert waits == [1.0, 1.0, 2.0]  # newest first: g5 (one retry), then c2 (two)
    assert snapshot(tmp_path / "home") == clean[1]


def test_slow_answers_time_out_and_are_retried(hub: HubEmulator, tmp_path: Path) -> None:
    hub.faults.add("slow", "/acme/r0/resolve/*", count=1, seconds=1.5)  # once: retried, then indexed
    hub.faults.add("slow", "/other/u6/resolve/*", count=None, seconds=1.5)  # always: failed
    waits: list[float] = []
    report = _crawl(hub, tmp_path / "home", waits, timeout=0.4).as_dict()
    assert report["failed"] == {"network": 1}
    assert _status(tmp_path / "home")["acme/r0"] == ("indexed", "")
    assert waits[0] == 1.0 and len(waits) == 1 + RetryPolicy().attempts - 1
    _assert_nothing_stored_for(tmp_path / "home", {"other/u6"})


class _DeletingHub(HubSource):
    """Deletes a repo from the emulator's disk after it was listed and before it is read."""

    def __init__(self, *args: Any, root: Path, doomed: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.root, self.doomed = root, doomed

    def repo(self, entry: ModelEntry) -> Any:
        if entry.repo_id == self.doomed:
            shutil.rmtree(self.root / self.doomed)
        return super().repo(entry)


def test_a_model_deleted_between_listing_and_reading_is_recorded_not_found(hub: HubEmulator, tmp_path: Path) -> None:
    waits: list[float] = []
    source = _DeletingHub(hub.url, token=None, policy=RetryPolicy(sleep=waits.append), root=hub.root,
                          doomed="acme/g5")
    report = _crawl(hub, tmp_path / "home", waits, hub=source).as_dict()
    assert report["failed"] == {"not-found": 1} and waits == []  # a 404 is not retried
    assert _resolves(hub, "acme/g5") == [404]
    _assert_nothing_stored_for(tmp_path / "home", {"acme/g5"})


# --- recovery: after the faults clear, the next crawl completes what failed ----------------------------


def test_after_every_fault_clears_the_next_crawl_equals_a_clean_crawl(hub: HubEmulator, tmp_path: Path,
                                                                      clean: tuple[Path, dict[str, Any]]) -> None:
    home = tmp_path / "home"
    for kind, repo in (("500", "acme/r0"), ("502", "acme/c1"), ("503", "acme/c2"), ("504", "acme/g3"),
                       ("reset", "acme/g4"), ("truncate", "acme/g5"), ("429", "other/u6")):
        hub.faults.add(kind, f"/{repo}/resolve/*", count=None, retry=3600)
    first = _crawl(hub, home, []).as_dict()
    assert first["indexed"] == 1 and sum(first["failed"].values()) == len(TREE) - 1
    _assert_nothing_stored_for(home, set(TREE) - {"other/u7"})
    hub.faults.clear()
    hub.clear_requests()
    second = _crawl(hub, home, []).as_dict()
    assert second["indexed"] == len(TREE) - 1 and second["failed"] == {}
    fetched = {r.path.split("/resolve/")[0].lstrip("/") for r in hub.requests() if "/resolve/" in r.path}
    assert fetched == set(TREE) - {"other/u7"}  # only what failed is fetched again
    assert snapshot(home) == clean[1]


def test_a_failed_model_months_older_than_the_newest_is_retried(hub: HubEmulator, tmp_path: Path) -> None:
    """Regression: the created mark moved to the newest model even when an older one failed on a 503, so the
    next crawl (which lists down to mark - 1 h) never listed the failed model again: it stayed failed forever."""
    home = tmp_path / "home"
    hub.faults.add("503", "/acme/c1/resolve/*", count=None)
    assert _crawl(hub, home, []).as_dict()["failed"] == {"http-503": 1}
    marks = {s["endpoint"]: s["cursor_created_at"] for s in read_table(home, "crawl_state").to_pylist()}
    assert marks[cursor_key(hub.url, [])] == datetime(2024, 2, 1, tzinfo=UTC)  # held at the failed model
    hub.faults.clear()
    report = _crawl(hub, home, []).as_dict()
    assert report["indexed"] == 1 and _status(home)["acme/c1"] == ("indexed", "")
    marks = {s["endpoint"]: s["cursor_created_at"] for s in read_table(home, "crawl_state").to_pylist()}
    assert marks[cursor_key(hub.url, [])] == datetime(2024, 8, 1, tzinfo=UTC)  # and then it moves on


def test_a_permanently_bad_model_does_not_hold_the_mark(hub: HubEmulator, tmp_path: Path) -> None:
    """Content failures (a deleted repo, NaN weights) are not retried: the mark passes them."""
    home = tmp_path / "home"
    source = _DeletingHub(hub.url, token=None, policy=RetryPolicy(sleep=[].append), root=hub.root, doomed="acme/c1")
    assert _crawl(hub, home, [], hub=source).as_dict()["failed"] == {"not-found": 1}
    marks = {s["endpoint"]: s["cursor_created_at"] for s in read_table(home, "crawl_state").to_pylist()}
    assert marks[cursor_key(hub.url, [])] == datetime(2024, 8, 1, tzinfo=UTC)
