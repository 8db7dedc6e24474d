"""Stage 2 of a two-stage sweep: score stage 1's candidates on their gene features read from the atlas store.

The candidates (sorted ids) are cut into chunks of ``chunk_size`` ids; each chunk not done before is one executor
task (:func:`query.hunt.stage2_tasks.score_chunk`: read in id order from the store, turned into gene features by
the index's embedder, scored by the classifier's stage 2, its scores, every candidate's, hit or not, written to
``OUT/stage2/NNNN.npz`` atomically). The driver records each finished chunk in the sweep state, so an interrupted
stage 2 resumes where it stopped, to the same hits. Locally the chunks run in this process one after the other
(stage 2 is CPU work: the GPUs a local executor may hold do not help it); on Ray, as Ray tasks over the cluster,
which must see the atlas store and the index at the same paths. Memory per task: one chunk's expression and
features.

A stage 2 that standardises genes within batches needs each candidate dataset's gene statistics: they are computed
before the chunks' tasks, once per dataset holding candidates, as tasks of the same executor (in parallel on Ray), on
:data:`~query.hunt.stage2.BATCH_SAMPLE` of its cells drawn with :data:`STATS_SEED` (so a rerun computes the same),
kept in ``OUT/stage2/stats_NNNN.npz`` (recorded in the sweep state as each finishes) and given to each chunk's task
for the datasets its chunk spans.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import InputError
from scatlas.index import Executor, LocalExecutor, Progress, Task, progress_bar
from scatlas.query.hunt import stage2_tasks
from scatlas.query.hunt.partials import meta_of, read_partial
from scatlas.query.hunt.stage2 import GeneStage, GeneStats
from scatlas.query.hunt.stage2_tasks import ChunkScore, DatasetStats, GeneSource

logger = logging.getLogger(__name__)

STAGE2_DIR = "stage2"
DEFAULT_CHUNK = 5_000
"""Candidates read and scored per stage-2 chunk (one task and one partial file each)."""
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
    source: GeneSource, stage: GeneStage, candidates: np.ndarray, out: Path, state: dict[str, Any],
    state_path: Path, *, chunk_size: int = DEFAULT_CHUNK, progress: Progress = False,
    executor: Executor | None = None,
) -> Stage2Result:
    """Stage-2 scores of ``candidates`` (sorted, unique atlas ids), one task per chunk of ``chunk_size`` ids,
    resuming the chunks that ``state["stage2"]`` records with an intact partial file.

    ``source``: the atlas store and the index's embedder (:class:`~query.hunt.stage2_tasks.GeneSource`, open in
    this process). ``out`` / ``state`` / ``state_path``: the sweep directory and its state (updated and written as
    chunks finish). ``executor``: where the chunk tasks run: a Ray executor spreads them over its cluster; None or a
    local executor runs them in this process, one after the other."""
    if chunk_size <= 0:
        raise InputError(f"the stage 2 chunk size must be positive (got {chunk_size})")
    store, embedder = source.open()
    names = embedder.gene_feature_names
    if list(names or []) != stage.gene_names:
        raise InputError("the index's embedder does not compute the genes stage 2 was trained on; retrain the "
                         "classifier against this index (scatlas hunt train)")
    t0 = time.perf_counter()
    (out / STAGE2_DIR).mkdir(exist_ok=True)
    done: dict[str, Any] = state.setdefault("stage2", {}).setdefault("chunks", {})
    run_on = executor if executor is not None and executor.name != "local" else LocalExecutor(["cpu"])
    stats = _BatchStats(source, stage, out, state, state_path, chunk_size)
    stats.compute(candidate_datasets(store, candidates), run_on, progress)
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tasks: list[Task] = []
    starts = range(0, len(candidates), chunk_size)
    for no, a in enumerate(starts):
        ids = candidates[a : a + chunk_size]
        name, meta = f"{no:04d}", meta_of(ids)
        path = out / STAGE2_DIR / f"{name}.npz"
        got = read_partial(path, meta) if done.get(name) == meta else None
        if got is not None:
            results[name] = got
            continue
        chunk_stats = stats.of(candidate_datasets(store, ids)) if stage.batch_standardized else None
        tasks.append(Task(f"stage2-{name}", stage2_tasks.score_chunk,
                          (source, stage, ids, chunk_size, chunk_stats, path, meta), cells=len(ids)))
    n_resumed = len(results)
    if n_resumed:
        logger.info("stage 2: resuming, %d of %d chunks already done", n_resumed, len(starts))

    def on_done(task: Task, res: ChunkScore) -> None:
        done[res.name] = res.meta
        write_json_atomic(state_path, state)
        results[res.name] = (res.ids, res.scores)

    with progress_bar(progress, total=len(candidates), initial=len(candidates) - sum(t.cells for t in tasks),
                      desc="stage 2", unit="cell") as bar:
        run_on.run(tasks, on_done, progress=bar.update)
    ordered = [results[f"{no:04d}"] for no in range(len(starts))]
    all_ids = np.concatenate([r[0] for r in ordered]) if ordered else np.zeros(0, dtype=np.int64)
    scores = np.concatenate([r[1] for r in ordered]) if ordered else np.zeros(0, dtype=np.float32)
    return Stage2Result(all_ids, scores, len(starts), n_resumed, time.perf_counter() - t0)


def candidate_datasets(store: Any, ids: np.ndarray) -> list[str]:
    """The ids of the atlas datasets of ``store`` holding any of ``ids`` (sorted atlas ids), in id order."""
    found = []
    for rec in store.cell_ranges_records():
        lo, hi = np.searchsorted(ids, [rec.start, rec.start + rec.n_cells])
        if hi > lo:
            found.append(str(rec.dataset_id))
    return found


class _BatchStats:
    """The gene statistics of the candidates' datasets (for a stage 2 that standardises within batches): from
    this run's memory, else the sweep directory's file, else computed by executor tasks
    (:func:`~query.hunt.stage2_tasks.dataset_stats`: in this process one after the other, or over a Ray cluster)
    that write the file, then recorded in the state."""

    def __init__(self, source: GeneSource, stage: GeneStage, out: Path, state: dict[str, Any], state_path: Path,
                 chunk_size: int) -> None:
        self.source, self.stage, self.chunk_size = source, stage, chunk_size
        self.out, self.state, self.state_path = out, state, state_path
        self.known: dict[str, GeneStats] = {}

    def compute(self, datasets: list[str], executor: Executor, progress: Progress) -> None:
        """Have the statistics of ``datasets`` ready (nothing for a stage 2 without batches)."""
        if not self.stage.batch_standardized:
            return
        files: dict[str, str] = self.state["stage2"].setdefault("stats", {})
        used = set(files.values())
        tasks: list[Task] = []
        for dataset_id in datasets:
            name = files.get(dataset_id)
            got = stage2_tasks.read_stats(self.out / STAGE2_DIR / name, len(self.stage.weights)) if name else None
            if got is not None:
                self.known[dataset_id] = got
                continue
            if name is None:
                name = next(f"stats_{k:04d}.npz" for k in range(len(used) + 1) if f"stats_{k:04d}.npz" not in used)
                used.add(name)
            n = self.stage.batch_sample
            tasks.append(Task(f"stage2-stats-{name}", stage2_tasks.dataset_stats,
                              (self.source, dataset_id, n, STATS_SEED, self.chunk_size, self.out / STAGE2_DIR / name),
                              cells=n))
        if not tasks:
            return

        def on_done(task: Task, res: DatasetStats) -> None:
            self.known[res.dataset_id] = res.stats
            files[res.dataset_id] = res.name
            write_json_atomic(self.state_path, self.state)

        with progress_bar(progress, total=sum(t.cells for t in tasks), desc="stage 2 statistics", unit="cell") as bar:
            executor.run(tasks, on_done, progress=bar.update)

    def of(self, datasets: list[str]) -> dict[str, GeneStats]:
        """The statistics of ``datasets`` (computed by :meth:`compute`), by dataset id."""
        return {d: self.known[d] for d in datasets}
