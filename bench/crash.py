"""Kill harness: SIGKILL a real `index crawl` subprocess at seeded moments, restart it, then check the store.

    .venv/bin/python bench/crash.py --kills 25 --seed 0          # the long version (tiny zoo, ~5 min)
    .venv/bin/python bench/crash.py --kills 5 --hub DIR          # any Hub-style folder (hub.json + repos)

Each round starts from an empty store: a crawl subprocess (`python -c "<wrapper>" crawl ...`, i.e. `cli.main()`
with two knobs turned down so that every phase happens often: one model per batch, compaction after 2 parts)
is killed `--per-round` times, then run to the end, and the store is compared with a clean crawl of the
same hub. A kill is aimed at a phase (listing, reading, writing, compaction, lineage; round robin from the
seed): the wrapper appends the phase it enters to a trace file, and the harness kills at a seeded random
occurrence of it plus a random 0-40 ms. The phase printed is the one the trace showed at the kill.

Checked after every kill (before the restart), as a reader would see the store: `index query`'s,
`index export`'s and `index stats`' functions work (or say "no index yet"), no part listing matches a
`.tmp-*` file, no key has two different rows at its highest `_seq`. After each round: the same models,
sketches, candidate edges and forest as the clean crawl, one export row per model, the FAISS index equal
to the sketches table after `load_or_rebuild`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from errors import NoIndexError  # noqa: E402
from indexer.hub_emulator import HubEmulator  # noqa: E402
from store.query import export_forest, query_model, store_stats  # noqa: E402
from store.schema import HASH, SEQ, TABLES, spec_of  # noqa: E402
from store.tables import TMP_PREFIX, list_parts, read_table, table_dir  # noqa: E402

logger = logging.getLogger(__name__)

PHASES = ("listing", "reading", "writing", "compaction", "lineage")
STARTUP_LIMIT = 120.0  # seconds for one crawl subprocess to finish on its own (8 models take ~15 s)

# The crawl subprocess: cli.main() with a phase trace and small batches / compaction threshold.
WRAPPER = r"""
import dataclasses, functools, os, sys
trace_fd = os.open(os.environ["CRASH_TRACE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def mark(phase):
    os.write(trace_fd, (phase + "\n").encode())
import indexer.crawl as c, indexer.sources as s, store.tables as t
import indexer.incremental.index as li
compact_after, batch = int(os.environ["CRASH_COMPACT_AFTER"]), int(os.environ["CRASH_BATCH"])
c.open_store = functools.partial(t.Store.open, compact_after=compact_after)
_crawl = c.crawl
c.crawl = lambda home, options, **kw: _crawl(home, dataclasses.replace(options, batch=batch), **kw)
def traced(phase, fn):
    def run(*a, **kw):
        mark(phase)
        try:
            return fn(*a, **kw)
        finally:
            mark("-")
    return run
c.read_model = traced("reading", c.read_model)
li.LineageIndex.add_many = traced("lineage", li.LineageIndex.add_many)  # the crawl places arrivals in batches
t.Store.append = traced("writing", t.Store.append)
t.Store.delete = traced("writing", t.Store.delete)
_compact = t.Store.compact
def compact(self, table, *, force=False):
    if force or len(t.list_parts(self.home, table)) > self.compact_after:
        return traced("compaction", _compact)(self, table, force=force)
    return _compact(self, table, force=force)
t.Store.compact = compact
_list = s.HubSource.list_models
def list_models(self, **kw):
    it = iter(_list(self, **kw))
    while True:
        mark("listing")
        try:
            entry = next(it)
        except StopIteration:
            mark("-")
            return
        mark("-")
        yield entry
s.HubSource.list_models = list_models
import cli
cli.main()
"""


MAX_MISSES = 20  # whole crawls a phase may finish without being reached before the harness gives up


@dataclass
class CrashReport:
    kills: int = 0
    recoveries: int = 0  # rounds whose store equalled the clean crawl
    rounds: int = 0
    by_phase: Counter[str] = field(default_factory=Counter)
    temp_leftovers: int = 0  # .tmp-* files found after kills (never listed as parts)
    faiss_rebuilt: int = 0  # rounds whose FAISS file was behind the sketches table and was rebuilt on load
    reader_checks: int = 0
    problems: list[str] = field(default_factory=list)
    missed: Counter[str] = field(default_factory=Counter)  # whole crawls that finished before their kill

    def as_dict(self) -> dict[str, Any]:
        return {"kills": self.kills, "rounds": self.rounds, "recoveries": self.recoveries,
                "kills_by_phase": dict(sorted(self.by_phase.items())), "temp_leftovers": self.temp_leftovers,
                "faiss_rebuilt": self.faiss_rebuilt, "reader_checks": self.reader_checks,
                "problems": self.problems}


def crawl_command(url: str, home: Path) -> list[str]:
    return [sys.executable, "-c", WRAPPER, "crawl", "--endpoint", url, "--home", str(home), "--json",
            "--device", "cpu"]


def _env(trace: Path, *, compact_after: int, batch: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "INDEX_HOME")}
    env |= {"CRASH_TRACE": str(trace), "CRASH_COMPACT_AFTER": str(compact_after), "CRASH_BATCH": str(batch),
            "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return env


def _phase_count(trace: Path, phase: str) -> tuple[int, str]:
    """(times `phase` was entered, the phase the process is in now: '-' between phases)."""
    try:
        lines = trace.read_text().split()
    except FileNotFoundError:
        return 0, "-"
    return lines.count(phase), lines[-1] if lines else "-"


def run_until_killed(cmd: list[str], env: dict[str, str], trace: Path, *, phase: str, nth: int,
                     jitter: float) -> tuple[bool, str]:
    """Start the crawl; SIGKILL it `jitter` s after it enters `phase` for the `nth` time.
    Returns (killed, phase seen at the kill); (False, "done") when it finished first."""
    trace.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_LIMIT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _phase_count(trace, phase)[0] >= nth:
                time.sleep(jitter)
                seen = _phase_count(trace, phase)[1]
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, seen
            time.sleep(0.002)
        if proc.poll() is None:
            raise RuntimeError(f"crawl still running after {STARTUP_LIMIT} s")
        return False, "done"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_to_end(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=STARTUP_LIMIT)
    if done.returncode != 0:
        raise RuntimeError(f"crawl failed after kills (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


# --- what the store must look like -----------------------------------------------------------------------------


def snapshot(home: Path) -> dict[str, Any]:
    """The content a crawl must produce, whatever happened on the way (times and run ids left out)."""
    rows = {t: read_table(home, t).to_pylist() for t in ("models", "sketches", "candidates", "edges")}
    return {
        "models": sorted((m["repo_id"], m["revision"], m["status"], m["reason"], m["family"]) for m in rows["models"]),
        "sketches": sorted((s["repo_id"], s["revision"], tuple(s["vector"])) for s in rows["sketches"]),
        "candidates": sorted((c["family"], c["parent"], c["child"], c["weight"]) for c in rows["candidates"]),
        "edges": sorted((e["repo_id"], e["revision"], e["parent"], e["root"], e["cluster"], e["depth"])
                        for e in rows["edges"]),
    }


def ambiguous_keys(home: Path) -> list[str]:
    """Keys with two different rows at their highest `_seq` (latest-wins would be a coin toss)."""
    bad: list[str] = []
    for table in TABLES:
        spec = spec_of(table)
        best: dict[tuple[Any, ...], tuple[int, set[str]]] = {}
        for _, part in list_parts(home, table):
            for row in pq.read_table(part, columns=[*spec.key, SEQ, HASH]).to_pylist():
                key, seq = tuple(row[k] for k in spec.key), row[SEQ]
                top = best.get(key)
                if top is None or seq > top[0]:
                    best[key] = (seq, {row[HASH]})
                elif seq == top[0]:
                    top[1].add(row[HASH])
        bad += [f"{table}:{k}" for k, (_, hashes) in sorted(best.items()) if len(hashes) > 1]
    return bad


def reader_check(home: Path, out: Path) -> list[str]:
    """What `index query/export/stats` see right now; returns problems (empty when fine)."""
    problems: list[str] = []
    for table in TABLES:
        if any(p.name.startswith(TMP_PREFIX) for _, p in list_parts(home, table)):
            problems.append(f"{table}: a temp file is listed as a part")
    try:
        stats = store_stats(home)
        count = export_forest(home, out)
    except NoIndexError:
        return problems  # nothing written yet: the one allowed refusal
    exported = pq.read_table(out).to_pylist()
    ids = [r["repo_id"] for r in exported]
    if len(ids) != len(set(ids)) or count != len(ids):
        problems.append(f"export has {len(ids)} rows for {len(set(ids))} repos")
    in_export = set(ids)
    # an adapter whose base is not indexed (yet) hangs under the base's name, cluster `external:<name>`
    # (indexer.incremental.satellites): by design not a row; any other missing parent is a dangling edge
    problems += [f"export: parent {r['parent']} of {r['repo_id']} is not a row" for r in exported
                 if r["parent"] and r["parent"] not in in_export
                 and r.get("cluster") != f"external:{r['parent']}"]
    for repo_id in sorted(in_export)[:3]:
        query_model(home, repo_id)
    if stats["models"] < count:
        problems.append(f"stats count {stats['models']} models, export {count}")
    problems += [f"ambiguous key {k}" for k in ambiguous_keys(home)]
    return problems


def temp_files(home: Path) -> int:
    return sum(1 for p in home.rglob(f"{TMP_PREFIX}*")) if home.is_dir() else 0


def vectors_match(home: Path) -> tuple[bool, bool]:
    """(saved FAISS file already equal to the sketches, equal after load_or_rebuild) over every family."""
    from store.vectors import VectorIndex, load_or_rebuild

    families = sorted({s["family"] for s in read_table(home, "sketches").to_pylist()})
    saved_ok = after_ok = True
    for family in families:
        wanted = sorted((s["repo_id"], s["revision"]) for s in read_table(home, "sketches", where={"family": family}).to_pylist())
        try:
            saved_ok &= VectorIndex.load(home, family).entries() == wanted
        except Exception:  # noqa: BLE001 -- a torn or missing file is what load_or_rebuild repairs
            saved_ok = False
        after_ok &= load_or_rebuild(home, family).entries() == wanted
    return saved_ok, after_ok


# --- rounds ------------------------------------------------------------------------------------------------------


def clean_reference(url: str, work: Path, *, compact_after: int, batch: int) -> dict[str, Any]:
    home = work / "clean"
    shutil.rmtree(home, ignore_errors=True)
    run_to_end(crawl_command(url, home), _env(work / "clean.trace", compact_after=compact_after, batch=batch))
    return snapshot(home)


def one_round(url: str, work: Path, reference: dict[str, Any], rng: random.Random, report: CrashReport, *,
              kills: int, compact_after: int, batch: int, models: int) -> None:
    home = work / f"round-{report.rounds}"
    shutil.rmtree(home, ignore_errors=True)
    trace = work / "trace"
    cmd, env = crawl_command(url, home), _env(trace, compact_after=compact_after, batch=batch)
    for i in range(kills):
        phase = PHASES[(report.kills + i) % len(PHASES)]
        nth = rng.randint(1, {"listing": models, "compaction": 3}.get(phase, max(1, models // 2)))
        killed, seen = run_until_killed(cmd, env, trace, phase=phase, nth=nth, jitter=rng.uniform(0, 0.04))
        if not killed:  # it finished first: start over from an empty store so later kills still bite
            shutil.rmtree(home, ignore_errors=True)
            report.missed[phase] += 1
            if report.missed[phase] >= MAX_MISSES:  # e.g. a traced function the crawl no longer calls
                raise RuntimeError(f"crash harness: phase {phase!r} never reached in {MAX_MISSES} whole crawls; "
                                   "is its traced function still called?")
            continue
        report.kills += 1
        report.by_phase[f"{phase}->{seen}"] += 1
        report.temp_leftovers += temp_files(home)
        report.reader_checks += 1
        report.problems += [f"round {report.rounds} kill {i}: {p}" for p in reader_check(home, work / "export.parquet")]
    run_to_end(cmd, env)
    again = run_to_end(cmd, env)  # a finished store: a second crawl fetches nothing
    if again["indexed"] or again["failed"]:
        report.problems.append(f"round {report.rounds}: a crawl after the end did work: {again}")
    got = snapshot(home)
    for table in reference:
        if got[table] != reference[table]:
            report.problems.append(f"round {report.rounds}: {table} differ from the clean crawl "
                                   f"({len(got[table])} vs {len(reference[table])} rows)")
    problems = reader_check(home, work / "export.parquet")
    report.problems += [f"round {report.rounds} end: {p}" for p in problems]
    if temp_files(home / "tables"):
        report.problems.append(f"round {report.rounds}: temp files left after a clean finish")
    saved_ok, after_ok = vectors_match(home)
    report.faiss_rebuilt += not saved_ok
    if not after_ok:
        report.problems.append(f"round {report.rounds}: FAISS disagrees with sketches after load_or_rebuild")
    report.recoveries += not problems and got == reference and after_ok
    report.rounds += 1


def run_crash(hub_root: Path, work: Path, *, kills: int, seed: int = 0, per_round: int = 5,
              compact_after: int = 2, batch: int = 1) -> CrashReport:
    """`kills` SIGKILLs in rounds of `per_round` over the hub at `hub_root` (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    report = CrashReport()
    models = len(json.loads((hub_root / "hub.json").read_text())["repos"])
    with HubEmulator(hub_root) as emu:
        reference = clean_reference(emu.url, work, compact_after=compact_after, batch=batch)
        while report.kills < kills:
            one_round(emu.url, work, reference, rng, report, kills=min(per_round, kills - report.kills),
                      compact_after=compact_after, batch=batch, models=models)
    return report


def _tiny_zoo(cache: Path) -> Path:
    if not (cache / "hub.json").is_file():
        from indexer.zoo import make_zoo

        shutil.rmtree(cache, ignore_errors=True)
        make_zoo(cache, preset="tiny", split="ft", seed=0, workers=1)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hub", type=Path, default=None, help="a Hub folder (default: the tiny zoo, built once)")
    parser.add_argument("--zoo-cache", type=Path, default=Path("/tmp/mgi-zoo-tiny-ft-0"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mgi-crash"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hub = args.hub or _tiny_zoo(args.zoo_cache)
    started = time.perf_counter()
    report = run_crash(hub, args.work, kills=args.kills, seed=args.seed, per_round=args.per_round)
    print(json.dumps(report.as_dict() | {"seconds": round(time.perf_counter() - started, 1)}, indent=2))
    sys.exit(1 if report.problems or report.recoveries != report.rounds else 0)


if __name__ == "__main__":
    main()
