"""Presentation of the model graph: `index show` (text, Mermaid, DOT, SVG, HTML, JSON) and `index web`.

Thin by design: everything is read through `store.graph` / `store.query` and formatted; nothing here
computes lineage. `render` and `view` import only the stdlib and the store's read side (no web framework),
so `index show` starts as fast as `index query`.
"""
