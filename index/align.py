"""Query-to-atlas alignment in the index's embedding space: one global shift estimated from mutual nearest
neighbours (MNN), in the spirit of MNN correction (Haghverdi et al. 2018) but with a single translation
vector.

A query from another batch, chemistry or condition sits, as a whole, a little off the atlas: a cell's nearest
atlas cells are then those that share the offset, not its type. Pairs of mutual nearest neighbours (a query
cell among an atlas cell's ``k`` nearest query cells and vice versa) link like with like, so the mean
difference over MNN pairs estimates the offset without being pulled by differences in cell-type composition (a
plain difference of means would be), and query cells of types the atlas lacks rarely form pairs. The estimate
is iterated (shift, re-pair) until the update is small. It is computed on a random sample of query cells, so
its cost does not grow with the query; every query cell is then shifted by the same vector and re-normalised
before the search.

It lives in the index layer because the build's mapping calibration (:mod:`index.mapping`) aligns held-out atlas
datasets exactly as a query is aligned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from scatlas.index.atlas_index import AtlasIndex
from scatlas.index.vectors import l2_normalize

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE = 5000
MNN_K = 20
"""Neighbours on each side (query -> atlas, atlas -> query) among which mutual pairs are found."""
MAX_ITERATIONS = 4
TOLERANCE = 0.01  # stop when an update moves the query by less than this (Euclidean norm, unit vectors)
MIN_PAIRS = 20
MIN_SAMPLE = 50
"""A sample of fewer query cells is not aligned. With :data:`MNN_K` neighbours a side, nearly every cell of so small
a query is among an atlas cell's nearest query cells, so "mutual" filters nothing and the "offset" is just the way
from the query's cells to their nearest atlas cells, whatever those are: applied, it would make cells of a type the
atlas lacks look as if they mapped onto it. The query-level mapping check, which catches a shift larger than atlas
datasets show among themselves, needs as many cells (``query.mapping.MIN_QUERY_CELLS``)."""
MIN_PAIRED_CELLS = 20
"""An iteration whose MNN pairs hold fewer distinct query cells than this stops the estimate."""


@dataclass(frozen=True)
class Alignment:
    """The shift added to (L2-normalised) query vectors before re-normalising them, and how it was found."""

    shift: np.ndarray  # (dim,) float32
    n_sample: int
    n_pairs: int  # MNN pairs of the last iteration
    n_query_paired: int  # sampled query cells in at least one pair (last iteration)
    iterations: int
    skipped: str | None = None  # why no shift was estimated (the shift is then zero)

    @property
    def applied(self) -> bool:
        """Whether a shift was estimated (else the query is searched as embedded)."""
        return self.skipped is None

    def summary(self) -> dict[str, Any]:
        return {
            "method": "mnn",
            "shift_norm": round(float(np.linalg.norm(self.shift)), 4),
            "n_sample": self.n_sample,
            "n_pairs": self.n_pairs,
            "fraction_sample_paired": round(self.n_query_paired / self.n_sample, 4) if self.n_sample else 0.0,
            "iterations": self.iterations,
            **({"skipped": self.skipped} if self.skipped is not None else {}),
        }


def apply_shift(vectors: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """Shifted, re-normalised float32 vectors (the input is not modified); ``None`` returns them unchanged."""
    if shift is None:
        return vectors
    return l2_normalize(np.asarray(vectors, dtype=np.float32) + shift[None, :].astype(np.float32))


def _mnn_pairs(index: AtlasIndex, q: np.ndarray, k: int, where: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, their partners' atlas vectors) of the mutual nearest-neighbour pairs."""
    import faiss

    res = index.search(q, k, where)
    ids = res.ids
    cand = np.unique(ids[ids >= 0])
    if len(cand) == 0:
        return np.zeros(0, np.int64), np.zeros((0, q.shape[1]), np.float32)
    A = index.vectors(cand)
    kk = min(k, len(q))
    _, back = faiss.knn(
        np.ascontiguousarray(A), np.ascontiguousarray(q), kk, metric=faiss.METRIC_INNER_PRODUCT
    )
    # query row r and atlas id a are a pair when a is among r's neighbours and r among a's.
    rows = np.repeat(np.arange(len(q)), ids.shape[1])
    flat = ids.ravel()
    ok = flat >= 0
    rows, flat = rows[ok], flat[ok]
    cpos = np.searchsorted(cand, flat)
    mutual = (back[cpos] == rows[:, None]).any(axis=1)
    return rows[mutual], A[cpos[mutual]]


def estimate_shift(
    index: AtlasIndex,
    sample: np.ndarray,
    *,
    k: int = MNN_K,
    where: str | None = None,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> Alignment:
    """Iterated MNN estimate of the global offset from the query ``sample`` (L2-normalised) to the atlas."""
    sample = np.asarray(sample, dtype=np.float32)
    shift = np.zeros(sample.shape[1], dtype=np.float32)
    if len(sample) < MIN_SAMPLE:
        why = f"{len(sample)} cells, under the {MIN_SAMPLE} a shift is estimated from"
        logger.info("query alignment skipped: %s", why)
        return Alignment(shift=shift, n_sample=len(sample), n_pairs=0, n_query_paired=0, iterations=0, skipped=why)
    n_pairs = n_paired = 0
    it = 0
    skipped = None
    for it in range(1, max_iterations + 1):  # noqa: B007 - the count is reported
        q = apply_shift(sample, shift)
        rows, partners = _mnn_pairs(index, q, k, where)
        n_pairs, n_paired = len(rows), len(np.unique(rows))
        if n_pairs < MIN_PAIRS or n_paired < MIN_PAIRED_CELLS:
            logger.warning(
                "only %d mutual nearest-neighbour pairs from %d query cells: query alignment stops here",
                n_pairs, n_paired,
            )
            if it == 1:
                skipped = f"{n_pairs} mutual nearest-neighbour pairs from {n_paired} query cells"
            break
        update = (partners - q[rows]).mean(axis=0).astype(np.float32)
        shift = shift + update
        logger.debug(
            "alignment iteration %d: %d MNN pairs, update %.4f", it, n_pairs, float(np.linalg.norm(update))
        )
        if float(np.linalg.norm(update)) < tolerance:
            break
    logger.info(
        "query alignment: shift %.3f from %d MNN pairs (%d of %d sampled cells paired), %d iterations",
        float(np.linalg.norm(shift)),
        n_pairs,
        n_paired,
        len(sample),
        it,
    )
    return Alignment(
        shift=shift, n_sample=len(sample), n_pairs=n_pairs, n_query_paired=n_paired, iterations=it, skipped=skipped
    )
