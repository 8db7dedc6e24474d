"""The index's copy of the cell metadata (``cells.duckdb``): writing it, SQL filters to ids, and id lookups.

User SQL predicates reach the cells table only through :func:`where_ids`, which runs them as checked by
:func:`index.predicate.validate_predicate`; :func:`connect` also turns off file access and extension loading on
the index's connection (defence in depth).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.errors import IndexFormatError, InputError, StoreError
from scatlas.atlas.sql import quote_ident
from scatlas.index.predicate import CELLS_TABLE, ID_COLUMN, describe_columns, shown, validate_predicate

logger = logging.getLogger(__name__)

__all__ = ["CELLS_TABLE", "ID_COLUMN", "CellsFile", "cells_frame", "columns_of", "connect", "value_counts",
           "where_ids", "write_cells_db"]

CellsInput = str | Path | Any  # a DuckDB file with a `cells` table, a CellsFile, or a pyarrow.Table / pandas.DataFrame

_LOCKDOWN = (
    "SET enable_external_access=false",
    "SET autoinstall_known_extensions=false",
    "SET autoload_known_extensions=false",
    "SET lock_configuration=true",
)


@dataclass(frozen=True)
class CellsFile:
    """A DuckDB file's ``cells`` table, restricted to ``ranges`` of ids when given.

    ``ranges``: ``[start, stop)`` soma_joinid pairs to copy (an atlas store's committed datasets), or None for all.
    """

    path: Path
    ranges: tuple[tuple[int, int], ...] | None = None


def write_cells_db(
    target: Path,
    cells: CellsInput | None,
    ids: np.ndarray | None = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    expect: int | None = None,
) -> int:
    """Write ``target`` (via a temporary file and rename) with a ``cells`` table sorted by ``soma_joinid``; returns its
    rows.

    ``cells`` is a DuckDB file path with a ``cells`` table (or a :class:`CellsFile`), or a pyarrow Table / pandas
    DataFrame with a ``soma_joinid`` column; ``None`` writes a table of just the indexed ``ids``. ``ranges``:
    ``[start, stop)`` id pairs; only rows inside them are copied (e.g. an atlas store's committed datasets, so rows
    of an ingest still in progress never reach the index); None copies every row. ``expect``: the rows there must be
    (the cells indexed): another count (the store changed while it was read) is a StoreError and nothing is written.
    """
    import duckdb

    if isinstance(cells, CellsFile):
        if ranges is not None:
            raise InputError("write_cells_db: give the id ranges either in the CellsFile or as ranges=, not both")
        ranges = cells.ranges
        cells = cells.path
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        source_sql = _cells_source(con, cells, ids)
        try:
            columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source_sql}").fetchall()]
        except duckdb.Error as exc:
            raise InputError(
                f"cannot read a `{CELLS_TABLE}` table from {_describe_input(cells)} ({type(exc).__name__}); pass "
                "the atlas' cells.duckdb or a table with a soma_joinid column"
            ) from exc
        if ID_COLUMN not in columns:
            raise InputError(f"the cell metadata has no {ID_COLUMN!r} column (columns: {', '.join(columns)})")
        select = f"SELECT * FROM {source_sql}"
        if ranges is not None:
            con.register("_ranges", _ranges_table(ranges))
            select = (
                f"SELECT s.* FROM {source_sql} s JOIN _ranges r "
                f"ON s.{ID_COLUMN} >= r.start AND s.{ID_COLUMN} < r.stop"
            )
        con.execute(f"CREATE TABLE {CELLS_TABLE} AS {select} ORDER BY {ID_COLUMN}")
        n = int(con.execute(f"SELECT count(*) FROM {CELLS_TABLE}").fetchall()[0][0])
        con.execute("CHECKPOINT")
    finally:
        con.close()
    if expect is not None and n != expect:
        tmp.unlink(missing_ok=True)
        raise StoreError(
            f"the atlas' cell table holds {n} of the {expect} cells indexed: the store changed while the index was "
            "built (a dataset removed or added meanwhile?); rerun the build, which says what changed"
        )
    os.replace(tmp, target)
    logger.info("wrote %s: %d cells, %d columns", target, n, len(columns))
    return n


def _cells_source(con: Any, cells: CellsInput | None, ids: np.ndarray | None) -> str:
    """Make ``cells`` readable on ``con`` (attached read-only or registered); return the SQL name to read it by."""
    import pyarrow as pa

    if cells is None:
        if ids is None:
            raise InputError("write_cells_db needs cell metadata or the indexed ids")
        con.register("_ids", pa.table({ID_COLUMN: np.asarray(ids, dtype=np.int64)}))
        return "_ids"
    if isinstance(cells, str | Path):
        path = Path(cells)
        if not path.is_file():
            raise InputError(f"cell metadata database {path} does not exist; pass the atlas' cells.duckdb")
        con.execute("ATTACH ? AS src (READ_ONLY)", [str(path)])  # the path as a parameter, never spliced
        return f"src.{CELLS_TABLE}"
    table = pa.Table.from_pandas(cells, preserve_index=False) if isinstance(cells, pd.DataFrame) else cells
    con.register("_cells", table)
    return "_cells"


def _describe_input(cells: CellsInput | None) -> str:
    return str(cells) if isinstance(cells, str | Path) else f"a {type(cells).__name__}"


def _ranges_table(ranges: Sequence[tuple[int, int]]) -> Any:
    """``ranges`` as a pyarrow table ``start, stop``, sorted, overlapping and touching ranges merged."""
    import pyarrow as pa

    merged: list[list[int]] = []
    for pair in sorted((int(a), int(b)) for a, b in ranges):
        start, stop = pair
        if stop < start:
            raise InputError(f"id range [{start}, {stop}) ends before it starts; ranges are [start, stop) pairs")
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return pa.table({
        "start": pa.array([a for a, _ in merged], pa.int64()),
        "stop": pa.array([b for _, b in merged], pa.int64()),
    })


def connect(path: Path) -> Any:
    """A read-only DuckDB connection to an index's ``cells.duckdb``, with file access and extensions locked off.

    The settings are instance-wide (a second connection to the same file in this process shares them), so
    they are applied once after opening rather than passed as a config DuckDB would see as a conflict. Tables
    registered with ``con.register`` still work; reading files (``read_csv``, ``COPY``, ``ATTACH``) does not.
    """
    import duckdb

    if not path.is_file():
        raise IndexFormatError(f"{path} is missing: the index is incomplete; rebuild it")
    con = duckdb.connect(str(path), read_only=True)
    try:
        _lock_down(con, path)
    except BaseException:
        con.close()
        raise
    return con


def _lock_down(con: Any, path: Path) -> None:
    """Turn off file access and extension loading on ``con``'s database and lock its configuration."""
    row = con.execute(
        "SELECT current_setting('lock_configuration'), current_setting('enable_external_access'), "
        "current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
    ).fetchall()[0]
    locked, *open_doors = row
    if not locked:
        for statement in _LOCKDOWN:
            con.execute(statement)
    elif any(open_doors):
        raise IndexFormatError(
            f"{path} is already open in this process with file access or extension loading on and its "
            "configuration locked; close the other connection to it and open the index again"
        )


def columns_of(con: Any) -> list[str]:
    """Column names of the cells table."""
    return [r[0] for r in con.execute(f"DESCRIBE {CELLS_TABLE}").fetchall()]


def column_types(con: Any) -> dict[str, str]:
    """Column names -> DuckDB types of the cells table."""
    return {r[0]: str(r[1]) for r in con.execute(f"DESCRIBE {CELLS_TABLE}").fetchall()}


def where_ids(
    con: Any, predicate: str, *, allow_empty: bool = False, what: str = "where filter", negate: bool = False,
    among: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted unique ids of the cells matching a user SQL predicate.

    The predicate is checked by :func:`index.predicate.validate_predicate` and the statement checked is what
    runs. InputError when it is empty, invalid or not allowed (naming the columns of the cells table), when it
    fails on the data (naming the error class, never the data), and, unless ``allow_empty``, when it matches no
    cell. ``what`` names the predicate in messages. ``negate``: the cells where it is false instead (not where it
    is NULL: a cell without the value is neither); ``among``: only these ids are looked at.
    """
    import duckdb
    import pyarrow as pa

    columns = column_types(con)
    checked = validate_predicate(predicate, columns, what=what)
    sql = checked.negated_sql if negate else checked.sql
    try:
        if among is not None:
            con.register("_among_ids", pa.table({ID_COLUMN: np.asarray(among, dtype=np.int64)}))
            try:
                sql = f"SELECT {ID_COLUMN} FROM ({sql}) AS m WHERE {ID_COLUMN} IN (SELECT {ID_COLUMN} FROM _among_ids)"
                ids = con.execute(sql).fetchnumpy()[ID_COLUMN]
            finally:
                con.unregister("_among_ids")
        else:
            ids = con.execute(sql).fetchnumpy()[ID_COLUMN]
    except duckdb.Error as exc:
        raise InputError(
            f"the {what} {shown(checked.text)} failed on the cells table ({type(exc).__name__}: "
            f"{failure_reason(exc)}). Compare each column with values of its type; columns of the cells table: "
            f"{describe_columns(columns)}"
        ) from None
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0 and not allow_empty:
        raise InputError(f"the {what} {shown(checked.text)} matches no cell of the index; relax it")
    return ids


def failure_reason(exc: BaseException) -> str:
    """A generic reason for a DuckDB error, from its class only (its message can quote cell values)."""
    import duckdb

    reasons: list[tuple[type[BaseException], str]] = [
        (duckdb.ConversionException, "a value could not be converted to the type it is compared or cast to"),
        (duckdb.OutOfRangeException, "a number is out of range"),
        (duckdb.BinderException, "the types of an operator's or function's arguments do not fit together"),
        (duckdb.OutOfMemoryException, "it ran out of memory"),
        (duckdb.InvalidInputException, "a function got invalid input"),
        (duckdb.PermissionException, "it tried to reach something outside the cells table"),
    ]
    for cls, reason in reasons:
        if isinstance(exc, cls):
            return reason
    return "it could not be evaluated"


def value_counts(con: Any, column: str, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(values, counts)`` of the non-NULL values of ``column`` of the cells table.

    ``ids``: count only these cells (e.g. those a user predicate selected through :func:`where_ids`); they are
    joined as a registered table, never spliced into the SQL. InputError for an unknown column.
    """
    import pyarrow as pa

    available = columns_of(con)
    if column not in available:
        raise InputError(f"unknown cell column {column!r}; the cells table has: {', '.join(available)}")
    col = f"c.{quote_ident(column)}"
    if ids is None:
        res = con.execute(f"SELECT {col} AS v, count(*) AS n FROM {CELLS_TABLE} c WHERE {col} IS NOT NULL GROUP BY 1")
        out = res.fetchnumpy()
        return out["v"], np.asarray(out["n"], dtype=np.int64)
    name = f"_ids_{uuid.uuid4().hex[:8]}"
    con.register(name, pa.table({ID_COLUMN: np.unique(np.asarray(ids, dtype=np.int64))}))
    try:
        out = con.execute(
            f"SELECT {col} AS v, count(*) AS n FROM {CELLS_TABLE} c SEMI JOIN {name} q ON c.{ID_COLUMN} = q.{ID_COLUMN} "
            f"WHERE {col} IS NOT NULL GROUP BY 1"
        ).fetchnumpy()
    finally:
        con.unregister(name)
    return out["v"], np.asarray(out["n"], dtype=np.int64)


def cells_frame(con: Any, ids: np.ndarray, columns: list[str] | None = None) -> pd.DataFrame:
    """Metadata rows for ``ids`` in their order (any shape, flattened); unknown ids and -1 give NaN rows."""
    import pyarrow as pa

    flat = np.asarray(ids, dtype=np.int64).ravel()
    available = columns_of(con)
    if columns is None:
        wanted = [c for c in available if c != ID_COLUMN]
    else:
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise InputError(f"unknown cell columns {unknown}; the cells table has: {', '.join(available)}")
        wanted = [c for c in columns if c != ID_COLUMN]
    name = f"_ids_{uuid.uuid4().hex[:8]}"
    con.register(name, pa.table({"_pos": np.arange(len(flat), dtype=np.int64), ID_COLUMN: flat}))
    try:
        select = ", ".join([f"q.{ID_COLUMN}"] + [f"c.{quote_ident(c)}" for c in wanted])
        df = con.execute(
            f"SELECT {select} FROM {name} q LEFT JOIN {CELLS_TABLE} c ON q.{ID_COLUMN} = c.{ID_COLUMN} "
            "ORDER BY q._pos"
        ).df()
    finally:
        con.unregister(name)
    return df
