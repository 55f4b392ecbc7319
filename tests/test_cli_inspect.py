"""`index inspect`: the tensor table and JSON of a file or repo folder, read from headers only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import cli
from sketches.safetensors import MAX_HEADER_BYTES

INDEX = Path(sys.executable).parent / "index"  # the console script of the venv running the tests


def run_index(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "INDEX_DEBUG"}
    return subprocess.run([str(INDEX), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Two shards and an index; one tensor is 1 MiB, so reading any tensor data would show in bytes_read."""
    shards = {
        "model-00001-of-00002.safetensors": {
            "embed.weight": torch.ones(512, 512),
            "norm.weight": torch.ones(512, dtype=torch.bfloat16),
        },
        "model-00002-of-00002.safetensors": {"head.weight": torch.ones(10, 512, dtype=torch.float16)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        safetensors.torch.save_file(tensors, str(tmp_path / shard))
        weight_map.update({name: shard for name in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def header_bytes_of(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_json_of_a_sharded_folder_reads_headers_only(sharded: Path) -> None:
    result = run_index("inspect", "--json", str(sharded))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert out["path"] == str(sharded) and out["files"] == files
    assert out["tensors"] == [
        {"name": "embed.weight", "dtype": "F32", "shape": [512, 512], "bytes": 1048576, "file": files[0]},
        {"name": "head.weight", "dtype": "F16", "shape": [10, 512], "bytes": 10240, "file": files[1]},
        {"name": "norm.weight", "dtype": "BF16", "shape": [512], "bytes": 1024, "file": files[0]},
    ]
    assert out["total_tensors"] == 3
    assert out["total_parameters"] == 512 * 512 + 10 * 512 + 512
    assert out["total_bytes"] == 1048576 + 10240 + 1024
    expected_header_bytes = sum(header_bytes_of(sharded / f) for f in files)
    assert out["header_bytes"] == expected_header_bytes
    assert out["bytes_read"] == expected_header_bytes


def test_table_of_a_single_file(sharded: Path) -> None:
    result = CliRunner().invoke(cli.index, ["inspect", str(sharded / "model-00001-of-00002.safetensors")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "bytes"]
    assert lines[1].split() == ["embed.weight", "F32", "[512,", "512]", "1,048,576"]
    assert lines[2].split() == ["norm.weight", "BF16", "[512]", "1,024"]
    totals = dict(line.rsplit(":", 1) for line in lines[4:])
    totals = {k: int(v.replace(",", "")) for k, v in totals.items()}
    assert totals["tensors"] == 2 and totals["parameters"] == 512 * 512 + 512
    assert totals["bytes of tensors"] == 1048576 + 1024 and totals["files"] == 1
    expected = header_bytes_of(sharded / "model-00001-of-00002.safetensors")
    assert totals["header bytes"] == totals["bytes read"] == expected


def test_inspect_has_help() -> None:
    result = CliRunner().invoke(cli.index, ["inspect", "--help"])
    text = " ".join(result.output.split())  # click wraps the docstring
    assert result.exit_code == 0 and "reading headers only" in text and "--json" in text


def bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a piece of the reason the one error line must give)."""
    good = tmp / "good.safetensors"
    safetensors.torch.save_file({"w": torch.ones(64, 64)}, str(good))
    raw = good.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(raw[:-100])
    (tmp / "text.safetensors").write_text("this is a README, not weights\n")
    (tmp / "cap.safetensors").write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    return {
        "missing": (tmp / "missing.safetensors", "no such file or directory"),
        "truncated": (tmp / "truncated.safetensors", "but the file has"),
        "not safetensors": (tmp / "text.safetensors", "not a safetensors file?"),
        "header over the cap": (tmp / "cap.safetensors", f"over the {MAX_HEADER_BYTES}-byte cap"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not safetensors", "header over the cap"])
def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, case: str) -> None:
    path, reason = bad_inputs(tmp_path)[case]
    result = run_index("inspect", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {path}: ") and reason in result.stderr


def test_pickle_only_folder_through_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    monkeypatch.delenv("INDEX_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["index", "inspect", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    reason = "no safetensors weights (pickled weights are never loaded): found pytorch_model.bin"
    assert err == f"error: {tmp_path}: {reason}\n"
