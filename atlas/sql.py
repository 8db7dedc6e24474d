"""SQL helpers: text built from names that come from data (always quoted, never spliced raw), and DuckDB
transactions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import duckdb


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (embedded quotes doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a single-quoted SQL string literal (embedded quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, *, commit: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB transaction on ``con`` around the ``with`` block: begun on entry, committed when the block ends
    normally, rolled back when it raises (a failed rollback is ignored; the block's exception goes on).

    ``commit=False``: the block commits itself (e.g. :meth:`atlas.store_writer.StoreWriter.commit`, which commits at its
    own commit point); the transaction is then only rolled back on error.
    """
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        if commit:
            con.execute("COMMIT")
    except BaseException:
        with suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
