"""Figures for `index show` and `index web` on a synthetic store holding one 50,000-model tree.

    .venv/bin/python bench/web.py [--models 1000000] [--family 50000] [--store DIR] [--seconds 30]
        [--clients 20] [--runs 5] [--seed 0]

The store: one tree of `--family` models (a root, then each model fine-tuned from one of the 200 most
recent models of depth < 6: bench/scale.py's growth rule) and `--models - --family` more models in
small trees (sizes Zipf 1.5, capped at 200), written through `store.tables.Store` as `index crawl` writes
them. bench/scale.py's own forests never hold a tree this large (8 % of its arrivals start a new tree), so
the big tree is made here; the rest stands in for the Hub around it. An existing `--store` is reused.

Then, each printed as a markdown table:
  1. `index show` as a whole process (what a user waits for): the 50,000-model tree in each format,
     and `--depth 2` around one of its members; p50 of `--runs`;
  2. `index web`: `/api/show/<repo>` (the family endpoint the page calls) from `--clients` concurrent
     keep-alive clients for `--seconds` on loopback, for members of small trees and for members of the
     big tree, with the answers cache off (`--cache 0`: every request reads the store) and on (default);
     p50 / p95 / requests per second;
  3. first paint of the family page in headless Chromium (Debian's, through chromedriver): first
     contentful paint, and the moment the graph is drawn (`data-drawn-ms`, set by the viewer).
"""

from __future__ import annotations

import argparse
import http.client
import select
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
INDEX = str(ROOT / ".venv" / "bin" / "index")
BIG_ROOT = "big-org/base"
WINDOW, MAX_DEPTH = 200, 6  # bench/scale.py's growth rule
CHUNK = 200_000  # rows per Store.append: one part each, as scale.py writes them
SHA = "0" * 40
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


# --- the store ---------------------------------------------------------------------------------------


def grow(size: int, rng: np.random.Generator) -> np.ndarray:
    """Parent index of each model of one tree (-1 for the root), depth at most MAX_DEPTH."""
    parent = np.full(size, -1, dtype=np.int64)
    depth = np.zeros(size, dtype=np.int64)
    for i in range(1, size):
        lo = max(0, i - WINDOW)
        j = int(rng.integers(lo, i))
        while depth[j] >= MAX_DEPTH:
            j = int(parent[j])
        parent[i], depth[i] = j, depth[j] + 1
    return parent


def trees(models: int, family: int, seed: int) -> list[tuple[list[str], np.ndarray]]:
    """(names, parents) per tree: the big one first, then small ones until `models` in all."""
    rng = np.random.default_rng(seed)
    out = [([BIG_ROOT] + [f"big-org/ft-{i:06d}" for i in range(1, family)], grow(family, rng))]
    left, t = models - family, 0
    while left > 0:
        size = int(min(rng.zipf(1.5), 200, left))
        out.append(([f"org{t:06d}/m-{j:03d}" for j in range(size)], grow(size, rng)))
        left, t = left - size, t + 1
    return out


def _rows(names: list[str], parent: np.ndarray, start: int, rng: np.random.Generator) -> tuple[list, list]:
    from store.schema import EdgeRecord, ModelRecord

    now, root = datetime.now(UTC), names[0]
    depth = np.zeros(len(names), dtype=np.int64)
    models, edges = [], []
    for i, name in enumerate(names):
        up = names[parent[i]] if parent[i] >= 0 else ""
        depth[i] = depth[parent[i]] + 1 if up else 0
        declared = up if rng.random() > 0.05 else ""  # 5 % of cards declare nothing
        models.append(ModelRecord(name, SHA, "llama", "indexed", now, created_at=EPOCH + timedelta(seconds=start + i),
                                  declared_base_model=declared, declared_relation="finetune" if declared else "",
                                  bytes_read=64 << 20, source="synthetic"))
        edges.append(EdgeRecord(name, SHA, "llama", root, up, root, int(depth[i]),
                                float(rng.uniform(0.01, 1.0)) if up else 0.0, 0.0,
                                float(rng.uniform(0.3, 1.0)) if up else 0.0, now))
    return models, edges


def build(home: Path, models: int, family: int, seed: int) -> float:
    """Write the store; returns seconds."""
    from store.tables import Store

    started = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    pending_m: list = []
    pending_e: list = []
    at = 0
    with Store.open(home) as store:
        for names, parent in trees(models, family, seed):
            m, e = _rows(names, parent, at, rng)
            pending_m += m
            pending_e += e
            at += len(names)
            if len(pending_m) >= CHUNK:
                store.append("models", pending_m)
                store.append("edges", pending_e)
                pending_m, pending_e = [], []
        if pending_m:
            store.append("models", pending_m)
            store.append("edges", pending_e)
    return time.perf_counter() - started


# --- 1. index show -----------------------------------------------------------------------------------


def time_show(home: Path, repo: str, *args: str, runs: int) -> tuple[float, int]:
    """(p50 seconds of the whole process, bytes printed)."""
    times, size = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([INDEX, "show", repo, "--home", str(home), *args], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
        size = len(done.stdout)
    return statistics.median(times), size


# --- 2. index web under load ---------------------------------------------------------------------------


def start_web(home: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([INDEX, "web", "--home", str(home), "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline().strip() if ready else ""  # type: ignore[union-attr]
    if not line.startswith("http://"):
        proc.kill()
        raise SystemExit("index web did not start")
    return proc, line


def _client(url: str, paths: list[str], offset: int, deadline: float, out: list[float], errors: list[int]) -> None:
    parts = urlsplit(url)
    con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    i = offset
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        con.request("GET", paths[i % len(paths)])
        response = con.getresponse()
        response.read()
        (out if response.status == 200 else errors).append(time.perf_counter() - started)
        i += 1
    con.close()


def load(url: str, paths: list[str], *, clients: int, seconds: float) -> dict[str, float]:
    """Latencies of `clients` keep-alive clients cycling through `paths` for `seconds` (bounded, loopback only)."""
    deadline = time.perf_counter() + seconds
    results: list[list[float]] = [[] for _ in range(clients)]
    errors: list[int] = []
    threads = [threading.Thread(target=_client, args=(url, paths, c * 7, deadline, results[c], errors))
               for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(x for r in results for x in r)
    return {"requests": len(lat), "errors": len(errors), "p50": lat[len(lat) // 2] if lat else float("nan"),
            "p95": float(np.percentile(lat, 95)) if lat else float("nan"), "rps": len(lat) / wall}


# --- 3. first paint ------------------------------------------------------------------------------------


def first_paint(url: str, pages: list[str], runs: int) -> dict[str, tuple[float, float, float]]:
    """Per page: (cold first contentful paint ms, warm FCP p50 ms, warm graph-drawn p50 ms)."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    out = {}
    try:
        for page in pages:
            fcp, drawn = [], []
            for _ in range(runs + 1):
                driver.get(url + page.lstrip("/"))
                WebDriverWait(driver, 120).until(lambda d: d.execute_script(
                    "return document.body.getAttribute('data-state')") == "drawn")
                fcp.append(driver.execute_script(
                    "var e = performance.getEntriesByName('first-contentful-paint'); return e.length ? e[0].startTime : null;"))
                drawn.append(float(driver.execute_script("return document.body.getAttribute('data-drawn-ms')")))
            warm = [f for f in fcp[1:] if f is not None]  # Chromium may leave a reload's FCP entry out
            out[page] = (fcp[0] or float("nan"), statistics.median(warm) if warm else float("nan"),
                         statistics.median(drawn[1:]))
    finally:
        driver.quit()
    return out


# --- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1_000_000)
    parser.add_argument("--family", type=int, default=50_000)
    parser.add_argument("--store", type=Path, default=Path("/tmp/web-bench-store"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not (args.store / "FORMAT").exists():
        seconds = build(args.store, args.models, args.family, args.seed)
        print(f"store: {args.models:,} models ({args.family:,} in one tree) written in {seconds:.0f} s", file=sys.stderr)
    member = f"big-org/ft-{args.family // 2:06d}"
    small = [f"org{t:06d}/m-000" for t in range(0, 2000, 10)]

    print(f"\n1. `index show` on the {args.models:,}-model store, the {args.family:,}-model tree (whole process, p50 of {args.runs})\n")
    print("| what | p50 s | bytes out |\n|---|---|---|")
    for label, repo, extra in [("text (default: 20 children, 400 models drawn)", BIG_ROOT, ()),
                               ("svg", BIG_ROOT, ("--format", "svg")), ("html", BIG_ROOT, ("--format", "html")),
                               ("json", BIG_ROOT, ("--format", "json")), ("mermaid", BIG_ROOT, ("--format", "mermaid")),
                               ("text, `--depth 2` around a member", member, ("--depth", "2")),
                               ("text, a small tree", small[0], ())]:
        p50, size = time_show(args.store, repo, *extra, runs=args.runs)
        print(f"| {label} | {p50:.2f} | {size:,} |", flush=True)

    print(f"\n2. `index web`: GET /api/show/<repo>, {args.clients} concurrent clients, {args.seconds:.0f} s each, "
          f"loopback, cycling through 200 repos\n")
    print("| families asked for | answers cache | requests | errors | p50 ms | p95 ms | req/s |\n"
          "|---|---|---|---|---|---|---|")
    big = [f"big-org/ft-{i:06d}" for i in range(1, args.family, max(1, args.family // 200))]
    for cache in ("0", "256"):
        proc, url = start_web(args.store, "--cache", cache)
        try:
            for label, repos in [("small trees (typical)", small), (f"the {args.family:,}-model tree", big)]:
                r = load(url, ["/api/show/" + quote(x, safe="/") for x in repos], clients=args.clients,
                         seconds=args.seconds)
                print(f"| {label} | {'off: every request reads the store' if cache == '0' else cache} | "
                      f"{r['requests']:,} | {r['errors']} | {r['p50'] * 1000:.0f} | {r['p95'] * 1000:.0f} | "
                      f"{r['rps']:.1f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    proc, url = start_web(args.store)
    try:
        print(f"\n3. first paint of /family/<repo> in headless Chromium (cold = first load; warm = p50 of {args.runs})\n")
        print("| page | first contentful paint, cold ms | FCP warm ms | graph drawn warm ms |\n|---|---|---|---|")
        pages = {"a small tree": "/family/" + small[0], f"the {args.family:,}-model tree (400 drawn)": "/family/" + BIG_ROOT}
        paint = first_paint(url, list(pages.values()), args.runs)
        for label, page in pages.items():
            cold, warm, drawn = paint[page]
            print(f"| {label} | {cold:.0f} | {warm:.0f} | {drawn:.0f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
