"""The zoo generator: real training, Hub-style repos, ground truth that matches the cards and the weights.

`tiny` is built once per session (2 trees x 4 models, full fine-tuning, two worker processes); the
LoRA checks train one tree of the tiny LoRA-V layout (a root and three LoRA fine-tunes) in process.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file

from cli import index
from errors import BadInputError
from indexer.zoo import layout, make_zoo, read_truth
from indexer.zoo.build import FT_LRS, LORA_V_RANKS, ModelSpec, train_one, write_zoo
from indexer.zoo.data import TASKS, make_task_data

pytestmark = pytest.mark.slow

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NAME = re.compile(r"^[a-z]+(-[a-z]+)*/vit-(digits|shapes)-[0-9a-f]{4}$")


@pytest.fixture(scope="module")
def tiny_ft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "tiny-ft"
    summary = make_zoo(out, preset="tiny", split="ft", seed=0, workers=2)
    assert (summary.n_models, summary.n_trees) == (8, 2)
    return out


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ModelSpec]]:
    out = tmp_path_factory.mktemp("zoo") / "tiny-lora-v"
    specs = [s for s in layout("tiny", "lora-v", 0) if s.tree == 0]
    write_zoo(out, specs, preset="tiny", split="lora-v", seed=0, workers=1)
    return out, specs


def _card(repo: Path) -> tuple[dict[str, object], str]:
    text = (repo / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _zoo(out: Path) -> dict[str, dict[str, object]]:
    return json.loads((out / "zoo.json").read_text())["models"]


def _created(out: Path) -> dict[str, datetime]:
    hub = json.loads((out / "hub.json").read_text())
    assert hub["version"] == 1
    return {k: datetime.strptime(v["createdAt"], "%Y-%m-%dT%H:%M:%S.%fZ") for k, v in hub["repos"].items()}


def test_layout_of_the_written_zoo(tiny_ft: Path) -> None:
    truth = read_truth(tiny_ft)
    assert len(truth) == 8
    assert sorted(p.name for p in tiny_ft.iterdir() if p.is_file()) == ["hub.json", "truth.csv", "zoo.json"]
    for repo_id in truth:
        assert NAME.match(repo_id), repo_id
        files = sorted(p.name for p in (tiny_ft / repo_id).iterdir())
        assert files == ["README.md", "config.json", "model.safetensors"]
    roots = [c for c, p in truth.items() if p is None]
    assert len(roots) == 2
    # tiny: root -> 2 children, one of which has 1 grandchild
    for root in roots:
        kids = [c for c, p in truth.items() if p == root]
        assert len(kids) == 2
        assert sorted(sum(p == k for p in truth.values()) for k in kids) == [0, 1]
    rows = (tiny_ft / "truth.csv").read_text().splitlines()
    assert rows[0] == "parent,child" and rows[1:] == sorted(rows[1:], key=lambda r: r.split(",")[1])
    meta = json.loads((tiny_ft / "zoo.json").read_text())
    assert (meta["status"], meta["preset"], meta["split"], meta["seed"]) == ("done", "tiny", "ft", 0)
    assert meta["total_seconds"] > 0


def test_cards_carry_the_truth(tiny_ft: Path) -> None:
    truth = read_truth(tiny_ft)
    zoo = _zoo(tiny_ft)
    for child, parent in truth.items():
        meta, body = _card(tiny_ft / child)
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
        assert meta.get("base_model") == parent
        assert meta.get("base_model_relation") == ("finetune" if parent else None)
        row = zoo[child]
        assert f"- learning rate: {row['lr']:g}" in body
        assert f"- epochs: {row['epochs']}" in body
        assert f"held-out accuracy: {row['test_accuracy']:.4f}" in body
        assert f"- task: {row['task']} " in body


def test_upload_times_put_parents_first(tiny_ft: Path) -> None:
    hub = json.loads((tiny_ft / "hub.json").read_text())
    assert all(ISO_MS.match(r["createdAt"]) and r["gated"] is False and r["private"] is False
               for r in hub["repos"].values())
    created = _created(tiny_ft)
    for child, parent in read_truth(tiny_ft).items():
        if parent is not None:
            assert created[parent] < created[child]


def test_vthr_layout_is_the_papers_and_interleaves_uploads() -> None:
    specs = layout("vthr", "lora-v", 0)
    assert len(specs) == 105
    by_id = {s.repo_id: s for s in specs}
    kids = Counter(s.parent for s in specs)
    assert kids[None] == 5 and all(kids[s.repo_id] == 4 for s in specs if s.level < 2)
    for s in specs:
        if s.parent is None:
            assert (s.method, TASKS[s.task].kind) == ("scratch", "root")
            continue
        parent = by_id[s.parent]
        assert s.task != parent.task and parent.created_at < s.created_at
        assert s.lr in FT_LRS and 10 <= s.epochs <= 20 and s.rank in LORA_V_RANKS
    siblings = {(s.parent, s.task) for s in specs if s.parent is not None}
    assert len(siblings) == 100  # siblings never share a task (roots do: there are 2 broad tasks)
    # upload order is not tree by tree: the tree of consecutive uploads changes often
    trees = [s.tree for s in sorted(specs, key=lambda s: s.created_at)]
    assert sum(a != b for a, b in zip(trees, trees[1:], strict=False)) > 40
    assert len({s.repo_id.split("/")[0] for s in specs if s.tree == 0}) > 3  # orgs are not per tree
    assert {s.rank for s in layout("vthr", "lora-f", 0)} == {None, 16}
    ft = layout("vthr", "ft", 0)
    assert all(2 <= s.epochs <= 5 and s.lr in FT_LRS for s in ft if s.level > 0)
    assert layout("vthr", "ft", 0) == ft and layout("vthr", "ft", 1) != ft


def test_tensor_names_are_a_plain_vits(tiny_ft: Path, tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    for repo_id in read_truth(tiny_ft):
        repo = tiny_ft / repo_id
        plain = ViTForImageClassification(ViTConfig.from_pretrained(repo))
        plain.save_pretrained(tmp_path / "plain")
        with safe_open(str(tmp_path / "plain" / "model.safetensors"), "np") as f:
            want = sorted(f.keys())
        with safe_open(str(repo / "model.safetensors"), "np") as f:
            got = sorted(f.keys())
            assert all(f.get_slice(k).get_dtype() == "F32" for k in got)
        assert got == want
        assert "vit.encoder.layer.3.attention.attention.value.weight" in got
        assert "vit.encoder.layer.0.attention.output.dense.weight" in got
        assert not any("lora" in k or "base_model" in k or "modules_to_save" in k for k in got)


def test_training_really_learns(tiny_ft: Path) -> None:
    zoo = _zoo(tiny_ft)
    for row in zoo.values():
        losses = row["epoch_losses"]
        assert len(losses) == row["epochs"] and losses[-1] < losses[0], row["repo_id"]
        if row["level"] == 0:
            chance = 1 / TASKS[row["task"]].n_classes
            assert losses[-1] < 0.9 * losses[0]
            assert row["test_accuracy"] > 2 * chance and row["train_accuracy"] > 2 * chance


def test_recorded_accuracy_is_the_models(tiny_ft: Path) -> None:
    """The card's held-out accuracy is what the published weights really score."""
    from transformers import ViTForImageClassification

    from indexer.zoo.train import accuracy

    zoo = _zoo(tiny_ft)
    child = next(r for r in sorted(zoo.values(), key=lambda r: r["repo_id"]) if r["level"] == 1)
    model = ViTForImageClassification.from_pretrained(tiny_ft / child["repo_id"])
    data = make_task_data(child["task"], zoo_seed=0, model_seed=child["seed"], n_train=8)
    assert accuracy(model, data.x_test, data.y_test) == pytest.approx(child["test_accuracy"])


def test_same_seed_gives_the_same_bytes(tiny_ft: Path, tmp_path: Path) -> None:
    specs = {s.repo_id: s for s in layout("tiny", "ft", 0)}
    child = next(s for s in sorted(specs.values(), key=lambda s: s.index) if s.level == 2)
    parent = specs[child.parent or ""]
    shutil.copytree(tiny_ft / parent.repo_id, tmp_path / parent.repo_id)
    train_one(child, tmp_path, zoo_seed=0)  # in this process; the zoo trained it in a worker
    name = "model.safetensors"
    assert (tmp_path / child.repo_id / name).read_bytes() == (tiny_ft / child.repo_id / name).read_bytes()
    # and the fine-tune really moved away from its parent
    a, b = load_file(tmp_path / child.repo_id / name), load_file(tiny_ft / parent.repo_id / name)
    key = "vit.encoder.layer.0.attention.attention.key.weight"
    assert not np.array_equal(a[key], b[key])


def test_lora_children_differ_from_parents_by_low_rank(tiny_lora: tuple[Path, list[ModelSpec]]) -> None:
    out, specs = tiny_lora
    assert len(specs) == 4 and sum(s.method == "lora" for s in specs) == 3
    for spec in specs:
        if spec.parent is None:
            continue
        child = load_file(out / spec.repo_id / "model.safetensors")
        parent = load_file(out / spec.parent / "model.safetensors")
        assert spec.rank is not None
        for b in range(4):
            att = f"vit.encoder.layer.{b}.attention"
            for proj in ("query", "value"):
                delta = child[f"{att}.attention.{proj}.weight"] - parent[f"{att}.attention.{proj}.weight"]
                assert 0 < np.linalg.matrix_rank(delta) <= spec.rank
            for frozen in (f"{att}.attention.key.weight", f"{att}.output.dense.weight",
                           f"vit.encoder.layer.{b}.intermediate.dense.weight"):
                assert np.array_equal(child[frozen], parent[frozen])
        meta, body = _card(out / spec.repo_id)
        assert meta["base_model"] == spec.parent and "lora" in meta["tags"]
        assert f"- LoRA rank: {spec.rank} " in body
    assert read_truth(out) == {s.repo_id: s.parent for s in specs}


def test_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not empty"):
        make_zoo(tmp_path, preset="tiny", split="ft")
    with pytest.raises(BadInputError, match="not a zoo"):
        make_zoo(tmp_path, preset="tiny", split="ft", force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    result = CliRunner().invoke(index, ["zoo", "make", str(tmp_path), "--preset", "huge"])
    assert result.exit_code == 2 and "huge" in result.output
    result = CliRunner().invoke(index, ["zoo", "make", str(tmp_path)])
    assert isinstance(result.exception, BadInputError)


def test_stats_average_per_level(tiny_ft: Path) -> None:
    from indexer.zoo.stats import zoo_stats

    stats = zoo_stats(tiny_ft)
    zoo = _zoo(tiny_ft)
    assert [(lev.level, lev.n_models) for lev in stats.levels] == [("root", 2), ("child", 4), ("grandchild", 2)]
    roots = [r["test_accuracy"] for r in zoo.values() if r["level"] == 0]
    assert stats.levels[0].test_accuracy == pytest.approx(sum(roots) / 2)
    result = CliRunner().invoke(index, ["zoo", "stats", str(tiny_ft), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["levels"][1]["n_models"] == 4


def test_read_truth_refuses_a_folder_without_truth(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="truth.csv"):
        read_truth(tmp_path)
    (tmp_path / "truth.csv").write_text("a,b\n")
    with pytest.raises(BadInputError, match="header"):
        read_truth(tmp_path)
