"""Relation detection (adapter, quantized, merge, duplicate) in one place, called by the incremental
index (and usable by a batch recovery), so that the two cannot disagree."""
