"""Stage 2's unit of work as an executor task (:mod:`index.executor`): score one chunk of stage 1's candidates.

:func:`score_chunk` is a module-level task function, called as ``fn(*args, ctx=TaskContext)`` by the local or the
Ray executor: it reads the chunk's cells from the atlas store in id order, turns them into gene features with the
index's embedder, scores them with stage 2, writes the chunk's partial file atomically (:mod:`query.hunt.partials`)
and returns a small picklable :class:`ChunkScore`. Either executor runs the same function on the same arguments, so
the partial files hold the same ids and scores.

What a task reads travels as a :class:`GeneSource`: in the driver's process it carries the store and embedder the
sweep already opened; pickled (into a Ray task) it is two paths and two expectations, and a worker process opens the
store and the index's embedder once and reuses them for the next chunks (:func:`_open`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.errors import EmbedderMismatchError, InputError, StoreError
from scatlas.atlas.validate import escaped
from scatlas.index import TaskContext
from scatlas.query.hunt.access import open_index
from scatlas.query.hunt.gene_reads import dataset_gene_stats, iter_gene_features
from scatlas.query.hunt.partials import write_npz_atomic, write_partial
from scatlas.query.hunt.stage2 import GeneStage, GeneStats

logger = logging.getLogger(__name__)


class GeneSource:
    """Where stage 2 reads gene features: the atlas store at ``store_path`` and the embedder of the index at
    ``index_path``, which must have fingerprint ``embedder_fingerprint`` while the store holds ``n_cells`` cells
    (what the sweep was planned on). ``store`` / ``embedder``: ones already open in this process (the driver's);
    they do not travel: a pickled source is its paths and expectations, reopened where it is used."""

    def __init__(self, store_path: str | Path, index_path: str | Path, embedder_fingerprint: str, n_cells: int, *,
                 store: Any = None, embedder: Any = None) -> None:
        self.store_path, self.index_path = str(store_path), str(index_path)
        self.embedder_fingerprint, self.n_cells = str(embedder_fingerprint), int(n_cells)
        self._store, self._embedder = store, embedder

    @classmethod
    def of(cls, store: Any, index: Any) -> GeneSource:
        """The source of an opened store and index (their handles kept for tasks run in this process)."""
        embedder = index.embedder
        return cls(store.path, index.path, embedder.fingerprint(), store.n_cells, store=store, embedder=embedder)

    def __reduce__(self) -> tuple[Any, ...]:
        return (GeneSource, (self.store_path, self.index_path, self.embedder_fingerprint, self.n_cells))

    def open(self) -> tuple[Any, Any]:
        """``(store, embedder)``: the ones given, else those this process opened for the same source."""
        if self._store is None or self._embedder is None:
            self._store, self._embedder = _open(self)
        return self._store, self._embedder


_OPENED: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
"""The store and embedder a worker process opened, by source: kept for the chunks that follow (one source)."""
_OPEN_LOCK = threading.Lock()


def _open(source: GeneSource) -> tuple[Any, Any]:
    """Open (once per process) the source's store and its index's embedder, checking both against the sweep's plan."""
    from scatlas.atlas.store import AtlasStore

    key = (source.store_path, source.index_path, source.embedder_fingerprint, source.n_cells)
    with _OPEN_LOCK:
        got = _OPENED.get(key)
        if got is not None:
            return got
        for old_store, _ in _OPENED.values():
            old_store.close()
        _OPENED.clear()
        store = AtlasStore.open(source.store_path)
        if store.n_cells != source.n_cells:
            store.close()
            raise StoreError(f"the atlas store {source.store_path} holds {store.n_cells} cells here, but the sweep "
                             f"was planned on {source.n_cells}: it changed during the sweep; rerun it")
        embedder = open_index(source.index_path).embedder
        if embedder.fingerprint() != source.embedder_fingerprint:
            store.close()
            raise EmbedderMismatchError(
                f"the index at {source.index_path} has embedder {embedder.fingerprint()} here, but the sweep was "
                f"planned with {source.embedder_fingerprint}: the index changed during the sweep; rerun it")
        logger.debug("stage 2: opened %s and the embedder of %s in this process", source.store_path, source.index_path)
        _OPENED[key] = (store, embedder)
        return store, embedder


@dataclass
class ChunkScore:
    """What one stage-2 chunk task returns (its partial file is already written): the chunk's ``name``, its unit
    ``meta`` (size and id range), every candidate's ``ids`` and ``scores``, and the seconds it took."""

    name: str
    meta: dict[str, int]
    ids: np.ndarray
    scores: np.ndarray
    seconds: float


def score_chunk(
    source: GeneSource, stage: GeneStage, ids: np.ndarray, read_size: int, stats: dict[str, GeneStats] | None,
    partial: Path, meta: dict[str, int], *, ctx: TaskContext,
) -> ChunkScore:
    """Stage 2's unit of work: score candidates ``ids`` (sorted, unique atlas ids) read from ``source``,
    ``read_size`` cells per store read, and write their partial file ``partial`` (atomically, with ``meta``).

    ``stats``: the gene statistics of the datasets the chunk spans (by dataset id), for a stage 2 that standardises
    within batches; None for one that does not."""
    t0 = time.perf_counter()
    store, embedder = source.open()
    ids = np.asarray(ids, dtype=np.int64)
    scores = chunk_scores(store, embedder, stage, ids, read_size, stats, progress=ctx.progress)
    write_partial(partial, ids, scores, meta)
    seconds = time.perf_counter() - t0
    logger.debug("stage 2 chunk %s: %d candidates in %.2f s (%s)", partial.stem, len(ids), seconds, ctx.worker)
    return ChunkScore(partial.stem, meta, ids, scores, seconds)


@dataclass
class DatasetStats:
    """What one statistics task returns (its file is already written): the dataset, the file's name, the
    statistics, and the seconds it took."""

    dataset_id: str
    name: str
    stats: GeneStats
    seconds: float


def dataset_stats(
    source: GeneSource, dataset_id: str, n: int, seed: int, read_size: int, path: Path, *, ctx: TaskContext,
) -> DatasetStats:
    """The gene statistics of atlas dataset ``dataset_id`` on ``n`` of its cells drawn with ``seed``
    (:func:`~query.hunt.gene_reads.dataset_gene_stats`), written to ``path`` (atomically) as a task: on Ray the
    datasets' statistics are computed in parallel, like the chunks' scores."""
    t0 = time.perf_counter()
    store, embedder = source.open()
    stats = dataset_gene_stats(store, embedder, dataset_id, n, seed, read_size)
    write_stats(path, stats)
    if ctx.progress is not None:
        ctx.progress(n)  # the cells the task was sized by (a smaller dataset gives fewer)
    return DatasetStats(dataset_id, path.name, stats, time.perf_counter() - t0)


def write_stats(path: Path, stats: GeneStats) -> None:
    """A dataset's gene statistics as the sweep keeps them (``OUT/stage2/stats_NNNN.npz``), written atomically."""
    write_npz_atomic(path, mean=stats.mean, sd=stats.sd, n=np.array([stats.n], dtype=np.int64))


def read_stats(path: Path, n_genes: int) -> GeneStats | None:
    """The statistics :func:`write_stats` wrote, or None when the file is unreadable or not of ``n_genes`` finite
    values (a damaged file: computed again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mean, sd, n = z["mean"].astype(np.float64), z["sd"].astype(np.float64), int(z["n"][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None
    ok = mean.shape == sd.shape == (n_genes,) and np.isfinite(mean).all() and np.isfinite(sd).all()
    return GeneStats(mean, sd, n) if ok else None


def chunk_scores(
    store: Any, embedder: Any, stage: GeneStage, ids: np.ndarray, read_size: int,
    stats: dict[str, GeneStats] | None, progress: Any = None,
) -> np.ndarray:
    """Stage-2 scores (float32) of atlas cells ``ids`` (sorted, unique), in that order. ``stats``: as for
    :func:`score_chunk`; ``progress``: called with the number of cells after each read (None: not called)."""
    scores = np.full(len(ids), np.nan, dtype=np.float32)
    for got, features, dataset_id in iter_gene_features(store, embedder, ids, read_size):
        batch = None
        if stats is not None:
            batch = stats.get(dataset_id)
            if batch is None:
                raise InputError(f"stage 2 was given no gene statistics for dataset {escaped(dataset_id, 60)}; rerun the sweep")
        scores[np.searchsorted(ids, got)] = stage.scores(features, batch)
        if progress is not None:
            progress(len(got))
    if np.isnan(scores).any():
        raise InputError(f"{int(np.isnan(scores).sum())} candidate cells were not read from the atlas store; the "
                         "store changed after the index was built: rebuild the index from this store")
    return scores
