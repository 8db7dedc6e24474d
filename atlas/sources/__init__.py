"""Readers of atlas dumps and query files: chunked, bounded-memory access to obs, genes and expression values."""

from scatlas.atlas.sources.base import DatasetSource, choose_expression
from scatlas.atlas.sources.h5ad import AnnDataSource, H5adSource, open_h5ad
from scatlas.atlas.sources.soma import SomaExperimentSource, open_soma_experiment

__all__ = [
    "AnnDataSource",
    "DatasetSource",
    "H5adSource",
    "SomaExperimentSource",
    "choose_expression",
    "open_h5ad",
    "open_soma_experiment",
]
