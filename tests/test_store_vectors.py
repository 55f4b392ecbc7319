"""store.vectors: real FAISS indexes, saved and reloaded, rebuilt from the real sketches table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from errors import BadInputError, StoreError
from store.schema import SketchRecord
from store.tables import Store
from store.vectors import (
    VectorIndex,
    _paths,
    load_or_rebuild,
    rebuild_from_sketches,
    repo_to_id,
)

SHA = "d" * 40
REPO_ROOT = Path(__file__).resolve().parents[1]


def _vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _filled(n: int = 20, dim: int = 8) -> VectorIndex:
    index = VectorIndex("vit", dim)
    index.upsert([(f"org/m{i:02d}", SHA, v) for i, v in enumerate(_vectors(n, dim))])
    return index


def test_search_finds_the_exact_nearest_by_squared_l2() -> None:
    data = _vectors(20, 8)
    index = _filled()
    query = data[3] + 0.01
    ids, dist = index.search(query, 3)
    brute = ((data - query) ** 2).sum(axis=1)
    order = np.argsort(brute)[:3]
    assert [index.repo_of(i) for i in ids[0]] == [f"org/m{j:02d}" for j in order]
    np.testing.assert_allclose(dist[0], brute[order], rtol=1e-5)
    assert index.nearest(query, 1)[0][0] == "org/m03"
    ids, _ = index.search(query, 25)  # more than held: FAISS pads with -1
    assert (ids[0, 20:] == -1).all() and len(index.nearest(query, 25)) == 20


def test_ids_are_stable_per_repo_across_processes() -> None:
    code = "import sys; sys.path.insert(0, sys.argv[1]); from store.vectors import repo_to_id; print(repo_to_id('org/x'))"
    other = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123"})
    assert int(other.stdout) == repo_to_id("org/x") and repo_to_id("org/x") >= 0
    assert repo_to_id("org/x") != repo_to_id("org/y")


def test_update_replaces_and_remove_forgets() -> None:
    index = _filled()
    far = np.full(8, 100.0, dtype=np.float32)
    index.upsert([("org/m05", "e" * 40, far)])
    assert len(index) == 20 and ("org/m05", "e" * 40) in index.entries()
    assert index.nearest(far, 1)[0] == ("org/m05", 0.0)
    assert index.remove(["org/m05", "org/unknown"]) == 1
    assert "org/m05" not in index and len(index) == 19
    assert index.nearest(far, 1)[0][0] != "org/m05"


def test_dimension_mismatch_is_a_clear_error() -> None:
    index = _filled(dim=8)
    with pytest.raises(BadInputError, match=r"dimension 8"):
        index.search(np.zeros(7, dtype=np.float32), 1)
    with pytest.raises(BadInputError, match=r"dimension 8"):
        index.upsert([("org/z", SHA, np.zeros(9))])


def test_save_then_load_gives_identical_search_results(tmp_path: Path) -> None:
    index = _filled()
    index.save(tmp_path)
    queries = _vectors(5, 8, seed=1)
    again = VectorIndex.load(tmp_path, "vit")
    for a, b in zip(index.search(queries, 4), again.search(queries, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.entries() == index.entries() and again.dim == 8
    assert not [p for p in (tmp_path / "vectors").iterdir() if p.name.startswith(".tmp-")]


def test_family_names_become_safe_file_names(tmp_path: Path) -> None:
    index = VectorIndex("llama/7b", 4)
    index.upsert([("org/a", SHA, np.ones(4))])
    index.save(tmp_path)
    assert _paths(tmp_path, "llama/7b")[0].parent == tmp_path / "vectors"
    assert VectorIndex.load(tmp_path, "llama/7b").entries() == [("org/a", SHA)]


def _write_sketches(home: Path, data: np.ndarray, family: str = "vit", org: str = "org") -> None:
    with Store.open(home) as store:
        store.append("sketches", [SketchRecord(f"{org}/m{i:02d}", SHA, family, 1, v) for i, v in enumerate(data)])


def test_rebuild_from_sketches_equals_the_incremental_index(tmp_path: Path) -> None:
    data = _vectors(20, 8)
    _write_sketches(tmp_path, data)
    _write_sketches(tmp_path, _vectors(3, 5), family="other", org="other")  # other families stay out
    rebuilt = rebuild_from_sketches(tmp_path, "vit")
    incremental = _filled()
    queries = _vectors(4, 8, seed=2)
    for a, b in zip(rebuilt.search(queries, 5), incremental.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert VectorIndex.load(tmp_path, "vit").entries() == incremental.entries()
    with pytest.raises(StoreError, match="no sketches of family 'nope'"):
        rebuild_from_sketches(tmp_path, "nope")


def test_load_or_rebuild_recovers_from_a_crash_before_the_faiss_write(tmp_path: Path) -> None:
    data = _vectors(6, 4)
    _write_sketches(tmp_path, data[:5])
    rebuild_from_sketches(tmp_path, "vit")
    # the sixth sketch reached Parquet, then the process died before the FAISS save
    _write_sketches(tmp_path, data)
    assert len(VectorIndex.load(tmp_path, "vit")) == 5
    recovered = load_or_rebuild(tmp_path, "vit")
    assert len(recovered) == 6 and recovered.nearest(data[5], 1)[0][0] == "org/m05"
    assert len(VectorIndex.load(tmp_path, "vit")) == 6  # and it was saved


def test_an_id_map_that_disagrees_with_the_index_is_detected_and_rebuilt(tmp_path: Path) -> None:
    data = _vectors(4, 4)
    _write_sketches(tmp_path, data)
    index = rebuild_from_sketches(tmp_path, "vit")
    index_path, ids_path = _paths(tmp_path, "vit")
    smaller = VectorIndex("vit", 4)
    smaller.upsert([("org/m00", SHA, data[0])])
    smaller.save(tmp_path / "elsewhere")
    ids_path.write_bytes(_paths(tmp_path / "elsewhere", "vit")[1].read_bytes())  # crash between files
    with pytest.raises(StoreError, match="disagrees with its id map"):
        VectorIndex.load(tmp_path, "vit")
    assert load_or_rebuild(tmp_path, "vit").entries() == index.entries()
    index_path.unlink()
    assert load_or_rebuild(tmp_path, "vit").entries() == index.entries()


@pytest.mark.parametrize("held", [0, 30])
def test_nearest_in_order_equals_one_by_one_search_and_upsert(held: int) -> None:
    """A batch's nominees: the index plus the batch's earlier rows, as if each row were searched then added."""
    batch = _vectors(25, 8, seed=1)
    names = [f"new/b{i:02d}" for i in range(len(batch))]
    batched = _filled(held) if held else VectorIndex("vit", 8)
    found = batched.nearest_in_order(names, batch, 5)
    one_by_one = _filled(held) if held else VectorIndex("vit", 8)
    for name, vector, got in zip(names, batch, found, strict=True):
        expected = one_by_one.nearest(vector, 5) if len(one_by_one) else []
        assert [r for r, _ in got] == [r for r, _ in expected]
        assert np.allclose([d for _, d in got], [d for _, d in expected], rtol=1e-4, atol=1e-4)
        one_by_one.upsert([(name, SHA, vector)])
    assert len(batched) == held  # the batch was only searched, not added


def test_nearest_in_order_rejects_a_wrong_dimension() -> None:
    with pytest.raises(BadInputError, match="dimension"):
        _filled().nearest_in_order(["a/b"], np.zeros((1, 3), dtype=np.float32), 4)
