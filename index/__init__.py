"""Sharded FAISS index of atlas cells: build (resumable), manifest, open, search with SQL filters, info.

``build_index(atlas, out, ...)`` indexes an atlas store; ``build_from_source(source, out, config)`` indexes any
:class:`VectorSource`; ``AtlasIndex.open(path)`` searches; ``index_info(path)`` summarises.
"""

from scatlas.index.atlas_index import AtlasIndex, SearchResult
from scatlas.index.build import BuildConfig, build_from_source
from scatlas.index.info import index_info
from scatlas.index.manifest import (
    Calibration,
    EmbedderInfo,
    IndexManifest,
    RecallReport,
    SearchDefaults,
    read_manifest,
)
from scatlas.index.source import (
    ArrayVectorSource,
    NpyVectorSource,
    RangeVectorSource,
    ShardSpec,
    VectorSource,
    synthetic_source,
)
from scatlas.index.store_source import StoreVectorSource, build_index

__all__ = [
    "ArrayVectorSource",
    "AtlasIndex",
    "BuildConfig",
    "Calibration",
    "EmbedderInfo",
    "IndexManifest",
    "NpyVectorSource",
    "RangeVectorSource",
    "RecallReport",
    "SearchDefaults",
    "SearchResult",
    "ShardSpec",
    "StoreVectorSource",
    "VectorSource",
    "build_from_source",
    "build_index",
    "index_info",
    "synthetic_source",
    "read_manifest",
]
