"""A tidy left-to-right tree layout for the SVG picture: O(models), deterministic, pure Python.

Depth runs left to right (one column per generation), each leaf gets the next row, and a parent sits
halfway between its first and last child, so no two edges cross and no two boxes overlap. A collapsed
"N more" placeholder is laid out as its parent's last child. The browser views lay the same tree out
with cytoscape.js instead; this one exists so `index show --format svg` needs no browser and no
Graphviz binary.
"""

from __future__ import annotations

from dataclasses import dataclass

from indexer.web.view import View

BOX_W, BOX_H = 220, 34
COLUMN = 270  # BOX_W + room for the edge curves
ROW = 42  # BOX_H + 8 px between rows
MARGIN = 12


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float = BOX_W
    h: float = BOX_H


def _kids(view: View) -> dict[str, list[str]]:
    more = {c.parent: c.key for c in view.collapsed}
    return {n.repo_id: [*view.children.get(n.repo_id, ()), *([more[n.repo_id]] if n.repo_id in more else [])]
            for n in view.nodes}


def _rows(view: View, kids: dict[str, list[str]]) -> tuple[dict[str, float], dict[str, int]]:
    """Row (fractional for parents) and column of every key, by one post-order walk per root."""
    row: dict[str, float] = {}
    col: dict[str, int] = {}
    next_leaf = 0
    for root in view.roots:
        stack: list[tuple[str, int, bool]] = [(root, 0, False)]
        while stack:  # iterative: a chain thousands deep must not hit the recursion limit
            key, depth, done = stack.pop()
            below = kids.get(key, [])
            if done or not below:
                col[key] = depth
                if below:
                    row[key] = (row[below[0]] + row[below[-1]]) / 2
                else:
                    row[key], next_leaf = float(next_leaf), next_leaf + 1
                continue
            stack.append((key, depth, True))
            stack.extend((k, depth + 1, False) for k in reversed(below))
    return row, col


def tree_layout(view: View, *, top: int = 0) -> tuple[dict[str, Box], int, int]:
    """A box per shown model and per placeholder, and the picture's width and height in pixels."""
    kids = _kids(view)
    row, col = _rows(view, kids)
    boxes = {k: Box(MARGIN + col[k] * COLUMN, top + MARGIN + row[k] * ROW) for k in row}
    width = MARGIN * 2 + (max(col.values(), default=0) * COLUMN) + BOX_W + 50  # + the declared arcs
    height = top + MARGIN * 2 + int(max(row.values(), default=0) * ROW) + BOX_H
    return boxes, max(width, 620), height
