"""Persistence: Parquet tables (`tables`, `schema`, `format`), the write lock (`lock`), crash-safe
writes (`atomic`), FAISS per family (`vectors`), the tensor cache (`cache`) and DuckDB reads (`query`).

Nothing is imported here on purpose: `store.query` must load without faiss (see its docstring).
"""
