"""Exact re-ranking of candidate ids from the stored float16 vectors, batched inside FAISS.

A block of queries' candidates is gathered (one ``np.take`` per shard from the vectors' memory maps) into a reused
float16 buffer, ``c`` rows per query. A scratch FAISS ``IndexIVFScalarQuantizer`` (QT_fp16, inner product, no
residual) has one inverted list per query of the block, each a *view* of that query's ``c`` rows of the buffer:
the lists are set up once per scratch (:class:`RerankScratch`), so a block costs a gather and one
``search_preassigned`` call (query ``i`` scans list ``i`` alone; FAISS's SIMD float16 kernel and top-k, parallel
over the queries), with no Python per query. Results come back as ``(list, offset)`` pairs (``store_pairs``), which
index the block's candidate array directly.

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

from scatlas.atlas.errors import DependencyError
from scatlas.index._faiss import faiss_module
from scatlas.index.stages import StageTimer, stage

logger = logging.getLogger(__name__)

POOL_MAX = 8
"""Idle scratches kept (the most recently returned; more are made when more threads re-rank at once)."""
NAN16 = np.float16(np.nan)


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

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of each query's list (queries ``q``, at most :attr:`lists`): ``(scores, positions)`` where
        ``positions`` index the buffer's rows (``-1`` where a list held fewer than ``k`` finite scores)."""
        faiss = faiss_module()

        m = len(q)
        dist = np.empty((m, k), dtype=np.float32)
        lab = np.empty((m, k), dtype=np.int64)
        self.index.search_preassigned_c(
            m, faiss.swig_ptr(q), k, faiss.swig_ptr(self._assign[:m]), faiss.swig_ptr(self._zeros[:m]),
            faiss.swig_ptr(dist), faiss.swig_ptr(lab), True, None,
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
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of queries ``q`` (n, d) float32 with their candidates ``cand`` (n, c; ``-1`` = none);
    the best ``k`` of each: ``(ids (n, k) int64 -1 padded, scores (n, k) float32 -inf padded)``, best first.

    ``gather(ids, out)`` writes the stored float16 rows of existing ``ids`` into ``out`` (len(ids), d), in order.
    Queries go in blocks whose candidates take at most ``block_bytes`` of float16 (at least one query);
    ``after_block(rows)`` is called after each block with the number of rows it gathered. ``timer``: adds the
    time of the gather, the scan and the id mapping to it (profiling).
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
            with stage(timer, "re-rank scan"):
                scores, pos = scratch.search(q[a:b], kk)
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
