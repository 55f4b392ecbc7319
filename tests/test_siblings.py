"""The siblings test (indexer.lineage.siblings): a fine-tune a near-copy sibling took goes back to its parent,
in batch mother and in the incremental index alike; a real child of the near-copy and a chain of real steps keep
what the distance says; undated, the base stays the root beside its near-copy hub."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from indexer.incremental.folder import ingest_folder
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.lineage.siblings import (
    displacement_cosine,
    sibling_moves,
    siblings_ordered,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SHAPES = {f"enc.{b}.attention.output.dense.weight": (64, 64) for b in range(3)} | {"enc.0.mlp.weight": (128, 64)}


def _family(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """A base g; siblings s1, s2 (each along the direction u every fine-tune of g shares, along v, and its
    own); a near-copy f uploaded after them (a short step along u); c after f: u, v and its own, so its update
    is nearer f's step than g by a hair (f takes it by distance) but more aligned with s1 and s2 than with f;
    k: a real child of f (f plus an update of its own). Each has a classifier head, the base's the widest."""
    rng = np.random.default_rng(seed)

    def draw(scale: float = 1.0) -> dict[str, np.ndarray]:
        return {n: (scale * rng.standard_normal(s)).astype(np.float64) for n, s in SHAPES.items()}

    def unit(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        norm = np.sqrt(sum(float(np.vdot(a, a)) for a in d.values()))
        return {n: a / norm for n, a in d.items()}

    def plus(base: dict[str, np.ndarray], *terms: tuple[float, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {n: base[n] + sum(w * t[n] for w, t in terms) for n in base}

    g = {n: rng.standard_t(3, size=s) * 0.5 for n, s in SHAPES.items()}
    u, v = unit(draw()), unit(draw())
    f = plus(g, (0.6, u), (0.1, unit(draw())))
    models = {"org/g": g, "org/f": f}
    models["org/s1"] = plus(g, (3.0, u), (5.0, v), (8.0, unit(draw())))
    models["org/s2"] = plus(g, (3.0, u), (5.0, v), (8.0, unit(draw())))
    models["org/c"] = plus(g, (3.0, u), (5.0, v), (8.0, unit(draw())))
    models["org/k"] = plus(f, (8.0, unit(draw())))
    # heads: the base's pre-training head is the widest; every fine-tune draws a narrower one for its task
    for r, classes in (("org/g", 20), ("org/f", 4), ("org/s1", 5), ("org/s2", 6), ("org/c", 3), ("org/k", 7)):
        models[r]["classifier.weight"] = rng.standard_normal((classes, 64)) * 0.02
    return {r: {n: a.astype(np.float32) for n, a in m.items()} for r, m in models.items()}


ORDER = ("org/g", "org/s1", "org/s2", "org/f", "org/c", "org/k")
TRUTH = {"org/g": "", "org/f": "org/g", "org/s1": "org/g", "org/s2": "org/g", "org/c": "org/g", "org/k": "org/f"}


def _write(root: Path, models: dict[str, dict[str, np.ndarray]], *, dated: bool = True) -> Path:
    for repo, arrays in models.items():
        (root / repo).mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(root / repo / "model.safetensors"))
    if dated:
        (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
            r: {"createdAt": (T0 + timedelta(days=i)).strftime("%Y-%m-%dT%H:%M:%S.000Z")} for i, r in enumerate(ORDER)}}))
    return root


def test_the_near_copy_takes_the_fine_tune_by_distance() -> None:
    """The premise: c is nearer f than g, and f is no more aligned with c than s1 and s2 are."""
    m = _family()
    dist = {r: np.sqrt(sum(float(np.sum((m["org/c"][n] - m[r][n]) ** 2)) for n in SHAPES)) for r in ("org/g", "org/f")}
    assert dist["org/f"] < dist["org/g"]
    mine = displacement_cosine(m["org/g"], m["org/f"], m["org/c"])
    assert max(displacement_cosine(m["org/g"], m[s], m["org/c"]) for s in ("org/s1", "org/s2")) > mine > 0


@pytest.mark.parametrize("path", ["batch", "incremental"])
def test_a_fine_tune_taken_by_a_near_copy_sibling_goes_back_to_its_parent(tmp_path: Path, path: str) -> None:
    root = _write(tmp_path / "hub", _family())
    if path == "batch":
        got = {r.repo_id: r.parent for r in recover(root, Options(device="cpu")).rows}
    else:
        got = {r: e.parent for r, e in ingest_folder(tmp_path / "home", root, device="cpu").edges.items()}
    assert got == TRUTH  # c under g (the test), k under f (its update is f's own: kept)


@pytest.mark.parametrize("path", ["batch", "incremental"])
def test_undated_the_base_stays_the_root_beside_its_near_copy_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  path: str) -> None:
    """Undated, the near-copy f takes every fine-tune by distance and is the spanning tree's centre; the root is
    chosen between the centre and its nearest neighbour (orient._with_nearest), so the base g stays the root and
    f its child. With a lone centre (before), f was the root and g its child, on both paths."""
    import indexer.lineage.orient as orient

    root = _write(tmp_path / "hub", _family(), dated=False)

    def run(home: str) -> dict[str, str]:
        if path == "batch":
            return {r.repo_id: r.parent for r in recover(root, Options(device="cpu", use_time=False)).rows}
        return {r: e.parent for r, e in ingest_folder(tmp_path / home, root, device="cpu").edges.items()}

    got = run("now")
    assert got["org/g"] == "" and got["org/f"] == "org/g" and got["org/k"] == "org/f"
    if path == "batch":  # the incremental's own centre is path-based (index._shown_parents): patched apart
        with monkeypatch.context() as m:
            m.setattr(orient, "_with_nearest", lambda tree, centres: centres)
            assert run("before")["org/f"] == ""


def test_the_rule_keeps_real_steps_and_needs_two_other_siblings() -> None:
    """A chain whose steps are real (F's step longer than C's own) is never read; with one other sibling the
    rule does not decide; a copy is no sibling."""
    parents = {"g": None, "f": "g", "c": "f", "s1": "g", "s2": "g"}
    always = {"ordered": lambda *_: True, "related": lambda *_: True}
    cos = {("g", "f", "c"): 0.1, ("g", "s1", "c"): 0.3, ("g", "s2", "c"): 0.0}

    def cosine(g: str, x: str, y: str) -> float:
        return cos.get((g, x, y), 0.0)

    near = {("g", "f"): 1.0, ("f", "c"): 5.0}
    assert sibling_moves(parents, distance=lambda a, b: near.get((a, b)), cosine=cosine, copies=set(), **always) == {"c": "g"}
    chain = {("g", "f"): 6.0, ("f", "c"): 5.0}
    assert sibling_moves(parents, distance=lambda a, b: chain.get((a, b)), cosine=cosine, copies=set(), **always) == {}
    assert sibling_moves(parents, distance=lambda a, b: near.get((a, b)), cosine=cosine, copies={"s2"}, **always) == {}
    untimed = {"ordered": lambda *_: False, "related": lambda *_: True}
    assert sibling_moves(parents, distance=lambda a, b: near.get((a, b)), cosine=cosine, copies=set(), **untimed) == {}


def test_upload_order_may_start_at_the_hubs_legacy_date() -> None:
    """A legacy-dated base (every pre-2022-03-02 repo reads that day) is older than any repo dated after it, so
    its later fine-tunes are ordered; three models of one time (undated) are oriented from the weights; a legacy
    pair beside a dated model, or one unknown time, are not."""
    from indexer.lineage.ties import HUB_EPOCH

    day = 86400.0
    assert siblings_ordered(HUB_EPOCH, HUB_EPOCH + day, HUB_EPOCH + 2 * day)
    assert not siblings_ordered(HUB_EPOCH, HUB_EPOCH, HUB_EPOCH + 2 * day)
    assert siblings_ordered(HUB_EPOCH, HUB_EPOCH, HUB_EPOCH) and siblings_ordered(None, None, None)  # one time
    assert not siblings_ordered(None, HUB_EPOCH + day, HUB_EPOCH + 2 * day)
    assert not siblings_ordered(HUB_EPOCH + 3 * day, HUB_EPOCH + day, HUB_EPOCH + 2 * day)
