"""Scale-out of the crawl on a Dask distributed cluster: workers fetch, one process writes.

Per model, steps 1-4 of the crawl (triage, headers, plan, range reads, decode; `indexer.crawl.read_model`)
need nothing but the network, so they run on Dask workers (`fetch_model`). The client, the one process
that holds the store's write lock, consumes the results **in listing order** and applies them through the
unchanged `Indexer.index_model`: rows, tensor cache, the `on_indexed` hook (sketch / lineage) and the
cursor all stay single-writer, so the store is byte-for-byte what a single-process crawl writes.

What a worker returns, and why: a *recording* of every read it made (`Fetched`: the exact bytes of each
header and range read, or the error that read raised, with the network bytes and requests it cost), not
decoded arrays and not Parquet parts.
    1. Raw bytes are what went over the network: at most the byte budget per model (16 MiB by default), half the size
       of the float32 arrays for BF16/F16 weights, so the client <- worker hop costs no more than the Hub hop.
    2. The client replays the recording through the very same `read_model` (`ReplayRepo` is a `RepoFiles`),
       so skip / failure reasons, decoding, the cache and the hook are identical by construction, and
       whatever the lineage step does in `Indexer` needs no second, distributed code path.
    3. Workers writing their own Parquet parts would need the store's lock (one writer) or a merge step,
       and would break the upload-order application the incremental lineage relies on.
The cost: the client decodes again (numpy: 0.18 s for 64 MiB of BF16 on the 2-CPU dev box), next to the cache
writes and the lineage step it does anyway. A worker runs the whole `read_model`, decoding included, so
that its recording holds exactly the reads the client's replay will ask for; its arrays are then dropped.

A worker dying under a fetch (Dask's KilledWorker, a closed connection to a worker) costs only that model:
it is recorded as a transient failure ("network: worker lost: ..."), which keeps the crawl's mark at it, so
the next crawl fetches it again, as after a 5xx. The scheduler going away stops the crawl (ClusterError).

The token never travels with the tasks: each worker reads HF_TOKEN from its own environment (settings),
so it is in no task spec the scheduler holds. Give the workers the same Secret as the client.

Prefetching: `DaskHub` wraps the listing and keeps up to `window` models in flight ahead of the one the
crawl is at (memory on the client: window x byte budget). It fetches only models the store does not
already hold at that revision, and never more than `--limit` allows; a speculative fetch the crawl ends up
not using (past the stop mark) costs reads, never a write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from errors import BadInputError, ClusterError, CrawlStopped, ModelGraphError, NoIndexError, TransientHubError
from indexer.crawl import CrawlOptions, CrawlReport, OnIndexed, ReadAhead, read_model
from indexer.retry import RetryPolicy
from indexer.sources import Calls, HubSource, ModelEntry, RepoFiles, SortKey, read_spans
from settings import load_settings

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds to reach a Dask scheduler before saying it is not there
WINDOW_PER_THREAD = 2  # models in flight per worker thread: one being fetched, one queued behind it


# --- the cluster -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    """Where fetches run: an existing scheduler (`address`, e.g. tcp://host:8786) or a LocalCluster of
    `workers` processes (threads when `processes` is False: tests, and a single small machine)."""

    address: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    processes: bool = True
    timeout: float = CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if (self.address is None) == (self.workers is None):
            raise BadInputError("--dask/--workers", "give exactly one: a scheduler address or a number of workers")
        if self.workers is not None and self.workers < 1:
            raise BadInputError("--workers", f"must be 1 or more, got {self.workers}")


@contextmanager
def connect(spec: ClusterSpec) -> Iterator[Any]:
    """A `distributed.Client` on the spec's cluster, closed (and a LocalCluster stopped) on exit."""
    from distributed import Client, LocalCluster

    if spec.address is not None:
        try:
            client = Client(spec.address, timeout=spec.timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise BadInputError("--dask", f"no Dask scheduler answers at {spec.address} ({type(exc).__name__}); "
                                          f"start one with `dask scheduler` or fix the address") from None
        with client:
            yield client
        return
    cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=spec.threads_per_worker,
                           processes=spec.processes, dashboard_address=None)
    with cluster, Client(cluster, set_as_default=False) as client:
        yield client


# --- on a worker: fetch and record ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Portable:
    """An exception that survives pickling: ours take (thing, reason) in __init__, which pickle cannot
    replay, so keep the class, args and fields and rebuild without calling __init__."""

    cls: type[BaseException]
    args: tuple[Any, ...]
    fields: Mapping[str, Any]

    @classmethod
    def of(cls, exc: BaseException) -> _Portable:
        return cls(type(exc), tuple(exc.args), dict(vars(exc)))

    def revive(self) -> BaseException:
        exc = self.cls.__new__(self.cls)
        exc.args = self.args
        vars(exc).update(self.fields)
        return exc


@dataclass(frozen=True)
class Call:
    """One read a worker made: its result (bytes; the file size for an open) or error, and its cost."""

    result: bytes | int | None
    error: _Portable | None
    bytes_read: int
    requests: int


CallKey = tuple[str, str, int, int]  # ("open", path, 0, 0) | ("read", path, start, end) | ("small", path, limit, 0)


@dataclass(frozen=True)
class Fetched:
    """Everything one worker read for one model, replayable by `ReplayRepo`."""

    entry: ModelEntry
    calls: Mapping[CallKey, Call]
    names: Mapping[str, str]  # file -> the source's name (error messages quote it)
    seconds: float
    worker: str
    resolver_calls: int = 0  # the fetch's requests by host (sources.Calls), for the crawl's per-model counts
    cdn_calls: int = 0


class _RecordingSource:
    def __init__(self, recorder: _Recorder, path: str, inner: Any) -> None:
        self._recorder, self._path, self._inner = recorder, path, inner
        self.name, self.size, self.bytes_read = inner.name, inner.size, 0

    def read(self, start: int, end: int) -> bytes:
        data = self._recorder.call(("read", self._path, start, end), lambda: self._inner.read(start, end))
        self.bytes_read += len(data)
        return data

    def read_many(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """The spans read in parallel (`read_spans`), recorded one key per span for the replay."""
        keys = [("read", self._path, start, end) for start, end in spans]
        data = self._recorder.call_many(keys, lambda: read_spans(self._inner, spans))
        self.bytes_read += sum(len(d) for d in data)
        return data


class _Recorder:
    """A RepoFiles around a HubRepo that keeps every answer (and error) it gives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entry: ModelEntry = inner.entry
        self.calls: dict[CallKey, Call] = {}
        self.names: dict[str, str] = {}
        self.weights_from = ""

    def convert(self) -> tuple[str, ...] | None:
        """HubRepo.convert, recorded with where it left the reads (the PR's ref)."""
        files, self.weights_from = self.call(("convert", "", 0, 0), lambda: (self.inner.convert(), self.inner.weights_from))
        return files

    def call(self, key: CallKey, do: Callable[[], Any]) -> Any:
        before_bytes, before_requests = self.inner.bytes_read, self.inner.requests
        try:
            result = do()
        except Exception as exc:
            self.calls[key] = Call(None, _Portable.of(exc), self.inner.bytes_read - before_bytes,
                                   self.inner.requests - before_requests)
            raise
        kept = result.size if key[0] == "open" else result
        self.calls[key] = Call(kept, None, self.inner.bytes_read - before_bytes, self.inner.requests - before_requests)
        return result

    def call_many(self, keys: Sequence[CallKey], do: Callable[[], list[bytes]]) -> list[bytes]:
        """Reads made together (in parallel): each key keeps its bytes; the group's byte and request counts
        go to its first key, so the replay's sums are the network's. An error is recorded at the first key
        (the replay, reading the keys in order, raises it there)."""
        before_bytes, before_requests = self.inner.bytes_read, self.inner.requests
        try:
            results = do()
        except Exception as exc:
            self.calls[keys[0]] = Call(None, _Portable.of(exc), self.inner.bytes_read - before_bytes,
                                       self.inner.requests - before_requests)
            raise
        for i, (key, result) in enumerate(zip(keys, results, strict=True)):
            spent = (self.inner.bytes_read - before_bytes, self.inner.requests - before_requests) if i == 0 else (0, 0)
            self.calls[key] = Call(result, None, *spent)
        return results

    def open(self, path: str) -> _RecordingSource:
        inner = self.call(("open", path, 0, 0), lambda: self.inner.open(path))
        self.names[path] = inner.name
        return _RecordingSource(self, path, inner)

    def read_small(self, path: str, *, limit: int) -> bytes:
        return self.call(("small", path, limit, 0), lambda: self.inner.read_small(path, limit=limit))

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    @property
    def requests(self) -> int:
        return self.inner.requests


@lru_cache(maxsize=4)
def _worker_hub(endpoint: str, policy: RetryPolicy) -> HubSource:
    # One client (and HTTP connection pool) per worker process; the token from the worker's own environment.
    return HubSource(endpoint, token=load_settings().token, policy=policy)


def fetch_model(entry: ModelEntry, *, endpoint: str, policy: RetryPolicy, budget: int, have_token: bool) -> Fetched:
    """Steps 1-4 of the crawl for one model, on a worker; every read recorded for the client to replay."""
    started = time.perf_counter()
    repo = _worker_hub(endpoint, policy).repo(entry)
    recorder = _Recorder(repo)
    try:
        read_model(recorder, budget=budget, have_token=have_token)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 -- recorded in `calls` or re-derived by the client's replay; classified there
        pass
    return Fetched(entry, dict(recorder.calls), dict(recorder.names), time.perf_counter() - started, _worker_name(),
                   repo.calls.resolver, repo.calls.cdn)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:  # not on a worker (a direct call)
        return "local"


# --- on the client: replay ---------------------------------------------------------------------------------------


class _ReplaySource:
    def __init__(self, repo: ReplayRepo, path: str, size: int) -> None:
        self._repo, self._path = repo, path
        self.name, self.size, self.bytes_read = repo.fetched.names.get(path, path), size, 0

    def read(self, start: int, end: int) -> bytes:
        data: bytes = self._repo.replay(("read", self._path, start, end))
        self.bytes_read += len(data)
        return data


class ReplayRepo:
    """RepoFiles that answers from a worker's recording; byte and request counts advance as they did there."""

    def __init__(self, fetched: Fetched) -> None:
        self.fetched = fetched
        self.entry = fetched.entry
        self._bytes = 0
        self._requests = 0
        self.calls = Calls(fetched.resolver_calls, fetched.cdn_calls)  # what the fetch cost, by host
        self.weights_from = ""

    def convert(self) -> tuple[str, ...] | None:
        files, self.weights_from = self.replay(("convert", "", 0, 0))
        return files  # type: ignore[no-any-return]

    def replay(self, key: CallKey) -> Any:
        call = self.fetched.calls.get(key)
        if call is None:
            raise ModelGraphError(f"{self.entry.repo_id}: the worker did not make the read {key[0]} {key[1]} "
                                  f"[{key[2]}, {key[3]}); do the workers run the same version as the client?")
        self._bytes += call.bytes_read
        self._requests += call.requests
        if call.error is not None:
            raise call.error.revive()
        return call.result

    def open(self, path: str) -> _ReplaySource:
        return _ReplaySource(self, path, self.replay(("open", path, 0, 0)))

    def read_small(self, path: str, *, limit: int) -> bytes:
        data: bytes = self.replay(("small", path, limit, 0))
        return data

    @property
    def bytes_read(self) -> int:
        return self._bytes

    @property
    def requests(self) -> int:
        return self._requests


class _LostRepo:
    """A model whose fetch died with its worker (KilledWorker, a closed worker connection): recorded as a
    transient failure ("network: worker lost: ..."), so the crawl's mark stays at it and the next crawl
    tries it again, as after a 5xx. A dead worker says nothing about the model's content."""

    def __init__(self, entry: ModelEntry, why: str) -> None:
        self.entry, self._why = entry, why
        self.bytes_read = self.requests = 0

    def _lost(self) -> TransientHubError:
        return TransientHubError(self.entry.repo_id, f"network: worker lost: {self._why}")

    def open(self, path: str) -> Any:
        raise self._lost()

    def read_small(self, path: str, *, limit: int) -> bytes:
        raise self._lost()


# --- the Hub, guarded and prefetched --------------------------------------------------------------------------


class StoppableHub(HubSource):
    """HubSource whose listing raises CrawlStopped once `stop` is set. The crawl asks for the next entry only
    after its current model is queued, so a stop lands between models; the crawl's `finally` writes the
    queued rows and no cursor moves (the next crawl passes over what got indexed without a request)."""

    def __init__(self, endpoint: str, *, token: str | None, policy: RetryPolicy | None = None,
                 stop: threading.Event | None = None) -> None:
        super().__init__(endpoint, token=token, policy=policy)
        self.stop = stop or threading.Event()

    def list_models(self, *, sort: SortKey, filters: tuple[str, ...] | list[str] = ()) -> Iterator[ModelEntry]:
        for entry in super().list_models(sort=sort, filters=filters):
            self._check()
            yield entry

    def _check(self) -> None:
        if self.stop.is_set():
            raise CrawlStopped("stopped: the crawl ended after its current model; the next run resumes")


@dataclass
class _Known:
    """What the store already holds, for choosing what to prefetch (`Indexer.is_done`'s rule, read-only)."""

    done: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def read(cls, home: Path, *, have_token: bool) -> _Known:
        from store.tables import read_records

        try:
            records = read_records(home, "models")
        except (NoIndexError, FileNotFoundError):
            return cls()
        return cls({(r.repo_id, r.revision) for r in records if _done(r, have_token=have_token)})


def _done(record: Any, *, have_token: bool) -> bool:
    retry_gated = record.reason.startswith("gated") and have_token  # the user may have accepted its terms since
    return bool(record.status == "indexed" or (record.status == "skipped" and not retry_gated))


class PrefetchHub(StoppableHub):
    """The listing, with the next `window` models' fetches running ahead of the one the crawl is at;
    `repo()` hands the crawl what one fetch gave (`_take`). Subclasses say where fetches run and what
    they give: a read in this process (`ThreadHub`), a recording to replay (`DaskHub`)."""

    def __init__(self, options: CrawlOptions, *, known: _Known, window: int, stop: threading.Event | None = None) -> None:
        super().__init__(options.endpoint, token=options.token, policy=options.policy, stop=stop)
        self.options, self.known, self.window = options, known, window
        self._futures: dict[tuple[str, str], Any] = {}
        self.taken = 0  # repo() calls: models the crawl fetched

    def list_models(self, *, sort: SortKey, filters: tuple[str, ...] | list[str] = ()) -> Iterator[ModelEntry]:
        ahead: deque[ModelEntry] = deque()
        try:
            for entry in HubSource.list_models(self, sort=sort, filters=filters):
                ahead.append(entry)
                self._prefetch(entry)
                if len(ahead) > self.window:
                    self._check()
                    yield ahead.popleft()
            while ahead:
                self._check()
                yield ahead.popleft()
        finally:  # the crawl stopped listing (mark reached, limit, stop): drop what it will not ask for
            for key in [(e.repo_id, e.revision) for e in ahead]:
                if (future := self._futures.pop(key, None)) is not None:
                    future.cancel()

    def _prefetch(self, entry: ModelEntry) -> None:
        key = (entry.repo_id, entry.revision)
        limit = self.options.limit
        if key in self._futures or key in self.known.done or len(entry.revision) != 40:
            return  # a listing without the sha gets it from model_info on the client; fetched on demand then
        if limit is not None and self.taken + len(self._futures) >= limit:
            return
        self._futures[key] = self._submit(entry)

    def repo(self, entry: ModelEntry) -> RepoFiles:  # type: ignore[override]
        self.taken += 1
        key = (entry.repo_id, entry.revision)
        # not prefetched again in this run: the lastModified pass lists it too, and Indexer.is_done passes
        # over it then (one that failed is fetched on demand if the crawl asks for it again)
        self.known.done.add(key)
        future = self._futures.pop(key, None) or self._submit(entry)
        return self._take(entry, future)

    def _submit(self, entry: ModelEntry) -> Any:
        raise NotImplementedError

    def _take(self, entry: ModelEntry, future: Any) -> RepoFiles:
        raise NotImplementedError


class ThreadHub(PrefetchHub):
    """Prefetch in this process: `threads` threads each read one model ahead (`read_model`, its range reads
    in parallel, `HubSource.in_parallel`) while the crawl's thread runs the lineage step on the models
    before it; `repo()` hands the crawl a `ReadAhead` holding the finished read (or its error).

    Why: one process otherwise alternates between waiting on the network (a 7B model's headers and 34
    range reads: 0.68 s at 50 ms a round trip) and the lineage step (about as long), using one core at a
    time (bench/crawl_rate.py). The fetch threads hold the GIL little (sockets, numpy decoding), so the two
    overlap. The crawl still applies models in listing order, with the very read it would have made, so
    the store is what the crawl without prefetch writes. No recording and replay as for Dask workers:
    the read is in this process's memory already."""

    def __init__(self, options: CrawlOptions, *, known: _Known, threads: int, stop: threading.Event | None = None) -> None:
        if threads < 1:
            raise BadInputError("prefetch", f"must be at least 1 thread, got {threads}")
        super().__init__(options, known=known, window=WINDOW_PER_THREAD * threads, stop=stop)
        self.threads = threads
        self._fetchers: ThreadPoolExecutor | None = None

    def _submit(self, entry: ModelEntry) -> Any:
        if self._fetchers is None:
            self._fetchers = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="prefetch")
        repo = HubSource.repo(self, entry)  # the plain read: this hub's own repo() hands out read-aheads
        return ReadAhead(repo, self._fetchers.submit(read_model, repo, budget=self.options.budget,
                                                      have_token=self.options.token is not None))

    def _take(self, entry: ModelEntry, future: Any) -> RepoFiles:
        return future  # type: ignore[no-any-return]  # a ReadAhead: Indexer.index_model takes its read

    def close(self) -> None:
        """Stop the fetch threads (a fetch still running finishes its reads; nothing waits for it)."""
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)
            self._fetchers = None
        super().close()


class DaskHub(PrefetchHub):
    """Prefetch on a Dask cluster: the next `window` models' fetches run on its workers."""

    def __init__(self, options: CrawlOptions, *, client: Any, known: _Known, window: int,
                 stop: threading.Event | None = None) -> None:
        super().__init__(options, known=known, window=window, stop=stop)
        self.client = client
        self.by_worker: dict[str, int] = {}

    def _submit(self, entry: ModelEntry) -> Any:
        return self.client.submit(fetch_model, entry, endpoint=self.endpoint, policy=self.options.policy,
                                  budget=self.options.budget, have_token=self.options.token is not None,
                                  pure=False)

    def _take(self, entry: ModelEntry, future: Any) -> RepoFiles:
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        try:
            fetched: Fetched = future.result()
        except KilledWorker as exc:
            return self._lost(entry, exc)
        except (OSError, TimeoutError, FutureCancelledError) as exc:  # CommClosedError is an OSError
            if self._scheduler_alive(exc):
                return self._lost(entry, exc)  # one worker's connection broke: this fetch only
            raise ClusterError(f"the Dask cluster went away ({type(exc).__name__}: {exc}); rows written so far "
                               f"are kept, the next crawl resumes") from None
        self.by_worker[fetched.worker] = self.by_worker.get(fetched.worker, 0) + 1
        return ReplayRepo(fetched)

    def _lost(self, entry: ModelEntry, exc: BaseException) -> _LostRepo:
        logger.warning("%s: its fetch lost its worker (%s: %s); recorded as a transient failure, retried next "
                       "crawl", entry.repo_id, type(exc).__name__, exc)
        return _LostRepo(entry, f"{type(exc).__name__}: {exc}")

    def _scheduler_alive(self, exc: BaseException) -> bool:
        """The client still talks to the scheduler: the error came from a worker, not from the cluster."""
        if getattr(exc, "reason", None) == "scheduler-connection-lost":  # FutureCancelledError's reason
            return False
        return bool(self.client.status == "running")


# --- the crawl with a given Hub source ----------------------------------------------------------------------------


def crawl_via(home: Path, options: CrawlOptions, *, hub: HubSource, on_indexed: OnIndexed | None = None) -> CrawlReport:
    """`indexer.crawl.crawl` reading through `hub` (a Dask-backed or stoppable source)."""
    from indexer.crawl import crawl

    return crawl(home, options, on_indexed=on_indexed, hub=hub)


def crawl_distributed(home: Path, options: CrawlOptions, *, cluster: ClusterSpec, on_indexed: OnIndexed | None = None,
                      stop: threading.Event | None = None) -> CrawlReport:
    """The crawl with steps 1-4 on the cluster and everything that writes here, in listing order."""
    with connect(cluster) as client:  # an unreachable scheduler fails here, before the store is touched
        threads = sum(client.nthreads().values()) or 1
        hub = DaskHub(options, client=client, known=_Known.read(home, have_token=options.token is not None),
                      window=WINDOW_PER_THREAD * threads, stop=stop)
        report = crawl_via(home, options, hub=hub, on_indexed=on_indexed)
    logger.info("fetches per worker: %s", dict(sorted(hub.by_worker.items())))
    return report


__all__ = ["CallKey", "ClusterError", "ClusterSpec", "CrawlStopped", "DaskHub", "Fetched", "PrefetchHub", "ReplayRepo",
           "StoppableHub", "ThreadHub", "connect", "crawl_distributed", "crawl_via", "fetch_model"]
