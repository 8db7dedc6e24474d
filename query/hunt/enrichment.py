"""Enrichment of hits per group (dataset, tissue, disease, ...) against the whole atlas.

For a group ``g`` with ``n_g`` cells of which ``h_g`` are hits, in an atlas of ``N`` cells with ``H`` hits:
``fraction = h_g / n_g``, ``fold = fraction / (H / N)`` and Fisher's exact test on the 2x2 table
``[[h_g, n_g - h_g], [H - h_g, (N - n_g) - (H - h_g)]]`` (two-sided by default; ``greater`` tests enrichment
only). Benjamini-Hochberg q-values are computed within each grouping column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

from scatlas.atlas.errors import InputError
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import escaped_list

logger = logging.getLogger(__name__)

Alternative = Literal["two-sided", "greater", "less"]
MISSING = "(missing)"
DEFAULT_BY: tuple[str, ...] = ("cell_type", "donor_id", "dataset_id")
"""The default breakdown of hits, first those of these columns the cells table has: the atlas label, donor, dataset."""
ENRICHMENT_COLUMNS = ["column", "group", "n_cells", "n_hits", "fraction", "fold", "odds_ratio", "pvalue", "qvalue"]


def bh_qvalues(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN p-values stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q[order] = np.minimum(ranked, 1.0)
    return q


def fisher_table(n_hits: int, n_cells: int, total_hits: int, total_cells: int) -> list[list[int]]:
    """The 2x2 table of a group: rows in / out of the group, columns hit / not hit."""
    a = int(n_hits)
    b = int(n_cells) - a
    c = int(total_hits) - a
    d = int(total_cells) - int(n_cells) - c
    if min(a, b, c, d) < 0:
        raise ValueError(f"inconsistent counts: group {n_hits}/{n_cells}, atlas {total_hits}/{total_cells}")
    return [[a, b], [c, d]]


def enrichment_table(
    counts: pd.DataFrame, column: str, total_cells: int, total_hits: int, alternative: Alternative = "two-sided"
) -> pd.DataFrame:
    """Per-group enrichment for one grouping column; ``counts`` has columns ``group``, ``n_cells``, ``n_hits``."""
    rate = total_hits / total_cells if total_cells else float("nan")
    rows = []
    for group, n_cells, n_hits in counts[["group", "n_cells", "n_hits"]].itertuples(index=False):
        table = fisher_table(int(n_hits), int(n_cells), total_hits, total_cells)
        odds, p = fisher_exact(table, alternative=alternative)
        frac = n_hits / n_cells if n_cells else float("nan")
        fold = frac / rate if rate > 0 else float("nan")
        rows.append((column, str(group), int(n_cells), int(n_hits), frac, fold, float(odds), float(p)))
    out = pd.DataFrame(rows, columns=ENRICHMENT_COLUMNS[:-1])
    out["qvalue"] = bh_qvalues(out["pvalue"].to_numpy()) if len(out) else np.zeros(0)
    return out.sort_values(["qvalue", "fold"], ascending=[True, False], kind="stable").reset_index(drop=True)


def group_counts(con: Any, hit_ids: np.ndarray, column: str) -> pd.DataFrame:
    """``group, n_cells, n_hits`` per value of ``column`` of the ``cells`` table (NULL -> ``(missing)``)."""
    import pyarrow as pa

    con.register("_hunt_hit_ids", pa.table({"soma_joinid": np.unique(np.asarray(hit_ids, dtype=np.int64))}))
    try:
        df = con.execute(
            f"""SELECT COALESCE(CAST(c.{quote_ident(column)} AS VARCHAR), '{MISSING}') AS "group",
                       count(*) AS n_cells, count(h.soma_joinid) AS n_hits
                FROM cells c LEFT JOIN _hunt_hit_ids h ON c.soma_joinid = h.soma_joinid
                GROUP BY 1 ORDER BY 1"""
        ).df()
    finally:
        con.unregister("_hunt_hit_ids")
    return df


def default_by(columns: Sequence[str]) -> list[str]:
    """The default breakdown: those of :data:`DEFAULT_BY` (the atlas label, donor, dataset) the table has."""
    return [c for c in DEFAULT_BY if c in columns]


def all_missing(con: Any, by: Sequence[str]) -> list[str]:
    """The columns of ``by`` that are NULL in every cell of the ``cells`` table (one query)."""
    if not by:
        return []
    counts = con.execute("SELECT " + ", ".join(f"count({quote_ident(c)})" for c in by) + " FROM cells").fetchall()[0]
    return [c for c, n in zip(by, counts, strict=True) if int(n) == 0]


def enrichment(
    con: Any, hit_ids: np.ndarray, by: Sequence[str], alternative: Alternative = "two-sided"
) -> tuple[pd.DataFrame, int, int]:
    """Enrichment tables for every column of ``by`` (stacked), the atlas cell count and the hit count in it."""
    columns = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
    unknown = [c for c in by if c not in columns]
    if unknown:
        raise InputError(f"cannot group hits by {escaped_list(unknown)}: not columns of the cells table "
                         f"({escaped_list(columns)})")
    total = con.execute("SELECT count(*) FROM cells").fetchall()[0]
    total_cells = int(total[0]) if total else 0
    tables = []
    total_hits = 0
    for column in by:
        counts = group_counts(con, hit_ids, column)
        total_hits = int(counts["n_hits"].sum())
        tables.append(enrichment_table(counts, column, total_cells, total_hits, alternative))
    if len(np.unique(hit_ids)) != total_hits and by:
        logger.warning(
            "%d hit ids are not in the cells table (index and hits from different builds?); they are ignored",
            len(np.unique(hit_ids)) - total_hits,
        )
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=ENRICHMENT_COLUMNS)
    return frame, total_cells, total_hits
