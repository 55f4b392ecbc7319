"""The wild zoo presets: real Hub phenomena (frozen transfer, re-saves, dtype copies, duplicates, snakes,
strangers) in really trained conv nets, checked on the files a crawler would read."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cli import index
from errors import BadInputError
from indexer.zoo.build import read_relations, read_truth
from indexer.zoo.wild.archs import ARCHS, body_drift
from indexer.zoo.wild.build import run_job
from indexer.zoo.wild.layout import layout

RELATIONS = {"", "finetune", "adapter", "quantized", "merge", "duplicate"}


def _models(zoo: Path) -> dict[str, dict]:
    return json.loads((zoo / "zoo.json").read_text())["models"]


def _by_tag(zoo: Path, tag: str) -> list[str]:
    return sorted((m for m, row in _models(zoo).items() if row["tag"] == tag), key=lambda m: _models(zoo)[m]["index"])


def _tensors(zoo: Path, repo: str) -> dict[str, torch.Tensor]:
    return load_file(str(zoo / repo / "model.safetensors"))


def _truth_rows(zoo: Path) -> list[dict[str, str]]:
    with (zoo / "truth.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _card(zoo: Path, repo: str) -> dict:
    text = (zoo / repo / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1])


def test_layout_truth_and_hub_json_describe_the_same_repos(wild_tiny_zoo: Path) -> None:
    zoo = wild_tiny_zoo
    assert (zoo / "truth.csv").read_text().splitlines()[0] == "parent,child,relation"
    truth, relations = read_truth(zoo), read_relations(zoo)
    hub = json.loads((zoo / "hub.json").read_text())
    meta = json.loads((zoo / "zoo.json").read_text())
    assert hub["version"] == 1 and meta["status"] == "done" and meta["preset"] == "wild-tiny"
    assert set(hub["repos"]) == set(truth) == set(relations) == set(meta["models"])
    assert len(truth) == 14
    for repo, parent in truth.items():
        assert sorted(p.name for p in (zoo / repo).iterdir()) == ["README.md", "config.json", "model.safetensors"]
        assert hub["repos"][repo]["gated"] is False and hub["repos"][repo]["private"] is False
        assert relations[repo] in RELATIONS and (relations[repo] == "") == (parent is None)
        card = _card(zoo, repo)
        assert card.get("base_model") == parent
        if relations[repo] in ("finetune", "quantized"):
            assert card["base_model_relation"] == relations[repo]
    assert {row["relation"] for row in _truth_rows(zoo)} == {"", "finetune", "quantized", "duplicate"}


def test_every_parent_is_uploaded_strictly_before_its_children(wild_tiny_zoo: Path) -> None:
    repos = json.loads((wild_tiny_zoo / "hub.json").read_text())["repos"]
    stamp = {r: datetime.fromisoformat(m["createdAt"]) for r, m in repos.items()}
    assert all(m["createdAt"].endswith("Z") for m in repos.values())
    for child, parent in read_truth(wild_tiny_zoo).items():
        if parent is not None:
            assert stamp[parent] < stamp[child], child


def test_zoo_json_records_phenomenon_recipe_drift_and_time(wild_tiny_zoo: Path) -> None:
    models = _models(wild_tiny_zoo)
    assert {row["tag"] for row in models.values()} == {
        "root", "stranger", "frozen-transfer", "extra-layer", "snake", "resave-prefix", "resave-nobuffer",
        "f16", "bf16", "duplicate"}
    for row in models.values():
        assert {"lr", "epochs", "drift", "seconds"} <= set(row) and row["seconds"] >= 0
        assert (row["drift"] is None) == (row["parent"] is None)
    for repo in _by_tag(wild_tiny_zoo, "frozen-transfer") + _by_tag(wild_tiny_zoo, "duplicate"):
        assert models[repo]["drift"] == 0.0
    assert all(models[r]["drift"] > 0.0 for r in _by_tag(wild_tiny_zoo, "extra-layer") + _by_tag(wild_tiny_zoo, "bf16"))


def test_frozen_transfer_siblings_have_bit_identical_bodies_and_new_heads(wild_tiny_zoo: Path) -> None:
    zoo, conv = wild_tiny_zoo, ARCHS["conv"]
    kids = _by_tag(zoo, "frozen-transfer")
    truth = read_truth(zoo)
    assert len(kids) == 2 and truth[kids[0]] == truth[kids[1]] is not None
    parent = _tensors(zoo, truth[kids[0]])
    a, b = _tensors(zoo, kids[0]), _tensors(zoo, kids[1])
    body = sorted(n for n in parent if not conv.is_head(n))
    assert body and body == sorted(n for n in a if not conv.is_head(n)) == sorted(n for n in b if not conv.is_head(n))
    for name in body:  # BatchNorm running statistics and num_batches_tracked included
        assert torch.equal(parent[name], a[name]) and torch.equal(a[name], b[name]), name
    assert a["fc.weight"].shape[0] != b["fc.weight"].shape[0] != parent["fc.weight"].shape[0]


def test_extra_layer_transfer_inserts_a_batchnorm_before_the_head(wild_tiny_zoo: Path) -> None:
    [repo] = _by_tag(wild_tiny_zoo, "extra-layer")
    names = set(_tensors(wild_tiny_zoo, repo))
    assert {"fc.0.weight", "fc.1.running_mean", "fc.1.num_batches_tracked", "fc.3.weight"} <= names
    assert "fc.weight" not in names


def test_prefix_resave_holds_the_same_tensors_under_other_names(wild_tiny_zoo: Path) -> None:
    [repo] = _by_tag(wild_tiny_zoo, "resave-prefix")
    source = _tensors(wild_tiny_zoo, read_truth(wild_tiny_zoo)[repo])
    copy = _tensors(wild_tiny_zoo, repo)
    assert set(copy) == {"model." + n for n in source}
    assert all(torch.equal(source[n], copy["model." + n]) for n in source)
    assert read_relations(wild_tiny_zoo)[repo] == "duplicate"


def test_nobuffer_resave_drops_num_batches_tracked_only(wild_tiny_zoo: Path) -> None:
    [repo] = _by_tag(wild_tiny_zoo, "resave-nobuffer")
    source = _tensors(wild_tiny_zoo, read_truth(wild_tiny_zoo)[repo])
    copy = _tensors(wild_tiny_zoo, repo)
    assert set(copy) == {n for n in source if not n.endswith("num_batches_tracked")} != set(source)
    assert all(torch.equal(source[n], copy[n]) for n in copy)


@pytest.mark.parametrize(("tag", "dtype"), [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_copies_have_that_dtype_and_the_parents_values(wild_tiny_zoo: Path, tag: str, dtype: torch.dtype) -> None:
    [repo] = _by_tag(wild_tiny_zoo, tag)
    source = _tensors(wild_tiny_zoo, read_truth(wild_tiny_zoo)[repo])
    copy = _tensors(wild_tiny_zoo, repo)
    assert set(copy) == set(source)
    for name, t in source.items():
        if t.is_floating_point():
            assert copy[name].dtype == dtype and torch.equal(copy[name], t.to(dtype)), name
        else:
            assert torch.equal(copy[name], t)
    assert read_relations(wild_tiny_zoo)[repo] == "quantized"


def test_duplicate_is_byte_identical_and_uploaded_later(wild_tiny_zoo: Path) -> None:
    [repo] = _by_tag(wild_tiny_zoo, "duplicate")
    parent = read_truth(wild_tiny_zoo)[repo]
    assert parent is not None
    assert (wild_tiny_zoo / repo / "model.safetensors").read_bytes() == (wild_tiny_zoo / parent / "model.safetensors").read_bytes()
    assert read_relations(wild_tiny_zoo)[repo] == "duplicate"


def test_strangers_share_the_architecture_but_not_the_weights(wild_tiny_zoo: Path) -> None:
    zoo, conv = wild_tiny_zoo, ARCHS["conv"]
    [root] = _by_tag(zoo, "root")
    strangers = _by_tag(zoo, "stranger")
    truth = read_truth(zoo)
    assert len(strangers) == 2 and truth[root] is None and all(truth[s] is None for s in strangers)
    ref = _tensors(zoo, root)
    shapes = {n: t.shape for n, t in ref.items() if not conv.is_head(n)}
    for s in strangers:
        other = _tensors(zoo, s)
        assert {n: t.shape for n, t in other.items() if not conv.is_head(n)} == shapes
        drift = body_drift(conv, ref, other)
        assert drift is not None and drift > 0.5  # unrelated: as far apart as two inits


def test_snake_is_a_chain_of_three_checkpoints_of_one_run(wild_tiny_zoo: Path) -> None:
    truth, models = read_truth(wild_tiny_zoo), _models(wild_tiny_zoo)
    k1, k2, k3 = _by_tag(wild_tiny_zoo, "snake")
    assert truth[k2] == k1 and truth[k3] == k2 and models[truth[k1]]["tag"] == "root"
    assert models[k1]["steps"] < models[k2]["steps"] < models[k3]["steps"]


def test_the_same_seed_gives_byte_identical_weights(wild_tiny_zoo: Path, tmp_path: Path) -> None:
    specs = {s.repo_id: s for s in layout("wild-tiny", 0)}
    [frozen, _] = _by_tag(wild_tiny_zoo, "frozen-transfer")
    parent = specs[frozen].parent
    assert parent is not None
    shutil.copytree(wild_tiny_zoo / parent, tmp_path / parent)  # the job reads its parent's file
    run_job((specs[frozen],), tmp_path, 0)
    assert (tmp_path / frozen / "model.safetensors").read_bytes() == (wild_tiny_zoo / frozen / "model.safetensors").read_bytes()


def test_body_drift_is_the_median_relative_l2_of_body_matrices() -> None:
    conv = ARCHS["conv"]
    a = {"conv1.weight": torch.ones(2, 2), "layer1.0.conv1.weight": torch.ones(2, 2), "x.weight": torch.ones(2, 2),
         "fc.weight": torch.ones(2, 2), "bn1.running_var": torch.ones(2, 2), "bn1.weight": torch.ones(2)}
    b = {"conv1.weight": torch.zeros(2, 2), "layer1.0.conv1.weight": 2 * torch.ones(2, 2), "x.weight": torch.ones(2, 2),
         "fc.weight": torch.zeros(2, 2), "bn1.running_var": torch.zeros(2, 2), "bn1.weight": torch.zeros(2)}
    assert body_drift(conv, a, b) == 1.0  # median of (1, 1, 0): the head, statistics and 1-D norms left out
    assert body_drift(conv, a, {}) is None


def test_read_relations_reads_a_two_column_truth_as_fine_tunes(tmp_path: Path) -> None:
    (tmp_path / "truth.csv").write_text("parent,child\n,a/root\na/root,b/kid\n")
    assert read_truth(tmp_path) == {"a/root": None, "b/kid": "a/root"}
    assert read_relations(tmp_path) == {"a/root": "", "b/kid": "finetune"}
    (tmp_path / "truth.csv").write_text("parent,kid,relation\n")
    with pytest.raises(BadInputError, match="header"):
        read_relations(tmp_path)


def test_cli_builds_a_wild_preset_and_ignores_split(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    result = CliRunner().invoke(index, ["zoo", "make", str(out), "--preset", "wild-tiny", "--split", "lora-v",
                                        "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["n_models"], summary["n_trees"]) == (14, 3)
    assert (out / "truth.csv").read_text().startswith("parent,child,relation\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a zoo")
    refused = CliRunner().invoke(index, ["zoo", "make", str(tmp_path / "other"), "--preset", "wild-tiny", "--force"])
    assert isinstance(refused.exception, BadInputError) and (tmp_path / "other" / "keep.txt").exists()


def test_the_hub_emulator_serves_a_wild_zoo_to_the_real_client(wild_tiny_zoo: Path) -> None:
    from huggingface_hub import HfApi

    from indexer.hub_emulator import HubEmulator

    [bf16] = _by_tag(wild_tiny_zoo, "bf16")
    with HubEmulator(wild_tiny_zoo) as emu:
        api = HfApi(endpoint=emu.url)
        assert {m.id for m in api.list_models(sort="created_at")} == set(read_truth(wild_tiny_zoo))
        meta = api.get_safetensors_metadata(bf16)
        info = api.model_info(bf16, expand=["baseModels"])
    assert set(meta.parameter_count) == {"BF16", "I64"}  # num_batches_tracked stays int64
    assert info.base_models == {"relation": "quantized", "models": [{"id": read_truth(wild_tiny_zoo)[bf16]}]}
