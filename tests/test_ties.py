"""Ties: duplicates, frozen bodies, fan vs snake, and the centre-rooted direction without upload times."""

from __future__ import annotations

import numpy as np

from indexer.lineage.orient import centre_rooted_tree
from indexer.lineage.ties import at_resolution, duplicate_originals, extras_distance, order_preference, snake_score


def test_the_earliest_copy_is_the_original() -> None:
    got = duplicate_originals(["x", "y", "x", "x"], [30.0, 10.0, 20.0, None], ["a", "b", "c", "d"])
    assert got == [2, -1, -1, 2]  # c (t=20) is the earliest x; a and d (unknown time: last) copy it


def test_without_times_a_declared_copy_comes_after_the_copy_it_names() -> None:
    same_time = [5.0, 5.0, 5.0]
    # "a-copy" sorts first by id and by rank, but its card names "z-orig", whose bytes it repeats
    got = duplicate_originals(["x", "x", "y"], same_time, ["a-copy", "z-orig", "m"],
                              declared=[("z-orig",), (), ("z-orig",)])
    assert got == [1, -1, -1]
    # a declaration naming a model with other bytes decides nothing: the repo id does
    got = duplicate_originals(["x", "x", "y"], same_time, ["a-copy", "z-orig", "m"], declared=[("m",), (), ()])
    assert got == [-1, 0, -1]
    # an upload time still outranks any card
    got = duplicate_originals(["x", "x"], [1.0, 2.0], ["a", "b"], declared=[("b",), ()])
    assert got == [-1, 0]


def test_heads_break_a_frozen_body_tie() -> None:
    head3 = np.ones((3, 4))
    extras = [{"classifier.weight": head3}, {"classifier.weight": np.zeros((5, 4))},
              {"classifier.weight": head3 + 0.01}]
    d = extras_distance(extras)
    assert d[0, 2] < 0.1 and d[0, 1] == 1.0 and d[1, 2] == 1.0  # other shapes: wholly different
    with_head = {"pooler.bias": np.ones(4), "classifier.weight": head3}
    without = {"pooler.bias": np.ones(4)}
    child = {"pooler.bias": np.ones(4) * 1.01, "classifier.weight": head3 + 0.3}
    d = extras_distance([with_head, without, child])
    assert d[0, 2] < d[1, 2]  # sharing the task head beats lacking it


def test_a_chain_is_a_snake_and_a_star_is_a_fan() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    chain = np.abs(np.subtract.outer(times, times))  # distance grows with the time gap
    star = np.full((5, 5), 2.0)
    star[0, :] = star[:, 0] = 1.0
    np.fill_diagonal(star, 0.0)
    assert snake_score(chain, times) > 0.5 > snake_score(star, times)
    fan = order_preference(times, snake=False)
    assert fan[0, 4] < fan[3, 4]  # the earliest candidate is preferred
    assert order_preference(times, snake=True)[3, 4] < order_preference(times, snake=True)[0, 4]


def test_centre_rooting_puts_the_base_of_a_fan_at_the_root() -> None:
    """base 0 -> children 1, 2, 3, each -> two grandchildren; every fine-tune moves in its own direction
    (orthogonal unit steps), so siblings are sqrt(2) steps apart and the base is the spanning tree's centre."""
    parents = [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    pts = np.zeros((10, 10))
    for j, p in enumerate(parents):
        if p >= 0:
            pts[j] = pts[p] + np.eye(10)[j]
    d = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    assert centre_rooted_tree(d) == parents


def test_between_two_centres_the_norm_regime_of_the_other_edges_picks_the_root() -> None:
    """The path 3 - 1 - 0 - 2 (base 0, fine-tunes 1 and 2, 3 a fine-tune of 1) has two centres, 0 and 1, and
    here the medoid is 1: the chain 0 -> 1 -> 3 moved along one direction, so it reads longer. Every child's
    rows grow (norms 1, 2, 2, 3): the edges 0 -> 2 and 1 -> 3, which point the same way from either centre,
    say so, and the central edge is then oriented from the shorter rows to the longer: 0 is the root. Where the
    other edges shrink and 1's rows are the longer, 1 is; with no clear regime the medoid stays."""
    from indexer.lineage.orient import norm_votes

    d = np.array([[0.0, 1.0, 1.0, 2.0],  # the chain 0 -> 1 -> 3 two steps long, the siblings 1, 2 only 1.2
                  [1.0, 0.0, 1.2, 1.0],  # apart (correlated updates): the sums of distances are 4 at 0, 3.2 at 1
                  [1.0, 1.2, 0.0, 2.2],
                  [2.0, 1.0, 2.2, 0.0]])
    assert centre_rooted_tree(d) == [1, -1, 0, 1]  # the medoid: 1 is the root
    grow = norm_votes([np.full(64, v) for v in (1.0, 2.0, 2.0, 3.0)])
    assert centre_rooted_tree(d, regime_votes=lambda: grow) == [-1, 0, 0, 1]
    shrink = norm_votes([np.full(64, v) for v in (2.0, 3.0, 1.0, 2.0)])  # 0 -> 2 and 1 -> 3 shrink; 1 is longer
    assert centre_rooted_tree(d, regime_votes=lambda: shrink) == [1, -1, 0, 1]
    flat = norm_votes([np.full(64, 1.0) for _ in range(4)])
    assert centre_rooted_tree(d, regime_votes=lambda: flat) == [1, -1, 0, 1]


def test_the_t_votes_weigh_rows_by_how_much_they_moved() -> None:
    """A child whose rows mostly shrink a little while a few grow by much: the sign test reads it shrinking,
    the paired t test growing (the post-LN encoders' second fine-tunes, bench/two_centres.py), and the two
    agree on a uniform change. With the t votes the path of the test above roots at the base."""
    from indexer.lineage.orient import norm_t_votes, norm_votes

    rng = np.random.default_rng(0)
    parent = 1.0 + 0.01 * rng.standard_normal(1000)
    child = parent - 0.001
    child[:100] += 0.1  # a tenth of the rows grow by 100 times what the rest shrink
    assert norm_votes([parent, child])[0, 1] > 0.9  # "shorter": most rows shrank
    assert norm_t_votes([parent, child])[0, 1] < -0.9  # longer on average, far beyond the rows' noise
    for uniform in ([parent, parent + 0.01 + 1e-4 * rng.standard_normal(1000)], [parent, parent + 0.5]):
        assert norm_votes(uniform)[0, 1] == norm_t_votes(uniform)[0, 1] == -1.0
    assert norm_t_votes([parent, parent])[0, 1] == 0.0
    d = np.array([[0.0, 1.0, 1.0, 2.0], [1.0, 0.0, 1.2, 1.0], [1.0, 1.2, 0.0, 2.2], [2.0, 1.0, 2.2, 0.0]])
    rows = [parent, child + 0.05, child, child + 0.05]  # 0 -> 2 and 1 -> 3 grow as `child` does; 1 longer than 0
    rows[3] = rows[1] - 0.001
    rows[3][:100] += 0.1
    assert centre_rooted_tree(d, regime_votes=lambda: norm_t_votes(rows)) == [-1, 0, 0, 1]


def test_distances_a_rounding_apart_are_equal_and_a_real_gap_is_kept() -> None:
    """Two candidates 2e-9 apart at distance 0.225 (a fine-tune's export beside the base and the base's BN-folded
    export, tests/test_onnx.py) tie; 1e-5 apart they do not; 0, inf and NaN pass through."""
    d = np.array([0.2253615164914608, 0.2253615164914608 * (1 + 2e-9), 0.2253615164914608 * (1 + 1e-5)])
    snapped = at_resolution(d)
    assert snapped[0] == snapped[1] and snapped[2] > snapped[1]
    assert np.all(np.abs(snapped / d - 1) <= 2.0**-20)
    assert at_resolution(0.0) == 0.0 and np.isinf(at_resolution(np.inf)) and np.isnan(at_resolution(np.nan))
