"""Shared helpers of the index tests (no tests here): clustered vectors, metadata, brute force, file digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from scatlas.atlas.synthetic import SyntheticEmbeddingConfig, sample_queries, vectors_for_range
from scatlas.index import ArrayVectorSource, BuildConfig

FAST = {"eval_queries": 200, "calibration_cells": 500}
"""Small evaluation samples keep builds to about a second."""

TISSUES = np.array(["lung", "blood", "liver", "gut"])
DISEASES = np.array(["normal", "covid", "fibrosis"])


def clustered(n: int, d: int, seed: int = 0, n_clusters: int = 40) -> np.ndarray:
    """Clustered, overlapping, L2-normalised vectors (atlas.synthetic's mixture), float32."""
    return vectors_for_range(SyntheticEmbeddingConfig(n=n, d=d, n_clusters=n_clusters, seed=seed), 0, n)[0]


def fresh_queries(n: int, d: int, seed: int = 0, n_clusters: int = 40, qseed: int = 1) -> np.ndarray:
    """New vectors from the same mixture as ``clustered(., d, seed, n_clusters)`` (in-distribution queries)."""
    return sample_queries(SyntheticEmbeddingConfig(n=1, d=d, n_clusters=n_clusters, seed=seed), n, seed=qseed)[0]


def metadata(ids: np.ndarray, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(ids)
    return pa.table(
        {
            "soma_joinid": np.asarray(ids, dtype=np.int64),
            "tissue": TISSUES[rng.integers(0, len(TISSUES), n)],
            "disease": DISEASES[rng.integers(0, len(DISEASES), n)],
            "n_genes": rng.integers(200, 5000, n),
        }
    )


def config(**kw: object) -> BuildConfig:
    return BuildConfig(**{**FAST, **kw})  # type: ignore[arg-type]


def brute_force(
    base: np.ndarray, base_ids: np.ndarray, q: np.ndarray, k: int, *, rounded: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over the normalised base, float16-rounded as the index stores it (``rounded``)
    or float32 (what re-ranking with the stored rounding residuals is exact for)."""
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    b = b.astype(np.float16).astype(np.float64) if rounded else b.astype(np.float32).astype(np.float64)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn.astype(np.float64) @ b.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return base_ids[order], np.take_along_axis(s, order, axis=1)


def assert_exact(
    ids: np.ndarray, scores: np.ndarray, base: np.ndarray, base_ids: np.ndarray, q: np.ndarray, *,
    rounded: bool = True,
) -> None:
    """``(ids, scores)`` is an exact top-k: the same score list as brute force, ids consistent with their scores.

    ``rounded``: exact over the stored float16 vectors (flat indexes, IVF without residuals); otherwise the ids are
    the float32 top k and a score may be the float16 one (within 2**-11: :mod:`index.rerank`)."""
    k = ids.shape[1]
    atol = 2e-5 if rounded else 2**-11 * 1.01
    want_ids, want_scores = brute_force(base, base_ids, q, k, rounded=rounded)
    np.testing.assert_allclose(scores, want_scores, atol=atol)
    assert (ids == want_ids).mean() > 0.98  # the rest are swaps between tied scores
    if not rounded:
        assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(ids, want_ids, strict=True))
    pos = np.searchsorted(base_ids, ids)
    assert (base_ids[pos] == ids).all()
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    b = b.astype(np.float16).astype(np.float64) if rounded else b.astype(np.float32).astype(np.float64)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    recomputed = np.einsum("nkd,nd->nk", b[pos], qn)
    np.testing.assert_allclose(scores, recomputed, atol=atol)
    for row in ids:
        assert len(set(row.tolist())) == k


def digests(
    root: Path,
    skip: tuple[str, ...] = (
        "manifest.json", "build.json", "cells.duckdb", "progress.json", "heads.json", "label_classes.json", "refmap.json",
    ),
) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> digest), except those named in ``skip`` (records that
    hold times, or name the build by its manifest's digest)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in skip:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def array_source(n: int = 6000, d: int = 32, seed: int = 0, start_id: int = 0, gap: int = 0) -> ArrayVectorSource:
    """Clustered vectors with ids ``start_id, start_id + 1 + gap, ...``."""
    ids = start_id + np.arange(n, dtype=np.int64) * (1 + gap)
    return ArrayVectorSource(clustered(n, d, seed), ids)
