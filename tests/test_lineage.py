"""Lineage pieces: Edmonds on hand-built graphs, the paper's D/T/M on its 3-model cases, clustering,
the Neural Phylogeny KMeans, and the evaluation metrics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import RecoveryError
from indexer.evaluate import clustering_accuracy, evaluate
from indexer.lineage.cluster import canonical_labels, choose_k, ward_labels
from indexer.lineage.mdst import arborescence_cost, minimum_arborescence
from indexer.lineage.methods import (
    Family,
    Options,
    _cast_sources,
    kmeans_along,
    kurtosis_penalty,
    kurtosis_trust,
    mother_paper,
    paper_matrices,
    recover_family,
    spectral_tail_distance,
    tail_start,
    time_penalty,
)
from indexer.lineage.recover import Forest, ForestRow
from sketches.distances import layer_normalised_l2, median_relative_distance
from sketches.layers import LayerSelection
from sketches.stats import model_stats

INF = math.inf

# --- Edmonds ---------------------------------------------------------------------------------------


def test_mdst_hand_built_graph() -> None:
    # 0 -> 1 -> 2 is cheap; 0 -> 2 directly costs more than through 1, and 3 hangs off 0.
    cost = np.array([
        [INF, 1.0, 5.0, 2.0],
        [9.0, INF, 1.0, 9.0],
        [9.0, 9.0, INF, 9.0],
        [9.0, 9.0, 0.5, INF],
    ])
    assert minimum_arborescence(cost) == [-1, 0, 3, 0]  # 3 -> 2 (0.5) beats 1 -> 2 (1.0)


def test_mdst_breaks_a_cycle_of_cheap_edges() -> None:
    # 1 <-> 2 are each other's cheapest in-edge (a cycle); Edmonds must enter it once from 0.
    cost = np.array([[INF, 4.0, 5.0], [INF, INF, 1.0], [INF, 1.0, INF]])
    parent = minimum_arborescence(cost)
    assert parent == [-1, 0, 1]
    assert arborescence_cost(cost, parent) == 5.0


def test_mdst_single_node_and_errors() -> None:
    assert minimum_arborescence(np.array([[INF]])) == [-1]
    with pytest.raises(RecoveryError):
        minimum_arborescence(np.array([[INF, math.nan], [1.0, INF]]))
    with pytest.raises(RecoveryError):
        minimum_arborescence(np.zeros((2, 3)))


def _brute_force(cost: np.ndarray) -> float:
    n = cost.shape[0]
    best = INF
    for root in range(n):
        others = [j for j in range(n) if j != root]
        for choice in itertools.product(range(n), repeat=n - 1):
            parent = dict(zip(others, choice, strict=True))
            if any(p == j for j, p in parent.items()):
                continue
            ok = True
            for j in others:  # every node must reach the root without a cycle
                seen, node = set(), j
                while node != root and ok:
                    if node in seen:
                        ok = False
                    seen.add(node)
                    node = parent[node]
            if ok:
                best = min(best, sum(cost[p, j] for j, p in parent.items()))
    return best


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=16, max_size=16))
def test_mdst_is_minimum_over_all_arborescences(weights: list[int]) -> None:
    cost = np.array(weights, dtype=np.float64).reshape(4, 4)
    np.fill_diagonal(cost, INF)
    parent = minimum_arborescence(cost)
    assert sum(p == -1 for p in parent) == 1
    assert arborescence_cost(cost, parent) == _brute_force(cost)


# --- the paper's three-model cases -------------------------------------------------------------------

# Direction layer contents with falling kurtosis: a spike (heavy tail), two spikes, a uniform ramp.
HIGH = np.array([10.0] + [0.0] * 15, dtype=np.float32)
MID = np.array([3.0, -3.0] + [0.0] * 14, dtype=np.float32)
LOW = np.linspace(-1, 1, 16, dtype=np.float32)


def _family(q: list[list[float]], o: list[np.ndarray]) -> Family:
    layers = {"q": np.array(q, dtype=np.float32), "o": np.stack(o)}
    stats = tuple(model_stats({"q": layers["q"][i], "o": layers["o"][i]}) for i in range(len(q)))
    return Family(tuple(f"m{i}" for i in range(len(q))), layers, LayerSelection(("q",), ("o",)), stats, (None,) * len(q))


def test_direction_layers_really_fall_in_kurtosis() -> None:
    ku = [scipy.stats.kurtosis(x) for x in (HIGH, MID, LOW)]
    assert ku[0] > ku[1] > ku[2]


def test_paper_grandparent_parent_child() -> None:
    fam = _family([[0, 0], [1, -1], [1.5, -1.5]], [HIGH, MID, LOW])  # G, P, C
    ku = np.array([s.kurtosis_sum(["o"]) for s in fam.stats])
    d, t, m = paper_matrices([fam.layers["q"]], ku, kind="linf", lam=0.3, device="cpu")
    # R = 1.5 (spread of entry 0); D[i,j] = (max(Wi - Wj) + R) / (2R)
    np.testing.assert_allclose(d, [[0, 2.5 / 3, 1], [2.5 / 3, 0, 2 / 3], [1, 2 / 3, 0]], rtol=1e-7)
    np.testing.assert_array_equal(t, [[0, 0, 0], [1, 0, 0], [1, 1, 0]])  # T[i,j] = ku(j) > ku(i)
    # mean of the off-diagonal D = 5/6, so lambda * mean = 0.25
    expected_m = [[INF, 2.5 / 3, 1], [2.5 / 3 + 0.25, INF, 2 / 3], [1.25, 2 / 3 + 0.25, INF]]
    np.testing.assert_allclose(m, expected_m, rtol=1e-7)
    assert mother_paper(fam, Options(method="mother-paper", trees=1)).parent == (-1, 0, 1)


def test_paper_parent_child_child() -> None:
    fam = _family([[0, 0], [1, -1], [-1, 1]], [HIGH, MID, LOW])  # P, C1, C2
    ku = np.array([s.kurtosis_sum(["o"]) for s in fam.stats])
    d, t, m = paper_matrices([fam.layers["q"]], ku, kind="linf", lam=0.3, device="cpu")
    np.testing.assert_allclose(d, [[0, 0.75, 0.75], [0.75, 0, 1], [0.75, 1, 0]], rtol=1e-7)
    np.testing.assert_allclose(m, [[INF, 0.75, 0.75], [1.0, INF, 1.0], [1.0, 1.25, INF]], rtol=1e-7)
    assert mother_paper(fam, Options(method="mother-paper", trees=1)).parent == (-1, 0, 0)


def test_paper_parent_child_stranger() -> None:
    fam = _family([[0, 0], [1, -1], [10, 10]], [HIGH, MID, LOW])  # P, C, S
    out = mother_paper(fam, Options(method="mother-paper", trees=2))
    assert out.cluster == (0, 0, 1)
    assert out.parent == (-1, 0, -1)
    # within {P, C}: R = 1, D = 1 both ways, T[C, P] = 1 -> P is the parent
    assert out.distance[1] == pytest.approx(1.0)


def test_mother_paper_needs_k() -> None:
    fam = _family([[0, 0], [1, -1]], [HIGH, MID])
    with pytest.raises(RecoveryError, match="--trees"):
        mother_paper(fam, Options(method="mother-paper"))


# --- spectral-tail distance (mother's full-FT distance) --------------------------------------------


def _run(rng: np.random.Generator, task: np.ndarray, *, lr: float, shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    """One fine-tuning run's update: the task's low-rank direction plus this run's own small full-rank part."""
    return lr * (task + 0.05 * rng.standard_normal(shape))


def _convergent_uncle_family(seed: int) -> np.ndarray:
    """(root, low-lr parent, child, same-task uncle) of one 48 x 48 layer, as the zoo's FT errors have it.

    The parent moved little (lr 1); the child (lr 10) and its uncle (lr 10, from the root) trained on the
    same task, so their large low-rank updates nearly cancel: L2 puts the child under the uncle.
    """
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal((48, 2)), rng.standard_normal((2, 48))
    task = u @ v / 4  # rank 2, shared by every run on this task
    other = rng.standard_normal((48, 2)) @ rng.standard_normal((2, 48)) / 4
    root = rng.standard_normal((48, 48))
    parent = root + _run(rng, other, lr=0.01)
    child = parent + _run(rng, task, lr=0.1)
    uncle = root + _run(rng, task, lr=0.1)
    return np.stack([root, parent, child, uncle]).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tail_distance_sees_the_parent_where_l2_sees_a_same_task_uncle(seed: int) -> None:
    layer = _convergent_uncle_family(seed)
    l2 = layer_normalised_l2([layer], device="cpu")
    assert l2[3, 2] < l2[1, 2]  # the failure mode: L2 prefers the same-task uncle (cf. the 12 FT errors)
    tail = spectral_tail_distance([layer], device="cpu")
    assert tail[1, 2] < tail[3, 2] and tail[1, 2] < tail[0, 2]  # the parent, not the uncle or the root


def test_tail_distance_is_pair_local_symmetric_and_any_shape() -> None:
    rng = np.random.default_rng(3)
    dense = rng.standard_normal((5, 24, 40)).astype(np.float32)
    conv = rng.standard_normal((5, 16, 3, 2, 2)).astype(np.float32)  # 4-D kernels: 16 x 12 matrices
    full = spectral_tail_distance([dense, conv], device="cpu", max_elements=1000)  # several pair blocks
    np.testing.assert_allclose(full, full.T)
    assert np.all(np.diag(full) == 0) and np.all(full[~np.eye(5, dtype=bool)] > 0)
    pair = spectral_tail_distance([dense[[1, 4]], conv[[1, 4]]], device="cpu")
    assert pair[0, 1] == pytest.approx(full[1, 4], rel=1e-12)  # the pair alone gives the same value
    # by hand: singular values past k = min(out, in) // 8, over the RMS of the two layer norms; conv
    # kernels on their unit filters, whose norm is sqrt(16 filters)
    filters = conv.reshape(5, 16, -1).astype(np.float64)
    filters /= np.linalg.norm(filters, axis=2, keepdims=True)
    expected = 0.0
    for w in (dense, filters):  # dense: the float32 difference, as stored weights subtract
        s = np.linalg.svd((w[1] - w[4]).astype(np.float64), compute_uv=False)
        k = tail_start(w.shape[1:])
        a, b = w[1].astype(np.float64), w[4].astype(np.float64)
        expected += np.sqrt((s[k:] ** 2).sum()) / np.sqrt((np.sum(a**2) + np.sum(b**2)) / 2)
    assert full[1, 4] == pytest.approx(expected, rel=1e-9)
    assert tail_start((24, 40)) == 3 and tail_start((16, 3, 2, 2)) == 1


def test_conv_tail_ignores_each_filters_scale_and_dense_tail_does_not() -> None:
    # BatchNorm after a conv makes each filter's scale free, and weight decay shrinks it during every run
    # (sketches.gram.unit_filters): a child whose filters are only rescaled is at tail 0 from its parent
    rng = np.random.default_rng(6)
    parent = rng.standard_normal((32, 8, 3, 3))
    scales = rng.uniform(0.3, 1.0, size=(32, 1, 1, 1))
    rescaled = np.stack([parent, parent * scales]).astype(np.float32)
    assert spectral_tail_distance([rescaled], device="cpu")[0, 1] < 1e-6
    as_dense = rescaled.reshape(2, 32, -1)  # the same numbers as a 2-D layer keep their radial change
    assert spectral_tail_distance([as_dense], device="cpu")[0, 1] > 0.1


def test_tail_distance_leaves_out_layers_too_thin_to_have_a_tail() -> None:
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((3, 32, 32)).astype(np.float32)
    thin = rng.standard_normal((3, 32, 4)).astype(np.float32)  # k = 4 // 8 = 0: nothing to drop
    np.testing.assert_allclose(spectral_tail_distance([wide, thin], device="cpu"), spectral_tail_distance([wide], device="cpu"))
    alone = spectral_tail_distance([thin], device="cpu")  # no other layer: the whole difference counts
    rms = np.sqrt((np.sum(thin[0].astype(np.float64) ** 2) + np.sum(thin[1].astype(np.float64) ** 2)) / 2)
    assert alone[0, 1] == pytest.approx(np.linalg.norm((thin[0] - thin[1]).astype(np.float64)) / rms, rel=1e-9)


def test_tail_distance_of_a_low_rank_difference_is_zero() -> None:
    rng = np.random.default_rng(4)
    base = rng.standard_normal((64, 64))
    moved = base + rng.standard_normal((64, 4)) @ rng.standard_normal((4, 64))  # rank 4 < k = 8
    d = spectral_tail_distance([np.stack([base, moved])], device="cpu")
    assert d[0, 1] < 1e-6 < spectral_tail_distance([np.stack([base, rng.standard_normal((64, 64))])], device="cpu")[0, 1]


# --- direction cues --------------------------------------------------------------------------------


def test_penalties() -> None:
    np.testing.assert_array_equal(kurtosis_penalty(np.array([3.0, 1.0])), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(kurtosis_penalty(np.array([3.0, 1.0]), sign=-1.0), [[0, 1], [0, 0]])
    np.testing.assert_array_equal(time_penalty([10.0, 20.0, None]), [[0, 0, 0], [1, 0, 0], [0, 0, 0]])


def test_kurtosis_trust_from_time() -> None:
    assert kurtosis_trust(np.array([5.0, 4.0, 3.0]), [1.0, 2.0, 3.0]) == (1.0, 1.0)  # falls: specialisation
    assert kurtosis_trust(np.array([3.0, 4.0, 5.0]), [1.0, 2.0, 3.0]) == (-1.0, 1.0)  # rises: generalisation
    sign, weight = kurtosis_trust(np.array([3.0, 5.0, 4.0, 6.0]), [1.0, 2.0, 3.0, 4.0])
    assert sign == -1.0 and weight == pytest.approx(2 / 3)  # 5 of 6 pairs rise: tau = 4/6
    assert kurtosis_trust(np.array([3.0, 4.0, 5.0]), [1.0, 1.0, None]) == (1.0, 1.0)  # too few times: paper


# --- clustering ------------------------------------------------------------------------------------


def _blobs(sizes: list[int], spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), 50))
    points = np.concatenate([c + spread * rng.standard_normal((s, 50)) for c, s in zip(centres, sizes, strict=True)])
    dist = np.linalg.norm(points[:, None] - points[None], axis=2)
    return points, dist, np.linalg.norm(points, axis=1)


def test_ward_labels_known_k() -> None:
    _, dist, _ = _blobs([4, 3, 5], spread=0.02)
    np.testing.assert_array_equal(ward_labels(dist, 3), [0] * 4 + [1] * 3 + [2] * 5)
    np.testing.assert_array_equal(ward_labels(dist, 1), [0] * 12)


def _relatives(sizes: list[int], *, step: float, seed: int = 0) -> list[np.ndarray]:
    """Two layers per model; each group is a random root plus small per-model moves."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(2):
        groups = [rng.standard_normal(64) for _ in sizes]
        rows = [g + step * rng.standard_normal((s, 64)) for g, s in zip(groups, sizes, strict=True)]
        layers.append(np.concatenate(rows).astype(np.float32))
    return layers


@pytest.mark.parametrize("sizes", [[5], [4, 6], [3, 3, 3, 3], [1, 5], [1, 1, 1], [2]])
def test_choose_k_finds_unrelated_groups(sizes: list[int]) -> None:
    choice = choose_k(median_relative_distance(_relatives(sizes, step=0.05), device="cpu"))
    assert choice.k == len(sizes)
    np.testing.assert_array_equal(choice.labels, np.repeat(np.arange(len(sizes)), sizes))


def test_choose_k_ignores_one_huge_layer_move() -> None:
    # a LoRA-like update larger than the weights, in one of three layers: still one tree
    layers = [*_relatives([4], step=0.01), np.zeros((4, 64), np.float32)]
    layers[0][3] += 50.0
    assert choose_k(median_relative_distance(layers, device="cpu")).k == 1


def test_canonical_labels() -> None:
    np.testing.assert_array_equal(canonical_labels(np.array([3, 3, 1, 2, 1])), [0, 0, 1, 2, 1])


def test_kmeans_along_recovers_blobs_deterministically() -> None:
    points, _, _ = _blobs([4, 4, 4], spread=0.05, seed=2)
    gram = points @ points.T
    groups = kmeans_along(gram, np.arange(12), 3, alpha=0.5, rng=np.random.default_rng(0))
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


# --- evaluation ------------------------------------------------------------------------------------


def _forest(parents: dict[str, str], clusters: dict[str, int]) -> Forest:
    return Forest(tuple(ForestRow(r, parents[r], clusters[r], 0.0, 0.0, "f", "m") for r in sorted(parents)))


def test_evaluate_edges_and_clusters() -> None:
    truth = {"a": "", "b": "a", "c": "a", "x": "", "y": "x"}
    # b right, c reversed into a's parent, y right; clusters all right
    got = _forest({"a": "c", "b": "a", "c": "", "x": "", "y": "x"}, {"a": 0, "b": 0, "c": 0, "x": 1, "y": 1})
    report = evaluate(got, truth)
    assert (report.edges, report.correct) == (3, 2)
    assert [(t.root, t.correct, t.edges) for t in report.trees] == [("a", 1, 2), ("x", 1, 1)]
    assert report.clustering_accuracy == 1.0


def test_clustering_accuracy_best_matching() -> None:
    assert clustering_accuracy(["a", "a", "b", "b"], ["q", "q", "p", "p"]) == 1.0
    assert clustering_accuracy(["a", "a", "b", "b"], ["q", "q", "q", "q"]) == 0.5
    assert clustering_accuracy(["a", "a", "a", "b"], ["p", "q", "r", "s"]) == 0.5


# --- 16-bit casts ------------------------------------------------------------------------------------


def _cast_family(values: list[np.ndarray], dtypes: tuple[str, ...]) -> Family:
    layers = {"w": np.stack(values).astype(np.float32)}
    stats = tuple(model_stats({"w": layers["w"][i]}) for i in range(len(values)))
    ids = tuple(f"m{i}" for i in range(len(values)))
    return Family(ids, layers, LayerSelection(("w",), ("w",), ("w",)), stats, (None,) * len(values), (),
                  dtypes)


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def test_a_16_bit_cast_is_never_a_parent_even_when_nearer() -> None:
    rng = np.random.default_rng(0)
    source = rng.standard_normal((48, 48)).astype(np.float32)
    cast = _f16(source)
    # a fine-tune of the cast's values, far nearer the cast than the source: a spanning tree without
    # times would make the cast its parent, and the source's (the cast the centre of a 3-path)
    tuned = cast + 1e-5 * rng.standard_normal((48, 48)).astype(np.float32)
    lineage = recover_family(_cast_family([source, cast, tuned], ("F32", "F16", "F32")),
                             Options(use_time=False, device="cpu"))
    assert lineage.parent[1] == 0 and lineage.relation[1] == "quantized"
    assert 1 not in lineage.parent


def test_an_upcast_is_not_the_source_of_its_own_16_bit_values() -> None:
    rng = np.random.default_rng(1)
    half = _f16(rng.standard_normal((48, 48)).astype(np.float32))  # an F32 file holding F16 values
    family = _cast_family([half, half.copy()], ("F32", "F16"))
    assert _cast_sources(family) == [-1, -1]


def test_norm_votes_and_the_one_hop_norm_root() -> None:
    """The row-norm cue (an ablation, `Options(orient="center-norm")`): a sign test over rows, and a root
    moved at most one hop from the centre to where the tree's edges shrink (or grow) the most consistently."""
    import networkx as nx

    from indexer.lineage.orient import norm_root, norm_votes

    rng = np.random.default_rng(0)
    root = rng.uniform(1.0, 2.0, 400)
    near = root * 0.999  # a near-copy child: every row a little shorter (weight decay)
    kids = [near * 0.99 * rng.uniform(0.999, 1.0, 400) for _ in range(3)]  # attached to the near-copy by the MST
    votes = norm_votes([root, near, *kids])
    assert votes[0, 1] == 1.0 and votes[1, 0] == -1.0 and np.allclose(votes, -votes.T)
    same = norm_votes([root, root.copy()])
    assert same[0, 1] == 0.0  # no row changed: no vote
    star = nx.Graph([(1, 0), (1, 2), (1, 3), (1, 4)])  # the near-copy is the hop centre
    assert norm_root(star, 1, votes) == 0  # every edge shrinks away from the true root
    grow = norm_votes([root * 1.01, root, *(root * 0.99 for _ in range(3))])  # 0 grew from 1: no regime wins
    assert norm_root(nx.Graph([(1, 0), (1, 2)]), 1, grow[:3, :3]) == 1  # one shrink, one grow: the centre stays
