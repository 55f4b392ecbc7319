"""`index serve`: the crawl on a schedule (APScheduler 3.x), or once for cron / systemd / Kubernetes.

One cycle (`run_cycle`):
    1. Ask the Hub for one listing entry: an unreachable endpoint is one HubError and nothing is written
       (the store is opened only after this).
    2. Crawl, single-process or with fetches on a Dask cluster (`indexer.distributed`), into the store;
       the store's write lock keeps a second crawler out (StoreLockedError).
    3. Log the summary as one JSON line (logger `indexer.schedule`, level INFO).

Scheduled (`serve`): a `BlockingScheduler` runs the cycle on a crontab in UTC with `max_instances=1`
(a crawl that outlives the interval is not started twice), `coalesce=True` (runs missed while the host
slept collapse into one) and `misfire_grace_time` (a run late by more than that is skipped). A failed
cycle is logged and the service waits for the next one: a Hub outage at 03:00 must not kill a nightly job.
SIGTERM / SIGINT set a stop event that the crawl checks between models: the model in flight is finished,
its rows written, no cursor moves, and the process exits 0. A second `serve` on the same store is refused
at start (a lock held for the daemon's lifetime, `home/.serve/.lock`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from errors import BadInputError, ModelGraphError, StoreLockedError
from indexer.crawl import CrawlOptions, CrawlReport, OnIndexed, default_hub
from errors import CrawlStopped
from indexer.distributed import ClusterSpec, crawl_distributed, crawl_via
from indexer.sources import reachable
from settings import DEFAULT_CRON
from store.lock import WriteLock

logger = logging.getLogger(__name__)

DEFAULT_MISFIRE_GRACE = 6 * 3600  # s: a nightly run up to 6 h late (host asleep, long previous crawl) still runs
SERVE_LOCK_DIR = ".serve"


@dataclass(frozen=True)
class ServeOptions:
    crawl: CrawlOptions
    cron: str = DEFAULT_CRON
    once: bool = False
    run_now: bool = False  # scheduled mode: also run one cycle at start
    misfire_grace: int = DEFAULT_MISFIRE_GRACE
    cluster: ClusterSpec | None = None  # None: fetch in this process


def parse_cron(expr: str) -> Any:
    """A `CronTrigger` (UTC) from five crontab fields, or BadInputError saying what a good one looks like."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        return CronTrigger.from_crontab(expr, timezone=UTC)
    except (ValueError, TypeError) as exc:
        raise BadInputError("--cron", f"{expr!r} is not a crontab expression ({exc}); give five fields "
                                      f"(minute hour day month weekday) in UTC, e.g. '0 3 * * *'") from None


def run_cycle(home: Path, options: ServeOptions, *, stop: threading.Event | None = None,
              on_indexed: OnIndexed | None = None) -> CrawlReport:
    """One crawl (see the module docstring); raises what the crawl raises, CrawlStopped on a stop."""
    stop = stop or threading.Event()
    crawl = options.crawl
    reachable(crawl.endpoint, token=crawl.token, policy=crawl.policy)  # 1. before the store is touched
    if options.cluster is not None:
        return crawl_distributed(home, crawl, cluster=options.cluster, on_indexed=on_indexed, stop=stop)
    hub = default_hub(home, crawl, stop=stop)
    try:
        return crawl_via(home, crawl, hub=hub, on_indexed=on_indexed)
    finally:
        hub.close()


def _log_run(status: str, started: float, **fields: Any) -> None:
    line = {"event": "crawl", "status": status, "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 3), **fields}
    logger.info(json.dumps(line, sort_keys=True, default=str))


def logged_cycle(home: Path, options: ServeOptions, *, stop: threading.Event, on_indexed: OnIndexed | None = None,
                 swallow: bool) -> CrawlReport | None:
    """`run_cycle` with its one JSON summary line; a failure is logged, then raised unless `swallow`."""
    started = time.perf_counter()
    try:
        report = run_cycle(home, options, stop=stop, on_indexed=on_indexed)
    except CrawlStopped:
        _log_run("stopped", started)
        return None
    except ModelGraphError as exc:
        _log_run("locked" if isinstance(exc, StoreLockedError) else "error", started, error=str(exc))
        if not swallow:
            raise
        return None
    except Exception as exc:  # noqa: BLE001 -- a bug in one night's run must not end the service
        logger.exception("crawl cycle crashed")
        _log_run("error", started, error=f"{type(exc).__name__}: {exc}")
        if not swallow:
            raise
        return None
    _log_run("ok", started, **report.as_dict())
    return report


def serve(home: Path, options: ServeOptions, *, stop: threading.Event | None = None,
          on_indexed: OnIndexed | None = None) -> int:
    """Run cycles until stopped (or once with `options.once`); returns the number of cycles run."""
    trigger = parse_cron(options.cron)  # a bad expression fails before anything is written
    if options.crawl.device == "cuda":  # else every model would be recorded failed, one by one, at night
        from sketches.distances import resolve_device

        resolve_device("cuda")
    stop = stop or threading.Event()
    restore = _on_signals(stop.set)  # --once too: systemd and Kubernetes stop a oneshot with SIGTERM
    try:
        if options.once:
            logged_cycle(home, options, stop=stop, on_indexed=on_indexed, swallow=False)
            return 1
        reachable(options.crawl.endpoint, token=options.crawl.token, policy=options.crawl.policy)  # now, not at 3
        if options.cluster is not None and options.cluster.address is not None:
            from indexer.distributed import connect

            with connect(options.cluster):  # an absent scheduler is an error now, not a log line at night
                pass
        with WriteLock(home / SERVE_LOCK_DIR):
            return _scheduled(home, options, trigger, stop=stop, on_indexed=on_indexed)
    finally:
        restore()


def _scheduled(home: Path, options: ServeOptions, trigger: Any, *, stop: threading.Event,
               on_indexed: OnIndexed | None) -> int:
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.blocking import BlockingScheduler

    scheduler = BlockingScheduler(executors={"default": ThreadPoolExecutor(1)}, timezone=UTC)
    busy, runs = threading.Lock(), [0]

    def job() -> None:
        with busy:
            if stop.is_set():  # fired as the stop came in: nothing to start
                return
            runs[0] += 1
            logged_cycle(home, options, stop=stop, on_indexed=on_indexed, swallow=True)

    now = {"next_run_time": datetime.now(UTC)} if options.run_now else {}  # absent: the trigger decides
    scheduler.add_job(job, trigger, id="crawl", max_instances=1, coalesce=True,
                      misfire_grace_time=options.misfire_grace, **now)
    logger.info(json.dumps({"event": "serve", "cron": options.cron, "timezone": "UTC",
                            "next_run": str(now.get("next_run_time")
                                            or trigger.get_next_fire_time(None, datetime.now(UTC)))}))
    threading.Thread(target=_watch, args=(scheduler, stop), daemon=True, name="serve-stop").start()
    scheduler.start()  # blocks until the watcher shuts it down
    with busy:  # the crawl in flight (told to stop) finishes its current model and writes its rows
        pass
    return runs[0]


def _watch(scheduler: Any, stop: threading.Event) -> None:
    # Shut the scheduler down from a thread, not from the signal handler: shutdown takes the scheduler's
    # locks, which the interrupted main thread may hold.
    stop.wait()
    from apscheduler.schedulers import SchedulerNotRunningError

    for _ in range(100):  # the scheduler may still be starting when a stop arrives
        try:
            scheduler.shutdown(wait=False)
            return
        except SchedulerNotRunningError:
            time.sleep(0.05)


def _on_signals(handler: Any) -> Any:
    """Install SIGTERM/SIGINT handlers (main thread only); returns a function that restores the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info(json.dumps({"event": "signal", "signal": signal.Signals(signum).name,
                                "action": "finishing the current model, then exiting"}))
        handler()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


__all__ = ["DEFAULT_MISFIRE_GRACE", "ServeOptions", "logged_cycle", "parse_cron", "run_cycle", "serve"]
