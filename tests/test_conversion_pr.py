"""Pickle-only repos read from the conversion bot's safetensors PR (SFconvertbot, `refs/pr/<num>`): the
emulator's discussions and commits endpoints through the real `huggingface_hub` client, and the crawl over
HTTP (indexer.sources.HubSource.conversion). Nothing pickled is ever fetched."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi
from safetensors.numpy import save_file
from test_crawl_relations import _options, base_weights

from errors import BadInputError
from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.hub_emulator.repos import load_hub_json
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from store.tables import read_records

TITLE = "Adding `safetensors` variant of this model"
OLD = "2022-03-02T23:29:04.000Z"  # every repo older than this date shows this createdAt on the Hub


def _pickle_only(root: Path, repo_id: str, weights: dict[str, np.ndarray] | None, *, pr: int = 1) -> None:
    """A 2020-style repo: pytorch_model.bin (junk bytes: it must never be read) and, when `weights` are given,
    the bot's PR folder holding them as model.safetensors."""
    folder = root / repo_id
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02 a pickle that must never be fetched")
    (folder / "config.json").write_text("{}")
    if weights is not None:
        (folder / f".refs/pr/{pr}").mkdir(parents=True)
        save_file(weights, str(folder / f".refs/pr/{pr}/model.safetensors"))


def _fine_tune(seed: int, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (w + 0.05 * w.std() * rng.standard_normal(w.shape)).astype(np.float32) for n, w in base.items()}


def _bot(num: int = 1, **extra: object) -> dict[str, object]:
    return {"num": num, "title": TITLE, "author": "SFconvertbot", **extra}


@pytest.fixture()
def old_hub(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    base = base_weights(1)
    _pickle_only(root, "google/bert-old", base)
    _pickle_only(root, "lab/bert-old-ft", _fine_tune(2, base), pr=3)
    _pickle_only(root, "lab/stale", _fine_tune(3, base))
    _pickle_only(root, "lab/no-pr", None)
    _pickle_only(root, "lab/other-author", _fine_tune(4, base))
    repos = {
        "google/bert-old": {"createdAt": OLD, "discussions": [_bot()]},
        "lab/bert-old-ft": {"createdAt": "2022-06-01T00:00:00.000Z", "discussions": [
            {"num": 1, "title": "Update README.md", "author": "someone", "isPullRequest": False},
            {"num": 2, "title": TITLE, "author": "SFconvertbot", "status": "closed"}, _bot(3)]},
        "lab/stale": {"createdAt": OLD, "discussions": [_bot(stale=True)]},
        "lab/no-pr": {"createdAt": OLD},
        "lab/other-author": {"createdAt": OLD, "discussions": [{**_bot(), "author": "someone"}]},
    }
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}))
    return root


def test_the_emulator_serves_discussions_commits_and_pr_revisions(old_hub: Path) -> None:
    with HubEmulator(old_hub) as emu:
        api = HfApi(endpoint=emu.url, token=False)
        main = api.model_info("lab/bert-old-ft")
        assert [s.rfilename for s in main.siblings] == ["config.json", "pytorch_model.bin"]  # .refs is not main's
        everything = list(api.get_repo_discussions("lab/bert-old-ft"))
        assert [d.num for d in everything] == [3, 2, 1]  # newest first
        bots = list(api.get_repo_discussions("lab/bert-old-ft", author="SFconvertbot", discussion_type="pull_request",
                                             discussion_status="open"))
        assert [(d.num, d.git_reference) for d in bots] == [(3, "refs/pr/3")]
        commits = api.list_repo_commits("lab/bert-old-ft", revision="refs/pr/3")
        assert commits[1].commit_id == main.sha and commits[0].commit_id != main.sha
        at_pr = api.model_info("lab/bert-old-ft", revision=commits[0].commit_id)
        assert [s.rfilename for s in at_pr.siblings] == ["config.json", "model.safetensors", "pytorch_model.bin"]
        stale = api.list_repo_commits("lab/stale", revision="refs/pr/1")
        assert stale[1].commit_id != api.model_info("lab/stale").sha


@pytest.mark.parametrize("prefetch", [0, 2])  # read in the crawl's thread, or ahead on threads (ReadAhead)
def test_pickle_only_repos_are_read_from_the_bots_pr_on_their_current_commit(old_hub: Path, tmp_path: Path,
                                                                              prefetch: int) -> None:
    with HubEmulator(old_hub) as emu:
        report = crawl(tmp_path / "home", replace(_options(emu), prefetch=prefetch)).as_dict()
        requests = [r.path for r in emu.requests()]
        shas = {r: HfApi(endpoint=emu.url, token=False).model_info(r).sha for r in ("google/bert-old", "lab/bert-old-ft")}
    assert report["indexed"] == 2 and report["skipped"] == {"pickle-only": 3}, report
    assert not any(p.endswith("pytorch_model.bin") for p in requests)  # a pickle is never fetched
    models = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    for repo_id, ref in (("google/bert-old", "refs/pr/1"), ("lab/bert-old-ft", "refs/pr/3")):
        assert models[repo_id].status == "indexed" and json.loads(models[repo_id].details)["weights_from"] == ref
        assert models[repo_id].revision == shas[repo_id]  # recorded under the repo's own commit, not the PR's
    for repo_id in ("lab/stale", "lab/no-pr", "lab/other-author"):
        assert models[repo_id].status == "skipped", repo_id
        assert "no open SFconvertbot safetensors PR on its current commit" in models[repo_id].reason, models[repo_id].reason
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    assert edges["lab/bert-old-ft"].parent == "google/bert-old" and edges["lab/bert-old-ft"].relation == "finetune"


@pytest.mark.parametrize("discussions, words", [
    ("not a list", "discussions must be a list of objects"),
    ([{"title": TITLE, "author": "SFconvertbot"}], "needs num"),
    ([_bot(), _bot()], "numbers repeat"),
    ([_bot(status="pending")], "status 'pending'"),
])
def test_a_malformed_discussion_list_is_refused_naming_the_file(tmp_path: Path, discussions: object, words: str) -> None:
    path = tmp_path / "hub.json"
    path.write_text(json.dumps({"version": 1, "repos": {"a/b": {"discussions": discussions}}}))
    with pytest.raises(BadInputError) as err:
        load_hub_json(path)
    assert str(path) in str(err.value) and "[a/b]" in str(err.value) and words in str(err.value)


def test_index_recover_reads_the_same_prs_and_gets_the_crawls_edges(old_hub: Path, tmp_path: Path) -> None:
    forest = recover(old_hub, Options(device="cpu"))
    rows = {r.repo_id: r for r in forest.rows}
    assert rows["lab/bert-old-ft"].parent == "google/bert-old"
    failed = {r.repo_id: r.reason for r in forest.failures()}
    assert set(failed) == {"lab/stale", "lab/other-author"}  # PR folders of no usable conversion PR
    assert all("no open SFconvertbot safetensors PR" in reason for reason in failed.values()), failed
    with HubEmulator(old_hub) as emu:
        crawl(tmp_path / "home", _options(emu))
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    for repo_id in ("google/bert-old", "lab/bert-old-ft"):
        assert (edges[repo_id].parent, edges[repo_id].relation) == (rows[repo_id].parent, rows[repo_id].relation)


def test_a_pickle_only_pipeline_is_read_from_the_bots_pr_too(tmp_path: Path) -> None:
    """A diffusers pipeline whose UNet is only pickled (`unet/diffusion_pytorch_model.bin`: "no-safetensors"
    at the top level); the bot's PR adds `unet/diffusion_pytorch_model.safetensors`."""
    root = tmp_path / "hub"
    folder = root / "old/sd-pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet/diffusion_pytorch_model.bin").write_bytes(b"\x80\x02 never read")
    (folder / ".refs/pr/1/unet").mkdir(parents=True)
    save_file(base_weights(5), str(folder / ".refs/pr/1/unet/diffusion_pytorch_model.safetensors"))
    _pickle_only(root, "old/plain", None)  # and one with no PR: skipped as before
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {"old/sd-pipeline": {"createdAt": OLD, "discussions": [_bot()]},
                                                                      "old/plain": {"createdAt": OLD}}}))
    with HubEmulator(root) as emu:
        crawl(tmp_path / "home", _options(emu))
    models = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    assert models["old/sd-pipeline"].status == "indexed", models["old/sd-pipeline"].reason
    assert json.loads(models["old/sd-pipeline"].details)["weights_from"] == "refs/pr/1"
    assert models["old/plain"].status == "skipped" and models["old/plain"].reason.startswith("pickle-only")


def test_a_pr_opened_after_the_skip_is_found_by_a_revisit(tmp_path: Path) -> None:
    """Neither listing pass meets an old repo again: `--revisit N` looks at skipped pickle-only repos anew."""
    root = tmp_path / "hub"
    base = base_weights(6)
    _pickle_only(root, "old/late", None)
    _pickle_only(root, "old/never", None)
    repos = {"old/late": {"createdAt": OLD}, "old/never": {"createdAt": OLD}}
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}))
    home = tmp_path / "home"
    with HubEmulator(root) as emu:
        first = crawl(home, _options(emu)).as_dict()
        assert first["skipped"] == {"pickle-only": 2}, first
        (root / "old/late/.refs/pr/1").mkdir(parents=True)  # the bot converts it weeks later
        save_file(base, str(root / "old/late/.refs/pr/1/model.safetensors"))
        repos["old/late"]["discussions"] = [_bot()]
        (root / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}))
        plain = crawl(home, _options(emu)).as_dict()
        assert plain["indexed"] == 0 and plain["unchanged"] == 2, plain  # listed again, passed over
        again = crawl(home, replace(_options(emu), revisit=5)).as_dict()
    assert again["indexed"] == 1 and again["skipped"] == {"pickle-only": 1}, again
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    assert models["old/late"].status == "indexed" and json.loads(models["old/late"].details)["weights_from"] == "refs/pr/1"
    assert models["old/never"].status == "skipped"
