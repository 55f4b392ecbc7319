"""Every environment variable the tool reads, read in one place, once.

Values become argument defaults; nothing else in the code calls `os.environ`. The token is held but
never printed: `Settings.__repr__` hides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_CRON = "0 3 * * *"  # nightly, 03:00 UTC: the Hub's quietest hours for most users


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a whole number") from exc


DEFAULT_BUDGET_MIB = 16  # tensor MiB read per model (plan v3, issue 14; 64 before)
# Threads reading the next models while the crawl runs the lineage step (indexer.distributed.ThreadHub): 2
# keep it fed at 50 ms a round trip (bench/crawl_rate.py); 0 reads each model when the crawl reaches it.
DEFAULT_PREFETCH = 2
# Threads of the numeric libraries (torch's intra-op pool, BLAS, OpenMP) while the crawl runs: 1. Its kernels
# are small (a 64 x 4096 block at a time) and already run on one thread each (sketches.gram, exact step);
# the parallelism is the fetch threads and the processes. With the libraries' default pools (one thread a
# core) their idle workers spin between the sketch's and the merge step's operations: 0.05 of 0.54 crawler
# CPU s a model on 200 virtual 7B models, 2-core box (bench/crawl_rate.py, session 9).
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class Settings:
    home: Path  # INDEX_HOME: where the store lives
    endpoint: str  # HF_ENDPOINT: the Hub (or an emulator) to crawl
    token: str | None = field(repr=False)  # HF_TOKEN: only for gated repos; never logged
    byte_budget: int  # INDEX_BYTE_BUDGET_MIB: tensor bytes read per model
    debug: bool  # INDEX_DEBUG: print tracebacks
    cron: str = DEFAULT_CRON  # INDEX_CRON: when `index serve` crawls (five crontab fields, UTC)
    cache_bytes: int = 4 << 30  # INDEX_CACHE_MIB: bound of the on-disk tensor cache (misses are re-read)


def load_settings() -> Settings:
    home = os.environ.get("INDEX_HOME") or str(Path.home() / ".cache" / "model-graph-index")
    return Settings(
        home=Path(home).expanduser(),
        endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        token=os.environ.get("HF_TOKEN") or None,
        # 16 MiB since plan v3: the value matrices' first rows held the reference accuracy on virtual 7B
        # families down to 1 MiB (bench/RESULTS.md, issue 14); 16 keeps room for what they do not model
        byte_budget=_int_env("INDEX_BYTE_BUDGET_MIB", DEFAULT_BUDGET_MIB) * 1024 * 1024,
        debug=os.environ.get("INDEX_DEBUG", "") not in ("", "0"),
        cron=os.environ.get("INDEX_CRON") or DEFAULT_CRON,
        cache_bytes=_int_env("INDEX_CACHE_MIB", 4096) * 1024 * 1024,
    )
