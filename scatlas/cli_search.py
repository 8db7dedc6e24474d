"""``scatlas search``: a thin command over :func:`scatlas.query.search.search_cells`.

:mod:`scatlas.cli` registers the command on its group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scatlas.cli_common import (
    PathArg,
    _echo,
    _value,
    index_option,
    progress_option,
    query_gene_options,
    query_matrix_option,
)


@click.command()
@click.argument("query_file", type=PathArg(dir_okay=False, path_type=Path))
@index_option
@click.option("--out", "out_path", type=PathArg(dir_okay=False, path_type=Path), required=True,
              metavar="FILE.parquet|FILE.csv",
              help="Hits table: one row per (query cell, atlas neighbour) with the atlas cell's metadata. Beside it: "
                   "FILE.enrichment.parquet|.csv (the hits by dataset, tissue, disease and cell type against the "
                   "atlas), FILE.report.json and, when the index has a reference map, FILE.umap.png.")
@click.option("--k", type=click.IntRange(min=1), default=30, show_default=True,
              help="Atlas cells found per query cell (--mode cells) or for the centroid (--mode centroid).")
@click.option("--mode", type=click.Choice(["cells", "centroid"]), default="cells", show_default=True,
              help="cells: the nearest atlas cells of each query cell; centroid: the atlas cells nearest the mean of "
                   "the query cells' vectors.")
@click.option("--where", default=None, help="SQL filter over the atlas cells searched, e.g. \"tissue = 'lung'\".")
@click.option("--cells-where", default=None,
              help="SQL predicate over the query's obs choosing the query cells to search with, e.g. "
                   "\"cell_type = 'B cell' AND donor_id = 'd1'\" (default: every cell).")
@query_gene_options
@query_matrix_option
@progress_option
def search(query_file: Path, index_dir: Path, out_path: Path, k: int, mode: str, where: str | None,
           cells_where: str | None, min_gene_overlap: float, allow_species_mismatch: bool, x_layer: str | None,
           progress: bool) -> None:
    """Find the atlas cells most similar to the cells of QUERY_FILE (.h5ad), embedded with the index's embedder,
    and where the hits come from (dataset, tissue, disease, cell type; Fisher test, BH q)."""
    from scatlas.index import AtlasIndex
    from scatlas.query.outputs import remove_stale
    from scatlas.query.search import check_search_outputs, output_paths, search_cells, write_search

    paths = output_paths(out_path)
    inputs = (query_file, index_dir)
    check_search_outputs(dict(paths), inputs)
    with AtlasIndex.open(index_dir) as idx:
        result = search_cells(query_file, idx, k=k, mode=mode, where=where, cells_where=cells_where,  # type: ignore[arg-type]
                              min_gene_overlap=min_gene_overlap, allow_species_mismatch=allow_species_mismatch,
                              progress=progress, x_layer=x_layer)
        has_map = bool(result.report["map"].get("available"))
        written = write_search(result, idx, paths["hits"], enrichment_out=paths["enrichment"],
                               report_out=paths["report"], map_png=paths["map"] if has_map else None, inputs=inputs)
    if not has_map:
        remove_stale(paths["map"], "png")  # an earlier run's picture would not show these hits
    _echo_search(result.report)
    _echo("wrote " + ", ".join(str(p) for p in written.values()))


def _echo_search(report: dict[str, Any]) -> None:
    q, hits, overlap = report["query"], report["hits"], report.get("gene_overlap") or {}
    chosen = f" chosen by --cells-where of {q['n_cells']:,}" if q.get("cells_where") else ""
    silent = f"; {q['cells_no_expression']:,} without expression on the embedder's genes left out" \
        if q.get("cells_no_expression") else ""
    _echo(f"query: {q['cells_used']:,} cells used{chosen}{silent}"
          + (f"; gene overlap {overlap.get('n_matched')} of the embedder's {overlap.get('n_target_genes')} genes"
             if overlap else ""))
    mode = report["params"]["mode"]
    what = "the centroid's" if mode == "centroid" else f"{q['cells_used']:,} cells x"
    k = report["params"]["k"]
    if hits["atlas_cells_searched"] < k:  # a cell cannot have more neighbours than there are cells to search
        k = f"{hits['atlas_cells_searched']:,} (--k {k:,}, but only {hits['atlas_cells_searched']:,} atlas cells searched)"
    _echo(f"hits: {hits['rows']:,} ({what} k={k}), {hits['atlas_cells']:,} distinct atlas cells "
          f"of {hits['atlas_cells_searched']:,} searched; median similarity {hits['median_similarity']}"
          + (f" (nearest {hits['median_nearest_similarity']})" if mode == "cells" else ""))
    for column, groups in report.get("enriched", {}).items():
        top = ", ".join(f"{_value(g['group'])} ({g['n_hits']:,} hits, {g['fold']:.3g}x, q {g['qvalue']:.2g})"
                        for g in groups)
        _echo(f"enriched {column}: {top or 'none (q <= 0.05)'}")
