"""The life cycle of an atlas store after ingest: list its datasets, remove some, relabel one's cell metadata.

Every write takes the store lock (:meth:`atlas.store_writer.StoreWriter.open`, which also deletes DuckDB rows of
datasets that ``store.json`` does not hold) and writes ``store.json``, the commit point, before the DuckDB tables:

* :func:`remove_datasets` commits ``store.json`` without the datasets, then deletes their ``cells`` and
  ``datasets`` rows in one transaction. Their cell ids are never reused (the high-water marks stay) and their
  expression values stay in the TileDB-SOMA experiment as an unused range: space is not reclaimed. Interrupted
  between the two steps, the next writer deletes the rows.
* :func:`relabel_dataset` bumps the dataset's ``obs_revision`` in ``store.json``, then copies obs columns onto
  others (``SOURCE=TARGET``, e.g. a forgotten ``--obs-map celltype=cell_type``) in one transaction, clearing or
  refilling (``--ontology-map``) the Cell Ontology terms of a relabelled column. Interrupted between the two
  steps, the store holds the old labels under a new revision: rerun the relabel.
* :func:`list_datasets` reads what a store holds: per dataset its ids, genes, X kind, provenance, revision and
  label columns with their most frequent values.

Names from the user or the data reach SQL only quoted (:func:`atlas.sql.quote_ident`), values only as parameters;
error messages show names escaped (:func:`atlas.validate.escaped`) and never data values.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import InputError, StoreError
from scatlas.atlas.ontology_map import MAX_REPORTED, OntologyFill, ontology_table, term_column
from scatlas.atlas.schema import STANDARD_OBS_COLUMNS
from scatlas.atlas.sql import duckdb_interrupts, quote_ident, transaction
from scatlas.atlas.store import CELLS_DB, STATE_FILE, AtlasStore, DatasetRecord
from scatlas.atlas.store_writer import StoreWriter
from scatlas.atlas.validate import check_name, escaped

logger = logging.getLogger(__name__)

__all__ = [
    "FIXED_COLUMNS", "DatasetSummary", "LabelColumn", "RelabelReport", "RelabelledColumn", "RemoveReport",
    "StoreListing", "list_datasets", "relabel_dataset", "remove_datasets",
]

FIXED_COLUMNS = ("soma_joinid", "dataset_id", "obs_id", "is_primary_data")
"""Columns relabel never writes: they identify cells or decide at ingest which cells are kept."""
MAX_LABEL_VALUES = 1000
"""A label column of a dataset holds text with 2 to this many distinct values."""
TOP_LABEL_VALUES = 10
"""Values listed per label column by :func:`list_datasets`."""
TOP_TARGET_VALUES = 20
"""Values listed per relabelled column by :func:`relabel_dataset`."""
_TERM_SUFFIX = term_column("")
KEPT_COLUMN = re.compile(r"_rev\d+(_\d+)?$")
"""What a relabel names the columns keeping the values it replaced (``TARGET_revN``, ``TARGET_revN_2``...): an
archive, not an annotation of its own (left out of the label columns a build picks by itself)."""


def _unknown_dataset(path: Path, dataset_id: str, known: Iterable[str] = ()) -> InputError:
    """The refusal of an id the store does not hold; naming the one it does hold when they differ in case or
    surrounding blanks only (ingest treats those as one id)."""
    near = [k for k in known if k.strip().casefold() == dataset_id.strip().casefold()]
    hint = f" (ids are exact here: did you mean {escaped(near[0])}?)" if near else ""
    return InputError(f"{path}: no dataset {escaped(dataset_id)} in this atlas store{hint}; list its datasets with "
                      f"`scatlas datasets --atlas {path}`")


def check_datasets_exist(atlas: str | Path, dataset_ids: Iterable[str]) -> None:
    """InputError naming the first of ``dataset_ids`` the store at ``atlas`` does not hold (before a command that
    works through several changes any)."""
    store = AtlasStore.open(atlas)
    known = [d.dataset_id for d in store.datasets]
    for dataset_id in dataset_ids:
        if dataset_id not in known:
            raise _unknown_dataset(store.path, dataset_id, known)


def _open_store(atlas: str | Path) -> Path:
    """``atlas`` as a path once it holds a committed store (StoreError otherwise, before any lock file is made)."""
    path = Path(atlas)
    AtlasStore.open(path)
    return path


def _value_counts(con: duckdb.DuckDBPyConnection, column: str, where: str, params: list[Any],
                  limit: int) -> list[tuple[str | None, int]]:
    """The ``limit`` most frequent values of ``column`` (as text; None for NULL) in the rows ``where`` selects."""
    col = quote_ident(column)
    rows = con.execute(
        f"SELECT CAST({col} AS VARCHAR) AS v, count(*) AS n FROM cells WHERE {where} "
        "GROUP BY v ORDER BY n DESC, v NULLS LAST LIMIT ?", [*params, limit]
    ).fetchall()
    return [(v, int(n)) for v, n in rows]


# -- remove -----------------------------------------------------------------------------------------------------------


@dataclass
class RemoveReport:
    """What :func:`remove_datasets` did: the datasets removed (``(dataset_id, n_cells, start, stop)``), those
    an interrupted earlier remove had left half done (finished now), and what the store holds afterwards.
    ``n_unused_ids``: cell ids below the high-water mark that no dataset owns (removed or failed ingests): never
    reused, their expression values still on disk."""

    atlas: str
    removed: list[tuple[str, int, int, int]] = field(default_factory=list)
    finished_earlier: list[str] = field(default_factory=list)
    n_datasets: int = 0
    n_cells: int = 0
    obs_high_water: int = 0
    n_unused_ids: int = 0

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)


@duckdb_interrupts()  # a Ctrl-C that DuckDB reported as its own error is a KeyboardInterrupt again
def remove_datasets(atlas: str | Path, dataset_ids: Iterable[str]) -> RemoveReport:
    """Remove datasets from the atlas store at ``atlas``: ``store.json`` is committed without them first, then
    their ``cells`` and ``datasets`` rows are deleted in one DuckDB transaction (an interruption between the two
    is finished by the next writer, or by rerunning the remove).

    Cell ids are never reused: the high-water marks stay, a later ingest gets ids beyond them. The removed cells'
    expression values stay in the TileDB-SOMA experiment as an unused range (space is not reclaimed); genes they
    added stay in the gene vocabulary. Removing every dataset leaves an empty store. InputError for an id the store
    does not hold (the datasets are listed by :func:`list_datasets`).
    """
    wanted = list(dict.fromkeys(str(d) for d in dataset_ids))
    if not wanted:
        raise InputError("name at least one dataset to remove (--dataset ID)")
    path = _open_store(atlas)
    report = RemoveReport(atlas=str(path))
    with StoreWriter.open(path, create=False) as writer:
        known = {d.dataset_id: d for d in writer.state.datasets}
        for dataset_id in wanted:
            if dataset_id not in known and dataset_id not in writer.cleaned_datasets:
                raise _unknown_dataset(path, dataset_id, known)
        report.finished_earlier = [d for d in wanted if d not in known]
        gone = [known[d] for d in wanted if d in known]
        if gone:
            drop = set(wanted)
            writer.state.datasets = [d for d in writer.state.datasets if d.dataset_id not in drop]
            write_json_atomic(path / STATE_FILE, writer.state.to_json())  # the commit point
            try:
                writer.delete_uncommitted_rows()
            except (OSError, duckdb.Error, StoreError) as exc:
                names = ", ".join(escaped(d.dataset_id, 60) for d in gone)
                raise StoreError(
                    f"{names}: removed from {path} (no command sees their cells any more), but deleting their rows "
                    f"failed ({_os_reason(exc)}); free space or fix the cause, then rerun "
                    "the same remove to finish"
                ) from exc
        report.removed = [(d.dataset_id, d.n_cells, d.start, d.stop) for d in gone]
        state = writer.state
        report.n_datasets = len(state.datasets)
        report.n_cells = sum(d.n_cells for d in state.datasets)
        report.obs_high_water = state.obs_high_water
        report.n_unused_ids = state.obs_high_water - report.n_cells
    logger.info("%s: removed %d dataset(s), %d cells; %d datasets left", path, len(gone),
                sum(d.n_cells for d in gone), report.n_datasets)
    return report


def _os_reason(exc: BaseException) -> str:
    """The OS reason inside an error (disk full, read-only, permission), else its type: never the error's own text,
    which a database error may fill with values."""
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        if os.strerror(code) in text:
            return os.strerror(code)
    return type(exc).__name__


# -- relabel ----------------------------------------------------------------------------------------------------------


@dataclass
class RelabelledColumn:
    """One ``SOURCE=TARGET`` pair of a relabel: the stored column read (``stored_source``: ``source`` itself, or
    the name ingest stored it under), how many cells changed value, the most frequent values of ``target``
    afterwards (``(value, cells)``; None for missing), and what happened to its Cell Ontology term column:
    ``terms`` is ``"cleared"``, ``"refilled"`` (from the ontology map; ``ontology`` says how, see
    :meth:`atlas.ontology_map.OntologyFill.report`) or None (no term column). ``kept_as`` / ``kept_terms_as``: the
    columns that keep the values (and terms) ``target`` held before (``TARGET_revN``, N the revision they were
    written at), None when it held none."""

    source: str
    stored_source: str
    target: str
    n_changed: int = 0
    n_values: int = 0
    values: list[tuple[str | None, int]] = field(default_factory=list)
    term_column: str | None = None
    terms: str | None = None
    ontology: dict[str, Any] | None = None
    kept_as: str | None = None
    kept_terms_as: str | None = None


@dataclass
class RelabelReport:
    """What :func:`relabel_dataset` did to one dataset: its new ``obs_revision`` and each pair's outcome."""

    atlas: str
    dataset_id: str
    n_cells: int
    obs_revision: int
    columns: list[RelabelledColumn] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)


def _stored_source(name: str, record: DatasetRecord, table: Mapping[str, str]) -> str:
    """The cells-table column holding obs column ``name`` of the dataset (its stored name when ingest renamed it);
    InputError when the dataset has no such column."""
    own = [*STANDARD_OBS_COLUMNS, *record.obs_columns]
    wanted = name if name in own else record.renamed_columns.get(name, name)
    hit = next((c for c in own if c.casefold() == wanted.casefold() and c.casefold() in table), None)
    if hit is None:
        shown = ", ".join(escaped(c, 40) for c in own[:30]) + (", ..." if len(own) > 30 else "")
        raise InputError(f"--obs-map {escaped(name)}=...: dataset {escaped(record.dataset_id)} has no obs column "
                         f"{escaped(name)}; its columns: {shown}")
    return table[hit.casefold()]


def _stored_target(name: str, table: Mapping[str, str]) -> str:
    """The cells-table column ``name`` names; InputError for a fixed column or one the table lacks."""
    if name.casefold() in {c.casefold() for c in FIXED_COLUMNS}:
        raise InputError(f"--obs-map ...={escaped(name)}: {', '.join(FIXED_COLUMNS)} identify cells and are set by "
                         "ingest; they cannot be relabelled")
    if name.casefold() not in table:
        raise InputError(f"--obs-map ...={escaped(name)}: not a column of the store's cell table; relabel writes "
                         "columns the store has (the schema's, e.g. cell_type, or one ingested); to add a column, "
                         "re-ingest the dataset with --obs-map")
    return table[name.casefold()]


def _widened(have: str, want: str) -> str:
    """The column type holding values of both types without loss (as ingest widens): DOUBLE for numbers, else
    VARCHAR."""
    if have == want:
        return have
    return "DOUBLE" if {have, want} <= {"BIGINT", "DOUBLE", "INTEGER", "FLOAT"} else "VARCHAR"


def _plan_relabel(con: duckdb.DuckDBPyConnection, record: DatasetRecord,
                  pairs: Sequence[tuple[str, str]]) -> tuple[list[RelabelledColumn], dict[str, str]]:
    """The checked pairs (stored source and target names, term columns) and the column types of ``cells``."""
    types = {str(n): str(t) for n, t in con.execute("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall()}
    table = {n.casefold(): n for n in types}
    out: list[RelabelledColumn] = []
    for source, target in pairs:
        col = RelabelledColumn(source=source, stored_source=_stored_source(source, record, table),
                               target=_stored_target(target, table))
        if col.stored_source == col.target:
            raise InputError(f"--obs-map {escaped(source)}={escaped(target)}: the source is the target column; "
                             "nothing to relabel")
        if any(c.target == col.target for c in out):
            raise InputError(f"--obs-map: the column {escaped(col.target)} is the target of two pairs; keep one")
        out.append(col)
    targets = {c.target.casefold() for c in out}
    for col in out:
        term = term_column(col.target).casefold()
        if term in table and term not in targets:  # a term column written by a pair of its own is left to it
            col.term_column = table[term]
    return out, types


def _relabel_changes_nothing(con: duckdb.DuckDBPyConnection, dataset_id: str, columns: list[RelabelledColumn]) -> bool:
    """Whether every pair would write the values its target already holds (compared as text) and no term column
    holds a term to clear: then the relabel leaves the store alone (a new obs revision would make every index of
    it retrain its label heads on its next update for nothing)."""
    checks = [f"count(*) FILTER (WHERE CAST({quote_ident(c.target)} AS VARCHAR) IS DISTINCT FROM "
              f"CAST({quote_ident(c.stored_source)} AS VARCHAR))" for c in columns]
    checks += [f"count({quote_ident(c.term_column)})" for c in columns if c.term_column]
    row = con.execute(f"SELECT {', '.join(checks)} FROM cells WHERE dataset_id = ?", [dataset_id]).fetchone()
    return row is not None and not any(row)


def _name_kept_columns(con: duckdb.DuckDBPyConnection, dataset_id: str, columns: list[RelabelledColumn],
                       types: dict[str, str], revision: int) -> None:
    """Name the columns that will keep what each target (and its term column) holds for the dataset before the
    relabel replaces it: ``TARGET_revN`` (N: the obs revision those values belong to; a suffix where the name is
    taken), none where the dataset holds no value there. Nothing a relabel replaces is lost: ``--obs-map
    TARGET_revN=TARGET`` puts it back."""
    existing = {n.casefold(): n for n in types}
    taken: set[str] = set()
    held = con.execute(
        "SELECT " + ", ".join(f"count({quote_ident(c)})" for col in columns for c in (col.target, col.term_column)
                              if c) + " FROM cells WHERE dataset_id = ?", [dataset_id]).fetchone() or ()
    counts = iter(held)
    in_use = {n for c in columns for n in (c.target, c.stored_source)}  # this relabel's own columns: never reused

    def free(name: str, source: str) -> bool:
        """Whether ``name`` can keep ``source``'s values: not yet chosen, and new, or a column of the same type in
        which this dataset holds nothing (another dataset's kept values of the same revision: one column for all)."""
        if name.casefold() in taken:
            return False
        column = existing.get(name.casefold())
        if column is None:
            return True
        if types[column] != types[source] or column in in_use:
            return False
        row = con.execute(f"SELECT count({quote_ident(column)}) FROM cells WHERE dataset_id = ?",
                          [dataset_id]).fetchone()
        return row is not None and row[0] == 0

    def kept(column: str | None, base: str, terms: bool) -> str | None:
        """The name keeping ``column``'s values: ``base`` (``base_2``, ... where taken), or for a term column that
        name's term column; None when the dataset holds no value there."""
        if not column or not next(counts):
            return None
        k, label = 1, base
        while not free(name := term_column(label) if terms else label, column):
            k += 1
            label = f"{base}_{k}"
        taken.add(name.casefold())
        return check_name(existing.get(name.casefold(), name), "relabel's column of the replaced values")

    for col in columns:
        base = f"{col.target}_rev{revision}"
        col.kept_as = kept(col.target, base, terms=False)
        col.kept_terms_as = kept(col.term_column, base, terms=True)


def _keep_replaced(con: duckdb.DuckDBPyConnection, dataset_id: str, columns: list[RelabelledColumn],
                   types: dict[str, str]) -> None:
    """Copy what the targets (and their term columns) hold for the dataset into the columns named by
    :func:`_name_kept_columns`, created (with the source column's type) where the table lacks them."""
    for col in columns:
        for source, kept in ((col.target, col.kept_as), (col.term_column, col.kept_terms_as)):
            if not source or not kept:
                continue
            if kept.casefold() not in {n.casefold() for n in types}:
                con.execute(f"ALTER TABLE cells ADD COLUMN {quote_ident(kept)} {types[source]}")
                types[kept] = types[source]
            con.execute(f"UPDATE cells SET {quote_ident(kept)} = {quote_ident(source)} WHERE dataset_id = ?",
                        [dataset_id])


def _apply_relabel(con: duckdb.DuckDBPyConnection, dataset_id: str, columns: list[RelabelledColumn],
                   types: dict[str, str], terms: Mapping[str, str] | None) -> None:
    """The relabel's DuckDB transaction: widen target types where needed, count the changed cells, copy every
    pair at once (``SET t1 = s1, t2 = s2``: a swap swaps), clear the targets' term columns and refill them from
    ``terms`` when given."""
    sets: list[str] = []
    differs: list[str] = []
    for col in columns:
        have, src = types[col.target], types[col.stored_source]
        kind = "VARCHAR" if have == "VARCHAR" else _widened(have, src)
        if kind != have:
            con.execute(f"ALTER TABLE cells ALTER COLUMN {quote_ident(col.target)} TYPE {kind}")
            logger.warning("relabel: column %s now holds %s values (it held %s)", escaped(col.target), kind, have)
        value = f"CAST({quote_ident(col.stored_source)} AS {kind})"
        sets.append(f"{quote_ident(col.target)} = {value}")
        differs.append(f"count(*) FILTER (WHERE {quote_ident(col.target)} IS DISTINCT FROM {value})")
    changed = con.execute(f"SELECT {', '.join(differs)} FROM cells WHERE dataset_id = ?", [dataset_id]).fetchone()
    for col, n in zip(columns, changed or [0] * len(columns), strict=True):
        col.n_changed = int(n)
    sets += [f"{quote_ident(c.term_column)} = NULL" for c in columns if c.term_column]
    con.execute(f"UPDATE cells SET {', '.join(sets)} WHERE dataset_id = ?", [dataset_id])
    if terms is None:
        return
    con.register("relabel_terms", pa.table({"label": pa.array(list(terms), pa.string()),
                                            "term": pa.array(list(terms.values()), pa.string())}))
    for col in columns:
        if col.term_column:
            con.execute(
                f"UPDATE cells SET {quote_ident(col.term_column)} = m.term FROM relabel_terms AS m "
                f"WHERE cells.dataset_id = ? AND CAST(cells.{quote_ident(col.target)} AS VARCHAR) = m.label",
                [dataset_id],
            )


def _terms_report(con: duckdb.DuckDBPyConnection, dataset_id: str, col: RelabelledColumn,
                  table: Mapping[str, str], had: Mapping[str, int] | None = None) -> dict[str, Any]:
    """How the ontology map filled ``col``'s term column, per label (as :class:`OntologyFill` reports it).
    ``had``: per label, the cells that had a term before the fill (:func:`_term_counts` then); None: none had."""
    assert col.term_column is not None
    fill = OntologyFill(table, label_key=col.target)
    counts = _term_counts(con, dataset_id, col)
    for label, (n_with, n_missing) in counts.items():
        n_had = min(int(had.get(label, 0)), n_with) if had is not None else 0
        if n_had:
            fill.had[label] += n_had
        if n_with > n_had:
            fill.filled[label] += n_with - n_had
        if n_missing:
            fill.missing[label] += n_missing
    report = fill.report()
    if had is not None:  # a fill over terms the data may already have: say what the map could not change
        term = _term_value(col.term_column)
        rows = con.execute(
            f"SELECT CAST(cells.{quote_ident(col.target)} AS VARCHAR) AS v, count(*) FROM cells JOIN relabel_terms AS m "
            f"ON CAST(cells.{quote_ident(col.target)} AS VARCHAR) = m.label WHERE cells.dataset_id = ? AND {term} "
            f"IS NOT NULL AND {term} <> m.term GROUP BY v ORDER BY 2 DESC, 1", [dataset_id]).fetchall()
        report["conflicts"] = {str(v): int(n) for v, n in rows[:MAX_REPORTED]}
        report["n_conflicting_labels"] = len(rows)
        report["map_labels_unused"] = sum(1 for label in table if label not in counts)
    return report


def _term_counts(con: duckdb.DuckDBPyConnection, dataset_id: str, col: RelabelledColumn) -> dict[str, tuple[int, int]]:
    """Per label value of the dataset: (cells with a term, cells without one) in ``col``'s term column."""
    assert col.term_column is not None
    term = _term_value(col.term_column)
    rows = con.execute(
        f"SELECT CAST({quote_ident(col.target)} AS VARCHAR) AS v, count({term}), count(*) - count({term}) FROM cells "
        f"WHERE dataset_id = ? AND {quote_ident(col.target)} IS NOT NULL GROUP BY v", [dataset_id]
    ).fetchall()
    return {str(label): (int(n_with), int(n_missing)) for label, n_with, n_missing in rows}


def _term_value(column: str, table: str = "") -> str:
    """SQL for a term column's value, NULL when empty or blank (``table``: a qualifier, e.g. ``cells.``)."""
    return f"NULLIF(trim(CAST({table}{quote_ident(column)} AS VARCHAR)), '')"


@contextmanager
def _editing(path: Path, dataset_id: str) -> Iterator[tuple[StoreWriter, DatasetRecord, duckdb.DuckDBPyConnection]]:
    """The store's writer (locked), the record of dataset ``dataset_id`` (InputError when the store has none) and a
    connection to its cell table, closed when the block ends."""
    with StoreWriter.open(path, create=False) as writer:
        record = next((d for d in writer.state.datasets if d.dataset_id == dataset_id), None)
        if record is None:
            raise _unknown_dataset(path, dataset_id, [d.dataset_id for d in writer.state.datasets])
        con = duckdb.connect(str(path / CELLS_DB))
        try:
            yield writer, record, con
        finally:
            con.close()


def _terms_to_fill(con: duckdb.DuckDBPyConnection, dataset_id: str, label: str, term: str) -> int:
    """How many of the dataset's cells an ontology fill would give a term (their label is in the registered
    ``relabel_terms`` and their term is empty)."""
    row = con.execute(
        f"SELECT count(*) FROM cells JOIN relabel_terms AS m ON CAST(cells.{quote_ident(label)} AS VARCHAR) = m.label "
        f"WHERE cells.dataset_id = ? AND {_term_value(term, 'cells.')} IS NULL", [dataset_id]
    ).fetchone()
    return int(row[0]) if row else 0


def _fill_terms(path: Path, dataset_id: str, key: str, terms: Mapping[str, str]) -> RelabelReport:
    """:func:`relabel_dataset` with only an ontology map: fill ``key``'s empty terms of the dataset from ``terms``."""
    check_name(key, "--ontology-label-key")
    with _editing(path, dataset_id) as (writer, record, con):
        try:
            table = {str(n).casefold(): str(n) for (n,) in con.execute("SELECT column_name FROM (DESCRIBE cells)"
                                                                          ).fetchall()}
            label, term = table.get(key.casefold()), table.get(term_column(key).casefold())
            if label is None:
                raise InputError(f"--ontology-map: the store's cell table has no column {escaped(key)}; name the "
                                 "label column whose values the map's labels are with --ontology-label-key")
            term_exists = term is not None
            term = term or check_name(term_column(label), "--ontology-label-key's term column")
            col = RelabelledColumn(source=label, stored_source=label, target=label, term_column=term, terms="filled")
            con.register("relabel_terms", pa.table({"label": pa.array(list(terms), pa.string()),
                                                    "term": pa.array(list(terms.values()), pa.string())}))
            had = {v: n for v, (n, _) in _term_counts(con, dataset_id, col).items()} if term_exists else None
            if term_exists and not _terms_to_fill(con, dataset_id, label, term):
                # every label the map names already has its term: no new revision (an update would redo nothing)
                col.ontology = _terms_report(con, dataset_id, col, terms, had)
                col.values = _value_counts(con, label, "dataset_id = ?", [dataset_id], TOP_TARGET_VALUES)
                return RelabelReport(atlas=str(path), dataset_id=dataset_id, n_cells=record.n_cells,
                                     obs_revision=record.obs_revision, columns=[col])
            record.obs_revision += 1
            if term not in STANDARD_OBS_COLUMNS and term not in record.obs_columns:
                record.obs_columns.append(term)
            write_json_atomic(path / STATE_FILE, writer.state.to_json())  # the commit point of the new revision
            with transaction(con):
                if term.casefold() not in table:  # a label column without terms yet: its term column, as ingest adds
                    con.execute(f"ALTER TABLE cells ADD COLUMN {quote_ident(term)} VARCHAR")
                con.execute(
                    f"UPDATE cells SET {quote_ident(term)} = m.term FROM relabel_terms AS m WHERE cells.dataset_id = ? "
                    f"AND CAST(cells.{quote_ident(label)} AS VARCHAR) = m.label "
                    f"AND {_term_value(term, 'cells.')} IS NULL", [dataset_id])
            col.ontology = _terms_report(con, dataset_id, col, terms, had)
            col.values = _value_counts(con, label, "dataset_id = ?", [dataset_id], TOP_TARGET_VALUES)
        except duckdb.Error as exc:
            raise StoreError(
                f"{path}: the terms could not be stored ({type(exc).__name__}); the labels are unchanged. Check the "
                "disk and that no other process has the store's cells.duckdb open, then rerun"
            ) from exc
    logger.info("relabel %s: %s terms filled from the ontology map (obs revision %d)", dataset_id, key,
                record.obs_revision)
    return RelabelReport(atlas=str(path), dataset_id=dataset_id, n_cells=record.n_cells,
                         obs_revision=record.obs_revision, columns=[col])


@duckdb_interrupts()
def relabel_dataset(
    atlas: str | Path,
    dataset_id: str,
    obs_map: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    ontology_map: str | Path | Mapping[str, str] | None = None,
    ontology_label_key: str = "cell_type",
) -> RelabelReport:
    """Re-apply an obs mapping to the stored metadata of dataset ``dataset_id`` of the store at ``atlas``; or, with
    no ``obs_map`` but an ``ontology_map``, give the dataset's ``ontology_label_key`` values their Cell Ontology
    terms (its term column is filled where it is empty, as ingest's ``ontology_map`` does; terms the data has are
    kept).

    ``obs_map``: ``SOURCE -> TARGET`` pairs; each copies column SOURCE of the dataset's cells (a column the store
    keeps for it; an obs column ingest stored under another name is found by its original name too) onto column
    TARGET (one the store has: a schema column, whose type is kept, or an ingested one), as text for a text
    column. TARGET cannot be one of :data:`FIXED_COLUMNS`. All pairs apply at once. The dataset's terms in
    TARGET's Cell Ontology term column (``cell_type_ontology_term_id`` for ``cell_type``) described the old labels:
    they are cleared, or with ``ontology_map`` (a ``label,ontology_term_id`` CSV file or a ``{label: term}``
    mapping) refilled from it.

    ``store.json`` is written first with the dataset's ``obs_revision`` bumped (an index built before sees the
    change), then the cell table in one transaction; interrupted between the two, the old labels stay under the
    new revision: rerun the relabel. A relabel that would change no cell (every target already holds its source's
    values, no term to clear) writes nothing and keeps the revision.
    """
    pairs = list(obs_map.items()) if isinstance(obs_map, Mapping) else [(str(s), str(t)) for s, t in obs_map]
    if not pairs and ontology_map is None:
        raise InputError("give at least one --obs-map SOURCE=TARGET, or --ontology-map FILE.csv to give the "
                         "dataset's labels Cell Ontology terms")
    terms = None if ontology_map is None else ontology_table(ontology_map)
    path = _open_store(atlas)
    if not pairs:
        assert terms is not None
        return _fill_terms(path, dataset_id, ontology_label_key, terms)
    with _editing(path, dataset_id) as (writer, record, con):
        try:
            columns, types = _plan_relabel(con, record, pairs)
            if terms is not None and not any(c.term_column for c in columns):
                raise InputError("--ontology-map: no target has a Cell Ontology term column (TARGET_ontology_term_id) "
                                 "to fill; leave the map out")
            unchanged = terms is None and _relabel_changes_nothing(con, dataset_id, columns)
            if unchanged:  # no new revision: an index of the store has nothing to update
                logger.info("%s: relabelling dataset %s changes no cell: the store is left as it is", path,
                            escaped(dataset_id))
            else:
                _name_kept_columns(con, dataset_id, columns, types, record.obs_revision)
                record.obs_revision += 1
                record.obs_columns += [c.target for c in columns
                                       if c.target not in STANDARD_OBS_COLUMNS and c.target not in record.obs_columns]
                record.obs_columns += [k for c in columns for k in (c.kept_as, c.kept_terms_as)
                                       if k is not None and k not in record.obs_columns]
                write_json_atomic(path / STATE_FILE, writer.state.to_json())  # the commit point of the new revision
                with transaction(con):
                    _keep_replaced(con, dataset_id, columns, types)
                    _apply_relabel(con, dataset_id, columns, types, terms)
            report = RelabelReport(atlas=str(path), dataset_id=dataset_id, n_cells=record.n_cells,
                                   obs_revision=record.obs_revision, columns=columns)
            for col in columns:
                where, params = "dataset_id = ?", [dataset_id]
                col.values = _value_counts(con, col.target, where, params, TOP_TARGET_VALUES)
                row = con.execute(f"SELECT count(DISTINCT {quote_ident(col.target)}) FROM cells WHERE {where}",
                                  params).fetchone()
                col.n_values = int(row[0]) if row else 0
                if col.term_column and not unchanged:
                    col.terms = "cleared" if terms is None else "refilled"
                    if terms is not None:
                        col.ontology = _terms_report(con, dataset_id, col, terms)
        except duckdb.Error as exc:
            raise StoreError(
                f"{path}: the cell metadata could not be relabelled ({type(exc).__name__}); the labels are unchanged. "
                "Check the disk and that no other process has the store's cells.duckdb open, then rerun"
            ) from exc
    logger.info("%s: relabelled dataset %s (obs revision %d)", path, escaped(dataset_id), report.obs_revision)
    return report


# -- list -------------------------------------------------------------------------------------------------------------


@dataclass
class LabelColumn:
    """A label column of one dataset (text, 2 to :data:`MAX_LABEL_VALUES` distinct values): its distinct values
    and the :data:`TOP_LABEL_VALUES` most frequent ones with their cells."""

    name: str
    n_values: int
    top: list[tuple[str | None, int]] = field(default_factory=list)
    n_with_term: int | None = None
    """Cells with a Cell Ontology term in the column's term column (None: the store has no such column)."""


@dataclass
class DatasetSummary:
    """One committed dataset: its cells and id range ``[start, stop)``, genes (those of the dataset kept in the
    atlas vocabulary, and how many it added), how X was read, provenance, relabel revision, label columns."""

    dataset_id: str
    n_cells: int
    start: int
    stop: int
    n_genes: int | None
    n_genes_added: int | None
    x_kind: str
    x_source: str
    source: str
    source_format: str
    ingested_at: str
    obs_revision: int
    label_columns: list[LabelColumn] = field(default_factory=list)
    n_genes_measured: int | None = None  # fewer than n_genes where the source said which it measured (Census)


@dataclass
class StoreListing:
    """What an atlas store holds: its datasets, cells, genes of the vocabulary, and cell ids below the high-water
    mark that no dataset owns (``n_unused_ids``: removed datasets and failed ingests; never reused)."""

    atlas: str
    n_cells: int
    n_genes: int
    obs_high_water: int
    n_unused_ids: int
    datasets: list[DatasetSummary] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The listing as JSON-ready data."""
        return asdict(self)


def _text_columns(con: duckdb.DuckDBPyConnection) -> tuple[list[str], set[str]]:
    """Text columns of ``cells`` that may hold labels (not cell or dataset ids, not ontology term columns), and
    those of them whose term column the table has."""
    described = [(str(name), str(kind)) for name, kind in
                 con.execute("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall()]
    names = {name for name, _ in described}
    text = [name for name, kind in described
            if kind == "VARCHAR" and name not in FIXED_COLUMNS and not name.endswith(_TERM_SUFFIX)]
    return text, {name for name in text if term_column(name) in names}


def _label_columns(con: duckdb.DuckDBPyConnection, record: DatasetRecord, candidates: list[str],
                   with_terms: Collection[str] = ()) -> list[LabelColumn]:
    """The dataset's label columns (one scan for the distinct counts, one query per label column); for those of
    ``with_terms`` (the table has their term column), the cells with a term."""
    if not candidates:
        return []
    where, params = "soma_joinid >= ? AND soma_joinid < ?", [record.start, record.stop]
    row = con.execute(
        "SELECT " + ", ".join(f"count(DISTINCT {quote_ident(c)})" for c in candidates) + f" FROM cells WHERE {where}",
        params,
    ).fetchone()
    distinct = [int(n) for n in (row or [0] * len(candidates))]
    out = []
    for c, n in zip(candidates, distinct, strict=True):
        if not 2 <= n <= MAX_LABEL_VALUES:
            continue
        col = LabelColumn(name=c, n_values=n, top=_value_counts(con, c, where, params, TOP_LABEL_VALUES))
        if c in with_terms:
            got = con.execute(f"SELECT count(*) FILTER (WHERE trim({quote_ident(term_column(c))}) <> '') FROM cells "
                              f"WHERE {where}", params).fetchone()
            col.n_with_term = int(got[0]) if got else 0
        out.append(col)
    return out


def list_datasets(atlas: str | Path) -> StoreListing:
    """What the atlas store at ``atlas`` holds, dataset by dataset (read-only; no lock taken)."""
    store = AtlasStore.open(atlas)
    with store:
        store.check_arrays()  # the recorded ids against the arrays' shape (damage found here, not shown as cells)
    state = store.state
    listing = StoreListing(atlas=str(store.path), n_cells=store.n_cells,
                           n_genes=int(sum(1 for k in store.genes.keys if k)), obs_high_water=state.obs_high_water,
                           n_unused_ids=state.obs_high_water - store.n_cells)
    if not state.datasets:
        return listing
    with store.connect() as con:
        candidates, with_terms = _text_columns(con)
        for rec in store.cell_ranges_records():
            g = rec.genes
            listing.datasets.append(DatasetSummary(
                dataset_id=rec.dataset_id, n_cells=rec.n_cells, start=rec.start, stop=rec.stop,
                n_genes=int(g["n_existing"]) + int(g["n_new"]) if "n_new" in g else None,
                n_genes_added=int(g["n_new"]) if "n_new" in g else None, x_kind=rec.x_kind, x_source=rec.x_source,
                source=rec.source, source_format=rec.source_format, ingested_at=rec.ingested_at,
                obs_revision=rec.obs_revision, label_columns=_label_columns(con, rec, candidates, with_terms),
                n_genes_measured=int(g["n_measured"]) if "n_measured" in g else None,
            ))
    return listing
