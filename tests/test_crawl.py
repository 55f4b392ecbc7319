"""The crawler end to end: the real huggingface_hub client over real HTTP to the Hub emulator, real files,
a real store. Byte and request counts are asserted from the emulator's request log."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from indexer.crawl import CrawlOptions, IndexedModel, add_local, crawl, cursor_key
from indexer.hub_emulator import HubEmulator
from indexer.retry import RetryPolicy
from sketches.layers import normalise_name
from store.schema import ModelRecord
from store.tables import read_records

CREATED = "2024-0{m}-01T00:00:00.000Z"


def _weights(seed: int, *, layers: int = 2, width: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {f"model.layers.{i}.self_attn.{p}_proj.weight": rng.normal(0, 0.02, (width, width)).astype(np.float32)
           for i in range(layers) for p in "qkvo"}
    out["lm_head.weight"] = rng.normal(0, 0.02, (10, width)).astype(np.float32)
    return out


def _hub_json(root: Path, repo_id: str, **meta: object) -> None:
    path = root / "hub.json"
    doc = json.loads(path.read_text()) if path.exists() else {"version": 1, "repos": {}}
    doc["repos"][repo_id] = meta
    path.write_text(json.dumps(doc))


def _repo(root: Path, repo_id: str, month: int, weights: dict[str, np.ndarray] | None = None, *,
          files: dict[str, bytes] | None = None, gated: bool = False, card: str | None = None) -> Path:
    folder = root / repo_id
    folder.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        save_file(weights, str(folder / "model.safetensors"))
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    if card is not None:
        (folder / "README.md").write_text(f"---\n{card}\n---\n")
    _hub_json(root, repo_id, createdAt=CREATED.format(m=month), gated=gated)
    return folder


def _sharded(root: Path, repo_id: str, month: int, weights: dict[str, np.ndarray]) -> None:
    folder = root / repo_id
    folder.mkdir(parents=True)
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in halves.items():
        save_file({n: weights[n] for n in members}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {n: s for s, ms in halves.items() for n in ms}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _hub_json(root, repo_id, createdAt=CREATED.format(m=month))


@pytest.fixture()
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    return root


@pytest.fixture()
def emu(hub_root: Path) -> Iterator[HubEmulator]:
    with HubEmulator(hub_root) as emulator:
        yield emulator


def _options(emu: HubEmulator, **kw: object) -> CrawlOptions:
    waits: list[float] = kw.pop("waits", [])  # type: ignore[assignment]
    policy = RetryPolicy(sleep=waits.append)  # record the waits instead of sleeping them
    return CrawlOptions(endpoint=emu.url, progress=False, policy=policy, **kw)  # type: ignore[arg-type]


def _models(home: Path) -> dict[str, ModelRecord]:
    return {r.repo_id: r for r in read_records(home, "models")}  # type: ignore[union-attr,misc]


def _fetched(emu: HubEmulator, repo_id: str) -> list[object]:
    return [r for r in emu.requests() if r.path.startswith(f"/{repo_id}/resolve/")]


def test_crawl_indexes_skips_and_never_fetches_pickles(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    _repo(hub_root, "acme/base", 1, _weights(1), card="license: mit")
    _repo(hub_root, "acme/child", 2, _weights(2), card="base_model: acme/base\nbase_model_relation: finetune")
    _sharded(hub_root, "acme/sharded", 3, _weights(3))
    _repo(hub_root, "acme/pickled", 4, files={"pytorch_model.bin": b"\x80\x04 not to be unpickled"})
    # an adapter whose weights are pickled only (adapters in safetensors are indexed: test_crawl_relations.py)
    _repo(hub_root, "acme/lora", 5, files={"adapter_config.json": b'{"base_model_name_or_path": "acme/base"}',
                                           "adapter_model.bin": b"\x80\x04 not to be unpickled"})
    _repo(hub_root, "acme/gated", 6, _weights(6), gated=True)
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["seen"] == 6 and report["indexed"] == 3
    assert report["skipped"] == {"adapter": 1, "gated": 1, "pickle-only": 1}
    rows = _models(home)
    assert rows["acme/child"].declared_base_model == "acme/base"  # recorded, not used
    assert rows["acme/child"].declared_relation == "finetune"
    assert rows["acme/pickled"].reason.startswith("pickle-only")
    assert rows["acme/base"].family == rows["acme/child"].family != ""
    for never in ("acme/pickled", "acme/lora", "acme/gated"):
        assert _fetched(emu, never) == [], never  # decided from the listing alone
    # a 16x16 F32 model is smaller than the 100,000-byte prefix: one read, which costs the Hub's 302 to the CDN
    # and one CDN request
    assert [(r.origin, r.status) for r in _fetched(emu, "acme/base")] == [("hub", 302), ("cdn", 206)]


def test_second_crawl_fetches_only_new_models(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    _repo(hub_root, "acme/a", 1, _weights(1))
    _repo(hub_root, "acme/b", 2, _weights(2))
    home = tmp_path / "home"
    crawl(home, _options(emu))
    emu.clear_requests()
    _repo(hub_root, "acme/c", 3, _weights(3))
    report = crawl(home, _options(emu)).as_dict()
    fetched = {r.path.split("/resolve/")[0] for r in emu.requests() if "/resolve/" in r.path}
    assert fetched == {"/acme/c"}
    assert report["indexed"] == 1
    assert sum(r.bytes_sent for r in emu.requests() if "/resolve/" in r.path) == report["bytes_read_total"]
    emu.clear_requests()
    assert crawl(home, _options(emu)).as_dict()["indexed"] == 0
    assert not any("/resolve/" in r.path for r in emu.requests())


def test_new_revision_is_reindexed_same_revision_is_not(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    _repo(hub_root, "acme/a", 1, _weights(1))
    _repo(hub_root, "acme/b", 2, _weights(2))
    home = tmp_path / "home"
    crawl(home, _options(emu))
    old = {(r.repo_id, r.revision) for r in _models(home).values()}
    save_file(_weights(7), str(hub_root / "acme/a/model.safetensors"))  # a new commit: new sha, same createdAt
    emu.clear_requests()
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 1
    assert {r.path.split("/resolve/")[0] for r in emu.requests() if "/resolve/" in r.path} == {"/acme/a"}
    revisions = {(r.repo_id, r.revision) for r in read_records(home, "models")}  # type: ignore[union-attr]
    assert len(revisions - old) == 1 and old <= revisions


def test_sharded_model_is_read_exactly(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    weights = _weights(3, layers=3, width=24)
    _sharded(hub_root, "acme/sharded", 3, weights)
    seen: list[IndexedModel] = []
    report = crawl(tmp_path / "home", _options(emu), on_indexed=seen.append).as_dict()
    assert report["indexed"] == 1
    (model,) = seen
    assert model.plan.blocks and all(b.whole for b in model.plan.blocks)
    assert "lm_head.weight" not in model.arrays  # heads are never part of the plan
    by_name = {normalise_name(n): w for n, w in weights.items()}  # the crawl compares normalised names
    for name, array in model.arrays.items():
        np.testing.assert_array_equal(array, by_name[name])
    # a complete shard set: its headers name every tensor, so the index is not fetched (a resolver call saved)
    assert not [r for r in emu.requests() if r.path.endswith("model.safetensors.index.json")]


def test_an_incomplete_or_mixed_shard_set_is_read_through_its_index(emu: HubEmulator, hub_root: Path,
                                                                    tmp_path: Path) -> None:
    """A stray safetensors file beside the shards (a leftover of an older upload) is no shard of the set: the
    index says which tensors are the model's, and it is fetched."""
    weights = _weights(3, layers=3, width=24)
    _sharded(hub_root, "acme/sharded", 3, weights)
    save_file({"old.weight": np.ones((4, 4), np.float32)}, str(hub_root / "acme/sharded/model-00001-of-00003.safetensors"))
    seen: list[IndexedModel] = []
    report = crawl(tmp_path / "home", _options(emu), on_indexed=seen.append).as_dict()
    assert report["indexed"] == 1 and "old.weight" not in seen[0].arrays
    assert len([r for r in emu.requests() if r.path.endswith("model.safetensors.index.json")]) == 1
    from indexer.crawl import shard_set

    assert shard_set(["a-00001-of-00002.safetensors", "a-00002-of-00002.safetensors", "config.json"]) == (
        "a-00001-of-00002.safetensors", "a-00002-of-00002.safetensors")
    for files in (["a-00001-of-00002.safetensors"], ["a-00001-of-00002.safetensors", "a-00002-of-00002.safetensors",
                                                       "b.safetensors"], ["a-00001-of-00001.safetensors", "b-00001-of-00001.safetensors"]):
        assert shard_set(files) is None, files


def _padded_file(path: Path, header_total: int, values: np.ndarray) -> None:
    """A safetensors file whose 8 + N header bytes are exactly `header_total` (JSON padded with spaces)."""
    raw = values.astype("<f4").tobytes()
    meta = {"model.layers.0.self_attn.q_proj.weight": {"dtype": "F32", "shape": list(values.shape),
                                                        "data_offsets": [0, len(raw)]}}
    body = json.dumps(meta).encode()
    n = header_total - 8
    path.write_bytes(struct.pack("<Q", n) + body + b" " * (n - len(body)) + raw)


@pytest.mark.parametrize("header_total", [100_000, 100_008, 99_999])
def test_header_at_the_100000_byte_prefix_edge(emu: HubEmulator, hub_root: Path, tmp_path: Path,
                                              header_total: int) -> None:
    values = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    folder = hub_root / "acme/edge"
    folder.mkdir(parents=True)
    _padded_file(folder / "model.safetensors", header_total, values)
    seen: list[IndexedModel] = []
    report = crawl(tmp_path / "home", _options(emu), on_indexed=seen.append).as_dict()
    assert report["indexed"] == 1, report
    np.testing.assert_array_equal(seen[0].arrays["layers.0.self_attn.q_proj.weight"], values)
    ranges = [r.range for r in _fetched(emu, "acme/edge")]
    assert ranges[0] == "bytes=0-99999"  # the end byte is inclusive: exactly 100,000 bytes
    # the header fits the prefix unless it is longer than 100,000 bytes: then one more request for its tail
    assert ("bytes=100000-100007" in ranges) == (header_total > 100_000)
    assert sum(r.bytes_sent for r in _fetched(emu, "acme/edge")) == header_total + values.nbytes


def test_429_retry_after_is_honoured_and_503_retried(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    _repo(hub_root, "acme/a", 1, _weights(1))
    emu.faults.add("429", "/acme/a/resolve/*", count=1, retry=3)
    emu.faults.add("503", "/acme/a/resolve/*", count=2)
    waits: list[float] = []
    report = crawl(tmp_path / "home", _options(emu, waits=waits)).as_dict()
    assert report["indexed"] == 1
    assert [r.status for r in _fetched(emu, "acme/a")] == [429, 503, 503, 302, 206]  # the faults hit the Hub hop
    assert waits == [4.0, 2.0, 4.0]  # t=3 (+1 s as the client does), then backoff 1, 2, 4 s by attempt


def test_persistent_errors_fail_the_model_not_the_crawl(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    _repo(hub_root, "acme/down", 1, _weights(1))
    _repo(hub_root, "acme/cut", 2, _weights(2, width=256))
    nan = _weights(3)
    nan["model.layers.1.self_attn.v_proj.weight"][3, 3] = np.nan
    _repo(hub_root, "acme/nan", 3, nan)
    _repo(hub_root, "acme/ok", 4, _weights(4))
    emu.faults.add("503", "/acme/down/resolve/*", count=None)
    emu.faults.add("truncate", "/acme/cut/resolve/*", count=None)
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 1
    assert report["failed"] == {"http-503": 1, "network": 1, "non-finite": 1}
    assert len(_fetched(emu, "acme/down")) == RetryPolicy().attempts
    rows = _models(home)
    assert rows["acme/nan"].reason.startswith("non-finite") and "v_proj" in rows["acme/nan"].reason
    assert rows["acme/ok"].status == "indexed"


def test_virtual_7b_within_the_byte_budget(emu: HubEmulator, tmp_path: Path) -> None:
    emu.add_virtual("meta/llama-2-7b", layout="llama-2-7b", seed=1, created_at="2023-07-18T00:00:00.000Z")
    budget = 8 * 1024 * 1024
    seen: list[IndexedModel] = []
    report = crawl(tmp_path / "home", _options(emu, budget=budget), on_indexed=seen.append).as_dict()
    assert report["indexed"] == 1
    reads = _fetched(emu, "meta/llama-2-7b")
    header_bytes = sum(r.bytes_sent for r in reads if r.range in (None, "bytes=0-99999"))
    tensor_bytes = sum(r.bytes_sent for r in reads) - header_bytes
    assert 0.9 * budget <= tensor_bytes <= budget
    assert report["bytes_read_max_per_model"] == header_bytes + tensor_bytes
    plan = seen[0].plan
    assert {b.tensor.rsplit(".", 2)[-2] for b in plan.blocks} == {"v_proj"}  # plan v3: value matrices
    assert plan.fraction < 0.001
    # indexed on what fits, and the row says how much that was (issue 14)
    details = json.loads(_models(tmp_path / "home")["meta/llama-2-7b"].details)
    assert details["read_fraction"] == pytest.approx(plan.fraction, abs=1e-6)


def test_cursor_stays_when_rows_were_not_written(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    for month in (1, 2, 3):
        _repo(hub_root, f"acme/m{month}", month, _weights(month))
    home = tmp_path / "home"

    def crash_on_second(model: IndexedModel) -> None:
        if model.entry.repo_id == "acme/m2":
            raise KeyboardInterrupt  # the process is killed while the crawl is half done

    with pytest.raises(KeyboardInterrupt):
        crawl(home, _options(emu), on_indexed=crash_on_second)
    assert set(_models(home)) == {"acme/m3"}  # the finished model's row survived
    assert read_records(home, "crawl_state") == []  # the mark did not move past acme/m2
    # the same hook again (no lineage step): with the lineage step, acme/m3 would be indexed again too,
    # since it was never placed in the forest (see Indexer._placed)
    report = crawl(home, _options(emu), on_indexed=lambda model: None).as_dict()
    assert report["indexed"] == 2 and report["unchanged"] == 1
    (state,) = [s for s in read_records(home, "crawl_state") if s.endpoint == cursor_key(emu.url, [])]  # type: ignore[union-attr]
    assert (state.cursor_created_at, state.cursor_id) == (datetime(2024, 3, 1, tzinfo=UTC), "acme/m3")  # type: ignore[union-attr]


def test_limit_counts_fetched_models_and_keeps_the_cursor(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    for month in (1, 2, 3):
        _repo(hub_root, f"acme/m{month}", month, _weights(month))
    home = tmp_path / "home"
    assert crawl(home, _options(emu, limit=2)).as_dict()["indexed"] == 2
    assert read_records(home, "crawl_state") == []
    report = crawl(home, _options(emu, limit=2)).as_dict()
    assert (report["indexed"], report["unchanged"]) == (1, 2)
    assert len(read_records(home, "crawl_state")) == 2


def test_cli_crawl_json(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    from cli import index

    _repo(hub_root, "acme/a", 1, _weights(1))
    _repo(hub_root, "acme/p", 2, files={"model.pt": b"never"})
    result = CliRunner().invoke(index, ["crawl", "--endpoint", emu.url, "--home", str(tmp_path / "home"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"seen", "indexed", "skipped", "failed", "bytes_read_total", "bytes_read_max_per_model",
            "seconds"} <= set(summary)
    assert (summary["seen"], summary["indexed"], summary["skipped"]) == (2, 1, {"pickle-only": 1})


def test_cli_prefetch_option(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    """`index crawl --prefetch N` crawls the same models whatever N; a negative N is a usage error."""
    from cli import index

    for i in range(1, 4):
        _repo(hub_root, f"acme/m{i}", i, _weights(i))
    runs = {}
    for prefetch in ("0", "3"):
        result = CliRunner().invoke(index, ["crawl", "--endpoint", emu.url, "--home", str(tmp_path / prefetch),
                                            "--prefetch", prefetch, "--json"])
        assert result.exit_code == 0, result.output
        runs[prefetch] = json.loads(result.stdout)
        assert _rows(tmp_path / prefetch) and runs[prefetch]["indexed"] == 3
    assert _rows(tmp_path / "0") == _rows(tmp_path / "3")
    bad = CliRunner().invoke(index, ["crawl", "--endpoint", emu.url, "--home", str(tmp_path / "bad"), "--prefetch", "-1"])
    assert bad.exit_code == 2 and "--prefetch" in bad.output and not (tmp_path / "bad").exists()


def test_add_local_folders(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    a = _repo(zoo, "acme/a", 1, _weights(1), card="base_model: acme/root")
    loose = tmp_path / "loose"
    loose.mkdir()
    save_file(_weights(2), str(loose / "model.safetensors"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never read")
    home = tmp_path / "home"
    report = add_local(home, [a, loose, pickled], budget=1 << 20, progress=False).as_dict()
    assert (report["indexed"], report["skipped"]) == (2, {"pickle-only": 1})
    rows = _models(home)
    assert set(rows) == {"acme/a", "local/loose", "local/pickled"}
    assert rows["acme/a"].declared_base_model == "acme/root"
    assert rows["acme/a"].created_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert rows["acme/a"].revision.startswith("local:")
    again = add_local(home, [a, loose], budget=1 << 20, progress=False).as_dict()
    assert (again["indexed"], again["unchanged"]) == (0, 2)
    save_file(_weights(9), str(loose / "model.safetensors"))
    assert add_local(home, [loose], budget=1 << 20, progress=False).as_dict()["indexed"] == 1


def test_gated_repo_is_read_once_a_token_is_set(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    _repo(hub_root, "acme/gated", 1, _weights(1), gated=True)
    home = tmp_path / "home"
    assert crawl(home, _options(emu)).as_dict()["skipped"] == {"gated": 1}
    assert _fetched(emu, "acme/gated") == []
    report = crawl(home, _options(emu, token="hf_test_token")).as_dict()
    assert report["indexed"] == 1
    assert _models(home)["acme/gated"].status == "indexed"
    assert "hf_test_token" not in json.dumps(report) + str(_models(home)["acme/gated"])


def test_a_refused_token_stops_the_crawl_with_a_hint(hub_root: Path, tmp_path: Path) -> None:
    from errors import HubError

    _repo(hub_root, "acme/gated", 1, _weights(1), gated=True)
    with HubEmulator(hub_root, token="the-right-one") as emulator, pytest.raises(HubError) as info:
        crawl(tmp_path / "home", _options(emulator, token="a-wrong-one"))
    assert info.value.status == 401 and "HF_TOKEN" in str(info.value) and "a-wrong-one" not in str(info.value)


def test_refetch_reads_the_same_blocks_again_by_range(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    """What the lineage index asks for when a nominee left the bounded cache: the same planned blocks,
    over HTTP from the Hub, at the revision that was indexed."""
    from indexer.crawl import hub_refetch
    from indexer.sources import HubSource

    _sharded(hub_root, "acme/sharded", 3, _weights(3))
    seen: list[IndexedModel] = []
    crawl(tmp_path / "home", _options(emu, budget=4096), on_indexed=seen.append)
    first = seen[0]
    before = len(_fetched(emu, "acme/sharded"))
    again = hub_refetch(HubSource(emu.url, token=None), budget=4096, have_token=False)("acme/sharded", first.entry.revision)
    assert sorted(again) == sorted(first.arrays)
    assert all(np.array_equal(again[n], first.arrays[n]) for n in again)
    assert len(_fetched(emu, "acme/sharded")) > before  # really read again, over HTTP


def test_a_refetch_of_a_model_indexed_this_run_asks_no_model_info(emu: HubEmulator, hub_root: Path,
                                                                   tmp_path: Path) -> None:
    """With the entry indexed this run at hand, a re-read costs range reads only: model_info is an API
    call, and 0.79 of them a model (bench/crawl_rate.py) made the Hub's API bucket bind first."""
    from indexer.crawl import hub_refetch
    from indexer.sources import HubSource

    _sharded(hub_root, "acme/sharded", 3, _weights(3))
    seen: list[IndexedModel] = []
    crawl(tmp_path / "home", _options(emu, budget=4096), on_indexed=seen.append)
    first = seen[0]
    emu.clear_requests()
    recent = {(first.entry.repo_id, first.entry.revision): first.entry}
    again = hub_refetch(HubSource(emu.url, token=None), budget=4096, have_token=False, recent=recent)(
        "acme/sharded", first.entry.revision)
    assert all(np.array_equal(again[n], first.arrays[n]) for n in first.arrays)
    asked = [r.path for r in emu.requests()]
    assert asked and not any(p.startswith("/api/") for p in asked)
    # a model not indexed this run (after a restart) still asks model_info
    hub_refetch(HubSource(emu.url, token=None), budget=4096, have_token=False, recent={})("acme/sharded",
                                                                                          first.entry.revision)
    assert any(r.path.startswith("/api/models/acme/sharded") for r in emu.requests())


def test_a_model_listed_by_both_passes_is_counted_once(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    """The created pass and the lastModified pass overlap; the report counts each listed model once, and a
    model indexed by one pass is not "unchanged" in the other."""
    for month in (1, 2, 3):
        _repo(hub_root, f"acme/m{month}", month, _weights(month))
    home = tmp_path / "home"
    first = crawl(home, _options(emu)).as_dict()
    assert first["indexed"] == 3 and first["seen"] == 3 and first["unchanged"] == 0
    again = crawl(home, _options(emu)).as_dict()
    assert again["indexed"] == 0 and again["seen"] == again["unchanged"] <= 3


def _rows(home: Path) -> list[tuple[object, ...]]:
    return sorted((r.repo_id, r.revision, r.family, r.status, r.reason, r.bytes_read)
                  for r in read_records(home, "models"))  # type: ignore[union-attr]


def _edges(home: Path) -> list[tuple[object, ...]]:
    from store.tables import read_table

    return sorted((e["repo_id"], e["parent"], e["relation"])
                  for e in read_table(home, "edges", columns=["repo_id", "parent", "relation"]).to_pylist())


def test_prefetching_threads_write_what_the_crawl_without_them_writes(emu: HubEmulator, hub_root: Path,
                                                                     tmp_path: Path) -> None:
    """`--prefetch` reads models ahead on threads and applies them in listing order: the same rows, bytes,
    calls per host and lineage as reading each model when the crawl reaches it; nothing is read twice."""
    base = _weights(1)
    _repo(hub_root, "acme/base", 1, base)
    for i in range(2, 8):
        _repo(hub_root, f"acme/ft{i}", i, {n: a + 0.001 * (i + 1) * _weights(i)[n] for n, a in base.items()})
    _sharded(hub_root, "acme/sharded", 8, _weights(9))
    _repo(hub_root, "acme/broken", 9, files={"model.safetensors": struct.pack("<Q", 1 << 40)})
    reports, homes = {}, {}
    for prefetch in (0, 2, 5):
        emu.clear_requests()
        homes[prefetch] = tmp_path / f"home{prefetch}"
        reports[prefetch] = crawl(homes[prefetch], _options(emu, prefetch=prefetch))
        sent = sum(r.bytes_sent for r in emu.requests() if "/resolve/" in r.path)
        assert sent == reports[prefetch].as_dict()["bytes_read_total"]  # every byte read once, by one model
    plain = reports[0]
    assert plain.as_dict()["indexed"] == 8 and plain.as_dict()["skipped"] == {"header-invalid": 1}
    assert sum(parent == "acme/base" for _, parent, _ in _edges(homes[0])) >= 1  # lineage ran: a tree to compare
    for prefetch in (2, 5):
        assert _rows(homes[prefetch]) == _rows(homes[0])
        assert _edges(homes[prefetch]) == _edges(homes[0])
        ahead = {o.repo_id: (o.status, o.reason, o.bytes_read, o.resolver_calls, o.cdn_calls) for o in reports[prefetch].outcomes}
        assert ahead == {o.repo_id: (o.status, o.reason, o.bytes_read, o.resolver_calls, o.cdn_calls) for o in plain.outcomes}


def test_prefetch_reads_the_next_model_while_the_lineage_step_runs(emu: HubEmulator, hub_root: Path,
                                                                    tmp_path: Path) -> None:
    """While the hook of the newest model runs, the next one (listed after it) is already being read."""
    import time

    for i in range(1, 4):
        _repo(hub_root, f"acme/m{i}", i, _weights(i))
    overlapped: list[bool] = []

    def hook(model: IndexedModel) -> None:
        if model.entry.repo_id != "acme/m3":  # newest first: m3 is the first model the crawl applies
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _fetched(emu, "acme/m2"):
            time.sleep(0.01)
        overlapped.append(bool(_fetched(emu, "acme/m2")))

    crawl(tmp_path / "home", _options(emu, prefetch=1), on_indexed=hook)
    assert overlapped == [True]


def test_prefetch_never_reads_past_the_limit(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    for i in range(1, 6):
        _repo(hub_root, f"acme/m{i}", i, _weights(i))
    report = crawl(tmp_path / "home", _options(emu, prefetch=3, limit=2)).as_dict()
    assert report["indexed"] == 2
    assert {r.path.split("/resolve/")[0] for r in emu.requests() if "/resolve/" in r.path} == {"/acme/m5", "/acme/m4"}


def test_a_negative_prefetch_is_refused(emu: HubEmulator, tmp_path: Path) -> None:
    from errors import BadInputError

    with pytest.raises(BadInputError, match="prefetch"):
        crawl(tmp_path / "home", _options(emu, prefetch=-1))
    assert not (tmp_path / "home").exists()


def test_the_crawl_runs_its_arithmetic_at_the_threads_asked_and_gives_them_back(emu: HubEmulator, hub_root: Path,
                                                                             tmp_path: Path) -> None:
    """`--threads N` (default 1): torch's pool is N wide while the lineage step runs, and as before after the
    crawl; the rows do not depend on N; 0 is refused before the store is touched (the CLI: a usage error)."""
    import torch

    from cli import index
    from errors import BadInputError

    for i in range(1, 4):
        _repo(hub_root, f"acme/m{i}", i, _weights(i))
    before, seen = torch.get_num_threads(), []
    for n in (1, 2):
        crawl(tmp_path / f"t{n}", _options(emu, threads=n), on_indexed=lambda _m: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == before
    assert seen == [1, 1, 1, 2, 2, 2]
    assert _rows(tmp_path / "t1") == _rows(tmp_path / "t2")
    with pytest.raises(BadInputError, match="--threads"):
        crawl(tmp_path / "bad", _options(emu, threads=0))
    assert not (tmp_path / "bad").exists()
    bad = CliRunner().invoke(index, ["crawl", "--endpoint", emu.url, "--home", str(tmp_path / "cli"), "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output and not (tmp_path / "cli").exists()
