"""A family summarised for drawing: which models are shown, which siblings are collapsed into a count.

A tree of 50,000 models cannot be read as 50,000 boxes. Walking down from the root, breadth first, each
model shows at most `max_children` of its children (the ones on the way to the model asked about first,
then the largest subtrees) and the rest become one "N more" placeholder; once `max_nodes` models are
shown, every further child is collapsed the same way. The shallow levels, where the family's shape is,
are therefore always drawn, and the model asked about and its ancestors always are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from store.graph import Family, FamilyNode

DEFAULT_MAX_CHILDREN = 20  # a Hub base model page lists 20 fine-tunes before "see all"
DEFAULT_MAX_NODES = 400  # boxes a screen (or a terminal page scrolled a little) still reads

# One colour per relation, shared by every format (dot, mermaid, svg, the browser views)
RELATION_COLOURS: dict[str, str] = {
    "root": "#334155",
    "finetune": "#2563eb",
    "adapter": "#16a34a",
    "quantized": "#ea580c",
    "merge": "#9333ea",
    "duplicate": "#6b7280",
}
OTHER_COLOUR = "#0891b2"  # a relation this version does not know yet
DISAGREE_COLOUR = "#dc2626"


def colour_of(relation: str) -> str:
    return RELATION_COLOURS.get(relation, OTHER_COLOUR)


@dataclass(frozen=True)
class Collapsed:
    """Children of `parent` not drawn: `count` of them, `models` with everything below them."""

    parent: str
    count: int
    models: int

    @property
    def key(self) -> str:
        return f"+{self.parent}"  # never a repo id: those do not start with "+"


@dataclass(frozen=True)
class View:
    family: Family
    nodes: tuple[FamilyNode, ...]  # shown, parents before children, siblings by repo id
    children: Mapping[str, tuple[str, ...]]  # shown children of each shown model
    collapsed: tuple[Collapsed, ...]
    subtree: Mapping[str, int]  # models at and below each shown model, in the family as read
    roots: tuple[str, ...]
    max_children: int
    max_nodes: int

    @property
    def hidden(self) -> int:
        return sum(c.models for c in self.collapsed)


def _links(nodes: Sequence[FamilyNode]) -> tuple[dict[str, list[str]], list[str]]:
    present = {n.repo_id for n in nodes}
    kids: dict[str, list[str]] = {}
    roots: list[str] = []
    for n in nodes:
        if n.parent and n.parent in present:
            kids.setdefault(n.parent, []).append(n.repo_id)
        else:
            roots.append(n.repo_id)  # the tree's root, or the top of a --depth cut
    return kids, sorted(roots)


def _preorder(roots: Sequence[str], kids: Mapping[str, Sequence[str]]) -> list[str]:
    order: list[str] = []
    stack = list(reversed(roots))
    seen: set[str] = set()
    while stack:
        here = stack.pop()
        if here in seen:  # a cycle in a store caught mid-update: draw each model once
            continue
        seen.add(here)
        order.append(here)
        stack.extend(sorted(kids.get(here, ()), reverse=True))
    return order


def _top_down(roots: Sequence[str], kids: Mapping[str, Sequence[str]]) -> list[str]:
    """Every model reachable from the roots, parents before children (breadth first, no sorting: O(n))."""
    order, seen = list(roots), set(roots)
    for here in order:  # the list grows while it is walked
        for kid in kids.get(here, ()):
            if kid not in seen:  # a cycle in a store caught mid-update: each model once
                seen.add(kid)
                order.append(kid)
    return order


def _sizes(order: Sequence[str], up: Mapping[str, str]) -> dict[str, int]:
    """Models at and below each one: children before parents (`order` reversed), each added to its parent."""
    size = dict.fromkeys(order, 1)
    for here in reversed(order):
        parent = up.get(here, "")
        if parent in size:
            size[parent] += size[here]
    return size


def _on_path(family: Family, by_id: Mapping[str, FamilyNode]) -> set[str]:
    path, here = set(), family.focus
    while here in by_id and here not in path:
        path.add(here)
        here = by_id[here].parent
    return path


def _choose(kids: Sequence[str], *, path: set[str], size: Mapping[str, int], room: int, cap: int) -> list[str]:
    """Children to draw: those on the focus path always, then the largest subtrees, within cap and room."""
    must = [k for k in kids if k in path]
    rest = sorted((k for k in kids if k not in path), key=lambda k: (-size[k], k))
    return must + rest[:max(0, min(cap - len(must), room - len(must)))]


def summarise(family: Family, *, max_children: int = DEFAULT_MAX_CHILDREN,
              max_nodes: int = DEFAULT_MAX_NODES) -> View:
    """The models to draw, breadth first from the root(s), collapsing siblings beyond `max_children`."""
    kids, roots = _links(family.nodes)
    up = {n.repo_id: n.parent for n in family.nodes}
    size = _sizes(_top_down(roots, kids), up)  # 50,000 models: no per-node sort until the drawn few
    by_id = {n.repo_id: n for n in family.nodes}
    path = _on_path(family, by_id)
    shown: dict[str, tuple[str, ...]] = {}
    collapsed: list[Collapsed] = []
    queue, room = deque(roots), max(max_nodes, 1) - len(roots)
    while queue:
        here = queue.popleft()
        every = sorted(kids.get(here, ()))
        chosen = _choose(every, path=path, size=size, room=room, cap=max_children)
        room -= len(chosen)
        shown[here] = tuple(sorted(chosen))
        queue.extend(shown[here])
        keep = set(chosen)
        hidden = [k for k in every if k not in keep]
        if hidden:
            collapsed.append(Collapsed(here, len(hidden), sum(size[k] for k in hidden)))
    drawn = _preorder(roots, shown)
    return View(family=family, nodes=tuple(by_id[r] for r in drawn), children=shown,
                collapsed=tuple(sorted(collapsed, key=lambda c: c.parent)), subtree=size,
                roots=tuple(roots), max_children=max_children, max_nodes=max_nodes)
