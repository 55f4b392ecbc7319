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


def test_quantized_copies_are_read_dequantized_and_judged_as_copies(tmp_path: Path) -> None:
    """An auditor's commonest question: is this GGUF / GPTQ / AWQ file derived from our model? Local quantized
    folders are read by the crawl's reader; the copy within its scheme's error is the child, `quantized`."""
    from test_crawl_relations import HEADS, KV_HEADS, LLAMA_CONFIG, llama_state, tuned

    from indexer.zoo.quantize import write_awq, write_gptq, write_llama_gguf

    base = llama_state(1)
    child = tuned(base, 2)
    for name, state in (("base", base), ("child", child)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "gguf").mkdir()
    write_llama_gguf(tmp_path / "gguf" / "child-Q8_0.gguf", child, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    write_gptq(tmp_path / "gptq", child, LLAMA_CONFIG, bits=4, group=32)
    write_awq(tmp_path / "awq", child, LLAMA_CONFIG, fold_seed=3, spread=1.0)  # AutoAWQ's scales folded in
    for copy, scheme in (("gguf", "gguf-Q8_0"), ("gptq", "gptq-4bit"), ("awq", "awq-4bit")):
        c = compare(load_local(tmp_path / "child"), load_local(tmp_path / copy))
        assert (c.related, c.direction, c.quantized, c.scheme) == (True, "A -> B", "B", scheme), (copy, c)
        assert c.copy_distance <= c.copy_limit
    # an 8-bit copy of the fine-tune against the base: related, but beyond Q8_0's error (4-bit errors are as
    # large as this fine-tune's drift, 0.3: there the copy reads as one of the base's, or of a close fine-tune)
    beyond = compare(load_local(tmp_path / "gguf"), load_local(tmp_path / "base"))
    assert beyond.related and beyond.quantized == "A" and beyond.copy_distance > beyond.copy_limit
    assert "quantized copy" not in beyond.direction_why
    result = CliRunner().invoke(index, ["compare", str(tmp_path / "child"), str(tmp_path / "awq")])
    assert result.exit_code == 0 and "B is a quantized copy (awq-4bit) of A" in result.output


def test_an_adapter_is_compared_as_an_adapter(tmp_path: Path) -> None:
    """Before: refused ("compare its base model"). Now: whether the model's shapes take its updates."""
    from test_crawl_relations import lora_config

    (tmp_path / "lora").mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 32), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 4), np.float32)},
              str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(lora_config("acme/base")))
    (tmp_path / "other").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": np.ones((32, 32), np.float32)}, str(tmp_path / "other" / "model.safetensors"))
    result = CliRunner().invoke(index, ["compare", str(tmp_path / "other"), str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert "adapter: B (declares base 'acme/base')" in result.output and "compatible, 1 of 1 updates fit" in result.output
    assert "direction: A -> B" in result.output and "(it declares 'acme/base')" in result.output
    save_file({"model.layers.0.self_attn.q_proj.weight": np.ones((16, 32), np.float32)}, str(tmp_path / "other" / "model.safetensors"))
    result = CliRunner().invoke(index, ["compare", str(tmp_path / "other"), str(tmp_path / "lora"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["verdict"] == "incompatible"
