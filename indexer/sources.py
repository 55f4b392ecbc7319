"""Where model weights come from: the Hub over HTTP (`HubSource`) or a local folder (`LocalSource`).

Both hand the crawl the same two things: a `ModelEntry` (what the listing says about a model, never
used for lineage) and a `RepoFiles` (byte sources for its files). Hub bytes are read with HTTP range
requests through `huggingface_hub`'s own HTTP session (`get_session()`), with the headers the client
builds (`build_hf_headers`: user agent and, when a token is set, `Authorization`); the token is never
logged or stored. Retries (429 / 5xx / resets) are `indexer.retry`'s job.

LFS files (every safetensors file) are not served by the Hub itself: `/resolve/` answers `302` to a
signed, expiring URL on a CDN host (cdn-lfs.hf.co, cas-bridge.xethub.hf.co). Reads follow it by hand:
    - the token goes to the Hub endpoint's origin only, never to the CDN (as `huggingface_hub` strips
      `Authorization` on a cross-host redirect);
    - the signed URL is kept per file until its `Expires` (`SignedUrls`), so the second and later range
      reads of a file go straight to the CDN: one Hub call per file, not per read;
    - a CDN `403` on a kept URL (expired, or the signing key rotated) resolves the file again, once.
Each model's requests are counted by host (`Calls`: Hub `/resolve/` hits vs CDN requests).

Remote safetensors files are opened with one request:
    1. GET bytes=0-99999 (the Range end byte is inclusive): the first 100,000 bytes hold the whole header of
       almost every file (huggingface_hub reads the same prefix: "97% of headers are smaller"), and the
       206's Content-Range tells the file size, so no HEAD request is needed.
    2. Only a header larger than that costs a second request, for the rest of it.
Reads that fall inside the prefix are served from it: a model smaller than 100 kB costs one request.

Pickle-only repos (most of the Hub before 2022: `pytorch_model.bin`) are never unpickled. Many carry an open
pull request from the Hub's conversion bot, SFconvertbot ("Adding `safetensors` variant of this model"),
which adds the same weights as safetensors on `refs/pr/<num>`. `HubSource.conversion` finds it as
transformers' auto-conversion does (the bot's open PR of that title, whose parent commit is the repo's
current one: a PR opened before the weights changed holds old weights), and the repo is then read at the
PR's commit while it is recorded under its own. Three API calls per pickle-only repo (discussions,
commits, info); nothing for any other repo.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, urljoin, urlsplit

from errors import (
    BadInputError,
    GatedRepoError,
    HubError,
    RateLimitedError,
    RepoNotFoundError,
    SafetensorsError,
    TransientHubError,
)
from indexer.retry import RetryPolicy, rate_limit_wait, with_retries
from sketches.safetensors import MAX_HEADER_BYTES, ByteSource, FileSource

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8  # range reads of one model in flight at once (HubSource.in_parallel)
PREFIX_BYTES = 100_000  # what huggingface_hub's get_safetensors_metadata fetches first, too
LIST_EXPAND = ["createdAt", "sha", "config", "cardData", "baseModels", "siblings", "safetensors", "gated",
               "private", "library_name", "tags", "pipeline_tag", "lastModified"]
SortKey = Literal["created_at", "last_modified"]
CONVERSION_BOT = "SFconvertbot"
CONVERSION_TITLE = "Adding `safetensors` variant of this model"  # transformers.safetensors_conversion's
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ModelEntry:
    """One model as its source describes it. Declared lineage is recorded for audit, never trusted."""

    repo_id: str
    revision: str  # 40-hex commit sha (Hub) or "local:<hash>"
    files: tuple[str, ...]  # repo-relative paths, sorted
    created_at: datetime | None = None
    last_modified: datetime | None = None
    gated: bool = False
    private: bool = False
    library: str = ""
    pipeline_tag: str = ""
    declared_base_model: str = ""  # ";"-joined when the card lists several (a merge)
    declared_relation: str = ""
    n_parameters: int = 0
    source: str = "local"  # the endpoint URL, or "local"


class RepoFiles(Protocol):
    """Read access to one revision of one repo."""

    entry: ModelEntry

    def open(self, path: str) -> ByteSource:
        """A byte source over one file (a remote open already read its first 100,000 bytes)."""
        ...

    def read_small(self, path: str, *, limit: int) -> bytes:
        """A whole small file (JSON), refusing one over `limit` bytes."""
        ...

    @property
    def bytes_read(self) -> int:
        """Every byte fetched for this repo so far (headers, JSON, tensor blocks)."""
        ...

    @property
    def requests(self) -> int:
        """HTTP requests made for this repo so far (0 for a local folder)."""
        ...


# --- declared metadata -----------------------------------------------------------------------------


def _declared(card: Mapping[str, Any] | None, base_models: Any) -> tuple[str, str]:
    """(base_model, relation) from the card's YAML, else from the Hub's `baseModels` field."""
    card = card or {}
    base = card.get("base_model")
    relation = card.get("base_model_relation") or ""
    if base is None and isinstance(base_models, Mapping):
        base = [m.get("id", "") for m in base_models.get("models") or [] if isinstance(m, Mapping)]
        relation = relation or base_models.get("relation") or ""
    if isinstance(base, list):
        base = ";".join(str(b) for b in base)
    return str(base or ""), str(relation)


def entry_from_info(info: Any, *, source: str) -> ModelEntry:
    """A `huggingface_hub.ModelInfo` (from list_models or model_info) -> ModelEntry."""
    card = info.card_data.to_dict() if info.card_data is not None else None
    base, relation = _declared(card, info.base_models)
    siblings = info.siblings or []
    return ModelEntry(
        repo_id=info.id,
        revision=info.sha or "",
        files=tuple(sorted(s.rfilename for s in siblings)),
        created_at=info.created_at,
        last_modified=info.last_modified,
        gated=bool(info.gated),
        private=bool(info.private),
        library=info.library_name or "",
        pipeline_tag=info.pipeline_tag or "",
        declared_base_model=base,
        declared_relation=relation,
        n_parameters=int(info.safetensors.total) if info.safetensors is not None else 0,
        source=source,
    )


# --- HTTP ------------------------------------------------------------------------------------------


def _raise_for_status(repo_id: str, status: int, headers: Mapping[str, str]) -> None:
    """One place that turns an HTTP status into our errors (never echoing request headers)."""
    if status < 400:
        return
    headers = {k.lower(): v for k, v in headers.items()}
    code = headers.get("x-error-code", "")
    message = headers.get("x-error-message", "") or f"HTTP {status}"
    if status == 429:
        raise RateLimitedError(repo_id, f"http-429: rate limited ({message})", retry_after=rate_limit_wait(headers))
    if status in (401, 403):
        if code == "RepoNotFound":
            raise RepoNotFoundError(repo_id, f"http-{status}: private or missing ({message})", status=status)
        raise GatedRepoError(repo_id, f"http-{status}: gated or private ({message})", status=status)
    if status == 404:
        raise RepoNotFoundError(repo_id, f"http-404: {code or 'not found'} ({message})", status=status)
    if status == 408 or status >= 500:
        raise TransientHubError(repo_id, f"http-{status}: {message}", status=status)
    raise HubError(repo_id, f"http-{status}: {message}", status=status)


def _content_range(repo_id: str, value: str | None) -> tuple[int, int, int]:
    """`bytes a-b/total` -> (a, b + 1, total): the end byte is inclusive on the wire."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None or match.group(3) == "*":
        raise HubError(repo_id, f"bad Content-Range {value!r} on a 206 answer")
    return int(match.group(1)), int(match.group(2)) + 1, int(match.group(3))


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


# --- the CDN redirect ------------------------------------------------------------------------------

_MAX_HUB_REDIRECTS = 5  # redirects that stay on the Hub (a renamed repo costs one); the client allows as few
_UNKNOWN_LIFETIME = 600.0  # seconds a signed URL without a readable expiry is reused before resolving again
_SIGNED_KEPT = 4096  # signed URLs kept: a crawl reads one model's few files, then moves on
_ERROR_BODY_CAP = 64 * 1024  # an error or redirect body is read this far (then dropped) to keep the connection


@dataclass
class Calls:
    """HTTP requests made for one model, by host: Hub `/resolve/` hits (a 302, or a small file's bytes)
    and CDN requests (an LFS file's bytes). The crawl-rate benchmark reports both per model. Counted
    under a lock: a model's range reads run on several threads (`RemoteFile.read_many`)."""

    resolver: int = 0
    cdn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, *, resolver: int = 0, cdn: int = 0) -> None:
        with self._lock:
            self.resolver += resolver
            self.cdn += cdn

    @property
    def total(self) -> int:
        return self.resolver + self.cdn


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port), the default port filled in: what decides whether a URL is the Hub's."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)


def signed_url_expiry(url: str, *, now: float) -> float:
    """When a signed CDN URL stops working (epoch seconds): `Expires=` (cdn-lfs, CloudFront) or
    `X-Amz-Date` + `X-Amz-Expires` (cas-bridge, S3); unreadable -> `now` + 10 minutes."""
    params = dict(parse_qsl(urlsplit(url).query))
    try:
        if "Expires" in params:
            return float(params["Expires"])
        if "X-Amz-Date" in params and "X-Amz-Expires" in params:
            signed = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            return signed.timestamp() + float(params["X-Amz-Expires"])
    except ValueError:
        pass
    return now + _UNKNOWN_LIFETIME


class SignedUrls:
    """Hub file URL -> the signed CDN URL it redirected to, until that URL expires. Thread-safe, bounded
    (least recently used dropped first). The Hub URLs name a commit sha, so a key's bytes never change."""

    def __init__(self, *, clock: Callable[[], float] = time.time, kept: int = _SIGNED_KEPT) -> None:
        self._clock = clock
        self._kept = kept
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str) -> str | None:
        with self._lock:
            hit = self._urls.get(url)
            if hit is None or self._clock() >= hit[1]:
                self._urls.pop(url, None)
                return None
            self._urls.move_to_end(url)
            return hit[0]

    def put(self, url: str, signed: str) -> None:
        with self._lock:
            self._urls[url] = (signed, signed_url_expiry(signed, now=self._clock()))
            self._urls.move_to_end(url)
            while len(self._urls) > self._kept:
                self._urls.popitem(last=False)

    def drop(self, url: str) -> None:
        with self._lock:
            self._urls.pop(url, None)


def _with_range(headers: Mapping[str, str], span: tuple[int, int] | None) -> dict[str, str]:
    out = dict(headers)
    if span is not None:
        out["Range"] = f"bytes={span[0]}-{span[1] - 1}"  # inclusive end byte
    return out


class HubSource:
    """The Hub (or the emulator) at `endpoint`, through the real `huggingface_hub` client."""

    def __init__(self, endpoint: str, *, token: str | None, policy: RetryPolicy | None = None,
                 timeout: float = 60.0, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import build_hf_headers

        self.endpoint = endpoint.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        # token=False, not None, when we have none: never send a token cached on this machine to an
        # endpoint the user did not give it to.
        self.api = HfApi(endpoint=self.endpoint, token=token or False)
        self._headers = build_hf_headers(token=token or False)
        # CDN requests carry no token, and ask for identity encoding: a CDN that compresses may ignore Range
        # (huggingface_hub's http_get says so of CloudFront with Accept-Encoding: gzip).
        self._cdn_headers = {k: v for k, v in build_hf_headers(token=False).items() if k.lower() != "authorization"}
        self._cdn_headers["Accept-Encoding"] = "identity"
        self._hub_origin = origin(self.endpoint)
        self.signed = SignedUrls()
        if concurrency < 1:
            raise BadInputError("concurrency", f"must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def in_parallel(self, jobs: Sequence[Callable[[], bytes]]) -> list[bytes]:
        """Run one model's reads on up to `concurrency` threads, results in order; the first error (in
        order) is raised. One process reading one request at a time is bound by the round trip: a 7B
        model's 34 range reads at 50 ms are 1.7 s (bench/crawl_rate.py). The Hub's rate limits count
        /resolve/ calls, not CDN reads, and parallel reads make no more of either."""
        if self.concurrency == 1 or len(jobs) <= 1:
            return [job() for job in jobs]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="hub-read")
        futures = [self._pool.submit(job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the range-read threads (`in_parallel`); a later read starts them again."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def list_models(self, *, sort: SortKey, filters: Sequence[str] = ()) -> Iterator[ModelEntry]:
        """Newest first (by `sort`); pages are fetched lazily, so stopping early fetches no more."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        listing = self.api.list_models(sort=sort, expand=LIST_EXPAND, filter=list(filters) or None)  # type: ignore[arg-type]
        try:
            for info in listing:
                yield entry_from_info(info, source=self.endpoint)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            hint = " (the token was refused: check HF_TOKEN)" if status == 401 else ""
            raise HubError(None, f"listing failed: HTTP {status}{hint}", status=status) from None
        except httpx2.TransportError as exc:  # the client gave up after its own retries
            raise HubError(None, f"listing failed: {self.endpoint} unreachable ({type(exc).__name__})") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # The client builds ModelInfo from whatever JSON came back: a malformed page (a createdAt that is
            # not a date, an entry that is not an object) raised a bare ValueError/TypeError that killed the
            # crawl untyped (regression: tests/test_reliability_fuzz.py, "createdAt not a date").
            raise HubError(None, f"listing failed: malformed answer from {self.endpoint} ({type(exc).__name__})") from None

    def model_info(self, repo_id: str, *, revision: str | None = None) -> ModelEntry:
        """One model's entry, retried (the client does not retry model_info)."""
        return with_retries(lambda: self._model_info_once(repo_id, revision), what=f"{repo_id} info",
                            policy=self.policy)

    def _model_info_once(self, repo_id: str, revision: str | None) -> ModelEntry:
        info = self._api_once(repo_id, lambda: self.api.model_info(repo_id, revision=revision, expand=LIST_EXPAND))  # type: ignore[arg-type]
        return entry_from_info(info, source=self.endpoint)

    def _api_once(self, repo_id: str, call: Callable[[], Any]) -> Any:
        """One client call about `repo_id`, its HTTP failures turned into our errors (not retried here)."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return call()
        except HfHubHTTPError as exc:
            if exc.response is None:
                raise TransientHubError(repo_id, f"network: {exc}") from None
            _raise_for_status(repo_id, exc.response.status_code, dict(exc.response.headers))
            raise
        except httpx2.TransportError as exc:
            raise TransientHubError(repo_id, f"network: {type(exc).__name__}") from None

    def _api(self, repo_id: str, what: str, call: Callable[[], Any]) -> Any:
        return with_retries(lambda: self._api_once(repo_id, call), what=f"{repo_id} {what}", policy=self.policy)

    def conversion(self, entry: ModelEntry) -> Conversion | None:
        """The conversion bot's open safetensors PR of a pickle-only repo, when it sits on the repo's current
        commit (module docstring); None when there is none. A stale one is logged."""
        discussions = self._api(entry.repo_id, "discussions", lambda: list(self.api.get_repo_discussions(
            entry.repo_id, author=CONVERSION_BOT, discussion_type="pull_request", discussion_status="open")))
        for pr in discussions:
            if not is_conversion_pr(pr.title, pr.author, pr.status, pr.is_pull_request):
                continue
            commits = self._api(entry.repo_id, "commits", lambda ref=pr.git_reference: self.api.list_repo_commits(
                entry.repo_id, revision=ref))
            if len(commits) < 2 or commits[1].commit_id != entry.revision:
                logger.info("%s: %s was opened on an older commit; its weights may not be this revision's",
                            entry.repo_id, pr.git_reference)
                continue
            at_pr = self.model_info(entry.repo_id, revision=commits[0].commit_id)
            return Conversion(pr.git_reference, commits[0].commit_id, at_pr.files)
        return None

    def repo(self, entry: ModelEntry) -> HubRepo:
        return HubRepo(self, entry)

    def url(self, repo_id: str, revision: str, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)

    def get(self, repo_id: str, url: str, *, span: tuple[int, int] | None, limit: int,
            calls: Calls | None = None) -> _Answer:
        """One read of a Hub file URL (optionally `Range: bytes=a-(b-1)`), through the CDN when the Hub
        redirects there, retried; at most `limit` body bytes are read. Requests are counted in `calls`."""
        calls = calls if calls is not None else Calls()
        return with_retries(lambda: self._get_once(repo_id, url, span, limit, calls), what=repo_id,
                            policy=self.policy)

    def _get_once(self, repo_id: str, url: str, span: tuple[int, int] | None, limit: int, calls: Calls) -> _Answer:
        signed = self.signed.get(url)
        answer = self._cdn_read(repo_id, signed, span, limit, calls) if signed is not None else None
        if answer is not None and answer.status == 403:  # expired, or the key was rotated: resolve again, once
            why = answer.headers.get("x-error-message") or "HTTP 403"
            logger.info("%s: the CDN refused a kept signed URL (%s); resolving the file again", repo_id, why)
            self.signed.drop(url)
            answer = None
        if answer is None:
            answer = self._resolve(repo_id, url, span, limit, calls)
        if answer.status != 416:  # 416: an empty file, which the caller handles
            _raise_for_status(repo_id, answer.status, answer.headers)
        return answer

    def _resolve(self, repo_id: str, url: str, span: tuple[int, int] | None, limit: int, calls: Calls) -> _Answer:
        """GET the Hub URL with the token; a redirect off the Hub (the CDN) is followed without it and kept."""
        target = url
        for _ in range(_MAX_HUB_REDIRECTS + 1):
            calls.count(resolver=1)
            answer = self._exchange(repo_id, target, _with_range(self._headers, span), limit)
            location = answer.headers.get("location")
            if not (300 <= answer.status < 400 and location):
                return answer
            target = urljoin(target, location)
            if origin(target) == self._hub_origin:
                continue  # still the Hub (a renamed repo): the token may follow
            self.signed.put(url, target)
            answer = self._cdn_read(repo_id, target, span, limit, calls)
            if answer.status == 403:  # a URL the Hub signed a moment ago: retrying will not help
                self.signed.drop(url)
                why = answer.headers.get("x-error-message") or "no reason given"
                raise HubError(repo_id, f"http-403: the CDN refused a freshly signed URL ({why})", status=403)
            return answer
        raise HubError(repo_id, f"http-{answer.status}: over {_MAX_HUB_REDIRECTS} redirects inside the Hub")

    def _cdn_read(self, repo_id: str, signed: str, span: tuple[int, int] | None, limit: int, calls: Calls) -> _Answer:
        calls.count(cdn=1)
        return self._exchange(repo_id, signed, _with_range(self._cdn_headers, span), limit)

    def _exchange(self, repo_id: str, url: str, headers: Mapping[str, str], limit: int) -> _Answer:
        """One GET, redirects not followed. Only a 2xx body is kept (at most `limit` bytes): errors and
        redirects say what they have to say in their headers. Their (small) bodies are still read, so that
        the connection goes back to the pool: every file's first read is a 302."""
        import httpx2
        from huggingface_hub.utils import get_session

        body = bytearray()
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=False,
                                      timeout=self.timeout) as response:
                status, got = response.status_code, {k.lower(): v for k, v in response.headers.items()}
                cap = limit if 200 <= status < 300 else _ERROR_BODY_CAP
                for chunk in response.iter_bytes():
                    body += chunk
                    # past the cap: a server that ignored Range, stop, do not stream the file. Not at it:
                    # breaking on the last chunk of a range read, before the client has seen the end of the
                    # body, closed the connection -- one new connection per range read (546 connects for
                    # 592 exchanges in a 16-model virtual 7B crawl; a TLS handshake each on the real CDN)
                    if len(body) > cap:
                        break
        except httpx2.TransportError as exc:  # resets, truncated bodies (RemoteProtocolError), timeouts
            raise TransientHubError(repo_id, f"network: {type(exc).__name__}") from None
        return _Answer(status, got, bytes(body[:limit]) if 200 <= status < 300 else b"")


class RemoteFile:
    """A ByteSource over one file of one revision, opened with the 100,000-byte prefix read. Its requests
    are counted in `calls` (a repo passes its own, so they add up per model)."""

    def __init__(self, hub: HubSource, repo_id: str, revision: str, path: str, *, calls: Calls | None = None) -> None:
        self._hub = hub
        self._repo_id = repo_id
        self.name = f"{repo_id}@{revision[:8]}/{path}"
        self._url = hub.url(repo_id, revision, path)
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self.calls = calls if calls is not None else Calls()
        self._prefix, self.size = self._open()

    def _open(self) -> tuple[bytes, int]:
        answer = self._fetch((0, PREFIX_BYTES))
        if answer.status == 416:  # an empty file: nothing is satisfiable
            return b"", 0
        if answer.status == 200:  # Range ignored: the size is the whole body's
            size = int(answer.headers.get("x-linked-size") or answer.headers.get("content-length") or 0)
            return answer.body, size
        start, end, size = _content_range(self._repo_id, answer.headers.get("content-range"))
        if start != 0 or len(answer.body) != end:
            raise TransientHubError(self._repo_id, f"truncated: {len(answer.body)} of {end} prefix bytes came back")
        return answer.body, size

    def _fetch(self, span: tuple[int, int]) -> _Answer:
        answer = self._hub.get(self._repo_id, self._url, span=span, limit=span[1] - span[0], calls=self.calls)
        with self._count_lock:
            self.bytes_read += len(answer.body)
        return answer

    def read(self, start: int, end: int) -> bytes:
        if start < 0 or end < start or end > self.size:
            raise SafetensorsError(self.name, f"bytes [{start}, {end}) outside the file's {self.size}")
        if end <= len(self._prefix):
            return self._prefix[start:end]
        if start < len(self._prefix):  # a header longer than the prefix: fetch only the rest of it
            return self._prefix[start:] + self.read(len(self._prefix), end)
        answer = self._fetch((start, end))
        if answer.status != 206 and not (answer.status == 200 and start == 0):
            raise HubError(self._repo_id, f"the server ignored Range bytes={start}-{end - 1} (HTTP {answer.status})")
        if len(answer.body) != end - start:
            raise TransientHubError(self._repo_id, f"truncated: {len(answer.body)} of {end - start} bytes came back")
        return answer.body

    def read_many(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """`read` of each span, several in flight at once (`HubSource.in_parallel`)."""
        return self._hub.in_parallel([lambda s=s: self.read(*s) for s in spans])


def read_spans(source: ByteSource, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """Bytes of each [start, end) span of one file: in parallel where the source can (a Hub file), one
    after another otherwise (a local file, a replayed recording)."""
    many = getattr(source, "read_many", None)
    return list(many(spans)) if many is not None else [source.read(a, b) for a, b in spans]


def is_conversion_pr(title: str, author: str, status: str, is_pull_request: bool) -> bool:
    """The conversion bot's open safetensors PR (the one transformers' auto-conversion looks for)."""
    return is_pull_request and status == "open" and author == CONVERSION_BOT and title == CONVERSION_TITLE


@dataclass(frozen=True)
class Conversion:
    """Where a pickle-only repo's weights are read as safetensors: a PR's ref, its commit, its files."""

    ref: str
    commit: str
    files: tuple[str, ...]


class HubRepo:
    """RepoFiles over the Hub for one listed revision (files are addressed by its sha: immutable). After
    `convert`, files are read at the conversion PR's commit; `entry` (what is recorded) stays the listed one."""

    def __init__(self, hub: HubSource, entry: ModelEntry) -> None:
        self._hub = hub
        self.entry = entry
        self.revision = entry.revision  # the commit files are read at
        self.weights_from = ""  # a conversion PR's ref, once read from it
        self._opened: list[RemoteFile] = []
        self._small_bytes = 0
        self.calls = Calls()  # this model's requests, every file and retry included

    def convert(self) -> tuple[str, ...] | None:
        """Read from the conversion bot's safetensors PR (HubSource.conversion) from now on: its file list, or
        None when the repo has no such PR on its current commit."""
        found = self._hub.conversion(self.entry)
        if found is None:
            return None
        self.revision, self.weights_from = found.commit, found.ref
        return found.files

    def open(self, path: str) -> ByteSource:
        source = RemoteFile(self._hub, self.entry.repo_id, self.revision, path, calls=self.calls)
        self._opened.append(source)
        return source

    def read_small(self, path: str, *, limit: int) -> bytes:
        url = self._hub.url(self.entry.repo_id, self.revision, path)
        answer = self._hub.get(self.entry.repo_id, url, span=None, limit=limit + 1, calls=self.calls)
        self._small_bytes += len(answer.body)
        if len(answer.body) > limit:
            raise SafetensorsError(f"{self.entry.repo_id}/{path}", f"over the {limit}-byte cap")
        return answer.body

    @property
    def bytes_read(self) -> int:
        return self._small_bytes + sum(f.bytes_read for f in self._opened)

    @property
    def requests(self) -> int:
        return self.calls.total


# --- local folders ---------------------------------------------------------------------------------


def _zoo_root(folder: Path) -> Path | None:
    """The zoo root two levels up (`ROOT/<org>/<name>`) when it holds a hub.json, else None."""
    root = folder.parent.parent
    return root if (root / "hub.json").is_file() else None


def hf_cache_repo_id(folder: Path) -> str | None:
    """`org/name` of a snapshot folder in a huggingface_hub cache (`models--org--name/snapshots/<sha>`),
    else None. The cache spells `/` as `--`, which the Hub forbids inside names."""
    if folder.parent.name != "snapshots":
        return None
    return cache_folder_repo_id(folder.parent.parent.name)


def cache_folder_repo_id(name: str) -> str | None:
    """`org/name` of a cache folder's name (`models--org--name`), else None."""
    if not name.startswith("models--"):
        return None
    parts = name.split("--")[1:]
    return "/".join(parts) if parts and all(parts) else None


def hf_cache_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot a cached repo's `refs/main` names, else its latest-modified snapshot, else None."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name)) \
        if snapshots.is_dir() else []
    return found[-1] if found else None


def local_repo_id(folder: Path) -> str:
    """`org/name` inside a zoo root (a folder whose hub.json lists repos) or a huggingface_hub cache
    snapshot, else `local/<folder name>`."""
    root = _zoo_root(folder)
    if root is not None:
        return folder.relative_to(root).as_posix()
    return hf_cache_repo_id(folder) or f"local/{folder.name}"


def local_conversion(folder: Path, repo_id: str) -> tuple[str, Path] | None:
    """(ref, folder) of a zoo repo's conversion PR as the emulator serves it (hub.json `discussions`, files
    in `.refs/pr/<num>/`), by HubSource.conversion's rule, newest first; None outside a zoo or without one."""
    root = _zoo_root(folder)
    if root is None:
        return None
    from indexer.hub_emulator.repos import PULL_REQUEST_DIR, load_hub_json

    meta = load_hub_json(root / "hub.json").get(repo_id)
    for pr in reversed(meta.discussions if meta is not None else ()):
        if (is_conversion_pr(pr.title, pr.author, pr.status, pr.is_pull_request) and not pr.stale
                and (folder / PULL_REQUEST_DIR / str(pr.num)).is_dir()):
            return pr.ref, folder / PULL_REQUEST_DIR / str(pr.num)
    return None


def local_created_at(folder: Path, repo_id: str | None = None) -> datetime | None:
    """A local repo's upload time from its zoo root's hub.json (None outside a zoo or when not listed)."""
    repo_id = repo_id or local_repo_id(folder)
    root = _zoo_root(folder)
    if root is None:
        return None
    from indexer.hub_emulator.repos import (
        load_hub_json,  # one parser for hub.json everywhere
    )

    meta = load_hub_json(root / "hub.json").get(repo_id)
    raw = meta.created_at if meta is not None else None
    return datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC) if raw else None


def content_revision(folder: Path, files: Sequence[str]) -> str:
    """`local:<32 hex>`: blake2b over every weight file's name, size and bytes (streamed), so a changed
    byte anywhere is a new revision and an unchanged folder is a no-op. Costs one sequential read."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        if not name.endswith((".safetensors", ".json", ".gguf", ".h5", ".msgpack")):  # every weight format read
            continue
        path = folder / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    return f"local:{digest.hexdigest()}"


def declared_bases(entry: ModelEntry) -> tuple[str, ...]:
    """The base models an entry's card declares, in order (`declared_base_model`, ";"-joined)."""
    return tuple(b for b in entry.declared_base_model.split(";") if b)


def local_declared_bases(folder: Path) -> tuple[str, ...]:
    """The base models a local repo's card declares (README.md front matter `base_model`), in order."""
    base, _ = _declared(_card(folder), None)
    return tuple(b for b in base.split(";") if b)


def _card(folder: Path) -> dict[str, Any]:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    import yaml

    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return front if isinstance(front, dict) else {}


class LocalRepo:
    """RepoFiles over a local folder (FileSource: pread, nothing beyond what is asked)."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise BadInputError(str(folder), "not a folder; pass a model repo folder (holding *.safetensors)")
        self.folder = folder.resolve()
        files = tuple(sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.folder).parts)))
        repo_id = local_repo_id(self.folder)
        base, relation = _declared(_card(self.folder), None)
        self.entry = ModelEntry(
            repo_id=repo_id, revision=content_revision(self.folder, files), files=files,
            created_at=local_created_at(self.folder, repo_id), declared_base_model=base, declared_relation=relation,
        )
        self._opened: list[FileSource] = []
        self._small_bytes = 0
        self.weights_from = ""
        self._overlay: Path | None = None  # a conversion PR's folder, laid over the repo's (`convert`)

    def convert(self) -> tuple[str, ...] | None:
        """HubRepo.convert for a zoo folder (`local_conversion`): the PR's files laid over the repo's."""
        found = local_conversion(self.folder, self.entry.repo_id)
        if found is None:
            return None
        self.weights_from, self._overlay = found
        added = (p.relative_to(self._overlay).as_posix() for p in self._overlay.rglob("*") if p.is_file())
        return tuple(sorted(set(self.entry.files) | set(added)))

    def _path(self, path: str) -> Path:
        if self._overlay is not None and (self._overlay / path).is_file():
            return self._overlay / path
        return self.folder / path

    def open(self, path: str) -> ByteSource:
        source = FileSource(self._path(path))
        self._opened.append(source)
        return source

    def read_small(self, path: str, *, limit: int) -> bytes:
        target = self._path(path)
        if target.stat().st_size > limit:
            raise SafetensorsError(str(target), f"over the {limit}-byte cap")
        data = target.read_bytes()
        self._small_bytes += len(data)
        return data

    @property
    def bytes_read(self) -> int:
        return self._small_bytes + sum(f.bytes_read for f in self._opened)

    @property
    def requests(self) -> int:
        return 0

    def close(self) -> None:
        for source in self._opened:
            source.close()


__all__ = ["LIST_EXPAND", "MAX_HEADER_BYTES", "PREFIX_BYTES", "Calls", "HubRepo", "HubSource", "LocalRepo",
           "ModelEntry", "RemoteFile", "RepoFiles", "SignedUrls", "content_revision", "entry_from_info",
           "local_repo_id"]


# --- reachability ---------------------------------------------------------------------------------------------

PROBE_TIMEOUT = 10.0  # seconds: a Hub that cannot answer one listing entry in 10 s is not there


def reachable(endpoint: str, *, token: str | None, policy: RetryPolicy | None = None) -> None:
    """Raise HubError unless the Hub answers one `GET /api/models?limit=1`. Checked before the store is
    opened, so an unreachable endpoint writes nothing (the client's own listing raises a raw transport
    error, after 5 retries). A refused connection fails at once (nothing listens: a wrong URL, not a blip);
    timeouts and 5xx are retried per `policy`."""
    return with_retries(lambda: _probe(endpoint, token), what=f"{endpoint} listing", policy=policy or RetryPolicy())


def _probe(endpoint: str, token: str | None) -> None:
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session

    url = f"{endpoint.rstrip('/')}/api/models"
    try:
        response = get_session().get(url, params={"limit": 1}, headers=build_hf_headers(token=token or False),
                                     timeout=PROBE_TIMEOUT)
    except httpx2.ConnectError as exc:
        why = f"cannot reach {endpoint} ({type(exc).__name__}); check --endpoint or HF_ENDPOINT"
        raise HubError(None, why) from None
    except httpx2.TransportError as exc:
        raise TransientHubError(None, f"network: {endpoint} did not answer ({type(exc).__name__})") from None
    status = response.status_code
    if status == 429 or status >= 500:
        raise TransientHubError(None, f"http-{status}: {endpoint} answered a listing with HTTP {status}", status=status)
    if status >= 400:
        hint = " (the token was refused: check HF_TOKEN)" if status == 401 else ""
        raise HubError(None, f"{endpoint} answered a listing with HTTP {status}{hint}", status=status)
