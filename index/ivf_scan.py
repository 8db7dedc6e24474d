"""Scanning the inverted lists of every IVF shard as one index: one FAISS pass per query batch, no shard merge.

Every shard is a clone of the same trained IVF index, so list ``i`` of every shard holds the codes of the cells
assigned to centroid ``i``. FAISS's ``HStackInvertedLists`` presents the shards' lists as one set of lists (list
``i`` = the shards' lists ``i`` one after the other; each probed list is concatenated for the scan), and a clone of
the trained IVF index over it scans them in one ``search_preassigned`` call: the query's distance tables are
computed once instead of once per shard, and one top-k heap replaces a heap per shard and their merge
(docs/benchmarks.md#index-search-profile). A single shard's lists are used as they are.

The scanner splits a batch's queries over FAISS's threads (``parallel_mode`` 3). Splitting a single query's
probed lists instead (``parallel_mode`` 1) was tried for single-query calls and dropped: on a machine shared with
other jobs, the OpenMP region it opens per query (every thread waiting for the slowest) made them several times
slower than one thread.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from scatlas.atlas.errors import IndexFormatError
from scatlas.index._faiss import faiss_module
from scatlas.index.factory import clone, ivf_of

logger = logging.getLogger(__name__)

PARALLEL_MODE = 3
"""``search_preassigned`` splits the queries over FAISS's threads (the default 0 runs it on one thread;
``IndexIVF.search`` splits the queries itself before calling it)."""


class StackedScan:
    """One IVF scan over the inverted lists of ``ivfs`` (the IVF parts of loaded shards, cloned from ``trained``).

    The shards' indexes must stay alive as long as this object (their lists are referenced, not copied).
    """

    def __init__(self, trained: Any, ivfs: list[Any]) -> None:
        faiss = faiss_module()

        self._ivfs = ivfs
        if len(ivfs) == 1:
            self._lists: Any = ivfs[0].invlists
        else:
            self._ptrs = faiss.InvertedListsPtrVector()
            for ivf in ivfs:
                self._ptrs.push_back(ivf.invlists)
            self._lists = faiss.HStackInvertedLists(len(ivfs), self._ptrs.data())
        self._holder = clone(trained)  # owns the IVF object below
        ivf = ivf_of(self._holder)
        if ivf is None:
            raise IndexFormatError("the trained index has no IVF part to scan the shards' inverted lists with")
        self._ivf: Any = ivf
        self._ivf.replace_invlists(self._lists, False)
        self._ivf.ntotal = sum(int(ivf.ntotal) for ivf in ivfs)
        self._ivf.parallel_mode = PARALLEL_MODE

    def search(
        self, xt: np.ndarray, Iq: np.ndarray, Dq: np.ndarray, k: int, params: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` ``(scores, ids)`` over every shard of pre-transformed queries ``xt`` probing lists ``Iq``
        (coarse scores ``Dq``); ``params``: FAISS ``SearchParametersIVF`` (nprobe, id selector)."""
        faiss = faiss_module()

        nq = len(xt)
        dist = np.empty((nq, k), dtype=np.float32)
        lab = np.empty((nq, k), dtype=np.int64)
        self._ivf.search_preassigned_c(
            nq, faiss.swig_ptr(xt), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq), faiss.swig_ptr(dist),
            faiss.swig_ptr(lab), False, params,
        )  # fmt: skip
        return dist, lab
