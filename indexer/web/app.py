"""`index web`: a read-only local web app over the store (Starlette + uvicorn, cytoscape.js in the page).

Pages: `/` (overview: families and trees by size, recent arrivals, failures by reason), `/search?prefix=`,
`/family/ORG/NAME` (the family drawn; click a model for its detail). JSON that mirrors the CLI:
`/api/query/ORG/NAME` (`index query --json`), `/api/show/ORG/NAME[?depth=&max_children=&max_nodes=]`
(`index show --format json`), `/api/stats` (`index stats --json`), `/api/search?prefix=`, plus
`/api/detail/ORG/NAME` (the panel) and `/api/overview`. Every asset is served from the package.

Each request reads through `store.graph` / `store.query` on a fresh DuckDB connection, exactly as
`index query` does: no lock, so a crawl writing the store is never blocked. Repo ids and card strings are
untrusted: pages are Jinja2 templates with autoescaping on, the viewer sets text with textContent only,
and a Content-Security-Policy allows scripts from this origin alone (no inline script runs).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from errors import BadInputError, StoreError, UnknownModelError
from indexer.web.render import view_dict
from indexer.web.view import DEFAULT_MAX_CHILDREN, DEFAULT_MAX_NODES, summarise
from store.graph import check_store, family_of, model_detail, overview, require_model, search
from store.layout import TABLES, list_parts
from store.query import query_model, store_stats

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TREES_KEPT = 8
_HEADERS = [  # scripts and styles from this origin only; the page never frames or is framed
    (b"content-security-policy", (b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                  b"img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Adds `_HEADERS` to every response (pure ASGI: no per-request task, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class AnswerCache:
    """JSON answers keyed by the request and the store's listing of parts, least recently used out.

    Parts are immutable and appear whole (`store.tables`), so an unchanged listing means an unchanged
    answer, and any new part (a crawl's write, a compaction) changes the key: nothing stale is served.
    Listing the five table folders costs well under a millisecond; the read it saves, 0.2 s for a small
    tree and 1.6 s for a 50,000-model one on a 1,000,000-model store (bench/RESULTS.md).
    """

    def __init__(self, home: Path, size: int) -> None:
        self.home, self.size = home, size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._computing: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def _listing(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(p.name for _, p in list_parts(self.home, t)) for t in TABLES)

    def get(self, request: Hashable, compute: Callable[[], Any]) -> Any:
        if self.size <= 0:
            return compute()
        key = (self._listing(), request)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            busy = self._computing.setdefault(key, threading.Lock())
        # one computation per key: 20 clients asking for one 50,000-model tree at once read it once
        with busy:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                value = compute()
            except BaseException:  # an error propagates and nothing is kept
                with self._lock:
                    self._computing.pop(key, None)
                raise
            with self._lock:
                self._items[key] = value
                self._computing.pop(key, None)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("indexer.web", "templates"), autoescape=True)
    env.filters["repo_url"] = lambda repo: quote(str(repo), safe="/")  # then autoescaped in the attribute
    env.filters["day"] = lambda moment: moment.date().isoformat() if isinstance(moment, datetime) else "?"
    return env


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode("utf-8")


def _json(obj: object, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


def _cached_json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def _int_arg(request: Request, name: str, default: int | None, *, low: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInputError(name, f"{raw!r} is not a whole number") from None
    if value < low:
        raise BadInputError(name, f"must be {low} or more")
    return value


class WebApp:
    """The routes over one store; every handler is sync, so Starlette runs it in its thread pool."""

    def __init__(self, home: Path, *, cache: int = 256) -> None:
        self.home = Path(home)
        self.env = _templates()
        self.cache = AnswerCache(self.home, cache)
        # whole trees, shared by all their members' answers: a 50,000-model tree is 0.6 s to read, ~30 MB kept
        self.trees = AnswerCache(self.home, min(cache, _TREES_KEPT))

    def answer(self, request: Request, compute: Callable[[], object]) -> Response:
        key = (request.url.path, str(request.query_params))
        return _cached_json(self.cache.get(key, lambda: _dumps(compute())))

    def page(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(home=str(self.home), **context)
        return HTMLResponse(html, status_code=code)

    # --- pages ---------------------------------------------------------------------------------------

    def _overview(self) -> dict[str, Any]:
        return self.cache.get(("overview",), lambda: overview(self.home))  # 2.8 s on a 1,000,000-model store

    def overview_page(self, request: Request) -> Response:
        o = self._overview()
        failed = sum(f["models"] for f in o["failures"])
        return self.page("overview.html", o=o, failed=failed)

    def search_page(self, request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        return self.page("search.html", prefix=prefix, results=search(self.home, prefix))

    def family_page(self, request: Request) -> Response:
        repo = request.path_params["repo"]
        require_model(self.home, repo)  # UnknownModelError -> the 404 page, before any drawing
        return self.page("family.html", repo=repo)

    # --- JSON ----------------------------------------------------------------------------------------

    def api_show(self, request: Request) -> Response:
        depth = _int_arg(request, "depth", None, low=0)
        max_children = _int_arg(request, "max_children", DEFAULT_MAX_CHILDREN, low=1) or 1
        max_nodes = _int_arg(request, "max_nodes", DEFAULT_MAX_NODES, low=1) or 1

        def compute() -> object:
            family = family_of(self.home, request.path_params["repo"], depth=depth, memo=self.trees.get)
            return view_dict(summarise(family, max_children=max_children, max_nodes=max_nodes))

        return self.answer(request, compute)

    def api_query(self, request: Request) -> Response:
        return self.answer(request, lambda: query_model(self.home, request.path_params["repo"]).to_dict())

    def api_detail(self, request: Request) -> Response:
        return self.answer(request, lambda: model_detail(self.home, request.path_params["repo"]))

    def api_stats(self, request: Request) -> Response:
        return _json(store_stats(self.home))

    def api_overview(self, request: Request) -> Response:
        return _json(self._overview())

    def api_search(self, request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        return _json({"prefix": prefix, "results": search(self.home, prefix,
                                                          limit=_int_arg(request, "limit", 50, low=1) or 50)})

    # --- errors --------------------------------------------------------------------------------------

    def error(self, request: Request, exc: Exception) -> Response:
        status, heading = _status_of(exc)
        message = str(exc.detail) if isinstance(exc, HTTPException) else str(exc)
        if request.url.path.startswith("/api/"):
            return _json({"error": message}, status)
        suggestions = exc.suggestions if isinstance(exc, UnknownModelError) else ()
        return self.page("error.html", status, status=status, heading=heading, message=message,
                         suggestions=suggestions)


def _status_of(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, UnknownModelError):
        return 404, "Unknown model"
    if isinstance(exc, HTTPException):
        return exc.status_code, "Not found" if exc.status_code == 404 else "Error"
    if isinstance(exc, BadInputError):
        return 400, "Bad request"
    return 503, "The store cannot be read right now"  # StoreError: e.g. kept changing under the reader


def allowed_hosts(host: str) -> list[str]:
    """Host headers to answer: loopback names when bound to loopback (a DNS-rebinding page gets 400)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return sorted({*LOOPBACK, host, f"[{host}]" if ":" in host else host})


def create_app(home: Path, *, host: str = "127.0.0.1", cache: int = 256) -> Starlette:
    web = WebApp(home, cache=cache)
    routes = [
        Route("/", web.overview_page), Route("/search", web.search_page),
        Route("/family/{repo:path}", web.family_page),
        Route("/api/show/{repo:path}", web.api_show), Route("/api/query/{repo:path}", web.api_query),
        Route("/api/detail/{repo:path}", web.api_detail), Route("/api/stats", web.api_stats),
        Route("/api/overview", web.api_overview), Route("/api/search", web.api_search),
        Mount("/static", StaticFiles(packages=[("indexer.web", "static")]), name="static"),
    ]
    handlers: dict[Any, Any] = {UnknownModelError: web.error, BadInputError: web.error, StoreError: web.error,
                                HTTPException: web.error}
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host)),  # type: ignore[arg-type]
                  Middleware(SecurityHeaders)]  # type: ignore[arg-type]
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error when the port is taken or the address is not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise BadInputError(f"{host}:{port}", f"cannot listen there ({why}); "
                                              f"pick another port with --port, or --port 0 for a free one") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(home: Path, *, host: str = "127.0.0.1", port: int = 8765, cache: int = 256,
          ready: Callable[[str], None] | None = None) -> None:
    """Check the store, bind, report the URL through `ready`, then serve until Ctrl-C or SIGTERM."""
    # 1. the store first: a missing or newer-format store is one line at start-up, not a 503 per page
    check_store(home)
    # 2. bind before starting uvicorn, so a port in use is our one-line error, not a uvicorn log record
    sock = bind(host, port)
    config = uvicorn.Config(create_app(home, host=host, cache=cache), log_level="warning", access_log=False, lifespan="off",
                            server_header=False)
    server = uvicorn.Server(config)
    if ready is not None:
        ready(url_of(sock))  # the socket already listens: a client may connect from now on
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
