"""Exclusive, non-blocking ``flock`` locks on a file, held for a ``with`` block: one writer of a store, an index, a
sweep directory or a server's work directory at a time. The lock goes with the open file, so a process that dies
releases it."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from scatlas.atlas.errors import ScatlasError


@contextmanager
def holding(fh: IO[Any], busy: ScatlasError) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``fh`` for the block (the file is closed at its end, which releases
    it); raise ``busy`` when another process holds it."""
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        yield
