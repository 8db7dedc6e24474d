"""Sharded FAISS index of atlas cells: build (resumable), manifest, open, search with SQL filters, info.

``build_index(atlas, out, ...)`` indexes an atlas store; ``build_from_source(source, out, config)`` indexes any
:class:`VectorSource`; ``AtlasIndex.open(path)`` searches; ``index_info(path)`` summarises.

This package's names are the index's public surface: :mod:`query` imports from here (chiefly :class:`AtlasIndex`),
never from the modules inside.
"""

from scatlas.index.align import DEFAULT_SAMPLE as ALIGN_SAMPLE
from scatlas.index.align import MIN_SAMPLE as ALIGN_MIN_SAMPLE
from scatlas.index.align import Alignment, apply_shift, estimate_shift
from scatlas.index.atlas_index import AtlasIndex, SearchResult
from scatlas.index.build import BuildConfig, build_from_source
from scatlas.index.changes import other_store_id
from scatlas.index.device import resolve_device, torch_gpu_count
from scatlas.index.embedding import cell_reads, check_obsm
from scatlas.index.executor import Executor, LocalExecutor, RayExecutor, Task, TaskContext, make_executor
from scatlas.index.heads_training import train_label_heads
from scatlas.index.info import index_info
from scatlas.index.label_classes import LabelClasses
from scatlas.index.label_heads import (
    LabelHead,
    heads_files_identity,
    load_training_sample,
    load_training_sample_ids,
    refit_for_genes,
)
from scatlas.index.manifest import (
    DEFAULT_K,
    EmbedderInfo,
    IndexManifest,
    RecallReport,
    SearchDefaults,
    SimilarityCalibration,
    read_manifest,
)
from scatlas.index.mapping import (
    MappingCalibration,
    calibrate_mapping,
    mapping_calibration,
    mean_top_similarity,
    read_mapping_calibration,
)
from scatlas.index.metadata import failure_reason
from scatlas.index.predicate import Predicate, predicate_text, validate_predicate
from scatlas.index.progress import Progress, progress_bar
from scatlas.index.refmap import ensure_reference_map, fit_reference_map
from scatlas.index.refmap_model import ReferenceMap
from scatlas.index.sampling import sample_sorted
from scatlas.index.softmax import minimize_lbfgs
from scatlas.index.source import (
    ArrayVectorSource,
    NpyVectorSource,
    RangeVectorSource,
    ShardSpec,
    VectorSource,
    synthetic_source,
)
from scatlas.index.store_source import StoreVectorSource, build_index
from scatlas.index.update import UpdateReport, update_index
from scatlas.index.vectors import as_stored, l2_normalize
from scatlas.index.verify import verify_index

__all__ = [
    "load_training_sample",
    "load_training_sample_ids",
    "ALIGN_MIN_SAMPLE",
    "ALIGN_SAMPLE",
    "DEFAULT_K",
    "Alignment",
    "MappingCalibration",
    "apply_shift",
    "calibrate_mapping",
    "estimate_shift",
    "failure_reason",
    "mapping_calibration",
    "other_store_id",
    "read_mapping_calibration",
    "ArrayVectorSource",
    "AtlasIndex",
    "BuildConfig",
    "EmbedderInfo",
    "Executor",
    "IndexManifest",
    "LabelClasses",
    "LabelHead",
    "LocalExecutor",
    "NpyVectorSource",
    "Predicate",
    "Progress",
    "RangeVectorSource",
    "RayExecutor",
    "RecallReport",
    "ReferenceMap",
    "SearchDefaults",
    "SearchResult",
    "ShardSpec",
    "SimilarityCalibration",
    "StoreVectorSource",
    "Task",
    "TaskContext",
    "VectorSource",
    "as_stored",
    "build_from_source",
    "build_index",
    "cell_reads",
    "check_obsm",
    "ensure_reference_map",
    "fit_reference_map",
    "index_info",
    "l2_normalize",
    "make_executor",
    "mean_top_similarity",
    "minimize_lbfgs",
    "progress_bar",
    "read_manifest",
    "refit_for_genes",
    "resolve_device",
    "sample_sorted",
    "synthetic_source",
    "torch_gpu_count",
    "train_label_heads",
    "heads_files_identity",
    "validate_predicate",
    "predicate_text",
    "verify_index", "UpdateReport", "update_index",
]
