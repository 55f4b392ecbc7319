"""Incremental lineage: k-NN nominees, exact pairs, per-cluster minimum arborescences kept optimal.

Import the modules themselves (`indexer.incremental.index`, `.exact`, `.forest`, ...): this package
imports nothing, so that the exact kernel alone (torch) does not pull in FAISS, DuckDB and numba.
"""
