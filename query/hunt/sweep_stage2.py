"""Stage 2 of a two-stage sweep: score stage 1's candidates on their gene features read from the atlas store.

The candidates (sorted ids) are cut into chunks of ``chunk_size`` ids, read in id order from the store, turned into
gene features by the index's embedder and scored by the classifier's stage 2. Each chunk's scores (every
candidate's, hit or not) go to ``OUT/stage2/NNNN.npz`` (atomically) before the sweep state records the chunk, so an
interrupted stage 2 resumes where it stopped, to the same hits. Memory: one chunk's expression and features.

A stage 2 that standardises genes within batches needs each candidate dataset's gene statistics: computed once per
dataset with candidates, on :data:`~query.hunt.stage2.BATCH_SAMPLE` of its cells drawn with :data:`STATS_SEED`
(so a rerun computes the same), and kept in ``OUT/stage2/stats_NNNN.npz`` (recorded in the sweep state).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import InputError
from scatlas.atlas.outputs import writing
from scatlas.index import Progress, progress_bar
from scatlas.query.hunt.gene_reads import dataset_gene_stats, iter_gene_features
from scatlas.query.hunt.partials import meta_of, read_partial, write_partial
from scatlas.query.hunt.stage2 import GeneStage, GeneStats

logger = logging.getLogger(__name__)

STAGE2_DIR = "stage2"
DEFAULT_CHUNK = 5_000
"""Candidates read and scored per stage-2 chunk (one partial file each)."""
STATS_SEED = 0
"""Seed of the cells sampled from a dataset for its gene statistics."""


@dataclass
class Stage2Result:
    """Every candidate's stage-2 score (ids sorted), and what this run did."""

    ids: np.ndarray
    scores: np.ndarray
    n_chunks: int
    n_resumed: int
    seconds: float


def score_candidates(
    store: Any, embedder: Any, stage: GeneStage, candidates: np.ndarray, out: Path, state: dict[str, Any],
    state_path: Path, *, chunk_size: int = DEFAULT_CHUNK, progress: Progress = False,
) -> Stage2Result:
    """Stage-2 scores of ``candidates`` (sorted, unique atlas ids), chunk by chunk, resuming the chunks that
    ``state["stage2"]`` records with an intact partial file."""
    if chunk_size <= 0:
        raise InputError(f"the stage 2 chunk size must be positive (got {chunk_size})")
    names = embedder.gene_feature_names
    if list(names or []) != stage.gene_names:
        raise InputError("the index's embedder does not compute the genes stage 2 was trained on; retrain the "
                         "classifier against this index (scatlas hunt train)")
    t0 = time.perf_counter()
    (out / STAGE2_DIR).mkdir(exist_ok=True)
    done: dict[str, Any] = state.setdefault("stage2", {}).setdefault("chunks", {})
    ids_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    n_resumed = 0
    stats = _BatchStats(store, embedder, stage, out, state, state_path, chunk_size)
    starts = range(0, len(candidates), chunk_size)
    with progress_bar(progress, total=len(candidates), desc="stage 2", unit="cell") as bar:
        for no, a in enumerate(starts):
            ids = candidates[a : a + chunk_size]
            name, meta = f"{no:04d}", meta_of(ids)
            path = out / STAGE2_DIR / f"{name}.npz"
            got = read_partial(path, meta) if done.get(name) == meta else None
            if got is None:
                got = (ids, _score_chunk(store, embedder, stage, ids, chunk_size, stats))
                write_partial(path, got[0], got[1], meta)
                done[name] = meta
                write_json_atomic(state_path, state)
            else:
                n_resumed += 1
            ids_parts.append(got[0])
            score_parts.append(got[1])
            bar.update(len(ids))
    all_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
    scores = np.concatenate(score_parts) if score_parts else np.zeros(0, dtype=np.float32)
    return Stage2Result(all_ids, scores, len(starts), n_resumed, time.perf_counter() - t0)


class _BatchStats:
    """The gene statistics of the candidates' datasets (None for a stage 2 without batches): from this run's
    memory, else the sweep directory's file, else computed and written there (then recorded in the state)."""

    def __init__(self, store: Any, embedder: Any, stage: GeneStage, out: Path, state: dict[str, Any],
                 state_path: Path, chunk_size: int) -> None:
        self.store, self.embedder, self.stage, self.chunk_size = store, embedder, stage, chunk_size
        self.out, self.state, self.state_path = out, state, state_path
        self.known: dict[str, GeneStats] = {}

    def __call__(self, dataset_id: str) -> GeneStats | None:
        if not self.stage.batch_standardized:
            return None
        if dataset_id in self.known:
            return self.known[dataset_id]
        files: dict[str, str] = self.state["stage2"].setdefault("stats", {})
        name = files.get(dataset_id)
        got = _read_stats(self.out / STAGE2_DIR / name, len(self.stage.weights)) if name else None
        if got is None:
            got = dataset_gene_stats(self.store, self.embedder, dataset_id, self.stage.batch_sample, STATS_SEED,
                                     self.chunk_size)
            name = name or f"stats_{len(files):04d}.npz"
            _write_stats(self.out / STAGE2_DIR / name, got)
            files[dataset_id] = name
            write_json_atomic(self.state_path, self.state)
        self.known[dataset_id] = got
        return got


def _write_stats(path: Path, stats: GeneStats) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path), open(tmp, "wb") as fh:
            np.savez(fh, mean=stats.mean, sd=stats.sd, n=np.array([stats.n], dtype=np.int64))
            fh.flush()
            os.fsync(fh.fileno())
        with writing(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_stats(path: Path, n_genes: int) -> GeneStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            mean, sd, n = z["mean"].astype(np.float64), z["sd"].astype(np.float64), int(z["n"][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None
    ok = mean.shape == sd.shape == (n_genes,) and np.isfinite(mean).all() and np.isfinite(sd).all()
    return GeneStats(mean, sd, n) if ok else None


def _score_chunk(store: Any, embedder: Any, stage: GeneStage, ids: np.ndarray, chunk_size: int,
                 stats: Any = None) -> np.ndarray:
    """Stage-2 scores of one chunk of candidate ids (sorted), in that order; ``stats(dataset_id)`` gives a
    dataset's gene statistics (None: stage 2 reads the features as they are)."""
    scores = np.full(len(ids), np.nan, dtype=np.float32)
    for got, features, dataset_id in iter_gene_features(store, embedder, ids, chunk_size):
        scores[np.searchsorted(ids, got)] = stage.scores(features, stats(dataset_id) if stats is not None else None)
    if np.isnan(scores).any():
        raise InputError(f"{int(np.isnan(scores).sum())} candidate cells were not read from the atlas store; the "
                         "store changed after the index was built: rebuild the index from this store")
    return scores
