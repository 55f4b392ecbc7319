"""The emulator's CDN: a second loopback origin that serves LFS bytes behind signed, expiring URLs.

huggingface.co never streams an LFS file itself: `/resolve/` answers `302 Found` to `cdn-lfs.hf.co` or
`cas-bridge.xethub.hf.co` with a URL signed for a limited time (`...?Expires=<epoch s>&Signature=...&
Key-Pair-Id=...`; cas-bridge URLs carry `X-Amz-Expires=3600`, an hour). The CDN checks the signature and the
expiry, answers `403` with an XML `AccessDenied` body when either fails, honours `Range` (206 +
Content-Range, 416) and ignores tokens: the client strips `Authorization` on a cross-host redirect.

Our URL: `{cdn}/repos/{org}/{name}/{commit}/{file}?Expires=E&Signature=S&Key-Pair-Id=K`, where
S = base64url(HMAC-SHA256(key, "{decoded path}\\n{E}")). The key is random per emulator; `rotate_key()`
makes a new one (every URL handed out before then is refused, as after a key-pair rotation). The path
names the commit because this emulator keeps only a repo's newest revision: a URL for an older one is a
404 `NoSuchKey`, where the real, content-addressed CDN would still serve it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, urlencode
from xml.sax.saxutils import escape

from errors import BadInputError
from indexer.hub_emulator.server import Reply, _Handler, _Server, bytes_reply

if TYPE_CHECKING:
    from indexer.hub_emulator.emulator import HubEmulator

logger = logging.getLogger(__name__)

DEFAULT_URL_TTL = 3600.0  # seconds a signed URL lives: cas-bridge's X-Amz-Expires=3600
_PREFIX = "/repos/"


def check_ttl(ttl: float) -> float:
    if not ttl > 0 or math.isinf(ttl):
        raise BadInputError(f"url_ttl={ttl!r}", "a signed URL's lifetime must be a positive number of seconds")
    return float(ttl)


class Signer:
    """Signs and checks `(path, expiry)` pairs with one HMAC key; thread-safe."""

    def __init__(self, ttl: float) -> None:
        self.ttl = check_ttl(ttl)
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)

    @property
    def key_id(self) -> str:
        with self._lock:
            return "K" + hashlib.sha256(self._key).hexdigest()[:12].upper()

    def rotate_key(self) -> None:
        with self._lock:
            self._key = secrets.token_bytes(32)

    def signature(self, path: str, expires: int) -> str:
        with self._lock:
            mac = hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def query(self, path: str) -> str:
        # Rounded up to whole seconds, as Expires is on the Hub: a URL lives at least `ttl`, under ttl + 1 s.
        expires = math.ceil(time.time() + self.ttl)
        return urlencode({"Expires": expires, "Signature": self.signature(path, expires), "Key-Pair-Id": self.key_id})

    def refusal(self, path: str, query: str) -> str | None:
        """Why this URL is refused, or None when its signature is good and it has not expired."""
        params = dict(parse_qsl(query, keep_blank_values=True))
        expires, signature = params.get("Expires", ""), params.get("Signature", "")
        if not expires or not signature or "Key-Pair-Id" not in params:
            return "Missing Expires, Signature or Key-Pair-Id query parameter: this URL is not signed"
        if params["Key-Pair-Id"] != self.key_id:
            return f"Unknown Key-Pair-Id {params['Key-Pair-Id']!r}: the signing key was rotated; resolve the file again"
        if not expires.isdigit() or not hmac.compare_digest(signature, self.signature(path, int(expires))):
            return "Signature does not match the path and expiry of this URL"
        if time.time() >= int(expires):
            return f"Request has expired (Expires={expires}); resolve the file again for a fresh URL"
        return None


class Cdn:
    """The CDN origin of one emulator: its own HTTP server on another port, started and stopped with it."""

    def __init__(self, emulator: HubEmulator, *, ttl: float = DEFAULT_URL_TTL) -> None:
        self.signer = Signer(ttl)
        self.url = ""
        self._port = 0
        self._emulator = emulator
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str) -> None:
        self._server = _Server((host, 0), self._emulator, _CdnHandler)
        bound, port = self._server.server_address[:2]
        self._port = int(port)
        self.url = _http_url(str(bound), self._port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"hub-emulator-cdn-{self._port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def signed_url(self, repo_id: str, commit: str, path: str, *, host: str | None = None) -> str:
        """Where the Hub's 302 for `path` of `repo_id` at `commit` points. `host`: the name the client reached
        the Hub by, used when the CDN listens on every address (0.0.0.0 is not a place to connect to)."""
        key = f"{_PREFIX}{repo_id}/{commit}/{path}"
        wildcard = self.url.startswith(("http://0.0.0.0:", "http://[::]:"))
        base = _http_url(host, self._port) if host and wildcard else self.url
        return f"{base}{quote(key, safe='/')}?{self.signer.query(key)}"


def _http_url(host: str, port: int) -> str:
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


def _denied(status: int, code: str, message: str) -> Reply:
    """An S3/CloudFront-style XML error; X-Error-Message repeats it for clients that read headers only."""
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>\n'
    return Reply(status, [("Content-Type", "application/xml"), ("X-Error-Message", message)], body.encode())


def _split(key: str) -> tuple[str, str, str] | None:
    """`/repos/{org}/{name}/{commit}/{file}` -> (repo_id, commit, file), or None when it is not that shape."""
    parts = key[len(_PREFIX):].split("/") if key.startswith(_PREFIX) else []
    if len(parts) < 4 or any(p in ("", ".", "..") for p in parts):
        return None
    return f"{parts[0]}/{parts[1]}", parts[2], "/".join(parts[3:])


class _CdnHandler(_Handler):
    """Serves signed URLs only; shares the emulator's request log and fault rules with the Hub."""

    origin = "cdn"

    def _answer(self, method: str, raw_path: str, query: str) -> tuple[Reply, str]:
        key = unquote(raw_path)
        where = _split(key)
        if where is None:
            return _denied(404, "NoSuchKey", "Not a CDN object path"), key
        repo_id, commit, path = where
        logged = f"/{repo_id}/resolve/{commit}/{path}"
        if method not in ("GET", "HEAD"):
            return _denied(405, "MethodNotAllowed", f"{method} is not served by the CDN"), logged
        cdn = self.server.emulator.cdn
        refusal = cdn.signer.refusal(key, query) if cdn is not None else "The CDN is off"
        if refusal is not None:
            return _denied(403, "AccessDenied", refusal), logged
        try:
            return self._object(repo_id, commit, path), logged
        except Exception:  # a bug or a vanished file must cost one 500, not the connection and the log entry
            logger.exception("internal error serving %s", logged)
            return _denied(500, "InternalError", "internal emulator error"), logged

    def _object(self, repo_id: str, commit: str, path: str) -> Reply:
        repo = self.server.emulator.source.get(repo_id)
        view = repo.at(commit) if repo is not None else None  # main's commit, or a PR's
        blob = view.files.get(path) if view is not None and view.sha == commit else None
        if blob is None:
            return _denied(404, "NoSuchKey", f"{repo_id}@{commit[:12]}/{path} is not stored (any more)")
        filename = path.rpartition("/")[2]
        headers = [("Content-Type", "application/octet-stream"), ("ETag", f'"{blob.sha256()}"'),
                   ("Content-Disposition", f'inline; filename="{filename}"')]
        return bytes_reply(blob, self.headers.get("Range"), headers)

    def _control(self, method: str, path: str) -> Reply:
        return _denied(404, "NoSuchKey", "Not a CDN object path")
