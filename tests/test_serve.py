"""`index serve` as a real process against the Hub emulator over HTTP: one JSON summary line per run,
clean stop on SIGTERM (rows of finished models written, no cursor moved), the store lock, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from errors import BadInputError
from indexer.hub_emulator import HubEmulator
from indexer.schedule import parse_cron
from store.lock import WriteLock
from store.tables import read_records

N_MODELS = 6


def _repos(root: Path, n: int) -> None:
    repos = {}
    for i in range(n):
        rng = np.random.default_rng(i)
        folder = root / f"acme/m{i}"
        folder.mkdir(parents=True)
        save_file({f"model.layers.0.self_attn.{p}_proj.weight": rng.normal(0, 0.02, (16, 16)).astype(np.float32)
                   for p in "qkvo"}, str(folder / "model.safetensors"))
        repos[f"acme/m{i}"] = {"createdAt": f"2024-01-{i + 1:02d}T00:00:00.000Z"}
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}))


@pytest.fixture()
def emu(tmp_path: Path) -> Iterator[HubEmulator]:
    _repos(tmp_path / "hub", N_MODELS)
    with HubEmulator(tmp_path / "hub") as emulator:
        yield emulator


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "INDEX_HOME", "INDEX_CRON")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _index(*args: str) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", *args]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_index(*args), capture_output=True, text=True, env=_env(), timeout=timeout)


def _summaries(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith('{"at"')]


def _resolved(emu: HubEmulator) -> set[str]:
    return {r.path.split("/resolve/")[0].lstrip("/") for r in emu.requests() if "/resolve/" in r.path}


def test_once_without_prefetch_writes_the_same_rows(emu: HubEmulator, tmp_path: Path) -> None:
    rows = {}
    for prefetch in ("0", "3"):
        done = _run("serve", "--once", "--prefetch", prefetch, "--endpoint", emu.url, "--home", str(tmp_path / prefetch))
        assert done.returncode == 0, done.stderr
        rows[prefetch] = sorted((r.repo_id, r.status, r.bytes_read) for r in read_records(tmp_path / prefetch, "models"))
    assert len(rows["0"]) == N_MODELS and rows["0"] == rows["3"]


def test_once_crawls_and_logs_one_json_summary(emu: HubEmulator, tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = _run("serve", "--once", "--endpoint", emu.url, "--home", str(home))
    assert done.returncode == 0, done.stderr
    (summary,) = _summaries(done.stderr)
    assert summary["event"] == "crawl" and summary["status"] == "ok" and summary["indexed"] == N_MODELS
    assert len(read_records(home, "models")) == N_MODELS
    emu.clear_requests()
    again = _run("serve", "--once", "--endpoint", emu.url, "--home", str(home))
    assert _summaries(again.stderr)[0]["indexed"] == 0 and not _resolved(emu)  # incremental: nothing fetched


@pytest.mark.parametrize("mode", [["--once"], ["--run-now", "--cron", "0 3 * * *"]], ids=["once", "scheduled"])
def test_sigterm_finishes_the_current_model_and_the_next_run_resumes(emu: HubEmulator, tmp_path: Path,
                                                                     mode: list[str]) -> None:
    home = tmp_path / "home"
    emu.faults.add("slow", "/acme/*/resolve/*", count=None, seconds=0.5)  # ~0.5 s a model: time to stop mid-crawl
    proc = subprocess.Popen(_index("serve", *mode, "--endpoint", emu.url, "--home", str(home)),
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 30
        while len(_resolved(emu)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_resolved(emu)) >= 2, "the scheduled run never started"
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running 60 s after SIGTERM; stderr:\n{proc.communicate()[1]}")
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert [s["status"] for s in _summaries(stderr)] == ["stopped"]
    rows = read_records(home, "models")
    assert 1 <= len(rows) < N_MODELS  # the finished models were written, the rest left for the next run
    assert all(r.status == "indexed" for r in rows)  # type: ignore[union-attr]
    assert read_records(home, "crawl_state") == []  # no cursor moved past models never fetched
    emu.faults.clear()
    emu.clear_requests()
    done = _run("serve", "--once", "--endpoint", emu.url, "--home", str(home))
    assert done.returncode == 0, done.stderr
    assert _summaries(done.stderr)[0]["indexed"] == N_MODELS - len(rows)
    assert _resolved(emu) == {f"acme/m{i}" for i in range(N_MODELS)} - {r.repo_id for r in rows}  # type: ignore[union-attr]


def test_a_locked_store_is_one_line_and_exit_1(emu: HubEmulator, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with WriteLock(home):  # another crawler is writing
        done = _run("serve", "--once", "--endpoint", emu.url, "--home", str(home))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "locked by another process" in last
    assert [s["status"] for s in _summaries(done.stderr)] == ["locked"]
    assert not _resolved(emu)  # nothing fetched either


def test_a_second_daemon_on_one_store_is_refused(emu: HubEmulator, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = subprocess.Popen(_index("serve", "--endpoint", emu.url, "--home", str(home)),
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 30
        while not (home / ".serve" / ".lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the lock file exists a moment before it is locked
        second = _run("serve", "--endpoint", emu.url, "--home", str(home))
        assert second.returncode == 1 and "locked by another process" in second.stderr
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert not (home / "tables").exists()  # no run was due: nothing written


@pytest.mark.parametrize("args, says", [
    (["--cron", "61 3 * * *"], "--cron: '61 3 * * *' is not a crontab expression"),
    (["--cron", "every night"], "give five fields"),
    ([], "cannot reach http://127.0.0.1:9"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")),
])
def test_bad_cron_or_unreachable_hub_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str],
                                                                   says: str) -> None:
    home = tmp_path / "home"
    done = _run("serve", "--once", "--home", str(home), "--endpoint", "http://127.0.0.1:9", *args)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and says in done.stderr
    assert "Traceback" not in done.stderr
    assert not home.exists()


def test_cron_is_read_in_utc() -> None:
    trigger = parse_cron("0 3 * * *")
    after = datetime(2024, 1, 1, 4, 0, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, after) == datetime(2024, 1, 2, 3, 0, tzinfo=UTC)
    with pytest.raises(BadInputError, match="five fields"):
        parse_cron("0 3 * *")
