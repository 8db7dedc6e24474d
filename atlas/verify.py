"""``scatlas verify --atlas``: read a whole atlas store back and check it against what ingest recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from scatlas.atlas.digest import XDigest, canonical
from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.sql import is_locked
from scatlas.atlas.store import JOURNAL_FILE, AtlasStore, DamagedStoreError, store_problems

logger = logging.getLogger(__name__)


@dataclass
class StoreVerifyReport:
    """What :func:`verify_store` checked and what it found wrong (``problems`` empty: the store is intact)."""

    path: str
    n_datasets: int = 0
    n_cells: int = 0
    n_values: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


def verify_store(path: str | Path, *, progress: bool = True) -> StoreVerifyReport:
    """Check every committed dataset of the store at ``path``: its rows in the cell and dataset tables, and the
    checksum of its expression values (recomputed by reading them all), after the cheap checks of opening a store
    (:func:`atlas.store.store_problems`; when these find damage, nothing more is read). Problems are reported, not
    raised; StoreError only when ``path`` is not a store or its ``store.json`` is unreadable."""
    store = AtlasStore.open(path, check=False)  # what opening checks is reported below, not raised
    report = StoreVerifyReport(path=str(path), n_datasets=len(store.datasets))
    if (Path(path) / JOURNAL_FILE).is_file():
        report.notes.append("an ingest was interrupted (or is running): its staged rows are invisible and are "
                            "cleared by the next ingest")
    damage = store_problems(path, store.state)
    if damage:  # reading on would fail, or count cells of ranges that do not exist
        report.problems.extend(f"{problem}; re-ingest into a new store" for problem in damage)
        return report
    report.n_cells = store.n_cells
    reading = "its cell and gene tables"  # what was being read when a read fails: named in the problem
    try:
        _check_tables(store, report)
        bar = tqdm(total=store.n_cells, desc="verify store", unit="cell", disable=not progress, leave=False)
        for record in store.cell_ranges_records():
            reading = f"the expression values (X) of dataset {record.dataset_id!r}"
            digest = XDigest()
            for chunk in store.iter_chunks(record.start, record.stop):
                X = canonical(chunk.X)
                digest.update(chunk.ids, X)
                report.n_values += X.nnz
                bar.update(len(chunk.ids))
            if not record.x_sha256:
                report.notes.append(f"dataset {record.dataset_id!r}: no checksum recorded (ingested by an older scatlas)")
            elif digest.hexdigest() != record.x_sha256:
                report.problems.append(
                    f"dataset {record.dataset_id!r}: the expression values differ from those ingested (checksum "
                    "mismatch); re-ingest it into a new store"
                )
        bar.close()
    except DamagedStoreError as exc:  # found on the way (a part that cannot be opened): a problem, not an error
        report.problems.append(f"{exc.what}; re-ingest into a new store")
    except ScatlasError:
        raise
    except Exception as exc:  # a damaged TileDB array or DuckDB file: say which part could not be read
        if is_locked(exc):  # another process (an ingest) has the store open: busy, not damaged
            raise
        report.problems.append(f"the store could not be read back: {reading} ({type(exc).__name__}); it is "
                               "damaged: re-ingest into a new store")
        logger.debug("verify_store read failure", exc_info=True)
    return report


def _check_tables(store: AtlasStore, report: StoreVerifyReport) -> None:
    """The DuckDB tables against ``store.json``: every committed cell has one row, no committed id is missing."""
    with store.connect() as con:
        in_ranges = 0
        for record in store.cell_ranges_records():
            n = _count(con, "cells WHERE soma_joinid >= ? AND soma_joinid < ?", [record.start, record.stop])
            in_ranges += n
            if n != record.n_cells:
                report.problems.append(
                    f"dataset {record.dataset_id!r}: {n} rows in the cells table for {record.n_cells} cells"
                )
            wrong = _count(
                con, "cells WHERE soma_joinid >= ? AND soma_joinid < ? AND dataset_id IS DISTINCT FROM ?",
                [record.start, record.stop, record.dataset_id],
            )
            if wrong:
                report.problems.append(f"dataset {record.dataset_id!r}: {wrong} of its cell rows name another dataset")
        listed = {r[0] for r in con.execute("SELECT dataset_id FROM datasets").fetchall()}
        committed = {d.dataset_id for d in store.datasets}
        if committed - listed:
            report.problems.append(f"datasets {sorted(committed - listed)} are missing from the datasets table")
        stray = _count(con, "cells", []) - in_ranges
        if stray:
            report.notes.append(f"{stray} staged rows of an unfinished ingest (invisible; cleared by the next ingest)")


def _count(con: Any, rows: str, params: list[Any]) -> int:
    """``SELECT count(*) FROM {rows}`` (a fixed table and condition; values only as parameters)."""
    row = con.execute(f"SELECT count(*) FROM {rows}", params).fetchone()
    return int(row[0]) if row else 0
