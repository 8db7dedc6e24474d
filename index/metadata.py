"""The index's copy of the cell metadata (``cells.duckdb``): writing it, SQL filters to ids, and id lookups."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlas.errors import IndexFormatError, InputError

logger = logging.getLogger(__name__)

ID_COLUMN = "soma_joinid"
CELLS_TABLE = "cells"

CellsInput = str | Path | Any  # a DuckDB file with a `cells` table, or a pyarrow.Table / pandas.DataFrame


def write_cells_db(target: Path, cells: CellsInput | None, ids: np.ndarray | None = None) -> None:
    """Write ``target`` (via a temporary file and rename) with a ``cells`` table sorted by ``soma_joinid``.

    ``cells`` is a DuckDB file path with a ``cells`` table, or a pyarrow Table / pandas DataFrame with a
    ``soma_joinid`` column; ``None`` writes a table of just the indexed ``ids``.
    """
    import duckdb
    import pyarrow as pa

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        if cells is None:
            if ids is None:
                raise InputError("write_cells_db needs cell metadata or the indexed ids")
            source_sql = "_ids"
            con.register("_ids", pa.table({ID_COLUMN: np.asarray(ids, dtype=np.int64)}))
        elif isinstance(cells, str | Path):
            path = Path(cells)
            if not path.is_file():
                raise InputError(f"cell metadata database {path} does not exist; pass the atlas' cells.duckdb")
            con.execute(f"ATTACH '{_sql_str(str(path))}' AS src (READ_ONLY)")
            source_sql = f"src.{CELLS_TABLE}"
        else:
            table = pa.Table.from_pandas(cells, preserve_index=False) if isinstance(cells, pd.DataFrame) else cells
            con.register("_cells", table)
            source_sql = "_cells"
        try:
            columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source_sql}").fetchall()]
        except duckdb.Error as exc:
            raise InputError(f"cannot read a `{CELLS_TABLE}` table from {cells!r}: {_first_line(exc)}") from exc
        if ID_COLUMN not in columns:
            raise InputError(f"the cell metadata has no {ID_COLUMN!r} column (columns: {', '.join(columns)})")
        con.execute(f"CREATE TABLE {CELLS_TABLE} AS SELECT * FROM {source_sql} ORDER BY {ID_COLUMN}")
        n = con.execute(f"SELECT count(*) FROM {CELLS_TABLE}").fetchone()
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, target)
    logger.info("wrote %s: %s cells, %d columns", target, n[0] if n else "?", len(columns))


def connect(path: Path) -> Any:
    import duckdb

    if not path.is_file():
        raise IndexFormatError(f"{path} is missing: the index is incomplete; rebuild it")
    return duckdb.connect(str(path), read_only=True)


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def columns_of(con: Any) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {CELLS_TABLE}").fetchall()]


def where_ids(con: Any, predicate: str, *, allow_empty: bool = False, what: str = "where filter") -> np.ndarray:
    """Sorted unique ids of the cells matching an SQL predicate.

    InputError when the predicate is empty or invalid (naming the columns of the cells table) and, unless
    ``allow_empty``, when it matches no cell. ``what`` names the predicate in messages.
    """
    import duckdb

    predicate = (predicate or "").strip()
    if not predicate:
        raise InputError(f"the {what} is empty; pass an SQL predicate such as \"tissue = 'lung'\"")
    if ";" in predicate:
        raise InputError(f"the {what} {predicate!r} must be one SQL predicate (no ';')")
    sql = f"SELECT DISTINCT {ID_COLUMN} FROM {CELLS_TABLE} WHERE ({predicate}) ORDER BY {ID_COLUMN}"
    try:
        ids = con.execute(sql).fetchnumpy()[ID_COLUMN]
    except duckdb.Error as exc:
        raise InputError(
            f"invalid {what} {predicate!r}: {_first_line(exc)}. Columns of the cells table: "
            f"{', '.join(columns_of(con))}"
        ) from exc
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 and not allow_empty:
        raise InputError(f"the {what} {predicate!r} matches no cell of the index; relax it")
    return ids


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
        select = ", ".join([f"q.{ID_COLUMN}"] + [f'c."{c}"' for c in wanted])
        df = con.execute(
            f"SELECT {select} FROM {name} q LEFT JOIN {CELLS_TABLE} c ON q.{ID_COLUMN} = c.{ID_COLUMN} "
            "ORDER BY q._pos"
        ).df()
    finally:
        con.unregister(name)
    return df


def _sql_str(value: str) -> str:
    return value.replace("'", "''")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
