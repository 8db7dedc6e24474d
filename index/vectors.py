"""Vector preparation shared by build and search: L2 normalisation and the float16 storage format."""

from __future__ import annotations

import numpy as np

from atlas.errors import InputError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (a new array); all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise InputError(f"vectors must be a 2-D array (got shape {x.shape})")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise InputError(f"{bad} vectors contain NaN or infinite values; fix the embedding before indexing")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def as_stored(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise and round to the stored float16 format: ``(float16 vectors, the same as float32)``.

    The index is fed the float32 copy of the float16 values, so scores of exact indexes equal scores computed from
    the stored vectors (re-ranking, sweeps, ground truth).
    """
    x16 = l2_normalize(x).astype(np.float16)
    return x16, x16.astype(np.float32)


def check_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Validate query vectors against the index dimension and L2-normalise them."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InputError(
            f"query vectors have shape {tuple(np.shape(vectors))} but the index holds {dim}-d vectors; embed the "
            "queries with the index's embedder (AtlasIndex.embed)"
        )
    return l2_normalize(arr)
