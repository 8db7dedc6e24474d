"""Cells to embed against an index (an annotate query, a hunt's labelled cells): opened and checked in one place."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import GeneMatch, check_overlap
from scatlas.atlas.sources import open_h5ad
from scatlas.atlas.sources.base import iter_cell_chunks
from scatlas.index import AtlasIndex, Progress, check_obsm, progress_bar


@dataclass
class QueryCells:
    """Cells opened for embedding with ``index``'s embedder (see :func:`open_query`).

    ``source``: the opened ``.h5ad`` or AnnData (raw counts from X, ``layers['counts']`` or ``.raw`` when present,
    else log-normalised values); ``match``: its genes against the embedder's (None for embedders that read no
    genes); ``what``: how messages name the cells (e.g. ``"query"``).
    """

    source: Any
    index: AtlasIndex
    match: GeneMatch | None
    what: str
    obsm_keys: tuple[str, ...] = ()

    @property
    def n_cells(self) -> int:
        return int(self.source.n_obs)

    @property
    def embedder(self) -> Any:
        return self.index.embedder

    def check(self, min_gene_overlap: float) -> None:
        """Refuse cells that share fewer than ``min_gene_overlap`` of the embedder's genes (GeneOverlapError) or lack
        the ``obsm`` embedding it reads (InputError)."""
        if self.match is not None:
            check_overlap(self.match, what=self.what, against="index's embedder", min_fraction=min_gene_overlap)
        self.obsm_keys = check_obsm(self.embedder, self.source.obsm_keys(), f"the {self.what}")

    def chunks(self, chunk_size: int, rows: np.ndarray | None = None) -> Iterator[CellChunk]:
        """The cells (or the rows ``rows``) in chunks of ``chunk_size``; chunk ids are row positions."""
        return iter_cell_chunks(self.source, chunk_size=int(chunk_size), rows=rows, obsm_keys=self.obsm_keys)

    def embed(self, rows: np.ndarray, chunk_size: int, progress: Progress = False) -> np.ndarray:
        """``(len(rows), dim)`` float32 L2-normalised vectors of the rows ``rows`` (sorted), by the index's embedder."""
        out = np.empty((len(rows), self.index.dim), dtype=np.float32)
        pos = 0
        with progress_bar(progress, total=len(rows), desc=f"embed {self.what}", unit="cell") as bar:
            for chunk in self.chunks(chunk_size, rows):
                vec = np.asarray(self.index.embed(chunk), dtype=np.float32)
                if vec.shape != (len(chunk), out.shape[1]):
                    raise InputError(f"the embedder returned shape {vec.shape} for {len(chunk)} cells")
                out[pos : pos + len(chunk)] = vec
                pos += len(chunk)
                bar.update(len(chunk))
        return out

    def close(self) -> None:
        self.source.close()


def open_query(
    query: str | Path | anndata.AnnData, index: AtlasIndex, *, what: str = "query", allow_empty: bool = False
) -> QueryCells:
    """Open ``query`` (an ``.h5ad`` path, read in chunks, or an AnnData, never modified) for ``index``'s embedder;
    InputError when it has no cells (unless ``allow_empty``). ``what`` names the cells in messages, ``{name}``
    standing for the source's name. Call :meth:`QueryCells.check` before embedding, and ``close()`` after."""
    source = open_h5ad(query)
    what = what.format(name=getattr(source, "name", ""))
    try:
        if source.n_obs == 0 and not allow_empty:
            raise InputError(f"the {what} {getattr(source, 'name', '')!r} has no cells")
        match = index.embedder.gene_match(source.genes)
    except BaseException:
        source.close()
        raise
    return QueryCells(source, index, match, what)
