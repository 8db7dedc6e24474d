"""scatlas ``atlas``: the atlas store, ingest of atlas dumps, gene harmonisation, synthetic atlases, embedders.

Public API::

    from scatlas.atlas import ingest, AtlasStore
    report = ingest(["a.h5ad", "census_exp/"], "my_atlas", obs_map={"cluster": "cell_type"})
    store = AtlasStore.open("my_atlas")
"""

from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.ingestion import IngestReport, ingest
from scatlas.atlas.store import AtlasStore

__all__ = ["AtlasStore", "IngestReport", "ScatlasError", "ingest"]
