"""Lineage on zoos that look like the wild: edge and root accuracy per phenomenon, with and without
upload times; the relatedness test's error rates; the calibration of edge confidences.

    .venv/bin/python bench/wild.py ZOO [ZOO ...] [--results bench/RESULTS.md] [--refit]

Each ZOO is a folder built by `index zoo make` (any preset: wild-conv, wild-bert, wild-gpt2, small, ...)
with `truth.csv` (and, for wild presets, the phenomenon of each model in zoo.json). Per zoo it runs:
- `mother` (ours) with upload times, and with every time hidden (the Hub's pre-2022 repos);
- ablations: without times oriented by the paper's kurtosis penalty instead of the tree centre; and by
  the centre moved up to one hop by the row-norm cue (`indexer.lineage.orient.norm_root`, not adopted);
- the paper's method with K = the true number of trees (`mother-paper`), the Neural Phylogeny baseline,
  and the naive rule (each model's parent = the nearest earlier upload by relative L2, among models of
  its architecture family; needs times).
Then it prints, as markdown: the accuracy table (edges, roots = true roots recovered as roots, and
clustering), per-phenomenon edge accuracy of `mother`, the relatedness test's false positive rate on
pairs from different true trees and its false negative rate on pairs of one tree by drift bucket
(relative L2 of the pair), and the calibration table of edge confidences pooled over all zoos and both
time settings. `--refit` also fits the logistic calibration (confidence = sigmoid(A + B m)) on the
pooled margins and prints A and B.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from errors import ModelGraphError  # noqa: E402
from indexer.evaluate import _true_root, evaluate, read_truth_csv  # noqa: E402
from indexer.lineage import recover as rec  # noqa: E402
from indexer.lineage.confidence import CALIB_A, CALIB_B, CALIB_C  # noqa: E402
from indexer.lineage.methods import Options, body_relatedness  # noqa: E402
from sketches.relatedness import Z_RELATED  # noqa: E402

logger = logging.getLogger("bench.wild")
BINS = (0.0, 0.5, 0.7, 0.9, 0.97, 1.0001)
DRIFTS = (0.0, 0.01, 0.1, 0.3, 0.6, 0.9, math.inf)


@dataclass(frozen=True)
class Run:
    zoo: str
    label: str
    edges: int
    correct: int
    roots: int
    roots_found: int
    clustering: float
    seconds: float


def phenomena(zoo: Path) -> dict[str, str]:
    """repo -> phenomenon tag from zoo.json (wild presets), else "finetune"/"root"."""
    meta = json.loads((zoo / "zoo.json").read_text()) if (zoo / "zoo.json").is_file() else {}
    out = {}
    for rid, info in (meta.get("models") or {}).items():
        tag = (info.get("phenomenon") or info.get("tag")) if isinstance(info, dict) else None
        out[rid] = tag or ""
    return out


def run(zoo: Path, truth: dict[str, str], label: str, options: Options) -> tuple[Run, rec.Forest]:
    start = time.perf_counter()
    forest = rec.recover(zoo, options)
    seconds = time.perf_counter() - start
    report = evaluate(forest, truth)
    found = dict(forest.parents())
    roots = [c for c, p in truth.items() if not p]
    return Run(zoo.name, label, report.edges, report.correct, len(roots), sum(1 for r in roots if found.get(r) == ""),
               report.clustering_accuracy, seconds), forest


def naive(zoo: Path, truth: dict[str, str]) -> Run:
    """Parent = the nearest earlier upload (relative L2 over shared float matrices) in its family."""
    start = time.perf_counter()
    times = rec.upload_times(zoo)
    loaded, _ = rec._headers(rec.discover_repos(zoo), "naive")
    parents: dict[str, str] = {}
    for members in rec.group_families(loaded).values():
        fam, _ = rec._read_family(members, Options(), times)
        if fam is None:
            continue
        flat = [np.concatenate([fam.layers[n][i].ravel() for n in fam.selection.distance]).astype(np.float64) for i in range(fam.n)]
        for j, rid in enumerate(fam.repo_ids):
            earlier = [i for i in range(fam.n) if times.get(fam.repo_ids[i], math.inf) < times.get(rid, -math.inf)]
            rel = [np.linalg.norm(flat[i] - flat[j]) / math.sqrt((flat[i] @ flat[i] + flat[j] @ flat[j]) / 2) for i in earlier]
            parents[rid] = fam.repo_ids[earlier[int(np.argmin(rel))]] if earlier else ""
    edges = [(c, p) for c, p in truth.items() if p]
    roots = [c for c, p in truth.items() if not p]
    return Run(zoo.name, "naive: nearest earlier by relative L2", len(edges), sum(1 for c, p in edges if parents.get(c) == p),
               len(roots), sum(1 for r in roots if parents.get(r) == ""), math.nan, time.perf_counter() - start)


def relatedness_errors(zoo: Path, truth: dict[str, str]) -> tuple[list[tuple[float, bool, bool]], int, int]:
    """(pair drift, truly related, tested related) over every pair of one family; and how many pairs of
    different families are truly related (never compared: a miss) or not."""
    loaded, _ = rec._headers(rec.discover_repos(zoo), "bench")
    out = []
    groups = rec.group_families(loaded)
    for members in groups.values():
        fam, _ = rec._read_family(members, Options(), {})
        if fam is None:
            continue
        score, _ = body_relatedness(fam)
        flat = [np.concatenate([fam.layers[n][i].ravel() for n in fam.selection.distance]).astype(np.float64) for i in range(fam.n)]
        for i in range(fam.n):
            for j in range(i + 1, fam.n):
                a, b = fam.repo_ids[i], fam.repo_ids[j]
                same = _true_root(a, truth) == _true_root(b, truth)
                drift = np.linalg.norm(flat[i] - flat[j]) / math.sqrt((flat[i] @ flat[i] + flat[j] @ flat[j]) / 2)
                out.append((float(drift), same, bool(score[i, j] > Z_RELATED)))
    fam_of = {m.repo_id: key for key, ms in groups.items() for m in ms}
    ids = sorted(fam_of)
    cross_related = cross = 0
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if fam_of[a] != fam_of[b]:
                cross += 1
                cross_related += _true_root(a, truth) == _true_root(b, truth)
    return out, cross, cross_related


def refit(samples: list[tuple[float, bool, bool]]) -> tuple[float, float, float]:
    """Logistic fit of correct ~ margin + timed, with one right and one wrong pseudo-edge per time setting
    at margin 0: it keeps the fit finite when every edge of a setting is right."""
    m = np.array([s[0] for s in samples] + [0.0, 0.0, 0.0, 0.0])
    t = np.array([float(s[2]) for s in samples] + [0.0, 0.0, 1.0, 1.0])
    y = np.array([s[1] for s in samples] + [True, False, True, False], dtype=np.float64)

    def loss(abc: np.ndarray) -> float:
        z = abc[0] + abc[1] * m + abc[2] * t
        return float(np.sum(np.logaddexp(0, z) - y * z))

    res = minimize(loss, np.array([CALIB_A, CALIB_B, CALIB_C]), method="Nelder-Mead")
    return float(res.x[0]), float(res.x[1]), float(res.x[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--results", type=Path, default=None, help="append the tables to this markdown file")
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--misses", action="store_true", help="also list mother's wrong edges, with the true parent "
                    "of the parent each got (a sibling taken for the parent reads that model's own true parent)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs: list[Run] = []
    per_phen: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # time ok, n, no-time ok, n
    calib: list[tuple[float, bool, float]] = []
    pairs: list[tuple[float, bool, bool]] = []
    cross_total = cross_missed = 0
    misses: list[str] = []
    for zoo in args.zoos:
        truth = read_truth_csv(zoo / "truth.csv")
        tags = phenomena(zoo)
        k_true = sum(1 for p in truth.values() if not p)
        configs = [("**mother** (ours), upload times", Options()),
                   ("**mother** (ours), no upload times", Options(use_time=False)),
                   ("mother, no times, kurtosis penalty (paper's cue)", Options(use_time=False, orient="kurtosis")),
                   ("mother, no times, centre moved by the row-norm cue", Options(use_time=False, orient="center-norm")),
                   (f"mother-paper (K={k_true} given)", Options(method="mother-paper", trees=k_true)),
                   ("phylogeny (K unknown)", Options(method="phylogeny"))]
        for label, options in configs:
            try:
                r, forest = run(zoo, truth, label, options)
            except ModelGraphError as exc:  # e.g. the paper's layer pattern on a conv net
                logger.warning("%s on %s: %s", label, zoo.name, exc)
                runs.append(Run(zoo.name, f"{label}: n/a ({exc})", 0, 0, 0, 0, math.nan, 0.0))
                continue
            runs.append(r)
            if label.startswith("**mother**"):
                timed = "upload times" in label and "no upload" not in label
                got = forest.parents()
                for row in forest.rows:
                    if row.status != "ok":
                        continue
                    true_parent = truth.get(row.repo_id, "")
                    slot = per_phen[(zoo.name, tags.get(row.repo_id) or ("root" if not true_parent else "finetune"))]
                    ok = got.get(row.repo_id) == true_parent
                    slot[0 if timed else 2] += ok
                    slot[1 if timed else 3] += 1
                    if not ok:
                        wrong = got.get(row.repo_id) or ""
                        misses.append(f"| {zoo.name} | {'times' if timed else 'no times'} | {row.repo_id} | "
                                      f"{tags.get(row.repo_id) or '-'} | {true_parent or '(root)'} | {wrong or '(root)'} | "
                                      f"{(truth.get(wrong) or '(root)') if wrong else '-'} |")
                    if row.parent and not math.isnan(row.confidence):
                        calib.append((row.confidence, row.parent == true_parent, row.margin, timed))
        runs.append(naive(zoo, truth))
        got_pairs, cross, cross_rel = relatedness_errors(zoo, truth)
        pairs += got_pairs
        cross_total += cross
        cross_missed += cross_rel
    print(render(runs, per_phen, pairs, (cross_total, cross_missed), calib, args))
    if args.misses:
        print("\n| zoo | run | model | phenomenon | true parent | got | true parent of got |\n|---|---|---|---|---|---|---|")
        print("\n".join(misses))


def render(runs: list[Run], per_phen: dict, pairs: list, cross: tuple[int, int], calib: list, args: argparse.Namespace) -> str:
    lines = [f"### Wild zoos ({datetime.now(UTC):%Y-%m-%d}): `{' '.join(['.venv/bin/python bench/wild.py', *map(str, args.zoos)])}`", "",
             "| zoo | method | edges | edge acc. | true roots kept as roots | clustering | wall s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        acc = r.correct / r.edges if r.edges else 1.0
        clus = "-" if math.isnan(r.clustering) else f"{r.clustering:.2f}"
        lines.append(f"| {r.zoo} | {r.label} | {r.edges} | {acc:.3f} ({r.correct}/{r.edges}) | {r.roots_found}/{r.roots} | {clus} | {r.seconds:.1f} |")
    lines += ["", "Per phenomenon (`mother`; a model is counted right when its recovered parent, or root, is the true one):", "",
              "| zoo | phenomenon | models | with times | without times |", "|---|---|---|---|---|"]
    for (zoo, tag), (ok_t, n_t, ok_n, n_n) in sorted(per_phen.items()):
        lines.append(f"| {zoo} | {tag} | {n_t} | {ok_t}/{n_t} | {ok_n}/{n_n} |")
    unrelated = [p for p in pairs if not p[1]]
    fp = sum(1 for p in unrelated if p[2])
    lines += ["", f"Relatedness test (Z > {Z_RELATED:.2f}, p < 1e-6): false positives {fp}/{len(unrelated)} pairs from different true trees "
              f"(same family); pairs of one true tree in different families (never compared): {cross[1]} of {cross[0]} cross-family pairs.", "",
              "| drift (relative L2 of the pair) | related pairs | tested related | false negative rate |", "|---|---|---|---|"]
    for lo, hi in zip(DRIFTS, DRIFTS[1:]):
        sel = [p for p in pairs if p[1] and lo <= p[0] < hi]
        if sel:
            miss = sum(1 for p in sel if not p[2])
            lines.append(f"| [{lo}, {hi}) | {len(sel)} | {len(sel) - miss} | {miss / len(sel):.3f} |")
    lines += ["", "Calibration of edge confidence (pooled over the zoos above, with and without times):", "",
              "| confidence | edges | mean confidence | measured accuracy |", "|---|---|---|---|"]
    for lo, hi in zip(BINS, BINS[1:]):
        sel = [c for c in calib if lo <= c[0] < hi]
        if sel:
            lines.append(f"| [{lo:.2f}, {min(hi, 1.0):.2f}] | {len(sel)} | {np.mean([c[0] for c in sel]):.3f} | "
                         f"{np.mean([c[1] for c in sel]):.3f} |")
    if args.refit and calib:
        a, b, c = refit([(x[2], x[1], x[3]) for x in calib])
        lines.append(f"\nRefitted calibration on {len(calib)} edges: A = {a:.3f}, B = {b:.3f}, C = {c:.3f} "
                     f"(in use: A = {CALIB_A}, B = {CALIB_B}, C = {CALIB_C}).")
    text = "\n".join(lines)
    if args.results:
        with args.results.open("a") as fh:
            fh.write("\n\n" + text + "\n")
    return text


if __name__ == "__main__":
    main()
