"""`index compare A B` on the tiny zoo: local folders and Hub repos read by range over HTTP."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from cli import index
from indexer.hub_emulator import HubEmulator
from indexer.lineage.compare import compare, load_local


def _truth(zoo: Path) -> list[tuple[str, str]]:
    with (zoo / "truth.csv").open() as fh:
        return [(r["parent"], r["child"]) for r in csv.DictReader(fh)]


def test_parent_and_child_are_related_and_oriented_by_time(tiny_ft_zoo: Path) -> None:
    parent, child = next((p, c) for p, c in _truth(tiny_ft_zoo) if p)
    result = compare(load_local(tiny_ft_zoo / child), load_local(tiny_ft_zoo / parent))
    assert result.comparable and result.related and result.p_value < 1e-6
    assert result.direction == "B -> A" and "upload time" in result.direction_why
    assert not result.identical and result.tail_distance > 0


def test_roots_of_two_trees_are_not_related(tiny_ft_zoo: Path) -> None:
    roots = [c for p, c in _truth(tiny_ft_zoo) if not p]
    result = compare(load_local(tiny_ft_zoo / roots[0]), load_local(tiny_ft_zoo / roots[1]))
    assert result.comparable and not result.related and result.p_value > 1e-6
    assert result.direction == "none"


def test_a_copy_is_a_duplicate(tiny_ft_zoo: Path, tmp_path: Path) -> None:
    _, child = next((p, c) for p, c in _truth(tiny_ft_zoo) if p)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((tiny_ft_zoo / child / "model.safetensors").read_bytes())
    result = compare(load_local(tiny_ft_zoo / child), load_local(copy))
    assert result.identical and result.direction == "duplicate"


def test_cli_incomparable_models_exit_0_in_one_line(tiny_ft_zoo: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    save_file({"net.0.weight": np.ones((16, 16), np.float32)}, str(other / "model.safetensors"))
    _, child = next((p, c) for p, c in _truth(tiny_ft_zoo) if p)
    res = CliRunner().invoke(index, ["compare", str(tiny_ft_zoo / child), str(other)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().startswith("not comparable") and len(res.output.strip().splitlines()) == 1


def test_cli_missing_folder_exits_1_naming_it(tiny_ft_zoo: Path) -> None:
    _, child = next((p, c) for p, c in _truth(tiny_ft_zoo) if p)
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "compare", str(tiny_ft_zoo / child),
                           "/no/such/folder"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "/no/such/folder" in proc.stderr


def test_cli_compares_hub_repos_by_range(tiny_ft_zoo: Path) -> None:
    parent, child = next((p, c) for p, c in _truth(tiny_ft_zoo) if p)
    with HubEmulator(tiny_ft_zoo) as emu:
        res = CliRunner().invoke(index, ["compare", parent, child, "--endpoint", emu.url, "--json"])
        missing = CliRunner().invoke(index, ["compare", parent, "nobody/nothing", "--endpoint", emu.url])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["related"] and out["direction"] == "A -> B" and out["comparable"]
    assert missing.exit_code == 1 and "nobody/nothing" in str(missing.exception)


@pytest.mark.parametrize("prefix", ["bert.", "0.auto_model.", "model."])
def test_a_renamed_resave_without_buffers_is_the_same_model(tiny_ft_zoo: Path, tmp_path: Path, prefix: str) -> None:
    from safetensors.numpy import load_file

    _, child = next((p, c) for p, c in _truth(tiny_ft_zoo) if p)
    tensors = load_file(str(tiny_ft_zoo / child / "model.safetensors"))
    renamed = {prefix + n: a for n, a in tensors.items()}
    renamed[prefix + "embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    out = tmp_path / "resave"
    out.mkdir()
    save_file(renamed, str(out / "model.safetensors"))
    result = compare(load_local(tiny_ft_zoo / child), load_local(out))
    assert result.comparable and result.identical and result.direction == "duplicate"
