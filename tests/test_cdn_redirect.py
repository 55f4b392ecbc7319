"""LFS files served the way huggingface.co serves them: `/resolve/` answers 302 to a signed, expiring URL on a
second origin (the emulator's CDN), and both the real `huggingface_hub` client and our crawler follow it
without ever sending the token there. Everything runs over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url
from safetensors.numpy import save_file

from errors import BadInputError, HubError, SafetensorsError
from indexer.crawl import CrawlOptions, crawl
from indexer.hub_emulator import HubEmulator, emulator_process
from indexer.hub_emulator.emulator import parse_virtual_spec
from indexer.retry import RetryPolicy
from indexer.sources import HubSource, SignedUrls, read_spans, signed_url_expiry

TOKEN = "hf_test_NeverLeavesTheHub_0123456789"
FAST = RetryPolicy(sleep=lambda s: None)
FILE = "model.safetensors"


def _weights(seed: int, width: int = 256) -> dict[str, np.ndarray]:
    """~1 MiB of float32: tensor reads go past the 100,000-byte prefix, so a read costs several CDN requests."""
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.self_attn.{p}_proj.weight": rng.normal(0, 0.02, (width, width)).astype(np.float32)
            for i in range(2) for p in "qk"}


@pytest.fixture()
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    for seed, repo_id in enumerate(["acme/base", "acme/child"]):
        folder = root / repo_id
        folder.mkdir(parents=True)
        save_file(_weights(seed), str(folder / FILE))
        (folder / "config.json").write_text('{"model_type": "llama"}')
    (root / "hub.json").write_text('{"version": 1, "repos": {"acme/base": {"createdAt": "2024-01-01T00:00:00.000Z"},'
                                   ' "acme/child": {"createdAt": "2024-02-01T00:00:00.000Z", "private": true}}}')
    return root


@pytest.fixture()
def emu(hub_root: Path) -> Iterator[HubEmulator]:
    with HubEmulator(hub_root, token=TOKEN) as emulator:  # the Hub accepts exactly this token
        yield emulator


def _cdn(emu: HubEmulator) -> list:
    return [r for r in emu.requests() if r.origin == "cdn"]


def _resolves(emu: HubEmulator, repo_id: str = "acme/base") -> list:
    return [r for r in emu.requests() if r.origin == "hub" and r.path.startswith(f"/{repo_id}/resolve/")]


def _location(emu: HubEmulator, repo_id: str = "acme/base") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    conn.request("HEAD", f"/{repo_id}/resolve/main/{FILE}", headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    conn.close()
    assert response.status == 302
    return response.headers["Location"]


def _cdn_get(location: str, headers: dict[str, str] | None = None, method: str = "GET"
             ) -> tuple[http.client.HTTPResponse, bytes]:
    url = urlsplit(location)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request(method, f"{url.path}?{url.query}", headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def _no_token_anywhere(emu: HubEmulator, caplog: pytest.LogCaptureFixture) -> None:
    cdn = _cdn(emu)
    assert cdn and not any(r.authorization or "authorization" in r.header_names for r in cdn)
    assert all(TOKEN not in repr(r) for r in emu.requests())
    assert all(TOKEN not in record.getMessage() for record in caplog.records) and TOKEN not in caplog.text


# -- the emulator: the Hub's 302 and the CDN's checks -------------------------------------------------------------


def test_hub_redirects_lfs_files_with_their_metadata_and_serves_small_files(emu: HubEmulator, hub_root: Path) -> None:
    data = (hub_root / "acme/base" / FILE).read_bytes()
    meta = get_hf_file_metadata(hf_hub_url("acme/base", FILE, endpoint=emu.url), token=TOKEN)
    assert meta.location.startswith(emu.cdn.url + "/repos/acme/base/")  # type: ignore[union-attr]
    assert meta.size == len(data) and meta.commit_hash == HfApi(endpoint=emu.url).model_info("acme/base").sha
    assert meta.etag == hashlib.sha256(data).hexdigest()  # X-Linked-Etag: the LFS oid
    query = dict(parse_qsl(urlsplit(meta.location).query))
    assert {"Expires", "Signature", "Key-Pair-Id"} <= set(query) and int(query["Expires"]) > time.time() + 3500
    small = hf_hub_url("acme/base", "config.json", endpoint=emu.url)
    assert get_hf_file_metadata(small, token=TOKEN).location == small  # no redirect: the Hub serves it
    assert not _cdn(emu)  # HEAD stops at the cross-host 302, as on the real Hub


def test_cdn_serves_ranges_and_refuses_bad_or_expired_urls(emu: HubEmulator, hub_root: Path) -> None:
    data = (hub_root / "acme/base" / FILE).read_bytes()
    location = _location(emu)
    response, body = _cdn_get(location, {"Range": "bytes=100-199"})
    assert (response.status, body) == (206, data[100:200])
    assert response.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    response, body = _cdn_get(location, {"Range": f"bytes={len(data)}-"})
    assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{len(data)}"
    response, _ = _cdn_get(location, method="HEAD")
    assert response.status == 200 and response.headers["Content-Length"] == str(len(data))
    url = urlsplit(location)
    query = dict(parse_qsl(url.query))
    bad_signature = {**query, "Signature": ("A" if query["Signature"][0] != "A" else "B") + query["Signature"][1:]}
    later = {**query, "Expires": str(int(query["Expires"]) + 3600)}  # a longer life is not for the taking
    for tampered, why in [(f"{url.path}?{urlencode(bad_signature)}", "Signature does not match"),
                          (f"{url.path}?{urlencode(later)}", "Signature does not match"),
                          (f"{url.path.replace('acme/base', 'acme/child')}?{url.query}", "Signature does not match"),
                          (url.path, "not signed")]:
        response, body = _cdn_get(f"http://{url.netloc}{tampered}")
        assert response.status == 403 and b"<Code>AccessDenied</Code>" in body and why.encode() in body, tampered


def test_signed_url_expires_after_its_lifetime(hub_root: Path) -> None:
    with HubEmulator(hub_root, url_ttl=1) as emu:
        location = _location(emu)
        assert _cdn_get(location)[0].status == 200
        time.sleep(2.1)  # Expires is rounded up to a whole second: the URL lives 1 to 2 s
        response, body = _cdn_get(location)
        assert response.status == 403 and b"Request has expired" in body
        assert emu.requests()[-1].fault is None and emu.requests()[-1].status == 403


def test_lifetime_must_be_positive(hub_root: Path) -> None:
    for ttl in (0, -1.0, float("nan")):
        with pytest.raises(BadInputError, match="positive number of seconds"):
            HubEmulator(hub_root, url_ttl=ttl)


def test_latency_delays_every_hub_and_cdn_request_and_must_be_a_time(hub_root: Path) -> None:
    with HubEmulator(hub_root, latency=0.3) as emu:
        location = _location(emu)  # one Hub request (the 302)
        started = time.perf_counter()
        assert _cdn_get(location, {"Range": "bytes=0-9"})[0].status == 206
        assert time.perf_counter() - started >= 0.3  # the CDN pays the round trip too
        assert {r.origin for r in emu.requests()} == {"hub", "cdn"}
    for latency in (-0.1, float("nan")):
        with pytest.raises(BadInputError, match="positive number of seconds"):
            HubEmulator(hub_root, latency=latency)


def test_a_virtual_spec_names_the_kind_of_its_step() -> None:
    args = parse_virtual_spec("llama-tiny:acme/child:seed=2:parent=acme/root:kind=lora-qv")
    assert args["kind"] == "lora-qv" and args["parent"] == "acme/root"
    with pytest.raises(BadInputError, match="kind 'sideways' is not one of"):
        parse_virtual_spec("llama-tiny:acme/child:kind=sideways")


def test_direct_mode_serves_lfs_bytes_from_the_hub(hub_root: Path) -> None:
    with HubEmulator(hub_root, token=TOKEN, redirect=False) as emu:
        hub = HubSource(emu.url, token=TOKEN, policy=FAST)
        repo = hub.repo(hub.model_info("acme/base"))
        source = repo.open(FILE)
        data = (hub_root / "acme/base" / FILE).read_bytes()
        assert source.read(0, source.size) == data
        assert emu.cdn is None and not _cdn(emu) and repo.calls.cdn == 0 and repo.calls.resolver == repo.requests


# -- the real client -------------------------------------------------------------------------------------------------


def test_real_client_follows_the_redirect_without_the_token(emu: HubEmulator, hub_root: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    local = hf_hub_download("acme/child", FILE, endpoint=emu.url, cache_dir=tmp_path, token=TOKEN)  # a private repo
    assert Path(local).read_bytes() == (hub_root / "acme/child" / FILE).read_bytes()
    meta = HfApi(endpoint=emu.url, token=TOKEN).get_safetensors_metadata("acme/child")  # Range reads, redirected
    assert sorted(meta.files_metadata[FILE].tensors) == sorted(_weights(1))
    assert {r.authorization for r in _resolves(emu, "acme/child")} == {True}  # the Hub got the token...
    _no_token_anywhere(emu, caplog)  # ...the CDN never did, and no log line holds it


# -- our crawler ---------------------------------------------------------------------------------------------------


def test_crawler_range_reads_cross_the_redirect(emu: HubEmulator, hub_root: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = (hub_root / "acme/child" / FILE).read_bytes()
    hub = HubSource(emu.url, token=TOKEN, policy=FAST)
    repo = hub.repo(hub.model_info("acme/child"))
    source = repo.open(FILE)  # the 100,000-byte prefix: one Hub call (302), one CDN read
    spans = [(0, 8), (150_000, 150_100), (len(data) - 1000, len(data)), (99_990, 100_010)]
    assert [source.read(a, b) for a, b in spans] == [data[a:b] for a, b in spans]
    # The signed URL is kept for the file: every later read goes straight to the CDN.
    assert (repo.calls.resolver, repo.calls.cdn) == (1, 4) and repo.requests == 5
    assert len(_resolves(emu, "acme/child")) == 1 and len(_cdn(emu)) == 4
    assert repo.read_small("config.json", limit=1000) == b'{"model_type": "llama"}'  # small: from the Hub, 200
    assert (repo.calls.resolver, repo.calls.cdn) == (2, 4)
    _no_token_anywhere(emu, caplog)


def test_a_files_range_reads_run_in_parallel_and_count_as_one_by_one(hub_root: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = (hub_root / "acme/child" / FILE).read_bytes()
    spans = [(100_000 + 50_000 * i, 100_000 + 50_000 * i + 4096) for i in range(16)]
    with HubEmulator(hub_root, token=TOKEN, latency=0.3) as emu:
        hub = HubSource(emu.url, token=TOKEN, policy=FAST, concurrency=8)
        repo = hub.repo(hub.model_info("acme/child"))
        source = repo.open(FILE)
        started = time.perf_counter()
        assert read_spans(source, spans) == [data[a:b] for a, b in spans]
        seconds = time.perf_counter() - started
        # 16 reads at 0.3 s one after another would take 4.8 s; 8 at a time, two rounds
        assert seconds < 2.4, seconds
        assert (repo.calls.resolver, repo.calls.cdn) == (1, 17) and repo.bytes_read == 100_000 + 16 * 4096
        assert len(_cdn(emu)) == 17
        _no_token_anywhere(emu, caplog)


def test_a_failed_read_among_parallel_ones_is_retried_or_raised_in_order(emu: HubEmulator, hub_root: Path) -> None:
    data = (hub_root / "acme/base" / FILE).read_bytes()
    hub = HubSource(emu.url, token=TOKEN, policy=FAST, concurrency=4)
    source = hub.repo(hub.model_info("acme/base")).open(FILE)
    emu.faults.add("503", f"/acme/base/resolve/*/{FILE}", count=2)  # on the CDN: retried through the kept URL
    spans = [(200_000 + 1000 * i, 200_000 + 1000 * i + 100) for i in range(6)]
    assert source.read_many(spans) == [data[a:b] for a, b in spans]
    with pytest.raises(SafetensorsError, match="outside the file"):  # the first bad span, in order, is raised
        source.read_many([(0, 8), (len(data), len(data) + 8), (len(data) + 8, len(data) + 9)])
    with pytest.raises(BadInputError, match="concurrency"):
        HubSource(emu.url, token=None, concurrency=0)


def test_expired_url_is_resolved_again(hub_root: Path) -> None:
    with HubEmulator(hub_root, token=TOKEN, url_ttl=1) as emu:
        data = (hub_root / "acme/base" / FILE).read_bytes()
        hub = HubSource(emu.url, token=TOKEN, policy=FAST)
        repo = hub.repo(hub.model_info("acme/base"))
        source = repo.open(FILE)
        time.sleep(2.1)  # past Expires: the crawler sees it and goes back to the Hub, no 403 spent
        assert source.read(200_000, 200_100) == data[200_000:200_100]
        assert (repo.calls.resolver, repo.calls.cdn) == (2, 2)
        assert [r.status for r in _resolves(emu)] == [302, 302] and [r.status for r in _cdn(emu)] == [206, 206]


def test_cdn_403_on_a_kept_url_resolves_once_then_reads(hub_root: Path) -> None:
    with HubEmulator(hub_root, token=TOKEN, url_ttl=1) as emu:
        data = (hub_root / "acme/base" / FILE).read_bytes()
        hub = HubSource(emu.url, token=TOKEN, policy=FAST)
        hub.signed = SignedUrls(clock=lambda: time.time() - 60)  # a crawler clock a minute behind the CDN's
        repo = hub.repo(hub.model_info("acme/base"))
        source = repo.open(FILE)
        time.sleep(2.1)  # expired for the CDN, not yet for the skewed crawler: the CDN says 403
        assert source.read(300_000, 300_064) == data[300_000:300_064]
        assert [(r.origin, r.status) for r in emu.requests() if "/resolve/" in r.path] == [
            ("hub", 302), ("cdn", 206), ("cdn", 403), ("hub", 302), ("cdn", 206)]
        assert (repo.calls.resolver, repo.calls.cdn) == (2, 3)
        assert emu.cdn is not None
        emu.cdn.signer.rotate_key()  # a key-pair rotation refuses every URL handed out before it: the same path
        assert source.read(400_000, 400_004) == data[400_000:400_004]
        assert [r.status for r in emu.requests()][-3:] == [403, 302, 206]


def test_a_freshly_signed_url_refused_is_an_error_not_a_loop(hub_root: Path) -> None:
    with HubEmulator(hub_root, token=TOKEN, url_ttl=1) as emu:
        hub = HubSource(emu.url, token=TOKEN, policy=FAST)
        entry = hub.model_info("acme/base")
        url = hub.url("acme/base", entry.revision, FILE)
        emu.cdn.signer.ttl = -5.0  # type: ignore[union-attr]  # the Hub now signs URLs that are dead on arrival
        with pytest.raises(HubError, match="http-403: the CDN refused a freshly signed URL"):
            hub.get("acme/base", url, span=(0, 10), limit=10)
        assert [(r.origin, r.status) for r in emu.requests() if "/resolve/" in r.path] == [("hub", 302), ("cdn", 403)]


def test_cut_body_on_the_cdn_is_retried_through_the_kept_url(emu: HubEmulator, hub_root: Path) -> None:
    emu.faults.add("truncate", f"/acme/base/resolve/*/{FILE}", count=1, after=10)
    emu.faults.add("503", f"/acme/base/resolve/*/{FILE}", count=1)
    hub = HubSource(emu.url, token=TOKEN, policy=FAST)
    repo = hub.repo(hub.model_info("acme/base"))
    source = repo.open(FILE)
    assert source.read(0, 8) == (hub_root / "acme/base" / FILE).read_bytes()[:8]
    # The 503 hits the first hop met (the Hub); the truncate skips the bodiless 302 and cuts the CDN's body;
    # the retry goes straight back to the CDN with the kept URL.
    assert [(r.origin, r.status, r.fault) for r in emu.requests() if "/resolve/" in r.path] == [
        ("hub", 503, "503"), ("hub", 302, None), ("cdn", 206, "truncate"), ("cdn", 206, None)]
    assert (repo.calls.resolver, repo.calls.cdn) == (2, 2)


def test_crawl_counts_hub_and_cdn_calls_per_model(emu: HubEmulator, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list = []
    options = CrawlOptions(endpoint=emu.url, token=TOKEN, progress=False, policy=FAST, device="cpu")
    report = crawl(tmp_path / "home", options, on_indexed=seen.append)
    assert report.as_dict()["indexed"] == 2  # the private one too: the Hub got the token
    for outcome in report.outcomes:
        assert outcome.resolver_calls >= 1 and outcome.cdn_calls >= 1
        assert outcome.resolver_calls + outcome.cdn_calls == outcome.requests
        hub_hits = _resolves(emu, outcome.repo_id)
        cdn_hits = [r for r in _cdn(emu) if r.path.startswith(f"/{outcome.repo_id}/")]
        assert (len(hub_hits), len(cdn_hits)) == (outcome.resolver_calls, outcome.cdn_calls)
        assert sum(r.bytes_sent for r in hub_hits + cdn_hits) == outcome.bytes_read
    calls = report.as_dict()["calls"]
    assert calls == {"resolver": sum(o.resolver_calls for o in report.outcomes),
                     "cdn": sum(o.cdn_calls for o in report.outcomes)}
    _no_token_anywhere(emu, caplog)


def test_signed_url_expiry_is_read_from_either_form() -> None:
    assert signed_url_expiry("https://cdn-lfs.hf.co/repos/a/b/c?Expires=1700000000&Signature=x", now=0) == 1.7e9
    amz = "https://cas-bridge.xethub.hf.co/x/y?X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=z"
    assert signed_url_expiry(amz, now=0) == 1735693200.0  # 2025-01-01T01:00:00Z
    assert signed_url_expiry("https://cdn.example/x?Expires=soon", now=100.0) == 700.0  # unreadable: 10 minutes


def test_a_hub_on_every_address_redirects_to_the_name_it_was_reached_by(hub_root: Path) -> None:
    with HubEmulator(hub_root, host="0.0.0.0") as emu:  # 0.0.0.0 is where it listens, not where to connect
        location = urlsplit(_location(emu))
        assert (location.hostname, location.port) == ("127.0.0.1", urlsplit(emu.cdn.url).port)  # type: ignore[union-attr]
        assert _cdn_get(location.geturl())[0].status == 200


def test_cli_sets_the_url_lifetime_and_can_serve_directly(hub_root: Path) -> None:
    with emulator_process(hub_root, args=["--url-ttl", "1"]) as url:
        meta = get_hf_file_metadata(hf_hub_url("acme/base", FILE, endpoint=url), token=TOKEN)
        assert urlsplit(meta.location).port != urlsplit(url).port
        assert int(dict(parse_qsl(urlsplit(meta.location).query))["Expires"]) <= time.time() + 2
    with emulator_process(hub_root, args=["--direct"]) as url:
        direct = hf_hub_url("acme/base", FILE, endpoint=url)
        assert get_hf_file_metadata(direct, token=TOKEN).location == direct
