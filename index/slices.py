"""Splitting a batch of queries over threads, each running the whole search of its slice on one FAISS thread.

This is how ``IndexIVF.search`` itself parallelises (``parallel_mode`` 0: the queries split over OpenMP threads,
every slice searched start to end by one thread), applied to the whole of our search: coarse quantizer, scan,
gather and re-ranking. Slices need no synchronisation until they are done, whereas one OpenMP region per step
(coarse quantizer, scan, each re-ranking block) makes every thread wait for the slowest at each step; on a
machine shared with other jobs a descheduled thread stalls the others at every such barrier
(docs/benchmarks.md#index-search-profile).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from scatlas.index._faiss import faiss_module

MIN_SLICE = 32
"""Fewer queries than twice this are searched in the calling thread (with FAISS's own threads)."""
SLICES_PER_THREAD = 1
"""Slices per thread, as ``IndexIVF.search`` splits its queries: one each was faster than four (whose smaller slices
let a thread that finishes early take the next one; "4 slices per thread" in docs/benchmarks.md#index-search-profile)."""


def spans(n: int, batch_size: int, threads: int) -> list[tuple[int, int]]:
    """``[start, stop)`` slices of ``n`` queries for ``threads`` threads, none over ``batch_size``."""
    size = max(MIN_SLICE, math.ceil(n / max(1, threads * SLICES_PER_THREAD))) if threads > 1 else n
    size = max(1, min(size, batch_size))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


class Slicer:
    """Runs ``fn(start, stop)`` over the slices of a batch: on a pool of threads that use one FAISS thread each
    when FAISS has several threads and the batch is large enough, else in the calling thread, in order."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0
        self._lock = threading.Lock()

    def run(self, n: int, batch_size: int, fn: Callable[[int, int], None], *, parallel: bool = True) -> None:
        faiss = faiss_module()

        threads = int(faiss.omp_get_max_threads())
        if not parallel or threads < 2 or n < 2 * MIN_SLICE:
            for a in range(0, n, batch_size):
                fn(a, min(a + batch_size, n))
            return
        pool = self._pool_of(threads)
        for _ in pool.map(lambda ab: fn(*ab), spans(n, batch_size, threads)):
            pass  # re-raises a slice's exception here

    def _pool_of(self, threads: int) -> ThreadPoolExecutor:
        faiss = faiss_module()

        with self._lock:
            if self._pool is None or self._threads != threads:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(
                    threads, "scatlas-search", initializer=faiss.omp_set_num_threads, initargs=(1,)
                )
                self._threads = threads
            return self._pool
