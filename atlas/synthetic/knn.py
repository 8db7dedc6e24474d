"""Exact inner-product top-k over streamed vectors: the ground truth of recall measurements."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from scatlas.atlas.errors import InputError


def exact_knn(
    base_chunks: Callable[[], Iterable[tuple[np.ndarray, ...]]] | Iterable[tuple[np.ndarray, ...]],
    queries: np.ndarray,
    k: int,
    *,
    max_block: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries`` over streamed ``(ids, vectors, ...)`` chunks.

    ``base_chunks`` is an iterable of chunks or a function returning one (e.g.
    ``lambda: generate_embedding_chunks(cfg)``). Returns ``(ids (nq, k) int64, scores (nq, k) float32)``, best
    first; ``-1`` / ``-inf`` pad rows when the base has fewer than ``k`` vectors. ``max_block`` bounds the
    size of one query x chunk score block.
    """
    if k < 1:
        raise InputError(f"k={k}: must be >= 1")
    Q = np.ascontiguousarray(queries, dtype=np.float32)
    if Q.ndim != 2:
        raise InputError(f"queries must be a 2-d array (n, d), got shape {Q.shape}")
    best_s = np.full((len(Q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(Q), k), -1, dtype=np.int64)
    chunks = base_chunks() if callable(base_chunks) else base_chunks
    for chunk in chunks:
        ids, vectors = np.asarray(chunk[0], dtype=np.int64), np.asarray(chunk[1], dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != Q.shape[1] or len(ids) != len(vectors):
            raise InputError(
                f"base chunk of shape {vectors.shape} with {len(ids)} ids does not match queries "
                f"of dimension {Q.shape[1]}"
            )
        step = max(1, max_block // max(1, len(vectors)))
        for q0 in range(0, len(Q), step):
            rows = slice(q0, q0 + step)
            best_s[rows], best_i[rows] = _merge_topk(best_s[rows], best_i[rows], Q[rows] @ vectors.T, ids, k)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def _merge_topk(
    best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a block of ``scores`` (columns: ``ids``) into the running top-``k`` (unordered)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, cand = np.take_along_axis(scores, part, axis=1), ids[part]
    else:
        cand = np.broadcast_to(ids, scores.shape)
    all_s = np.concatenate([best_s, scores], axis=1)
    all_i = np.concatenate([best_i, cand], axis=1)
    top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(all_s, top, axis=1), np.take_along_axis(all_i, top, axis=1)
