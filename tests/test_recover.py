"""End to end: folders of real safetensors repos -> recovered forest -> scores, through the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from cli import index
from errors import BadInputError, RecoveryError
from indexer.evaluate import evaluate, evaluate_folder, read_truth_csv, truth_from_cards
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover, render_forest, write_parquet
from indexer.lineage.synthetic import SyntheticSpec, write_synthetic_zoo


@pytest.fixture(scope="module")
def ft_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ft")
    write_synthetic_zoo(out, SyntheticSpec(trees=3, children=3, grandchildren=2, seed=1))
    return out


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    write_synthetic_zoo(out, SyntheticSpec(trees=2, children=3, grandchildren=2, lora_rank=3, seed=2))
    return out


@pytest.fixture(scope="module")
def tiny_zoo(tiny_ft_zoo: Path) -> Path:
    return tiny_ft_zoo  # built once per session in conftest.py


# --- accuracy on known lineages ------------------------------------------------------------------


def test_mother_recovers_synthetic_full_ft(ft_zoo: Path) -> None:
    forest = recover(ft_zoo, Options())
    report = evaluate(forest, read_truth_csv(ft_zoo / "truth.csv"))
    assert report.accuracy == 1.0 and report.clustering_accuracy == 1.0
    assert any("K=3 chosen" in note for note in forest.notes)
    assert any("tail distance" in note for note in forest.notes)  # full FT: the spectral-tail distance
    old = recover(ft_zoo, Options(distance="l2n"))  # the previous default stays available (ablation row)
    assert any("l2n distance" in note for note in old.notes)
    assert evaluate(old, read_truth_csv(ft_zoo / "truth.csv")).accuracy == 1.0


def test_mother_picks_rank_distance_for_lora(lora_zoo: Path) -> None:
    forest = recover(lora_zoo, Options())
    assert all("rank distance on 2 layers" in n for n in forest.notes if ": tree " in n)  # value layers
    assert evaluate(forest, read_truth_csv(lora_zoo / "truth.csv")).accuracy == 1.0


def test_mother_paper_and_phylogeny_run_with_k(ft_zoo: Path, lora_zoo: Path) -> None:
    truth = read_truth_csv(ft_zoo / "truth.csv")
    paper = evaluate(recover(ft_zoo, Options(method="mother-paper", trees=3)), truth)
    assert paper.clustering_accuracy == 1.0 and paper.accuracy >= 0.9
    rank = recover(lora_zoo, Options(method="mother-paper", trees=2, distance="rank"))
    assert evaluate(rank, read_truth_csv(lora_zoo / "truth.csv")).accuracy == 1.0
    phylo = evaluate(recover(ft_zoo, Options(method="phylogeny", trees=3)), truth)
    assert phylo.clustering_accuracy == 1.0 and phylo.accuracy >= 0.5


def test_tiny_zoo_end_to_end(tiny_zoo: Path) -> None:
    truth = read_truth_csv(tiny_zoo / "truth.csv")
    assert truth_from_cards(tiny_zoo) == truth  # the cards declare the same lineage as truth.csv
    report = evaluate(recover(tiny_zoo, Options()), truth)
    assert report.clustering_accuracy == 1.0
    assert report.accuracy >= 5 / 6  # 8 models, 6 edges: at most one wrong


def test_recovery_never_reads_cards(ft_zoo: Path, tmp_path: Path) -> None:
    before = recover(ft_zoo, Options()).rows
    for folder in sorted(p.parent for p in ft_zoo.rglob("model.safetensors")):
        (folder / "README.md").write_text("---\nbase_model: org0/root\n---\nlies\n")
    try:
        assert recover(ft_zoo, Options()).rows == before
        assert set(truth_from_cards(ft_zoo).values()) == {"org0/root"}  # eval does read them
    finally:
        for readme in ft_zoo.rglob("README.md"):
            readme.unlink()


def test_same_input_same_output(ft_zoo: Path, tmp_path: Path) -> None:
    a, b = recover(ft_zoo, Options()), recover(ft_zoo, Options())
    assert a == b
    write_parquet(a, tmp_path / "a.parquet")
    write_parquet(b, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


# --- failures and families -----------------------------------------------------------------------


def _copy_zoo(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_nan_model_is_a_recorded_failure(ft_zoo: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    _copy_zoo(ft_zoo, zoo)
    bad = zoo / "org1" / "c2-g1" / "model.safetensors"
    weights = {"vit.encoder.layer.0.attention.attention.query.weight": np.full((32, 32), np.nan, np.float32)}
    save_file(weights | _other_tensors(zoo / "org1" / "root"), str(bad))
    forest = recover(zoo, Options())
    (failed,) = forest.failures()
    assert failed.repo_id == "org1/c2-g1" and "NaN" in failed.reason and failed.cluster == -1
    assert "org1/c2-g1" not in set(forest.parents().values())
    truth = read_truth_csv(zoo / "truth.csv")
    report = evaluate(forest, truth)
    assert report.failed == 1 and report.correct == report.edges - 1  # only the failed model's edge is lost


def _other_tensors(repo: Path) -> dict[str, np.ndarray]:
    from sketches.safetensors import open_local_repo

    with open_local_repo(repo) as w:
        return {n: w.read(n) for n in w.tensors() if n != "vit.encoder.layer.0.attention.attention.query.weight"}


def test_two_families_are_never_compared(tmp_path: Path) -> None:
    write_synthetic_zoo(tmp_path / "a", SyntheticSpec(trees=2, hidden=16, seed=3))
    write_synthetic_zoo(tmp_path / "b", SyntheticSpec(trees=2, hidden=24, seed=4))
    forest = recover(tmp_path, Options())
    families = {r.repo_id: r.family for r in forest.rows}
    assert len(set(families.values())) == 2
    for r in forest.rows:
        assert r.parent == "" or families[r.parent] == r.family
        assert r.repo_id.split("/")[0] == (r.parent or r.repo_id).split("/")[0]
    assert len({r.cluster for r in forest.rows}) == 4
    truth = {f"{side}/{k}": (f"{side}/{v}" if v else "") for side in "ab" for k, v in read_truth_csv(tmp_path / side / "truth.csv").items()}
    assert evaluate(forest, truth).clustering_accuracy == 1.0
    with pytest.raises(BadInputError, match="families"):
        recover(tmp_path, Options(method="mother-paper", trees=1))
    paper = recover(tmp_path, Options(method="mother-paper", trees=4))
    assert evaluate(paper, truth).clustering_accuracy == 1.0


def test_single_model_is_a_root(ft_zoo: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ft_zoo / "org0" / "root", tmp_path / "solo" / "m")
    (row,) = recover(tmp_path / "solo", Options()).rows
    assert (row.repo_id, row.parent, row.cluster) == ("m", "", 0)
    assert math.isnan(row.distance)


def test_empty_folder_and_pickles_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no safetensors"):
        recover(tmp_path, Options())
    (tmp_path / "org" / "m").mkdir(parents=True)
    (tmp_path / "org" / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(BadInputError, match="no safetensors"):
        recover(tmp_path, Options())


def test_every_model_broken_is_a_recovery_error(tmp_path: Path) -> None:
    (tmp_path / "org" / "m").mkdir(parents=True)
    (tmp_path / "org" / "m" / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(RecoveryError, match="failed to load"):
        recover(tmp_path, Options())


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_recover_json_out_and_tree(ft_zoo: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "edges.parquet"
    res = runner.invoke(index, ["recover", str(ft_zoo), "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    table = pq.read_table(out)
    assert table.schema.metadata[b"model_graph_index.forest_version"] == b"3"
    assert table.column("repo_id").to_pylist() == [r["repo_id"] for r in rows]
    assert {"repo_id", "parent", "cluster", "distance", "direction_score", "family", "method"} <= set(table.column_names)
    truth = read_truth_csv(ft_zoo / "truth.csv")
    assert {r["repo_id"]: r["parent"] for r in rows} == truth
    tree = runner.invoke(index, ["recover", str(ft_zoo)])
    assert tree.exit_code == 0 and "org0/root" in tree.output and "└── " in tree.output
    assert tree.output.strip() == render_forest(recover(ft_zoo, Options()))


def test_cli_eval_with_truth_csv(ft_zoo: Path) -> None:
    res = CliRunner().invoke(index, ["eval", str(ft_zoo), "--truth", str(ft_zoo / "truth.csv"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["accuracy"] == 1.0 and doc["edges"] == 27 and len(doc["trees"]) == 3
    expected = evaluate_folder(ft_zoo, Options(), truth=ft_zoo / "truth.csv").as_dict()
    assert doc == json.loads(json.dumps(expected))


def test_cli_mother_paper_without_trees_is_one_line_error(ft_zoo: Path) -> None:
    res = CliRunner().invoke(index, ["recover", str(ft_zoo), "--method", "mother-paper"])
    assert res.exit_code != 0
    assert isinstance(res.exception, RecoveryError)


def test_a_chain_of_core_overlaps_with_nothing_common_to_all_is_split_not_fatal(tmp_path: Path) -> None:
    """Regression (issue 11): keys joined through a chain of >= 0.75 overlaps (A ~ B ~ C ~ D ~ E) may share
    no layer across all of them; select_layers raised and the whole recovery failed."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    letters = "abcdefgh"
    for i in range(5):
        folder = tmp_path / "org" / f"m{i}"
        folder.mkdir(parents=True)
        names = letters[i:i + 4]
        save_file({f"blocks.{n}.weight": rng.normal(size=(32, 32)).astype(np.float32) for n in names},
                  str(folder / "model.safetensors"))
    forest = recover(tmp_path, Options(device="cpu"))
    assert len(forest.rows) == 5 and all(r.status == "ok" and r.parent == "" for r in forest.rows)
