"""Measuring an index on its own cells: recall@k against exact search, tuning of default search parameters,
and the calibration of atlas-to-atlas neighbour similarities. A query cell's self-hit is excluded, by id, from
both the approximate and the exact result lists."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from scatlas.index.manifest import CALIBRATION_QUANTILES, RecallReport, SimilarityCalibration
from scatlas.index.sampling import sample_sorted
from scatlas.index.searcher import ShardSearcher

logger = logging.getLogger(__name__)

TARGET_RECALL = 0.95
TUNE_MARGIN = 0.005
"""Tuning aims this far above the target on its own sample, so that the held-out estimate lands above it."""
RERANK_STEP = 1.5
NPROBE_START, NPROBE_MAX = 16, 1024
RERANK_MIN_FACTOR, RERANK_MAX = 2, 4096


def sample_cells(searcher: ShardSearcher, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random atlas cells (sorted ids) and their stored vectors (float32)."""
    ids = searcher.ids_at(sample_sorted(searcher.n_cells, n, seed))
    return ids, searcher.gather(ids)


def drop_self(ids: np.ndarray, scores: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (wherever it is) and keep the first ``k`` remaining columns."""
    is_self = ids == self_ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (ids >= 0) found among the approximate ones."""
    hits = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    found = hits.any(axis=1).sum(axis=1)
    denom = np.maximum((exact >= 0).sum(axis=1), 1)
    return float(np.mean(found / denom))


@dataclass
class _Eval:
    ids: np.ndarray
    vecs: np.ndarray
    truth: np.ndarray


def _truth(searcher: ShardSearcher, ids: np.ndarray, vecs: np.ndarray, k: int) -> np.ndarray:
    exact_ids, exact_scores = searcher.exact_search(vecs, k + 1)
    return drop_self(exact_ids, exact_scores, ids, k)[0]


def _recall(searcher: ShardSearcher, ev: _Eval, k: int, nprobe: int | None, rerank: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ids, scores = searcher.search(ev.vecs, k + 1, nprobe=nprobe, rerank=rerank + 1 if rerank else 0)
    qps = len(ev.ids) / max(time.perf_counter() - t0, 1e-9)
    return recall_at_k(drop_self(ids, scores, ev.ids, k)[0], ev.truth), qps


def tune_and_measure(
    searcher: ShardSearcher,
    *,
    k: int,
    n_queries: int,
    seed: int,
    target: float = TARGET_RECALL,
    nprobe: int | None = None,
    rerank: int | None = None,
) -> RecallReport:
    """Choose ``(nprobe, rerank)`` reaching ``target`` recall@k on one sample of cells, report it on another.

    Exact indexes need no tuning (their recall is still measured). Given ``nprobe``/``rerank`` are used as is.
    The search is greedy: from ``(16, 2k)``, double nprobe or grow rerank by half, whichever raises recall more,
    until the tuning sample reaches ``target + TUNE_MARGIN``.
    """
    t0 = time.perf_counter()
    ids, vecs = sample_cells(searcher, 2 * n_queries, seed)
    truth = _truth(searcher, ids, vecs, k)
    rng = np.random.default_rng(seed + 1)
    half = rng.permutation(len(ids))
    tune_rows, eval_rows = np.sort(half[: len(ids) // 2]), np.sort(half[len(ids) // 2 :])
    tune = _Eval(ids[tune_rows], vecs[tune_rows], truth[tune_rows])
    ev = _Eval(ids[eval_rows], vecs[eval_rows], truth[eval_rows])
    logger.info("exact ground truth for %d cells in %.1f s", len(ids), time.perf_counter() - t0)

    tried: list[dict[str, Any]] = []
    if searcher.exact:
        best_p, best_r = None, 0
    elif nprobe is not None and rerank is not None:
        best_p, best_r = nprobe, rerank
    else:
        nlist = searcher.nlist or 1
        cap_p = min(NPROBE_MAX, nlist)
        p = nprobe or min(NPROBE_START, nlist)
        r = rerank if rerank is not None else RERANK_MIN_FACTOR * k
        cache: dict[tuple[int, int], float] = {}

        def measure(pp: int, rr: int) -> float:
            if (pp, rr) not in cache:
                rec, qps = _recall(searcher, tune, k, pp, rr)
                cache[(pp, rr)] = rec
                tried.append({"nprobe": pp, "rerank": rr, "recall": round(rec, 4), "qps": round(qps, 1)})
                logger.info("tuning: nprobe=%d rerank=%d recall@%d=%.4f (%.0f q/s)", pp, rr, k, rec, qps)
            return cache[(pp, rr)]

        cur = measure(p, r)
        while cur < target + TUNE_MARGIN:
            options = []
            if nprobe is None and p < cap_p:
                options.append((min(2 * p, cap_p), r))
            if rerank is None and 0 < r < RERANK_MAX:
                options.append((p, min(int(round(RERANK_STEP * r)), RERANK_MAX)))
            if not options:
                logger.warning("recall@%d %.4f stays below %.2f at nprobe=%d rerank=%d", k, cur, target, p, r)
                break
            p, r = max(options, key=lambda o: measure(*o))
            cur = measure(p, r)
        best_p, best_r = p, r
    recall, qps = _recall(searcher, ev, k, best_p, best_r)
    logger.info("recall@%d = %.4f at nprobe=%s rerank=%d on %d held-out cells", k, recall, best_p, best_r, len(ev.ids))
    return RecallReport(
        k=k,
        recall=round(recall, 4),
        n_queries=len(ev.ids),
        nprobe=best_p,
        rerank=best_r,
        exact="brute force over the stored float16 vectors (faiss.knn, inner product), self-hits excluded",
        queries_per_second=round(qps, 1),
        tuning=tried,
    )


def calibrate(
    searcher: ShardSearcher, *, k: int, n_cells: int, seed: int, nprobe: int | None, rerank: int
) -> SimilarityCalibration:
    """Quantiles of the nearest-neighbour and mean top-k similarity of sampled atlas cells (self excluded)."""
    ids, vecs = sample_cells(searcher, n_cells, seed)
    nn_ids, nn_scores = searcher.search(vecs, k + 1, nprobe=nprobe, rerank=rerank + 1 if rerank else 0)
    nn_ids, nn_scores = drop_self(nn_ids, nn_scores, ids, k)
    valid = nn_ids >= 0
    first = nn_scores[:, 0][valid[:, 0]]
    mean_topk = np.array([row[m].mean() for row, m in zip(nn_scores, valid, strict=True) if m.any()])
    qs = list(CALIBRATION_QUANTILES)
    return SimilarityCalibration(
        k=k,
        n_cells=len(ids),
        quantiles=qs,
        first_neighbor=[round(float(v), 5) for v in np.quantile(first, qs)] if len(first) else [],
        mean_topk=[round(float(v), 5) for v in np.quantile(mean_topk, qs)] if len(mean_topk) else [],
    )
