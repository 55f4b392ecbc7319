"""Shared by the `index show` / `index web` tests: a hand-built store with a large and a hostile family,
and `index web` started as a real process (the way a user starts it)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from store.schema import EdgeRecord, ModelRecord, SketchRecord
from store.tables import Store

SHA = "1" * 40
T0 = datetime(2024, 5, 1, tzinfo=UTC)
ROOT = "zoo/base"
CHILDREN = [f"zoo/ft-{i:02d}" for i in range(30)]  # more than the default 20 drawn per model
GRANDCHILDREN = ["zoo/ft-00-a", "zoo/ft-00-b"]
HOSTILE = "evil/<script>window.__pwned=1</script>"  # a child of zoo/ft-00
HOSTILE_CARD = '<img src=x onerror="window.__pwned=2">'  # its declared base model
LONE_ROOT = "solo/only"  # a tree of one
FAILED = "bad/model"

_INDEX = "import sys, cli; sys.argv[0] = 'index'; cli.main()"


def _model(repo: str, day: int, declared: str = "", **kw: Any) -> ModelRecord:
    return ModelRecord(repo, SHA, "vit", kw.pop("status", "indexed"), T0 + timedelta(days=day),
                       created_at=T0 + timedelta(days=day), declared_base_model=declared,
                       declared_relation="finetune" if declared else "", bytes_read=1000 + day,
                       n_parameters=86_000_000, source="http://hub", **kw)


def _edge(repo: str, parent: str, depth: int, confidence: float, cluster: str = ROOT, root: str = ROOT) -> EdgeRecord:
    return EdgeRecord(repo, SHA, "vit", cluster, parent, root, depth, 0.01 * (depth + 1), 0.5, confidence, T0)


def family_rows() -> tuple[list[ModelRecord], list[EdgeRecord]]:
    """(models, edges) of the big family: a root, 30 children, 3 grandchildren (one hostile), a lone root."""
    models = [_model(ROOT, 0), _model(LONE_ROOT, 1)]
    edges = [_edge(ROOT, "", 0, 0.0), _edge(LONE_ROOT, "", 0, 0.0, cluster=LONE_ROOT, root=LONE_ROOT)]
    for i, repo in enumerate(CHILDREN):
        models.append(_model(repo, 2 + i, declared=ROOT))
        edges.append(_edge(repo, ROOT, 1, 0.9 - 0.01 * i))
    for i, repo in enumerate([*GRANDCHILDREN, HOSTILE]):
        declared = HOSTILE_CARD if repo == HOSTILE else CHILDREN[0]
        models.append(_model(repo, 40 + i, declared=declared))
        edges.append(_edge(repo, CHILDREN[0], 2, 0.6))
    return models, edges


def build_store(home: Path) -> Path:
    models, edges = family_rows()
    with Store.open(home) as store:
        store.append("models", models + [_model(FAILED, 50, status="failed", reason="HTTP 500 from the Hub")])
        store.append("edges", edges)
        store.append("sketches", [SketchRecord(CHILDREN[0], SHA, "vit", 1, [0.5] * 64, kurtosis=(3.0, 5.0),
                                               norms=(1.0, 2.0), layer_names=("l0", "l1"),
                                               stats=json.dumps({"pair_rule": 2}))])
    return home


def index_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", _INDEX, *args]


def run_index(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(index_cmd(*args), check=False, capture_output=True, text=True, timeout=timeout)


@contextmanager
def running_web(home: Path, *extra: str, timeout: float = 60) -> Iterator[str]:
    """`index web --port 0` in its own process; yields its URL (printed once it listens), then stops it."""
    proc = subprocess.Popen(index_cmd("web", "--home", str(home), "--port", "0", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line.startswith("http://"):
            proc.kill()
            raise AssertionError(f"index web did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
        yield line.strip()
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down cleanly
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of a GET; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8"), dict(exc.headers)


def repo_path(repo: str) -> str:
    return urllib.request.quote(repo, safe="/")
