"""Vector preparation shared by build and search: L2 normalisation and the float16 storage format."""

from __future__ import annotations

import numpy as np

from scatlas.atlas.errors import InputError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (a new array); all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise InputError(f"vectors must be a 2-D array (got shape {x.shape})")
    sq = np.einsum("ij,ij->i", x, x)  # no temporary the size of x
    if not np.isfinite(sq).all():  # NaN or inf anywhere in a row makes its squared norm non-finite
        bad = int((~np.isfinite(sq)).sum())
        raise InputError(
            f"{bad} vectors contain NaN, infinite or overflowing (> 1e19) values; fix the embedding before indexing"
        )
    norms = np.sqrt(sq)
    norms[norms == 0] = 1.0  # zero rows stay zero (a masked divide gives the same values, slower)
    np.divide(x, norms[:, None], out=x)
    return x


def as_stored(x: np.ndarray, *, rounded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Normalise and round to the stored float16 format: ``(float16 vectors, float32 vectors for FAISS)``.

    With ``rounded`` (exact indexes, training samples) the float32 copy holds the float16 values, so exact scores
    equal scores computed from the stored vectors (re-ranking, sweeps, ground truth); without it the float32
    vectors are the normalised ones before rounding (for PQ codes the difference is far below their own error,
    and it saves a conversion).
    """
    x32 = l2_normalize(x)
    x16 = to_float16(x32)
    return x16, (float16_to_float32(x16) if rounded else x32)


def to_float16(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float16)`` for float32 arrays, bit for bit (round to nearest even, subnormals kept; checked
    against numpy on every non-NaN float32 value), by torch's vectorised kernel instead of numpy's scalar loop
    (see docs/benchmarks.md#float16-conversion). The one float16 rounding of index vectors."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(x).to(torch.float16).numpy()


def float16_to_float32(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float32)`` for float16 arrays (exact), by torch's vectorised kernel (numpy's is a scalar loop)."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float16)
    return torch.from_numpy(x).float().numpy()


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
