"""Configuration of a synthetic counts-level atlas (:class:`SyntheticAtlasConfig`) and its validation."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NoReturn, get_args

import numpy as np

from scatlas.atlas.errors import InputError

H5adLayout = Literal["counts", "lognorm+counts", "lognorm", "lognorm+raw"]
"""``counts``: X = raw counts. ``lognorm+counts``: X = log1p(CP10k), ``layers["counts"]`` = counts.
``lognorm``: X = log1p(CP10k) only. ``lognorm+raw``: X = log1p(CP10k), ``.raw.X`` = counts."""

GeneIdStyle = Literal["ensembl", "symbol"]

H5AD_LAYOUTS: tuple[str, ...] = get_args(H5adLayout)
GENE_ID_STYLES: tuple[str, ...] = get_args(GeneIdStyle)

MAX_GENES = 900_000
"""Ensembl-like ids are a bijection of the gene index onto 6 digits; more genes than this would collide."""

MARKER_POOL_QUANTILE = 0.7
"""Markers are drawn from genes below this baseline quantile (specific: low elsewhere)."""
NORMAL = "normal"
"""The disease value of healthy donors (no disease program)."""


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


@dataclass(frozen=True)
class SyntheticAtlasConfig:
    """A synthetic counts-level atlas: sizes, cell types, metadata and the effect sizes of its model.

    Sizes: ``n_cells`` over ``n_datasets`` (log-normal sizes, sigma ``dataset_size_sigma``), ``n_donors`` per
    dataset, ``n_genes``. Types: ``cell_types`` (common, per-dataset composition noise ``composition_sigma``),
    ``rare_types`` (fractions per dataset where present), ``absent_types`` (type name -> dataset indices it is
    *not* generated in, to test unknown populations). Metadata: tissues round-robin per dataset
    (``tissue_general``: one coarse tissue each, None: a few known mappings, else the tissue itself), assays
    per dataset, diseases / sex / age per donor, ``non_primary_fraction`` of cells flagged non-primary.
    Model (natural-log scale of expected counts): ``batch_sigma`` per dataset and gene, ``donor_sigma`` per
    donor and gene, ``disease_effect``, ``median_umis`` / ``depth_sigma`` / ``library_sigma`` for library
    sizes, NB ``dispersion``, marker programs of ``n_markers`` / ``n_lineage_markers`` / ``n_rare_markers``
    genes raised by ``marker_lfc`` (low, high); with few genes, counts left at their defaults shrink to what fits
    (at most :func:`max_markers` per program, e.g. 17 with 50 genes). Output: ``gene_ids`` style, default h5ad ``layout``,
    ``dataset_prefix`` of the dataset ids; ``chunk_size`` cells per chunk (does not change the cells).
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
    diseases: tuple[str, ...] = (NORMAL, "COVID-19", "influenza")
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
        _fit_default_markers(self)
        _validate_atlas_config(self)

    def to_json(self) -> str:
        """The config as sorted JSON (recorded in every written .h5ad)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)


MARKER_FIELDS = ("n_markers", "n_lineage_markers", "n_rare_markers")


def max_markers(n_genes: int) -> int:
    """The most marker genes one program may have with ``n_genes`` genes: half the marker pool."""
    return int(n_genes * MARKER_POOL_QUANTILE) // 2


def min_genes(n_markers: int) -> int:
    """The fewest genes with which a program of ``n_markers`` marker genes fits (:func:`max_markers`)."""
    n = max(1, int(np.ceil(2 * n_markers / MARKER_POOL_QUANTILE)) - 2)
    while max_markers(n) < n_markers:
        n += 1
    return n


def _fit_default_markers(c: SyntheticAtlasConfig) -> None:
    """With few genes, shrink the marker counts left at their defaults to what fits (:func:`max_markers`), so that
    every allowed ``n_genes`` works; a count other than its default is kept (and refused when it does not fit)."""
    if not isinstance(c.n_genes, (int, np.integer)) or c.n_genes < 50:
        return  # left to the validation's message
    cap = max_markers(int(c.n_genes))
    for name in MARKER_FIELDS:
        default = getattr(SyntheticAtlasConfig, name)  # the field's default (a class attribute)
        if getattr(c, name) == default and default > cap:
            object.__setattr__(c, name, max(1, cap))


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
    pool = int(c.n_genes * MARKER_POOL_QUANTILE)
    _check(min(c.n_markers, c.n_lineage_markers, c.n_rare_markers) >= 1, "marker counts must be >= 1")
    _check(
        n_markers <= pool // 2,
        f"{n_markers} markers per program is too many for n_genes={c.n_genes}: "
        f"use at most {pool // 2} markers, or at least {min_genes(n_markers)} genes",
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

