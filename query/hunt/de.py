"""Differential expression of hits, from the counts in the atlas store.

Two kinds of comparison:

* **hits vs matched non-hits** (default): up to ``max_cells`` hits (sampled with the seed), against as many
  non-hit cells *from the same datasets*, dataset by dataset (so dataset / batch composition is matched);
* **between groups of hits** (``de_group``, e.g. ``disease``): each level against a reference level (default
  ``normal`` when present) or, without one, against the other hits.

Expression is read with :meth:`atlas.store.AtlasStore.read_cells` (streamed in chunks), log-normalised with
:func:`atlas.normalize.to_lognorm` (log1p CP10k) and kept sparse (at most ``max_cells`` per side). Per gene:
Wilcoxon rank-sum (normal approximation with tie and continuity correction, as ``scipy.stats.mannwhitneyu``'s
asymptotic method) or Welch's t-test on the log-normalised values; ``log2fc = log2((mean CP10k A + 0.1) /
(mean CP10k B + 0.1))``; Benjamini-Hochberg q-values per comparison over the genes expressed in either side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import norm
from scipy.stats import t as t_dist

from scatlas.atlas.errors import InputError
from scatlas.atlas.normalize import to_lognorm
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import escaped, escaped_list
from scatlas.index import Progress, progress_bar, sample_sorted
from scatlas.query.hunt.enrichment import MISSING, bh_qvalues

logger = logging.getLogger(__name__)

DEMethod = Literal["wilcoxon", "t-test"]
LFC_PSEUDOCOUNT = 0.1
MIN_CELLS_PER_SIDE = 3
MATCHED = "hits vs matched non-hits"
MATCH_COLUMN = "dataset_id"
"""The cells-table column non-hits are matched on (per-value counts), when the table has it."""
DE_COLUMNS = [
    "comparison", "gene_key", "gene_symbol", "feature_id", "log2fc", "mean_a", "mean_b", "pct_a", "pct_b",
    "statistic", "auc", "pvalue", "qvalue", "n_a", "n_b",
]


@dataclass(frozen=True)
class Comparison:
    """Cells of side A against cells of side B (sorted atlas ids), named ``name``."""

    name: str
    ids_a: np.ndarray
    ids_b: np.ndarray
    matched_on: tuple[str, ...] = ()
    """Columns side B was drawn to match side A on (per-value counts), for hits vs matched non-hits."""

    def matching(self) -> str:
        """A sentence saying what side B was matched on (empty for comparisons between groups of hits)."""
        if self.name != MATCHED:
            return ""
        if not self.matched_on:
            return (f"The {len(self.ids_b):,} non-hits are a random sample of the atlas, not matched on anything "
                    f"(the cells table has no {MATCH_COLUMN} column).")
        on = ", ".join(self.matched_on)
        return (f"The {len(self.ids_b):,} non-hits are matched to the {len(self.ids_a):,} hits on {on}: as many "
                f"non-hit cells from each {on} value as it has hits (fewer where it has too few).")


def _sample(ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` of the distinct ``ids``, sorted."""
    return sample_sorted(np.unique(np.asarray(ids, dtype=np.int64)), n, rng)


def matched_background(con: Any, hit_ids: np.ndarray, max_cells: int, seed: int) -> Comparison:
    """Up to ``max_cells`` hits vs as many non-hits drawn from the same datasets (per-dataset counts matched; a
    random sample of non-hits when the cells table has no ``dataset_id``)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    a = _sample(hit_ids, max_cells, rng)
    matched = MATCH_COLUMN in [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
    key = f"c.{quote_ident(MATCH_COLUMN)}" if matched else "NULL"
    same = f"{quote_ident(MATCH_COLUMN)} IS NOT DISTINCT FROM ?" if matched else "? IS NULL"
    con.register("_hunt_all_hits", pa.table({"soma_joinid": np.unique(np.asarray(hit_ids, dtype=np.int64))}))
    con.register("_hunt_de_a", pa.table({"soma_joinid": a}))
    try:
        per_ds = con.execute(
            f"SELECT {key} AS value, count(*) AS n FROM _hunt_de_a h JOIN cells c ON h.soma_joinid = c.soma_joinid "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
        parts = []
        for value, n in per_ds:
            got = con.execute(
                f"SELECT soma_joinid FROM cells WHERE {same} AND soma_joinid NOT IN "
                "(SELECT soma_joinid FROM _hunt_all_hits) ORDER BY hash(soma_joinid, ?), soma_joinid LIMIT ?",
                [value, int(seed), int(n)],
            ).fetchnumpy()["soma_joinid"]
            if len(got) < n:
                logger.info("%s %s: only %d non-hit cells to match its %d hits", MATCH_COLUMN, value, len(got), n)
            parts.append(np.asarray(got, dtype=np.int64))
    finally:
        con.unregister("_hunt_de_a")
        con.unregister("_hunt_all_hits")
    if not matched:
        logger.warning("the cells table has no %s column: DE non-hits are not matched to the hits", MATCH_COLUMN)
    b = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return Comparison(MATCHED, a, b, (MATCH_COLUMN,) if matched else ())


def group_comparisons(
    con: Any, hit_ids: np.ndarray, column: str, reference: str | None, max_cells: int, seed: int
) -> list[Comparison]:
    """Comparisons between hits grouped by ``column``: each level vs ``reference`` (or vs the other hits)."""
    import pyarrow as pa

    columns = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
    if column not in columns:
        raise InputError(f"de_group {escaped(column)} is not a column of the cells table ({escaped_list(columns)})")
    con.register("_hunt_hit_ids", pa.table({"soma_joinid": np.unique(np.asarray(hit_ids, dtype=np.int64))}))
    try:
        df = con.execute(
            f"""SELECT h.soma_joinid, COALESCE(CAST(c.{quote_ident(column)} AS VARCHAR), '{MISSING}') AS level
                FROM _hunt_hit_ids h JOIN cells c ON h.soma_joinid = c.soma_joinid ORDER BY h.soma_joinid"""
        ).df()
    finally:
        con.unregister("_hunt_hit_ids")
    levels = sorted(df["level"].unique())
    if reference is None and "normal" in levels:
        reference = "normal"
    if reference is not None and reference not in levels:
        raise InputError(f"de_reference {escaped(reference)} is not a {escaped(column)} value among the hits "
                         f"({len(levels)} values there; list them with `scatlas hunt report --by {escaped(column)}`)")
    rng = np.random.default_rng(seed)
    out = []
    for level in levels:
        if level == reference:
            continue
        a_ids = df.loc[df["level"] == level, "soma_joinid"].to_numpy()
        b_mask = df["level"] == reference if reference is not None else df["level"] != level
        b_ids = df.loc[b_mask, "soma_joinid"].to_numpy()
        if len(a_ids) < MIN_CELLS_PER_SIDE or len(b_ids) < MIN_CELLS_PER_SIDE:
            logger.info("DE by %s: %s skipped (%d vs %d hits; need %d per side)", column, level, len(a_ids),
                        len(b_ids), MIN_CELLS_PER_SIDE)
            continue
        other = reference if reference is not None else "other hits"
        out.append(Comparison(f"{column}: {level} vs {other}", _sample(a_ids, max_cells, rng),
                              _sample(b_ids, max_cells, rng)))
    return out


def read_lognorm(store: Any, ids: np.ndarray, chunk_size: int = 2_000) -> sp.csr_matrix:
    """Log-normalised expression (CSR float32, rows in the order of sorted ``ids``) in the store's gene space."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    n_genes = len(store.genes)
    blocks: list[sp.csr_matrix] = []
    for chunk in store.read_cells(ids, chunk_size=chunk_size):
        X = chunk.X
        if X.shape[1] < n_genes:
            X = sp.csr_matrix((X.data, X.indices, X.indptr), shape=(X.shape[0], n_genes))
        blocks.append(to_lognorm(X, chunk.x_kind))
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def rank_sum(A: sp.csr_matrix, B: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wilcoxon rank-sum per column of non-negative sparse matrices: ``(z, two-sided p, AUC = U_A / (nA nB))``.

    Zeros form one tie block; the normal approximation uses the tie-corrected variance and a continuity
    correction of 1/2 (``scipy.stats.mannwhitneyu(..., method="asymptotic")``).
    """
    n_a, n_b = A.shape[0], B.shape[0]
    n = n_a + n_b
    X = sp.vstack([A, B], format="csc")
    X.eliminate_zeros()
    G = X.shape[1]
    z = np.zeros(G)
    p = np.ones(G)
    auc = np.full(G, 0.5)
    mu = n_a * n_b / 2.0
    for j in range(G):
        lo, hi = X.indptr[j], X.indptr[j + 1]
        if hi == lo:
            continue
        vals = X.data[lo:hi]
        in_a = X.indices[lo:hi] < n_a
        n_zero = n - (hi - lo)
        _, inv, cnt = np.unique(vals, return_inverse=True, return_counts=True)
        avg = np.cumsum(cnt) - (cnt - 1) / 2.0 + n_zero
        r1 = float(avg[inv][in_a].sum()) + (n_a - int(in_a.sum())) * (n_zero + 1) / 2.0
        u1 = r1 - n_a * (n_a + 1) / 2.0
        ties = float(n_zero**3 - n_zero) + float(np.sum(cnt.astype(np.float64) ** 3 - cnt))
        var = n_a * n_b / 12.0 * ((n + 1) - ties / (n * (n - 1)))
        auc[j] = u1 / (n_a * n_b)
        if var <= 0:
            continue
        dev = abs(u1 - mu) - 0.5
        zz = max(dev, 0.0) / np.sqrt(var)
        z[j] = np.sign(u1 - mu) * zz
        p[j] = min(1.0, 2.0 * float(norm.sf(zz)))
    return z, p, auc


def _moments(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = X.shape[0]
    s = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(X.multiply(X).sum(axis=0), dtype=np.float64).ravel()
    mean = s / n
    var = np.maximum(sq - n * mean**2, 0.0) / max(n - 1, 1)
    return mean, var


def welch_t(A: sp.csr_matrix, B: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t-test per column: ``(t, two-sided p)``; constant columns give t = 0, p = 1."""
    n_a, n_b = A.shape[0], B.shape[0]
    ma, va = _moments(A)
    mb, vb = _moments(B)
    se2 = va / n_a + vb / n_b
    ok = se2 > 0
    t = np.zeros(len(ma))
    p = np.ones(len(ma))
    t[ok] = (ma[ok] - mb[ok]) / np.sqrt(se2[ok])
    df = se2[ok] ** 2 / ((va[ok] / n_a) ** 2 / max(n_a - 1, 1) + (vb[ok] / n_b) ** 2 / max(n_b - 1, 1))
    p[ok] = np.minimum(1.0, 2.0 * t_dist.sf(np.abs(t[ok]), df))
    return t, p


def compare(
    A: sp.csr_matrix, B: sp.csr_matrix, genes: Any, name: str, method: DEMethod = "wilcoxon"
) -> pd.DataFrame:
    """The DE table of one comparison (log-normalised inputs, columns = ``genes``)."""
    if method not in ("wilcoxon", "t-test"):
        raise InputError(f"unknown DE method {method!r}; use 'wilcoxon' or 't-test'")
    keys = np.asarray(genes.keys, dtype=object)
    expressed = (np.diff(sp.csc_matrix(A).indptr) + np.diff(sp.csc_matrix(B).indptr)) > 0
    cols = np.flatnonzero(expressed & (keys != ""))
    A, B = sp.csr_matrix(A[:, cols]), sp.csr_matrix(B[:, cols])
    if method == "wilcoxon":
        stat, p, auc = rank_sum(A, B)
    else:
        stat, p = welch_t(A, B)
        auc = np.full(len(cols), np.nan)
    mean_a = np.asarray(A.mean(axis=0)).ravel()
    mean_b = np.asarray(B.mean(axis=0)).ravel()
    cp_a = np.asarray(A.expm1().mean(axis=0)).ravel()
    cp_b = np.asarray(B.expm1().mean(axis=0)).ravel()
    pct_a = np.diff(sp.csc_matrix(A).indptr) / max(A.shape[0], 1)
    pct_b = np.diff(sp.csc_matrix(B).indptr) / max(B.shape[0], 1)
    names = np.asarray(genes.feature_name, dtype=object)[cols]
    symbols = np.where(names != "", names, keys[cols])
    frame = pd.DataFrame({
        "comparison": name,
        "gene_key": keys[cols],
        "gene_symbol": symbols,
        "feature_id": np.asarray(genes.feature_id, dtype=object)[cols],
        "log2fc": np.log2((cp_a + LFC_PSEUDOCOUNT) / (cp_b + LFC_PSEUDOCOUNT)),
        "mean_a": mean_a,
        "mean_b": mean_b,
        "pct_a": pct_a,
        "pct_b": pct_b,
        "statistic": stat,
        "auc": auc,
        "pvalue": p,
        "qvalue": bh_qvalues(p),
        "n_a": A.shape[0],
        "n_b": B.shape[0],
    })
    frame = frame.assign(_abs=-frame["log2fc"].abs())
    return frame.sort_values(["qvalue", "_abs"], kind="stable").drop(columns="_abs").reset_index(drop=True)


def differential_expression(
    store: Any, comparisons: Sequence[Comparison], method: DEMethod = "wilcoxon", progress: Progress = False
) -> pd.DataFrame:
    """Run every comparison against the store; one stacked table (``DE_COLUMNS``). ``progress``: a bar over the
    comparisons (:data:`index.progress.Progress`)."""
    tables = []
    with progress_bar(progress, total=len(comparisons), desc="differential expression", unit="comparison") as bar:
        for comp in comparisons:
            table = _one_comparison(store, comp, method)
            if table is not None:
                tables.append(table)
            bar.update(1)
    if not tables:
        return pd.DataFrame(columns=DE_COLUMNS)
    return pd.concat(tables, ignore_index=True)[DE_COLUMNS]


def _one_comparison(store: Any, comp: Comparison, method: DEMethod) -> pd.DataFrame | None:
    """The DE table of one comparison, its cells read from the store; None when a side has too few cells."""
    if len(comp.ids_a) < MIN_CELLS_PER_SIDE or len(comp.ids_b) < MIN_CELLS_PER_SIDE:
        logger.warning("DE %s skipped: %d vs %d cells (need %d per side)", comp.name, len(comp.ids_a),
                       len(comp.ids_b), MIN_CELLS_PER_SIDE)
        return None
    both = np.union1d(comp.ids_a, comp.ids_b)
    X = read_lognorm(store, both)
    in_a = np.isin(both, comp.ids_a)
    in_b = np.isin(both, comp.ids_b)
    table = compare(X[np.flatnonzero(in_a)], X[np.flatnonzero(in_b)], store.genes, comp.name, method)
    logger.info("DE %s: %d vs %d cells, %d genes tested", comp.name, int(in_a.sum()), int(in_b.sum()), len(table))
    return table
