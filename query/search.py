"""Search: which atlas cells look like these query cells? (``scatlas search``)

In the manner of cellxgene-census' ``experimental/_embedding_search.py`` (``find_nearest_obs``): a short public
function returning a NamedTuple. The query cells go through :func:`query.prepare.open_query` (species and gene-overlap
checks), optionally narrowed by an SQL predicate over their obs (``cells_where``, run sandboxed by
:mod:`query.hunt.sql_predicate`), and are embedded with the index's own embedder chunk by chunk. Two modes:

* ``cells``: the ``k`` nearest atlas cells of every query cell;
* ``centroid``: the ``k`` atlas cells nearest the query's mean vector (the cells' L2-normalised vectors averaged,
  then normalised again; SCimilarity's most used search).

``where`` restricts the atlas cells searched (an SQL predicate over the index's cells table, checked by
:func:`index.validate_predicate`). The hits are joined with the atlas cells' metadata, and broken down by dataset,
tissue, disease and cell type against the atlas cells searched (:mod:`query.hunt.enrichment`: Fisher's exact test,
one-sided for enrichment, Benjamini-Hochberg q-values per column). Cells with no expression on the embedder's genes
are left out (counted in the report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import anndata
import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import MIN_GENE_OVERLAP
from scatlas.atlas.outputs import check_distinct, check_output_file
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import beside, escaped_list
from scatlas.index import (
    DEFAULT_K,
    AtlasIndex,
    Progress,
    ReferenceMap,
    l2_normalize,
    mapping_calibration,
    mean_top_similarity,
    progress_bar,
)
from scatlas.query.annotate_report import index_summary, query_summary
from scatlas.query.hunt.enrichment import MISSING, all_missing, enrichment_table
from scatlas.query.hunt.sql_predicate import evaluate_sql_predicate
from scatlas.query.mapping import assess_mapping
from scatlas.query.outputs import (
    check_table_output,
    plot_search_map,
    published_together,
    table_format,
    write_json,
    write_table,
)
from scatlas.query.prepare import QueryCells, open_query

logger = logging.getLogger(__name__)

Mode = Literal["cells", "centroid"]
MODES: tuple[str, ...] = ("cells", "centroid")
ENRICH_BY: tuple[str, ...] = ("dataset_id", "tissue", "disease", "cell_type")
"""The columns the hits are broken down by: those of these the atlas has, with values."""
CENTROID = "centroid"
"""The ``query_cell`` of the hits of a ``centroid`` search."""
DEFAULT_BATCH_SIZE = 10_000
MAP_POINTS = 3_000
"""At most this many query cells and hit atlas cells are placed on the reference map in the report (a sample)."""
HIT_COLUMNS = ["query_cell", "rank", "soma_joinid", "similarity", "query_row"]
HITS_FIRST = ("query_cell", "rank")
"""The first columns of the hits table (what an earlier hits CSV of scatlas begins with)."""
SEARCH_ENRICHMENT_COLUMNS = [
    "column", "group", "n_hits", "n_cells", "share_hits", "share_atlas", "fold", "fraction", "odds_ratio", "pvalue",
    "qvalue",
]


class SearchHits(NamedTuple):
    """What :func:`search_cells` found.

    ``hits``: one row per (query cell, neighbour), best first per cell: ``query_cell`` (the query's obs name, or
    ``"centroid"``), ``rank`` (from 0), ``soma_joinid`` (the atlas cell), ``similarity`` (cosine), ``query_row`` (the
    query cell's row in the query, from 0; -1 for the centroid: obs names need not be unique), then the atlas
    cell's metadata (every column of the index's cells table: cell_type, dataset_id, donor_id, tissue, disease, ...).
    ``enrichment``: per column of :data:`ENRICH_BY` the atlas has and group: ``n_hits`` (distinct atlas cells hit),
    ``n_cells`` (atlas cells searched), ``share_hits``, ``share_atlas``, ``fold`` (their ratio), ``fraction`` (hits
    among the group's cells), ``odds_ratio``, ``pvalue`` (Fisher, one-sided: enriched) and ``qvalue`` (BH within the
    column), sorted by column then q-value. ``report``: JSON-serialisable summary (query, index, parameters, counts,
    top groups, timings and ``map``: when the index has a reference map, up to :data:`MAP_POINTS` query cells
    (``query_rows``, ``query_xy``) and distinct atlas cells hit (``hit_ids``, ``hits_xy``), sampled, placed on it,
    and the centroid's place in centroid mode).
    """

    hits: pd.DataFrame
    enrichment: pd.DataFrame
    report: dict[str, Any]


def _validate(k: int, mode: str) -> None:
    if int(k) < 1:
        raise InputError(f"k must be at least 1 (got {k})")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")


MAX_RESULT_ROWS = 100_000_000
"""Most neighbour rows (query cells x k) a search or an annotation that keeps its neighbours holds and writes (a
few GB): beyond it the results would not fit in memory on a workstation."""


def searchable_k(k: int, n_searchable: int, n_queries: int | None = None) -> int:
    """``k`` capped at the ``n_searchable`` atlas cells a search can return (a cell cannot have more neighbours
    than there are cells to search; a huge ``k`` would otherwise allocate ``n x k`` arrays for nothing).
    ``n_queries``: the query cells whose ``k`` neighbours are all kept; InputError when they would make more than
    :data:`MAX_RESULT_ROWS` rows."""
    k_used = max(1, min(int(k), int(n_searchable)))
    if k_used < int(k):
        logger.info("k=%d is more than the %d atlas cells searched: using k=%d", int(k), int(n_searchable), k_used)
    if n_queries is not None and int(n_queries) * k_used > MAX_RESULT_ROWS:
        raise InputError(
            f"{int(n_queries):,} query cells x k={k_used:,} make {int(n_queries) * k_used:,} neighbour rows, over the "
            f"{MAX_RESULT_ROWS:,} kept in memory and written; lower --k, or split the query (or select cells with "
            "--cells-where)"
        )
    return k_used


def no_expression_error(n_cells: int) -> InputError:
    """The error for a query none of whose ``n_cells`` cells used expresses any of the embedder's genes."""
    return InputError(f"none of the {n_cells} query cells used expresses any of the embedder's genes: "
                      "nothing to search with (are the counts all zero, the wrong matrix read (choose one with "
                      "--x-layer: X, raw or a layer's name), or the genes named differently?)")


def select_cells(cells: QueryCells, cells_where: str | None) -> np.ndarray:
    """Row positions (sorted) of the query cells matching ``cells_where``, an SQL predicate over the query's obs
    (all cells when None); InputError when it is not allowed, fails, or matches no cell."""
    if cells_where is None:
        return np.arange(cells.n_cells, dtype=np.int64)
    obs = cells.source.obs
    mask = evaluate_sql_predicate(obs, cells_where, what="--cells-where predicate")
    rows = np.flatnonzero(mask).astype(np.int64)
    if not len(rows):
        raise InputError(
            f"the --cells-where predicate {cells_where[:200]!r} matches none of the query's {cells.n_cells} cells; "
            f"its obs columns are: {escaped_list(obs.columns)}"
        )
    return rows


class _Run:
    """The search, chunk by chunk: hits (cells mode) or the vector sum (centroid mode), and the map placement."""

    def __init__(self, idx: AtlasIndex, mode: str, k: int, where: str | None, refmap: ReferenceMap | None,
                 n: int, place: np.ndarray) -> None:
        self.idx, self.mode, self.k, self.where, self.refmap = idx, mode, k, where, refmap
        self.place = place  # the query rows placed on the map (a sample: the report draws at most MAP_POINTS)
        self.rows: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.total = np.zeros(idx.dim, dtype=np.float64)
        self.n_used = self.n_silent = 0
        self.xy = np.full((n, 2), np.nan, dtype=np.float32) if refmap is not None else None
        self.t_embed = self.t_search = 0.0

    def add(self, chunk: Any) -> None:
        t0 = time.perf_counter()
        rows = np.asarray(chunk.ids, dtype=np.int64)
        vectors = self.idx.embed(chunk)
        ok = np.asarray(self.idx.embedder.expressed(chunk), dtype=bool)
        rows, vectors = rows[ok], vectors[ok]
        self.n_silent += int((~ok).sum())
        self.n_used += len(rows)
        t1 = time.perf_counter()
        placed = np.isin(rows, self.place)
        if self.xy is not None and self.refmap is not None and placed.any():
            self.xy[rows[placed]] = self.refmap.transform(vectors[placed])
        if self.mode == "centroid":
            self.total += vectors.sum(axis=0, dtype=np.float64)
        elif len(rows):
            result = self.idx.search(vectors, self.k, self.where)
            self.rows.append(rows)
            self.ids.append(result.ids)
            self.scores.append(result.scores)
        self.t_embed += t1 - t0
        self.t_search += time.perf_counter() - t1

    def centroid(self) -> np.ndarray:
        """The query's mean vector, normalised (``(1, dim)``)."""
        return l2_normalize((self.total / max(self.n_used, 1)).astype(np.float32)[None, :])

    def neighbours(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(query rows (n,), ids (n, k), scores (n, k))`` of the cells mode, or of the centroid (row -1)."""
        if self.mode == "centroid":
            result = self.idx.search(self.centroid(), self.k, self.where)
            return np.full(1, -1, dtype=np.int64), result.ids, result.scores
        if not self.rows:
            return np.zeros(0, np.int64), np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32)
        return np.concatenate(self.rows), np.concatenate(self.ids), np.concatenate(self.scores)


def _hits_frame(idx: AtlasIndex, obs_names: pd.Index, rows: np.ndarray, ids: np.ndarray,
                scores: np.ndarray) -> pd.DataFrame:
    """One row per (query cell, neighbour found) with the atlas cell's metadata."""
    valid = ids >= 0
    r_idx, rank = np.nonzero(valid)
    hit_ids = ids[valid]
    uniq = np.unique(hit_ids)
    meta = idx.cells(uniq).drop(columns=["soma_joinid"])
    for column in meta.columns:  # values repeat across hits: categories keep the table small
        if meta[column].dtype == object:
            meta[column] = meta[column].astype("category")
    taken = meta.iloc[np.searchsorted(uniq, hit_ids)].reset_index(drop=True)
    query_rows = rows[r_idx]
    if len(rows) == 1 and rows[0] == -1:
        query_cell: Any = pd.Categorical.from_codes(np.zeros(len(query_rows), np.int64), categories=[CENTROID])
    elif obs_names.is_unique:
        query_cell = pd.Categorical.from_codes(query_rows, categories=obs_names)
    else:
        query_cell = np.asarray(obs_names)[query_rows]
    head = pd.DataFrame({
        "query_cell": query_cell, "rank": rank.astype(np.int16), "soma_joinid": hit_ids.astype(np.int64),
        "similarity": scores[valid].astype(np.float32), "query_row": query_rows.astype(np.int64),
    })
    names = beside(taken.columns, head.columns)
    clashes = sorted(c for c, n in names.items() if n != c)
    if clashes:
        logger.warning("atlas column(s) %s are written as %s beside the search's own", escaped_list(clashes),
                       escaped_list(names[c] for c in clashes))
    return pd.concat([head, taken.rename(columns=names)], axis=1)


def _group_counts(con: Any, column: str, hit_ids: np.ndarray, universe: np.ndarray | None) -> pd.DataFrame:
    """``group, n_cells, n_hits`` per value of ``column`` over the atlas cells searched (``universe``; None: all)."""
    import pyarrow as pa

    con.register("_search_hits", pa.table({"soma_joinid": hit_ids}))
    if universe is not None:
        con.register("_search_universe", pa.table({"soma_joinid": universe}))
    join = "JOIN _search_universe u ON c.soma_joinid = u.soma_joinid" if universe is not None else ""
    try:
        return con.execute(
            f"""SELECT COALESCE(CAST(c.{quote_ident(column)} AS VARCHAR), '{MISSING}') AS "group",
                       count(*) AS n_cells, count(h.soma_joinid) AS n_hits
                FROM cells c {join} LEFT JOIN _search_hits h ON c.soma_joinid = h.soma_joinid
                GROUP BY 1 ORDER BY 1"""
        ).df()
    finally:
        con.unregister("_search_hits")
        if universe is not None:
            con.unregister("_search_universe")


def enrichment_of_hits(
    idx: AtlasIndex, hit_ids: np.ndarray, *, where: str | None = None, by: Sequence[str] | None = None
) -> pd.DataFrame:
    """The hits (distinct atlas cells) by each column of ``by`` (default: those of :data:`ENRICH_BY` the cells table
    has with values) against the atlas cells matching ``where`` (all: None); columns
    :data:`SEARCH_ENRICHMENT_COLUMNS`."""
    hit_ids = np.unique(np.asarray(hit_ids, dtype=np.int64))
    universe = idx.filter_ids(where) if where is not None else None
    with idx.cursor() as con:
        names = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
        columns = [c for c in (by if by is not None else ENRICH_BY) if c in names]
        columns = [c for c in columns if c not in all_missing(con, columns)]
        tables = []
        for column in columns:
            counts = _group_counts(con, column, hit_ids, universe)
            n_cells, n_hits = int(counts["n_cells"].sum()), int(counts["n_hits"].sum())
            table = enrichment_table(counts, column, n_cells, n_hits, alternative="greater")
            table["share_hits"] = table["n_hits"] / n_hits if n_hits else np.nan
            table["share_atlas"] = table["n_cells"] / n_cells if n_cells else np.nan
            tables.append(table[SEARCH_ENRICHMENT_COLUMNS])
    if not tables:
        return pd.DataFrame(columns=SEARCH_ENRICHMENT_COLUMNS)
    return pd.concat(tables, ignore_index=True)


def top_groups(enrichment: pd.DataFrame, n: int = 3, max_q: float = 0.05) -> dict[str, list[dict[str, Any]]]:
    """Per column, the ``n`` most enriched groups with q <= ``max_q`` and fold > 1 (group, hits, fold, q)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for column, sub in enrichment.groupby("column", sort=False):
        sig = sub[(sub["qvalue"] <= max_q) & (sub["fold"] > 1)].head(n)
        out[str(column)] = [
            {"group": str(g), "n_hits": int(h), "fold": round(float(f), 3), "qvalue": float(q)}
            for g, h, f, q in zip(sig["group"], sig["n_hits"], sig["fold"], sig["qvalue"], strict=True)
        ]
    return out


def _sampled(values: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if len(values) <= n:
        return values
    return np.sort(np.random.default_rng(seed).choice(values, size=n, replace=False))


def _map_report(idx: AtlasIndex, refmap: ReferenceMap | None, run: _Run, hit_ids: np.ndarray) -> dict[str, Any]:
    """The query (a sample of its cells, and the centroid) and a sample of the hits placed on the reference map."""
    if refmap is None or run.xy is None:
        return {"available": False}
    query_rows = np.flatnonzero(np.isfinite(run.xy[:, 0]))  # a sample of the cells used (see _Run.place)
    hits = _sampled(np.unique(hit_ids), MAP_POINTS)
    hits_xy = refmap.transform(idx.vectors(hits)) if len(hits) else np.zeros((0, 2), np.float32)
    out: dict[str, Any] = {
        "available": True, "atlas_sample_cells": len(refmap), "query_cells_placed": len(query_rows),
        "query_rows": query_rows.tolist(), "query_xy": np.round(run.xy[query_rows], 4).tolist(),
        "hit_ids": hits.tolist(), "hits_xy": np.round(hits_xy, 4).tolist(),
    }
    if run.mode == "centroid":
        out["centroid_xy"] = np.round(refmap.transform(run.centroid())[0], 4).tolist()
    return out


def search_cells(
    query: str | Path | anndata.AnnData,
    index: str | Path | AtlasIndex,
    *,
    k: int = DEFAULT_K,
    mode: Mode = "cells",
    where: str | None = None,
    cells_where: str | None = None,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
    allow_species_mismatch: bool = False,
    progress: Progress = True,
    x_layer: str | None = None,
) -> SearchHits:
    """The atlas cells most similar to the cells of ``query``.

    query: an ``.h5ad`` path (read in chunks) or an AnnData; never modified. Its genes must look like the index's
        species and cover enough of the embedder's genes (SpeciesMismatchError, GeneOverlapError).
    index: an index directory or an opened :class:`~index.AtlasIndex`.
    k: neighbours per query cell (``cells``) or of the centroid (``centroid``).
    mode: ``"cells"`` or ``"centroid"`` (see the module's docstring).
    where: an SQL predicate over the atlas cells table restricting the cells searched (``"tissue = 'lung'"``).
    cells_where: an SQL predicate over the query's obs choosing the query cells used (``"cell_type = 'B cell'"``).
    min_gene_overlap: refuse a query with a smaller fraction of the embedder's genes (GeneOverlapError).
    allow_species_mismatch: go on (with a warning) when the query's genes look like another species.
    progress: a progress bar (:data:`index.progress.Progress`).
    x_layer: the query's matrix to read (``X``, ``raw`` or a layer's name; default: raw counts wherever they are,
        else log-normalised values).

    Returns :class:`SearchHits`. InputError for an invalid argument, a predicate that is not allowed or matches no
    cell (atlas or query), and a query with no cell expressing the embedder's genes.
    """
    t_start = time.perf_counter()
    _validate(k, mode)
    own = not isinstance(index, AtlasIndex)
    idx = AtlasIndex.open(index) if not isinstance(index, AtlasIndex) else index
    cells: QueryCells | None = None
    try:
        n_searched = len(idx.filter_ids(where)) if where is not None else idx.n_cells  # checks `where` first
        cells = open_query(query, idx, allow_species_mismatch=allow_species_mismatch, x_layer=x_layer)
        cells.check(min_gene_overlap)
        rows = select_cells(cells, cells_where)
        refmap = idx.reference_map()
        kept = len(rows) if mode == "cells" else 1
        run = _Run(idx, mode, searchable_k(k, n_searched, kept), where, refmap, cells.n_cells, _sampled(rows, MAP_POINTS))
        with progress_bar(progress, total=len(rows), desc="search", unit="cell") as bar:
            for chunk in _chunks(cells, rows):
                run.add(chunk)
                bar.update(len(chunk.ids))
        if run.n_used == 0:
            raise no_expression_error(len(rows))
        if run.n_silent:
            logger.warning("%d of %d query cells have no expression on the embedder's genes: left out",
                           run.n_silent, len(rows))
        t_search = time.perf_counter()
        q_rows, ids, scores = run.neighbours()
        obs_names = pd.Index(cells.source.obs.index.astype(str))
        hits = _hits_frame(idx, obs_names, q_rows, ids, scores)
        hit_ids = hits["soma_joinid"].to_numpy()
        enrichment = enrichment_of_hits(idx, hit_ids, where=where)
        mapping = _mapping(idx, mode, where, scores)
        t_enrich = time.perf_counter()
        report: dict[str, Any] = {
            "query": {**query_summary(cells.source, query, cells.n_cells), "cells_where": cells_where,
                      "cells_selected": len(rows), "cells_used": run.n_used, "cells_no_expression": run.n_silent},
            "index": index_summary(idx),
            "params": {"k": int(k), "k_used": run.k, "mode": mode, "where": where, "cells_where": cells_where},
            "species": cells.species,
            "gene_overlap": cells.match.summary() if cells.match is not None else None,
            "hits": {
                "rows": len(hits), "atlas_cells": int(len(np.unique(hit_ids))), "atlas_cells_searched": n_searched,
                "median_similarity": _median(hits["similarity"]),
                "median_nearest_similarity": _median(hits.loc[hits["rank"] == 0, "similarity"]),
            },
            "enriched": top_groups(enrichment),
            "mapping": mapping,
            "map": _map_report(idx, refmap, run, hit_ids),
        }
        t_total = time.perf_counter() - t_start
        report["timings"] = {
            "embed_s": round(run.t_embed, 3), "search_s": round(run.t_search + t_enrich - t_search, 3),
            "total_s": round(t_total, 3),
        }
        logger.info("searched with %d query cells (%s mode) in %.1f s: %d hits, %d distinct atlas cells",
                    run.n_used, mode, t_total, len(hits), report["hits"]["atlas_cells"])
        return SearchHits(hits, enrichment, report)
    finally:
        if cells is not None:
            cells.close()
        if own:
            idx.close()


def _mapping(idx: AtlasIndex, mode: str, where: str | None, scores: np.ndarray) -> dict[str, Any]:
    """Annotate's query-level mapping check from the hits' similarities (``scores``: query cells x neighbours,
    best first), in ``cells`` mode over the whole atlas: a query whose cells are less similar to atlas cells than
    held-out atlas datasets' cells are (another tissue) is warned about, since its hits are then of other types
    than its own. Unaligned (search does not shift the query), so compared with the held-out datasets unaligned."""
    if mode != "cells" or where is not None:
        return {"verdict": "not_judged", "reason": "centroid mode" if mode != "cells" else "the atlas is filtered "
                "(--where): the calibration is of the whole atlas"}
    calibration = mapping_calibration(idx)
    if calibration is None:
        return {"verdict": "uncalibrated", "reason": "the index has no mapping calibration (mapping.json)"}
    if scores.shape[1] < calibration.k:
        return {"verdict": "not_judged", "reason": f"k {scores.shape[1]} is under the calibration's {calibration.k}"}
    similarity = mean_top_similarity(scores, calibration.k)
    verdict = assess_mapping(calibration.cell_scores(similarity, aligned=False), None, calibration)
    if verdict.verdict == "maps_poorly":
        logger.warning(
            "the query maps poorly onto the atlas (another tissue, species or technology?): %s; its hits are then "
            "atlas cells of other types than its own (`scatlas annotate` judges each cell)",
            "; ".join(verdict.reasons) or f"score {verdict.score}")
    return {"verdict": verdict.verdict, "score": verdict.score, "reasons": list(verdict.reasons)}


def _chunks(cells: QueryCells, rows: np.ndarray) -> Iterator[Any]:
    return cells.chunks(DEFAULT_BATCH_SIZE, None if len(rows) == cells.n_cells else rows)


def _median(values: pd.Series) -> float | None:
    return round(float(values.median()), 4) if len(values) else None


# -- writing -----------------------------------------------------------------------------------------------------


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files a search writes beside its hits table ``out`` (``X.parquet`` or ``X.csv``): ``enrichment``
    (``X.enrichment.parquet``/``.csv``), ``report`` (``X.report.json``) and ``map`` (``X.umap.png``)."""
    out = Path(out)
    suffix = "." + table_format(out)
    stem = out.with_suffix("")
    return {
        "hits": out, "enrichment": stem.with_name(stem.name + ".enrichment" + suffix),
        "report": stem.with_name(stem.name + ".report.json"), "map": stem.with_name(stem.name + ".umap.png"),
    }


def check_search_outputs(paths: dict[str, Path | None], inputs: Sequence[str | Path | None]) -> None:
    """Refuse, before any work, outputs that coincide, are inputs, lie inside a store or index, or hold another
    kind of file (:func:`query.outputs.check_table_output`)."""
    check_distinct(list(paths.values()))
    for name, path in paths.items():
        if path is None:
            continue
        if name in ("hits", "enrichment"):
            check_table_output(path, inputs=inputs, header=HITS_FIRST if name == "hits" else
                               tuple(SEARCH_ENRICHMENT_COLUMNS[:2]))
        else:
            check_output_file(path, inputs=inputs, file_kind="json" if name == "report" else "png")


def write_search(
    result: SearchHits, index: AtlasIndex, hits_out: str | Path, *, enrichment_out: str | Path | None = None,
    report_out: str | Path | None = None, map_png: str | Path | None = None,
    inputs: Sequence[str | Path | None] = (),
) -> dict[str, Path]:
    """Write a search's outputs that are given a path: the hits and the enrichment (Parquet or CSV by suffix), the
    report (JSON) and, when the index has a reference map, the query and its hits on it (PNG); each to a temporary
    file, all renamed into place once every one is written (:func:`~query.outputs.published_together`)."""
    check_search_outputs({"hits": Path(hits_out), "enrichment": _path(enrichment_out), "report": _path(report_out),
                          "map": _path(map_png)}, inputs)
    with published_together():
        return _write_search(result, index, hits_out, enrichment_out, report_out, map_png, inputs)


def _write_search(
    result: SearchHits, index: AtlasIndex, hits_out: str | Path, enrichment_out: str | Path | None,
    report_out: str | Path | None, map_png: str | Path | None, inputs: Sequence[str | Path | None],
) -> dict[str, Path]:
    written = {"hits": write_table(result.hits, hits_out, inputs=inputs)}
    if enrichment_out is not None:
        written["enrichment"] = write_table(result.enrichment, enrichment_out, inputs=inputs)
    if report_out is not None:
        written["report"] = write_json(result.report, report_out, inputs=inputs)
    placed = result.report.get("map") or {}
    refmap = index.reference_map() if placed.get("available") else None
    if map_png is not None and refmap is not None:
        labels = index.cells(refmap.ids, ["cell_type"])["cell_type"].to_numpy() if "cell_type" in index.columns() else None
        params = result.report["params"]
        written["map"] = plot_search_map(
            refmap.coords, np.asarray(placed["query_xy"]), np.asarray(placed["hits_xy"]), map_png,
            atlas_labels=labels, centroid_xy=placed.get("centroid_xy"), inputs=inputs,
            title=f"{params['mode']} search, k={params['k']}: {result.report['query']['cells_used']} query cells, "
                  f"{result.report['hits']['atlas_cells']} atlas cells hit",
        )
    return written


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


__all__ = ["CENTROID", "ENRICH_BY", "MODES", "SearchHits", "check_search_outputs", "enrichment_of_hits",
           "no_expression_error", "output_paths", "search_cells", "searchable_k", "select_cells", "write_search"]
