"""One family, drawn: a text tree for the terminal, Mermaid, Graphviz DOT, SVG, a self-contained HTML page, JSON.

Every format draws the same `View` (see `indexer.web.view`): the same models, the same collapsed counts,
the same colours. Repo ids and card strings are untrusted (anyone names a repo, anyone writes a card),
so each format escapes them its own way: control characters for the terminal, entities for Mermaid,
backslashes for DOT, XML entities for SVG, and JSON that cannot close its <script> for HTML.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from indexer.web.layout import Box, tree_layout
from indexer.web.view import (
    DEFAULT_MAX_CHILDREN,
    DEFAULT_MAX_NODES,
    DISAGREE_COLOUR,
    RELATION_COLOURS,
    Collapsed,
    View,
    colour_of,
    summarise,
)
from store.graph import FamilyNode, family_of

Format = Literal["text", "mermaid", "dot", "svg", "html", "json"]
FORMATS: tuple[str, ...] = ("text", "mermaid", "dot", "svg", "html", "json")
VIEW_VERSION = 1  # of the JSON document below; the browser views read it too

# C0, DEL and C1 controls: a card string must not move the cursor or recolour the user's terminal
_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}


def plain(text: str) -> str:
    """`text` safe to print on a terminal: control characters written as \\xNN."""
    return text.translate(_CONTROL)


def _date(moment: datetime | None) -> str:
    return moment.date().isoformat() if moment is not None else "date ?"


def _confidence(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _shown_parent(view: View, node: FamilyNode) -> str:
    """The parent as drawn: "" when it is not in the view (the root, or above a --depth cut)."""
    return node.parent if node.parent and node.repo_id not in view.roots else ""


def _more(c: Collapsed) -> str:
    return f"… {c.count:,} more {'child' if c.count == 1 else 'children'} ({c.models:,} models)"


def _summary(view: View) -> str:
    f = view.family
    if not f.in_forest:
        return f"{f.focus}: not in the forest ({f.status}: {f.reason or 'no lineage yet'})"
    cut = "" if f.depth_limit is None else f", {len(f.nodes):,} within {f.depth_limit} hops of {f.focus}"
    hidden = f", {view.hidden:,} collapsed" if view.hidden else ""
    return (f"{f.family or 'unknown family'} tree of {f.root}: {f.size:,} models{cut}; "
            f"{len(view.nodes):,} shown{hidden}")


# --- json ------------------------------------------------------------------------------------------


def _node_dict(view: View, n: FamilyNode) -> dict[str, Any]:
    return {
        "repo_id": n.repo_id, "parent": n.parent, "shown_parent": _shown_parent(view, n), "depth": n.depth,
        "relation": n.relation, "confidence": n.confidence, "distance": n.distance,
        "created_at": n.created_at.isoformat() if n.created_at else None,
        "declared_base_model": n.declared_base_model, "agrees_with_declared": n.agrees_with_declared,
        "revision": n.revision, "subtree": view.subtree.get(n.repo_id, 1), "focus": n.repo_id == view.family.focus,
        "other_parents": [{"repo_id": r, "weight": w} for r, w in n.other_parents],
    }


def view_dict(view: View) -> dict[str, Any]:
    """The view as one JSON-ready document: what `show --format json` prints and `/api/show` returns."""
    f = view.family
    return {
        "version": VIEW_VERSION, "focus": f.focus, "family": f.family, "cluster": f.cluster, "root": f.root,
        "in_forest": f.in_forest, "status": f.status, "reason": f.reason, "size": f.size,
        "depth_limit": f.depth_limit, "max_children": view.max_children, "max_nodes": view.max_nodes,
        "shown": len(view.nodes), "hidden": view.hidden, "summary": _summary(view),
        "nodes": [_node_dict(view, n) for n in view.nodes],
        "collapsed": [{"id": c.key, "parent": c.parent, "count": c.count, "models": c.models, "label": _more(c)}
                      for c in view.collapsed],
        "relations": dict(RELATION_COLOURS),
    }


def render_json(view: View) -> str:
    return json.dumps(view_dict(view), indent=2, sort_keys=True) + "\n"


# --- text ------------------------------------------------------------------------------------------


def _text_line(n: FamilyNode, focus: str, *, drawn_parent: bool) -> str:
    mark = "  ◀" if n.repo_id == focus else ""
    if not n.parent:
        fields = ["root", _date(n.created_at)]
    else:
        dist = "" if n.distance is None else f"  d={n.distance:.4g}"
        fields = [n.relation, f"conf {_confidence(n.confidence)}{dist}", _date(n.created_at)]
        if not drawn_parent:  # above a --depth cut, or a base that is not indexed
            fields.insert(1, f"of {n.parent}")
    if n.other_parents:
        fields.append("also from " + ", ".join(f"{r} ({w:.2f})" for r, w in n.other_parents))
    if n.agrees_with_declared is False:
        fields.append(f"declared: {n.declared_base_model} (disagrees)")
    return plain(f"{n.repo_id}{mark}  " + "  ".join(fields))


def render_text(view: View) -> str:
    """A tree, one line per model: relation, confidence, distance, upload date, a disagreeing declared base."""
    by_id = {n.repo_id: n for n in view.nodes}
    more = {c.parent: c for c in view.collapsed}
    lines = [plain(_summary(view))]
    if not view.family.in_forest:
        return lines[0] + "\n"
    # iterative, not recursive: a chain thousands deep must not hit Python's recursion limit
    stack: list[tuple[str, str, str]] = [(r, "", "") for r in reversed(view.roots)]
    while stack:
        key, lead, branch = stack.pop()
        if key.startswith("+"):
            lines.append(lead + branch + _more(more[key[1:]]))
            continue
        node = by_id[key]
        lines.append(lead + branch + _text_line(node, view.family.focus, drawn_parent=bool(_shown_parent(view, node))))
        below = lead + ("" if not branch else "    " if branch == "└── " else "│   ")
        kids = [*view.children.get(key, ()), *([f"+{key}"] if key in more else [])]
        for i, kid in reversed(list(enumerate(kids))):
            stack.append((kid, below, "└── " if i == len(kids) - 1 else "├── "))
    return "\n".join(lines) + "\n"


# --- mermaid ---------------------------------------------------------------------------------------

_MERMAID = str.maketrans({"#": "#35;", '"': "#quot;", "<": "#lt;", ">": "#gt;", "&": "#amp;", "\n": " ", "\r": " "})


def _mm(text: str) -> str:
    return plain(text).translate(_MERMAID)


def _ids(view: View) -> dict[str, str]:
    ids = {n.repo_id: f"n{i}" for i, n in enumerate(view.nodes)}
    ids.update({c.key: f"c{i}" for i, c in enumerate(view.collapsed)})
    return ids


def _merge_links(view: View) -> list[tuple[str, str]]:
    """(further parent, merge) for each shown merge whose further parents are shown too."""
    shown = {n.repo_id for n in view.nodes}
    return [(r, n.repo_id) for n in view.nodes for r, _ in n.other_parents if r in shown]


def _declared_links(view: View) -> list[tuple[str, str]]:
    """(declared base, model) for each shown model whose shown declared base is not its recovered parent."""
    shown = {n.repo_id for n in view.nodes}
    out = []
    for n in view.nodes:
        if n.agrees_with_declared is False:
            out += [(d.strip(), n.repo_id) for d in n.declared_base_model.split(";") if d.strip() in shown]
    return out


def render_mermaid(view: View) -> str:
    ids = _ids(view)
    lines = ["flowchart LR", f"  %% {_mm(_summary(view))}"]
    lines += [f"  classDef {rel} fill:{c},stroke:{c},color:#fff" for rel, c in sorted(RELATION_COLOURS.items())]
    lines += ["  classDef collapsed fill:#f8fafc,stroke:#94a3b8,stroke-dasharray:4 3,color:#334155"]
    for n in view.nodes:
        label = f"{_mm(n.repo_id)}<br/>{_mm(n.relation)} · {_date(n.created_at)}"
        cls = n.relation if n.relation in RELATION_COLOURS else "finetune"
        lines.append(f'  {ids[n.repo_id]}["{label}"]:::{cls}')
        if n.agrees_with_declared is False:
            lines.append(f"  style {ids[n.repo_id]} stroke:{DISAGREE_COLOUR},stroke-width:3px")
        if parent := _shown_parent(view, n):
            lines.append(f'  {ids[parent]} -->|"{_mm(n.relation)} {_confidence(n.confidence)}"| {ids[n.repo_id]}')
    for c in view.collapsed:
        lines.append(f'  {ids[c.key]}["{_mm(_more(c))}"]:::collapsed')
        lines.append(f"  {ids[c.parent]} -.- {ids[c.key]}")
    lines += [f"  {ids[base]} -. declared .-> {ids[child]}" for base, child in _declared_links(view)]
    lines += [f"  {ids[other]} -.->|merge| {ids[child]}" for other, child in _merge_links(view)]
    return "\n".join(lines) + "\n"


# --- dot -------------------------------------------------------------------------------------------


def _dq(*lines: str) -> str:
    """A DOT double-quoted string of one or more lines."""
    return '"' + "\\n".join(plain(t).replace("\\", "\\\\").replace('"', '\\"') for t in lines) + '"'


def render_dot(view: View) -> str:
    lines = ["digraph family {", f"  graph [rankdir=LR, labelloc=t, label={_dq(_summary(view))}];",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontcolor="white"];']
    for n in view.nodes:
        label = _dq(n.repo_id, f"{n.relation} · {_date(n.created_at)}")
        border = f', color="{DISAGREE_COLOUR}", penwidth=3' if n.agrees_with_declared is False else ""
        lines.append(f'  {_dq(n.repo_id)} [label={label}, fillcolor="{colour_of(n.relation)}"{border}];')
        if parent := _shown_parent(view, n):
            width = 1 + 4 * (n.confidence if n.confidence is not None else 0.25)
            lines.append(f"  {_dq(parent)} -> {_dq(n.repo_id)} [label={_dq(f'{n.relation} {_confidence(n.confidence)}')}, "
                         f'penwidth={width:.2f}, color="{colour_of(n.relation)}"];')
    for c in view.collapsed:
        lines.append(f'  {_dq(c.key)} [label={_dq(_more(c))}, style="rounded,dashed", fontcolor="black"];')
        lines.append(f"  {_dq(c.parent)} -> {_dq(c.key)} [style=dashed, arrowhead=none];")
    lines += [f'  {_dq(base)} -> {_dq(child)} [label="declared", style=dashed, color="{DISAGREE_COLOUR}", '
              f"constraint=false];" for base, child in _declared_links(view)]
    lines += [f'  {_dq(other)} -> {_dq(child)} [label="merge", style=dashed, color="{colour_of("merge")}"];'
              for other, child in _merge_links(view)]
    return "\n".join([*lines, "}"]) + "\n"


# --- svg -------------------------------------------------------------------------------------------

_LABEL_CHARS = 34  # at 11 px Helvetica about 6.2 px a character: the box is 220 px wide


def _x(text: str) -> str:
    return html.escape(plain(text), quote=True)


def _short(text: str) -> str:
    return text if len(text) <= _LABEL_CHARS else text[:_LABEL_CHARS - 1] + "…"


def _svg_node(n: FamilyNode, box: Box, focus: str) -> str:
    stroke = DISAGREE_COLOUR if n.agrees_with_declared is False else "#0f172a" if n.repo_id == focus else "none"
    tip = f"{n.repo_id} · {n.relation} · confidence {_confidence(n.confidence)} · {_date(n.created_at)}"
    if n.agrees_with_declared is False:
        tip += f" · declared {n.declared_base_model} (disagrees)"
    return (f'<g class="node" data-repo="{_x(n.repo_id)}" data-relation="{_x(n.relation)}">'
            f"<title>{_x(tip)}</title>"
            f'<rect x="{box.x}" y="{box.y}" width="{box.w}" height="{box.h}" rx="5" fill="{colour_of(n.relation)}" '
            f'stroke="{stroke}" stroke-width="2.5"/>'
            f'<text x="{box.x + 8}" y="{box.y + 15}">{_x(_short(n.repo_id))}</text>'
            f'<text x="{box.x + 8}" y="{box.y + 28}" class="sub">{_x(n.relation)} · {_confidence(n.confidence)} · '
            f"{_date(n.created_at)}</text></g>")


def _svg_edge(a: Box, b: Box, colour: str, width: float, *, dashed: bool = False, cls: str = "edge") -> str:
    x1, y1, x2, y2 = a.x + a.w, a.y + a.h / 2, b.x, b.y + b.h / 2
    mid = (x1 + x2) / 2
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    return (f'<path class="{cls}" d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
            f'fill="none" stroke="{colour}" stroke-width="{width:.2f}"{dash}/>')


def _svg_declared(a: Box, b: Box) -> str:
    """A dashed red arc on the right, from the declared base to the model (often its sibling or cousin)."""
    x1, y1, x2, y2 = a.x + a.w, a.y + a.h / 2, b.x + b.w, b.y + b.h / 2
    bulge = max(x1, x2) + 40
    return (f'<path class="declared" d="M{x1:.1f},{y1:.1f} C{bulge:.1f},{y1:.1f} {bulge:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
            f'fill="none" stroke="{DISAGREE_COLOUR}" stroke-width="1.5" stroke-dasharray="5 4"/>')


def _svg_legend() -> list[str]:
    out = []
    for i, (rel, colour) in enumerate(sorted(RELATION_COLOURS.items())):
        out.append(f'<rect x="{12 + i * 100}" y="30" width="12" height="12" rx="2" fill="{colour}"/>'
                   f'<text x="{28 + i * 100}" y="40" class="legend">{rel}</text>')
    return out


def render_svg(view: View) -> str:
    """A left-to-right tree (`indexer.web.layout`), boxes coloured by relation, edges as wide as confident."""
    boxes, width, height = tree_layout(view, top=56)
    by_id = {n.repo_id: n for n in view.nodes}
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">'),
             ("<style>text{fill:#fff}.sub{font-size:9px}.legend,.title,.more{fill:#0f172a}"
              ".title{font-size:13px;font-weight:bold}</style>"),
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="12" y="20" class="title">{_x(_summary(view))}</text>', *_svg_legend()]
    for n in view.nodes:
        if parent := _shown_parent(view, n):
            conf = n.confidence if n.confidence is not None else 0.25
            parts.append(_svg_edge(boxes[parent], boxes[n.repo_id], colour_of(n.relation), 1 + 4 * conf))
    parts += [_svg_declared(boxes[base], boxes[child]) for base, child in _declared_links(view)]
    parts += [_svg_edge(boxes[other], boxes[child], colour_of("merge"), 1.5, dashed=True, cls="merge")
              for other, child in _merge_links(view)]
    for c in view.collapsed:
        b = boxes[c.key]
        parts.append(_svg_edge(boxes[c.parent], b, "#94a3b8", 1, dashed=True))
        parts.append(f'<g class="collapsed"><rect x="{b.x}" y="{b.y}" width="{b.w}" height="{b.h}" rx="5" '
                     f'fill="#f8fafc" stroke="#94a3b8" stroke-dasharray="4 3"/>'
                     f'<text x="{b.x + 8}" y="{b.y + 20}" class="more">{_x(_more(c))}</text></g>')
    parts += [_svg_node(by_id[k], boxes[k], view.family.focus) for k in by_id]
    return "\n".join([*parts, "</svg>"]) + "\n"


# --- html ------------------------------------------------------------------------------------------


def static_text(name: str) -> str:
    """A file of the package's static/ folder (vendored cytoscape.js + cytoscape-dagre, our viewer, the stylesheet)."""
    return resources.files("indexer.web").joinpath("static", name).read_text(encoding="utf-8")


def script_json(obj: object) -> str:
    """JSON to sit inside <script type="application/json">: no "<", ">" or "&" can end or open a tag."""
    text = json.dumps(obj, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_MARK = re.compile(r"@(?:TITLE|STYLE|DATA|CYTOSCAPE|DAGRE|VIEWER)@")


def render_html(view: View) -> str:
    """One file that opens offline: the stylesheet, cytoscape.js + dagre, the viewer and the data all inline."""
    template = static_text("family-standalone.html")
    fills = {
        "@TITLE@": _x(f"{view.family.focus} · family"),
        "@STYLE@": static_text("family.css"),
        "@DATA@": script_json(view_dict(view)),
        "@CYTOSCAPE@": static_text("cytoscape.min.js"),
        "@DAGRE@": static_text("cytoscape-dagre.min.js"),
        "@VIEWER@": static_text("family.js"),
    }
    # one pass over the template: what goes in (a repo named "@VIEWER@", say) is never scanned again
    return _MARK.sub(lambda m: fills[m.group(0)], template)


# --- entry point -----------------------------------------------------------------------------------

RENDERERS = {"text": render_text, "mermaid": render_mermaid, "dot": render_dot, "svg": render_svg,
             "html": render_html, "json": render_json}


def show_family(home: Path, repo_id: str, *, fmt: Format = "text", depth: int | None = None,
                max_children: int = DEFAULT_MAX_CHILDREN, max_nodes: int = DEFAULT_MAX_NODES) -> str:
    """`index show`: the family of `repo_id`, summarised, in one of FORMATS."""
    family = family_of(home, repo_id, depth=depth)
    view = summarise(family, max_children=max_children, max_nodes=max_nodes)
    return RENDERERS[fmt](view)
