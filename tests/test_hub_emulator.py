"""The Hub emulator, driven by the real huggingface_hub client over real HTTP on 127.0.0.1.

Every repo here is a real folder with real safetensors files; every check goes through the same
client calls a crawl makes against huggingface.co (list_models, model_info, get_safetensors_metadata,
hf_hub_download), or through raw http.client where the bytes on the wire are the point.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    NotASafetensorsRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url
from safetensors import safe_open
from safetensors.numpy import save_file

from errors import BadInputError
from indexer.hub_emulator import HubEmulator, bf16_to_f32, parse_fault_spec, parse_virtual_spec
from indexer.hub_emulator.faults import Faults
from indexer.hub_emulator.repos import RepoSource
from indexer.hub_emulator.server import parse_range
from indexer.hub_emulator.virtual import LAYOUTS, Lineage, VirtualRepo

T0 = "2024-01-01T00:00:00.000Z"
REPO_ROOT = Path(__file__).resolve().parents[1]

# createdAt per repo; two share a timestamp so the (createdAt, id) tie-break is exercised.
CREATED = {
    "acme/base": "2024-01-01T00:00:00.000Z",
    "acme/child": "2024-02-01T00:00:00.000Z",
    "acme/sharded": "2024-03-01T00:00:00.000Z",
    "acme/gated": "2024-03-01T00:00:00.000Z",
    "acme/pickled": "2024-04-01T00:00:00.000Z",
    "acme/edge": "2024-05-01T00:00:00.000Z",
    "other/merge": "2024-06-01T00:00:00.000Z",
    "acme/private": "2024-07-01T00:00:00.000Z",
}
PUBLIC_NEWEST_FIRST = ["other/merge", "acme/edge", "acme/pickled", "acme/gated", "acme/sharded", "acme/child",
                       "acme/base"]


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.layer.0.attention.attention.query.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "encoder.layer.0.attention.output.dense.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "classifier.bias": rng.standard_normal(3).astype(np.float16),
    }


def _write_repo(root: Path, repo_id: str, *, card: str | None = None, config: bool = True, seed: int = 0) -> Path:
    repo = root / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(seed), str(repo / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 8}
        (repo / "config.json").write_text(json.dumps(cfg))
    if card is not None:
        (repo / "README.md").write_text(card)
    return repo


def edge_file(path: Path, prefix: int = 100_000) -> bytes:
    """A safetensors file whose 8-byte length + header is exactly `prefix` bytes, followed by data."""
    data = np.arange(16, dtype=np.float32)
    header = {"__metadata__": {"pad": ""}, "x": {"dtype": "F32", "shape": [16], "data_offsets": [0, data.nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    header["__metadata__"]["pad"] = "p" * (prefix - 8 - len(raw))
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert 8 + len(raw) == prefix
    blob = struct.pack("<Q", len(raw)) + raw + data.tobytes()
    path.write_bytes(blob)
    return blob


def build_hub(root: Path) -> Path:
    _write_repo(root, "acme/base", card="---\nlicense: apache-2.0\ntags:\n- vit\n---\n# base\n", seed=1)
    _write_repo(root, "acme/child", card="---\nbase_model: acme/base\nlicense: apache-2.0\n---\n# child\n", seed=2)
    _write_repo(root, "acme/gated", card="---\nbase_model: acme/base\n---\n", seed=3)
    _write_repo(root, "acme/private", seed=4)
    _write_repo(root, "other/merge", card="---\nbase_model:\n- acme/base\n- acme/child\n---\n", seed=5)
    sharded = root / "acme/sharded"
    sharded.mkdir(parents=True)
    tensors = _tensors(6)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(sharded / shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: s for s, members in shards.items() for n in members}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    pickled = root / "acme/pickled"
    pickled.mkdir(parents=True)
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a pickle " * 100)
    (pickled / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (root / "acme/edge").mkdir(parents=True)
    edge_file(root / "acme/edge/model.safetensors")
    hub = {"version": 1, "repos": {rid: {"createdAt": ts} for rid, ts in CREATED.items()}}
    hub["repos"]["acme/gated"]["gated"] = "manual"
    hub["repos"]["acme/private"]["private"] = True
    (root / "hub.json").write_text(json.dumps(hub))
    return root


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def emu(hub_root: Path) -> Iterator[HubEmulator]:
    with HubEmulator(hub_root) as emulator:
        yield emulator


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[HubEmulator]:
    """An emulator over its own folder, for tests that change files or settings."""
    with HubEmulator(build_hub(tmp_path / "hub")) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean(emu: HubEmulator) -> Iterator[None]:
    emu.faults.clear()
    emu.clear_requests()
    yield
    emu.faults.clear()


def raw(emu: HubEmulator, method: str, path: str, headers: dict[str, str] | None = None, *, follow: bool = True
        ) -> tuple[http.client.HTTPResponse, bytes | Exception]:
    """One request with the stdlib client; the body, or the exception reading it raised. An LFS file's 302 to
    the CDN is followed (without Authorization, as the real client does) unless `follow` is False."""
    response, body = _request(emu.port, method, path, headers or {})
    location = response.getheader("Location")
    if follow and response.status == 302 and location:
        target = urlsplit(location)
        kept = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        response, body = _request(target.port or 80, method, f"{target.path}?{target.query}", kept)
    return response, body


def _request(port: int, method: str, path: str, headers: dict[str, str]
             ) -> tuple[http.client.HTTPResponse, bytes | Exception]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    try:
        body: bytes | Exception = response.read()
    except (http.client.IncompleteRead, ConnectionError) as exc:
        body = exc
    conn.close()
    return response, body


# -- listing ---------------------------------------------------------------------------------------


def test_list_models_newest_first_with_expand_fields(emu: HubEmulator, hub_root: Path) -> None:
    api = HfApi(endpoint=emu.url)
    expand = ["createdAt", "sha", "config", "cardData", "baseModels", "siblings", "safetensors", "tags", "gated"]
    models = list(api.list_models(sort="created_at", expand=expand))  # type: ignore[arg-type]
    assert [m.id for m in models] == PUBLIC_NEWEST_FIRST  # private never listed without a token
    by_id = {m.id: m for m in models}
    child = by_id["acme/child"]
    assert child.created_at is not None and child.created_at.isoformat() == "2024-02-01T00:00:00+00:00"
    assert child.sha == api.model_info("acme/child").sha and len(child.sha or "") == 40
    assert child.base_models == {"relation": "finetune", "models": [{"id": "acme/base"}]}
    assert child.card_data is not None and child.card_data.base_model == "acme/base"
    merged = {"relation": "merge", "models": [{"id": "acme/base"}, {"id": "acme/child"}]}
    assert by_id["other/merge"].base_models == merged
    assert by_id["acme/base"].base_models is None
    assert child.config == {"architectures": ["ViTForImageClassification"], "model_type": "vit"}
    assert [s.rfilename for s in child.siblings or []] == ["README.md", "config.json", "model.safetensors"]
    assert child.safetensors is not None
    assert child.safetensors.parameters == {"F16": 3, "F32": 128} and child.safetensors.total == 131
    assert by_id["acme/sharded"].safetensors.total == 131  # type: ignore[union-attr]  (summed over both shards)
    assert by_id["acme/pickled"].safetensors is None
    assert "ViTForImageClassification" in (child.tags or []) and "vit" in (child.tags or [])
    assert "base_model:finetune:acme/base" in (child.tags or [])
    assert by_id["acme/gated"].gated == "manual" and child.gated is False
    assert by_id["acme/base"].downloads is None  # expand returns only what was asked for


def test_list_models_default_fields_and_private_with_token(emu: HubEmulator) -> None:
    models = list(HfApi(endpoint=emu.url).list_models(sort="created_at"))
    assert models[0].id == "other/merge" and models[0].sha is None and models[0].downloads == 0
    with_token = [m.id for m in HfApi(endpoint=emu.url, token="hf_anything").list_models(sort="created_at")]
    assert with_token == ["acme/private", *PUBLIC_NEWEST_FIRST]


def test_pagination_follows_link_with_all_parameters(emu: HubEmulator) -> None:
    api = HfApi(endpoint=emu.url)
    emu.page_size = 2
    try:
        models = list(api.list_models(sort="created_at", expand=["createdAt", "sha"]))
    finally:
        emu.page_size = 1000
    assert [m.id for m in models] == PUBLIC_NEWEST_FIRST  # no repeats, none lost, ties ordered by id
    pages = [r for r in emu.requests() if r.path == "/api/models"]
    assert len(pages) == 4  # 7 models, 2 a page
    for later in pages[1:]:
        query = parse_qs(later.query)
        assert query["sort"] == ["createdAt"] and query["expand"] == ["createdAt", "sha"] and query["cursor"]


def test_link_header_is_absolute_and_limit_caps_the_page(emu: HubEmulator) -> None:
    response, body = raw(emu, "GET", "/api/models?sort=createdAt&limit=3&expand=sha")
    assert [m["id"] for m in json.loads(body)] == PUBLIC_NEWEST_FIRST[:3]  # type: ignore[arg-type]
    link = response.headers["Link"]
    url = link[link.index("<") + 1:link.index(">")]
    assert link.endswith('rel="next"') and url.startswith(emu.url + "/api/models?")
    response, body = raw(emu, "GET", url[len(emu.url):])
    assert [m["id"] for m in json.loads(body)] == PUBLIC_NEWEST_FIRST[3:6]  # type: ignore[arg-type]
    # the client stops at `limit` itself: one request, three models
    emu.clear_requests()
    assert len(list(HfApi(endpoint=emu.url).list_models(sort="created_at", limit=3))) == 3
    assert len(emu.requests()) == 1


def test_list_models_filters(emu: HubEmulator) -> None:
    api = HfApi(endpoint=emu.url)
    assert [m.id for m in api.list_models(filter="LlamaForCausalLM")] == ["acme/sharded"]
    assert [m.id for m in api.list_models(filter="base_model:acme/base", sort="created_at")] == [
        "other/merge", "acme/gated", "acme/child"]
    assert [m.id for m in api.list_models(author="other")] == ["other/merge"]
    assert [m.id for m in api.list_models(search="pick")] == ["acme/pickled"]
    response, _ = raw(emu, "GET", "/api/models?expand=notAField")
    assert response.status == 400


# -- model info ------------------------------------------------------------------------------------


def test_model_info_revision_and_not_found(emu: HubEmulator) -> None:
    api = HfApi(endpoint=emu.url)
    info = api.model_info("acme/child")
    assert info.sha and len(info.sha) == 40 and info.author == "acme" and info.library_name == "transformers"
    assert info.pipeline_tag == "image-classification"
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert api.model_info("acme/child", revision=info.sha).sha == info.sha
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/child", revision="0" * 40)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nope")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/private")  # private without a token does not exist for you
    assert HfApi(endpoint=emu.url, token="hf_x").model_info("acme/private").private is True
    only = api.model_info("acme/child", expand=["baseModels"])  # type: ignore[list-item]
    assert only.base_models == {"relation": "finetune", "models": [{"id": "acme/base"}]} and only.sha is None
    response, body = raw(emu, "GET", "/api/models/acme/nope")
    assert response.status == 404 and response.headers["X-Error-Code"] == "RepoNotFound"
    assert "error" in json.loads(body)  # type: ignore[arg-type]


def test_files_metadata_siblings_carry_lfs_digests(emu: HubEmulator, hub_root: Path) -> None:
    info = HfApi(endpoint=emu.url).model_info("acme/child", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    weights = (hub_root / "acme/child/model.safetensors").read_bytes()
    lfs = siblings["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs.size == len(weights)
    config = (hub_root / "acme/child/config.json").read_bytes()
    assert siblings["config.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    assert siblings["config.json"].lfs is None
    assert sorted(HfApi(endpoint=emu.url).list_repo_files("acme/sharded")) == sorted(
        p.name for p in (hub_root / "acme/sharded").iterdir())


# -- files -----------------------------------------------------------------------------------------


def test_safetensors_metadata_single_and_sharded(emu: HubEmulator, hub_root: Path) -> None:
    api = HfApi(endpoint=emu.url)
    for repo_id in ("acme/base", "acme/sharded"):
        meta = api.get_safetensors_metadata(repo_id)
        assert meta.sharded == (repo_id == "acme/sharded")
        for filename, file_meta in meta.files_metadata.items():
            with safe_open(str(hub_root / repo_id / filename), "np") as handle:
                assert sorted(file_meta.tensors) == sorted(handle.keys())
                for name in handle.keys():
                    view = handle.get_slice(name)
                    assert file_meta.tensors[name].shape == list(view.get_shape())
                    assert file_meta.tensors[name].dtype == view.get_dtype()
    with pytest.raises(NotASafetensorsRepoError):
        api.get_safetensors_metadata("acme/pickled")


def test_hf_hub_download_is_byte_identical_with_hub_etags(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    for filename in ("model.safetensors", "config.json"):
        local = hf_hub_download("acme/base", filename, endpoint=emu.url, cache_dir=tmp_path)
        assert Path(local).read_bytes() == (hub_root / "acme/base" / filename).read_bytes()
    url = hf_hub_url("acme/base", "model.safetensors", endpoint=emu.url)
    meta = get_hf_file_metadata(url)
    weights = (hub_root / "acme/base/model.safetensors").read_bytes()
    assert meta.etag == hashlib.sha256(weights).hexdigest() and meta.size == len(weights)
    assert meta.commit_hash == HfApi(endpoint=emu.url).model_info("acme/base").sha
    config = (hub_root / "acme/base/config.json").read_bytes()
    config_meta = get_hf_file_metadata(hf_hub_url("acme/base", "config.json", endpoint=emu.url))
    assert config_meta.etag == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("acme/base", "missing.json", endpoint=emu.url, cache_dir=tmp_path)
    assert not HfApi(endpoint=emu.url).file_exists("acme/base", "missing.json")
    local = hf_hub_download("acme/pickled", "pytorch_model.bin", endpoint=emu.url, cache_dir=tmp_path)
    assert Path(local).read_bytes() == (hub_root / "acme/pickled/pytorch_model.bin").read_bytes()


def test_snapshot_download_and_sharded_headers_in_one_call(emu: HubEmulator, hub_root: Path, tmp_path: Path) -> None:
    nested = hub_root / "acme/sharded/extra/notes.txt"
    nested.parent.mkdir(exist_ok=True)
    nested.write_text("a file in a subfolder")
    try:
        local = Path(HfApi(endpoint=emu.url).snapshot_download("acme/sharded", cache_dir=tmp_path))
        on_disk = sorted(p.relative_to(hub_root / "acme/sharded") for p in (hub_root / "acme/sharded").rglob("*")
                         if p.is_file())
        assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == on_disk
        assert all((local / p).read_bytes() == (hub_root / "acme/sharded" / p).read_bytes() for p in on_disk)
    finally:
        nested.unlink()
        nested.parent.rmdir()
    api = HfApi(endpoint=emu.url)
    assert api.get_sharded_safetensors_metadata("acme/sharded") == api.get_safetensors_metadata("acme/sharded")


@pytest.mark.parametrize(
    ("header", "status", "start", "end"),
    [("bytes=10-19", 206, 10, 20), ("bytes=5-", 206, 5, None), ("bytes=-7", 206, -7, None),
     ("bytes=0-99999999", 206, 0, None), (None, 200, 0, None), ("bytes=1-2,5-6", 200, 0, None)],
)
def test_range_requests(emu: HubEmulator, hub_root: Path, header: str | None, status: int, start: int,
                        end: int | None) -> None:
    data = (hub_root / "acme/base/model.safetensors").read_bytes()
    response, body = raw(emu, "GET", "/acme/base/resolve/main/model.safetensors", {"Range": header} if header else {})
    expected = data[start:end]
    assert response.status == status and body == expected
    assert response.headers["Content-Length"] == str(len(expected)) and response.headers["Accept-Ranges"] == "bytes"
    redirect, _ = raw(emu, "GET", "/acme/base/resolve/main/model.safetensors", {"Range": header} if header else {},
                      follow=False)  # the file's metadata is on the Hub's 302, the bytes on the CDN's answer
    assert redirect.status == 302 and len(redirect.headers["X-Repo-Commit"]) == 40
    assert redirect.headers["X-Linked-Size"] == str(len(data))
    if status == 206:
        first = start % len(data)
        assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"


def test_unsatisfiable_range_is_416(emu: HubEmulator, hub_root: Path) -> None:
    size = (hub_root / "acme/base/model.safetensors").stat().st_size
    response, _ = raw(emu, "GET", "/acme/base/resolve/main/model.safetensors", {"Range": f"bytes={size}-"})
    assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{size}"
    assert parse_range("bytes=-0", size) == "unsatisfiable" and parse_range("bytes=9-3", size) is None


@given(size=st.integers(0, 500), a=st.integers(0, 600), b=st.integers(0, 600), suffix=st.booleans(),
       open_end=st.booleans())
def test_parse_range_matches_python_slicing(size: int, a: int, b: int, suffix: bool, open_end: bool) -> None:
    data = bytes(range(256)) * 2
    data = data[:size]
    header = f"bytes=-{a}" if suffix else f"bytes={a}-" if open_end else f"bytes={a}-{b}"
    span = parse_range(header, size)
    if span == "unsatisfiable":
        assert (suffix and (a == 0 or size == 0)) or (not suffix and a >= size)
    elif span is None:
        assert not suffix and not open_end and b < a  # only an inverted range is ignored
    else:
        start, end = span  # type: ignore[misc]
        expected = data[-a:] if suffix else data[a:] if open_end else data[a:b + 1]  # inclusive end
        assert data[start:end] == expected and 0 <= start < end <= size


_SHARD = VirtualRepo("v/x", Lineage(LAYOUTS["llama-2-7b"], 3).child(4, 0.1), created_at=T0,
                     parent="v/p").files["model-00002-of-00002.safetensors"]


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, _SHARD.size - 1), length=st.integers(1, 150_000), cut=st.floats(0, 1))
def test_virtual_bytes_do_not_depend_on_how_a_range_is_cut(start: int, length: int, cut: float) -> None:
    whole = _SHARD.read(start, length)
    assert len(whole) == min(length, _SHARD.size - start)
    k = int(len(whole) * cut)
    assert whole == _SHARD.read(start, k) + _SHARD.read(start + k, len(whole) - k)


def test_header_of_exactly_100000_bytes_needs_one_read(emu: HubEmulator, hub_root: Path) -> None:
    meta = HfApi(endpoint=emu.url).get_safetensors_metadata("acme/edge")
    assert meta.files_metadata["model.safetensors"].tensors["x"].shape == [16]
    reads = [r for r in emu.requests() if r.method == "GET" and r.path.endswith("model.safetensors")]
    assert [(r.origin, r.range, r.status, r.bytes_sent) for r in reads] == [
        ("hub", "bytes=0-100000", 302, 0), ("cdn", "bytes=0-100000", 206, 100_001)]


def test_header_over_100000_bytes_is_read_in_two(fresh: HubEmulator) -> None:
    edge_file(fresh.root / "acme/edge/model.safetensors", prefix=100_016)
    meta = HfApi(endpoint=fresh.url).get_safetensors_metadata("acme/edge")
    assert meta.files_metadata["model.safetensors"].tensors["x"].data_offsets == (0, 64)
    reads = [r.range for r in fresh.requests() if r.method == "GET" and r.origin == "cdn"]
    assert reads == ["bytes=0-100000", "bytes=8-100015"]


@pytest.mark.parametrize(
    "path",
    ["/acme/base/resolve/main/../../hub.json", "/acme/base/resolve/main/%2e%2e/%2e%2e/hub.json",
     "/acme/base/resolve/main/..%2F..%2Fhub.json", "/acme/base/resolve/main//etc/passwd",
     "/acme/base/resolve/main/..%5C..%5Chub.json", "/acme/base/resolve/main/config.json%00",
     "/acme/..%2F..%2F/resolve/main/secret.txt", "/../secret.txt"],
)
def test_path_traversal_never_leaves_the_folder(emu: HubEmulator, hub_root: Path, path: str) -> None:
    (hub_root.parent / "secret.txt").write_text("TOP SECRET")
    response, body = raw(emu, "GET", path)
    assert response.status in (400, 404)
    assert b"TOP SECRET" not in body and b"acme/gated" not in body  # type: ignore[operator]


# -- access ----------------------------------------------------------------------------------------


def test_gated_repo_needs_a_token_for_files(emu: HubEmulator, tmp_path: Path) -> None:
    api = HfApi(endpoint=emu.url)
    assert api.model_info("acme/gated").gated == "manual"  # info is public on the Hub, files are not
    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/gated", "model.safetensors", endpoint=emu.url, cache_dir=tmp_path, token=False)
    with pytest.raises(GatedRepoError):
        api.get_safetensors_metadata("acme/gated")
    hf_hub_download("acme/gated", "README.md", endpoint=emu.url, cache_dir=tmp_path, token=False)
    meta = HfApi(endpoint=emu.url, token="hf_ok").get_safetensors_metadata("acme/gated")
    assert "classifier.bias" in meta.weight_map
    response, _ = raw(emu, "HEAD", "/acme/gated/resolve/main/model.safetensors")
    assert response.status == 401 and response.headers["X-Error-Code"] == "GatedRepo"


def test_configured_token_is_the_only_valid_one(hub_root: Path) -> None:
    with HubEmulator(hub_root, token="s3cret") as emu:
        assert HfApi(endpoint=emu.url, token="s3cret").model_info("acme/private").private is True
        with pytest.raises(HfHubHTTPError) as caught:
            HfApi(endpoint=emu.url, token="wrong").model_info("acme/base")
        assert caught.value.response.status_code == 401
        assert not isinstance(caught.value, RepositoryNotFoundError)  # "Invalid credentials", as on the Hub
        assert all("s3cret" not in json.dumps(r.__dict__) for r in emu.requests())


# -- change while serving --------------------------------------------------------------------------


def test_sha_changes_when_a_file_changes(fresh: HubEmulator) -> None:
    api = HfApi(endpoint=fresh.url)
    before = api.model_info("acme/base").sha
    assert api.model_info("acme/base").sha == before  # stable while nothing changes
    config = fresh.root / "acme/base/config.json"
    stat = config.stat()
    config.write_text(config.read_text().replace('"hidden_size": 8', '"hidden_size": 9'))  # same size
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and same mtime: only the content differs
    after = api.model_info("acme/base").sha
    assert after != before
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/base", revision=before)
    (fresh.root / "acme/base/extra.txt").write_text("x")
    assert api.model_info("acme/base").sha not in (before, after)


def test_repo_added_while_serving_shows_up(fresh: HubEmulator) -> None:
    api = HfApi(endpoint=fresh.url)
    assert "late/comer" not in {m.id for m in api.list_models()}
    _write_repo(fresh.root, "late/comer", card="---\nbase_model: acme/base\n---\n", seed=9)
    listed = list(api.list_models(sort="created_at", expand=["createdAt", "baseModels"]))
    assert listed[0].id == "late/comer"  # no hub.json entry: dated by its files' mtime, i.e. now
    assert api.get_safetensors_metadata("late/comer").files_metadata["model.safetensors"].tensors


# -- virtual models --------------------------------------------------------------------------------


def test_virtual_7b_layout_and_deterministic_bytes(fresh: HubEmulator) -> None:
    emu = fresh
    emu.add_virtual("meta/llama-2-7b", layout="llama-2-7b", seed=1, created_at="2023-07-18T00:00:00.000Z")
    emu.add_virtual("acme/llama-ft", layout="llama-2-7b", seed=2, created_at="2023-08-01T00:00:00.000Z",
                    parent="meta/llama-2-7b")
    api = HfApi(endpoint=emu.url)
    meta = api.get_safetensors_metadata("meta/llama-2-7b")
    assert meta.sharded and sorted(meta.files_metadata) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert len(meta.weight_map) == 291 and meta.parameter_count == {"BF16": 6_738_415_616}
    tensors = {n: t for f in meta.files_metadata.values() for n, t in f.tensors.items()}
    assert tensors["model.layers.10.self_attn.o_proj.weight"].shape == [4096, 4096]
    assert tensors["model.layers.10.mlp.down_proj.weight"].shape == [4096, 11008]
    assert tensors["model.embed_tokens.weight"].shape == [32000, 4096] and tensors["model.norm.weight"].shape == [4096]
    assert api.model_info("acme/llama-ft", expand=["baseModels"]).base_models == {  # type: ignore[list-item]
        "relation": "finetune", "models": [{"id": "meta/llama-2-7b"}]}

    name = "model.layers.10.self_attn.o_proj.weight"
    shard = meta.weight_map[name]
    file_meta = meta.files_metadata[shard]
    header_len = struct.unpack("<Q", _get(emu, f"/meta/llama-2-7b/resolve/main/{shard}", "bytes=0-7"))[0]
    start = 8 + header_len + file_meta.tensors[name].data_offsets[0] + 2 * 4096 * 100  # row 100
    span = f"bytes={start}-{start + 2 * 4096 * 64 - 1}"  # 64 rows, 512 KiB
    parent = _get(emu, f"/meta/llama-2-7b/resolve/main/{shard}", span)
    assert parent == _get(emu, f"/meta/llama-2-7b/resolve/main/{shard}", span)  # deterministic
    values = bf16_to_f32(parent)
    assert values.size == 4096 * 64 and np.isfinite(values).all() and 0.015 < values.std() < 0.035
    child = bf16_to_f32(_get(emu, f"/acme/llama-ft/resolve/main/{shard}", span))
    diff = child - values
    # delta 0.1 of the 0.02 scale, times the module (o_proj 1.4) and layer factors of update model 2
    assert 0.2 * 0.002 < diff.std() < 5 * 0.002


def test_virtual_tiny_layout_is_a_sharded_llama_the_client_reads(fresh: HubEmulator, tmp_path: Path) -> None:
    emu = fresh
    layout = LAYOUTS["llama-tiny"]
    emu.add_virtual("meta/tiny", layout="llama-tiny", seed=1, created_at=T0)
    emu.add_virtual("acme/tiny-ft", layout="llama-tiny", seed=2, created_at="2024-01-02T00:00:00.000Z",
                    parent="meta/tiny")
    api = HfApi(endpoint=emu.url)
    meta = api.get_safetensors_metadata("meta/tiny")
    assert meta.sharded and sorted(meta.files_metadata) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = {n: t for f in meta.files_metadata.values() for n, t in f.tensors.items()}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == dict(layout.tensors())
    assert set(meta.weight_map) == set(tensors) and all(t.dtype == "BF16" for t in tensors.values())
    assert meta.parameter_count == {"BF16": 19_548_416}
    assert set(tensors) < {n for n, _ in LAYOUTS["llama-2-7b"].tensors()}  # 7B's names, 4 of its 32 layers
    config = json.loads(Path(hf_hub_download("meta/tiny", "config.json", endpoint=emu.url,
                                             cache_dir=tmp_path / "cache")).read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["model_type"]) == (256, 4, "llama")

    name = "model.layers.3.self_attn.q_proj.weight"  # 256 x 256, whole
    shard = meta.weight_map[name]
    header_len = struct.unpack("<Q", _get(emu, f"/meta/tiny/resolve/main/{shard}", "bytes=0-7"))[0]
    start = 8 + header_len + meta.files_metadata[shard].tensors[name].data_offsets[0]
    span = f"bytes={start}-{start + 2 * 256 * 256 - 1}"
    values = bf16_to_f32(_get(emu, f"/meta/tiny/resolve/main/{shard}", span))
    assert values.size == 256 * 256 and np.isfinite(values).all() and 0.015 < values.std() < 0.035
    diff = bf16_to_f32(_get(emu, f"/acme/tiny-ft/resolve/main/{shard}", span)) - values
    assert 0.2 * 0.002 < diff.std() < 5 * 0.002  # a child of a tiny root is related to it, as at 7B


def test_virtual_ranges_agree_however_they_are_cut(fresh: HubEmulator) -> None:
    emu = fresh
    emu.add_virtual("meta/cut", layout="llama-2-7b", seed=7, created_at=T0)
    path = "/meta/cut/resolve/main/model-00002-of-00002.safetensors"
    header_len = struct.unpack("<Q", _get(emu, path, "bytes=0-7"))[0]
    header = json.loads(_get(emu, path, f"bytes=8-{7 + header_len}"))
    first = min((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    boundary = 8 + header_len + first[0]  # the end of the first tensor in the file
    a, b, m = boundary - 70_001, boundary + 65_537, boundary + 3  # odd offsets, across blocks and tensors
    whole = _get(emu, path, f"bytes={a}-{b - 1}")
    assert whole == _get(emu, path, f"bytes={a}-{m - 1}") + _get(emu, path, f"bytes={m}-{b - 1}")
    assert len(whole) == b - a
    data_start = 8 + header_len
    prefix = _get(emu, path, f"bytes=0-{data_start + 99}")  # header and the first bytes of data in one read
    assert prefix[8:data_start] == _get(emu, path, f"bytes=8-{data_start - 1}")
    assert prefix[data_start:] == _get(emu, path, f"bytes={data_start}-{data_start + 99}")


def _get(emu: HubEmulator, path: str, span: str) -> bytes:
    response, body = raw(emu, "GET", path, {"Range": span})
    assert response.status == 206 and isinstance(body, bytes)
    return body


# -- faults and the request log --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "502", "503", "504"])
def test_status_faults_fire_count_times(emu: HubEmulator, kind: str) -> None:
    emu.faults.add(kind, "/api/models/acme/*", count=2)
    statuses = [raw(emu, "GET", "/api/models/acme/base")[0].status for _ in range(3)]
    assert statuses == [int(kind), int(kind), 200]
    emu.faults.add(kind, "/api/models/acme/*", count=1)
    assert raw(emu, "GET", "/api/models/other/merge")[0].status == 200  # glob does not match: untouched
    assert raw(emu, "GET", "/api/models/acme/base")[0].status == int(kind)


def test_429_carries_rate_limit_headers_and_the_client_retries(emu: HubEmulator) -> None:
    emu.faults.add("429", "/api/models", count=1, retry=0)
    response, _ = raw(emu, "GET", "/api/models")
    assert response.status == 429
    assert response.headers["RateLimit"] == '"api";r=0;t=0' and response.headers["Retry-After"] == "0"
    emu.faults.add("429", "/api/models", count=1, retry=0)
    assert [m.id for m in HfApi(endpoint=emu.url).list_models(sort="created_at")] == PUBLIC_NEWEST_FIRST
    assert [r.status for r in emu.requests() if r.path == "/api/models"] == [429, 429, 200]


def test_reset_and_truncate_cut_the_body(emu: HubEmulator, hub_root: Path) -> None:
    size = (hub_root / "acme/base/model.safetensors").stat().st_size
    emu.faults.add("reset", "*/model.safetensors", count=1, after=100)
    response, body = raw(emu, "GET", "/acme/base/resolve/main/model.safetensors")
    assert response.status == 200 and isinstance(body, (http.client.IncompleteRead, ConnectionError))
    emu.faults.add("truncate", "*/model.safetensors", count=1, after=50)
    response, body = raw(emu, "GET", "/acme/base/resolve/main/model.safetensors")
    assert response.headers["Content-Length"] == str(size)
    assert isinstance(body, http.client.IncompleteRead) and len(body.partial) == 50
    response, body = raw(emu, "GET", "/acme/base/resolve/main/model.safetensors")
    assert isinstance(body, bytes) and len(body) == size  # count spent: whole again
    # The cut faults skip the bodiless 302s and fire where the bytes flow: on the CDN.
    cdn = [(r.fault, r.bytes_sent) for r in emu.requests() if r.origin == "cdn"]
    assert cdn == [("reset", 100), ("truncate", 50), (None, size)]
    assert {(r.status, r.fault) for r in emu.requests() if r.origin == "hub"} == {(302, None)}


def test_slow_fault_still_answers_and_is_logged(emu: HubEmulator) -> None:
    emu.faults.add("slow", "/api/models/acme/base", count=1, seconds=0.05, method="GET")
    assert raw(emu, "HEAD", "/api/models/acme/base")[0].status == 200  # other method: not slowed
    assert raw(emu, "GET", "/api/models/acme/base")[0].status == 200
    assert [(r.method, r.fault) for r in emu.requests()] == [("HEAD", None), ("GET", "slow")]
    assert emu.faults.pending() == []


def test_request_log_endpoint(emu: HubEmulator) -> None:
    raw(emu, "GET", "/acme/base/resolve/main/model.safetensors", {"Range": "bytes=0-9"})
    _, body = raw(emu, "GET", "/_emulator/requests")
    hub, cdn = json.loads(body)  # type: ignore[arg-type]
    names = ["accept-encoding", "host", "range"]  # http.client's own headers plus ours
    assert hub == {"method": "GET", "path": "/acme/base/resolve/main/model.safetensors", "query": "",
                   "range": "bytes=0-9", "status": 302, "bytes_sent": 0, "fault": None, "origin": "hub",
                   "authorization": False, "header_names": names}
    assert (cdn["origin"], cdn["status"], cdn["bytes_sent"], cdn["range"]) == ("cdn", 206, 10, "bytes=0-9")
    assert emu.bytes_sent == 10
    sha = HfApi(endpoint=emu.url).model_info("acme/base").sha
    assert cdn["path"] == f"/acme/base/resolve/{sha}/model.safetensors" and "Signature=" in cdn["query"]
    assert raw(emu, "DELETE", "/_emulator/requests")[0].status == 200
    assert emu.requests() == [] and emu.bytes_sent == 0


def test_specs_parse_and_bad_ones_say_what_to_do() -> None:
    assert parse_fault_spec("429:/api/models*:count=2:retry=3") == {
        "kind": "429", "path_glob": "/api/models*", "count": 2, "retry": 3}
    assert parse_virtual_spec("llama-2-7b:a/b:seed=3:parent=a/p:created=2024-01-02T03:04:05.000Z") == {
        "layout": "llama-2-7b", "repo_id": "a/b", "seed": 3, "parent": "a/p", "created_at": "2024-01-02T03:04:05.000Z"}
    with pytest.raises(BadInputError, match="use one of"):
        Faults().add("418")
    with pytest.raises(BadInputError, match="llama-2-13b"):
        RepoSource(Path(".")).add_virtual("a/b", layout="gpt-9", seed=0, created_at=T0)
    with pytest.raises(BadInputError, match="registered first"):
        RepoSource(Path(".")).add_virtual("a/b", layout="llama-2-7b", seed=0, created_at=T0, parent="a/p")


def test_broken_hub_json_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "hub.json").write_text(json.dumps({"version": 2, "repos": {}}))
    with pytest.raises(BadInputError, match="version 2"):
        HubEmulator(tmp_path).start()


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_serve_prints_url_and_stops_on_sigterm(hub_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import cli; cli.main()", "hub", "serve", str(hub_root),
         "--virtual", "llama-2-13b:meta/llama-2-13b:seed=4", "--fault", "503:/api/models/acme/base:count=1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        port = urlsplit(url).port
        assert url.startswith("http://127.0.0.1:") and port
        api = HfApi(endpoint=url)
        meta = api.get_safetensors_metadata("meta/llama-2-13b")
        assert len(meta.files_metadata) == 3 and meta.parameter_count == {"BF16": 13_015_864_320}
        with pytest.raises(HfHubHTTPError) as caught:
            api.model_info("acme/base")
        assert caught.value.response.status_code == 503
        assert api.model_info("acme/base").id == "acme/base"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def test_flat_hub_json_is_refused_by_emulator_and_recover(tmp_path: Path) -> None:
    """Regression (issue 11): a flat {"org/name": {"createdAt": ...}} map was silently ignored by the
    emulator, which then dated every repo by its files' mtimes; `index recover` refused the same file."""
    from indexer.lineage.recover import upload_times

    (tmp_path / "hub.json").write_text(json.dumps({"acme/base": {"createdAt": "2024-01-01T00:00:00.000Z"}}))
    with pytest.raises(BadInputError, match="documented form") as emulator:
        HubEmulator(tmp_path).start()
    with pytest.raises(BadInputError, match="documented form") as recover:
        upload_times(tmp_path)
    assert str(tmp_path / "hub.json") in str(emulator.value) and str(tmp_path / "hub.json") in str(recover.value)
