"""Uniform sampling without replacement, seeded and sorted: the one way cells, rows and ids are sampled."""

from __future__ import annotations

import numpy as np


def sample_sorted(population: int | np.ndarray, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Up to ``n`` items drawn uniformly without replacement, sorted.

    ``population``: a count (draws positions ``0 .. population-1``, int64) or an array (draws its items).
    ``seed``: a seed or a generator (which then advances only when a draw is made). When ``n`` covers the
    population, all of it is returned (sorted) without drawing.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if isinstance(population, int | np.integer):
        total = int(population)
        n = max(0, min(int(n), total))
        if n == total:
            return np.arange(total, dtype=np.int64)
        return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)
    items = np.asarray(population)
    n = max(0, min(int(n), len(items)))
    if n == len(items):
        return np.sort(items)
    return np.sort(rng.choice(items, size=n, replace=False))
