"""Searching a set of shards that share one trained index, merging top-k across shards, exact re-ranking.

For IVF indexes the coarse quantizer and pre-transforms are applied once per query batch (they are shared by all
shards), then the inverted lists of every shard are scanned in one ``search_preassigned`` pass (every shard is a
clone of the same trained index, so its lists line up: :mod:`index.ivf_scan`), and the best ``rerank``
approximate candidates are re-scored from the stored float16 vectors, their choice of the top k made exact by the
stored rounding residuals where the shards have them (:mod:`index.rerank`). Flat shards
are searched directly and merged exactly (a FAISS ``ResultHeap``).
"""
from __future__ import annotations

import logging
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.errors import IndexFormatError
from scatlas.index._faiss import faiss_module
from scatlas.index.factory import apply_chain, gpu_replicas, is_exact, ivf_of, to_gpu
from scatlas.index.ivf_scan import StackedScan
from scatlas.index.manifest import (
    SHARD_IDS_FILE,
    SHARD_INDEX_FILE,
    SHARD_RESIDUALS_FILE,
    SHARD_VECTORS_FILE,
    ShardRecord,
    residuals_state,
)
from scatlas.index.rerank import EXACT_MARGIN, ScratchPool, exact_top
from scatlas.index.rerank import rerank as rerank_candidates
from scatlas.index.shard import verify_shard
from scatlas.index.slices import Slicer
from scatlas.index.stages import StageTimer, stage
from scatlas.index.vectors import float16_to_float32

logger = logging.getLogger(__name__)

QUERY_BATCH = 4096
"""Queries per FAISS call (bounds the candidate arrays: QUERY_BATCH x rerank x 12 bytes)."""
RERANK_BYTES = 8 << 20
"""Bound on the float16 candidate vectors gathered per block of queries during re-ranking, small enough to stay in
the L3 cache between the gather and the scan (see docs/benchmarks.md#index-re-ranking)."""
MAPPED_BYTES_MAX = 1 << 30
"""Bound on the pages of the stored vectors that re-ranking leaves mapped into this process (counted in its RSS,
though they are the page cache's, shared and clean): past it they are released (:meth:`ShardSearcher.release_pages`).
Below it nothing is released, so repeated searches do not fault the same pages in again: releasing after every
block of candidates, as before, made the gather 2.5x slower at 200k x 1280 (see docs/benchmarks.md#index-re-ranking)."""
FAULT_AROUND_BYTES = 64 << 10
"""What one gathered row may map at most: the kernel maps the cached pages around a faulting one (fault-around,
16 pages by default)."""
EXACT_BLOCK = 65_536
"""Rows of stored vectors per block in exact (brute-force) search."""
EXACT_TIES_MAX = 4096
"""Candidates past the k-th that exact search settles with the residuals at most, per query."""


@dataclass
class _Shard:
    record: ShardRecord
    directory: Path
    index: Any = None
    ivf: Any = None
    ids: np.ndarray | None = None
    vectors: np.ndarray | None = None
    residuals: np.ndarray | None = None
    gpu_index: Any = None
    verified: bool = False


class _Merge:
    """Top-k across shards (a FAISS ResultHeap, as in faiss.contrib.exhaustive_search); one shard needs none."""

    def __init__(self, nq: int, k: int, single: bool) -> None:
        self.k = k
        self._single = single
        self._heap = None if single else faiss_module().ResultHeap(nq, k, keep_max=True)
        self._only: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, dist: np.ndarray, lab: np.ndarray) -> None:
        if self._heap is None:
            self._only = (dist, lab)
        else:
            self._heap.add_result(dist, lab)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self._heap is None:
            assert self._only is not None
            return self._only
        self._heap.finalize()
        return self._heap.D, self._heap.I


class ShardSearcher:
    """Top-k inner-product search over shards (``records`` with their directories) cloned from ``trained``.

    ``verify_on_read``: check a shard's SHA-256 checksums before its ids, vectors or FAISS index are first used
    (once per shard: the check sits where the files are opened, not in the search loops).
    """

    def __init__(
        self, trained: Any, shards: list[tuple[ShardRecord, Path]], *, mmap: bool = False, gpus: int = 0,
        verify_on_read: bool = False,
    ) -> None:
        self.trained = trained
        self.exact = is_exact(trained)
        self._ivf = ivf_of(trained)
        self._shards = [_Shard(rec, path) for rec, path in sorted(shards, key=lambda s: s[0].no)]
        self._starts = np.array([s.record.id_min for s in self._shards], dtype=np.int64)
        self._mmap = mmap
        self.dim = int(trained.d)
        self.gpus = int(gpus)
        self.verify_on_read = bool(verify_on_read)
        self._coarse: Any = self._ivf.quantizer if self._ivf is not None else None
        self._scratches = ScratchPool()
        self._lock = threading.Lock()
        self._mapped_estimate = 0
        self._stack: StackedScan | None = None
        self._slicer = Slicer()
        self._residuals = residuals_state([s.record for s in self._shards])
        self._any_residuals = self._residuals != "none"
        self._loaded = self._vectors_loaded = False
        if self.gpus and self._ivf is not None:
            # the coarse quantizer, shared by every shard, replicated on every GPU (IndexReplicas splits queries)
            self._coarse = gpu_replicas(faiss_module().downcast_index(self._ivf.quantizer), self.gpus)

    @property
    def n_cells(self) -> int:
        return sum(s.record.n for s in self._shards)

    @property
    def nlist(self) -> int | None:
        return int(self._ivf.nlist) if self._ivf is not None else None

    @property
    def id_max(self) -> int:
        return max((s.record.id_max for s in self._shards), default=-1)

    # -- loading -------------------------------------------------------------------------------------------
    def _verify(self, shard: _Shard) -> None:
        """The shard's checksums, before its files are first used (IndexFormatError when they do not match)."""
        if self.verify_on_read and not shard.verified:
            verify_shard(shard.directory, shard.record, checksums=True)
            shard.verified = True

    def _data(self, shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
        if shard.ids is None or shard.vectors is None:
            self._verify(shard)
            try:
                ids = np.load(shard.directory / SHARD_IDS_FILE, mmap_mode="r")
                vectors = np.load(shard.directory / SHARD_VECTORS_FILE, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise IndexFormatError(f"cannot read the vectors of shard {shard.directory} ({exc}); rebuild") from exc
            if ids.ndim != 1 or vectors.shape != (len(ids), self.dim):
                raise IndexFormatError(
                    f"shard {shard.directory}: {len(ids)} ids with vectors of shape {vectors.shape}, expected "
                    f"({len(ids)}, {self.dim}); the index is damaged: rebuild it"
                )
            shard.residuals = self._residuals_of(shard, len(ids))
            shard.ids, shard.vectors = ids, vectors
        return shard.ids, shard.vectors

    def _residuals_of(self, shard: _Shard, n: int) -> np.ndarray | None:
        """The shard's stored rounding residuals (float16 memmap), or None when it has none."""
        if not shard.record.has_residuals:
            return None
        try:
            res = np.load(shard.directory / SHARD_RESIDUALS_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"cannot read the residuals of shard {shard.directory} ({exc}); rebuild") from exc
        if res.shape != (n, self.dim) or res.dtype != np.float16:
            raise IndexFormatError(
                f"shard {shard.directory}: residuals of shape {res.shape} ({res.dtype}), expected float16 "
                f"({n}, {self.dim}); the index is damaged: rebuild it"
            )
        return res

    @property
    def exact_rerank(self) -> bool:
        """Whether every shard stores its rounding residuals (re-ranking then picks the exact top k)."""
        return self._residuals == "all"

    def _index(self, shard: _Shard) -> Any:
        faiss = faiss_module()

        if shard.index is None:
            self._verify(shard)
            path = shard.directory / SHARD_INDEX_FILE
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if self._mmap else 0
            try:
                shard.index = faiss.read_index(str(path), flags)
            except RuntimeError as exc:
                raise IndexFormatError(f"cannot read {path} ({str(exc).strip()[:200]}); rebuild the index") from exc
            if shard.index.ntotal != shard.record.n:
                raise IndexFormatError(f"{path} holds {shard.index.ntotal} vectors, expected {shard.record.n}; rebuild")
            if self._ivf is not None:
                shard.ivf = ivf_of(shard.index)
        return shard.index

    def _search_index(self, shard: _Shard, selector: Any) -> Any:
        """The index to search a flat shard with: its copy on GPU ``shard_no % gpus`` (loaded once), or the CPU
        index when there are no GPUs or a selector filters the search (FAISS GPU indexes take no id selectors)."""
        index = self._index(shard)
        if not self.gpus or selector is not None:
            return index
        if shard.gpu_index is None:
            shard.gpu_index = to_gpu(index, shard.record.no % self.gpus)
        return shard.gpu_index

    def iter_shards(self) -> Any:
        for shard in self._shards:
            ids, vecs = self._data(shard)
            yield shard.record.no, ids, vecs

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """The ids at sorted global row ``positions`` (rows counted over the shards in id order)."""
        chosen: list[np.ndarray] = []
        offset = 0
        for _, sid, _ in self.iter_shards():
            lo, hi = np.searchsorted(positions, [offset, offset + len(sid)])
            if hi > lo:
                chosen.append(np.asarray(sid[positions[lo:hi] - offset], dtype=np.int64))
            offset += len(sid)
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` (1-D, any order) the shards hold (bool mask)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(len(ids), dtype=bool)
        which = np.searchsorted(self._starts, ids, side="right") - 1
        for s in np.unique(which[which >= 0]):
            rows = np.flatnonzero(which == s)
            sid, _ = self._data(self._shards[int(s)])
            if len(sid):
                pos = np.minimum(np.searchsorted(sid, ids[rows]), len(sid) - 1)
                out[rows] = np.asarray(sid[pos]) == ids[rows]
        return out

    # -- search --------------------------------------------------------------------------------------------
    def search(
        self,
        q: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int = 0,
        selector: Any = None,
        batch_size: int = QUERY_BATCH,
        timer: StageTimer | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n, k) int64 -1 padded, scores (n, k) float32 -inf padded)`` for normalised queries ``q``.

        IVF shards are scanned together, in one FAISS pass over all their inverted lists (:mod:`index.ivf_scan`);
        flat shards one by one, their top-k merged. With several FAISS threads, a batch is split into slices that
        threads search start to end, one FAISS thread each (:mod:`index.slices`; not on GPUs). ``timer``: adds the
        time of each stage (coarse assignment, FAISS scan, shard merge, gather, re-rank scan, id mapping) to it
        (profiling: ``bench_index.py profile``).
        """
        n = len(q)
        ids = np.full((n, k), -1, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float32)

        def fill(a: int, b: int) -> None:
            ids[a:b], scores[a:b] = self._search_batch(q[a:b], k, nprobe, rerank, selector, timer)

        self._load_all(vectors=bool(rerank) and not self.exact)  # before threads use them
        self._slicer.run(n, batch_size, fill, parallel=not self.gpus)
        return ids, scores

    def release_pages(self) -> None:
        """Unmap the pages of the stored vectors from this process (they stay in the page cache).

        Re-ranking gathers candidates at random rows, and the kernel maps the neighbouring cached pages of every
        row it faults in (fault-around), so without this the whole vectors file ends up counted in the process's
        RSS (see docs/benchmarks.md#index-re-ranking). Called by re-ranking once the pages it may have mapped
        since the last call reach ``MAPPED_BYTES_MAX`` (:meth:`_note_gathered`).
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for shard in self._shards:
            for mapped in (shard.vectors, shard.residuals):
                raw = getattr(mapped, "_mmap", None)
                if raw is not None:
                    raw.madvise(mmap.MADV_DONTNEED)

    def _search_batch(
        self, q: np.ndarray, k: int, nprobe: int | None, rerank: int, selector: Any, timer: StageTimer | None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = faiss_module()

        q = np.ascontiguousarray(q, dtype=np.float32)
        kc = max(k, rerank) if not self.exact else k
        if self.exact or self._ivf is None or not self._shards:
            merge = _Merge(len(q), kc, single=len(self._shards) == 1)
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            for shard in self._shards:
                with stage(timer, "FAISS scan"):
                    found = self._search_index(shard, selector).search(q, kc, params=params)
                with stage(timer, "shard merge"):
                    merge.add(*found)
            dist, lab = merge.result()
        else:
            with stage(timer, "pre-transform + coarse quantizer"):
                xt = apply_chain(self.trained, q)
                probe = max(1, min(int(nprobe or self._ivf.nprobe), self._ivf.nlist))
                Dq, Iq = self._coarse.search(xt, probe)  # shared by every shard: computed once
            scan = self._stacked()
            with stage(timer, "FAISS scan"):  # every shard in one scan: nothing to merge
                dist, lab = scan.search(xt, Iq, Dq, kc, faiss.SearchParametersIVF(nprobe=probe, sel=selector))
        if not self.exact and rerank:
            return self.rerank(q, lab, k, timer=timer)
        out_ids = lab[:, :k].copy()
        out_scores = dist[:, :k].copy()
        out_scores[out_ids < 0] = -np.inf
        return out_ids, out_scores

    def _load_all(self, *, vectors: bool) -> None:
        """Load every shard's index (and stored vectors) once, under the lock: searches in several threads then
        only read them (the IVF scan over all shards is made here too)."""
        with self._lock:
            if self._loaded and (self._vectors_loaded or not vectors):
                return
            for shard in self._shards:
                self._index(shard)
                if vectors:
                    self._data(shard)
            if self._ivf is not None and not self.exact and self._stack is None and self._shards:
                self._stack = StackedScan(self.trained, [shard.ivf for shard in self._shards])
            self._loaded = True
            self._vectors_loaded = self._vectors_loaded or vectors

    def _stacked(self) -> StackedScan:
        """The scan over every shard's inverted lists (:mod:`index.ivf_scan`)."""
        self._load_all(vectors=False)
        assert self._stack is not None
        return self._stack

    def _gather16(self, ids: np.ndarray, out: np.ndarray, *, residuals: bool = False) -> None:
        """Stored float16 rows of existing ``ids`` (1-D, any order) into ``out`` (len(ids), d) float16, in order;
        ``residuals``: their rounding residuals instead (zeros for shards that have none).

        ``np.take`` from the shards' memmaps (one memcpy per row; ``mode="clip"`` writes straight into ``out``, the
        positions being checked already). Single-threaded on purpose: a parallel gather's threads contend with
        FAISS's at every one of the many small calls (see docs/benchmarks.md#index-re-ranking).
        """
        if len(ids) == 0:
            return
        which = np.searchsorted(self._starts, ids, side="right") - 1
        lo, hi = int(which.min()), int(which.max())
        if lo < 0:
            raise IndexFormatError(f"id {int(ids[which < 0][0])} is below every shard's id range; rebuild the index")
        if lo == hi:
            rows = self._stored(self._shards[lo], residuals)
            if rows is None:
                out[:] = 0
            else:
                np.take(rows, self._positions(self._shards[lo], ids), axis=0, out=out, mode="clip")
            return
        order = np.argsort(which, kind="stable")  # rows grouped by shard: one pass, however many shards
        for group in np.split(order, np.flatnonzero(np.diff(which[order])) + 1):
            shard = self._shards[int(which[group[0]])]
            rows = self._stored(shard, residuals)
            out[group] = 0 if rows is None else np.take(rows, self._positions(shard, ids[group]), axis=0)

    def _gather_residuals(self, ids: np.ndarray, out: np.ndarray) -> None:
        self._gather16(ids, out, residuals=True)
        self._note_gathered(len(ids))

    def _stored(self, shard: _Shard, residuals: bool) -> np.ndarray | None:
        """The shard's stored vectors, or its residuals (None when it has none)."""
        vectors = self._data(shard)[1]
        return shard.residuals if residuals else vectors

    def gather(self, ids: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Stored vectors of existing ids (1-D), in the given order."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        rows = np.empty((len(ids), self.dim), dtype=np.float16)
        self._gather16(ids, rows)
        if np.dtype(dtype) == np.float16:
            return rows
        return np.asarray(float16_to_float32(rows), dtype=dtype)

    def _positions(self, shard: _Shard, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in the shard's stored arrays (ids are sorted within a shard; often contiguous)."""
        sid, _ = self._data(shard)
        rec = shard.record
        if rec.id_max - rec.id_min + 1 == rec.n:  # no holes: the row is the offset
            pos = ids - rec.id_min
            if len(pos) and (pos.min() < 0 or pos.max() >= rec.n):
                raise IndexFormatError(f"an id is outside shard {rec.no}'s range; rebuild the index")
            return pos
        pos = np.minimum(np.searchsorted(sid, ids), len(sid) - 1)
        if not (sid[pos] == ids).all():
            raise IndexFormatError("an id returned by FAISS is not among the shard's stored ids; rebuild the index")
        return pos

    def rerank(
        self, q: np.ndarray, cand: np.ndarray, k: int, *, timer: StageTimer | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of candidates ``cand`` (n, c; -1 = none) from the stored vectors; the best ``k`` each.

        Scores are float32 inner products of the query with the stored float16 vectors (converted exactly to
        float32 inside FAISS's kernel). Queries go in blocks whose candidates fit ``RERANK_BYTES``; each block's
        candidates are gathered from the memory maps in one pass and scored by one FAISS call, parallel over
        queries, with no float32 copy of the candidates and no Python per query (:mod:`index.rerank`). Where every
        shard stores its rounding residuals, the candidates whose float16 scores leave it open whether they belong
        to the top ``k`` are re-scored with them, so the top ``k`` is that of the float32 vectors.
        """
        return rerank_candidates(
            q, cand, k, gather=self._gather16, pool=self._scratches, block_bytes=RERANK_BYTES,
            after_block=self._note_gathered, timer=timer,
            residuals=self._gather_residuals if self._any_residuals else None,
        )  # fmt: skip

    def _note_gathered(self, rows: int) -> None:
        """Count ``rows`` gathered rows towards ``MAPPED_BYTES_MAX``; release the pages once it is reached."""
        total = sum(int(a.nbytes) for s in self._shards for a in (s.vectors, s.residuals) if a is not None)
        with self._lock:
            self._mapped_estimate = min(self._mapped_estimate + rows * FAULT_AROUND_BYTES, total)
            release = self._mapped_estimate >= MAPPED_BYTES_MAX
            if release:
                self._mapped_estimate = 0
        if release:
            self.release_pages()

    def exact_search(self, q: np.ndarray, k: int, *, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the stored float16 vectors (all cells, or the sorted ids ``subset``); where the shards
        store rounding residuals, the top ``k`` is that of the float32 vectors, as re-ranking's (:mod:`index.rerank`):
        the best ``k + EXACT_MARGIN`` by float16 score are settled with the residuals, and the few queries whose
        float16 ties reach past them are searched again with 4 times more, up to ``EXACT_TIES_MAX`` (past it, as many
        cells tie in float16 as make no float32 order worth the memory: their float16 order stands)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.exact or not self._any_residuals or k < 1:
            return self._brute_force(q, k, subset)
        ids = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        cells = self.n_cells if subset is None else len(subset)
        todo, width = np.arange(len(q)), k + EXACT_MARGIN
        while len(todo):
            found, found_scores = self._brute_force(q[todo], width, subset)
            ids[todo], scores[todo], still_open = exact_top(q[todo], found, found_scores, k, self._gather_residuals)
            if width >= min(cells, k + EXACT_TIES_MAX):
                break
            todo, width = todo[still_open], min(width * 4, cells, k + EXACT_TIES_MAX)
        return ids, scores

    def _brute_force(self, q: np.ndarray, k: int, subset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        faiss = faiss_module()

        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        if subset is not None:
            for a in range(0, len(subset), EXACT_BLOCK):
                sub = subset[a : a + EXACT_BLOCK]
                self._add_block(heap, q, self.gather(sub), sub, k)
        else:
            for shard in self._shards:
                sid, vecs = self._data(shard)
                for a in range(0, len(sid), EXACT_BLOCK):
                    block = read_rows(shard.directory / SHARD_VECTORS_FILE, vecs, a, min(a + EXACT_BLOCK, len(sid)))
                    self._add_block(heap, q, block, np.asarray(sid[a : a + EXACT_BLOCK]), k)
        heap.finalize()
        scores = heap.D.copy()
        scores[heap.I < 0] = -np.inf
        return heap.I.copy(), scores

    @staticmethod
    def _add_block(heap: Any, q: np.ndarray, block: np.ndarray, block_ids: np.ndarray, k: int) -> None:
        faiss = faiss_module()

        kb = min(k, len(block))
        dist, lab = faiss.knn(q, np.ascontiguousarray(block), kb, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(dist, np.where(lab >= 0, block_ids[np.maximum(lab, 0)], -1))


def read_rows(path: Path, mm: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-D ``.npy`` as float32, read with plain file reads (sequential scans through a
    memmap would leave every page mapped into this process)."""
    assert isinstance(mm, np.memmap)
    row_bytes = mm.shape[1] * mm.dtype.itemsize
    with open(path, "rb") as fh:
        fh.seek(int(mm.offset) + start * row_bytes)
        data = np.fromfile(fh, dtype=mm.dtype, count=(stop - start) * mm.shape[1])
    return data.reshape(stop - start, mm.shape[1]).astype(np.float32)
