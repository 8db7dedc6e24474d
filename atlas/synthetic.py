"""Synthetic single-cell atlases, streamed at any size.

Two levels:

* **Counts** (:class:`SyntheticAtlasConfig`): cells of several datasets, donors and cell types with a known
  generative model -- per type a log-mean expression profile (shared baseline + lineage program shared by
  related types + type-specific marker genes), per-gene log-normal dataset (batch) and donor effects, a small
  disease program, log-normal library sizes and negative-binomial (gamma-Poisson) sampling with per-gene
  dispersion. Obs columns follow the CELLxGENE Census schema, plus the ground truth ``truth_is_rare``. Rare
  populations are present only in some datasets and carry their own marker program; ``absent_types`` holds
  types out of chosen datasets.
  :func:`generate_chunks` yields AnnData chunks; :func:`write_h5ad_datasets` writes one ``.h5ad`` per dataset
  with h5py, chunk by chunk, so memory is bounded by the chunk size.
* **Embeddings** (:class:`SyntheticEmbeddingConfig`): L2-normalised vectors from a clustered mixture (uneven
  cluster sizes, anisotropic noise, some clusters close to each other) for index benchmarks, with
  :func:`sample_queries` and a streaming exact top-k :func:`exact_knn` for recall measurement.

Randomness is keyed, never sequential: every block of cells (or vectors) has its own seed derived from
``(seed, dataset, block)``, and blocks have a fixed size, so the output for a given config is identical
whatever ``chunk_size`` is and any range can be regenerated on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.normalize import to_lognorm

try:
    from anndata.io import write_elem
except ImportError:  # anndata < 0.11
    from anndata.experimental import write_elem  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

__all__ = [
    "AtlasPlan",
    "CellType",
    "DatasetPlan",
    "DonorPlan",
    "H5adLayout",
    "RareType",
    "SyntheticAtlasConfig",
    "SyntheticEmbeddingConfig",
    "dataset_anndata",
    "ensembl_id",
    "exact_knn",
    "generate_chunks",
    "generate_embedding_chunks",
    "plan_atlas",
    "sample_queries",
    "synthesize",
    "vectors_for_range",
    "write_embedding_npy",
    "write_h5ad_datasets",
]

H5adLayout = Literal["counts", "lognorm+counts", "lognorm", "lognorm+raw"]
"""``counts``: X = raw counts. ``lognorm+counts``: X = log1p(CP10k), ``layers["counts"]`` = counts.
``lognorm``: X = log1p(CP10k) only. ``lognorm+raw``: X = log1p(CP10k), ``.raw.X`` = counts."""

GeneIdStyle = Literal["ensembl", "symbol"]

H5AD_LAYOUTS: tuple[str, ...] = get_args(H5adLayout)
GENE_ID_STYLES: tuple[str, ...] = get_args(GeneIdStyle)

MAX_GENES = 900_000
"""Ensembl-like ids are a bijection of the gene index onto 6 digits; more genes than this would collide."""

_BASELINE_SIGMA = 1.3  # spread of the shared log-mean profile across genes
_LOW_GENE_FRACTION, _LOW_GENE_SHIFT = 0.6, 3.5  # most genes are barely expressed at baseline (sets sparsity)
_DISPERSION_SIGMA = 0.5  # spread of per-gene NB dispersion around its median
_MARKER_POOL_QUANTILE = (
    0.7  # markers are drawn from genes below this baseline quantile (specific, low elsewhere)
)
_DISEASE_PROGRAM_GENES = 30
_NORMAL = "normal"

# Keys of independent random streams (first entry after the seed).
_S_GENES, _S_PROGRAM, _S_LINEAGE, _S_DISEASE, _S_DATASETS, _S_DONORS = 1, 2, 3, 4, 5, 6
_S_DS_EFFECT, _S_BLOCK, _S_RARE, _S_MIXTURE, _S_EMB_BLOCK, _S_QUERY = 7, 8, 9, 10, 11, 12


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellType:
    """A common cell type: ``abundance`` is a relative weight; types of one ``lineage`` share a program."""

    name: str
    abundance: float = 1.0
    lineage: str | None = None


@dataclass(frozen=True)
class RareType:
    """A rare population with its own marker program (and optionally a ``lineage``).

    ``fraction`` is its share of the cells of each dataset it is present in; ``datasets`` are those dataset
    indices (None: about half of the datasets, picked from the seed).
    """

    name: str
    fraction: float
    datasets: tuple[int, ...] | None = None
    lineage: str | None = None


DEFAULT_CELL_TYPES: tuple[CellType, ...] = (
    CellType("CD4-positive, alpha-beta T cell", 0.22, "T cell"),
    CellType("CD8-positive, alpha-beta T cell", 0.14, "T cell"),
    CellType("natural killer cell", 0.07, "cytotoxic"),
    CellType("B cell", 0.10, "B cell"),
    CellType("plasma cell", 0.03, "B cell"),
    CellType("classical monocyte", 0.18, "myeloid"),
    CellType("non-classical monocyte", 0.05, "myeloid"),
    CellType("conventional dendritic cell", 0.03, "myeloid"),
    CellType("endothelial cell", 0.08),
    CellType("fibroblast", 0.10),
)
DEFAULT_RARE_TYPES: tuple[RareType, ...] = (RareType("ionocyte", 0.002),)
DEFAULT_TISSUES: tuple[str, ...] = ("blood", "lung parenchyma", "renal cortex", "liver")
_KNOWN_TISSUE_GENERAL: dict[str, str] = {"lung parenchyma": "lung", "renal cortex": "kidney"}


@dataclass(frozen=True)
class SyntheticAtlasConfig:
    """A synthetic counts-level atlas. All effect sizes are on the natural-log scale of expected counts.

    ``absent_types`` maps a type name to the dataset indices it is *not* generated in (to test unknown
    populations). ``rare_types`` fractions are per dataset where present. Tissues are assigned per dataset
    (round-robin), assays per dataset, diseases / sex / age per donor. ``tissue_general`` gives one coarse
    tissue per tissue (None: a few known mappings, else the tissue itself). ``layout`` is the default h5ad
    layout.
    """

    n_cells: int = 10_000
    n_genes: int = 2000
    n_datasets: int = 3
    n_donors: int = 4
    cell_types: tuple[CellType, ...] = DEFAULT_CELL_TYPES
    rare_types: tuple[RareType, ...] = DEFAULT_RARE_TYPES
    absent_types: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    tissues: tuple[str, ...] = DEFAULT_TISSUES
    tissue_general: tuple[str, ...] | None = None
    diseases: tuple[str, ...] = (_NORMAL, "COVID-19", "influenza")
    assays: tuple[str, ...] = ("10x 3' v3", "10x 3' v2", "10x 5' v2")
    non_primary_fraction: float = 0.01
    dataset_size_sigma: float = 0.3
    composition_sigma: float = 0.3
    batch_sigma: float = 0.3
    donor_sigma: float = 0.1
    disease_effect: float = 0.5
    median_umis: float = 1500.0
    depth_sigma: float = 0.25
    library_sigma: float = 0.4
    dispersion: float = 0.5
    n_markers: int = 15
    n_lineage_markers: int = 20
    n_rare_markers: int = 30
    marker_lfc: tuple[float, float] = (1.5, 3.0)
    gene_ids: GeneIdStyle = "ensembl"
    layout: H5adLayout = "counts"
    dataset_prefix: str = "synth"
    seed: int = 0
    chunk_size: int = 10_000

    def __post_init__(self) -> None:
        # Accept lists where tuples are declared (frozen: set through object.__setattr__).
        for name in (
            "cell_types",
            "rare_types",
            "tissues",
            "tissue_general",
            "diseases",
            "assays",
            "marker_lfc",
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        absent = {str(k): tuple(int(i) for i in v) for k, v in dict(self.absent_types).items()}
        object.__setattr__(self, "absent_types", absent)
        _validate_atlas_config(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)


def _fail(message: str) -> NoReturn:
    raise InputError(f"invalid synthetic atlas config: {message}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        _fail(message)


def _validate_atlas_config(c: SyntheticAtlasConfig) -> None:
    _validate_sizes(c)
    _validate_types(c)
    _validate_metadata(c)
    _validate_model(c)


def _validate_sizes(c: SyntheticAtlasConfig) -> None:
    _check(c.n_datasets >= 1, f"n_datasets={c.n_datasets}: need at least 1 dataset")
    _check(
        c.n_cells >= c.n_datasets, f"n_cells={c.n_cells}: need at least one cell per dataset ({c.n_datasets})"
    )
    _check(c.n_donors >= 1, f"n_donors={c.n_donors}: need at least 1 donor per dataset")
    _check(50 <= c.n_genes <= MAX_GENES, f"n_genes={c.n_genes}: must be between 50 and {MAX_GENES}")
    _check(c.chunk_size >= 1, f"chunk_size={c.chunk_size}: must be a positive number of cells")
    _check(c.seed >= 0, f"seed={c.seed}: must be a non-negative integer")
    n_markers = max(c.n_markers, c.n_lineage_markers, c.n_rare_markers)
    pool = int(c.n_genes * _MARKER_POOL_QUANTILE)
    _check(min(c.n_markers, c.n_lineage_markers, c.n_rare_markers) >= 1, "marker counts must be >= 1")
    _check(
        n_markers <= pool // 2,
        f"{n_markers} markers per program is too many for n_genes={c.n_genes}: "
        f"use at most {pool // 2} markers, or more genes",
    )


def _validate_types(c: SyntheticAtlasConfig) -> None:
    _check(len(c.cell_types) >= 1, "cell_types is empty: give at least one CellType(name, abundance)")
    _check(all(isinstance(t, CellType) for t in c.cell_types), "cell_types must be CellType(...) objects")
    _check(all(isinstance(t, RareType) for t in c.rare_types), "rare_types must be RareType(...) objects")
    names = [t.name for t in c.cell_types] + [r.name for r in c.rare_types]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"cell type names must be unique; repeated: {dupes}")
    _check(all(n.strip() for n in names), "cell type names must be non-empty")
    _check(len(names) <= 5000, f"{len(names)} cell types is too many; use at most 5000")
    for t in c.cell_types:
        _check(
            bool(np.isfinite(t.abundance)) and t.abundance > 0, f"cell type {t.name!r}: abundance must be > 0"
        )
    for r in c.rare_types:
        _check(0 < r.fraction <= 0.5, f"rare type {r.name!r}: fraction={r.fraction} must be in (0, 0.5]")
        if r.datasets is not None:
            _check(
                len(r.datasets) >= 1,
                f"rare type {r.name!r}: datasets is empty; use None to pick automatically",
            )
            _check_indices(c, r.datasets, f"rare type {r.name!r} datasets")
    for name, idx in c.absent_types.items():
        _check(name in names, f"absent_types names unknown cell type {name!r}; known: {names}")
        _check_indices(c, idx, f"absent_types[{name!r}]")
    for i in range(c.n_datasets):
        common = [t.name for t in c.cell_types if i not in c.absent_types.get(t.name, ())]
        _check(bool(common), f"dataset {i} has no common cell type left after absent_types")
        total = sum(r.fraction for r in c.rare_types if i in _rare_candidates(c, r))
        _check(total <= 0.5, f"rare fractions sum to {total:.3f} in dataset {i}; keep them <= 0.5")


def _check_indices(c: SyntheticAtlasConfig, idx: Sequence[int], what: str) -> None:
    bad = [i for i in idx if not 0 <= i < c.n_datasets]
    _check(not bad, f"{what}: dataset indices {bad} out of range 0..{c.n_datasets - 1}")


def _rare_candidates(c: SyntheticAtlasConfig, r: RareType) -> tuple[int, ...]:
    """Datasets a rare type may appear in (explicit, or all when picked automatically: an upper bound)."""
    return tuple(r.datasets) if r.datasets is not None else tuple(range(c.n_datasets))


def _validate_metadata(c: SyntheticAtlasConfig) -> None:
    for name in ("tissues", "diseases", "assays"):
        values = getattr(c, name)
        _check(len(values) >= 1 and all(str(v).strip() for v in values), f"{name} must be non-empty strings")
    if c.tissue_general is not None:
        _check(
            len(c.tissue_general) == len(c.tissues),
            f"tissue_general has {len(c.tissue_general)} entries for {len(c.tissues)} tissues; give one per "
            "tissue or None (tissue_general = tissue)",
        )
    _check(c.gene_ids in GENE_ID_STYLES, f"gene_ids={c.gene_ids!r}: choose one of {GENE_ID_STYLES}")
    _check(c.layout in H5AD_LAYOUTS, f"layout={c.layout!r}: choose one of {H5AD_LAYOUTS}")
    _check(
        bool(c.dataset_prefix.strip()) and "/" not in c.dataset_prefix,
        f"dataset_prefix={c.dataset_prefix!r}: must be a non-empty name without '/'",
    )


def _validate_model(c: SyntheticAtlasConfig) -> None:
    _check(
        0 <= c.non_primary_fraction < 1, f"non_primary_fraction={c.non_primary_fraction}: must be in [0, 1)"
    )
    for name in (
        "dataset_size_sigma",
        "composition_sigma",
        "batch_sigma",
        "donor_sigma",
        "disease_effect",
        "depth_sigma",
        "library_sigma",
    ):
        value = getattr(c, name)
        _check(bool(np.isfinite(value)) and value >= 0, f"{name}={value}: must be a finite number >= 0")
    _check(c.median_umis > 0, f"median_umis={c.median_umis}: must be > 0")
    _check(c.dispersion > 0, f"dispersion={c.dispersion}: must be > 0 (use a small value for near-Poisson)")
    ok = len(c.marker_lfc) == 2 and 0 < float(c.marker_lfc[0]) <= float(c.marker_lfc[1])
    _check(ok, f"marker_lfc={c.marker_lfc}: give (low, high) with 0 < low <= high")


# ------------------------------------------------------------------------------------------------------------
# Seeding and small helpers
# ------------------------------------------------------------------------------------------------------------


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _name_key(name: str) -> int:
    """A stable non-negative integer for a name (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def ensembl_id(index: int) -> str:
    """Deterministic, realistic-looking Ensembl gene id for gene ``index`` (``ENSG`` + 11 digits, unique)."""
    return f"ENSG{100_000 + (index * 7919 + 4321) % 900_000:011d}"


def _split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder), each >= 1."""
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    while (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


def _ontology_ids(names: Sequence[str]) -> list[str]:
    """Fake but stable ``CL:000xxxx`` ids, from a hash of the name (collisions resolved in order)."""
    taken: set[int] = set()
    out = []
    for name in names:
        code = _name_key(name) % 10_000
        while code in taken:
            code = (code + 1) % 10_000
        taken.add(code)
        out.append(f"CL:000{code:04d}")
    return out


def _counts_block_cells(n_genes: int) -> int:
    """Fixed block size of the counts generator (bounds the dense working set to ~2M values)."""
    return int(np.clip(2**21 // n_genes, 64, 2048))


# ------------------------------------------------------------------------------------------------------------
# The plan: everything small that is decided before any cell is drawn
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DonorPlan:
    donor_id: str
    sex: str
    disease: str
    development_stage: str
    weight: float


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset: its size, global cell offset, metadata and expected cell-type composition."""

    index: int
    dataset_id: str
    n_cells: int
    start: int
    tissue: str
    tissue_general: str
    assay: str
    donors: tuple[DonorPlan, ...]
    type_probs: np.ndarray  # over AtlasPlan.type_names; 0 where the type is absent
    library_log_mean: float

    @property
    def present_types(self) -> np.ndarray:
        return np.flatnonzero(self.type_probs > 0)


@dataclass(frozen=True)
class AtlasPlan:
    """The generative model of an atlas, small (types x genes, datasets x donors); cells are drawn from it."""

    config: SyntheticAtlasConfig
    type_names: tuple[str, ...]
    is_rare: np.ndarray
    ontology_ids: tuple[str, ...]
    rare_datasets: dict[str, tuple[int, ...]]
    datasets: tuple[DatasetPlan, ...]
    var: pd.DataFrame
    log_profiles: np.ndarray  # (n_types, n_genes): baseline + lineage + type program
    nb_shape: np.ndarray  # (n_genes,): 1 / dispersion
    markers: dict[str, np.ndarray]  # type name -> its own marker gene columns
    lineage_markers: dict[str, np.ndarray]
    disease_programs: dict[str, tuple[np.ndarray, np.ndarray]]  # disease -> (gene columns, log-fold changes)

    @property
    def block_cells(self) -> int:
        return _counts_block_cells(self.config.n_genes)

    def dataset_effect(self, index: int) -> np.ndarray:
        """Per-gene log batch effect of dataset ``index``."""
        c = self.config
        return _rng(c.seed, _S_DS_EFFECT, index).normal(0.0, c.batch_sigma, c.n_genes)

    def donor_effects(self, index: int) -> np.ndarray:
        """(n_donors, n_genes) log effects of each donor of dataset ``index``: dataset + donor + disease."""
        c = self.config
        ds = self.datasets[index]
        eff = _rng(c.seed, _S_DONORS, index, 1).normal(0.0, c.donor_sigma, (len(ds.donors), c.n_genes))
        eff += self.dataset_effect(index)[None, :]
        for j, donor in enumerate(ds.donors):
            if donor.disease in self.disease_programs:
                cols, lfc = self.disease_programs[donor.disease]
                eff[j, cols] += lfc
        return eff


def plan_atlas(config: SyntheticAtlasConfig) -> AtlasPlan:
    """Decide genes, programs, datasets and donors of an atlas (deterministic from the config's seed)."""
    c = config
    rng = _rng(c.seed, _S_GENES)
    baseline = rng.normal(0.0, _BASELINE_SIGMA, c.n_genes)
    baseline[rng.random(c.n_genes) < _LOW_GENE_FRACTION] -= _LOW_GENE_SHIFT
    dispersion = c.dispersion * np.exp(rng.normal(0.0, _DISPERSION_SIGMA, c.n_genes))
    pool = np.flatnonzero(baseline <= np.quantile(baseline, _MARKER_POOL_QUANTILE))
    type_names = tuple([t.name for t in c.cell_types] + [r.name for r in c.rare_types])
    lineages = [t.lineage for t in c.cell_types] + [r.lineage for r in c.rare_types]
    profiles, markers, lineage_markers = _type_programs(c, baseline, pool, type_names, lineages)
    rare_datasets = {r.name: _pick_rare_datasets(c, r) for r in c.rare_types}
    return AtlasPlan(
        config=c,
        type_names=type_names,
        is_rare=np.array([False] * len(c.cell_types) + [True] * len(c.rare_types)),
        ontology_ids=tuple(_ontology_ids(type_names)),
        rare_datasets=rare_datasets,
        datasets=_plan_datasets(c, type_names, rare_datasets),
        var=_make_var(c.n_genes, c.gene_ids),
        log_profiles=profiles,
        nb_shape=1.0 / dispersion,
        markers=markers,
        lineage_markers=lineage_markers,
        disease_programs=_disease_programs(c),
    )


def _program(
    rng: np.random.Generator, pool: np.ndarray, n: int, lfc: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    cols = np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))
    return cols, rng.uniform(lfc[0], lfc[1], size=len(cols))


def _type_programs(
    c: SyntheticAtlasConfig,
    baseline: np.ndarray,
    pool: np.ndarray,
    type_names: Sequence[str],
    lineages: Sequence[str | None],
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Log-mean profile per type; programs are seeded by name, so adding a type does not change the others."""
    lfc = (float(c.marker_lfc[0]), float(c.marker_lfc[1]))
    profiles = np.tile(baseline, (len(type_names), 1))
    lineage_markers: dict[str, np.ndarray] = {}
    for lineage in sorted({x for x in lineages if x is not None}):
        cols, up = _program(_rng(c.seed, _S_LINEAGE, _name_key(lineage)), pool, c.n_lineage_markers, lfc)
        lineage_markers[lineage] = cols
        for t, own in enumerate(lineages):
            if own == lineage:
                profiles[t, cols] += up
    markers: dict[str, np.ndarray] = {}
    n_common = len(c.cell_types)
    for t, name in enumerate(type_names):
        n = c.n_markers if t < n_common else c.n_rare_markers
        cols, up = _program(_rng(c.seed, _S_PROGRAM, _name_key(name)), pool, n, lfc)
        markers[name] = cols
        profiles[t, cols] += up
    return profiles, markers, lineage_markers


def _disease_programs(c: SyntheticAtlasConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if c.disease_effect <= 0:
        return out
    all_genes = np.arange(c.n_genes)
    for disease in c.diseases:
        if disease.lower() == _NORMAL:
            continue
        rng = _rng(c.seed, _S_DISEASE, _name_key(disease))
        scale = (0.5 * c.disease_effect, 1.5 * c.disease_effect)
        out[disease] = _program(rng, all_genes, min(_DISEASE_PROGRAM_GENES, c.n_genes // 10), scale)
    return out


def _pick_rare_datasets(c: SyntheticAtlasConfig, r: RareType) -> tuple[int, ...]:
    if r.datasets is not None:
        return tuple(sorted(set(r.datasets)))
    n_present = max(1, c.n_datasets // 2)
    picked = _rng(c.seed, _S_RARE, _name_key(r.name)).choice(c.n_datasets, size=n_present, replace=False)
    return tuple(sorted(int(i) for i in picked))


def _plan_datasets(
    c: SyntheticAtlasConfig, type_names: Sequence[str], rare_datasets: Mapping[str, tuple[int, ...]]
) -> tuple[DatasetPlan, ...]:
    rng = _rng(c.seed, _S_DATASETS)
    sizes = _split_counts(c.n_cells, np.exp(rng.normal(0.0, c.dataset_size_sigma, c.n_datasets)))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    general = c.tissue_general or tuple(_KNOWN_TISSUE_GENERAL.get(t, t) for t in c.tissues)
    out = []
    for i in range(c.n_datasets):
        ds_rng = _rng(c.seed, _S_DATASETS, i)
        dataset_id = f"{c.dataset_prefix}-{i:03d}"
        out.append(
            DatasetPlan(
                index=i,
                dataset_id=dataset_id,
                n_cells=int(sizes[i]),
                start=int(starts[i]),
                tissue=c.tissues[i % len(c.tissues)],
                tissue_general=general[i % len(general)],
                assay=str(ds_rng.choice(list(c.assays))),
                donors=_plan_donors(c, ds_rng, dataset_id),
                type_probs=_type_probs(c, ds_rng, i, type_names, rare_datasets),
                library_log_mean=float(np.log(c.median_umis) + ds_rng.normal(0.0, c.depth_sigma)),
            )
        )
    return tuple(out)


def _plan_donors(c: SyntheticAtlasConfig, rng: np.random.Generator, dataset_id: str) -> tuple[DonorPlan, ...]:
    donors = []
    for j in range(c.n_donors):
        donors.append(
            DonorPlan(
                donor_id=f"{dataset_id}-donor{j:02d}",
                sex=str(rng.choice(["female", "male"])),
                disease=str(rng.choice(list(c.diseases))),
                development_stage=f"{int(rng.integers(18, 86))}-year-old human stage",
                weight=float(np.exp(rng.normal(0.0, 0.5))),
            )
        )
    return tuple(donors)


def _type_probs(
    c: SyntheticAtlasConfig,
    rng: np.random.Generator,
    index: int,
    type_names: Sequence[str],
    rare_datasets: Mapping[str, tuple[int, ...]],
) -> np.ndarray:
    n_common = len(c.cell_types)
    probs = np.zeros(len(type_names))
    noise = np.exp(rng.normal(0.0, c.composition_sigma, n_common))
    for t, ct in enumerate(c.cell_types):
        if index not in c.absent_types.get(ct.name, ()):
            probs[t] = ct.abundance * noise[t]
    rare_total = 0.0
    for k, r in enumerate(c.rare_types):
        if index in rare_datasets[r.name] and index not in c.absent_types.get(r.name, ()):
            probs[n_common + k] = r.fraction
            rare_total += r.fraction
    probs[:n_common] *= (1.0 - rare_total) / probs[:n_common].sum()
    return probs


def _make_var(n_genes: int, style: str) -> pd.DataFrame:
    symbols = [f"GENE{i + 1}" for i in range(n_genes)]
    if style == "symbol":
        return pd.DataFrame({"feature_name": symbols}, index=pd.Index(symbols, dtype=object))
    ids = [ensembl_id(i) for i in range(n_genes)]
    return pd.DataFrame({"feature_id": ids, "feature_name": symbols}, index=pd.Index(ids, dtype=object))


# ------------------------------------------------------------------------------------------------------------
# Drawing cells: fixed-size blocks, each with its own seed, re-cut into chunks
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cells:
    """Cells ``[offset, offset + len)`` of one dataset: labels, donors, flags and raw counts (float32 CSR)."""

    offset: int
    types: np.ndarray
    donors: np.ndarray
    primary: np.ndarray
    counts: sp.csr_matrix

    def __len__(self) -> int:
        return len(self.types)

    def slice(self, lo: int, hi: int) -> _Cells:
        return _Cells(
            self.offset + lo, self.types[lo:hi], self.donors[lo:hi], self.primary[lo:hi], self.counts[lo:hi]
        )

    @staticmethod
    def concat(parts: Sequence[_Cells]) -> _Cells:
        if len(parts) == 1:
            return parts[0]
        return _Cells(
            parts[0].offset,
            np.concatenate([p.types for p in parts]),
            np.concatenate([p.donors for p in parts]),
            np.concatenate([p.primary for p in parts]),
            sp.csr_matrix(sp.vstack([p.counts for p in parts], format="csr")),
        )


def _draw_block(plan: AtlasPlan, ds: DatasetPlan, effects: np.ndarray, block: int) -> _Cells:
    c = plan.config
    size = plan.block_cells
    start = block * size
    m = min(start + size, ds.n_cells) - start
    rng = _rng(c.seed, _S_BLOCK, ds.index, block)
    donor_w = np.array([d.weight for d in ds.donors])
    types = rng.choice(len(plan.type_names), size=m, p=ds.type_probs).astype(np.int32)
    donors = rng.choice(len(ds.donors), size=m, p=donor_w / donor_w.sum()).astype(np.int32)
    library = np.exp(rng.normal(ds.library_log_mean, c.library_sigma, m))
    primary = rng.random(m) >= c.non_primary_fraction
    counts = _sample_counts(rng, plan.log_profiles[types] + effects[donors], library, plan.nb_shape)
    return _Cells(start, types, donors, primary, counts)


def _sample_counts(
    rng: np.random.Generator, log_mu: np.ndarray, library: np.ndarray, shape: np.ndarray
) -> sp.csr_matrix:
    """Negative-binomial (gamma-Poisson) counts; rows of ``exp(log_mu)`` are scaled to ``library`` UMIs."""
    log_mu -= log_mu.max(axis=1, keepdims=True)
    mu = np.exp(log_mu, out=log_mu)
    mu *= (library / mu.sum(axis=1))[:, None]
    mu /= shape[None, :]
    lam = rng.standard_gamma(np.broadcast_to(shape, mu.shape))
    lam *= mu
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def _iter_cells(plan: AtlasPlan, ds: DatasetPlan, chunk_size: int) -> Iterator[_Cells]:
    """Cells of one dataset in chunks of ``chunk_size``; identical cells whatever the chunk size."""
    effects = plan.donor_effects(ds.index)
    size = plan.block_cells
    cached: tuple[int, _Cells] | None = None
    for start in range(0, ds.n_cells, chunk_size):
        stop = min(start + chunk_size, ds.n_cells)
        parts = []
        for b in range(start // size, (stop - 1) // size + 1):
            if cached is None or cached[0] != b:
                cached = (b, _draw_block(plan, ds, effects, b))
            lo, hi = max(start, b * size) - b * size, min(stop, (b + 1) * size) - b * size
            parts.append(cached[1].slice(lo, hi))
        yield _Cells.concat(parts)


def _categorical(values: Sequence[str], codes: np.ndarray) -> pd.Categorical:
    """A categorical over the distinct ``values`` (sorted), indexed by ``codes`` into ``values``."""
    categories = sorted(set(values))
    lookup = np.array([categories.index(v) for v in values], dtype=np.int64)
    return pd.Categorical.from_codes(lookup[codes], categories=categories)


def _make_obs(plan: AtlasPlan, ds: DatasetPlan, cells: _Cells) -> pd.DataFrame:
    n = len(cells)
    present = ds.present_types
    local = np.full(len(plan.type_names), -1, dtype=np.int64)
    local[present] = np.arange(len(present))
    type_codes = local[cells.types]
    one = np.zeros(n, dtype=np.int64)
    width = max(8, len(str(ds.n_cells - 1)))
    names = [f"{ds.dataset_id}_{k:0{width}d}" for k in range(cells.offset, cells.offset + n)]
    donors = ds.donors
    obs = pd.DataFrame(
        {
            "dataset_id": pd.Categorical.from_codes(one, categories=[ds.dataset_id]),
            "donor_id": pd.Categorical.from_codes(
                cells.donors.astype(np.int64), categories=[d.donor_id for d in donors]
            ),
            "assay": pd.Categorical.from_codes(one, categories=[ds.assay]),
            "cell_type": pd.Categorical.from_codes(
                type_codes, categories=[plan.type_names[t] for t in present]
            ),
            "cell_type_ontology_term_id": pd.Categorical.from_codes(
                type_codes, categories=[plan.ontology_ids[t] for t in present]
            ),
            "tissue": pd.Categorical.from_codes(one, categories=[ds.tissue]),
            "tissue_general": pd.Categorical.from_codes(one, categories=[ds.tissue_general]),
            "disease": _categorical([d.disease for d in donors], cells.donors),
            "sex": _categorical([d.sex for d in donors], cells.donors),
            "development_stage": _categorical([d.development_stage for d in donors], cells.donors),
            "is_primary_data": np.asarray(cells.primary, dtype=bool),
            "truth_is_rare": plan.is_rare[cells.types].astype(bool),
        },
        index=pd.Index(names, dtype=object),
    )
    return obs


def _layout_matrices(counts: sp.csr_matrix, layout: str) -> tuple[sp.csr_matrix, dict[str, sp.csr_matrix]]:
    """(X, extra matrices) for a layout; extras are keyed ``layers/counts`` or ``raw/X``."""
    if layout == "counts":
        return counts, {}
    lognorm = to_lognorm(counts, "counts")
    if layout == "lognorm+counts":
        return lognorm, {"layers/counts": counts}
    if layout == "lognorm+raw":
        return lognorm, {"raw/X": counts}
    return lognorm, {}


def _to_anndata(plan: AtlasPlan, ds: DatasetPlan, cells: _Cells, layout: str) -> ad.AnnData:
    return _assemble(_make_obs(plan, ds, cells), plan.var, cells.counts, layout)


def _assemble(obs: pd.DataFrame, var: pd.DataFrame, counts: sp.csr_matrix, layout: str) -> ad.AnnData:
    X, extra = _layout_matrices(counts, layout)
    layers = {"counts": extra["layers/counts"]} if "layers/counts" in extra else None
    adata = ad.AnnData(X=X, obs=obs, var=var.copy(), layers=layers)
    if "raw/X" in extra:
        adata.raw = ad.AnnData(X=extra["raw/X"], obs=obs, var=var.copy())
    return adata


def _select_datasets(plan: AtlasPlan, datasets: Sequence[int] | None) -> list[DatasetPlan]:
    if datasets is None:
        return list(plan.datasets)
    bad = [i for i in datasets if not 0 <= int(i) < len(plan.datasets)]
    if bad:
        raise InputError(f"dataset indices {bad} out of range 0..{len(plan.datasets) - 1}")
    return [plan.datasets[int(i)] for i in datasets]


def _check_layout(layout: str) -> None:
    if layout not in H5AD_LAYOUTS:
        raise InputError(f"layout={layout!r} is not known: choose one of {H5AD_LAYOUTS}")


def generate_chunks(
    config: SyntheticAtlasConfig,
    *,
    datasets: Sequence[int] | None = None,
    layout: H5adLayout | None = None,
) -> Iterator[ad.AnnData]:
    """Yield the atlas as AnnData chunks of up to ``config.chunk_size`` cells, each from exactly one dataset.

    ``X`` (and ``layers["counts"]`` / ``.raw``) follow ``layout`` (default ``config.layout``); ``var`` is the
    gene table (index = Ensembl ids, or symbols with ``gene_ids="symbol"``). ``datasets`` restricts to some
    dataset indices (the cells drawn for a dataset do not depend on which others are generated).
    """
    layout = layout or config.layout
    _check_layout(layout)
    plan = plan_atlas(config)
    for ds in _select_datasets(plan, datasets):
        for cells in _iter_cells(plan, ds, config.chunk_size):
            yield _to_anndata(plan, ds, cells, layout)


def dataset_anndata(
    config: SyntheticAtlasConfig, index: int, *, layout: H5adLayout | None = None
) -> ad.AnnData:
    """One whole dataset in memory, for small tests and query examples (at scale, use the chunked API)."""
    layout = layout or config.layout
    _check_layout(layout)
    chunks = list(generate_chunks(config, datasets=[index], layout="counts"))
    obs = pd.concat([c.obs for c in chunks]) if len(chunks) > 1 else chunks[0].obs
    counts = sp.csr_matrix(sp.vstack([c.X for c in chunks], format="csr"))
    return _assemble(obs, chunks[0].var, counts, layout)


# ------------------------------------------------------------------------------------------------------------
# Streaming .h5ad writer
# ------------------------------------------------------------------------------------------------------------


class _CsrAppender:
    """A CSR matrix element (anndata encoding ``csr_matrix`` 0.1.0) filled row-block by row-block."""

    def __init__(self, parent: h5py.Group, key: str, shape: tuple[int, int], compression: str | None) -> None:
        group = parent.create_group(key)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array(shape, dtype=np.int64)
        kw: dict[str, Any] = {"maxshape": (None,), "chunks": (1 << 18,), "compression": compression}
        self._data = group.create_dataset("data", shape=(0,), dtype=np.float32, **kw)
        self._indices = group.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
        self._indptr = group.create_dataset("indptr", shape=(shape[0] + 1,), dtype=np.int64)
        self._indptr[0] = 0
        self._n_rows = shape[0]
        self.rows = 0
        self.nnz = 0

    def append(self, X: sp.csr_matrix) -> None:
        stop = self.nnz + X.nnz
        self._data.resize((stop,))
        self._indices.resize((stop,))
        self._data[self.nnz : stop] = X.data.astype(np.float32, copy=False)
        self._indices[self.nnz : stop] = X.indices.astype(np.int32, copy=False)
        self._indptr[self.rows + 1 : self.rows + 1 + X.shape[0]] = X.indptr[1:].astype(np.int64) + self.nnz
        self.rows += X.shape[0]
        self.nnz = stop

    def close(self) -> None:
        if self.rows != self._n_rows:
            raise RuntimeError(f"CSR writer got {self.rows} rows, expected {self._n_rows}")


class _ObsAppender:
    """A dataframe element written by anndata (empty, resizable) and then filled slice by slice."""

    def __init__(self, parent: h5py.Group, key: str, template: pd.DataFrame, n_rows: int) -> None:
        write_elem(parent, key, template, dataset_kwargs={"maxshape": (None,), "chunks": True})
        self._group = parent[key]
        self._columns = list(template.columns)
        self._categorical = {c for c in self._columns if isinstance(template[c].dtype, pd.CategoricalDtype)}
        for ds in self._datasets():
            ds.resize((n_rows,))
        self.rows = 0

    def _column(self, name: str) -> h5py.Dataset:
        return self._group[name]["codes"] if name in self._categorical else self._group[name]

    def _datasets(self) -> list[h5py.Dataset]:
        return [self._group[self._group.attrs["_index"]]] + [self._column(c) for c in self._columns]

    def append(self, df: pd.DataFrame) -> None:
        lo, hi = self.rows, self.rows + len(df)
        self._group[self._group.attrs["_index"]][lo:hi] = np.asarray(df.index, dtype=object)
        for name in self._columns:
            values = df[name].cat.codes.to_numpy() if name in self._categorical else df[name].to_numpy()
            target = self._column(name)
            target[lo:hi] = values.astype(target.dtype, copy=False)
        self.rows = hi


def _write_dataset_h5ad(
    plan: AtlasPlan, ds: DatasetPlan, path: Path, layout: str, compression: str | None
) -> None:
    shape = (ds.n_cells, plan.config.n_genes)
    template = _make_obs(plan, ds, _empty_cells())
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        obs = _ObsAppender(f, "obs", template, ds.n_cells)
        write_elem(f, "var", plan.var)
        for key in ("obsm", "obsp", "varm", "varp", "layers"):
            write_elem(f, key, {})
        write_elem(f, "uns", {"scatlas_synthetic": {"config": plan.config.to_json(), "layout": layout}})
        writers = {"X": _CsrAppender(f, "X", shape, compression)}
        if layout == "lognorm+counts":
            writers["layers/counts"] = _CsrAppender(f["layers"], "counts", shape, compression)
        if layout == "lognorm+raw":
            writers["raw/X"] = _raw_group(f, plan.var, shape, compression)
        for cells in _iter_cells(plan, ds, plan.config.chunk_size):
            obs.append(_make_obs(plan, ds, cells))
            X, extra = _layout_matrices(cells.counts, layout)
            writers["X"].append(X)
            for key, matrix in extra.items():
                writers[key].append(matrix)
        for writer in writers.values():
            writer.close()


def _raw_group(
    f: h5py.File, var: pd.DataFrame, shape: tuple[int, int], compression: str | None
) -> _CsrAppender:
    raw = f.create_group("raw")
    raw.attrs["encoding-type"] = "raw"
    raw.attrs["encoding-version"] = "0.1.0"
    write_elem(raw, "var", var)
    write_elem(raw, "varm", {})
    return _CsrAppender(raw, "X", shape, compression)


def _empty_cells() -> _Cells:
    empty = np.zeros(0, dtype=np.int32)
    return _Cells(0, empty, empty, np.zeros(0, dtype=bool), sp.csr_matrix((0, 0), dtype=np.float32))


def _prepare_out(out_dir: str | os.PathLike[str], names: Sequence[str], overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise InputError(
            f"{len(existing)} output file(s) already exist in {out} (e.g. {existing[0]}); "
            "choose another directory or pass overwrite=True"
        )
    return out


def write_h5ad_datasets(
    config: SyntheticAtlasConfig,
    out_dir: str | os.PathLike[str],
    *,
    layout: H5adLayout | None = None,
    datasets: Sequence[int] | None = None,
    overwrite: bool = False,
    compression: str | None = None,
) -> list[Path]:
    """Write one ``<dataset_id>.h5ad`` per dataset, streaming chunk by chunk (memory ~ chunk size).

    ``layout`` (default ``config.layout``) picks what X holds; see :data:`H5adLayout`. Each file is written to
    a temporary name and renamed when complete. ``compression`` is an h5py filter for X (e.g. ``"lzf"``,
    ``"gzip"``).
    """
    layout = layout or config.layout
    _check_layout(layout)
    if compression not in (None, "lzf", "gzip"):
        raise InputError(f"compression={compression!r}: use None, 'lzf' or 'gzip'")
    plan = plan_atlas(config)
    selected = _select_datasets(plan, datasets)
    out = _prepare_out(out_dir, [f"{ds.dataset_id}.h5ad" for ds in selected], overwrite)
    paths = []
    for ds in selected:
        path = out / f"{ds.dataset_id}.h5ad"
        tmp = out / f".{ds.dataset_id}.h5ad.partial"
        t0 = time.perf_counter()
        try:
            _write_dataset_h5ad(plan, ds, tmp, layout, compression)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info(
            "wrote %s: %d cells x %d genes (%s) in %.1fs",
            path,
            ds.n_cells,
            config.n_genes,
            layout,
            time.perf_counter() - t0,
        )
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------------
# Embedding level
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticEmbeddingConfig:
    """L2-normalised vectors from a clustered mixture, for index benchmarks.

    Centres are random unit vectors; a ``close_fraction`` of clusters sit at ``close_distance`` from another
    cluster's centre (overlapping neighbours). Noise of norm ~``spread`` per point: isotropic plus, for a
    share ``anisotropy`` of its variance, ``rank`` random directions per cluster. Cluster weights are
    log-normal with sigma ``size_sigma`` (uneven sizes).
    """

    n: int = 100_000
    d: int = 128
    n_clusters: int = 100
    spread: float = 0.5
    close_fraction: float = 0.3
    close_distance: float = 0.15
    anisotropy: float = 0.6
    rank: int = 8
    size_sigma: float = 1.0
    seed: int = 0
    chunk_size: int = 100_000

    def __post_init__(self) -> None:
        _validate_embedding_config(self)


def _validate_embedding_config(c: SyntheticEmbeddingConfig) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(f"invalid synthetic embedding config: {message}")

    check(c.n >= 1, f"n={c.n}: need at least one vector")
    check(c.d >= 2, f"d={c.d}: dimension must be >= 2")
    check(c.n_clusters >= 1, f"n_clusters={c.n_clusters}: need at least one cluster")
    check(
        c.n_clusters * c.d * min(c.rank, c.d) <= 2**28,
        f"n_clusters x d x rank = {c.n_clusters * c.d * min(c.rank, c.d)} is too large; "
        "lower rank or n_clusters",
    )
    check(c.spread >= 0 and np.isfinite(c.spread), f"spread={c.spread}: must be a finite number >= 0")
    check(0 <= c.close_fraction <= 1, f"close_fraction={c.close_fraction}: must be in [0, 1]")
    check(c.close_distance >= 0, f"close_distance={c.close_distance}: must be >= 0")
    check(0 <= c.anisotropy <= 1, f"anisotropy={c.anisotropy}: must be in [0, 1]")
    check(c.rank >= 1, f"rank={c.rank}: must be >= 1")
    check(c.size_sigma >= 0, f"size_sigma={c.size_sigma}: must be >= 0")
    check(c.seed >= 0, f"seed={c.seed}: must be a non-negative integer")
    check(c.chunk_size >= 1, f"chunk_size={c.chunk_size}: must be a positive number of vectors")


@dataclass(frozen=True)
class _Mixture:
    centres: np.ndarray  # (K, d) float32, unit norm
    weights: np.ndarray  # (K,) float64, sum 1
    directions: np.ndarray  # (K, d, r) float32, orthonormal columns
    scales: np.ndarray  # (K, r) float32


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


@lru_cache(maxsize=4)
def _mixture(c: SyntheticEmbeddingConfig) -> _Mixture:
    rng = _rng(c.seed, _S_MIXTURE)
    k, d, r = c.n_clusters, c.d, min(c.rank, c.d)
    centres = _unit_rows(rng.standard_normal((k, d)))
    n_close = int(round(c.close_fraction * (k - 1)))
    for j in range(k - n_close, k):
        parent = int(rng.integers(0, j)) if j > 0 else 0
        step = _unit_rows(rng.standard_normal((1, d)))[0]
        centres[j] = _unit_rows((centres[parent] + c.close_distance * step)[None, :])[0]
    weights = np.exp(rng.normal(0.0, c.size_sigma, k))
    directions = np.linalg.qr(rng.standard_normal((k, d, r)))[0].astype(np.float32)
    scales = rng.uniform(0.5, 1.5, (k, r))
    scales /= np.sqrt((scales**2).mean(axis=1, keepdims=True))
    return _Mixture(
        centres.astype(np.float32), weights / weights.sum(), directions, scales.astype(np.float32)
    )


def _sample_mixture(
    c: SyntheticEmbeddingConfig, rng: np.random.Generator, m: int
) -> tuple[np.ndarray, np.ndarray]:
    mix = _mixture(c)
    r = mix.directions.shape[2]
    labels = rng.choice(c.n_clusters, size=m, p=mix.weights).astype(np.int32)
    x = rng.standard_normal((m, c.d), dtype=np.float32)
    x *= np.float32(c.spread * np.sqrt((1.0 - c.anisotropy) / c.d))
    x += mix.centres[labels]
    z = rng.standard_normal((m, r), dtype=np.float32) * np.float32(c.spread * np.sqrt(c.anisotropy / r))
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for rows in np.split(order, bounds):
        if len(rows):
            k = labels[rows[0]]
            x[rows] += (z[rows] * mix.scales[k]) @ mix.directions[k].T
    return _unit_rows(x).astype(np.float32, copy=False), labels


def _embedding_block_rows(d: int) -> int:
    return int(max(1024, 2**22 // d))


def _embedding_block(c: SyntheticEmbeddingConfig, block: int) -> tuple[np.ndarray, np.ndarray]:
    size = _embedding_block_rows(c.d)
    m = min((block + 1) * size, c.n) - block * size
    return _sample_mixture(c, _rng(c.seed, _S_EMB_BLOCK, block), m)


def _embedding_range(
    c: SyntheticEmbeddingConfig, start: int, stop: int, cache: dict[int, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    size = _embedding_block_rows(c.d)
    vecs, labs = [], []
    for b in range(start // size, (stop - 1) // size + 1):
        if b not in cache:
            cache.clear()
            cache[b] = _embedding_block(c, b)
        lo, hi = max(start, b * size) - b * size, min(stop, (b + 1) * size) - b * size
        vecs.append(cache[b][0][lo:hi])
        labs.append(cache[b][1][lo:hi])
    return np.concatenate(vecs), np.concatenate(labs)


def vectors_for_range(
    config: SyntheticEmbeddingConfig, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors ``[start, stop)`` (float32, L2-normalised) and cluster labels (int32), made on their own."""
    if not 0 <= start <= stop <= config.n:
        raise InputError(f"range [{start}, {stop}) is not within 0..{config.n}")
    if start == stop:
        return np.zeros((0, config.d), dtype=np.float32), np.zeros(0, dtype=np.int32)
    return _embedding_range(config, start, stop, {})


def generate_embedding_chunks(
    config: SyntheticEmbeddingConfig,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(ids int64, vectors float32 (m, d), labels int32)`` chunks of up to ``config.chunk_size`` rows.

    ids are row numbers ``0..n-1``; the vectors do not depend on the chunk size.
    """
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, config.n, config.chunk_size):
        stop = min(start + config.chunk_size, config.n)
        vectors, labels = _embedding_range(config, start, stop, cache)
        yield np.arange(start, stop, dtype=np.int64), vectors, labels


def sample_queries(config: SyntheticEmbeddingConfig, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh query vectors from the same mixture (not copies of base vectors) and their labels."""
    if n < 0 or seed < 0:
        raise InputError(f"sample_queries: n={n} and seed={seed} must be non-negative")
    return _sample_mixture(config, _rng(config.seed, _S_QUERY, seed), n)


def exact_knn(
    base_chunks: Callable[[], Iterable[tuple[np.ndarray, ...]]] | Iterable[tuple[np.ndarray, ...]],
    queries: np.ndarray,
    k: int,
    *,
    max_block: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries`` over streamed ``(ids, vectors, ...)`` chunks.

    ``base_chunks`` is an iterable of chunks or a function returning one (e.g.
    ``lambda: generate_embedding_chunks(cfg)``). Returns ``(ids (nq, k) int64, scores (nq, k) float32)``, best
    first; ``-1`` / ``-inf`` pad rows when the base has fewer than ``k`` vectors. ``max_block`` bounds the
    size of one query x chunk score block.
    """
    if k < 1:
        raise InputError(f"k={k}: must be >= 1")
    Q = np.ascontiguousarray(queries, dtype=np.float32)
    if Q.ndim != 2:
        raise InputError(f"queries must be a 2-d array (n, d), got shape {Q.shape}")
    best_s = np.full((len(Q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(Q), k), -1, dtype=np.int64)
    chunks = base_chunks() if callable(base_chunks) else base_chunks
    for chunk in chunks:
        ids, vectors = np.asarray(chunk[0], dtype=np.int64), np.asarray(chunk[1], dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != Q.shape[1] or len(ids) != len(vectors):
            raise InputError(
                f"base chunk of shape {vectors.shape} with {len(ids)} ids does not match queries "
                f"of dimension {Q.shape[1]}"
            )
        step = max(1, max_block // max(1, len(vectors)))
        for q0 in range(0, len(Q), step):
            rows = slice(q0, q0 + step)
            best_s[rows], best_i[rows] = _merge_topk(best_s[rows], best_i[rows], Q[rows] @ vectors.T, ids, k)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def _merge_topk(
    best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, cand = np.take_along_axis(scores, part, axis=1), ids[part]
    else:
        cand = np.broadcast_to(ids, scores.shape)
    all_s = np.concatenate([best_s, scores], axis=1)
    all_i = np.concatenate([best_i, cand], axis=1)
    top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(all_s, top, axis=1), np.take_along_axis(all_i, top, axis=1)


def write_embedding_npy(
    config: SyntheticEmbeddingConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> list[Path]:
    """Write ``ids.npy`` (int64), ``vectors.npy`` (float32, n x d) and ``labels.npy`` (int32), streaming."""
    names = {
        "ids": ("ids.npy", np.int64, (config.n,)),
        "vectors": ("vectors.npy", np.float32, (config.n, config.d)),
        "labels": ("labels.npy", np.int32, (config.n,)),
    }
    out = _prepare_out(out_dir, [v[0] for v in names.values()], overwrite)
    tmp = {key: out / f".{fname}.partial" for key, (fname, _, _) in names.items()}
    try:
        arrays = {
            key: np.lib.format.open_memmap(tmp[key], mode="w+", dtype=dt, shape=shape)
            for key, (_, dt, shape) in names.items()
        }
        for ids, vectors, labels in generate_embedding_chunks(config):
            lo, hi = int(ids[0]), int(ids[-1]) + 1
            arrays["ids"][lo:hi], arrays["vectors"][lo:hi], arrays["labels"][lo:hi] = ids, vectors, labels
        for array in arrays.values():
            array.flush()
        del arrays
        paths = []
        for key, (fname, _, _) in names.items():
            os.replace(tmp[key], out / fname)
            paths.append(out / fname)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    logger.info("wrote %d synthetic vectors (d=%d) to %s", config.n, config.d, out)
    return paths


def synthesize(
    config: SyntheticAtlasConfig | SyntheticEmbeddingConfig,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "h5ad",
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthetic atlas (``fmt="h5ad"``: one file per dataset) or embedding set (``fmt="npy"``)."""
    if isinstance(config, SyntheticAtlasConfig):
        if fmt != "h5ad":
            raise InputError(f"fmt={fmt!r}: a counts-level atlas is written as 'h5ad'")
        return write_h5ad_datasets(config, out_dir, overwrite=overwrite)
    if isinstance(config, SyntheticEmbeddingConfig):
        if fmt != "npy":
            raise InputError(f"fmt={fmt!r}: embedding-level data is written as 'npy' (ids, vectors, labels)")
        return write_embedding_npy(config, out_dir, overwrite=overwrite)
    raise InputError(
        f"config must be a SyntheticAtlasConfig or SyntheticEmbeddingConfig, not {type(config).__name__}"
    )
