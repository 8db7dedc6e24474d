"""Synthetic embeddings: L2-normalised vectors from a clustered mixture, for index benchmarks and tests.

Vectors are drawn in fixed-size blocks, each from its own seed, so any range can be made on its own and the
output does not depend on the chunk size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.atlas.synthetic._common import S_EMB_BLOCK, S_MIXTURE, S_QUERY, cut_blocks, prepare_out, stream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticEmbeddingConfig:
    """``n`` L2-normalised vectors of dimension ``d`` from a mixture of ``n_clusters`` clusters.

    Centres are random unit vectors; a ``close_fraction`` of clusters sit at ``close_distance`` from another
    cluster's centre (overlapping neighbours). Noise of norm ~``spread`` per point: isotropic plus, for a
    share ``anisotropy`` of its variance, ``rank`` random directions per cluster. Cluster weights are
    log-normal with sigma ``size_sigma`` (uneven sizes). ``seed`` keys every random stream; ``chunk_size``
    is the rows per chunk of :func:`generate_embedding_chunks` (it does not change the vectors).
    """

    n: int = 100_000
    d: int = 128
    n_clusters: int = 100
    spread: float = 0.5
    close_fraction: float = 0.3
    close_distance: float = 0.15
    anisotropy: float = 0.6
    rank: int = 8
    size_sigma: float = 1.0
    seed: int = 0
    chunk_size: int = 100_000

    def __post_init__(self) -> None:
        _validate_embedding_config(self)


def _validate_embedding_config(c: SyntheticEmbeddingConfig) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(f"invalid synthetic embedding config: {message}")

    check(c.n >= 1, f"n={c.n}: need at least one vector")
    check(c.d >= 2, f"d={c.d}: dimension must be >= 2")
    check(c.n_clusters >= 1, f"n_clusters={c.n_clusters}: need at least one cluster")
    check(
        c.n_clusters * c.d * min(c.rank, c.d) <= 2**28,
        f"n_clusters x d x rank = {c.n_clusters * c.d * min(c.rank, c.d)} is too large; "
        "lower rank or n_clusters",
    )
    check(c.spread >= 0 and np.isfinite(c.spread), f"spread={c.spread}: must be a finite number >= 0")
    check(0 <= c.close_fraction <= 1, f"close_fraction={c.close_fraction}: must be in [0, 1]")
    check(c.close_distance >= 0, f"close_distance={c.close_distance}: must be >= 0")
    check(0 <= c.anisotropy <= 1, f"anisotropy={c.anisotropy}: must be in [0, 1]")
    check(c.rank >= 1, f"rank={c.rank}: must be >= 1")
    check(c.size_sigma >= 0, f"size_sigma={c.size_sigma}: must be >= 0")
    check(c.seed >= 0, f"seed={c.seed}: must be a non-negative integer")
    check(c.chunk_size >= 1, f"chunk_size={c.chunk_size}: must be a positive number of vectors")


@dataclass(frozen=True)
class _Mixture:
    """The clusters of a config: centres, weights and each cluster's anisotropic noise directions and scales."""

    centres: np.ndarray  # (K, d) float32, unit norm
    weights: np.ndarray  # (K,) float64, sum 1
    directions: np.ndarray  # (K, d, r) float32, orthonormal columns
    scales: np.ndarray  # (K, r) float32


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


@lru_cache(maxsize=4)
def _mixture(c: SyntheticEmbeddingConfig) -> _Mixture:
    """The mixture of ``c`` (drawn once per config)."""
    rng = stream(c.seed, S_MIXTURE)
    k, d, r = c.n_clusters, c.d, min(c.rank, c.d)
    centres = _unit_rows(rng.standard_normal((k, d)))
    n_close = int(round(c.close_fraction * (k - 1)))
    for j in range(k - n_close, k):
        parent = int(rng.integers(0, j)) if j > 0 else 0
        step = _unit_rows(rng.standard_normal((1, d)))[0]
        centres[j] = _unit_rows((centres[parent] + c.close_distance * step)[None, :])[0]
    weights = np.exp(rng.normal(0.0, c.size_sigma, k))
    directions = np.linalg.qr(rng.standard_normal((k, d, r)))[0].astype(np.float32)
    scales = rng.uniform(0.5, 1.5, (k, r))
    scales /= np.sqrt((scales**2).mean(axis=1, keepdims=True))
    return _Mixture(
        centres.astype(np.float32), weights / weights.sum(), directions, scales.astype(np.float32)
    )


def _sample_mixture(
    c: SyntheticEmbeddingConfig, rng: np.random.Generator, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """``m`` vectors (float32, unit norm) and their cluster labels (int32), drawn from ``rng``."""
    mix = _mixture(c)
    r = mix.directions.shape[2]
    labels = rng.choice(c.n_clusters, size=m, p=mix.weights).astype(np.int32)
    x = rng.standard_normal((m, c.d), dtype=np.float32)
    x *= np.float32(c.spread * np.sqrt((1.0 - c.anisotropy) / c.d))
    x += mix.centres[labels]
    z = rng.standard_normal((m, r), dtype=np.float32) * np.float32(c.spread * np.sqrt(c.anisotropy / r))
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for rows in np.split(order, bounds):
        if len(rows):
            k = labels[rows[0]]
            x[rows] += (z[rows] * mix.scales[k]) @ mix.directions[k].T
    return _unit_rows(x).astype(np.float32, copy=False), labels


def _embedding_block_rows(d: int) -> int:
    """Rows per random block (about 4M values)."""
    return int(max(1024, 2**22 // d))


def _embedding_block(c: SyntheticEmbeddingConfig, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``block`` of vectors and labels, from its own seed."""
    size = _embedding_block_rows(c.d)
    m = min((block + 1) * size, c.n) - block * size
    return _sample_mixture(c, stream(c.seed, S_EMB_BLOCK, block), m)


def _embedding_range(
    c: SyntheticEmbeddingConfig, start: int, stop: int, cache: dict[int, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and labels ``[start, stop)`` (``start < stop``); ``cache`` keeps the last block drawn."""
    pieces = list(cut_blocks(start, stop, _embedding_block_rows(c.d), lambda b: _embedding_block(c, b), cache))
    return (
        np.concatenate([block[0][lo:hi] for block, lo, hi in pieces]),
        np.concatenate([block[1][lo:hi] for block, lo, hi in pieces]),
    )


def vectors_for_range(
    config: SyntheticEmbeddingConfig, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors ``[start, stop)`` (float32, L2-normalised) and cluster labels (int32), made on their own."""
    if not 0 <= start <= stop <= config.n:
        raise InputError(f"range [{start}, {stop}) is not within 0..{config.n}")
    if start == stop:
        return np.zeros((0, config.d), dtype=np.float32), np.zeros(0, dtype=np.int32)
    return _embedding_range(config, start, stop, {})


def generate_embedding_chunks(
    config: SyntheticEmbeddingConfig,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(ids int64, vectors float32 (m, d), labels int32)`` chunks of up to ``config.chunk_size`` rows.

    ids are row numbers ``0..n-1``; the vectors do not depend on the chunk size.
    """
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, config.n, config.chunk_size):
        stop = min(start + config.chunk_size, config.n)
        vectors, labels = _embedding_range(config, start, stop, cache)
        yield np.arange(start, stop, dtype=np.int64), vectors, labels


def sample_queries(config: SyntheticEmbeddingConfig, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh query vectors from the same mixture (not copies of base vectors) and their labels."""
    if n < 0 or seed < 0:
        raise InputError(f"sample_queries: n={n} and seed={seed} must be non-negative")
    return _sample_mixture(config, stream(config.seed, S_QUERY, seed), n)


def write_embedding_npy(
    config: SyntheticEmbeddingConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> list[Path]:
    """Write ``ids.npy`` (int64), ``vectors.npy`` (float32, n x d) and ``labels.npy`` (int32), streaming."""
    names = {
        "ids": ("ids.npy", np.int64, (config.n,)),
        "vectors": ("vectors.npy", np.float32, (config.n, config.d)),
        "labels": ("labels.npy", np.int32, (config.n,)),
    }
    out = prepare_out(out_dir, [v[0] for v in names.values()], overwrite)
    tmp = {key: out / f".{fname}.partial" for key, (fname, _, _) in names.items()}
    try:
        arrays = {
            key: np.lib.format.open_memmap(tmp[key], mode="w+", dtype=dt, shape=shape)
            for key, (_, dt, shape) in names.items()
        }
        for ids, vectors, labels in generate_embedding_chunks(config):
            lo, hi = int(ids[0]), int(ids[-1]) + 1
            arrays["ids"][lo:hi], arrays["vectors"][lo:hi], arrays["labels"][lo:hi] = ids, vectors, labels
        for array in arrays.values():
            array.flush()
        del arrays
        paths = []
        for key, (fname, _, _) in names.items():
            os.replace(tmp[key], out / fname)
            paths.append(out / fname)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    logger.info("wrote %d synthetic vectors (d=%d) to %s", config.n, config.d, out)
    return paths
