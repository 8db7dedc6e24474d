"""The machinery that makes ``scatlas ingest`` use the machine: chunks read ahead in a thread, and TileDB writes
in the arrays' global order.

* :func:`read_ahead` runs a generator of prepared chunks (read, checked, converted) in a producer thread while the
  caller writes the chunks before it: memory stays bounded by ``depth`` chunks in the queue plus one being made and
  one being written. An error of the producer (a bad value, an interrupt) is raised in the caller, in order; an
  error of the caller stops the producer before the sources are closed.
* :class:`GlobalOrder` puts COO coordinates into a TileDB sparse array's global order (tile by tile, then cell by
  cell, both row-major) so that a write skips TileDB's own sort, most of the cost of an unordered write (a 4M-value
  chunk: 1.6 s sorted by TileDB, 0.35 s in global order). TileDB checks the order of such writes and refuses one
  out of order, so a mistake here is an error, never a wrong store.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")

GLOBAL_ORDER_WRITE: dict[str, Any] = {"tiledb": {"write": {"sort_coords": False}}}
"""``platform_config`` of a SOMA write whose coordinates are already in the array's global order."""

_DONE = object()


class _Failed:
    """A producer's exception, carried through the queue to be raised in the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@contextmanager
def read_ahead(items: Iterator[T], depth: int, name: str = "ingest-read-ahead") -> Iterator[Iterator[T]]:
    """Iterate ``items`` in a producer thread, at most ``depth`` items ahead of the consumer (``depth <= 0``: in
    the caller's thread, one item at a time). Leaving the block (normally or by an error) stops the producer and
    waits for it, so nothing it reads outlives the block."""
    if depth <= 0:
        yield items
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - every failure, interrupts included, goes to the consumer
            put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing a failed generator must not mask its error
                    logger.debug("closing the read-ahead generator failed", exc_info=True)

    thread = threading.Thread(target=produce, name=name, daemon=True)

    def consume() -> Iterator[T]:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        while thread.is_alive():
            try:  # unblock a producer waiting on a full queue, then wait for it
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)


@dataclass(frozen=True)
class GlobalOrder:
    """The global cell order of a 2-d TileDB sparse array with row-major tile and cell order: by tile (row tile,
    then column tile), then by row, then by column. ``None`` from :meth:`of` when an array is laid out otherwise
    (its writes are then sorted by TileDB)."""

    row_extent: int
    col_extent: int

    @classmethod
    def of(cls, array: Any) -> GlobalOrder | None:
        """The order of a SOMA ``SparseNDArray`` (read from its schema), or None when it cannot be told."""
        try:
            config = array.schema_config_options()
            if str(config.cell_order) != "row-major" or str(config.tile_order) != "row-major":
                return None
            dims = json.loads(config.dims)
            maxdomain = getattr(array, "_maxdomain", None)  # SOMA arrays start at 0; told where it can be
            if len(dims) != 2 or (maxdomain is not None and any(int(d[0]) != 0 for d in maxdomain())):
                return None
            return cls(int(dims["soma_dim_0"]["tile"]), int(dims["soma_dim_1"]["tile"]))
        except Exception:  # noqa: BLE001 - an unknown layout is written the safe way, sorted by TileDB
            logger.debug("could not read the tile layout of %s", getattr(array, "uri", array), exc_info=True)
            return None

    def permutation(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        """The permutation putting coordinates in row-major order (rows ascending, columns ascending within a row:
        a canonical CSR block's order) into the global order; None when they are in it already."""
        if len(rows) == 0:
            return None
        col_tiles = cols // self.col_extent
        if int(col_tiles.max()) == 0:
            return None  # one column tile: row-major is the global order
        n_col_tiles = int(col_tiles.max()) + 1
        row_tiles = rows // self.row_extent
        row_tiles -= row_tiles[0]
        key = row_tiles * n_col_tiles + col_tiles  # rows ascending: the largest key is in the last row tile
        if (int(row_tiles[-1]) + 1) * n_col_tiles <= 1 << 16:  # a small key sorts by radix, in linear time
            return np.argsort(key.astype(np.uint16), kind="stable")
        return np.argsort(key, kind="stable")
