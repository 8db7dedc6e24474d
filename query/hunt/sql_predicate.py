"""An SQL predicate (``cell_type = 'pDC' AND donor_id IN ('d1', 'd2')``) over a pandas cell table, run safely.

The predicate is checked by :func:`scatlas.index.validate_predicate`, the same whitelist of DuckDB's syntax tree
that ``--where`` and ``--positive-sql`` go through, against the frame's columns. The statement that was checked
then runs on a private in-memory DuckDB connection (file access and extension loading off, configuration locked)
where the frame is the only table, ``cells``, with the row positions as ``soma_joinid``. Column names with
spaces or capitals are written in double quotes (``"cell type" = 'a'``); strings take single quotes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.validate import escaped_list
from scatlas.index import failure_reason, validate_predicate

logger = logging.getLogger(__name__)

ROW_COLUMN = "soma_joinid"
"""The name the row positions take in the table (the column the checked statement selects)."""
EXAMPLE = "cell_type = 'pDC'"
_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}



class PredicateFailed(InputError):
    """An allowed predicate that failed on the data (e.g. a number compared with text)."""


def sql_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s columns as DuckDB reads them well (plain values, names as text), led by the row positions.

    Categories become their values; object columns become text, numbers or booleans by what they hold. A column
    named ``soma_joinid`` and later columns whose names differ only in case are left out (logged).
    """
    out: dict[str, Any] = {ROW_COLUMN: np.arange(len(frame), dtype=np.int64)}
    seen = {ROW_COLUMN}
    for name, series in frame.items():
        key = str(name)
        if key.lower() in seen:
            logger.warning("column %r is left out of the predicate's table (its name is taken)", key[:80])
            continue
        seen.add(key.lower())
        out[key] = _plain(series.reset_index(drop=True))
    return pd.DataFrame(out)


def _refuse_ambiguous(frame: pd.DataFrame, read: tuple[str, ...], what: str) -> None:
    """InputError when a column the predicate reads has twins in ``frame`` differing only in case: SQL names are
    case-insensitive, so the predicate cannot say which it means (the table keeps the first, :func:`sql_table`)."""
    names = [str(c) for c in frame.columns]
    for column in read:
        twins = [n for n in names if n.lower() == column.lower()]
        if len(twins) > 1:
            raise InputError(
                f"the {what} reads a column that the cells have under {len(twins)} names differing only in case "
                f"({escaped_list(twins, 5)}), which SQL does not tell apart: rename one (adata.obs.rename(columns="
                "...)) and run again"
            )


def _plain(series: pd.Series) -> pd.Series:
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object).where(series.notna(), None)
    if series.dtype != object:
        return series
    kind = pd.api.types.infer_dtype(series, skipna=True)
    if kind == "boolean":
        return series.astype("boolean")
    if kind in ("integer", "floating", "mixed-integer-float", "decimal"):
        return pd.to_numeric(series, errors="coerce")
    return series.astype("string")


def evaluate_sql_predicate(frame: pd.DataFrame, predicate: str, *, what: str = "positive predicate",
                           negate: bool = False) -> np.ndarray:
    """Boolean mask (numpy, one per row of ``frame``) of the rows where the SQL ``predicate`` is true (``negate``:
    false; a row where it is NULL is in neither).

    InputError when the predicate is not allowed (see :func:`scatlas.index.validate_predicate`);
    :class:`PredicateFailed` when it fails on the data (naming the error class, never the data). NULL never matches, as in SQL.
    """
    import duckdb

    table = sql_table(frame)
    con = duckdb.connect(":memory:", config=dict(_CONFIG))
    try:
        con.execute("SET lock_configuration=true")
        con.register("cells", table)
        types = {str(r[0]): str(r[1]) for r in con.execute("DESCRIBE cells").fetchall() if r[0] != ROW_COLUMN}
        checked = validate_predicate(predicate, types, what=what)
        _refuse_ambiguous(frame, checked.columns, what)
        try:
            rows = con.execute(checked.negated_sql if negate else checked.sql).fetchnumpy()[ROW_COLUMN]
        except duckdb.Error as exc:
            raise PredicateFailed(
                f"the {what} {_shown(checked.text)} failed on the cells ({type(exc).__name__}: {failure_reason(exc)}); "
                f"compare each column with values of its type, e.g. \"{EXAMPLE}\""
            ) from None
    finally:
        con.close()
    mask = np.zeros(len(frame), dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = True
    return mask


def _shown(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
