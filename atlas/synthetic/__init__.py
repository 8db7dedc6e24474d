"""Synthetic single-cell data with a known truth, streamed at any size: demo, test and benchmark inputs.

Two levels, apart:

* **Counts** (:class:`SyntheticAtlasConfig`): cells of several datasets, donors and cell types drawn from a
  known generative model (:mod:`.plan`, :mod:`.cells`), with CELLxGENE Census obs columns plus the ground
  truth ``truth_is_rare``; as AnnData chunks (:func:`generate_chunks`, :mod:`.counts`), one ``.h5ad`` per
  dataset written chunk by chunk (:func:`write_h5ad_datasets`, :mod:`.h5ad`) or straight into an atlas store
  (:func:`ingest_synthetic`, :mod:`.store`).
* **Embeddings** (:class:`SyntheticEmbeddingConfig`, :mod:`.embeddings`): L2-normalised vectors from a
  clustered mixture, with :func:`sample_queries` and a streaming exact top-k (:func:`exact_knn`, :mod:`.knn`)
  for recall measurement.

Randomness is keyed, never sequential: every block of cells (or vectors) has its own seed derived from
``(seed, dataset, block)``, and blocks have a fixed size, so the output for a given config is identical
whatever ``chunk_size`` is and any range can be regenerated on its own.
"""

from scatlas.atlas.synthetic.config import (
    DEFAULT_CELL_TYPES,
    DEFAULT_RARE_TYPES,
    DEFAULT_TISSUES,
    GENE_ID_STYLES,
    H5AD_LAYOUTS,
    MAX_GENES,
    CellType,
    GeneIdStyle,
    H5adLayout,
    RareType,
    SyntheticAtlasConfig,
)
from scatlas.atlas.synthetic.counts import dataset_anndata, generate_chunks
from scatlas.atlas.synthetic.embeddings import (
    SyntheticEmbeddingConfig,
    generate_embedding_chunks,
    sample_queries,
    vectors_for_range,
    write_embedding_npy,
)
from scatlas.atlas.synthetic.files import synthesize
from scatlas.atlas.synthetic.h5ad import write_h5ad_datasets
from scatlas.atlas.synthetic.knn import exact_knn
from scatlas.atlas.synthetic.plan import AtlasPlan, DatasetPlan, DonorPlan, ensembl_id, plan_atlas
from scatlas.atlas.synthetic.store import ingest_synthetic

__all__ = [
    "DEFAULT_CELL_TYPES",
    "DEFAULT_RARE_TYPES",
    "DEFAULT_TISSUES",
    "GENE_ID_STYLES",
    "H5AD_LAYOUTS",
    "MAX_GENES",
    "AtlasPlan",
    "CellType",
    "DatasetPlan",
    "DonorPlan",
    "GeneIdStyle",
    "H5adLayout",
    "RareType",
    "SyntheticAtlasConfig",
    "SyntheticEmbeddingConfig",
    "dataset_anndata",
    "ensembl_id",
    "exact_knn",
    "generate_chunks",
    "generate_embedding_chunks",
    "ingest_synthetic",
    "plan_atlas",
    "sample_queries",
    "synthesize",
    "vectors_for_range",
    "write_embedding_npy",
    "write_h5ad_datasets",
]
