"""Incremental lineage: k-NN nominees, exact pairs, per-cluster minimum arborescences kept optimal."""

from indexer.incremental.arborescence import Arborescence, edmonds, try_attach
from indexer.incremental.folder import IngestReport, ingest_folder
from indexer.incremental.forest import Candidate, IncrementalForest, Update
from indexer.incremental.index import ArrivalResult, LineageIndex

__all__ = ["Arborescence", "ArrivalResult", "Candidate", "IncrementalForest", "IngestReport", "LineageIndex", "Update",
           "edmonds", "ingest_folder", "try_attach"]
