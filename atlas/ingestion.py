"""``scatlas ingest``: add atlas dumps (.h5ad files, Census-layout SOMA experiments) to an atlas store.

Inputs are opened and planned first (names, mappings, dataset ids), then every row of every input is validated
as it streams into the store's staging (reserved ids no reader sees), and all datasets of one command are
published together or not at all: a bad value in the last file, a full disk or an interruption leaves the store
as it was.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm.auto import tqdm

from scatlas.atlas.digest import XDigest, canonical
from scatlas.atlas.errors import DatasetExistsError, InputError, StoreError
from scatlas.atlas.genes import GeneVocabulary, strip_version
from scatlas.atlas.ingest_args import (
    check_obs_map,
    check_obs_set,
    check_species,
    checked_ontology_map,
    normalised,
)
from scatlas.atlas.ingest_pipeline import GLOBAL_ORDER_WRITE, GlobalOrder, read_ahead
from scatlas.atlas.ontology_map import OntologyFill, term_column
from scatlas.atlas.outputs import ATLAS_STORE, check_output_dir
from scatlas.atlas.schema import STANDARD_OBS_COLUMNS
from scatlas.atlas.sources.base import DatasetSource
from scatlas.atlas.sources.h5ad import open_h5ad
from scatlas.atlas.sources.soma import is_soma_experiment, open_soma_experiment
from scatlas.atlas.sql import duckdb_interrupts, quote_ident, transaction
from scatlas.atlas.store import (
    CELLS_DB,
    JOURNAL_FILE,
    MEASURED_TABLE,
    MEASUREMENT,
    X_LAYER,
    AtlasStore,
    DatasetRecord,
)
from scatlas.atlas.store_writer import StoreWriter
from scatlas.atlas.validate import check_embedding, check_name, escaped, escaped_list

logger = logging.getLogger(__name__)

IngestMode = Literal["write", "append"]
"""``write``: create a new store (refused if one exists). ``append``: add datasets to a store (created if absent)."""

DEFAULT_CHUNK_SIZE = 10_000

DEFAULT_READ_AHEAD = 1
"""Chunks read and converted ahead of the writes, in a thread (see :func:`atlas.ingest_pipeline.read_ahead`)."""

_SOMA_NAME = re.compile(r"^(?!\.{1,2}$)[^/\\]+$")
"""obsm keys become TileDB-SOMA array names."""


@dataclass
class GenePlan:
    """How one dataset's genes land in the atlas vocabulary."""

    columns: np.ndarray  # per source column: var joinid, or -1 (duplicate, dropped)
    new_genes: pd.DataFrame  # var_joinid, gene_key, feature_id, feature_name
    learned_ensembl: list[tuple[int, str]]  # (var_joinid, ensembl id) learned for symbol-only atlas genes
    report: dict[str, int]


@dataclass
class DatasetPlan:
    """One input dataset as planned before any row is stored: its source, id, kept rows and obs columns."""

    source: DatasetSource
    dataset_id: str
    source_label: str
    source_format: str
    rows: np.ndarray  # source rows kept (primary cells)
    obs_map: dict[str, str]
    obs_sample: pd.DataFrame  # one standardised row: the columns and their types
    extra_columns: list[str]
    renamed_columns: dict[str, str]  # source obs column -> stored name, where it had to change
    obsm_dims: dict[str, int]
    n_skipped_non_primary: int
    ontology_fill: OntologyFill | None = None  # --ontology-map: fills empty CL terms of a label column
    obs_set: dict[str, str] = field(default_factory=dict)  # --obs-set: one value for every cell

    def standard_obs(self, rows: np.ndarray) -> pd.DataFrame:
        """Standardised obs (schema columns + extras) of the given source rows, with CL terms filled from the
        ontology map when there is one."""
        frame, _, _ = _standardise_obs(
            self.source.obs.iloc[rows], self.dataset_id, self.obs_map, self.source_label, self.source_format == "soma",
            self.obs_set,
        )
        return frame if self.ontology_fill is None else self.ontology_fill.apply(frame)

    def attach_ontology_fill(self, fill: OntologyFill) -> None:
        """Fill ``fill``'s term column while writing; a term column the dataset lacks (for a label key other than
        ``cell_type``, whose term column is in the schema) is added as an extra column."""
        if fill.label_key not in self.obs_sample.columns:
            raise InputError(
                f"{self.source_label} (dataset {self.dataset_id!r}): --ontology-label-key {escaped(fill.label_key, 60)}: "
                f"no such obs column; its label columns: {_label_columns(self.obs_sample)}. Give one of them (the "
                "column whose values are the map's labels), or rename the column with --obs-map"
            )
        self.ontology_fill = fill
        col = fill.term_key
        if col not in self.obs_sample.columns:
            self.obs_sample = self.obs_sample.assign(**{col: np.array([None], dtype=object)})
            self.extra_columns = [*self.extra_columns, col]


def _label_columns(sample: pd.DataFrame, limit: int = 20) -> str:
    """The text columns of a standardised obs that could hold labels, named (escaped) for a message: not the cell
    and dataset ids, not term columns; never their values."""
    skip = {"obs_id", "dataset_id"}
    names = [str(c) for c in sample.columns
             if c not in skip and not str(c).endswith(term_column("")) and sample[c].dtype == object]
    if not names:
        return "none"
    shown = ", ".join(escaped(c, 40) for c in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class DatasetIngestReport:
    """What ingesting one dataset did: its id range, what was read (X kind and source), genes, obsm, timing."""

    dataset_id: str
    source: str
    n_cells: int
    first_cell_id: int
    n_skipped_non_primary: int
    x_kind: str
    x_source: str
    genes: dict[str, int]
    obsm: dict[str, int]
    seconds: float
    renamed_columns: dict[str, str] = field(default_factory=dict)
    ontology: dict[str, Any] | None = None  # what --ontology-map did (see OntologyFill.report)
    obs_set: dict[str, str] = field(default_factory=dict)  # --obs-set: the columns set to one value for every cell

    @property
    def cells_per_second(self) -> float:
        """Ingest throughput (NaN when no time was measured)."""
        return self.n_cells / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class IngestReport:
    """What one ingest command did: the store, each dataset's report and the cells in the store afterwards."""

    atlas: str
    datasets: list[DatasetIngestReport] = field(default_factory=list)
    n_cells_in_store: int = 0

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"atlas": self.atlas, "n_cells_in_store": self.n_cells_in_store, "datasets": [asdict(d) for d in self.datasets]}


# -- planning ---------------------------------------------------------------------------------------------------------


def _as_str_column(values: pd.Series) -> pd.Series:
    """The values as strings, missing ones None (a categorical column: its categories converted once)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        names = np.array([*(str(c) for c in values.cat.categories), None], dtype=object)
        return pd.Series(names[values.cat.codes.to_numpy()], index=values.index)  # code -1 (missing) -> None
    out = values.astype(object).where(values.notna(), None)
    return out.map(lambda v: None if v is None else str(v))


def _to_bool(values: pd.Series, what: str) -> np.ndarray:
    if values.dtype == bool:
        return values.to_numpy()
    mapping = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    lowered = values.astype(str).str.strip().str.lower()
    bad = ~lowered.isin(list(mapping))
    if bad.any():
        raise InputError(f"{what}: is_primary_data has values that are not booleans, e.g. {values[bad].iloc[0]!r}")
    return lowered.map(mapping).to_numpy(dtype=bool)


NOT_KEPT_TARGETS = ("dataset_id", "is_primary_data")
"""--obs-map targets whose source column is not kept as an extra: the dataset id is set by the ingest, and
is_primary_data decided which cells were stored (re-mapping it later cannot bring skipped cells back)."""


def kept_originals(columns: Sequence[object], obs_map: Mapping[str, str]) -> list[str]:
    """The --obs-map source columns kept under their own names as well (for a later re-mapping, e.g. ``scatlas
    relabel``): all but standard column names (``dataset_id`` included) and sources mapped onto
    :data:`NOT_KEPT_TARGETS` or onto themselves."""
    present = {str(c) for c in columns}
    return [
        src for src, dst in obs_map.items()
        if src in present and src != dst and src not in STANDARD_OBS_COLUMNS and dst not in NOT_KEPT_TARGETS
    ]


def _standardise_obs(
    obs: pd.DataFrame, dataset_id: str, obs_map: Mapping[str, str], what: str, from_soma: bool,
    obs_set: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """The schema's columns plus every other obs column (``extras``), with names checked; an extra whose name
    clashes with another after normalisation (case, surrounding blanks) is stored as ``NAME_orig`` (``renamed``).

    The source of each --obs-map rename is kept as an extra too (:func:`kept_originals`); --obs-set columns hold
    one value for every cell (a standard column, or an extra VARCHAR column) and are refused when the data has a
    column of that name."""
    missing = [s for s in obs_map if s not in obs.columns]
    if missing:
        raise InputError(
            f"{what}: --obs-map names column(s) {escaped_list(missing, 10)} that are not in obs; obs has: "
            f"{escaped_list(obs.columns)}"
        )
    frame = obs.copy()
    kept = kept_originals(list(obs.columns), obs_map)
    if ("dataset_id" in frame.columns and not from_soma and "dataset_id" not in obs_map.values()
            and "dataset_id" not in obs_map):
        kept_id = "source_dataset_id"
        while kept_id in frame.columns:
            kept_id += "_orig"
        frame = frame.rename(columns={"dataset_id": kept_id})
    frame = frame.rename(columns=dict(obs_map))
    if frame.columns.duplicated().any():
        dup = list(frame.columns[frame.columns.duplicated()])
        raise InputError(f"{what}: --obs-map produces duplicate column names {[escaped(d) for d in dup]}")
    out = pd.DataFrame(index=pd.RangeIndex(len(frame)))
    out["obs_id"] = np.asarray(frame.index.astype(str), dtype=object)
    out["dataset_id"] = dataset_id
    for col in STANDARD_OBS_COLUMNS:
        if col in ("obs_id", "dataset_id"):
            continue
        if col == "is_primary_data":
            out[col] = _to_bool(frame[col], what) if col in frame.columns else True
        elif col in frame.columns:
            out[col] = _as_str_column(frame[col]).to_numpy()
        else:
            out[col] = None
    taken = {normalised(c) for c in out.columns} | {"soma_joinid"}
    extras: list[str] = []
    renamed: dict[str, str] = {}
    # obs_id is the cell name: a column of that name is kept (as obs_id_orig)
    candidates = [(col, frame[col]) for col in frame.columns if col not in STANDARD_OBS_COLUMNS or col == "obs_id"]
    candidates += [(src, obs[src]) for src in kept]
    for col, values in candidates:
        name = check_name(col, f"{what}: obs column")
        while normalised(name) in taken:
            name = f"{name}_orig"
        if name != str(col):
            renamed[str(col)] = name
        taken.add(normalised(name))
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            out[name] = _as_str_column(values).to_numpy()
        elif pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            out[name] = values.to_numpy()
        else:
            out[name] = _as_str_column(values).to_numpy()
        extras.append(name)
    if obs_set:
        in_data = {normalised(str(c)): str(c) for c in [*frame.columns, *kept, *extras]}
        for col, value in obs_set.items():
            clash = in_data.get(normalised(col))
            if clash is not None:
                raise InputError(
                    f"{what}: --obs-set {escaped(col)}: the data has a column {escaped(clash)} already; rename it "
                    f"with --obs-map (e.g. --obs-map {escaped(clash)}=NEW_NAME) or drop it from the file, or drop "
                    "this --obs-set"
                )
            if col in STANDARD_OBS_COLUMNS:
                out[col] = value
            else:
                out[col] = np.full(len(out), value, dtype=object)
                extras.append(col)
    return out, extras, renamed


def _plan_dataset(
    source: DatasetSource, dataset_id: str, label: str, fmt: str, obs_map: Mapping[str, str], keep_non_primary: bool,
    obs_set: Mapping[str, str] | None = None,
) -> DatasetPlan:
    what = f"{label} (dataset {dataset_id!r})"
    if source.n_obs == 0:
        raise InputError(f"{what}: the dataset has no cells")
    names = pd.Index(source.obs.index.astype(str))
    if names.has_duplicates:
        repeats = np.flatnonzero(names.duplicated())
        raise InputError(f"{what}: {len(repeats)} cell names in obs repeat an earlier one (the first at row "
                         f"{int(repeats[0])}); make them unique (adata.obs_names_make_unique())")
    # Standardise one row to validate the mapping and learn the extra columns; the rest is done chunk by chunk at
    # write time, so categorical obs columns are never expanded to strings for the whole dataset.
    check_name(dataset_id, f"{label}: dataset id")
    for target in obs_map.values():
        check_name(target, f"{what}: --obs-map target")
    sample, extras, renamed = _standardise_obs(source.obs.iloc[:1], dataset_id, obs_map, what, fmt == "soma", obs_set)
    for old, new in renamed.items():
        logger.warning("%s: obs column %s clashes with another column name; stored as %s", what, escaped(old), escaped(new))
    primary = _primary_flags(source.obs, obs_map, what)
    keep = np.ones(len(primary), dtype=bool) if keep_non_primary else primary
    n_skipped = int((~keep).sum())
    if not keep.any():
        raise InputError(f"{what}: all {len(primary)} cells have is_primary_data == False; use --keep-non-primary to keep them")
    rows = np.flatnonzero(keep).astype(np.int64)
    obsm_dims: dict[str, int] = {}
    for key in source.obsm_keys():
        check_name(key, f"{what}: obsm key")
        if not _SOMA_NAME.match(key):
            raise InputError(f"{what}: obsm key {escaped(key)} is not usable as an array name (no '/' or "
                             "'\\', not '.' or '..'); rename it")
        try:
            first, last = source.read_obsm(key, rows[:1]), source.read_obsm(key, np.array([source.n_obs - 1]))
        except (IndexError, ValueError) as exc:
            raise InputError(f"{what}: obsm[{escaped(key)}] does not have one row per cell; the file is damaged") from exc
        if np.issubdtype(first.dtype, np.number):
            if first.ndim != 2 or first.shape[1] == 0 or last.shape[0] != 1:
                raise InputError(f"{what}: obsm[{escaped(key)}] has no columns or the wrong shape; drop or fix it")
            obsm_dims[key] = int(first.shape[1])
    return DatasetPlan(
        source=source, dataset_id=dataset_id, source_label=label, source_format=fmt, rows=rows,
        obs_map=dict(obs_map), obs_sample=sample, extra_columns=extras, renamed_columns=renamed, obsm_dims=obsm_dims,
        n_skipped_non_primary=n_skipped, obs_set=dict(obs_set or {}),
    )


def _primary_flags(obs: pd.DataFrame, obs_map: Mapping[str, str], what: str) -> np.ndarray:
    """``is_primary_data`` of every cell after the --obs-map renames (True where the column is absent)."""
    mapped = [src for src, dst in obs_map.items() if dst == "is_primary_data"]
    if mapped:
        return _to_bool(obs[mapped[0]], what)
    if "is_primary_data" in obs.columns and "is_primary_data" not in obs_map:
        return _to_bool(obs["is_primary_data"], what)
    return np.ones(len(obs), dtype=bool)


def plan_genes(source_genes: GeneVocabulary, atlas_genes: GeneVocabulary, var_start: int) -> GenePlan:
    """Map a dataset's genes onto the atlas vocabulary, adding new genes and learning symbol -> Ensembl links.

    A gene with an Ensembl id matches only that id (or a symbol-only atlas gene of the same symbol, whose Ensembl id
    is then learned); a symbol-only gene matches a known symbol (through a learned mapping) or becomes a new gene.
    """
    by_id = {fid: j for j, fid in enumerate(atlas_genes.feature_id) if fid}
    by_symbol_only = {n: j for j, (fid, n) in enumerate(zip(atlas_genes.feature_id, atlas_genes.feature_name, strict=True)) if n and not fid}
    by_symbol: dict[str, int] = {}
    for j, n in enumerate(atlas_genes.feature_name):
        if n and n not in by_symbol:
            by_symbol[n] = j
    columns = np.full(len(source_genes), -1, dtype=np.int64)
    new_rows: list[tuple[int, str, str, str]] = []
    learned: list[tuple[int, str]] = []
    seen: set[int] = set()
    next_id = var_start
    stats = dict.fromkeys(("n_genes", "n_existing", "n_new", "n_with_ensembl", "n_symbol_only", "n_symbol_mapped_to_ensembl", "n_duplicates_dropped", "n_unnamed_dropped"), 0)
    stats["n_genes"] = len(source_genes)
    for i, (fid, name) in enumerate(zip(source_genes.feature_id, source_genes.feature_name, strict=True)):
        fid = strip_version(fid) if fid else ""
        if not fid and not name:
            stats["n_unnamed_dropped"] += 1
            continue
        j = -1
        if fid:
            stats["n_with_ensembl"] += 1
            j = by_id.get(fid, -1)
            if j < 0 and name and name in by_symbol_only:
                j = by_symbol_only.pop(name)
                learned.append((j, fid))
                by_id[fid] = j
        else:
            stats["n_symbol_only"] += 1
            j = by_symbol.get(name, -1)
            if 0 <= j < len(atlas_genes) and atlas_genes.feature_id[j]:
                stats["n_symbol_mapped_to_ensembl"] += 1
        if j < 0:
            j = next_id
            next_id += 1
            new_rows.append((j, fid or name, fid, name))
            if fid:
                by_id[fid] = j
            if name and name not in by_symbol:
                by_symbol[name] = j
                if not fid:
                    by_symbol_only[name] = j
            stats["n_new"] += 1
        elif j in seen:
            stats["n_duplicates_dropped"] += 1
            continue
        else:
            stats["n_existing"] += 1
        seen.add(j)
        columns[i] = j
    new = pd.DataFrame(new_rows, columns=["var_joinid", "gene_key", "feature_id", "feature_name"])
    # A new gene keyed by symbol must not collide with an existing key (e.g. a symbol equal to another gene's key).
    existing_keys = set(atlas_genes.keys)
    if new["gene_key"].isin(existing_keys).any() or new["gene_key"].duplicated().any():
        new["gene_key"] = [
            k if (k not in existing_keys and not dup) else f"{k}#{j}"
            for k, j, dup in zip(new["gene_key"], new["var_joinid"], new["gene_key"].duplicated(), strict=True)
        ]
    return GenePlan(columns=columns, new_genes=new, learned_ensembl=learned, report=stats)


def _open_sources(
    paths: Sequence[str | Path], dataset_id: str | None, obs_map: Mapping[str, str], keep_non_primary: bool,
    x_layer: str | None = None, obs_set: Mapping[str, str] | None = None,
) -> list[DatasetPlan]:
    if dataset_id is not None and not dataset_id.strip():
        raise InputError("--dataset-id is empty: give a name for the dataset, or leave the option out to use the "
                         "file's stem")
    plans: list[DatasetPlan] = []
    try:
        _open_each(plans, paths, dataset_id, obs_map, keep_non_primary, x_layer, obs_set)
    except BaseException:
        for plan in plans:  # the sources opened before the failure
            plan.source.close()
        raise
    if dataset_id is not None and len(plans) > 1:
        for plan in plans:
            plan.source.close()
        raise InputError(f"--dataset-id names one dataset, but the inputs hold {len(plans)}; ingest them one at a time")
    keys = [normalised(p.dataset_id) for p in plans]
    dup = sorted({p.dataset_id for p, k in zip(plans, keys, strict=True) if keys.count(k) > 1})
    if dup:
        for plan in plans:
            plan.source.close()
        raise InputError(f"dataset ids {[escaped(d, 60) for d in dup]} occur more than once among the inputs (ids "
                         "differing only in case or surrounding blanks are one id); rename the files or use "
                         "--dataset-id")
    return plans


def _open_each(
    plans: list[DatasetPlan], paths: Sequence[str | Path], dataset_id: str | None, obs_map: Mapping[str, str],
    keep_non_primary: bool, x_layer: str | None, obs_set: Mapping[str, str] | None,
) -> None:
    """Open and plan every input into ``plans`` (appended as they are made, so a failure can close them)."""
    for raw in paths:
        label = str(raw)
        remote = "://" in label  # e.g. s3://bucket/census/homo_sapiens: tiledbsoma reads it where it can
        uri = label if remote else str(Path(label).absolute())  # tiledbsoma may not open a relative path
        if (remote or Path(label).is_dir()) and is_soma_experiment(uri):
            soma_sources = open_soma_experiment(uri, dataset_id=dataset_id, layer=x_layer)
            for i, soma_src in enumerate(soma_sources):
                try:
                    plans.append(_plan_dataset(soma_src, soma_src.name, label, "soma", obs_map, keep_non_primary,
                                               obs_set))
                except BaseException:
                    for unplanned in soma_sources[i:]:
                        unplanned.close()
                    raise
            continue
        p = Path(label)
        if remote:
            raise InputError(f"{label}: not a readable TileDB-SOMA experiment (remote inputs must be SOMA experiments)")
        if not p.exists():
            raise InputError(f"{label}: no such file or directory")
        if p.is_dir():
            raise InputError(f"{label}: a directory that is not a TileDB-SOMA experiment")
        h5 = open_h5ad(p, x_layer=x_layer)
        try:
            plans.append(_plan_dataset(h5, dataset_id or p.stem, label, "h5ad", obs_map, keep_non_primary, obs_set))
        except BaseException:
            h5.close()
            raise


# -- writing --------------------------------------------------------------------------------------------------------


def _duckdb_type(values: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(values):
        return "BOOLEAN"
    if pd.api.types.is_integer_dtype(values):
        return "BIGINT"
    if pd.api.types.is_float_dtype(values):
        return "DOUBLE"
    return "VARCHAR"


def _common_type(have: str, want: str) -> str:
    """The column type that holds values of both types without loss: DOUBLE for numbers, else VARCHAR."""
    if have == want:
        return have
    if {have, want} <= {"BIGINT", "DOUBLE", "INTEGER", "FLOAT"}:
        return "DOUBLE"
    return "VARCHAR"


def _add_obs_columns(con: duckdb.DuckDBPyConnection, plan: DatasetPlan) -> None:
    """Add the plan's extra obs columns to ``cells`` (names quoted); a column another dataset made with another
    type is widened (BIGINT -> DOUBLE, else VARCHAR) instead of casting this dataset's values into it."""
    existing = {
        str(name).lower(): (str(name), str(kind))
        for name, kind in con.execute("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall()
    }
    for col in plan.extra_columns:
        want = _duckdb_type(plan.obs_sample[col])
        if col.lower() not in existing:
            con.execute(f"ALTER TABLE cells ADD COLUMN {quote_ident(col)} {want}")
            continue
        name, have = existing[col.lower()]
        wider = _common_type(have, want)
        if wider != have:
            con.execute(f"ALTER TABLE cells ALTER COLUMN {quote_ident(name)} TYPE {wider}")
            logger.warning("%s: obs column %s holds %s values, other datasets %s: the column is now %s",
                           plan.dataset_id, escaped(col), want, have, wider)


def _x_source(location: str, rescale_note: str | None) -> str:
    """Where the values came from, and the rescale applied to them on the way in (provenance in the store)."""
    return location if rescale_note is None else f"{location} ({rescale_note})"


def _extended(vocab: GeneVocabulary, genes: GenePlan, n_genes: int) -> GeneVocabulary:
    """The atlas vocabulary after a dataset's new genes and learned Ensembl ids (``n_genes`` = new high water)."""
    keys, fid, fname = (np.full(n_genes, "", dtype=object) for _ in range(3))
    m = len(vocab.keys)
    keys[:m], fid[:m], fname[:m] = vocab.keys, vocab.feature_id, vocab.feature_name
    rows = genes.new_genes
    j = rows["var_joinid"].to_numpy(dtype=np.int64)
    keys[j], fid[j], fname[j] = rows["gene_key"].to_numpy(), rows["feature_id"].to_numpy(), rows["feature_name"].to_numpy()
    for var_id, ensembl in genes.learned_ensembl:
        fid[var_id] = ensembl
    return GeneVocabulary(keys=keys, feature_id=fid, feature_name=fname)


def write_measured_genes(con: duckdb.DuckDBPyConnection, dataset_id: str, var_ids: np.ndarray, n_genes: int) -> None:
    """Record the genes (store var ids below ``n_genes``, the store's gene count with this dataset's) a dataset
    measured, as a bitmap in table ``measured_genes`` (made in stores written before it existed): an embedder's fit
    tells a gene the dataset lacks from one it measured at zero."""
    con.execute(f"CREATE TABLE IF NOT EXISTS {MEASURED_TABLE} (dataset_id VARCHAR, n_genes BIGINT, measured BLOB)")
    bits = np.zeros(n_genes, dtype=bool)
    bits[np.asarray(var_ids, dtype=np.int64)] = True
    con.execute(f"INSERT INTO {MEASURED_TABLE} VALUES (?, ?, ?)", [dataset_id, n_genes, np.packbits(bits).tobytes()])


def _write_genes(con: duckdb.DuckDBPyConnection, rna: Any, genes: GenePlan, vocab: GeneVocabulary, dataset_id: str) -> None:
    """New genes and learned Ensembl ids into SOMA ``var`` and the DuckDB ``genes`` table."""
    if not len(genes.new_genes) and not genes.learned_ensembl:
        return
    var_rows = genes.new_genes.copy()
    if genes.learned_ensembl:
        learned = pd.DataFrame(
            [(j, vocab.keys[j], fid, vocab.feature_name[j]) for j, fid in genes.learned_ensembl],
            columns=["var_joinid", "gene_key", "feature_id", "feature_name"],
        )
        var_rows = pd.concat([var_rows, learned], ignore_index=True)
        for j, fid in genes.learned_ensembl:
            con.execute("UPDATE genes SET feature_id = ? WHERE var_joinid = ?", [fid, j])
    rna.var.write(
        pa.table({
            "soma_joinid": pa.array(var_rows["var_joinid"].to_numpy(), pa.int64()),
            "gene_key": pa.array(var_rows["gene_key"].astype(str), pa.large_string()),
            "feature_id": pa.array(var_rows["feature_id"].astype(str), pa.large_string()),
            "feature_name": pa.array(var_rows["feature_name"].astype(str), pa.large_string()),
        })
    )
    if len(genes.new_genes):
        new = genes.new_genes.assign(added_by=dataset_id)
        new = new.replace({"feature_id": {"": None}, "feature_name": {"": None}})
        con.register("new_genes", new)
        con.execute("INSERT INTO genes SELECT var_joinid, gene_key, feature_id, feature_name, added_by FROM new_genes")
        con.unregister("new_genes")


def _in_atlas_genes(
    block: sp.csr_matrix, keep_cols: np.ndarray, col_ids: np.ndarray, n_genes: int, pos: np.ndarray, what: str
) -> sp.csr_matrix:
    """A source block with its kept columns renumbered to atlas gene ids, in canonical form (what is stored);
    InputError when a row names one column twice (a damaged sparse matrix: its values would be summed)."""
    if not block.has_canonical_format:  # sorted without duplicates is told without a copy
        summed = block.copy()
        summed.sum_duplicates()
        if summed.nnz != block.nnz:
            raise InputError(f"{what}: the sparse matrix is damaged: a row of cells {int(pos[0])}-{int(pos[-1])} "
                             "names one column twice; rewrite the file (e.g. adata.write_h5ad)")
    sub = sp.csr_matrix(block[:, keep_cols])
    return canonical(sp.csr_matrix((sub.data, col_ids[sub.indices], sub.indptr), shape=(sub.shape[0], n_genes)))


@dataclass
class PreparedChunk:
    """One chunk of cells ready to store, made by the reading side (in a read-ahead thread when there is one):
    its X values as a COO table (in the X array's global order when it is known), its SOMA obs rows, its obsm
    tables and its rows of the ``cells`` table."""

    ids: np.ndarray
    x: pa.Table | None  # None: no stored value in the chunk
    x_global_order: bool
    obs: pa.Table
    obsm: dict[str, tuple[pa.Table, bool]]  # key -> (COO table, in global order)
    cells: pa.Table | pd.DataFrame  # a DataFrame only where Arrow cannot take the values as they are

    def __len__(self) -> int:
        return len(self.ids)


def _coo_table(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, order: GlobalOrder | None) -> tuple[pa.Table, bool]:
    """A SOMA sparse write (``soma_dim_0``, ``soma_dim_1``, ``soma_data``) of row-major coordinates, permuted into
    the array's global order when ``order`` is known (then TileDB need not sort it: the bool is True)."""
    perm = order.permutation(rows, cols) if order is not None else None
    if perm is not None:
        rows, cols, values = rows[perm], cols[perm], values[perm]
    table = pa.table({
        "soma_dim_0": pa.array(np.asarray(rows, dtype=np.int64), pa.int64()),
        "soma_dim_1": pa.array(np.asarray(cols, dtype=np.int64), pa.int64()),
        "soma_data": pa.array(np.asarray(values, dtype=np.float32), pa.float32()),
    })
    return table, order is not None


def _cells_table(frame: pd.DataFrame, ids: np.ndarray) -> pa.Table | pd.DataFrame:
    """The chunk's rows of the DuckDB ``cells`` table as Arrow (what DuckDB scans fastest, and made here, off the
    writing thread); the DataFrame itself where Arrow refuses a column's values (DuckDB reads those as before)."""
    rows = frame.assign(soma_joinid=ids)
    try:
        return pa.Table.from_pandas(rows, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return rows


def _prepare_chunk(plan: DatasetPlan, pos: np.ndarray, ids: np.ndarray, X: sp.csr_matrix, x_order: GlobalOrder | None,
                   obsm_orders: Mapping[str, GlobalOrder | None]) -> PreparedChunk:
    """Everything one chunk stores, computed from the source (obs standardised and checked, obsm read and checked,
    X as COO in write order) without touching the store."""
    x_table: pa.Table | None = None
    x_global = False
    if X.nnz:
        rows = np.repeat(ids, np.diff(X.indptr))
        x_table, x_global = _coo_table(rows, X.indices, X.data, x_order)
    frame = plan.standard_obs(pos)
    obs = pa.table({
        "soma_joinid": pa.array(ids, pa.int64()),
        **{c: pa.array(frame[c].to_numpy(), pa.bool_() if c == "is_primary_data" else pa.large_string())
           for c in STANDARD_OBS_COLUMNS},
    })
    obsm: dict[str, tuple[pa.Table, bool]] = {}
    for key in plan.obsm_dims:
        vec = check_embedding(plan.source.read_obsm(key, pos), pos, f"{plan.source_label}: obsm[{escaped(key)}]")
        r, c = np.divmod(np.arange(vec.size, dtype=np.int64), vec.shape[1])  # every entry, row-major
        obsm[key] = _coo_table(ids[r], c, vec.reshape(-1), obsm_orders.get(key))
    return PreparedChunk(ids=ids, x=x_table, x_global_order=x_global, obs=obs, obsm=obsm, cells=_cells_table(frame, ids))


def _write_chunk(exp: Any, con: duckdb.DuckDBPyConnection, chunk: PreparedChunk) -> None:
    """One prepared chunk into the store's staging: X, obs, obsm into SOMA, the cell rows into DuckDB."""
    rna = exp.ms[MEASUREMENT]
    if chunk.x is not None:
        rna.X[X_LAYER].write(chunk.x, platform_config=GLOBAL_ORDER_WRITE if chunk.x_global_order else None)
    exp.obs.write(chunk.obs, platform_config=GLOBAL_ORDER_WRITE)  # one dimension, ids ascending: global order
    for key, (table, global_order) in chunk.obsm.items():
        rna["obsm"][key].write(table, platform_config=GLOBAL_ORDER_WRITE if global_order else None)
    con.register("chunk_cells", chunk.cells)
    try:
        con.execute("INSERT INTO cells BY NAME SELECT * FROM chunk_cells")
    finally:
        con.unregister("chunk_cells")


def _prepared_chunks(plan: DatasetPlan, obs_start: int, keep_cols: np.ndarray, col_ids: np.ndarray, n_genes: int,
                     digest: XDigest, chunk_size: int, x_order: GlobalOrder | None,
                     obsm_orders: Mapping[str, GlobalOrder | None],
                     detected: np.ndarray | None = None) -> Iterator[PreparedChunk]:
    """The dataset's chunks, read, checked, renumbered to atlas genes, digested (in order) and prepared;
    ``detected`` (bool per atlas gene), when given, marks the genes with a count in any cell read."""
    done = 0
    for pos, block in plan.source.iter_rows(plan.rows, chunk_size):
        ids = np.arange(obs_start + done, obs_start + done + len(pos), dtype=np.int64)
        X = _in_atlas_genes(block, keep_cols, col_ids, n_genes, pos, plan.source_label)
        if detected is not None:
            detected[np.unique(X.indices[X.data != 0])] = True
        digest.update(ids, X)
        yield _prepare_chunk(plan, pos, ids, X, x_order, obsm_orders)
        done += len(pos)


COPY_SHARE = 0.9
"""A new dataset whose cell names are at least this share of a stored dataset's own (both ways) is warned about as
a copy of it."""


def _warn_copies(current: AtlasStore, plans: list[DatasetPlan]) -> None:
    """Warn where a new dataset holds (nearly) the cells of a stored one, by cell name (not AnnData's default names
    0, 1, ...): the same file ingested again under another id counts every cell twice in searches, votes and
    calibrations."""
    import pyarrow as pa

    sizes = {d.dataset_id: d.n_cells for d in current.datasets}
    if not sizes:
        return
    con = current.connect()
    try:
        for plan in plans:
            obs = getattr(plan.source, "obs", None)
            if obs is None or not len(plan.rows):
                continue
            names = np.unique(np.asarray(obs.index[plan.rows]).astype(str))
            if np.char.isdigit(names).all():  # AnnData's default names (0, 1, ...): no evidence of a copy
                continue
            con.register("_new_names", pa.table({"obs_id": pa.array(names, pa.string())}))
            rows = con.execute("SELECT dataset_id, count(*) FROM cells JOIN _new_names USING (obs_id) "
                               "GROUP BY dataset_id").fetchall()
            con.unregister("_new_names")
            for dataset_id, n in rows:
                if dataset_id in sizes and n >= COPY_SHARE * max(len(names), sizes[dataset_id]):
                    logger.warning(
                        "dataset %s has %d of its %d cell names in common with stored dataset %s (%d cells): the "
                        "same cells ingested again? Each copy counts in searches, votes and calibrations; remove one "
                        "with `scatlas remove --atlas ATLAS --dataset ID` if so", escaped(plan.dataset_id, 60), n,
                        len(names), escaped(dataset_id, 60), sizes[dataset_id])
    finally:
        con.close()


MIN_KNOWN_GENES = 0.5
"""A new dataset of which fewer of its genes are already in a store that holds genes is warned about."""


def _warn_foreign_genes(current: AtlasStore, plans: list[DatasetPlan]) -> None:
    """Warn where a new dataset shares under :data:`MIN_KNOWN_GENES` of its genes with the store (genes named
    another way, e.g. Ensembl ids against a store of symbols without them): an index of the store embeds its cells
    from the few shared genes."""
    vocab = current.genes
    if not np.count_nonzero(vocab.keys):
        return
    for plan in plans:
        stats = plan_genes(plan.source.genes, vocab, current.state.var_high_water).report
        named = stats["n_genes"] - stats["n_unnamed_dropped"]
        if named and stats["n_existing"] < MIN_KNOWN_GENES * named:
            logger.warning(
                "dataset %s shares %d of its %d genes with the store's %d: another gene panel, or genes named "
                "another way (Ensembl ids against symbols, another species' or a reference's own ids)? The default "
                "(pca) embedder of an index takes the genes a dataset lacks at the atlas mean for its cells; if the "
                "names differ, give the file gene names the store uses (a var column of symbols or Ensembl ids)",
                escaped(plan.dataset_id, 60), stats["n_existing"], named, int(np.count_nonzero(vocab.keys)))


def _with_detected(dataset_id: str, measured_ids: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """The measured genes with those a dataset's cells have counts in added (a warning when there are such genes
    the source did not call measured)."""
    extra = np.setdiff1d(np.flatnonzero(detected), measured_ids)
    if len(extra):
        logger.warning("dataset %s has counts in %d genes its source says it did not measure (%d): that record does "
                       "not describe this X; the genes with counts are taken as measured", escaped(dataset_id, 60),
                       len(extra), len(measured_ids))
        return np.union1d(measured_ids, extra)
    return measured_ids


def _measured_ids(source: Any, keep_cols: np.ndarray, col_ids: np.ndarray) -> np.ndarray:
    """The store gene ids the dataset measured: all of its genes (``col_ids``, from its columns ``keep_cols``)
    unless the source says which it measured (``source.measured``, bool per source gene: a Census experiment's
    presence matrix)."""
    measured = getattr(source, "measured", None)
    if measured is None:
        return col_ids
    return col_ids[np.asarray(measured, dtype=bool)[keep_cols]]


def _write_dataset(
    writer: StoreWriter, con: duckdb.DuckDBPyConnection, vocab: GeneVocabulary, plan: DatasetPlan, chunk_size: int,
    progress: bool, read_ahead_chunks: int = 0,
) -> tuple[DatasetRecord, DatasetIngestReport, GeneVocabulary]:
    """Stream one dataset into the store's staging (reserved, unpublished ids) inside the command's transaction;
    every row is validated as it is read. Chunks are read and prepared up to ``read_ahead_chunks`` ahead of the
    writes, in a thread (0: in turn). Returns its record, its report and the vocabulary it leaves."""
    t0 = time.perf_counter()
    genes = plan_genes(plan.source.genes, vocab, writer.var_next)
    n = len(plan.rows)
    obs_start, var_start = writer.reserve(plan.dataset_id, n, len(genes.new_genes), plan.obsm_dims)
    n_genes = var_start + len(genes.new_genes)
    keep_cols = np.flatnonzero(genes.columns >= 0)
    col_ids = genes.columns[keep_cols]
    digest = XDigest()
    _add_obs_columns(con, plan)
    with writer.experiment("w") as exp:
        rna = exp.ms[MEASUREMENT]
        _write_genes(con, rna, genes, vocab, plan.dataset_id)
        measured_ids = _measured_ids(plan.source, keep_cols, col_ids)
        # where the source says which genes it measured, a gene with counts in any cell is measured whatever it says
        detected = np.zeros(n_genes, dtype=bool) if len(measured_ids) < len(col_ids) else None
        x_order = GlobalOrder.of(rna.X[X_LAYER])
        obsm_orders = {key: GlobalOrder.of(rna["obsm"][key]) for key in plan.obsm_dims}
        chunks = _prepared_chunks(plan, obs_start, keep_cols, col_ids, n_genes, digest, chunk_size, x_order,
                                  obsm_orders, detected)
        with tqdm(total=n, desc=f"ingest {plan.dataset_id}", unit="cell", disable=not progress, leave=False) as bar, \
                read_ahead(chunks, read_ahead_chunks, name=f"ingest-read-{plan.dataset_id}") as ready:
            for chunk in ready:
                _write_chunk(exp, con, chunk)
                bar.update(len(chunk))
        if detected is not None:
            measured_ids = _with_detected(plan.dataset_id, measured_ids, detected)
        write_measured_genes(con, plan.dataset_id, measured_ids, n_genes)
    expression = plan.source.expression
    gene_report = {**genes.report, **({"n_measured": len(measured_ids)} if len(measured_ids) < len(col_ids) else {})}
    record = DatasetRecord(
        dataset_id=plan.dataset_id, start=obs_start, stop=obs_start + n, x_kind=expression.x_kind,
        x_source=_x_source(expression.location, expression.rescale_note()), source=plan.source_label,
        source_format=plan.source_format, genes=gene_report, obs_columns=plan.extra_columns, obsm=plan.obsm_dims,
        n_skipped_non_primary=plan.n_skipped_non_primary, ingested_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        x_sha256=digest.hexdigest(), renamed_columns=plan.renamed_columns,
    )
    report = DatasetIngestReport(
        dataset_id=plan.dataset_id, source=plan.source_label, n_cells=n, first_cell_id=obs_start,
        n_skipped_non_primary=plan.n_skipped_non_primary, x_kind=record.x_kind, x_source=record.x_source,
        genes=gene_report,
        obsm=plan.obsm_dims, seconds=round(time.perf_counter() - t0, 3),
        renamed_columns=plan.renamed_columns,
        ontology=plan.ontology_fill.report() if plan.ontology_fill is not None else None,
        obs_set=dict(plan.obs_set),
    )
    logger.info(
        "staged %s: %d cells (ids %d..%d), X from %s (%s), genes: %s, %.0f cells/s",
        plan.dataset_id, n, obs_start, obs_start + n - 1, record.x_source, record.x_kind, genes.report,
        report.cells_per_second,
    )
    return record, report, _extended(vocab, genes, n_genes)


def _write_all(writer: StoreWriter, plans: Sequence[DatasetPlan], chunk_size: int, progress: bool,
               read_ahead_chunks: int = 0) -> list[DatasetIngestReport]:
    """Stage every dataset in one DuckDB transaction, then publish them all (:meth:`StoreWriter.commit`): a
    failure anywhere leaves the store as it was."""
    vocab = AtlasStore(writer.path, writer.state).genes
    con = duckdb.connect(str(writer.path / CELLS_DB))
    try:
        with transaction(con, commit=False):  # writer.commit commits at its commit point
            records, reports, obsm_dims = [], [], {}
            for plan in plans:
                record, report, vocab = _write_dataset(writer, con, vocab, plan, chunk_size, progress,
                                                       read_ahead_chunks)
                records.append(record)
                reports.append(report)
                obsm_dims.update(plan.obsm_dims)
            writer.commit(records, obsm_dims, con)
    except duckdb.Error as exc:
        raise StoreError(
            f"{writer.path}: the cell metadata could not be stored ({type(exc).__name__}); nothing was added. "
            "Check the disk and that no other process has the store's cells.duckdb open, then rerun"
        ) from exc
    finally:
        con.close()
    return reports


@duckdb_interrupts()  # a Ctrl-C that DuckDB reported as its own error is a KeyboardInterrupt again
def ingest(
    sources: Sequence[str | Path],
    atlas: str | Path,
    *,
    dataset_id: str | None = None,
    obs_map: Mapping[str, str] | None = None,
    mode: IngestMode = "append",
    keep_non_primary: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    ontology_map: str | Path | Mapping[str, str] | None = None,
    ontology_label_key: str = "cell_type",
    x_layer: str | None = None,
    obs_set: Mapping[str, str] | None = None,
    read_ahead: int = DEFAULT_READ_AHEAD,
    allow_species_mismatch: bool = False,
) -> IngestReport:
    """Ingest ``.h5ad`` files and/or Census-layout SOMA experiments into the atlas store at ``atlas``.

    Parameters
    ----------
    sources: paths of ``.h5ad`` files or SOMA experiment directories (a SOMA experiment yields one dataset per
        ``dataset_id`` in its obs).
    dataset_id: id of the dataset (only with a single input); default: the file stem.
    obs_map: ``{source column: target column}`` renames applied to obs before the schema is filled
        (e.g. ``{"cluster_id": "cell_type", "sample_id": "donor_id"}``).
    mode: ``"write"`` creates a new store and refuses an existing one; ``"append"`` adds to a store, creating it
        when absent. A dataset id already in the store is always refused.
    keep_non_primary: keep cells with ``is_primary_data == False`` (Census duplicates), skipped by default.
    ontology_map: a CSV file with the columns ``label,ontology_term_id`` (:func:`atlas.ontology_map.read_ontology_map`)
        or a ``{label: CL term id}`` mapping: fills ``{ontology_label_key}_ontology_term_id`` of the cells whose
        ``ontology_label_key`` value is in it and whose term is empty; terms the data has are kept (a different
        one is reported as a conflict). Each dataset's report says what was filled (``ontology``).
    ontology_label_key: the label column the map's labels are values of (default ``cell_type``).
    x_layer: the matrix to read. For a SOMA experiment, the X layer (default ``raw`` when present, else the only
        one; several and no ``raw`` is refused). For an ``.h5ad``: ``X``, ``raw`` (``adata.raw.X``) or a layer
        (``NAME`` or ``layers/NAME``); default: raw counts wherever they are, else log-normalised values. It is
        recorded in each dataset's ``x_source``.
    obs_set: ``{column: value}`` set for every cell of every dataset of this ingest (e.g. ``{"tissue": "blood"}``):
        a standard column gets the value, another becomes an extra VARCHAR column. A column the data has already
        is refused (rename it with ``obs_map``); ``obs_id``, ``dataset_id``, ``is_primary_data`` cannot be set.
    read_ahead: chunks read, checked and converted in a thread ahead of the writes (memory: about this many chunks
        more); 0 reads and writes in turn in one thread. The store content is the same either way.
    allow_species_mismatch: ingest datasets whose genes look like another species than the store's or each
        other's (:mod:`atlas.species`); refused by default (SpeciesMismatchError): genes are matched by name,
        case-insensitively, so mouse ``Cd3e`` would be stored as human ``CD3E``.
    """
    if mode not in ("write", "append"):
        raise InputError(f"mode must be 'write' or 'append', got {mode!r}")
    if not sources:
        raise InputError("no input files given")
    if chunk_size <= 0:
        raise InputError(f"chunk size must be positive, got {chunk_size}")
    if read_ahead < 0:
        raise InputError(f"read-ahead must be 0 or more chunks, got {read_ahead}")
    if x_layer is not None:
        check_name(x_layer, "--x-layer")
    constants = check_obs_set(obs_set)
    renames = check_obs_map(obs_map)
    table = checked_ontology_map(ontology_map, ontology_label_key)
    atlas = check_output_dir(atlas, ATLAS_STORE, inputs=sources)
    exists = AtlasStore.exists(atlas)
    if mode == "write" and exists and not _first_ingest_interrupted(atlas):
        raise StoreError(_EXISTS.format(atlas=atlas))
    if atlas.exists() and not atlas.is_dir():
        raise InputError(f"{atlas}: exists and is not a directory")
    plans = _open_sources(sources, dataset_id, renames, keep_non_primary, x_layer, constants)
    try:
        if table is not None:
            for plan in plans:
                plan.attach_ontology_fill(OntologyFill(table, ontology_label_key))
        current = AtlasStore.open(atlas) if exists else None
        try:
            if current is not None:
                _refuse_present(current.datasets, plans, atlas)
            check_species(plans, current.genes if current is not None else None, allow_species_mismatch)
            if current is not None:
                _warn_copies(current, plans)
                _warn_foreign_genes(current, plans)
        finally:
            if current is not None:
                current.close()
        created_here = not atlas.exists()
        report = IngestReport(atlas=str(atlas))
        try:
            with StoreWriter.open(atlas, create=True) as writer:
                _refuse_present(writer.state.datasets, plans, atlas)  # again, under the lock: an ingest meanwhile
                if mode == "write" and writer.state.datasets:
                    raise StoreError(_EXISTS.format(atlas=atlas))
                report.datasets.extend(_write_all(writer, plans, chunk_size, progress, read_ahead))
        except BaseException:
            if created_here and _nothing_committed(atlas):
                shutil.rmtree(atlas, ignore_errors=True)  # nothing committed: leave no half-made store behind
            raise
        report.n_cells_in_store = AtlasStore.open(atlas).n_cells
        return report
    finally:
        for plan in plans:
            plan.source.close()


_EXISTS = "{atlas}: an atlas store already exists; use --mode append to add datasets, or a new directory"


def _first_ingest_interrupted(atlas: Path) -> bool:
    """Whether the store at ``atlas`` is what a first ingest killed after ``store.json`` leaves: no dataset, and the
    interrupted ingest's journal (``--mode write`` then writes it anew)."""
    return (atlas / JOURNAL_FILE).is_file() and not AtlasStore.open(atlas, warn_unfinished=False).datasets


def _refuse_present(datasets: Sequence[DatasetRecord], plans: Sequence[DatasetPlan], atlas: Path) -> None:
    """DatasetExistsError when a dataset of ``plans`` is already among ``datasets`` (ids compared normalised)."""
    present = {normalised(d.dataset_id) for d in datasets}
    clash = [escaped(p.dataset_id, 60) for p in plans if normalised(p.dataset_id) in present]
    if clash:
        raise DatasetExistsError(
            f"dataset(s) {', '.join(clash)} already in {atlas} (ids differing only in case or surrounding blanks are "
            "one id); datasets are never duplicated: use --dataset-id to give a new id, or ingest into another store"
        )


def _nothing_committed(atlas: Path) -> bool:
    """Whether the store this command created holds no committed dataset, after its own ingest failed (its journal
    is still there: no warning about an interrupted ingest; an unreadable state: False, the store is kept)."""
    try:
        return AtlasStore.exists(atlas) and not AtlasStore.open(atlas, warn_unfinished=False).datasets
    except StoreError:
        return False
