"""Hostile input: safetensors bytes and Hub JSON crafted to break us. Every case must end in a typed error
(`ModelGraphError`) or a clean skip, within bounded time and memory, and write nothing outside the store.

tests/test_safetensors.py already fuzzes random bytes and random headers; here: huge declared lengths, deep
and giant JSON, overflowing shapes, NaN/Inf payloads through the crawl, zero-size tensors, and a raw HTTP
server of our own that answers the crawler's requests with malicious listings, infos and index files.
"""

from __future__ import annotations

import json
import math
import resource
import struct
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from errors import ModelGraphError, SafetensorsError
from indexer.crawl import CrawlOptions, add_local, crawl
from indexer.hub_emulator import HubEmulator
from indexer.retry import RetryPolicy
from indexer.sources import HubSource
from sketches.safetensors import CallableSource, parse_header, read_header, read_tensor
from store.tables import read_table

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SHA = "a" * 40


def _file(header: bytes | dict[str, Any], data: bytes = b"", *, declared: int | None = None) -> CallableSource:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw) if declared is None else declared) + raw + data
    return CallableSource("fuzz.safetensors", len(blob), lambda a, b: blob[a:b])


def _parse(source: CallableSource) -> None:
    """Header, then every tensor: only SafetensorsError may come out."""
    header = read_header(source)
    for info in header.tensors:
        read_tensor(source, info)


# --- safetensors: what tests/test_safetensors.py does not cover ------------------------------------------


@FUZZ
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_any_declared_header_length_is_refused_before_reading(declared: int) -> None:
    asked: list[tuple[int, int]] = []
    blob = struct.pack("<Q", declared) + b"{}"
    source = CallableSource("x", len(blob), lambda a, b: (asked.append((a, b)), blob[a:b])[1])
    if declared == 2:
        assert read_header(source).tensors == ()
        return
    with pytest.raises(SafetensorsError):
        read_header(source)
    assert all(b - a <= len(blob) for a, b in asked)  # never asked the source for the declared size


@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_deep_json_is_a_typed_error(depth: int) -> None:
    with pytest.raises(SafetensorsError):
        _parse(_file(("[" * depth + "]" * depth).encode()))
    with pytest.raises(SafetensorsError):
        _parse(_file(('{"a":' * depth + "1" + "}" * depth).encode()))


def test_giant_json_with_many_tensors_is_bounded() -> None:
    n = 50_000  # a 3 MB header of zero-size tensors: parsed, nothing allocated for data
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    assert len(read_header(_file(header)).tensors) == n


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                       max_leaves=10)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "F8_E5M2", "BOOL", "I64", "Q4", "f32",
                          "", "F32\x00", "C64"])
DIMS = st.lists(st.integers(min_value=-2, max_value=2**40) | st.sampled_from([0, 1, 2**63, 2**64, 2**64 + 1]),
                max_size=5)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), st.fixed_dictionaries(
    {"dtype": DTYPES | JSONISH, "shape": DIMS | JSONISH,
     "data_offsets": st.lists(st.integers(min_value=-1, max_value=2**65), min_size=0, max_size=3) | JSONISH}),
    max_size=4), st.binary(max_size=64))
def test_wrong_types_unknown_dtypes_overflowing_shapes_and_bad_offsets(header: dict[str, Any], data: bytes) -> None:
    try:
        _parse(_file(header, data))
    except SafetensorsError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64)), min_size=2, max_size=4))
def test_overlapping_offsets_are_refused(spans: list[tuple[int, int]]) -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [max(0, b - a)], "data_offsets": [a, max(a, b)]}
              for i, (a, b) in enumerate(spans)}
    live = sorted((a, b) for a, b in spans if b > a)
    overlap = any(c < prev_b for (_, prev_b), (c, _) in zip(live, live[1:]))
    try:
        _parse(_file(header, bytes(64)))
    except SafetensorsError as exc:
        assert overlap or "overlap" not in str(exc)
    else:
        assert not overlap


def test_zero_size_tensors_decode_to_empty_arrays() -> None:
    header = {"a": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [0, 0]},
              "b": {"dtype": "F8_E4M3", "shape": [3, 0], "data_offsets": [0, 0]}}
    source = _file(header)
    for info in read_header(source).tensors:
        assert read_tensor(source, info).size == 0


# --- through the crawl: NaN / Inf payloads, zero-size and odd files --------------------------------------


def _layers(value: float | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"model.layers.{i}.self_attn.{p}_proj.weight": rng.normal(0, 0.02, (16, 16)).astype(np.float32)
           for i in range(2) for p in "qkvo"}
    if value is not None:
        out["model.layers.1.self_attn.o_proj.weight"][5, 7] = value
    return out


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_or_inf_weights_are_recorded_failed_non_finite(tmp_path: Path, value: float, dtype: type) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file({k: v.astype(dtype) for k, v in _layers(value).items()}, str(folder / "model.safetensors"))
    report = add_local(tmp_path / "home", [folder], budget=1 << 20, progress=False).as_dict()
    assert report["failed"] == {"non-finite": 1}
    assert read_table(tmp_path / "home", "sketches").num_rows == 0  # nothing derived from the bad weights


# --- hostile Hub JSON from a raw server ---------------------------------------------------------------------


class HostileHub:
    """A bare http.server answering GET paths from `routes` (exact path -> (status, headers, body)); the
    listing answers every /api/models query; anything else is a 404. Records every path asked."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.routes = routes
        self.asked: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                hub.asked.append(self.path)
                status, headers, body = hub.routes.get(path, (404, {"X-Error-Code": "RepoNotFound"}, b"{}"))
                if status == 200 and "Range" in self.headers and path not in ("/api/models",):
                    status = 200  # ignore Range: the client must cope and cap the body
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HostileHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _listing(*entries: Any) -> dict[str, tuple[int, dict[str, str], bytes]]:
    return {"/api/models": (200, {"Content-Type": "application/json"}, json.dumps(list(entries)).encode())}


def _entry(repo_id: Any, files: list[Any], **extra: Any) -> dict[str, Any]:
    return {"id": repo_id, "_id": "x", "modelId": repo_id, "sha": SHA, "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": f} for f in files], **extra}


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save(_layers())


def _crawl_hostile(routes: dict[str, tuple[int, dict[str, str], bytes]], home: Path) -> tuple[dict[str, Any] | None,
                                                                                              Exception | None, list[str]]:
    with HostileHub(routes) as hub:
        policy = RetryPolicy(attempts=2, sleep=lambda s: None)
        options = CrawlOptions(endpoint=hub.url, progress=False, device="cpu", policy=policy)
        try:
            return crawl(home, options, hub=HubSource(hub.url, token=None, policy=policy, timeout=5)).as_dict(), None, hub.asked
        except ModelGraphError as exc:
            return None, exc, hub.asked


def _index(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


HOSTILE: dict[str, Callable[[], dict[str, tuple[int, dict[str, str], bytes]]]] = {
    "listing is an object": lambda: {"/api/models": (200, {}, b'{"error": "nope"}')},
    "listing is not JSON": lambda: {"/api/models": (200, {}, b"<html>")},
    "listing entries of wrong types": lambda: _listing(1, "x", None, [1], {"id": 5}, {"id": None, "sha": 7}),
    "siblings of wrong types": lambda: _listing(_entry("acme/a", []) | {"siblings": [{"rfilename": 3}, "x", None]}),
    "createdAt not a date": lambda: _listing(_entry("acme/a", ["model.safetensors"]) | {"createdAt": "yesterday"}),
    "repo id ../../etc": lambda: _listing(_entry("../../etc", ["model.safetensors"])),
    "repo id org/name/../../x": lambda: _listing(_entry("org/name/../../x", ["model.safetensors"])),
    "repo id absolute": lambda: _listing(_entry("/etc/passwd", ["model.safetensors"])),
    "repo id with NUL": lambda: _listing(_entry("org/na\x00me", ["model.safetensors"])),
    "file name ../": lambda: _listing(_entry("acme/a", ["../../model.safetensors"])),
    "shard ../ in index.json": lambda: _listing(_entry("acme/a", ["model.safetensors.index.json", "../x.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors.index.json": (200, {}, _index({"w": "../x.safetensors"}))},
    "shard absolute path": lambda: _listing(_entry("acme/a", ["model.safetensors.index.json", "/etc/passwd"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors.index.json": (200, {}, _index({"w": "/etc/passwd"}))},
    "shard with NUL": lambda: _listing(_entry("acme/a", ["model.safetensors.index.json", "a\x00.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors.index.json": (200, {}, _index({"w": "a\x00.safetensors"}))},
    "index.json of wrong types": lambda: _listing(_entry("acme/a", ["model.safetensors.index.json"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors.index.json": (200, {}, b'{"weight_map": [1, 2]}')},
    "index.json huge": lambda: _listing(_entry("acme/a", ["model.safetensors.index.json"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors.index.json": (200, {}, b" " * (101 * 1024 * 1024))},
    "401 on the weights": lambda: _listing(_entry("acme/a", ["model.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors": (401, {"X-Error-Code": "GatedRepo"}, b"{}")},
    "403 on the weights": lambda: _listing(_entry("acme/a", ["model.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors": (403, {}, b"{}")},
    "weights ignore Range": lambda: _listing(_entry("acme/a", ["model.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors": (200, {}, _safetensors_bytes())},
    "weights are garbage": lambda: _listing(_entry("acme/a", ["model.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors": (206, {"Content-Range": "bytes 0-9/10"}, b"\xff" * 10)},
    "bad Content-Range": lambda: _listing(_entry("acme/a", ["model.safetensors"])) | {
        f"/acme/a/resolve/{SHA}/model.safetensors": (206, {"Content-Range": "bytes 0-99999/-5"}, b"\x00" * 16)},
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("sandbox")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_hub_json_ends_in_a_typed_error_or_a_clean_skip(case: str, sandbox: Path) -> None:
    area = sandbox / case.replace(" ", "_").replace("/", "_").replace(".", "_")
    home = area / "home"
    area.mkdir()
    before = _tree(sandbox.parent)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary, error, asked = _crawl_hostile(HOSTILE[case](), home)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grew_kib < 512 * 1024  # bounded: a 101 MiB index is refused, not held twice
    if summary is not None:
        assert summary["indexed"] <= 1 and sum(summary["failed"].values()) + sum(summary["skipped"].values()) + \
            summary["indexed"] == summary["seen"], summary
        rows = read_table(home, "models").to_pylist()
        assert all(r["status"] in ("skipped", "failed") or case == "weights ignore Range" for r in rows), rows
    else:
        assert isinstance(error, ModelGraphError)
    # nothing written outside INDEX_HOME: every new path under the sandbox's parent lies in `home`
    new = {p for p in _tree(sandbox.parent) - before if not str(p).startswith(str(area))}
    assert new == set(), sorted(new)[:5]
    assert all(not p.startswith("/etc") for p in asked)


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_malicious_repo_ids_never_become_paths_in_the_store_or_cache(tmp_path: Path) -> None:
    """The store and the tensor cache name files by hash, never by repo id: a served `../../x` model is
    indexed (it is only a name) and every file it caused lies under INDEX_HOME."""
    hub_root = tmp_path / "hub"
    folder = hub_root / "evil" / "model"
    folder.mkdir(parents=True)
    save_file(_layers(), str(folder / "model.safetensors"))
    (hub_root / "hub.json").write_text('{"version": 1, "repos": {"evil/model": {"createdAt": "2024-01-01T00:00:00.000Z"}}}')
    from store.cache import TensorCache

    cache = TensorCache(tmp_path / "home" / "cache")
    for repo_id in ("../../etc", "org/name/../../x", "/abs/path", "a\x00b"):
        path = cache._path((repo_id, SHA, "../../w", 0))
        assert path.resolve().is_relative_to((tmp_path / "home" / "cache").resolve()) and ".." not in path.name
    with HubEmulator(hub_root) as emu:
        crawl(tmp_path / "home", CrawlOptions(endpoint=emu.url, progress=False, device="cpu"))
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "home") and not p.is_relative_to(hub_root)]
    assert outside == []
