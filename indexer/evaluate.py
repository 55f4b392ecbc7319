"""Score a recovered forest against the true lineage.

Truth comes from `truth.csv` (header `parent,child`, one row per model, empty parent for a root; or the
relations zoo's `child,parents,relation`, parents ";"-joined: the merged models of a merge) or, when
no CSV is given, from the `base_model` of each repo's model card (README.md front matter). This module
is the only place that reads cards: recovery never does.

Metrics (MoTHer paper):
- edge accuracy = correct directed edges / true edges; a recovered edge is correct when the child's
  recovered parent is its true parent (placement and direction both right). Per true tree (named by its
  root) and overall (all true edges of the folder together).
- clustering accuracy = the share of models whose recovered tree matches their true tree under the best
  one-to-one matching of tree labels (scipy.optimize.linear_sum_assignment on the confusion counts).
  A failed model counts as its own unmatched cluster.
- with a relation column (relations zoo): a merge's edge is correct when its recovered parent is one of
  the merged models; per true relation ("root" for a root): parent accuracy, relation-label accuracy,
  merge parent-set accuracy (the recovered parents are exactly the merged ones), bytes read per model;
  and the confusion of relation labels (true -> recovered, "root" for no parent, "failed").
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import linear_sum_assignment

from errors import BadInputError
from indexer.lineage.methods import Options
from indexer.lineage.recover import Forest, ForestRow, discover_repos, recover

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeScore:
    root: str
    models: int
    edges: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.edges if self.edges else 1.0


@dataclass(frozen=True)
class EvalReport:
    trees: tuple[TreeScore, ...]  # sorted by root id
    edges: int
    correct: int
    clustering_accuracy: float
    failed: int
    # per true relation: {"n", "parent", "label", "parent_set" (merges), "bytes"}; empty without relation truth
    relations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    confusion: Mapping[str, int] = field(default_factory=dict)  # "true->recovered" -> models

    @property
    def accuracy(self) -> float:
        return self.correct / self.edges if self.edges else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "edges": self.edges,
            "correct": self.correct,
            "clustering_accuracy": self.clustering_accuracy,
            "failed": self.failed,
            "trees": [{"root": t.root, "models": t.models, "edges": t.edges, "correct": t.correct,
                       "accuracy": t.accuracy} for t in self.trees],
        } | ({"relations": dict(self.relations), "confusion": dict(self.confusion)} if self.relations else {})


# --- truth -------------------------------------------------------------------------------------------


Relations = Mapping[str, tuple[tuple[str, ...], str]]  # child -> (true parents, true relation)


def read_truth_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """child -> parent ("" for a root) from a `parent,child` CSV (or `child,parents`: the first parent)."""
    return {child: parents[0] if parents else "" for child, (parents, _) in read_relations_csv(path).items()}


def read_relations_csv(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """child -> (parents, relation) from a `parent,child[,relation]` or `child,parents,relation` CSV
    (relation "" when the CSV has none)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        column = "parents" if "parents" in fields else "parent"
        if "child" not in fields or column not in fields:
            raise BadInputError(str(path), "expected a CSV with the header `parent,child` (or `child,parents,relation`)")
        return {row["child"]: (tuple(p for p in (row[column] or "").split(";") if p), row.get("relation") or "")
                for row in reader}


def _front_matter(readme: Path) -> dict[str, object]:
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        doc = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return doc if isinstance(doc, dict) else {}


def truth_from_cards(root: str | os.PathLike[str]) -> dict[str, str]:
    """child -> declared `base_model` of each repo's card ("" when absent; a list takes its first entry)."""
    truth = {}
    for repo_id, folder in discover_repos(Path(root)):
        readme = folder / "README.md"
        base = _front_matter(readme).get("base_model") if readme.is_file() else None
        if isinstance(base, list):
            base = base[0] if base else None
        truth[repo_id] = str(base) if base else ""
    return truth


# --- scoring -----------------------------------------------------------------------------------------


def _true_root(child: str, truth: Mapping[str, str]) -> str:
    seen = set()
    node = child
    while truth.get(node):
        if node in seen:
            raise BadInputError("truth", f"the true lineage has a cycle through {node}")
        seen.add(node)
        node = truth[node]
    return node


def clustering_accuracy(true_labels: list[str], predicted: list[str]) -> float:
    """Best one-to-one matching of labels (Hungarian) / number of models."""
    if not true_labels:
        return 1.0
    t_ids = {t: i for i, t in enumerate(sorted(set(true_labels)))}
    p_ids = {p: i for i, p in enumerate(sorted(set(predicted)))}
    counts = np.zeros((len(t_ids), len(p_ids)), dtype=np.int64)
    for t, p in zip(true_labels, predicted, strict=True):
        counts[t_ids[t], p_ids[p]] += 1
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / len(true_labels)


def evaluate(forest: Forest, truth: Mapping[str, str], relations: Relations | None = None) -> EvalReport:
    """Edge accuracy per true tree and overall, and clustering accuracy, of `forest` against `truth`;
    with `relations`, the per-relation scores and confusion too (module docstring)."""
    recovered = forest.parents()
    cluster = {r.repo_id: f"c{r.cluster}" for r in forest.rows if r.status == "ok"}
    per_root: dict[str, list[int]] = {}
    for child in sorted(truth):
        stats = per_root.setdefault(_true_root(child, truth), [0, 0, 0])
        stats[0] += 1
        if truth[child]:
            allowed = relations[child][0] if relations and relations.get(child, ((), ""))[1] == "merge" else (truth[child],)
            stats[1] += 1
            stats[2] += int(recovered.get(child) in allowed)
    trees = tuple(TreeScore(root, *per_root[root]) for root in sorted(per_root))
    ids = sorted(truth)
    predicted = [cluster.get(i, f"failed:{i}") for i in ids]
    return EvalReport(
        trees=trees,
        edges=sum(t.edges for t in trees),
        correct=sum(t.correct for t in trees),
        clustering_accuracy=clustering_accuracy([_true_root(i, truth) for i in ids], predicted),
        failed=len(forest.failures()),
        **(_relation_scores(forest, relations) if relations and any(r for _, r in relations.values()) else {}),
    )


def _relation_scores(forest: Forest, relations: Relations) -> dict[str, dict]:
    """{"relations": per true relation scores, "confusion": "true->recovered" counts}."""
    rows = {r.repo_id: r for r in forest.rows}
    per: dict[str, dict[str, list[float]]] = {}
    confusion: dict[str, int] = {}
    for child, (parents, relation) in sorted(relations.items()):
        row = rows.get(child)
        kind = relation or "root"
        got = "failed" if row is None or row.status != "ok" else (row.relation or "root")
        got_parents = {p for p, _ in row.parents} if row is not None else set()
        confusion[f"{kind}->{got}"] = confusion.get(f"{kind}->{got}", 0) + 1
        score = per.setdefault(kind, {"label": [], "bytes": []})
        score["label"].append(float(got == kind))
        score["bytes"].append(float(row.bytes_read) if row is not None else 0.0)
        if parents:
            score.setdefault("parent", []).append(float(row is not None and row.parent in parents))
        if relation == "merge":
            score.setdefault("parent_set", []).append(float(got_parents == set(parents)))
    table = {kind: {k: sum(v) / len(v) for k, v in score.items()} | {"n": len(score["label"])}
             for kind, score in sorted(per.items())}
    return {"relations": table, "confusion": dict(sorted(confusion.items()))}


def render_report(report: EvalReport) -> str:
    lines = [f"{'tree root':<40} {'models':>6} {'edges':>6} {'correct':>7} {'accuracy':>8}"]
    for t in report.trees:
        lines.append(f"{t.root:<40} {t.models:>6} {t.edges:>6} {t.correct:>7} {t.accuracy:>8.3f}")
    lines.append(f"{'overall':<40} {sum(t.models for t in report.trees):>6} {report.edges:>6} {report.correct:>7} {report.accuracy:>8.3f}")
    lines.append(f"clustering accuracy {report.clustering_accuracy:.3f}; failed models {report.failed}")
    if report.relations:
        lines.append(f"{'relation':<12} {'n':>3} {'parent':>7} {'set':>6} {'label':>6} {'bytes/model':>12}")
        for kind, row in report.relations.items():
            parent = f"{row['parent']:.2f}" if "parent" in row else "-"
            pset = f"{row['parent_set']:.2f}" if "parent_set" in row else "-"
            lines.append(f"{kind:<12} {int(row['n']):>3} {parent:>7} {pset:>6} {row['label']:>6.2f} {row['bytes']:>12,.0f}")
        lines.append("confusion (true->recovered): " + ", ".join(f"{k} {v}" for k, v in report.confusion.items()))
    return "\n".join(lines)


def evaluate_folder(root: str | os.PathLike[str], options: Options, *, truth: str | os.PathLike[str] | None = None) -> EvalReport:
    """Recover `root` with `options`, then score it against `truth` (a CSV) or the cards' base_model."""
    if truth is None:
        return evaluate(recover(root, options), truth_from_cards(root))
    relations = read_relations_csv(truth)
    expected = {child: parents[0] if parents else "" for child, (parents, _) in relations.items()}
    return evaluate(recover(root, options), expected, relations)


def read_exported_forest(path: str | os.PathLike[str]) -> Forest:
    """The forest of an `index export` Parquet file, as a Forest (so it is scored and drawn like a recovery).

    Models the index could not place (no parent column value) stay out; clusters are numbered in sorted
    order of the exported cluster keys (deterministic).
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["repo_id", "parent", "cluster", "distance", "direction_score", "family"])
    except (OSError, KeyError, ValueError) as exc:
        raise BadInputError(str(path), f"not an `index export` forest ({exc})") from None
    rows = [r for r in table.to_pylist() if r["parent"] is not None]
    number = {key: i for i, key in enumerate(sorted({r["cluster"] or "" for r in rows}))}
    return Forest(tuple(
        ForestRow(repo_id=r["repo_id"], parent=r["parent"], cluster=number[r["cluster"] or ""],
                  distance=float("nan") if r["distance"] is None else r["distance"],
                  direction_score=float("nan") if r["direction_score"] is None else r["direction_score"],
                  family=r["family"] or "", method="index")
        for r in sorted(rows, key=lambda r: r["repo_id"])  # deterministic
    ))
