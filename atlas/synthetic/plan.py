"""The plan of a synthetic atlas: everything small decided before any cell is drawn.

Genes and their baseline, per-type log-mean profiles (shared baseline + lineage program shared by related types +
type-specific markers), disease programs, and per dataset its size, tissue, assay, donors and expected
composition. Deterministic from the config's seed; programs are seeded by name, so adding a type does not
change the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.ontology import cell_ontology
from scatlas.atlas.synthetic._common import (
    S_DATASETS,
    S_DISEASE,
    S_DONORS,
    S_DS_EFFECT,
    S_GENES,
    S_LINEAGE,
    S_PROGRAM,
    S_RARE,
    name_key,
    stream,
)
from scatlas.atlas.synthetic.config import MARKER_POOL_QUANTILE, NORMAL, RareType, SyntheticAtlasConfig

_BASELINE_SIGMA = 1.3  # spread of the shared log-mean profile across genes
_LOW_GENE_FRACTION, _LOW_GENE_SHIFT = 0.6, 3.5  # most genes are barely expressed at baseline (sets sparsity)
_DISPERSION_SIGMA = 0.5  # spread of per-gene NB dispersion around its median
_DISEASE_PROGRAM_GENES = 30
_KNOWN_TISSUE_GENERAL: dict[str, str] = {"lung parenchyma": "lung", "renal cortex": "kidney"}


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


def _ontology_ids(names: Sequence[str]) -> list[str | None]:
    """The Cell Ontology id of each type name (exact CL name, synonym or normalised name, see
    :meth:`atlas.ontology.CellOntology.lookup`); None for a name that is no CL term (e.g. ``norn cell``)."""
    onto = cell_ontology()
    return [onto.lookup(name)[0] for name in names]


def _counts_block_cells(n_genes: int) -> int:
    """Fixed block size of the counts generator (bounds the dense working set to ~2M values)."""
    return int(np.clip(2**21 // n_genes, 64, 2048))


@dataclass(frozen=True)
class DonorPlan:
    """One donor of a dataset: its id, metadata and relative share of the dataset's cells (``weight``)."""

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
        """Indices (into ``AtlasPlan.type_names``) of the types this dataset has."""
        return np.flatnonzero(self.type_probs > 0)


@dataclass(frozen=True)
class AtlasPlan:
    """The generative model of an atlas, small (types x genes, datasets x donors); cells are drawn from it."""

    config: SyntheticAtlasConfig
    type_names: tuple[str, ...]
    is_rare: np.ndarray
    ontology_ids: tuple[str | None, ...]  # CL id per type name; None where the name is no CL term
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
        """Cells per random block (each block has its own seed)."""
        return _counts_block_cells(self.config.n_genes)

    def dataset_effect(self, index: int) -> np.ndarray:
        """Per-gene log batch effect of dataset ``index``."""
        c = self.config
        return stream(c.seed, S_DS_EFFECT, index).normal(0.0, c.batch_sigma, c.n_genes)

    def donor_effects(self, index: int) -> np.ndarray:
        """(n_donors, n_genes) log effects of each donor of dataset ``index``: dataset + donor + disease."""
        c = self.config
        ds = self.datasets[index]
        eff = stream(c.seed, S_DONORS, index, 1).normal(0.0, c.donor_sigma, (len(ds.donors), c.n_genes))
        eff += self.dataset_effect(index)[None, :]
        for j, donor in enumerate(ds.donors):
            if donor.disease in self.disease_programs:
                cols, lfc = self.disease_programs[donor.disease]
                eff[j, cols] += lfc
        return eff


def plan_atlas(config: SyntheticAtlasConfig) -> AtlasPlan:
    """Decide genes, programs, datasets and donors of an atlas (deterministic from the config's seed)."""
    c = config
    rng = stream(c.seed, S_GENES)
    baseline = rng.normal(0.0, _BASELINE_SIGMA, c.n_genes)
    baseline[rng.random(c.n_genes) < _LOW_GENE_FRACTION] -= _LOW_GENE_SHIFT
    dispersion = c.dispersion * np.exp(rng.normal(0.0, _DISPERSION_SIGMA, c.n_genes))
    pool = np.flatnonzero(baseline <= np.quantile(baseline, MARKER_POOL_QUANTILE))
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
        cols, up = _program(stream(c.seed, S_LINEAGE, name_key(lineage)), pool, c.n_lineage_markers, lfc)
        lineage_markers[lineage] = cols
        for t, own in enumerate(lineages):
            if own == lineage:
                profiles[t, cols] += up
    markers: dict[str, np.ndarray] = {}
    n_common = len(c.cell_types)
    for t, name in enumerate(type_names):
        n = c.n_markers if t < n_common else c.n_rare_markers
        cols, up = _program(stream(c.seed, S_PROGRAM, name_key(name)), pool, n, lfc)
        markers[name] = cols
        profiles[t, cols] += up
    return profiles, markers, lineage_markers


def _disease_programs(c: SyntheticAtlasConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if c.disease_effect <= 0:
        return out
    all_genes = np.arange(c.n_genes)
    for disease in c.diseases:
        if disease.lower() == NORMAL:
            continue
        rng = stream(c.seed, S_DISEASE, name_key(disease))
        scale = (0.5 * c.disease_effect, 1.5 * c.disease_effect)
        out[disease] = _program(rng, all_genes, min(_DISEASE_PROGRAM_GENES, c.n_genes // 10), scale)
    return out


def _pick_rare_datasets(c: SyntheticAtlasConfig, r: RareType) -> tuple[int, ...]:
    if r.datasets is not None:
        return tuple(sorted(set(r.datasets)))
    n_present = max(1, c.n_datasets // 2)
    picked = stream(c.seed, S_RARE, name_key(r.name)).choice(c.n_datasets, size=n_present, replace=False)
    return tuple(sorted(int(i) for i in picked))


def _plan_datasets(
    c: SyntheticAtlasConfig, type_names: Sequence[str], rare_datasets: Mapping[str, tuple[int, ...]]
) -> tuple[DatasetPlan, ...]:
    rng = stream(c.seed, S_DATASETS)
    sizes = _split_counts(c.n_cells, np.exp(rng.normal(0.0, c.dataset_size_sigma, c.n_datasets)))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    general = c.tissue_general or tuple(_KNOWN_TISSUE_GENERAL.get(t, t) for t in c.tissues)
    out = []
    for i in range(c.n_datasets):
        ds_rng = stream(c.seed, S_DATASETS, i)
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


def select_datasets(plan: AtlasPlan, datasets: Sequence[int] | None) -> list[DatasetPlan]:
    """The plans of dataset indices ``datasets`` (None: all), in the order given."""
    if datasets is None:
        return list(plan.datasets)
    bad = [i for i in datasets if not 0 <= int(i) < len(plan.datasets)]
    if bad:
        raise InputError(f"dataset indices {bad} out of range 0..{len(plan.datasets) - 1}")
    return [plan.datasets[int(i)] for i in datasets]
