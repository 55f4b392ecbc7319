"""HubEmulator: a real HTTP server on 127.0.0.1 that serves a folder of repos like huggingface.co.

    with HubEmulator(tmp_path) as emu:
        api = HfApi(endpoint=emu.url)              # HF_ENDPOINT is read at import time: pass it explicitly
        emu.add_virtual("acme/llama-7b", layout="llama-2-7b", seed=1, created_at="2023-07-18T00:00:00.000Z")
        emu.faults.add("429", "/api/models*", count=1)
        api.list_models(sort="created_at", expand=["sha", "safetensors"])
        emu.requests()                             # what was asked, which ranges, how many bytes went out

LFS files are redirected as on huggingface.co: `/resolve/` answers 302 to a signed URL on a second loopback
origin, the CDN (`emu.cdn.url`, see cdn.py), valid `url_ttl` seconds (default 3600). The CDN's requests join
the same log (`origin="cdn"`, with whether an Authorization header arrived). `redirect=False` serves every
file from the Hub origin directly instead.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType, TracebackType

from errors import BadInputError
from indexer.hub_emulator.cdn import DEFAULT_URL_TTL, Cdn
from indexer.hub_emulator.faults import Faults, parse_fault_spec
from indexer.hub_emulator.repos import RepoSource, check_timestamp
from indexer.hub_emulator.server import DEFAULT_PAGE_SIZE, RequestRecord, _Server
from indexer.hub_emulator.virtual import STEP_KINDS, StepKind

logger = logging.getLogger(__name__)

DEFAULT_VIRTUAL_CREATED_AT = "2023-07-18T00:00:00.000Z"  # the day Llama-2 was published
_MAX_LOG = 100_000  # request records kept (oldest dropped first): bounded memory for long demos
_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # emulator_process: BLAS on one thread


class HubEmulator:
    """A Hub over loopback. Context manager; `start()` binds (port 0 = a free port) and serves in a daemon thread."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, redirect: bool = True, url_ttl: float = DEFAULT_URL_TTL,
                 latency: float = 0.0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise BadInputError(str(root), "is not a folder; create it (it may be empty) or pick another")
        self.root = root
        self.host = host
        self.port = port
        self.token = token or None  # any bearer token is accepted when None
        self.page_size = page_size  # largest listing page (the Hub's is 1000); small values force pagination
        self.source = RepoSource(root)
        self.faults = Faults()
        self.url = ""
        self.cdn = Cdn(self, ttl=url_ttl) if redirect else None  # None: LFS files are served directly
        if not (latency >= 0.0):  # also refuses NaN
            raise BadInputError(f"latency={latency!r}", "must be zero or a positive number of seconds")
        # Seconds every request (Hub and CDN alike, not /_emulator/) waits before its answer: the round trip
        # to the real Hub, which a crawl over loopback would otherwise never pay.
        self.latency = latency
        self._log: list[RequestRecord] = []
        self._bytes_sent = 0
        self._log_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubEmulator:
        if self._server is not None:
            return self
        self.source.all()  # fail here, loudly, on a broken hub.json rather than on the first request
        self._server = _Server((self.host, self.port), self)
        host, port = self._server.server_address[:2]
        self.port = int(port)
        self.url = f"http://{host if ':' not in str(host) else f'[{host}]'}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"hub-emulator-{self.port}", daemon=True)
        self._thread.start()
        if self.cdn is not None:
            self.cdn.start(self.host)
        logger.info("hub emulator serving %s at %s (LFS files: %s)", self.root, self.url,
                    f"302 to {self.cdn.url}" if self.cdn is not None else "served directly")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close_all()
        if self.cdn is not None:
            self.cdn.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        logger.info("hub emulator at %s stopped", self.url)

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- repos -------------------------------------------------------------------------------------

    def add_virtual(self, repo_id: str, *, layout: str, seed: int, created_at: str, parent: str | None = None,
                    delta: float = 0.1, kind: StepKind = "full") -> None:
        """Serve a generated model (a `virtual.LAYOUTS` layout); with `parent`, a fine-tune of it: an update
        of size `delta` and shape `kind` (indexer.hub_emulator.virtual.STEP_KINDS) from `seed`. Register
        parents first."""
        self.source.add_virtual(repo_id, layout=layout, seed=seed, created_at=created_at, parent=parent, delta=delta,
                                kind=kind)

    # -- request log -------------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._log.append(record)
            if len(self._log) > _MAX_LOG:
                del self._log[: len(self._log) - _MAX_LOG]
            self._bytes_sent += record.bytes_sent

    def _amend(self, old: RequestRecord, new: RequestRecord) -> None:
        with self._log_lock:
            for i in range(len(self._log) - 1, -1, -1):
                if self._log[i] is old:
                    self._log[i] = new
                    self._bytes_sent += new.bytes_sent - old.bytes_sent
                    return

    def requests(self) -> list[RequestRecord]:
        """Every answered request so far (oldest first), control endpoints excluded."""
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()
            self._bytes_sent = 0

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent since start (or the last clear_requests)."""
        with self._log_lock:
            return self._bytes_sent


def parse_virtual_spec(spec: str) -> dict[str, object]:
    """'LAYOUT:ORG/NAME[:seed=N][:parent=ORG/NAME][:created=ISO][:delta=F][:kind=K]' -> add_virtual arguments.

    createdAt values contain ':' themselves, so a piece without '=' continues the previous option.
    """
    pieces = spec.split(":")
    if len(pieces) < 2 or "/" not in pieces[1]:
        raise BadInputError(f"--virtual {spec!r}", "expected LAYOUT:ORG/NAME[:seed=N][:parent=ORG/NAME][:created=ISO]")
    options: list[str] = []
    for piece in pieces[2:]:
        if "=" in piece or not options:
            options.append(piece)
        else:
            options[-1] += ":" + piece
    args: dict[str, object] = {"layout": pieces[0], "repo_id": pieces[1], "seed": 0}
    for option in options:
        key, _, value = option.partition("=")
        try:
            if key == "seed":
                args["seed"] = int(value)
            elif key == "delta":
                args["delta"] = float(value)
            elif key == "parent":
                args["parent"] = value
            elif key == "created":
                args["created_at"] = check_timestamp(value, thing=f"--virtual {spec!r}")
            elif key == "kind":
                if value not in STEP_KINDS:
                    raise BadInputError(f"--virtual {spec!r}", f"kind {value!r} is not one of {', '.join(STEP_KINDS)}")
                args["kind"] = value
            else:
                raise BadInputError(f"--virtual {spec!r}",
                                    f"unknown option {key!r} (seed, parent, created, delta, kind)")
        except ValueError:
            raise BadInputError(f"--virtual {spec!r}", f"{key}={value!r} is not a number") from None
    return args


def _day_after(created_at: str) -> str:
    moment = datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(days=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def configure(emu: HubEmulator, *, virtual: Sequence[str] = (), faults: Sequence[str] = ()) -> None:
    """Apply CLI-style --virtual and --fault specs. A child without `created` is dated a day after its parent."""
    created: dict[str, str] = {}
    for spec in virtual:
        args = parse_virtual_spec(spec)
        parent = args.get("parent")
        default = _day_after(created[str(parent)]) if parent in created else DEFAULT_VIRTUAL_CREATED_AT
        args.setdefault("created_at", default)
        created[str(args["repo_id"])] = str(args["created_at"])
        emu.add_virtual(**args)  # type: ignore[arg-type]
    for spec in faults:
        emu.faults.add(**parse_fault_spec(spec))  # type: ignore[arg-type]


def serve_forever(root: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                  virtual: Sequence[str] = (), faults: Sequence[str] = (), page_size: int = DEFAULT_PAGE_SIZE,
                  redirect: bool = True, url_ttl: float = DEFAULT_URL_TTL, latency: float = 0.0,
                  ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; `ready(url)` is called once the socket listens."""
    emu = HubEmulator(root, host=host, port=port, token=token, page_size=page_size, redirect=redirect,
                      url_ttl=url_ttl, latency=latency)
    configure(emu, virtual=virtual, faults=faults)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    emu.start()
    try:
        if ready is not None:
            ready(emu.url)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def emulator_process(root: Path, *, args: Sequence[str] = ()) -> Iterator[str]:
    """`index hub serve ROOT ARGS...` in its own process, yielding its URL; stopped on exit.

    For benchmarks: the emulator's CPU time then stays out of the measured process, as a real Hub's does.
    Its BLAS runs on one thread: a virtual block's low-rank rows are one small product (8 x 32 x 4096 on a
    7B q_proj), which OpenBLAS spreads over threads that then wait for cores the server's request threads
    and the crawler are using. On the busy 2-core box that took 3-8 ms a block instead of 0.25 ms, and made
    a virtual 7B model's 16 MiB cost 2.4 s of generation instead of 0.6 s; the values are the same.
    """
    command = [sys.executable, "-c", "from cli import main; main()", "hub", "serve", str(root), *args]
    env = {**os.environ, **{name: "1" for name in _ONE_THREAD}}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]  # printed once listening
        if not url.startswith("http"):
            raise BadInputError(str(root), f"the emulator did not start (it printed {url!r})")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
