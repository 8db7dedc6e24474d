"""Exact re-ranking of candidate ids from the stored float16 vectors, batched inside FAISS.

A block of queries' candidates is gathered (one ``np.take`` per shard from the vectors' memory maps) into a reused
float16 buffer, ``c`` rows per query. A scratch FAISS ``IndexIVFScalarQuantizer`` (QT_fp16, inner product, no
residual) has one inverted list per query of the block, each a *view* of that query's ``c`` rows of the buffer:
the lists are set up once per scratch (:class:`RerankScratch`), so a block costs a gather and one
``search_preassigned`` call (query ``i`` scans list ``i`` alone; FAISS's SIMD float16 kernel and top-k, parallel
over the queries), with no Python per query. Results come back as ``(list, offset)`` pairs (``store_pairs``), which
index the block's candidate array directly.

Exact choice of the top k. A float16 score ``q . x16`` is within ``delta`` (about ``2**-11 |q|``, float16's unit
roundoff, for unit ``x``: :func:`score_error_bound`) of the float32 one, so only candidates whose float16 score lies
within ``2 delta`` of the k-th best can be on the wrong side of the cut; with ``residuals`` those few (a handful per
query) are re-scored as ``q . x16 + q . r``, to float32's precision, and the top k is chosen from the ones above the
window and the best of the window (:func:`_exact_top`). The scores of candidates above the window stay the float16
ones (within ``delta``), so a cell's score can differ by that much between searches of another k.

Missing candidates (``-1``) are gathered as rows of float16 NaN: their score is NaN, which never enters FAISS's
top-k heap (``score > worst`` is false for NaN), so they are never returned.

Scratches are pooled (:class:`ScratchPool`): a search thread takes one of the shape it needs (candidates per query,
queries per block rounded up to a power of two), uses it and puts it back, so concurrent searches (slices of one
batch, ``AtlasIndex.thread_view``) never share a buffer, and scratches are set up once, not per search.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from scatlas.atlas.errors import DependencyError, IndexFormatError
from scatlas.index._faiss import faiss_module
from scatlas.index.stages import StageTimer, stage
from scatlas.index.vectors import RESIDUAL_SCALE, float16_to_float32_small

logger = logging.getLogger(__name__)

POOL_MAX = 8
"""Idle scratches kept (the most recently returned; more are made when more threads re-rank at once)."""
NAN16 = np.float16(np.nan)
EXACT_MARGIN = 8
"""Candidates past the k-th whose float16 scores are kept for the exact choice of the top k; queries whose float16
ties reach past them are scanned again keeping 4 times more (docs/benchmarks.md#index-re-ranking)."""
F16_UNIT_ROUNDOFF = 2.0**-11
F16_SUBNORMAL_ERROR = 2.0**-25
"""The largest rounding error of a float16 value below 2**-14 (subnormal): absolute, not relative."""
F32_UNIT_ROUNDOFF = 2.0**-24
"""float32's unit roundoff: a sum of ``d`` products errs by at most ``d`` of them times the sum of magnitudes."""


def _view(ptr: Any, nbytes: int) -> Any:
    """A FAISS ``MaybeOwnedVector<uint8_t>`` viewing ``nbytes`` at ``ptr`` (memory it does not own or free)."""
    faiss = faiss_module()

    if not hasattr(faiss, "MaybeOwnedVectorUInt8"):
        raise DependencyError(
            f"re-ranking needs FAISS >= 1.11 (inverted lists that view memory); this is FAISS {faiss.__version__}"
        )
    v = faiss.MaybeOwnedVectorUInt8()
    v.is_owned = False
    v.view_data = ptr
    v.view_size = nbytes
    v.c_ptr = ptr
    v.c_size = nbytes
    return v


class RerankScratch:
    """A scratch FAISS index of ``lists`` inverted lists of ``c`` float16 rows of dimension ``dim`` each, list ``i``
    viewing rows ``[i c, (i + 1) c)`` of :attr:`buffer` (float16, ``(lists * c, dim)``)."""

    def __init__(self, dim: int, c: int, lists: int) -> None:
        faiss = faiss_module()

        self.dim, self.c, self.lists = int(dim), int(c), int(lists)
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False
        )
        index.is_trained = True  # float16 coding needs no training; the coarse quantizer is never used
        index.parallel_mode = 3  # search_preassigned splits the queries over FAISS's threads (0: one thread)
        code_size = int(index.code_size)
        if code_size != 2 * dim:
            raise DependencyError(f"FAISS's float16 codes take {code_size} bytes for {dim} values, not {2 * dim}")
        self.buffer = np.empty((lists * c, dim), dtype=np.float16)
        raw = self.buffer.view(np.uint8).reshape(-1)
        invlists = faiss.downcast_InvertedLists(index.invlists)
        for i in range(lists):
            invlists.resize(i, c)  # sizes each list (its ids, which store_pairs never reads)
        invlists.codes.clear()
        span = c * code_size
        for i in range(lists):
            invlists.codes.push_back(_view(faiss.swig_ptr(raw[i * span : (i + 1) * span]), span))
        for i in (0, lists - 1):  # what FAISS scans must be the views (a FAISS that copies them would scan stale rows)
            if faiss.rev_swig_ptr(invlists.get_codes(i), 1).ctypes.data != raw[i * span :].ctypes.data:
                raise DependencyError(
                    f"FAISS {faiss.__version__} does not scan inverted lists in place, which re-ranking needs; install "
                    "the faiss-cpu version pinned in pyproject.toml"
                )
        index.ntotal = lists * c
        self.index = index
        self._invlists = invlists
        self._assign = np.arange(lists, dtype=np.int64)[:, None]
        self._zeros = np.zeros((lists, 1), dtype=np.float32)

    def search(self, q: np.ndarray, k: int, lists: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of each query's list (queries ``q``, at most :attr:`lists`; query ``i`` scans list ``i``, or
        list ``lists[i]``): ``(scores, positions)`` where ``positions`` index the buffer's rows (``-1`` where a list
        held fewer than ``k`` finite scores)."""
        faiss = faiss_module()

        m = len(q)
        assign = self._assign[:m] if lists is None else np.ascontiguousarray(lists, dtype=np.int64)[:, None]
        q = np.ascontiguousarray(q, dtype=np.float32)  # held here: FAISS reads it through a bare pointer
        dist = np.empty((m, k), dtype=np.float32)
        lab = np.empty((m, k), dtype=np.int64)
        self.index.search_preassigned_c(
            m, faiss.swig_ptr(q), k, faiss.swig_ptr(assign), faiss.swig_ptr(self._zeros[:m]), faiss.swig_ptr(dist),
            faiss.swig_ptr(lab), True, None,
        )  # fmt: skip
        found = lab >= 0
        pos = np.where(found, (lab >> 32) * self.c + (lab & 0xFFFFFFFF), -1)
        return np.where(found, dist, -np.inf).astype(np.float32, copy=False), pos


class ScratchPool:
    """Idle :class:`RerankScratch` objects, shared by the threads of one searcher: at most ``POOL_MAX``, the most
    recently returned (a scratch holds up to ``block_bytes`` of buffer)."""

    def __init__(self) -> None:
        self._idle: list[RerankScratch] = []
        self._lock = threading.Lock()

    def take(self, dim: int, c: int, lists: int) -> RerankScratch:
        """An idle scratch of this shape, or a new one."""
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                sc = self._idle[i]
                if (sc.dim, sc.c, sc.lists) == (dim, c, lists):
                    return self._idle.pop(i)
        return RerankScratch(dim, c, lists)

    def give(self, scratch: RerankScratch) -> None:
        with self._lock:
            self._idle.append(scratch)
            del self._idle[:-POOL_MAX]


def rerank(
    q: np.ndarray,
    cand: np.ndarray,
    k: int,
    *,
    gather: Callable[[np.ndarray, np.ndarray], None],
    pool: ScratchPool,
    block_bytes: int,
    after_block: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
    residuals: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of queries ``q`` (n, d) float32 with the stored vectors of their candidates ``cand`` (n, c;
    ``-1`` = none); the best ``k`` of each: ``(ids (n, k) int64 -1 padded, scores (n, k) float32 -inf padded)``, best
    first.

    ``gather(ids, out)`` writes the stored float16 rows of existing ``ids`` into ``out`` (len(ids), d), in order.
    Queries go in blocks whose candidates take at most ``block_bytes`` of float16 (at least one query);
    ``after_block(rows)`` is called after each block with the number of rows it gathered. ``timer``: adds the
    time of the gather, the scan and the id mapping to it (profiling). ``residuals(ids, out)``: writes the stored
    rounding residuals of ``ids`` the same way; with it the top ``k`` is chosen exactly (see the module's notes).
    """
    n, c = cand.shape
    dim = q.shape[1]
    kk = min(k, c)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or kk == 0:
        return out_ids, out_scores
    q = np.ascontiguousarray(q, dtype=np.float32)
    most = max(1, block_bytes // max(1, c * dim * 2))  # queries per block
    lists = min(most, 1 << (n - 1).bit_length())  # a power of two: few scratch shapes, whatever the batch sizes
    scratch = pool.take(dim, c, lists)
    try:
        for a in range(0, n, lists):
            b = min(a + lists, n)
            flat = np.ascontiguousarray(cand[a:b]).reshape(-1)
            with stage(timer, "candidate gather"):
                n_valid = _gather_block(flat, scratch.buffer[: len(flat)], gather)
            exact = residuals is not None and c > kk
            wide = min(c, kk + EXACT_MARGIN) if exact else kk
            with stage(timer, "re-rank scan"):
                scores, pos = scratch.search(q[a:b], wide)
            if exact:
                assert residuals is not None
                with stage(timer, "exact ties"):
                    scores, pos = _settle(q[a:b], scores, pos, flat, kk, residuals, scratch)
            with stage(timer, "id mapping"):
                out_ids[a:b, :kk] = np.where(pos >= 0, flat[np.maximum(pos, 0)], -1)
                out_scores[a:b, :kk] = scores
            if after_block is not None:
                after_block(n_valid)
    finally:
        pool.give(scratch)
    return out_ids, out_scores


def _gather_block(flat: np.ndarray, rows: np.ndarray, gather: Callable[[np.ndarray, np.ndarray], None]) -> int:
    """Gather the stored rows of candidate ids ``flat`` into ``rows``, float16 NaN for ``-1``; how many existed."""
    valid = flat >= 0
    n_valid = int(valid.sum())
    if n_valid == len(flat):
        gather(flat, rows)
        return n_valid
    got = np.empty((n_valid, rows.shape[1]), dtype=np.float16)
    gather(flat[valid], got)
    rows[valid] = got
    rows[~valid] = NAN16  # missing candidates score NaN: never returned
    return n_valid


def _settle(
    q: np.ndarray, scores: np.ndarray, pos: np.ndarray, flat: np.ndarray, k: int,
    residuals: Callable[[np.ndarray, np.ndarray], None], scratch: RerankScratch,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` of a block's queries from their best float16 ``scores``/``pos`` (m, w): the queries
    whose ties reach past the w columns are scanned again keeping 4 times more, up to all ``scratch.c``
    candidates."""
    top, at, still_open = _exact_top(q, scores, pos, flat, k, residuals)
    again, width = np.flatnonzero(still_open), scores.shape[1]
    while len(again) and width < scratch.c:
        width = min(scratch.c, 4 * width)
        wide_scores, wide_pos = scratch.search(q[again], width, lists=again)
        top[again], at[again], still_open = _exact_top(q[again], wide_scores, wide_pos, flat, k, residuals)
        again = again[still_open]
    return top, at


def _exact_top(
    q: np.ndarray, scores: np.ndarray, pos: np.ndarray, flat: np.ndarray, k: int,
    residuals: Callable[[np.ndarray, np.ndarray], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact top ``k`` of each query from its best candidates' float16 ``scores`` (m, w >= k; best first,
    ``-inf`` for none) at block rows ``pos`` (ids ``flat[pos]``): ``(scores, pos, open)``, the first two (m, k) best
    first; ``open`` (m,) marks the queries whose last column is still within the window (candidates beyond the w
    given may belong to their top k: ask again with more).

    With ``s_k`` the k-th float16 score and ``delta`` the bound on a float16 score's error, a candidate above
    ``s_k + 2 delta`` beats, in float32, every candidate from the k-th on, so it is in the top k; one below
    ``s_k - 2 delta`` is beaten by the k candidates before it, so it is not. The ones in between are re-scored with
    their residuals and the top k is taken by score: a sure candidate can only be outranked by candidates ranked
    before the k-th, so all of them are kept, and the window's best fill the rest.
    """
    dim = q.shape[1]
    window = (2 * score_error_bound(q))[:, None]
    kth = scores[:, k - 1 : k]
    with np.errstate(invalid="ignore"):  # -inf - -inf where a query has fewer than k candidates: never in it
        tied = np.abs(scores - kth) <= window
    # the last column in the window: the next candidates may be too (not for a zero query: all its scores tie)
    still_open = tied[:, -1] & (window[:, 0] > 0)
    rows, cols = np.nonzero(tied)
    if len(rows) == 0:
        return scores[:, :k], pos[:, :k], still_open
    width = max(k, int(cols.max()) + 1)  # columns past the last tied one cannot enter the top k
    key = scores[:, :width].copy()
    got = np.empty((len(rows), dim), dtype=np.float16)
    residuals(flat[pos[rows, cols]], got)
    fix = np.einsum("ij,ij->i", q[rows], float16_to_float32_small(got)) * np.float32(1 / RESIDUAL_SCALE)
    if not (np.abs(fix) <= window[rows, 0]).all():  # |q . r| <= delta: more (or NaN) is a damaged residuals file
        raise IndexFormatError(
            "the stored rounding residuals of a shard are damaged (a correction exceeds float16's rounding error); "
            "run `scatlas verify --index INDEX` and rebuild the index with --overwrite"
        )
    key[rows, cols] += fix
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(key, order, axis=1), np.take_along_axis(pos[:, :width], order, axis=1), still_open


def score_error_bound(q: np.ndarray) -> np.ndarray:
    """Per query (rows of ``q``), a bound on ``|q . x - s16|`` for unit vectors ``x``, ``s16`` being FAISS's float32
    score of the float16 ``x16``: float16's rounding (``2**-11 |q|``, subnormals ``2**-25 sum |q_i|``) and the float32
    sum (``d 2**-24 |q|``)."""
    norm = np.linalg.norm(q, axis=1)
    dim = q.shape[1]
    bound = (F16_UNIT_ROUNDOFF + dim * F32_UNIT_ROUNDOFF) * 1.001 * norm + F16_SUBNORMAL_ERROR * np.abs(q).sum(axis=1)
    return bound.astype(np.float32)


def exact_top(
    q: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int, residuals: Callable[[np.ndarray, np.ndarray], None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_exact_top` over search results ``(ids, scores)`` (n, w; best first, ``-1``/``-inf`` padded):
    ``(ids, scores, open)``, the first two (n, k)."""
    flat = ids.reshape(-1)
    pos = np.where(ids >= 0, np.arange(flat.size, dtype=np.int64).reshape(ids.shape), -1)
    top, at, still_open = _exact_top(np.ascontiguousarray(q, dtype=np.float32), scores, pos, flat, k, residuals)
    return np.where(at >= 0, flat[np.maximum(at, 0)], -1), top, still_open
