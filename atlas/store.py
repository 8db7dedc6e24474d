"""The atlas store: one TileDB-SOMA experiment + a DuckDB cell table + ``store.json``, the commit point.

Layout of ``ATLAS_DIR``::

    store.json            committed state (written last, by atomic rename)
    experiment/           TileDB-SOMA Experiment: obs, ms["RNA"].var, ms["RNA"].X["raw"], ms["RNA"].obsm[KEY]
    cells.duckdb          tables ``cells`` (soma_joinid + metadata), ``genes``, ``datasets``
    ingest.journal.json   present only while (or after a failed) ingest: the id ranges it reserved

Cell ids are ``soma_joinid``: global, stable, never renumbered. Each dataset owns a contiguous id range. A failed
ingest leaves its reserved range unused (a hole) and is never visible: readers see only datasets in ``store.json``.
A removed dataset (:mod:`atlas.lifecycle`) leaves a hole too: its ids are never reused. Rows of the DuckDB tables
whose dataset is not in ``store.json`` (an ingest or a remove interrupted after its commit point) are deleted by
the next writer (:meth:`atlas.store_writer.StoreWriter.open`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.errors import InputError, StoreError
from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.sources.soma import STREAM_CONTEXT_CONFIG, arrow_to_csr
from scatlas.atlas.sql import quote_ident, table_exists
from scatlas.atlas.store_obs import obs_reader
from scatlas.atlas.validate import escaped

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
STATE_FILE = "store.json"
JOURNAL_FILE = "ingest.journal.json"
LOCK_FILE = ".lock"
CREATING_FILE = ".creating-store"
"""Written by a first ingest before it lays out a new store and removed once ``store.json`` exists: a directory
holding it (and no ``store.json``) is a store whose creation was interrupted, which a rerun starts anew."""
EXPERIMENT_DIR = "experiment"
CELLS_DB = "cells.duckdb"
MEASURED_TABLE = "measured_genes"
"""DuckDB table of the genes each dataset measured: one row per dataset (``dataset_id``, ``n_genes``: the store's gene
count when it was ingested, ``measured``: a bitmap over gene ids ``0..n_genes-1``, ``numpy.packbits`` order); absent
from stores written before it existed, whose datasets then count as measuring every gene."""
MEASUREMENT = "RNA"
X_LAYER = "raw"


def _not_a_store(path: Path) -> StoreError:
    """Why ``path`` (no ``store.json``) cannot be opened as a store: another kind of scatlas output (an index: never
    to be deleted), the leftovers of a failed first ingest, or other files."""
    from scatlas.atlas.outputs import ATLAS_STORE, describe_dir, kind_of

    create = f"create one with `scatlas ingest FILES --atlas {path}`"
    if not path.exists():
        return StoreError(f"{path}: not an atlas store (no such directory); {create}")
    if not path.is_dir():
        return StoreError(f"{path}: a file, not an atlas store; give the directory of an atlas store")
    kind = kind_of(path)
    if kind is not None and kind is not ATLAS_STORE:
        return StoreError(f"{path}: holds {kind.what}, not an atlas store; give the directory of an atlas store "
                          "(the --atlas of `scatlas ingest`)")
    if any((path / name).exists() for name in (EXPERIMENT_DIR, CELLS_DB, JOURNAL_FILE)):
        return StoreError(f"{path}: not an atlas store (it holds a store's files but no store.json: a first ingest "
                          f"failed); rerun that ingest, or delete the directory and ingest again")
    held = describe_dir(path)
    if held == "nothing":
        return StoreError(f"{path}: not an atlas store (an empty directory); {create}")
    return StoreError(f"{path}: not an atlas store: it holds {held} but no store.json; give the directory of an "
                      f"atlas store, or {create} in a new directory")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


REQUIRED_ARRAYS = ("obs", f"ms/{MEASUREMENT}", f"ms/{MEASUREMENT}/var", f"ms/{MEASUREMENT}/X/{X_LAYER}")
"""The parts of the experiment every store has (paths under ``experiment/``), checked on open."""
_DUCKDB_HEADER_BYTES = 3 * 4096
"""A DuckDB file starts with its main header (``DUCK`` at byte 8) and two database headers, 4 KiB each."""
_DUCKDB_NOT_DAMAGE = ("Could not set lock", "Conflicting lock", "different configuration", "Permission denied",
                      "No space left on device", "Read-only file system", "Disk quota exceeded")
"""How DuckDB words a database file held by another process, or an operating-system error: not damage (these
DuckDB errors go on; the CLI says what to do about each)."""


class DamagedStoreError(StoreError):
    """A store whose files do not match what its ``store.json`` records (``what``: which part, and how)."""

    def __init__(self, path: str | Path, what: str) -> None:
        super().__init__(
            f"the atlas store {path} is damaged ({what}): run `scatlas verify --atlas {path}` to list what is wrong; "
            "restore the store from a copy, or re-ingest its datasets into a new store"
        )
        self.what = what


def damaged_store(path: str | Path, what: str) -> DamagedStoreError:
    """The error of a store whose files do not match what ``store.json`` says (``what``: which part, how)."""
    return DamagedStoreError(path, what)


def _duckdb_file_problem(db: Path) -> str | None:
    """What is wrong with the DuckDB file ``db`` that its first 12 KiB show (missing, empty, not a DuckDB file,
    shorter than DuckDB's three header blocks), else None. Damage further in is found when DuckDB opens or reads
    the file (:meth:`AtlasStore.connect`)."""
    if not db.is_file():
        return f"its cell table {db.name} is missing"
    try:
        size = db.stat().st_size
        with open(db, "rb") as fh:
            head = fh.read(_DUCKDB_HEADER_BYTES)
    except OSError:  # permissions, I/O: not damage; DuckDB reports it when the file is opened
        return None
    if size == 0:
        return f"its cell table {db.name} is empty"
    if len(head) < 12 or head[8:12] != b"DUCK":
        return f"its cell table {db.name} is not a DuckDB database"
    if len(head) < _DUCKDB_HEADER_BYTES:
        return f"its cell table {db.name} is cut short ({size} bytes)"
    return None


def _range_problems(state: StoreState) -> list[str]:
    """What is wrong with the id ranges ``store.json`` records: each dataset's ``[start, stop)`` must be integers
    with ``0 <= start <= stop <= obs_high_water``, ranges must not overlap, dataset ids must be unique."""
    problems: list[str] = []
    high = state.obs_high_water
    if high < 0 or state.var_high_water < 0:
        problems.append(f"store.json records negative id high-water marks ({high}, {state.var_high_water})")
    ids = [d.dataset_id for d in state.datasets]
    twice = sorted({str(i) for i in ids if ids.count(i) > 1})
    if twice:
        problems.append(f"store.json lists the datasets {', '.join(escaped(i) for i in twice[:5])} more than once")
    ranged: list[DatasetRecord] = []
    for d in state.datasets:
        name = escaped(d.dataset_id)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (d.start, d.stop)):
            problems.append(f"store.json records dataset {name} with cell ids that are not integers")
        elif not 0 <= d.start <= d.stop <= high:
            problems.append(f"store.json records dataset {name} at cell ids {d.start} to {d.stop}, outside the store's "
                            f"ids 0 to {high}")
        else:
            ranged.append(d)
    ranged.sort(key=lambda d: (d.start, d.stop))
    for a, b in zip(ranged, ranged[1:], strict=False):
        if b.start < a.stop:
            problems.append(f"store.json records overlapping cell ids for datasets {escaped(a.dataset_id)} "
                            f"({a.start} to {a.stop}) and {escaped(b.dataset_id)} ({b.start} to {b.stop})")
    return problems


def store_problems(path: str | Path, state: StoreState) -> list[str]:
    """What a cheap look at the store at ``path`` finds wrong (empty: nothing): the id ranges of ``state`` (its
    ``store.json``), the DuckDB file's presence, signature and size, and the experiment's required arrays being
    there. No data is read (:func:`atlas.verify.verify_store` reads it all)."""
    path = Path(path)
    problems = _range_problems(state)
    db_problem = _duckdb_file_problem(path / CELLS_DB)
    if db_problem:
        problems.append(db_problem)
    exp = path / EXPERIMENT_DIR
    if not exp.is_dir():
        problems.append(f"its expression arrays ({EXPERIMENT_DIR}/) are missing")
    else:
        missing = [part for part in REQUIRED_ARRAYS if not (exp / part).is_dir()]
        if missing:
            problems.append(f"its experiment lacks {', '.join(f'{EXPERIMENT_DIR}/{m}' for m in missing)}")
    return problems



@dataclass
class DatasetRecord:
    """One ingested dataset: its id range and how it was read."""

    dataset_id: str
    start: int
    stop: int
    x_kind: str
    x_source: str
    source: str
    source_format: str
    genes: dict[str, int] = field(default_factory=dict)
    obs_columns: list[str] = field(default_factory=list)
    obsm: dict[str, int] = field(default_factory=dict)
    n_skipped_non_primary: int = 0
    ingested_at: str = ""
    x_sha256: str = ""  # atlas.digest.XDigest of the stored X values ("" in stores written before it existed)
    renamed_columns: dict[str, str] = field(default_factory=dict)  # obs column -> the name it is stored under
    obs_revision: int = 0  # bumped by every `scatlas relabel` of the dataset (its labels changed after ingest)

    @property
    def n_cells(self) -> int:
        """Cells of the dataset (its id range is ``[start, stop)``)."""
        return self.stop - self.start


@dataclass
class StoreState:
    """The committed state of a store (``store.json``): format, id high-water marks, obsm widths, datasets."""

    format_version: int = STORE_FORMAT_VERSION
    created_at: str = field(default_factory=now)
    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Made when the store is created; a copy keeps it, a store ingested separately has its own ("" in stores
    written before ids existed)."""
    obs_high_water: int = 0
    var_high_water: int = 0
    obsm_dims: dict[str, int] = field(default_factory=dict)
    datasets: list[DatasetRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any], where: Path) -> StoreState:
        """The state read from ``payload`` (the contents of ``where``, named in errors); other formats refused."""
        version = payload.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise StoreError(
                f"{where}: atlas store format {version!r}, this scatlas reads format {STORE_FORMAT_VERSION}; "
                "re-ingest the data with this version"
            )
        datasets = [DatasetRecord(**d) for d in payload.get("datasets", [])]
        return cls(
            format_version=version,
            created_at=payload.get("created_at", ""),
            store_id=str(payload.get("store_id", "")),
            obs_high_water=int(payload["obs_high_water"]),
            var_high_water=int(payload["var_high_water"]),
            obsm_dims={k: int(v) for k, v in payload.get("obsm_dims", {}).items()},
            datasets=datasets,
        )


class AtlasStore:
    """Read access to the committed content of an atlas store. Writing goes through :class:`atlas.store_writer.StoreWriter`."""

    def __init__(self, path: Path, state: StoreState) -> None:
        self.path = path
        self.state = state
        self._exp: Any = None
        self._genes: GeneVocabulary | None = None
        self._measured: dict[str, tuple[int, bytes]] | None = None

    # -- opening -----------------------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` holds a committed store (a ``store.json``)."""
        return (Path(path) / STATE_FILE).is_file()

    @classmethod
    def open(cls, path: str | Path, *, warn_unfinished: bool = True, check: bool = True) -> AtlasStore:
        """Open the store at ``path`` for reading; StoreError when it is not one, its state is unreadable, or (with
        ``check``) a cheap look finds it damaged (:func:`store_problems`: recorded id ranges that are negative,
        overlapping or beyond the ids handed out, a missing or cut-short ``cells.duckdb``, missing arrays; no data
        is read). ``warn_unfinished``: log a warning when an ingest's journal is there (one was interrupted or is
        running); off for a writer that looks at the store it is writing itself. ``check=False`` is for
        :func:`atlas.verify.verify_store`, which reports the problems instead."""
        path = Path(path)
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise _not_a_store(path)
        try:
            state = StoreState.from_json(json.loads(state_path.read_text()), state_path)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
            why = f"no {escaped(exc.args[0])}" if isinstance(exc, KeyError) and exc.args else type(exc).__name__
            raise StoreError(f"{state_path}: unreadable store state ({why}); the store is corrupt: "
                             f"restore it from a copy, or re-ingest its datasets into a new store") from exc
        if check:
            problems = store_problems(path, state)
            if problems:
                raise damaged_store(path, "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
        if warn_unfinished and (path / JOURNAL_FILE).is_file():
            logger.warning("%s: an ingest was interrupted or is running; only committed datasets are visible", path)
        return cls(path, state)

    def close(self) -> None:
        """Close the SOMA experiment if it was opened."""
        if self._exp is not None:
            self._exp.close()
            self._exp = None

    def __enter__(self) -> AtlasStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- committed content ------------------------------------------------------------------------------------
    @property
    def experiment_uri(self) -> str:
        """The TileDB-SOMA experiment's URI."""
        return str(self.path / EXPERIMENT_DIR)

    @property
    def cells_db_path(self) -> Path:
        """The DuckDB file of cell metadata."""
        return self.path / CELLS_DB

    @property
    def datasets(self) -> list[DatasetRecord]:
        """The committed datasets, in commit order."""
        return list(self.state.datasets)

    @property
    def n_cells(self) -> int:
        """Cells of all committed datasets."""
        return sum(d.n_cells for d in self.state.datasets)

    def dataset(self, dataset_id: str) -> DatasetRecord:
        """The record of ``dataset_id``; InputError naming the known ids when absent."""
        for d in self.state.datasets:
            if d.dataset_id == dataset_id:
                return d
        raise InputError(f"no dataset {dataset_id!r} in {self.path}; it has: {[d.dataset_id for d in self.state.datasets]}")

    def cell_ranges(self) -> list[tuple[str, int, int]]:
        """``(dataset_id, start, stop)`` of each dataset, by first cell id."""
        return sorted(((d.dataset_id, d.start, d.stop) for d in self.state.datasets), key=lambda r: r[1])

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only DuckDB connection to the cell metadata (tables ``cells``, ``genes``, ``datasets``);
        StoreError (damaged) when the file cannot be opened as a database, other than for being in use by another
        process (that DuckDB error goes on: the CLI says to wait)."""
        try:
            return duckdb.connect(str(self.cells_db_path), read_only=True)
        except duckdb.Error as exc:
            corrupt = "Corrupt database file" in str(exc)  # a checksum mismatch: raised as the base duckdb.Error
            if any(marker in str(exc) for marker in _DUCKDB_NOT_DAMAGE) or not (corrupt or isinstance(
                    exc, duckdb.IOException | duckdb.SerializationException | duckdb.InternalException)):
                raise
            problem = _duckdb_file_problem(self.cells_db_path)
            raise damaged_store(self.path, problem or f"its cell table {CELLS_DB} cannot be opened "
                                f"({type(exc).__name__})") from exc

    @property
    def genes(self) -> GeneVocabulary:
        """The gene space of ``X``: column ``j`` is the gene with var ``soma_joinid == j`` (unused ids are empty)."""
        if self._genes is None:
            n = self.state.var_high_water
            keys = np.full(n, "", dtype=object)
            fid, fname = keys.copy(), keys.copy()
            if n:  # genes outlive the dataset that added them (removed datasets): the vocabulary never shrinks
                with self.connect() as con:
                    try:
                        rows = con.execute(
                            "SELECT var_joinid, gene_key, feature_id, feature_name FROM genes WHERE var_joinid < ?",
                            [n],
                        ).fetchall()
                    except (duckdb.IOException, duckdb.CatalogException) as exc:
                        if any(marker in str(exc) for marker in _DUCKDB_NOT_DAMAGE):
                            raise
                        raise damaged_store(self.path, f"its cell table {CELLS_DB} cannot be read "
                                            f"({type(exc).__name__})") from exc
                for j, key, f_id, f_name in rows:
                    keys[j], fid[j], fname[j] = key, f_id or "", f_name or ""
            self._genes = GeneVocabulary(keys=keys, feature_id=fid, feature_name=fname)
        return self._genes

    def measured(self, dataset_id: str) -> np.ndarray | None:
        """Bool per gene of :attr:`genes`: the genes dataset ``dataset_id`` measured (the columns of ``X`` that are
        its data, not zeros for genes it lacks); None where the store did not record it (ingested before). Every
        dataset's record is read at the first call (one query; a bitmap of a few kB per dataset)."""
        if self._measured is None:
            self._measured = {}
            with self.connect() as con:
                if table_exists(con, MEASURED_TABLE):
                    for d, n, bits in con.execute(f"SELECT dataset_id, n_genes, measured FROM {MEASURED_TABLE}").fetchall():
                        self._measured[str(d)] = (int(n), bytes(bits))
        record = self._measured.get(dataset_id)
        if record is None:
            return None
        n, bits = record
        mask = np.zeros(len(self.genes), dtype=bool)
        got = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool)
        mask[: min(n, len(mask))] = got[: len(mask)]
        return mask

    def snapshot(self) -> dict[str, Any]:
        """What an index records about the store it was built from."""
        return {
            "path": str(self.path.resolve()),
            "store_id": self.state.store_id,  # what tells this store from another one (a copy keeps it)
            "format_version": self.state.format_version,
            "n_cells": self.n_cells,
            "n_genes": int(sum(1 for k in self.genes.keys if k)),
            "gene_vocabulary": self.genes.fingerprint(),
            "datasets": [
                {"dataset_id": d.dataset_id, "start": d.start, "stop": d.stop, "ingested_at": d.ingested_at,
                 "obs_revision": d.obs_revision, "x_sha256": d.x_sha256}
                for d in self.cell_ranges_records()
            ],
        }

    def cell_ranges_records(self) -> list[DatasetRecord]:
        """The dataset records by first cell id."""
        return sorted(self.state.datasets, key=lambda d: d.start)

    # -- reading cells ----------------------------------------------------------------------------------------
    def _experiment(self) -> Any:
        """The SOMA experiment, opened on first use; StoreError (damaged) when it cannot be opened or its X array
        is smaller than the cell and gene ids ``store.json`` records (its shape, no data read)."""
        if self._exp is None:
            import tiledbsoma

            ctx = tiledbsoma.SOMATileDBContext(tiledb_config=STREAM_CONTEXT_CONFIG)
            try:
                exp = tiledbsoma.Experiment.open(self.experiment_uri, context=ctx)
            except tiledbsoma.SOMAError as exc:
                raise damaged_store(self.path, f"its expression arrays cannot be opened ({type(exc).__name__})") from exc
            try:
                n_obs, n_var = (int(n) for n in exp.ms[MEASUREMENT].X[X_LAYER].shape)
            except (tiledbsoma.SOMAError, KeyError, ValueError, TypeError) as exc:
                exp.close()
                raise damaged_store(self.path, f"its expression matrix cannot be opened ({type(exc).__name__})") from exc
            stop = max((d.stop for d in self.state.datasets), default=0)
            if stop > n_obs or self.state.var_high_water > max(n_var, 1):
                exp.close()
                raise damaged_store(self.path, f"its expression matrix holds {n_obs} cells x {n_var} genes, fewer "
                                    f"than the {stop} cells x {self.state.var_high_water} genes store.json records")
            self._exp = exp
        return self._exp

    def check_arrays(self) -> None:
        """Open the expression arrays (as the first read does): StoreError (damaged) when they cannot be opened
        or are smaller than the ids ``store.json`` records. Reads the arrays' shape, no data."""
        self._experiment()

    def _x(self) -> Any:
        return self._experiment().ms[MEASUREMENT].X[X_LAYER]

    def _read_x(self, coords: slice | np.ndarray, row_ids: np.ndarray) -> sp.csr_matrix:
        tables = list(self._x().read(coords=(coords,)).tables())
        n_cols = self.state.var_high_water
        if not tables:
            return sp.csr_matrix((len(row_ids), n_cols), dtype=np.float32)
        return arrow_to_csr(pa.concat_tables(tables), row_ids, n_cols)

    def _read_obsm(self, key: str, ids: np.ndarray) -> np.ndarray:
        arr = self._experiment().ms[MEASUREMENT]["obsm"][key]
        out = np.full((len(ids), self.state.obsm_dims[key]), np.nan, dtype=np.float32)
        if len(ids):
            table = arr.read(coords=(ids,)).tables().concat()
            r = np.searchsorted(ids, table.column("soma_dim_0").to_numpy())
            out[r, table.column("soma_dim_1").to_numpy()] = table.column("soma_data").to_numpy()
        return out

    def _check_obsm(self, keys: Sequence[str], records: Sequence[DatasetRecord]) -> None:
        """InputError, before any cell is read, when an obsm key is not in the store or some of ``records`` (the
        datasets a read covers) lack it: naming the key and how many datasets lack it."""
        for key in keys:
            if key not in self.state.obsm_dims:
                raise InputError(f"no obsm[{key!r}] in {self.path}; available: {sorted(self.state.obsm_dims) or 'none'}")
            lacking = sum(1 for rec in records if key not in rec.obsm)
            if lacking:
                raise InputError(
                    f"obsm[{key!r}] is missing from {lacking} of the {len(records)} dataset(s) read from {self.path}: "
                    f"every dataset must hold that embedding; re-ingest those datasets with obsm[{key!r}] (made by the "
                    "same model), remove them from the store, or use an embedder that reads the expression"
                )

    def _obs_reader(self, columns: Sequence[str]) -> Any:
        """:func:`atlas.store_obs.obs_reader` of this store's cells table (None inside when no column is asked)."""
        return obs_reader(self.connect, columns, str(self.path))

    def _record_for(self, dataset_id: str) -> DatasetRecord:
        return next(d for d in self.state.datasets if d.dataset_id == dataset_id)

    def iter_chunks(
        self,
        start: int | None = None,
        stop: int | None = None,
        chunk_size: int = 10_000,
        with_X: bool = True,
        obsm_keys: Sequence[str] = (),
        obs_columns: Sequence[str] = (),
    ) -> Iterator[CellChunk]:
        """Stream committed cells with ``start <= soma_joinid < stop`` in id order; chunks never span datasets.

        ``with_X``: read the expression; ``obsm_keys``: the stored embeddings to read (every dataset read must
        hold them: InputError before the first chunk otherwise); ``obs_columns``: the cell metadata columns to
        read into :attr:`CellChunk.obs`."""
        if chunk_size <= 0:
            raise InputError(f"chunk size must be positive, got {chunk_size}")
        genes = self.genes
        spans = []
        for rec in self.cell_ranges_records():
            a0 = rec.start if start is None else max(rec.start, start)
            b0 = rec.stop if stop is None else min(rec.stop, stop)
            if a0 < b0:
                spans.append((rec, a0, b0))
        self._check_obsm(obsm_keys, [rec for rec, _, _ in spans])
        with self._obs_reader(obs_columns) as read_obs:
            for rec, a0, b0 in spans:
                for a in range(a0, b0, chunk_size):
                    b = min(a + chunk_size, b0)
                    ids = np.arange(a, b, dtype=np.int64)
                    yield self._chunk(rec, ids, slice(a, b - 1), genes, with_X, obsm_keys, read_obs)

    def _chunk(self, rec: DatasetRecord, ids: np.ndarray, coords: slice | np.ndarray, genes: GeneVocabulary,
               with_x: bool, obsm_keys: Sequence[str], read_obs: Any) -> CellChunk:
        """The chunk of cells ``ids`` of dataset ``rec`` (X read at ``coords``, when ``with_x``)."""
        X = self._read_x(coords, ids) if with_x else None
        obsm = {k: self._read_obsm(k, ids) for k in obsm_keys}
        obs = read_obs(ids) if read_obs is not None else {}
        return CellChunk(ids=ids, X=X, x_kind=rec.x_kind, genes=genes, obsm=obsm,  # type: ignore[arg-type]
                         dataset_id=rec.dataset_id, obs=obs, measured=self.measured(rec.dataset_id))

    def read_cells(
        self,
        ids: Sequence[int] | np.ndarray,
        chunk_size: int = 10_000,
        with_X: bool = True,
        obsm_keys: Sequence[str] = (),
        obs_columns: Sequence[str] = (),
    ) -> Iterator[CellChunk]:
        """Stream the given cells (sorted, unique, committed ids) as chunks that never span datasets; ``with_X``,
        ``obsm_keys`` and ``obs_columns`` as for :meth:`iter_chunks`."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and np.any(np.diff(ids) <= 0):
            raise InputError("cell ids must be sorted and unique")
        genes = self.genes
        spans = []
        covered = 0
        for rec in self.cell_ranges_records():
            lo, hi = (int(i) for i in np.searchsorted(ids, [rec.start, rec.stop]))
            covered += hi - lo
            if lo < hi:
                spans.append((rec, lo, hi))
        self._check_obsm(obsm_keys, [rec for rec, _, _ in spans])
        with self._obs_reader(obs_columns) as read_obs:
            for rec, lo, hi in spans:
                for a in range(lo, hi, chunk_size):
                    sel = ids[a : min(a + chunk_size, hi)]
                    yield self._chunk(rec, sel, sel, genes, with_X, obsm_keys, read_obs)
        if covered != len(ids):
            raise InputError(f"{len(ids) - covered} requested cell ids are not in the atlas store")

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """Up to ``n`` cell ids, stratified by dataset (equal shares, capped by dataset size), sorted."""
        records = self.cell_ranges_records()
        if n <= 0 or not records:
            return np.zeros(0, dtype=np.int64)
        sizes = np.array([r.n_cells for r in records])
        quota = np.zeros(len(records), dtype=np.int64)
        remaining = min(n, int(sizes.sum()))
        while remaining > 0:
            open_ = np.flatnonzero(quota < sizes)
            share = max(1, remaining // len(open_))
            for i in open_:
                take = min(share, sizes[i] - quota[i], remaining)
                quota[i] += take
                remaining -= take
                if remaining == 0:
                    break
        rng = np.random.default_rng(seed)
        parts = [r.start + np.sort(rng.choice(r.n_cells, size=q, replace=False)) for r, q in zip(records, quota, strict=True) if q]
        return np.sort(np.concatenate(parts)).astype(np.int64)

    def obs(self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> Any:
        """Cell metadata rows for ``ids`` (pandas DataFrame, in the order given)."""
        ids = np.asarray(ids, dtype=np.int64)
        cols = "*" if columns is None else ", ".join(f"c.{quote_ident(c)}" for c in columns)
        with self.connect() as con:
            con.register("wanted", pa.table({"soma_joinid": ids, "_pos": np.arange(len(ids))}))
            sel = "c.*" if cols == "*" else f"c.soma_joinid, {cols}"
            try:
                return con.execute(
                    f"SELECT {sel} FROM wanted w JOIN cells c USING (soma_joinid) ORDER BY w._pos"
                ).df()
            except duckdb.Error as exc:
                raise InputError(f"could not read cell metadata: {exc}") from exc
