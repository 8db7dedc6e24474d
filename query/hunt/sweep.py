"""``hunt sweep``: score every cell of an index with a hunt classifier, resumable per shard.

Output directory::

    OUT/
      sweep.json            state: what is being swept (classifier, embedder, index build, cut) and the shards done
      partials/NNNN.npz     per shard: ids and exact scores of its hits (written atomically)
      stage2/NNNN.npz       two-stage sweeps: per chunk of stage 1's candidates, their stage-2 scores
      hits.parquet          the hits joined with the cell metadata (dataset_id, tissue, disease, cell_type, ...),
                            best first: soma_joinid, score, probability, training_positive (the cell is one
                            the classifier learnt as a positive; where it records them), <cells table columns>
      summary.json          the :class:`SweepSummary`

Cells are read from the index's stored float16 vectors (``iter_shards``) in blocks of ``block_size`` rows, so
memory stays bounded by one block plus the hits. A shard's partial is written (temporary file + rename) before
``sweep.json`` records it: an interrupted sweep redoes at most the shard it was in. A rerun with a different
classifier, index build or cut is refused while ``resume=True``; ``resume=False`` discards the old state and
restarts. The hits are exactly those with ``float32(w . x + b) >= cut`` on the stored vectors (see
:mod:`query.hunt.kernels`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import EmbedderMismatchError, InputError
from scatlas.atlas.locks import holding
from scatlas.atlas.outputs import SWEEP, OutputError, check_output_dir, claim_output_dir, show, writing
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import beside, escaped_list
from scatlas.index import (
    AtlasIndex,
    Executor,
    LocalExecutor,
    Progress,
    Task,
    TaskContext,
    progress_bar,
    resolve_device,
    torch_gpu_count,
)
from scatlas.query.hunt.access import IndexLike, input_paths, open_index
from scatlas.query.hunt.classifier import HuntClassifier
from scatlas.query.hunt.gene_reads import open_index_store
from scatlas.query.hunt.kernels import BlockScorer, ThreadTuner
from scatlas.query.hunt.partials import read_partial as _read_partial
from scatlas.query.hunt.partials import write_partial as _write_partial
from scatlas.query.hunt.stage2 import GeneStage
from scatlas.query.hunt.stage2_tasks import GeneSource
from scatlas.query.hunt.sweep_stage2 import DEFAULT_CHUNK as STAGE2_CHUNK
from scatlas.query.hunt.sweep_stage2 import STAGE2_DIR, Stage2Result, score_candidates

logger = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
SUMMARY_FILE = "summary.json"
HITS_FILE = "hits.parquet"
TRAINING_COLUMN = "training_positive"
"""Hits column: the cell is one the classifier learnt as a positive (not a new find)."""
PARTIALS_DIR = "partials"
STATE_VERSION = 1
DEFAULT_BLOCK_BYTES = 256 << 20
"""Default block: 256 MiB of float16 vectors, scored in place from the shard's memory map (so a large block costs
no memory) with few thread synchronisations per GB (see docs/benchmarks.md#sweep-block). The torch kernels (GPU,
and the fp32 fallback) copy a block: on the CPU the fp32 one needs twice its size."""


@dataclass
class SweepSummary:
    """What a sweep did. Rates are over the shards scored in this run (resumed shards are not re-read; 0 when
    every shard was resumed). ``stages`` says whether stage 2 ran (and why not); ``n_stage1_passed`` cells passed
    stage 1 (the candidates, at ``stage1_cutoff``, when stage 2 ran), ``n_stage2_kept`` of them stage 2 kept (the
    hits; None without stage 2); ``cutoff`` is the cut that made the hits (stage 2's score when it ran)."""

    out: str
    hits_path: str
    n_cells: int
    n_shards: int
    n_shards_scored: int
    n_shards_resumed: int
    n_hits: int
    cutoff: float
    cutoff_source: str
    device: str
    kernel: str
    block_size: int
    threads: int
    cells_scored: int
    bytes_scored: int
    n_candidates_rescored: int
    scoring_seconds: float
    seconds: float
    cells_per_second: float
    gb_per_second: float
    kernel_max_error: float
    classifier_fingerprint: str
    embedder_fingerprint: str
    index_manifest_id: str
    hit_rate: float = field(default=0.0)
    stages: str = "stage 1 only: the classifier has no stage 2"
    n_stage1_passed: int = 0
    n_stage2_kept: int | None = None
    stage1_cutoff: float | None = None
    stage2_seconds: float = 0.0
    n_stage2_chunks: int = 0
    n_stage2_chunks_resumed: int = 0
    index_version: int | None = None
    """The version of the index the sweep read (``build --update`` makes the next); None in older summaries."""
    n_training_hits: int | None = None
    """Hits that are cells the classifier learnt as positives (column :data:`TRAINING_COLUMN` of the hits); None
    when the classifier does not record them."""

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}




def _load_classifier(classifier: HuntClassifier | str | Path) -> HuntClassifier:
    return classifier if isinstance(classifier, HuntClassifier) else HuntClassifier.load(classifier)


def _cutoff(
    model: HuntClassifier | GeneStage, min_score: float | None, min_probability: float | None, what: str = ""
) -> tuple[float, str]:
    """The cut on ``model``'s raw score: ``min_score``, ``min_probability`` through its calibration, else its
    cross-validated threshold; and how it was chosen (suffixed with ``what``)."""
    if min_score is not None and min_probability is not None:
        raise InputError("give min_score or min_probability, not both")
    if min_score is not None:
        if not math.isfinite(min_score):
            raise InputError(f"min_score must be a finite number (got {min_score})")
        return float(min_score), f"min_score{what}"
    if min_probability is not None:
        return float(model.calibration.min_score_for(min_probability)), f"min_probability={min_probability:g}{what}"
    name = "stage 2 threshold" if isinstance(model, GeneStage) else "classifier threshold"
    return model.threshold, f"{name} ({model.metrics.get('threshold', {}).get('rule', 'cv')})"


def _prepare_out(out: Path, key: dict[str, Any], resume: bool, lock: contextlib.ExitStack) -> dict[str, Any]:
    """Create ``out``, take its lock (into ``lock``), then load a matching state to resume or start a new one
    (refusing a mismatching state while resuming)."""
    claim_output_dir(out, SWEEP)
    lock.enter_context(_sweep_lock(out))
    state_path = out / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = None
        if resume and state is not None and state.get("key") == key:
            done = len(state.get("shards", {}))
            if done:
                logger.info("resuming the sweep in %s: %d shard(s) already done", out, done)
            return dict(state)
        if resume:
            old = (state or {}).get("key", {})
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k)) if state else ["unreadable state"]
            raise InputError(
                f"{out} holds a different sweep (differs in: {', '.join(diff)}); pass --restart (resume=False in Python) to "
                "discard it and start over, or choose another output directory"
            )
        logger.info("restarting the sweep in %s: discarding its previous state and results", out)
    elif resume is False:
        logger.info("starting a new sweep in %s", out)
    for name in (STATE_FILE, HITS_FILE, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIALS_DIR, ignore_errors=True)
    shutil.rmtree(out / STAGE2_DIR, ignore_errors=True)
    (out / PARTIALS_DIR).mkdir()
    state = {"format_version": STATE_VERSION, "key": key, "shards": {}, "complete": False}
    write_json_atomic(state_path, state)
    return state


def _score_shard(
    scorer: BlockScorer, ids: np.ndarray, vecs: np.ndarray, block_size: int, bar: Any
) -> tuple[np.ndarray, np.ndarray, int]:
    """Hits ``(ids, scores)`` of one shard, block by block; also the number of rows re-scored exactly."""
    hit_ids: list[np.ndarray] = []
    hit_scores: list[np.ndarray] = []
    n_cand = 0
    tuner: ThreadTuner | None = getattr(scorer, "tuner", None)
    row_bytes = vecs.shape[1] * 2
    a = 0
    while a < len(ids):  # whole blocks, or shorter slices while the tuner times thread counts
        b = min(a + (tuner.rows(block_size, row_bytes) if tuner is not None else block_size), len(ids))
        threads = tuner.before_block() if tuner is not None else 0
        t0 = time.perf_counter()
        res = scorer.hits(vecs[a:b])
        if tuner is not None:
            tuner.after_block(threads, (b - a) * vecs.shape[1] * 2, time.perf_counter() - t0)
        if len(res.rows):
            hit_ids.append(np.asarray(ids[a:b])[res.rows])
            hit_scores.append(res.scores)
        n_cand += res.n_candidates
        bar.update(b - a)
        a = b
    if not hit_ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), n_cand
    return np.concatenate(hit_ids).astype(np.int64), np.concatenate(hit_scores).astype(np.float32), n_cand



_SCORERS: dict[tuple[str, str, str], BlockScorer] = {}
"""Scorers by (classifier, cut, device) in this process: one per sweep and device, reused across shards."""


def _scorer_key(clf: HuntClassifier, cutoff: float, device: str) -> tuple[str, str, str]:
    return clf.fingerprint(), repr(float(cutoff)), device


@dataclass
class ShardScore:
    """What one shard's scoring task returns (its partial file is already written)."""

    name: str
    meta: dict[str, int]
    ids: np.ndarray
    scores: np.ndarray
    n_candidates: int
    seconds: float
    kernel: str
    max_error: float


class _Ticks:
    """The ``update(n)`` a progress bar offers, forwarded to the task context's progress callback."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def update(self, n: int) -> None:
        if self._fn is not None:
            self._fn(n)


def score_shard(
    index: IndexLike, shard_no: int, clf: HuntClassifier, cutoff: float, block_size: int, partial: Path,
    meta: dict[str, int], *, ctx: TaskContext,
) -> ShardScore:
    """The sweep's unit of work: score shard ``shard_no`` of ``index`` and write its partial file (atomically)."""
    import torch

    t0 = time.perf_counter()
    idx = open_index(index)
    key = _scorer_key(clf, cutoff, ctx.torch_device)
    scorer = _SCORERS.get(key)
    if scorer is None:  # a Ray worker, or another GPU of this machine
        if ctx.threads:
            torch.set_num_threads(int(ctx.threads))
        scorer = _SCORERS[key] = BlockScorer(clf.weights, clf.bias, cutoff, device=ctx.torch_device)
    found = next(((ids, vecs) for no, ids, vecs in idx.iter_shards() if no == shard_no), None)
    if found is None:
        raise InputError(f"the index has no shard {shard_no}")
    ids, vecs = found
    got = {"n": len(ids), "id_min": int(ids[0]) if len(ids) else -1, "id_max": int(ids[-1]) if len(ids) else -1}
    if got != meta:
        raise InputError(f"shard {shard_no} is not the shard the sweep planned ({got} vs {meta}); restart the sweep")
    ts = time.perf_counter()
    h_ids, h_scores, n_cand = _score_shard(scorer, ids, vecs, block_size, _Ticks(ctx.progress))
    seconds = time.perf_counter() - ts
    _write_partial(partial, h_ids, h_scores, meta)
    logger.debug("shard %04d: %d hits, %.2f s scoring, %.2f s in all (%s)", shard_no, len(h_ids), seconds,
                 time.perf_counter() - t0, ctx.worker)
    return ShardScore(partial.stem, meta, h_ids, h_scores, n_cand, seconds, scorer.kernel, scorer.max_error)


def training_sentence(n_training_hits: int | None, n_hits: int) -> str:
    """How many of ``n_hits`` hits the classifier was trained on as positives, in words ("" when unknown or none)."""
    if not n_training_hits:
        return ""
    return (f"{n_training_hits:,} of the hits are cells the classifier was trained on as positives (column "
            f"{TRAINING_COLUMN}); {n_hits - n_training_hits:,} are not.")


def _write_hits(
    index: AtlasIndex, out: Path, ids: np.ndarray, scores: np.ndarray, probs: np.ndarray, trained: np.ndarray | None
) -> Path:
    """Join the hits with the index's cells table and write ``hits.parquet`` (temporary file + rename).
    ``trained``: whether each hit is one of the classifier's training positives (column
    :data:`TRAINING_COLUMN`; left out when the classifier does not record them).

    The rows are streamed from DuckDB into a file this process opened (any file name works, and the row count of
    the file renamed into place is checked against this run's hits).
    """
    import pyarrow as pa

    target = out / HITS_FILE
    tmp = out / f".{HITS_FILE}.tmp-{os.getpid()}"
    columns = {"soma_joinid": ids.astype(np.int64), "score": scores.astype(np.float32),
               "probability": probs.astype(np.float32)}
    if trained is not None:
        columns[TRAINING_COLUMN] = np.asarray(trained, dtype=bool)
    hits = pa.table(columns)
    try:
        with index.cursor() as con:
            con.register("_hunt_hits", hits)
            cols = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
            own = list(columns)
            names = beside([c for c in cols if c != "soma_joinid"], own)
            clashes = sorted(c for c, n in names.items() if n != c)
            if clashes:
                logger.warning("atlas column(s) %s are written as %s beside the sweep's own", escaped_list(clashes),
                               escaped_list(names[c] for c in clashes))
            extra = ", ".join(f"c.{quote_ident(c)} AS {quote_ident(n)}" for c, n in names.items())
            select = ", ".join(f"h.{quote_ident(c)}" for c in own) + (f", {extra}" if extra else "")
            rel = con.sql(f"SELECT {select} FROM _hunt_hits h LEFT JOIN cells c ON h.soma_joinid = c.soma_joinid "
                          "ORDER BY h.score DESC, h.soma_joinid")
            with writing(target):
                n_rows = _write_parquet_stream(rel, tmp)
        if n_rows != len(ids):
            raise OutputError(f"{show(tmp)} holds {n_rows} rows, not this sweep's {len(ids)} hits; rerun the sweep")
        with writing(target):
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _write_parquet_stream(rel: Any, path: Path, rows: int = 65_536) -> int:
    """Write a DuckDB relation to a Parquet file at ``path`` batch by batch, fsynced; returns the file's rows."""
    import pyarrow.parquet as pq

    reader = (getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch)(rows)
    with open(path, "wb") as fh:
        with pq.ParquetWriter(fh, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, "rb") as fh:
        return int(pq.ParquetFile(fh).metadata.num_rows)


def sweep(
    index: IndexLike,
    classifier: HuntClassifier | str | Path,
    out: str | Path,
    *,
    min_score: float | None = None,
    min_probability: float | None = None,
    block_size: int | None = None,
    device: str = "auto",
    resume: bool = True,
    threads: int | None = None,
    progress: Progress = True,
    executor: Executor | None = None,
    two_stage: bool = True,
    atlas: str | Path | None = None,
    stage2_chunk_size: int = STAGE2_CHUNK,
) -> SweepSummary:
    """Score every indexed cell with ``classifier``; write the hits (joined with cell metadata) to ``out``.

    A two-stage classifier (one with ``stage2``, see :mod:`query.hunt.stage2`) sweeps in two stages: stage 1
    passes the cells scoring at least its candidate cut (chosen for recall), stage 2 scores their gene features
    read from the atlas store and its cut makes the hits (:mod:`query.hunt.sweep_stage2`). Without stage 2, with
    ``two_stage=False`` or when the store is not reachable, stage 1 at the classifier's threshold is the answer
    (the summary's ``stages`` says which and why).

    Parameters
    ----------
    index: an opened :class:`index.AtlasIndex` or the path of an index directory.
    classifier: a :class:`HuntClassifier` or the directory it was saved to. Its embedder fingerprint must equal
        the index's (EmbedderMismatchError otherwise).
    out: output directory (created); see the module docstring for its layout. Only a new or empty directory or
        an earlier sweep directory is written (OutputError otherwise, and when it is or holds an input); one sweep
        at a time writes there (a second one is refused while the first holds ``OUT/.sweep.lock``).
    min_score: the cut on raw scores (``score >= min_score`` is a hit); default: the classifier's threshold. With
        two stages, the cut on stage 2's score (stage 1 keeps its candidate cut).
    min_probability: alternatively, a cut on the calibrated probability (converted to a raw score; stage 2's
        calibration with two stages).
    block_size: rows of stored vectors scored at a time (default: :data:`DEFAULT_BLOCK_BYTES` of vectors).
    device: ``auto`` (GPU when torch sees one), ``cpu`` or ``cuda`` (DependencyError without CUDA).
    resume: continue a matching interrupted sweep in ``out`` (a mismatching one is refused); ``False`` discards
        the earlier sweep's files in ``out`` and starts over.
    threads: torch CPU threads for the sweep; default: chosen between 1 and torch's current setting by timing
        blocks, re-checked every 8 GiB (see :class:`~query.hunt.kernels.ThreadTuner`). Restored afterwards.
    executor: where the per-shard scoring tasks run (:mod:`index.executor`): default this process (one thread per
        GPU when sweeping on CUDA); a :class:`~index.executor.RayExecutor` spreads shards, and stage 2's chunks of
        candidates, over a cluster. The hits are the same either way.
    two_stage: run stage 2 when the classifier has one (``False``: stage 1 alone, at its own threshold).
    atlas: the atlas store stage 2 reads (default: the one the index was built from; stage 1 alone, said, when
        that one cannot serve). A store given here that cannot serve (not reachable, other cells) is an InputError.
    stage2_chunk_size: candidates read and scored per stage-2 chunk (bounds memory; one partial file each).
    """
    check_output_dir(out, SWEEP, inputs=input_paths(index, classifier))
    with contextlib.ExitStack() as lock, writing(out, action=None):
        t0 = time.perf_counter()
        idx = open_index(index)
        clf = _load_classifier(classifier)
        store, stages = _stage2_store(idx, clf, two_stage, atlas)
        if store is not None:
            lock.callback(store.close)
        plan = _plan(idx, clf, min_score, min_probability, block_size, device, threads,
                     stage2=clf.stage2 if store is not None else None, stages=stages)
        out = Path(out)
        state = _prepare_out(out, plan.key, resume, lock)  # the lock is held until the ExitStack closes
        run = _run(idx, clf, plan, out, state, executor, threads, progress)
        cand_ids, cand_scores = _stage1_hits(run)
        if plan.stage2 is None:
            hits = _Hits(cand_ids, cand_scores, clf.probability(cand_scores), len(cand_ids))
        else:
            hits = _stage2_hits(store, idx, plan, out, state, cand_ids, stage2_chunk_size, progress, executor)
        return _finish(idx, clf, plan, out, state, run, hits, t0)


def _stage2_store(
    idx: AtlasIndex, clf: HuntClassifier, two_stage: bool, atlas: str | Path | None
) -> tuple[Any, str]:
    """The atlas store stage 2 reads (None when stage 2 does not run) and the sweep's ``stages`` note."""
    if atlas is not None and (clf.stage2 is None or not two_stage):
        logger.warning("the atlas store given (--atlas) is not read: only stage 2 reads it, and %s",
                       "the classifier has none" if clf.stage2 is None else "it is off (two_stage=False)")
    if clf.stage2 is None:
        return None, "stage 1 only: the classifier has no stage 2"
    if not two_stage:
        return None, "stage 1 only: two_stage=False"
    store, why = open_index_store(idx, atlas)
    if store is None and atlas is not None:  # named on purpose: a store that cannot serve is a mistake to say
        raise InputError(
            f"stage 2 cannot read the atlas store given (--atlas): {why}. Give the store the index was built "
            "from, leave the option out to use the one the index records, or sweep stage 1 alone (--stage1-only; "
            "two_stage=False)"
        )
    if store is None:
        logger.warning("stage 2 cannot run (%s): stage 1's hits at its own threshold are the answer", why)
        return None, f"stage 1 only: {why}"
    return store, "two stages: stage 1 candidates, stage 2 on gene features"


@dataclass
class _Hits:
    """The final hits (ids sorted) with their scores and probabilities, and how many cells passed stage 1."""

    ids: np.ndarray
    scores: np.ndarray
    probabilities: np.ndarray
    n_stage1: int
    stage2: Stage2Result | None = None


def _stage1_hits(run: _Run) -> tuple[np.ndarray, np.ndarray]:
    ordered = [run.results[f"{no:04d}"] for no in sorted(int(k) for k in run.results)]
    ids = np.concatenate([r[0] for r in ordered]) if ordered else np.zeros(0, dtype=np.int64)
    scores = np.concatenate([r[1] for r in ordered]) if ordered else np.zeros(0, dtype=np.float32)
    order = np.argsort(ids, kind="stable")
    return ids[order], scores[order]


def _stage2_hits(
    store: Any, idx: AtlasIndex, plan: _Plan, out: Path, state: dict[str, Any], candidates: np.ndarray,
    chunk_size: int, progress: Progress, executor: Executor | None = None,
) -> _Hits:
    """Stage 2 over stage 1's candidates, as tasks on ``executor`` (a Ray executor spreads them over its cluster);
    the hits are those scoring at least the plan's cut."""
    stage = plan.stage2
    assert stage is not None
    res = score_candidates(GeneSource.of(store, idx), stage, candidates, out, state, out / STATE_FILE,
                           chunk_size=chunk_size, progress=progress, executor=executor)
    keep = res.scores >= np.float32(plan.cutoff)
    logger.info("stage 2: kept %d of %d candidates (%d chunks, %d resumed) in %.1fs", int(keep.sum()),
                len(candidates), res.n_chunks, res.n_resumed, res.seconds)
    return _Hits(res.ids[keep], res.scores[keep], stage.calibration.apply(res.scores[keep]), len(candidates), res)


@contextlib.contextmanager
def _sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.sweep.lock`` (flock, non-blocking): one sweep at a time writes into ``out``."""
    with writing(out / LOCK_FILE):
        fh = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole sweep, closed by holding()
    with holding(fh, OutputError(f"another sweep is writing to {show(out)}; wait for it to finish, or give another "
                                 "output directory")):
        yield


@dataclass(frozen=True)
class _Plan:
    """What a sweep computes: the cuts, the block size, the device, and the key its state must match to resume.

    With ``stage2``, ``stage1_cutoff`` passes candidates and ``cutoff`` is stage 2's; else both are stage 1's."""

    cutoff: float
    cutoff_source: str
    block_size: int
    device: str
    requested_device: str
    key: dict[str, Any]
    stage1_cutoff: float = float("nan")
    stage2: GeneStage | None = None
    stages: str = ""


def _plan(
    idx: AtlasIndex, clf: HuntClassifier, min_score: float | None, min_probability: float | None,
    block_size: int | None, device: str, threads: int | None, *, stage2: GeneStage | None = None, stages: str = "",
) -> _Plan:
    """Check the classifier against the index and the arguments; the sweep's plan."""
    if clf.embedder_fingerprint != idx.embedder_fingerprint:
        raise EmbedderMismatchError(
            f"the classifier was trained on vectors of embedder {clf.embedder_fingerprint}, but this index was built "
            f"with embedder {idx.embedder_fingerprint}: its scores would be meaningless. Retrain the classifier "
            "against this index (scatlas hunt train --index ...) or sweep the index it was trained for."
        )
    if clf.dim != idx.dim:
        raise EmbedderMismatchError(f"the classifier has {clf.dim} weights but the index holds {idx.dim}-d vectors")
    if clf.index_manifest_id != idx.build_id:
        logger.info("the classifier was trained against another build (%s) of an index with the same embedder",
                    clf.index_manifest_id)
    if stage2 is None:
        cutoff, cutoff_source = _cutoff(clf, min_score, min_probability)
        stage1_cutoff = cutoff
    else:
        cutoff, cutoff_source = _cutoff(stage2, min_score, min_probability, " (stage 2)")
        stage1_cutoff = stage2.stage1_cut
    if not math.isfinite(cutoff):
        raise InputError(f"the requested cut ({cutoff_source}) is unreachable by any score; lower it")
    if block_size is None:
        block_size = max(1, DEFAULT_BLOCK_BYTES // (2 * idx.dim))
    if block_size <= 0:
        raise InputError(f"block_size must be positive (got {block_size})")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1 (got {threads})")
    key = {
        "classifier": clf.fingerprint(),
        "embedder": idx.embedder_fingerprint,
        "index_manifest_id": idx.build_id,
        "cutoff": repr(float(stage1_cutoff)),
    }
    if stage2 is not None:  # one-stage sweeps keep their key (and resume as before)
        key["stage2_cutoff"] = repr(float(cutoff))
    return _Plan(cutoff, cutoff_source, int(block_size), resolve_device(device, backend="torch"), device, key,
                 stage1_cutoff, stage2, stages)


@dataclass
class _Run:
    """What the scoring tasks of one run did, and the hits of every shard (resumed or scored)."""

    results: dict[str, tuple[np.ndarray, np.ndarray]]
    device: str
    n_cells: int = 0
    n_shards: int = 0
    n_resumed: int = 0
    n_scored: int = 0
    cells_scored: int = 0
    n_candidates: int = 0
    scoring_seconds: float = 0.0
    max_error: float = 0.0
    kernels: set[str] = field(default_factory=set)
    scorer_kernel: str = ""
    threads: int = 0

    def add(self, res: ShardScore) -> None:
        self.results[res.name] = (res.ids, res.scores)
        self.n_scored += 1
        self.cells_scored += res.meta["n"]
        self.n_candidates += res.n_candidates
        self.scoring_seconds += res.seconds
        self.max_error = max(self.max_error, res.max_error)
        self.kernels.add(res.kernel)


def _run(
    idx: AtlasIndex, clf: HuntClassifier, plan: _Plan, out: Path, state: dict[str, Any], executor: Executor | None,
    threads: int | None, progress: Progress,
) -> _Run:
    """Score every shard not done by an earlier run, as tasks on ``executor``, recording each in ``state``."""
    import torch

    torch_device = plan.device
    if executor is None:
        gpus = torch_gpu_count() if torch_device == "cuda" else 0
        executor = LocalExecutor(["cpu"] if torch_device == "cpu" else [f"cuda:{i}" for i in range(max(1, gpus))])
    elif executor.name != "local" and plan.requested_device == "auto":
        torch_device = "cuda" if executor.gpu_count() > 0 else "cpu"
    run = _Run({}, torch_device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    run.threads = torch.get_num_threads()
    # The scorer of tasks run in this process (the local executor on the CPU or the first GPU): one for the whole
    # sweep, so that thread tuning carries over from shard to shard.
    scorer = BlockScorer(clf.weights, clf.bias, plan.stage1_cutoff, device="cpu" if torch_device == "cpu" else "cuda:0")
    tuner = ThreadTuner([1, run.threads]) if threads is None and torch_device == "cpu" and run.threads > 1 else None
    scorer.tuner = tuner
    scorer_key = _scorer_key(clf, plan.stage1_cutoff, scorer.device)
    _SCORERS[scorer_key] = scorer
    run.scorer_kernel = scorer.kernel
    tasks = _tasks(idx, clf, plan, out, state, run, gpus=1.0 if torch_device == "cuda" else 0.0)
    state_path = out / STATE_FILE

    def on_done(task: Task, res: ShardScore) -> None:
        state["shards"][res.name] = {**res.meta, "n_hits": len(res.ids)}
        write_json_atomic(state_path, state)
        run.add(res)

    try:
        with progress_bar(progress, total=run.n_cells, initial=run.n_cells - sum(t.cells for t in tasks),
                          desc="sweep", unit="cell", unit_scale=True) as bar:
            executor.run(tasks, on_done, progress=bar.update)
    finally:
        if tuner is not None and tuner.history:
            run.threads = tuner.history[-1]
        torch.set_num_threads(old_threads)
        _SCORERS.pop(scorer_key, None)
    return run


def _tasks(
    idx: AtlasIndex, clf: HuntClassifier, plan: _Plan, out: Path, state: dict[str, Any], run: _Run, gpus: float
) -> list[Task]:
    """A scoring task per shard whose partial file an earlier run did not leave intact (those are read into
    ``run``); sets ``run``'s cell and shard counts."""
    tasks: list[Task] = []
    for no, ids, _vecs in idx.iter_shards():
        name = f"{no:04d}"
        meta = {"n": len(ids), "id_min": int(ids[0]) if len(ids) else -1,
                "id_max": int(ids[-1]) if len(ids) else -1}
        part_path = out / PARTIALS_DIR / f"{name}.npz"
        got = _read_partial(part_path, meta) if name in state["shards"] else None
        run.n_cells += len(ids)
        run.n_shards += 1
        if got is not None:
            run.n_resumed += 1
            run.results[name] = got
        else:
            tasks.append(Task(f"sweep-{name}", score_shard,
                              (idx, no, clf, plan.stage1_cutoff, plan.block_size, part_path, meta), gpus=gpus, cells=len(ids)))
    return tasks


def _finish(
    idx: AtlasIndex, clf: HuntClassifier, plan: _Plan, out: Path, state: dict[str, Any], run: _Run, hits: _Hits,
    t0: float,
) -> SweepSummary:
    """Write the hits, the summary and the completed state; log and return the summary."""
    hit_ids = hits.ids
    trained = None
    if clf.training_ids is not None and clf.same_atlas_ids(idx.build_id, idx.atlas_store_id):
        trained = np.isin(hit_ids, clf.training_ids)
    elif clf.training_ids is not None:
        logger.info("the classifier was trained against an index of another atlas store: its training cells are not "
                    "marked among the hits (atlas ids differ between stores)")
    hits_path = _write_hits(idx, out, hit_ids, hits.scores, hits.probabilities, trained)
    s2 = hits.stage2
    bytes_scored = run.cells_scored * idx.dim * 2
    scoring = run.scoring_seconds
    summary = SweepSummary(
        out=str(out),
        hits_path=str(hits_path),
        n_cells=run.n_cells,
        n_shards=run.n_shards,
        n_shards_scored=run.n_scored,
        n_shards_resumed=run.n_resumed,
        n_hits=len(hit_ids),
        cutoff=float(plan.cutoff),
        cutoff_source=plan.cutoff_source,
        device=run.device,
        kernel="+".join(sorted(run.kernels)) or run.scorer_kernel,
        block_size=plan.block_size,
        threads=run.threads,
        cells_scored=run.cells_scored,
        bytes_scored=bytes_scored,
        n_candidates_rescored=run.n_candidates,
        scoring_seconds=scoring,
        seconds=time.perf_counter() - t0,
        cells_per_second=run.cells_scored / scoring if scoring > 0 else 0.0,  # 0: nothing scored in this run
        gb_per_second=bytes_scored / scoring / 1e9 if scoring > 0 else 0.0,
        kernel_max_error=run.max_error,
        classifier_fingerprint=clf.fingerprint(),
        embedder_fingerprint=plan.key["embedder"],
        index_manifest_id=plan.key["index_manifest_id"],
        hit_rate=len(hit_ids) / run.n_cells if run.n_cells else 0.0,
        stages=plan.stages or "stage 1 only: the classifier has no stage 2",
        n_stage1_passed=hits.n_stage1,
        n_stage2_kept=len(hit_ids) if s2 is not None else None,
        stage1_cutoff=float(plan.stage1_cutoff),
        stage2_seconds=s2.seconds if s2 is not None else 0.0,
        n_stage2_chunks=s2.n_chunks if s2 is not None else 0,
        n_stage2_chunks_resumed=s2.n_resumed if s2 is not None else 0,
        index_version=idx.manifest.version,
        n_training_hits=None if trained is None else int(trained.sum()),
    )
    state["complete"] = True
    state["n_hits"] = len(hit_ids)
    state["n_stage1_passed"] = hits.n_stage1
    write_json_atomic(out / STATE_FILE, state)
    write_json_atomic(out / SUMMARY_FILE, summary.to_json())
    rate = (
        f"scoring {summary.cells_per_second:.0f} cells/s, {summary.gb_per_second:.2f} GB/s"
        if scoring > 0 else "nothing scored in this run"
    )
    logger.info(
        "swept %d cells in %d shards (%d resumed): %d hits (%.4f%%) at score >= %.4f; %s (%s, %s kernel, "
        "%d threads); total %.1fs",
        run.n_cells, run.n_shards, run.n_resumed, len(hit_ids), 100 * summary.hit_rate, plan.cutoff, rate, run.device,
        summary.kernel, run.threads, summary.seconds,
    )
    logger.info("%s: stage 1 passed %d cells%s", summary.stages, hits.n_stage1,
                f", stage 2 kept {len(hit_ids)}" if s2 is not None else "")
    return summary
