"""The HTTP server: the endpoints `huggingface_hub` (2.4) calls, answered the way huggingface.co answers.

Routes (everything else is a plain 404; {rev} is main, a commit sha, or a PR's `refs/pr/<num>`, URL-encoded):
  GET       /api/models                                     list (sort, limit, expand, search, author, filter, cursor)
  GET       /api/models/{org}/{name}[/revision/{rev}]       model info (expand, blobs)
  GET       /api/models/{org}/{name}/tree/{rev}[/{path}]    file tree (recursive)
  GET       /api/models/{org}/{name}/safetensors-metadata/{index}   every shard header at once
  GET       /api/models/{org}/{name}/discussions            discussions and PRs (type, status, author, p)
  GET       /api/models/{org}/{name}/commits/{rev}          a revision's commits, newest first
  GET|HEAD  /{org}/{name}/resolve/{rev}/{path}              small files: the bytes (Range -> 206);
                                                            LFS files: 302 to a signed CDN URL (see cdn.py)
  GET       /_emulator/requests   DELETE /_emulator/requests   the request log (never faulted, never logged)

Access, as on the Hub: a private repo without a token is a 401 RepoNotFound (it does not exist for
you); a gated repo's info and README are public, its other files are a 401 GatedRepo without a token.
Any non-empty bearer token is valid unless the emulator was given one, then only that one is.

LFS files (`Blob.lfs`: safetensors, pickles, anything of 10 MiB or more, the generated shards) are not
served here but redirected, as huggingface.co does: `302 Found` with `Location` = a signed, expiring URL on
the emulator's CDN origin (another port, its own server: cdn.py), plus `X-Repo-Commit`, `X-Linked-Size`,
`X-Linked-Etag` and `ETag`, which is all `get_hf_file_metadata` reads (it stops at a cross-host redirect).
The 302 has an empty body, so byte counts in the request log are the file bytes only. An emulator made
with `redirect=False` serves every file here directly instead.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from errors import ModelGraphError
from indexer.hub_emulator import info
from indexer.hub_emulator.blobs import Blob, etag_of, git_blob_sha1, iter_chunks, lfs_pointer
from indexer.hub_emulator.faults import CUTS, Fault
from indexer.hub_emulator.repos import Discussion, Repo

if TYPE_CHECKING:
    from indexer.hub_emulator.emulator import HubEmulator

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 1000  # the Hub's largest page for /api/models
DISCUSSIONS_PAGE = 50  # the Hub's page of /discussions
_PUBLIC_WHEN_GATED = frozenset({"README.md", ".gitattributes"})  # readable without accepting the gate
_SORTS = {"createdAt": "created_at", "lastModified": "last_modified", "downloads": None, "likes": None,
          "trendingScore": None, "id": None}


@dataclass(frozen=True)
class RequestRecord:
    """One answered request. `path` is decoded and has no query; `bytes_sent` counts body bytes only.

    `origin` is "hub" or "cdn"; a CDN request is logged under the path of the file it serves
    (`/{repo}/resolve/{commit}/{file}`), so one filter finds both hops of a download. `authorization`
    says whether an Authorization header arrived and `header_names` which headers did (names only: a
    token is never recorded).
    """

    method: str
    path: str
    query: str
    range: str | None
    status: int
    bytes_sent: int
    fault: str | None = None
    origin: str = "hub"
    authorization: bool = False
    header_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reply:
    """A response before it is written: JSON/bytes in `body`, or bytes [start, end) of `blob`."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    blob: Blob | None = None
    start: int = 0
    end: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start if self.blob is not None else len(self.body)


def json_reply(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Reply(status, [("Content-Type", "application/json; charset=utf-8"), *(headers or [])], body)


def error_reply(status: int, message: str, code: str | None = None, *, commit: str | None = None,
                extra: list[tuple[str, str]] | None = None) -> Reply:
    headers = [("X-Error-Message", message), *(extra or [])]
    headers += [("X-Error-Code", code)] if code else []
    headers += [("X-Repo-Commit", commit)] if commit else []
    return json_reply(status, {"error": message}, headers)


def parse_range(value: str | None, size: int) -> tuple[int, int] | None | str:
    """A Range header -> (start, end exclusive); None to serve the whole file; "unsatisfiable" for 416.

    Accepts bytes=a-b (end inclusive, clamped to the file), bytes=a- and bytes=-n. Syntax we do not
    serve (several ranges, other units) is ignored as RFC 9110 allows: the whole file, 200.
    """
    if not value or not value.strip().lower().startswith("bytes=") or "," in value:
        return None
    first, sep, last = value.strip()[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else "unsatisfiable"
        start = int(first)
        end = int(last) + 1 if last != "" else size
    except ValueError:
        return None
    if start < 0 or end <= start and last != "":
        return None  # bytes=5-2 is invalid syntax: ignore it
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


def _encode_cursor(key: str, repo_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([key, repo_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str] | None:
    try:
        key, repo_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        return None
    return (str(key), str(repo_id)) if isinstance(repo_id, str) else None


def _sort_key(repo: Repo, sort: str) -> str:
    """A string that sorts like the field (numbers zero-padded), newest / largest last."""
    if sort == "createdAt":
        return repo.created_at
    if sort == "lastModified":
        return repo.last_modified
    if sort in ("downloads", "likes"):
        return f"{getattr(repo.meta, sort):020d}"
    return ""  # trendingScore is 0 for all: order by id only


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: HubEmulator,
                 handler: type[BaseHTTPRequestHandler] | None = None) -> None:
        self.emulator = emulator
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler or _Handler)

    def close_all(self) -> None:
        """Stop serving and drop the open connections (keep-alive ones would otherwise keep being served)."""
        self.shutdown()
        self.server_close()
        with self.connections_lock:
            live = list(self.open_connections)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _Server
    timeout = 60  # an idle keep-alive connection is dropped after a minute
    origin = "hub"  # what the request log calls this server

    # -- plumbing ----------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the socket was reset on purpose

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # -- one request -------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        emu = self.server.emulator
        raw_path, _, query = self.path.partition("?")
        raw_path = urlsplit(raw_path).path if "://" in raw_path else raw_path  # absolute-form request line
        path = unquote(raw_path)
        self._drain_body()
        if path.startswith("/_emulator/"):
            self._write(method, self._control(method, path))
            return
        if emu.latency > 0:
            time.sleep(emu.latency)  # the network's round trip; the server is threaded, so waits overlap
        reply, logged = self._answer(method, raw_path, query)
        fault = emu.faults.take(method, logged, has_body=reply.length > 0)
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        reply = self._fault_reply(fault) if fault is not None and fault.status else reply
        cut = fault if fault is not None and fault.kind in CUTS else None
        planned = 0 if method == "HEAD" else self._limit(reply, cut)
        # Logged before the first byte goes out: once the client has the whole body, the record exists.
        record = RequestRecord(method, logged, query, self.headers.get("Range"), reply.status, planned,
                               fault.kind if fault else None, self.origin, "Authorization" in self.headers,
                               tuple(sorted({name.lower() for name in self.headers})))
        emu._record(record)
        sent = self._write(method, reply, cut=cut)
        if sent != planned:  # the client hung up early: correct the count
            emu._amend(record, replace(record, bytes_sent=sent))

    def _drain_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= 1024 * 1024:
            self.rfile.read(length)  # keep the keep-alive stream aligned even for requests we refuse

    def _fault_reply(self, fault: Fault) -> Reply:
        if fault.kind == "429":
            headers = [("RateLimit", f'"api";r=0;t={fault.retry}'),
                       ("RateLimit-Policy", '"fixed window";"api";q=500;w=300'), ("Retry-After", str(fault.retry))]
            return error_reply(429, "You have been rate-limited (injected fault).", extra=headers)
        return error_reply(fault.status or 500, f"injected {fault.kind}")

    def _answer(self, method: str, raw_path: str, query: str) -> tuple[Reply, str]:
        """The reply (faults aside) and the path it is logged and matched by (the decoded request path)."""
        return self._route(method, raw_path, query), unquote(raw_path)

    def _route(self, method: str, raw_path: str, query: str) -> Reply:
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        try:
            if method not in ("GET", "HEAD"):
                return error_reply(405, f"{method} is not served by the emulator")
            if parts[:2] == ["api", "models"]:
                return self._api_models(parts[2:], query)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], parts[4:])
            return error_reply(404, "Not Found")
        except ModelGraphError as exc:
            logger.error("cannot serve %s: %s", raw_path, exc)
            return error_reply(500, str(exc))
        except FileNotFoundError:
            return error_reply(404, "Entry not found (it vanished while being served)", "EntryNotFound")
        except Exception:  # a bug must cost one 500, not the connection and the request log entry
            logger.exception("internal error serving %s", raw_path)
            return error_reply(500, "internal emulator error")

    def _api_models(self, rest: list[str], query: str) -> Reply:
        params = parse_qsl(query, keep_blank_values=True)
        if not rest or rest == [""]:
            return self._list(params)
        if len(rest) < 2:
            return error_reply(404, "Not Found")
        repo_id = f"{rest[0]}/{rest[1]}"
        if len(rest) == 2:
            return self._info(repo_id, "main", params)
        if len(rest) == 4 and rest[2] == "revision":
            return self._info(repo_id, rest[3], params)
        if len(rest) >= 4 and rest[2] == "tree":
            return self._tree(repo_id, rest[3], "/".join(rest[4:]), params)
        if len(rest) >= 4 and rest[2] == "safetensors-metadata":
            return self._sharded_headers(repo_id, "/".join(rest[3:]))
        if len(rest) == 3 and rest[2] == "discussions":
            return self._discussions(repo_id, params)
        if len(rest) == 4 and rest[2] == "commits":
            return self._commits(repo_id, rest[3])
        return error_reply(404, "Not Found")

    # -- access ------------------------------------------------------------------------------------

    def _token_state(self) -> str:
        """'none', 'ok' or 'bad' for the Authorization header (the token itself is never logged)."""
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token:
            return "none"
        expected = self.server.emulator.token
        return "ok" if expected is None or hmac.compare_digest(token, expected) else "bad"

    def _open_repo(self, repo_id: str, rev: str, *, path: str | None = None) -> Repo | Reply:
        """The repo at `rev` if this caller may read it (and `path` in it), else the error reply."""
        state = self._token_state()
        if state == "bad":
            return error_reply(401, "Invalid credentials in Authorization header")
        repo = self.server.emulator.source.get(repo_id)
        if repo is None or (repo.meta.private and state != "ok"):
            return error_reply(401 if repo is not None else 404, "Repository not found", "RepoNotFound")
        view = repo.at(rev)
        if view is None:
            return error_reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if path is not None and repo.meta.gated and state != "ok" and path not in _PUBLIC_WHEN_GATED:
            message = (f"Access to model {repo_id} is restricted. You must have access to it and be "
                       "authenticated to access it. Please log in.")
            return error_reply(401, message, "GatedRepo")
        return view

    # -- endpoints ---------------------------------------------------------------------------------

    def _fields(self, params: list[tuple[str, str]], default: tuple[str, ...]) -> tuple[str, ...] | Reply:
        expand = [v for k, v in params if k in ("expand", "expand[]") for v in v.split(",") if v]
        unknown = sorted(set(expand) - info.EXPAND_FIELDS)
        if unknown:
            return error_reply(400, f"Invalid expand value(s): {', '.join(unknown)}")
        if expand:
            return tuple(dict.fromkeys(expand))
        flags = {k for k, v in params if v.lower() in ("true", "1")}
        extra = (("config",) if "config" in flags else ()) + (("cardData",) if "cardData" in flags else ())
        return (info.FULL_FIELDS if "full" in flags else default) + extra

    def _info(self, repo_id: str, rev: str, params: list[tuple[str, str]]) -> Reply:
        repo = self._open_repo(repo_id, rev)
        if isinstance(repo, Reply):
            return repo
        fields = self._fields(params, info.INFO_FIELDS)
        if isinstance(fields, Reply):
            return fields
        blobs = any(k == "blobs" and v.lower() in ("true", "1") for k, v in params)
        return json_reply(200, info.model_json(repo, fields, blobs=blobs))

    def _list(self, params: list[tuple[str, str]]) -> Reply:
        if self._token_state() == "bad":
            return error_reply(401, "Invalid credentials in Authorization header")
        get = dict(params).get
        sort = get("sort") or "createdAt"
        if sort not in _SORTS:
            return error_reply(400, f"Invalid sort: {sort}; use one of {', '.join(_SORTS)}")
        fields = self._fields(params, info.LIST_FIELDS)
        if isinstance(fields, Reply):
            return fields
        try:
            limit = int(get("limit") or DEFAULT_PAGE_SIZE)
        except ValueError:
            return error_reply(400, f"Invalid limit: {get('limit')}")
        page_size = max(1, min(limit, self.server.emulator.page_size))
        repos = self._listed(params, sort)
        cursor = _decode_cursor(get("cursor")) if get("cursor") else None
        if cursor is not None:
            # Strictly after the cursor in (key descending, id ascending) order.
            key, after = cursor
            repos = [r for r in repos if (k := _sort_key(r, sort)) < key or k == key and r.repo_id > after]
        page = repos[:page_size]
        body = [info.model_json(r, fields) for r in page]
        headers = []
        if len(repos) > page_size:
            last = page[-1]
            kept = [(k, v) for k, v in params if k != "cursor"]
            kept.append(("cursor", _encode_cursor(_sort_key(last, sort), last.repo_id)))
            headers.append(("Link", f'<{self._base_url()}/api/models?{urlencode(kept)}>; rel="next"'))
        return json_reply(200, body, headers)

    def _listed(self, params: list[tuple[str, str]], sort: str) -> list[Repo]:
        get = dict(params).get
        filters = [v for k, v in params if k in ("filter", "filter[]") and v]
        gated = {"true": True, "false": False}.get((get("gated") or "").lower())
        authed = self._token_state() == "ok"
        repos = [r for r in self.server.emulator.source.all()
                 if (authed or not r.meta.private)
                 and info.matches(r, search=get("search"), author=get("author"), filters=filters, gated=gated)]
        repos.sort(key=lambda r: r.repo_id)  # ties broken by id, ascending (deterministic)
        repos.sort(key=lambda r: _sort_key(r, sort), reverse=True)  # stable: newest / largest first
        return repos

    def _discussions(self, repo_id: str, params: list[tuple[str, str]]) -> Reply:
        """One page (DISCUSSIONS_PAGE) of a repo's discussions, newest first, as the Hub lists them."""
        repo = self._open_repo(repo_id, "main")
        if isinstance(repo, Reply):
            return repo
        get = dict(params).get
        kind, status, author = get("type") or "all", get("status") or "all", get("author")
        try:
            page = int(get("p") or 0)
        except ValueError:
            return error_reply(400, f"Invalid page: {get('p')}")
        found = [d for d in reversed(repo.meta.discussions)
                 if (kind == "all" or (kind == "pull_request") == d.is_pull_request)
                 and (status == "all" or d.status == status) and (author is None or d.author == author)]
        start = page * DISCUSSIONS_PAGE
        return json_reply(200, {"discussions": [_discussion_json(repo, d) for d in found[start:start + DISCUSSIONS_PAGE]],
                                "count": len(found), "start": start,
                                "numClosedDiscussions": sum(d.status != "open" for d in repo.meta.discussions)})

    def _commits(self, repo_id: str, rev: str) -> Reply:
        """A revision's commits, newest first: main is one upload commit; a PR is its commit on its parent."""
        view = self._open_repo(repo_id, rev)
        if isinstance(view, Reply):
            return view
        if view.pull is None:
            return json_reply(200, [_commit_json(view.sha, "Upload folder", view.author, view.last_modified)])
        return json_reply(200, [_commit_json(view.sha, view.pull.title, view.pull.author, view.last_modified),
                                _commit_json(view.parent, "Upload folder", view.author, view.created_at)])

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.emulator.url

    def _tree(self, repo_id: str, rev: str, prefix: str, params: list[tuple[str, str]]) -> Reply:
        repo = self._open_repo(repo_id, rev)
        if isinstance(repo, Reply):
            return repo
        recursive = any(k == "recursive" and v.lower() in ("true", "1") for k, v in params)
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if base and not any(p.startswith(base) for p in repo.files):
            return error_reply(404, f"{prefix} does not exist on \"{rev}\"", "EntryNotFound", commit=repo.sha)
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in repo.files.items():
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folder = base + rest.split("/", 1)[0]
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0,
                                            "path": folder})
                continue
            entries[path] = _tree_file(path, blob)
        return json_reply(200, [entries[k] for k in sorted(entries)])

    def _sharded_headers(self, repo_id: str, index_path: str) -> Reply:
        """Every shard header of a sharded model on main in one answer (get_sharded_safetensors_metadata)."""
        repo = self._open_repo(repo_id, "main", path=index_path)
        if isinstance(repo, Reply):
            return repo
        index = info.json_file(repo.files.get(index_path))
        if index is None or not isinstance(index.get("weight_map"), dict):
            return error_reply(404, f"{index_path} is not a safetensors index", "EntryNotFound", commit=repo.sha)
        folder = index_path.rpartition("/")[0]
        headers: dict[str, Any] = {}
        for shard in sorted(set(index["weight_map"].values())):
            blob = repo.files.get(f"{folder}/{shard}" if folder else shard)
            header = info.safetensors_header(blob) if blob is not None else None
            if header is None:
                return error_reply(404, f"shard {shard} is missing or not safetensors", "EntryNotFound",
                                   commit=repo.sha)
            headers[shard] = header
        return json_reply(200, {"index": {k: v for k, v in index.items() if k != "weight_map"}, "headers": headers})

    def _resolve(self, repo_id: str, rev: str, path_parts: list[str]) -> Reply:
        path = "/".join(path_parts)
        if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in path.split("/")):
            return error_reply(400, f"Invalid path: {path!r}")
        repo = self._open_repo(repo_id, rev, path=path)
        if isinstance(repo, Reply):
            return repo
        blob = repo.files.get(path)  # only scanned paths are servable: nothing outside the repo folder
        if blob is None:
            return error_reply(404, f"Entry not found: {path}", "EntryNotFound", commit=repo.sha)
        cdn = self.server.emulator.cdn
        if blob.lfs and cdn is not None:
            return _redirect_reply(repo, blob, cdn.signed_url(repo.repo_id, repo.sha, path, host=self._host_name()))
        return _file_reply(repo, blob, self.headers.get("Range"))

    def _host_name(self) -> str | None:
        """The host name in the Host header (no port), None when absent or malformed."""
        try:
            return urlsplit(f"//{self.headers.get('Host', '')}").hostname
        except ValueError:  # e.g. an unclosed "[" of an IPv6 literal
            return None

    def _control(self, method: str, path: str) -> Reply:
        emu = self.server.emulator
        if path == "/_emulator/requests" and method == "GET":
            return json_reply(200, [asdict(r) for r in emu.requests()])
        if path == "/_emulator/requests" and method == "DELETE":
            emu.clear_requests()
            return json_reply(200, {"cleared": True})
        if path == "/_emulator/health":
            return json_reply(200, {"ok": True, "bytes_sent": emu.bytes_sent})
        return error_reply(404, "Not Found")

    # -- writing -----------------------------------------------------------------------------------

    def _write(self, method: str, reply: Reply, *, cut: Fault | None = None) -> int:
        """Send the reply (no body for HEAD), honouring a reset/truncate fault. Returns body bytes sent."""
        if cut is not None and cut.kind == "reset" and method == "HEAD":
            self._reset()
            return 0
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, _header_safe(value))
        self.send_header("Content-Length", str(reply.length))
        self.end_headers()
        if method == "HEAD":
            return 0
        limit = self._limit(reply, cut)
        sent = 0
        try:
            for chunk in self._body(reply):
                chunk = chunk[: limit - sent]
                self.wfile.write(chunk)
                sent += len(chunk)
                if sent >= limit:
                    break
        except OSError as exc:  # the client went away, or the file vanished under us
            logger.debug("body of %s cut after %d bytes: %s", self.path, sent, exc)
            self.close_connection = True  # the stream is out of step: nothing more on this socket
            return sent
        if cut is not None:
            self.wfile.flush()
            self._reset() if cut.kind == "reset" else setattr(self, "close_connection", True)
        return sent

    @staticmethod
    def _limit(reply: Reply, cut: Fault | None) -> int:
        """Body bytes this reply will send: all of them, or what a reset/truncate fault lets through."""
        if cut is None:
            return reply.length
        return min(reply.length, cut.after if cut.after is not None else reply.length // 2)

    def _body(self, reply: Reply) -> Iterator[bytes]:
        if reply.blob is None:
            yield reply.body
        else:
            yield from iter_chunks(reply.blob, reply.start, reply.end)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0 + close), as a dropped CDN connection does."""
        self.close_connection = True
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # rfile holds a reference: without this close() would not really close
            self.connection.close()
        except OSError:
            pass


def _header_safe(value: str) -> str:
    """Header values echo request paths: no CR/LF (header injection), latin-1 only (http.server's rule)."""
    flat = value.replace("\r", " ").replace("\n", " ")
    return flat.encode("latin-1", "replace").decode("latin-1")


def _discussion_json(repo: Repo, d: Discussion) -> dict[str, Any]:
    return {"num": d.num, "title": d.title, "status": d.status, "isPullRequest": d.is_pull_request,
            "createdAt": d.created_at or repo.last_modified, "author": {"name": d.author},
            "repo": {"name": repo.repo_id, "type": "model"}, "pinned": False, "numComments": 1, "topReactions": []}


def _commit_json(sha: str, title: str, author: str, date: str) -> dict[str, Any]:
    return {"id": sha, "title": title, "message": "", "authors": [{"user": author}], "date": date}


def _tree_file(path: str, blob: Blob) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "size": blob.size, "path": path}
    if blob.lfs:
        pointer = lfs_pointer(blob)
        entry["oid"] = git_blob_sha1(pointer)
        entry["lfs"] = {"oid": blob.sha256(), "size": blob.size, "pointerSize": len(pointer)}
    else:
        entry["oid"] = blob.git_sha1()
    return entry


def _linked(repo: Repo, blob: Blob) -> list[tuple[str, str]]:
    """ETag and X-Repo-Commit, plus for LFS files what the Hub adds (the client prefers these over ETag /
    Content-Length, and on a 302 they are all it has: it reads the metadata from the redirect itself)."""
    etag = etag_of(blob)
    headers = [("ETag", f'"{etag}"'), ("X-Repo-Commit", repo.sha)]
    if blob.lfs:
        headers += [("X-Linked-Etag", f'"{etag}"'), ("X-Linked-Size", str(blob.size))]
    return headers


def _redirect_reply(repo: Repo, blob: Blob, location: str) -> Reply:
    """The Hub's answer for an LFS file: 302 to the signed CDN URL, metadata on the redirect, empty body."""
    return Reply(302, [("Location", location), ("Content-Type", "text/plain; charset=utf-8"), *_linked(repo, blob)])


def _file_reply(repo: Repo, blob: Blob, range_header: str | None) -> Reply:
    content_type = "application/octet-stream" if blob.lfs else "text/plain; charset=utf-8"
    return bytes_reply(blob, range_header, [("Content-Type", content_type), *_linked(repo, blob)])


def bytes_reply(blob: Blob, range_header: str | None, headers: list[tuple[str, str]]) -> Reply:
    """A blob's bytes as 200, or 206 + Content-Range for a satisfiable Range, or 416."""
    headers = [*headers, ("Accept-Ranges", "bytes")]
    span = parse_range(range_header, blob.size)
    if span == "unsatisfiable":
        return Reply(416, headers + [("Content-Range", f"bytes */{blob.size}")])
    if span is None:
        return Reply(200, headers, blob=blob, start=0, end=blob.size)
    start, end = span  # type: ignore[misc]
    return Reply(206, headers + [("Content-Range", f"bytes {start}-{end - 1}/{blob.size}")], blob=blob,
                 start=start, end=end)
