"""The main job end to end, as `make demo` runs it, through the real CLI in real processes:
a really trained zoo -> the Hub emulator on 127.0.0.1 -> `index crawl` over HTTP -> query -> export ->
`index eval --forest`. Pins the wiring between the parts, which each module's own tests cannot see.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from indexer.hub_emulator import HubEmulator


def _index(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys, cli; sys.argv[0] = 'index'; cli.main()"
    env = {"INDEX_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def crawled(tiny_ft_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    home = tmp_path_factory.mktemp("e2e") / "home"
    with HubEmulator(tiny_ft_zoo) as emu:
        first = _index("crawl", "--endpoint", emu.url, "--json", home=home)
        assert first.returncode == 0, first.stderr
        again = _index("crawl", "--endpoint", emu.url, "--json", home=home)
        assert again.returncode == 0, again.stderr
    return tiny_ft_zoo, home, {"first": json.loads(first.stdout), "again": json.loads(again.stdout)}


def _truth(zoo: Path) -> dict[str, str]:
    with open(zoo / "truth.csv", newline="") as f:
        return {row["child"]: row["parent"] for row in csv.DictReader(f)}


def test_crawl_indexes_every_model_then_nothing(crawled: tuple[Path, Path, dict]) -> None:
    zoo, _, runs = crawled
    n = len(_truth(zoo))
    assert runs["first"]["indexed"] == n and not runs["first"]["failed"] and not runs["first"]["skipped"]
    assert runs["again"]["indexed"] == 0 and runs["again"]["bytes_read_total"] == 0


def test_export_is_one_row_per_model_and_recovers_the_lineage(crawled: tuple[Path, Path, dict], tmp_path: Path) -> None:
    zoo, home, _ = crawled
    out = tmp_path / "forest.parquet"
    done = _index("export", str(out), home=home)
    assert done.returncode == 0, done.stderr
    rows = dict(duckdb.sql(f"select repo_id, parent from '{out}'").fetchall())
    truth = _truth(zoo)
    assert sorted(rows) == sorted(truth)
    edges = [(child, parent) for child, parent in truth.items() if parent]
    correct = sum(rows[child] == parent for child, parent in edges)
    assert correct / len(edges) >= 0.8, rows  # the tiny zoo: 6 edges, 2 unrelated trees

    scored = _index("eval", str(zoo), "--forest", str(out), "--truth", str(zoo / "truth.csv"), "--json", home=home)
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["correct"] == correct and report["edges"] == len(edges)
    assert report["clustering_accuracy"] == 1.0


def test_query_shows_ancestry_and_declared_base(crawled: tuple[Path, Path, dict]) -> None:
    zoo, home, _ = crawled
    child = next(c for c, p in sorted(_truth(zoo).items()) if p)
    done = _index("query", child, "--json", home=home)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["repo_id"] == child and report["in_forest"]
    assert report["declared_base_model"] == _truth(zoo)[child]  # shown beside the answer, never used for it
    assert report["agrees_with_declared"] == (report["parent"] == _truth(zoo)[child])


def test_unknown_repo_is_one_line_with_a_suggestion(crawled: tuple[Path, Path, dict]) -> None:
    zoo, home, _ = crawled
    child = sorted(_truth(zoo))[0]
    typo = child[:-1] + ("x" if child[-1] != "x" else "y")
    done = _index("query", typo, home=home)
    assert done.returncode == 1
    assert child in done.stderr and "Traceback" not in done.stderr
