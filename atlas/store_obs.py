"""Cell metadata read with the cells: the obs columns an embedder asks for (:attr:`CellChunk.obs`), from the
store's DuckDB ``cells`` table (it holds every obs column; the SOMA obs dataframe only the standard ones)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from scatlas.atlas.chunks import obs_values
from scatlas.atlas.errors import InputError
from scatlas.atlas.sql import quote_ident

ObsRead = Callable[[np.ndarray], dict[str, np.ndarray]]
"""``ids -> {column: values}``: the columns of the cells ``ids``, in that order (:func:`atlas.chunks.obs_values`:
strings, None where missing, and for cells the table lacks)."""


@contextmanager
def obs_reader(connect: Callable[[], Any], columns: Sequence[str], where: str) -> Iterator[ObsRead | None]:
    """An :data:`ObsRead` of the ``cells`` table (``connect()``: a read-only DuckDB connection, held for the
    reader's life; one query per call, so memory is bounded by the cells asked for), or None when no column is
    asked. InputError naming a column the table lacks (``where``: the store, for the message)."""
    wanted = list(dict.fromkeys(str(c) for c in columns))
    if not wanted:
        yield None
        return
    con = connect()
    try:
        have = {d[0] for d in con.execute("SELECT * FROM cells LIMIT 0").description}
        for column in wanted:
            if column not in have:
                raise InputError(f"the atlas store {where} has no obs column {column!r} (an embedder reads it)")
        select = ", ".join(f"c.{quote_ident(c)}" for c in wanted)

        def read(ids: np.ndarray) -> dict[str, np.ndarray]:
            con.register("_wanted_obs", pa.table({"soma_joinid": np.asarray(ids, dtype=np.int64),
                                                  "_pos": np.arange(len(ids))}))
            try:
                rows = con.execute(
                    f"SELECT {select} FROM _wanted_obs w LEFT JOIN cells c USING (soma_joinid) ORDER BY w._pos"
                ).fetchall()
            finally:
                con.unregister("_wanted_obs")
            values = list(zip(*rows, strict=True)) if rows else [() for _ in wanted]
            return {c: obs_values(list(v)) for c, v in zip(wanted, values, strict=True)}

        yield read
    finally:
        con.close()
