"""End-to-end crawl rate on virtual 7B-layout families against the Hub emulator with network latency
(issue 14 part 4): models/s, MiB read per model, where the time goes, and Hub calls per model, next to
the Hub's published rate limits.

Models: `--n` virtual models of the `--layout` layout (default llama-2-7b: 13.5 GB of BF16 each, only the
planned blocks ever generated) in families of `--family-size`, drawn by `bench/budget_7b.build_family`
(a root, 3 children, grandchildren; step kinds full / lora-qv / lora-all / continued / subres with their
measured sizes), so the lineage step (nominees, exact re-rank, forest) runs as it does on the Hub. The
emulator runs in its own process (`index hub serve --latency S`): every Hub and CDN request waits S
seconds first, and large files are a 302 to the signed CDN URL, as on huggingface.co.

Runs, each on a fresh store: one process for each `--prefetch` value (threads reading the next models
while the lineage step runs, `index crawl --prefetch N`; 0: none), then `--workers` Dask worker processes
for the fetches (`indexer.distributed`, as `index crawl --workers N`). In the one-process runs, timers around our own
functions split the wall time and the crawler's CPU: network (every HTTP exchange of HubSource, latency
included), decode (BF16 -> float32), sketch (`_prepare`), exact step (`measure_many` and the second hop's
`measure`), merge step (`_merges`), the rest of the lineage step (nominees, forest, relations), writes
(Parquet parts, cache drains, lineage flush); "other" is listing, planning, headers and the client.
Calls per model are counted by the crawler per host (`Outcome.resolver_calls`, `.cdn_calls`); API calls
are the model_info calls plus the listing pages (1,000 models a page). Those count a model's own reads;
the lineage step also reads evicted nominees again (`crawl.hub_refetch`), so the one-process run counts
every exchange with the Hub and the CDN too, re-reads included: the figures the rate limits apply to.

CPU. The emulator generates the virtual weights on the same cores, which the real Hub does not cost us,
so the crawler's CPU (this process, plus the Dask worker processes in the workers run) and the emulator
process's CPU are measured apart (psutil, user + system). "models per crawler CPU-second" is the rate the
crawler alone could reach on one core: the figure to hold against the Hub's limits. `--threads N` is the
crawl's own option (`index crawl --threads`, default settings.DEFAULT_THREADS = 1): torch's, BLAS's and
OpenMP's pools at N threads in the crawling process (the Dask workers keep their defaults).

    .venv/bin/python bench/crawl_rate.py [--n 1000] [--family-size 20] [--latency 0.05] [--workers 2] [--prefetch 0,2]
        [--budget-mib 16] [--layout llama-2-7b] [--modes single,workers] [--threads N] [--report-every 120]

Prints markdown tables (copy them to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import duckdb
import numpy as np
import psutil
from budget_7b import Member, build_family

import indexer.crawl as crawl_module
import indexer.incremental.index as index_module
from indexer.crawl import CrawlOptions, crawl
from indexer.distributed import ClusterSpec, DaskHub, _Known, connect, crawl_via
from settings import DEFAULT_PREFETCH, DEFAULT_THREADS
from indexer.hub_emulator import emulator_process
from indexer.sources import HubSource, origin
from store.query import export_forest
from store.tables import Store

MIB = 1024 * 1024
PAGE = 1000  # models per listing page, on the Hub and in the emulator
# The Hub's published limits per 5-minute window (huggingface.co/docs/hub/rate-limits, September 2025):
# (API, resolvers) per plan.
HUB_LIMITS = {"anonymous (per IP)": (500, 3000), "free user": (1000, 5000), "PRO user": (2500, 12000),
              "Team organization": (3000, 20000), "Enterprise organization": (6000, 50000)}
WINDOW_S = 300.0


def members(n: int, size: int, seed: int) -> list[Member]:
    """n models in families of `size`, parents first."""
    rng = np.random.default_rng(seed)
    return [m for f in range(math.ceil(n / size)) for m in build_family(f, min(size, n - f * size), rng)]


def _spec(m: Member, layout: str) -> str:
    created = m.created.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if not m.parent:
        return f"{layout}:{m.repo_id}:seed={m.lineage.root_seed}:created={created}"
    step = m.lineage.steps[-1]
    return (f"{layout}:{m.repo_id}:seed={step.seed}:parent={m.parent}:delta={step.delta!r}:kind={step.kind}"
            f":created={created}")


# --- timers (the one-process run) ----------------------------------------------------------------


class Timers(Counter):  # type: ignore[type-arg]
    pass


def _timed(timers: Timers, key: str, fn: Callable[..., object]) -> Callable[..., object]:
    """Wall seconds under `key`, and the CPU seconds of the thread that ran it under "cpu " + key: the
    fetch threads and the parallel range reads run beside the lineage step, so the process's CPU over
    an interval would count their work in whatever part the crawl's thread was in. Library threads (BLAS,
    OpenMP) are not counted in a part; they land in "other"."""
    def wrapper(*args: object, **kwargs: object) -> object:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[key] += time.perf_counter() - t
            timers["cpu " + key] += time.thread_time() - c
    return wrapper


def _counted(timers: Timers, key: str, fn: Callable[..., object]) -> Callable[..., object]:
    def wrapper(*args: object, **kwargs: object) -> object:
        timers[key] += 1
        return fn(*args, **kwargs)
    return wrapper


def _by_host(timers: Timers, fn: Callable[..., object]) -> Callable[..., object]:
    """Count every exchange by host: the Hub's (a /resolve/ hit) or the CDN's, re-reads included."""
    def wrapper(hub: HubSource, repo_id: str, url: str, *args: object, **kwargs: object) -> object:
        timers["all resolver calls" if origin(url) == hub._hub_origin else "all CDN calls"] += 1
        return fn(hub, repo_id, url, *args, **kwargs)
    return wrapper


def _refetches(timers: Timers, fn: Callable[..., object]) -> Callable[..., object]:
    def wrapper(*args: object, **kwargs: object) -> object:
        return _counted(timers, "re-reads", fn(*args, **kwargs))  # type: ignore[arg-type]
    return wrapper


@contextmanager
def instrument(timers: Timers) -> Iterator[None]:
    """Wrap our own functions with timers and counters (bench only; restored after)."""
    lineage = index_module.LineageIndex
    targets = [
        (HubSource, "_exchange", "network", _timed), (HubSource, "_exchange", "", _by_host),
        (HubSource, "model_info", "model_info calls", _counted), (crawl_module, "hub_refetch", "", _refetches),
        (crawl_module, "decode", "decode", _timed), (index_module, "measure_many", "exact step", _timed),
        (index_module, "measure", "exact step", _timed),  # the second hop's pairs (it calls exact.measure_many)
        (lineage, "add_many", "lineage step", _timed), (lineage, "flush", "writes", _timed),
        (lineage, "_merges", "merge step", _timed), (index_module, "_prepare", "sketch", _timed),
        (Store, "append", "writes", _timed), (crawl_module._CacheWriter, "drain", "writes", _timed),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _, _ in targets][::-1]  # restored last first
    for owner, name, key, wrap in targets:
        inner = getattr(owner, name)
        setattr(owner, name, wrap(timers, key, inner) if key else wrap(timers, inner))  # type: ignore[call-arg]
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


@contextmanager
def progress(mode: str, meter: CpuMeter, every: float, timers: Timers | None) -> Iterator[None]:
    """Print a line every `every` seconds while a run goes (models through the lineage step, rate, CPU):
    a 1,000-model run takes an hour or more, and a run stopped early still leaves its figures."""
    seen = Counter()  # type: ignore[var-annotated]
    add_many = index_module.LineageIndex.add_many

    def counted(self: object, arrivals: list) -> object:  # type: ignore[type-arg]
        seen["models"] += len(arrivals)
        return add_many(self, arrivals)  # type: ignore[arg-type]

    stop = threading.Event()
    started = time.perf_counter()

    def report() -> None:
        while not stop.wait(every):
            n, wall = seen["models"], time.perf_counter() - started
            crawler, emulator = meter.read()
            extra = f", re-reads {timers['re-reads']}" if timers is not None else ""
            print(f"[progress] {mode}: {n} models in {wall:.0f} s ({n / wall:.3f} models/s), crawler CPU "
                  f"{crawler / max(n, 1):.2f} s/model, emulator CPU {emulator / max(n, 1):.2f} s/model{extra}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)

    index_module.LineageIndex.add_many = counted  # type: ignore[method-assign,assignment]
    thread = threading.Thread(target=report, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        index_module.LineageIndex.add_many = add_many  # type: ignore[method-assign]


class CpuMeter:
    """CPU seconds (user + system) of the crawler -- this process and the processes it started, e.g. Dask
    workers -- and of the emulator process, apart. `emulator`: the pid of `index hub serve`."""

    def __init__(self, emulator: int) -> None:
        self.emulator = emulator
        self._start: dict[int, float] = {}

    def _now(self) -> dict[int, float]:
        me = psutil.Process()
        out = {me.pid: sum(me.cpu_times()[:2])}
        for proc in me.children(recursive=True):
            try:
                out[proc.pid] = sum(proc.cpu_times()[:2])
            except psutil.NoSuchProcess:  # a worker that just stopped: its time since the start is lost
                continue
        return out

    def start(self) -> None:
        self._start = self._now()

    def read(self) -> tuple[float, float]:
        """(crawler, emulator) CPU seconds since `start`. Call it before worker processes exit."""
        spent = {pid: cpu - self._start.get(pid, 0.0) for pid, cpu in self._now().items()}
        emulator = spent.pop(self.emulator, 0.0)
        return sum(spent.values()), emulator


def emulator_pid() -> int:
    """The `index hub serve` child that emulator_process started."""
    for proc in psutil.Process().children():
        if "serve" in proc.cmdline():
            return proc.pid
    raise RuntimeError("the emulator process is not a child of this one")


# --- runs ----------------------------------------------------------------------------------------


def _summary(mode: str, outcomes: list, seconds: float, timers: Timers | None,  # type: ignore[type-arg]
             cpu: tuple[float, float]) -> dict[str, object]:
    indexed = [o for o in outcomes if o.status == "indexed"]
    n = len(outcomes)
    row: dict[str, object] = {
        "mode": mode, "models": n, "indexed": len(indexed), "seconds": seconds, "models/s": n / seconds,
        "MiB/model": sum(o.bytes_read for o in outcomes) / max(n, 1) / MIB,
        "resolver/model": sum(o.resolver_calls for o in outcomes) / max(n, 1),
        "cdn/model": sum(o.cdn_calls for o in outcomes) / max(n, 1),
        "requests/model": sum(o.requests for o in outcomes) / max(n, 1),
        "crawler CPU/model": cpu[0] / max(n, 1), "emulator CPU/model": cpu[1] / max(n, 1),
    }
    if timers is not None:
        row["api/model"] = (timers["model_info calls"] + math.ceil(n / PAGE)) / max(n, 1)
        row["re-reads/model"] = timers["re-reads"] / max(n, 1)
        row["all resolver/model"] = timers["all resolver calls"] / max(n, 1)
        row["all cdn/model"] = timers["all CDN calls"] / max(n, 1)
        row["shares"] = _shares(timers, seconds, cpu[0], n)
    return row


def _shares(timers: Timers, wall: float, cpu: float, n: int) -> dict[str, tuple[float, float]]:
    """part -> (share of the wall time, crawler CPU seconds a model)."""
    def parts(prefix: str, total: float) -> dict[str, float]:
        t = {k: timers[prefix + k] for k in ("network", "decode", "sketch", "exact step", "merge step", "lineage step",
                                              "writes")}
        t["rest of lineage"] = t.pop("lineage step") - t["sketch"] - t["exact step"] - t["merge step"]
        t["other (listing, plan, headers, client)"] = total - sum(t.values())
        return t
    walls, cpus = parts("", wall), parts("cpu ", cpu)
    return {k: (walls[k] / wall, cpus[k] / max(n, 1)) for k in walls}


def run_single(url: str, budget: int, truth: dict[str, str], meter: CpuMeter, every: float,
               prefetch: int, threads: int) -> dict[str, object]:
    timers = Timers()
    mode = f"1 process, prefetch {prefetch}"
    with tempfile.TemporaryDirectory() as home:
        with instrument(timers), progress(mode, meter, every, timers):
            meter.start()
            t = time.perf_counter()
            report = crawl(Path(home), CrawlOptions(endpoint=url, budget=budget, progress=False, prefetch=prefetch,
                                                        threads=threads))
            seconds = time.perf_counter() - t
            cpu = meter.read()
        row = _summary(mode, list(report.outcomes), seconds, timers, cpu)
        row.update(_accuracy(Path(home), truth))
    return row


def run_workers(url: str, budget: int, workers: int, truth: dict[str, str], meter: CpuMeter,
                every: float, threads: int) -> dict[str, object]:
    options = CrawlOptions(endpoint=url, budget=budget, progress=False, threads=threads)
    with tempfile.TemporaryDirectory() as home:
        with connect(ClusterSpec(workers=workers, processes=True)) as client:
            client.wait_for_workers(workers)
            hub = DaskHub(options, client=client, known=_Known.read(Path(home), have_token=False),
                          window=2 * workers)
            meter.start()
            t = time.perf_counter()
            with progress(f"{workers} Dask workers", meter, every, None):
                report = crawl_via(Path(home), options, hub=hub)
            seconds = time.perf_counter() - t
            cpu = meter.read()  # while the workers still run
        row = _summary(f"{workers} Dask workers", list(report.outcomes), seconds, None, cpu)
        row.update(_accuracy(Path(home), truth))
    return row


def _accuracy(home: Path, truth: dict[str, str]) -> dict[str, object]:
    """Edge accuracy of the exported forest (true edges placed / true edges) and its relation labels."""
    out = home / "forest.parquet"
    export_forest(home, out)
    rows = duckdb.sql(f"SELECT repo_id, parent, relation FROM '{out}'").fetchall()
    parent = {r: p or "" for r, p, _ in rows}
    edges = [(c, p) for c, p in truth.items() if p]
    labels = Counter(rel or "root" for _, _, rel in rows)
    return {"edge accuracy": sum(parent.get(c) == p for c, p in edges) / max(len(edges), 1),
            "relations": ", ".join(f"{k} {v}" for k, v in sorted(labels.items()))}


# --- report --------------------------------------------------------------------------------------


def rate_table(rows: list[dict[str, object]]) -> str:
    head = ("| mode | models | indexed | seconds | models/s | crawler CPU s/model | emulator CPU s/model "
            "| models per crawler CPU-second | MiB read/model | resolver calls/model "
            "| CDN calls/model | API calls/model | edge accuracy | relations |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        api = f"{r['api/model']:.3f}" if "api/model" in r else "n/a"
        calls = (f"{r['resolver/model']:.2f} | {r['cdn/model']:.1f}" if r["resolver/model"] or r["cdn/model"]
                 else f"n/a | n/a (all requests: {r['requests/model']:.1f})")
        crawler = float(r["crawler CPU/model"])  # type: ignore[arg-type]
        lines.append(f"| {r['mode']} | {r['models']} | {r['indexed']} | {r['seconds']:.1f} | {r['models/s']:.2f} "
                     f"| {crawler:.2f} | {r['emulator CPU/model']:.2f} | {1 / max(crawler, 1e-9):.2f} "
                     f"| {r['MiB/model']:.2f} | {calls} | {api} | {r['edge accuracy']:.3f} | {r['relations']} |")
    return "\n".join(lines)


def calls_table(row: dict[str, object]) -> str:
    """Calls per model with the lineage step's re-reads of evicted nominees (one-process run)."""
    head = "| calls per model | the model's own reads | all, re-reads of nominees included |"
    lines = [head, "|---|---|---|",
             f"| resolver (/resolve/) | {row['resolver/model']:.2f} | {row['all resolver/model']:.2f} |",
             f"| CDN | {row['cdn/model']:.1f} | {row['all cdn/model']:.1f} |",
             f"| nominees read again | | {row['re-reads/model']:.2f} |"]
    return "\n".join(lines)


def share_table(row: dict[str, object]) -> str:
    shares: dict[str, tuple[float, float]] = row["shares"]  # type: ignore[assignment]
    # The timers nest: the lineage step (its merge step above all) re-reads evicted nominees' blocks over
    # the network, so "network" and the lineage parts overlap. A part's CPU is that of the thread that ran
    # it (`_timed`); "other" is the process's CPU less the parts: listing, planning, headers, replays, the
    # cache writer and library threads. Range reads and prefetches run in parallel: "network" sums the wall
    # time of every exchange, so its wall share exceeds what the crawl waited, and other's wall share goes
    # negative by as much.
    head = ("| part of the one-process crawl (network: every exchange's wall time summed over the parallel reads, "
            "re-reads inside the lineage step included) | share of wall time | crawler CPU s/model (its thread's) |")
    lines = [head, "|---|---|---|"]
    lines += [f"| {k} | {100 * w:.1f} % | {c:.3f} |" for k, (w, c) in shares.items()]
    return "\n".join(lines)


def limits_table(row: dict[str, object], rates: list[tuple[str, float]]) -> str:
    """Models/s each plan's limits allow, given the calls a model costs (re-reads included); the cores the
    one-process crawler's CPU (`row`'s crawler CPU s/model) needs to keep up with that, and what binds on
    this box's cores if the crawler had them to itself (the real Hub's CPU is not ours; the emulator's
    here is). The measured rates (`rates`) are printed below: on this box the emulator shares the cores."""
    api, resolver = float(row["api/model"]), float(row["all resolver/model"])  # type: ignore[arg-type]
    cpu, cores = float(row["crawler CPU/model"]), len(os.sched_getaffinity(0))  # type: ignore[arg-type]
    head = ("| plan | API / 5 min | resolvers / 5 min | models/s the API bucket allows | models/s the resolver "
            f"bucket allows | crawler cores to keep up | bound, crawler alone on {cores} cores |")
    lines = [head, "|" + "---|" * 7]
    for plan, (api_cap, res_cap) in HUB_LIMITS.items():
        by_api = api_cap / WINDOW_S / api if api > 0 else math.inf
        by_res = res_cap / WINDOW_S / resolver if resolver > 0 else math.inf
        need = min(by_api, by_res) * cpu
        bound = "the Hub" if need <= cores else f"our CPU (missed {need / cores:.2f}x)"
        lines.append(f"| {plan} | {api_cap:,} | {res_cap:,} | {by_api:.2f} | {by_res:.2f} | {need:.2f} | {bound} |")
    lines.append("\nmeasured: " + ", ".join(f"{mode} {rate:.2f} models/s" for mode, rate in rates))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--family-size", type=int, default=20)
    parser.add_argument("--layout", default="llama-2-7b")
    parser.add_argument("--budget-mib", type=float, default=None, help="default: the crawl's default budget")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="single,workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="the crawl's numeric-library threads (index crawl --threads; default: the crawl's)")
    parser.add_argument("--report-every", type=float, default=120.0, help="seconds between progress lines")
    parser.add_argument("--prefetch", type=lambda v: [int(x) for x in v.split(",")], default=[DEFAULT_PREFETCH],
                        help="one-process runs, one per value: threads reading ahead (0: none; default: the crawl's)")
    args = parser.parse_args()
    budget = int(args.budget_mib * MIB) if args.budget_mib else CrawlOptions(endpoint="").budget
    family = members(args.n, args.family_size, args.seed)
    virtual = [_spec(m, args.layout) for m in family]
    truth = {m.repo_id: m.parent for m in family}
    rows = []
    with tempfile.TemporaryDirectory() as empty:
        serve_args = [a for spec in virtual for a in ("--virtual", spec)] + ["--latency", str(args.latency)]
        with emulator_process(Path(empty), args=serve_args) as url:
            meter = CpuMeter(emulator_pid())
            for prefetch in (args.prefetch if "single" in args.modes else ()):
                rows.append(run_single(url, budget, truth, meter, args.report_every, prefetch, args.threads))
                print(rate_table(rows[-1:]), flush=True)  # each mode as soon as it is done: runs are long
            if "workers" in args.modes:
                rows.append(run_workers(url, budget, args.workers, truth, meter, args.report_every, args.threads))
                print(rate_table(rows[-1:]), flush=True)
    print(f"command: bench/crawl_rate.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.platform()}; {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{args.n} virtual {args.layout} models in families of {args.family_size}; budget {budget / MIB:g} MiB; "
          f"{args.latency * 1000:.0f} ms added to every Hub and CDN request; the crawl's numeric-library "
          f"threads: {args.threads}\n")
    print(rate_table(rows) + "\n")
    single = next((r for r in rows if "shares" in r), None)
    for row in (r for r in rows if "shares" in r):
        print(f"{row['mode']}:\n\n" + share_table(row) + "\n")
        print(calls_table(row) + "\n")
    if single is not None:
        rates = [(str(r["mode"]), float(r["models/s"])) for r in rows]  # type: ignore[arg-type]
        rates.append(("crawler alone per CPU-second", 1 / max(float(single["crawler CPU/model"]), 1e-9)))  # type: ignore[arg-type]
        print(limits_table(single, rates))


if __name__ == "__main__":
    main()
