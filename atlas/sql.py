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


_INTERRUPT_TEXTS = ("Query interrupted", "INTERRUPT Error")
"""How DuckDB words the exception it raises for a query it stopped (a Ctrl-C arrived while it ran)."""


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling (``__cause__`` / ``__context__``), an interrupt: a
    KeyboardInterrupt, or DuckDB's stand-in for one (``duckdb.InterruptException``, or the RuntimeError ``Query
    interrupted`` of ``register``), which DuckDB raises when a SIGINT arrives during one of its calls."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt | duckdb.InterruptException):
            return True
        if isinstance(e, RuntimeError | duckdb.Error) and any(t in str(e) for t in _INTERRUPT_TEXTS):
            return True
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


@contextmanager
def duckdb_interrupts() -> Iterator[None]:
    """Around code that calls DuckDB: an exception caused by a Ctrl-C (:func:`is_interrupt`; DuckDB turns a
    pending KeyboardInterrupt into an exception of its own, or a later call fails on the transaction it aborted) is
    raised as the KeyboardInterrupt it stands for, so that callers treat it as one (the CLI: ``Interrupted``, exit
    130). Other exceptions go on unchanged. Usable as a decorator."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if is_interrupt(exc):
            raise KeyboardInterrupt from exc
        raise
