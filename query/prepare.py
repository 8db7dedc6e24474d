"""Cells to embed against an index (an annotate query, a hunt's labelled cells): opened and checked in one place."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.errors import InputError, SpeciesMismatchError
from scatlas.atlas.genes import GeneMatch, check_overlap, identifier_hint
from scatlas.atlas.sources import open_h5ad
from scatlas.atlas.sources.base import iter_cell_chunks
from scatlas.atlas.species import SpeciesGuess, guess_species_of_genes
from scatlas.index import AtlasIndex, Progress, cell_reads, check_obsm, progress_bar

logger = logging.getLogger(__name__)


QUERY_UPDATE_CHUNK = 10_000
"""Cells per chunk read for an embedder's query preparation (:meth:`QueryCells.check`)."""


@dataclass
class QueryCells:
    """Cells opened for embedding with ``index``'s embedder (see :func:`open_query`).

    ``source``: the opened ``.h5ad`` or AnnData (raw counts from X, ``layers['counts']`` or ``.raw`` when present,
    else log-normalised values); ``match``: its genes against the embedder's (None for embedders that read no
    genes); ``what``: how messages name the cells (e.g. ``"query"``); ``species``: the species guessed from the
    cells' genes and from the embedder's (:func:`species_check`; empty for embedders that read no genes);
    ``obs_columns``: the obs columns the embedder reads of query cells that the source has (one it lacks is left
    out of the chunks: the embedder decides what that means; scVI: the cells are one batch named after the source).
    """

    source: Any
    index: AtlasIndex
    match: GeneMatch | None
    what: str
    obsm_keys: tuple[str, ...] = ()
    obs_columns: tuple[str, ...] = ()
    species: dict[str, Any] = field(default_factory=dict)
    query_update: dict[str, Any] = field(default_factory=dict)
    """What the embedder's ``prepare_query`` did for these cells (scVI: the query update of unseen batches)."""

    @property
    def n_cells(self) -> int:
        return int(self.source.n_obs)

    @property
    def embedder(self) -> Any:
        return self.index.embedder

    def check(self, min_gene_overlap: float) -> None:
        """Refuse cells that share fewer than ``min_gene_overlap`` of the embedder's genes (GeneOverlapError) or lack
        the ``obsm`` embedding it reads (InputError); then let an embedder that adapts to queries prepare for these
        cells (``prepare_query``: scVI's scArches update of batches it has not seen; undone by :meth:`close`)."""
        if self.match is not None:
            hint = identifier_hint(self.source.genes, self.embedder.gene_feature_names, self.what)
            check_overlap(self.match, what=self.what, against="index's embedder", min_fraction=min_gene_overlap,
                          hint=hint)
        self.obsm_keys = check_obsm(self.embedder, self.source.obsm_keys(), f"the {self.what}")
        prepare = getattr(self.embedder, "prepare_query", None)  # e.g. scVI's scArches update of unseen batches
        if prepare is not None:
            self.query_update = prepare(lambda: self.chunks(QUERY_UPDATE_CHUNK), what=self.what)

    def chunks(self, chunk_size: int, rows: np.ndarray | None = None) -> Iterator[CellChunk]:
        """The cells (or the rows ``rows``) in chunks of ``chunk_size``; chunk ids are row positions."""
        return iter_cell_chunks(self.source, chunk_size=int(chunk_size), rows=rows, obsm_keys=self.obsm_keys,
                                obs_columns=self.obs_columns)

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
        reset = getattr(self.embedder, "reset_query", None)
        if self.query_update and reset is not None:
            reset()
        self.source.close()


def species_check(genes: Any, embedder: Any, *, what: str = "query", allow_mismatch: bool = False) -> dict[str, Any]:
    """Guess the species of ``genes`` (a GeneVocabulary) and of the genes ``embedder`` reads, and refuse a pair of
    different species (:class:`SpeciesMismatchError`; a warning with ``allow_mismatch``). Returns
    ``{"query": guess, "index": guess, "compatible": bool}`` (guesses as dicts; empty when the embedder has no gene
    list)."""
    emb_genes = getattr(embedder, "genes", None)
    if emb_genes is None or not hasattr(emb_genes, "feature_name"):
        return {}
    mine, theirs = guess_species_of_genes(genes), guess_species_of_genes(emb_genes)
    ok = mine.compatible(theirs)
    out = {"query": mine.to_dict(), "index": theirs.to_dict(), "compatible": ok}
    if ok:
        if mine.species is None or theirs.species is None:
            logger.info("species of the %s's genes: %s; of the embedder's: %s", what, _said(mine), _said(theirs))
        return out
    text = (
        f"species mismatch: the {what}'s genes look {mine.species} ({mine.basis}) but the index's embedder reads "
        f"{theirs.species} genes ({theirs.basis})"
    )
    if allow_mismatch:
        logger.warning("%s; going on as asked (allow_species_mismatch): labels may be meaningless", text)
        return out
    raise SpeciesMismatchError(
        f"{text}: use an index built from {mine.species} cells, or build one with a cross-species embedder; pass "
        "--allow-species-mismatch (allow_species_mismatch=True in Python) to go on anyway"
    )


def _said(guess: SpeciesGuess) -> str:
    return f"{guess.species} ({guess.basis})" if guess.species else f"undecided ({guess.basis})"


def open_query(
    query: str | Path | anndata.AnnData,
    index: AtlasIndex,
    *,
    what: str = "query",
    allow_empty: bool = False,
    allow_species_mismatch: bool = False,
    x_layer: str | None = None,
) -> QueryCells:
    """Open ``query`` (an ``.h5ad`` path, read in chunks, or an AnnData, never modified) for ``index``'s embedder;
    InputError when it has no cells (unless ``allow_empty``). ``what`` names the cells in messages, ``{name}``
    standing for the source's name. Its genes must look like the same species as the embedder's
    (:func:`species_check`: SpeciesMismatchError, unless ``allow_species_mismatch``, then a warning); this runs
    before any gene-overlap check. ``x_layer``: the matrix to read (``X``, ``raw`` or a layer's name; default:
    raw counts wherever they are, else log-normalised values). Call :meth:`QueryCells.check` before embedding, and
    ``close()`` after."""
    source = open_h5ad(query, x_layer=x_layer)
    what = what.format(name=getattr(source, "name", ""))
    try:
        if source.n_obs == 0 and not allow_empty:
            raise InputError(f"the {what} {getattr(source, 'name', '')!r} has no cells")
        embedder = index.embedder
        match = embedder.gene_match(source.genes)
        species = {} if match is None else species_check(
            source.genes, embedder, what=what, allow_mismatch=allow_species_mismatch
        )
        columns = _obs_columns(source, embedder, what)
        _warn_repeated_genes(source.genes, what)
    except BaseException:
        source.close()
        raise
    return QueryCells(source, index, match, what, species=species, obs_columns=columns)


def _warn_repeated_genes(genes: Any, what: str) -> None:
    """Warn when gene names repeat in the query: the first column of each name is the one read."""
    keys = pd.Index(np.asarray(genes.keys, dtype=object))
    repeated = keys[keys.duplicated() & (keys != "")]
    if len(repeated):
        logger.warning("the %s names %d genes more than once (%d extra columns): the first column of each is read, "
                       "the others ignored; make the names unique (e.g. adata.var_names_make_unique(), or sum the "
                       "copies) if another column holds the values", what, repeated.nunique(), len(repeated))


def _obs_columns(source: Any, embedder: Any, what: str) -> tuple[str, ...]:
    """The obs columns ``embedder`` reads of query cells that ``source`` has; those it lacks are logged."""
    wanted = cell_reads(embedder, "query").obs
    have = tuple(c for c in wanted if c in source.obs.columns)
    for column in wanted:
        if column not in have:
            logger.info("the %s has no obs column %r, which the index's embedder reads: its cells are read without it",
                        what, column)
    return have
