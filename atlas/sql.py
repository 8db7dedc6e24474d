"""SQL helpers: text built from names that come from data (always quoted, never spliced raw), and DuckDB
transactions."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any

import duckdb

from scatlas.atlas.errors import DUCKDB_LOCK_MARKERS


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (embedded quotes doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a single-quoted SQL string literal (embedded quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the database on ``con`` has a table ``name`` (tables added after a store's first version)."""
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [name]).fetchall()[0][0])


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
"""How DuckDB words the exception it raises for a query it stopped (a Ctrl-C arrived while it ran). A
KeyboardInterrupt raised inside one of its calls back into Python becomes other errors (``reading the schema of the
object registered as ... failed``): :class:`SigintWatch` tells those."""


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB refusing a database file another process has open: a busy store, not a damaged one."""
    return isinstance(exc, duckdb.Error) and any(marker in str(exc) for marker in DUCKDB_LOCK_MARKERS)


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


class SigintWatch:
    """Records whether a SIGINT interrupted the main thread while it is active: a Python-level SIGINT handler that
    calls the handler it replaced and notes when that one raised KeyboardInterrupt (a SIGINT the process ignores,
    e.g. with the CLI's do-nothing handler, is not noted). Restores the replaced handler when it ends.

    Installed only in the main thread and only over a Python callable; over ``SIG_IGN``, ``SIG_DFL`` or a handler
    not installed from Python it installs nothing (no interrupt can then reach Python as KeyboardInterrupt, and
    ``SIG_IGN`` must never be put back under TileDB's handler, which passes signals on). ``received`` stays False
    where nothing is installed."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Callable[[int, FrameType | None], Any] | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> Any:
        previous = self._previous
        if previous is None:  # already restored (a signal delivered late): nothing to pass it on to
            return None
        try:
            return previous(signum, frame)
        except KeyboardInterrupt:
            self.received = True
            raise

    def start(self) -> SigintWatch:
        """Install the recording handler (where that is safe, see the class); returns self."""
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            previous = signal.getsignal(signal.SIGINT)
        except (ValueError, OSError):  # pragma: no cover - no SIGINT on this platform
            return self
        if not callable(previous):  # SIG_IGN, SIG_DFL (ints) or None (a handler not set from Python)
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._handler)
        return self

    def stop(self) -> None:
        """Put the replaced handler back, unless the recording handler was replaced meanwhile (then the newer
        handler stays, and the recording one, if something still calls it, passes signals on as before)."""
        previous = self._previous
        if previous is None:
            return
        if signal.getsignal(signal.SIGINT) == self._handler:
            signal.signal(signal.SIGINT, previous)
            self._previous = None


@contextmanager
def duckdb_interrupts() -> Iterator[None]:
    """Around code that calls DuckDB: an exception caused by a Ctrl-C is raised as the KeyboardInterrupt it stands
    for, so that callers treat it as one (the CLI: ``Interrupted``, exit 130). Other exceptions go on unchanged.
    Usable as a decorator.

    An exception is taken for an interrupt when :func:`is_interrupt` says so (DuckDB turns a pending
    KeyboardInterrupt into an exception of its own, or a later call fails on the transaction it aborted), or when
    a SIGINT interrupted the main thread while the block ran (:class:`SigintWatch`): DuckDB can swallow the
    KeyboardInterrupt raised inside one of its calls into Python and report another error (an
    ``InvalidInputException`` while reading a registered table, an aborted transaction, ...), which code in the
    block may have wrapped in an error of its own (a StoreError saying that nothing was stored)."""
    watch = SigintWatch().start()
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if watch.received or is_interrupt(exc):
            raise KeyboardInterrupt from exc
        raise
    finally:
        watch.stop()
