"""scatlas ``atlas``: the atlas store, ingest of atlas dumps, gene harmonisation, synthetic atlases, embedders.

Public API::

    from scatlas.atlas import ingest, AtlasStore
    report = ingest(["a.h5ad", "census_exp/"], "my_atlas", obs_map={"cluster": "cell_type"})
    store = AtlasStore.open("my_atlas")
    listing = list_datasets("my_atlas")  # what it holds; remove_datasets and relabel_dataset change it
"""

from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.ingestion import IngestReport, ingest
from scatlas.atlas.lifecycle import (
    RelabelReport,
    RemoveReport,
    StoreListing,
    list_datasets,
    relabel_dataset,
    remove_datasets,
)
from scatlas.atlas.store import AtlasStore

__all__ = [
    "AtlasStore", "IngestReport", "RelabelReport", "RemoveReport", "ScatlasError", "StoreListing", "ingest",
    "list_datasets", "relabel_dataset", "remove_datasets",
]
