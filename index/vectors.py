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
            f"{bad} vectors contain NaN, infinite or overflowing (> 1e19) values; fix the embedding before indexing or "
            "searching with them"
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


RESIDUAL_SCALE = 2.0**11
"""Residuals are stored times this: a float16 rounding error is at most 2**-11 of its value, so unscaled residuals of
unit vectors' components would fall in float16's subnormal range (absolute precision 2**-25, and zero wherever
denormals are flushed); scaled, they keep float16's 11 bits relative to themselves and stay below 0.5."""


def rounding_residuals(x32: np.ndarray, x16: np.ndarray) -> np.ndarray:
    """The float16 rounding errors of normalised vectors, stored as float16 times :data:`RESIDUAL_SCALE`:
    ``x16 + residuals / RESIDUAL_SCALE`` equals ``x32`` to about 2**-22 of each component (exact re-ranking,
    :mod:`index.rerank`)."""
    return to_float16((x32 - float16_to_float32(x16)) * np.float32(RESIDUAL_SCALE))


_F16_TO_F32_SCALE = np.float32(2.0**112)
"""2**(127 - 15): turns a float16's exponent and mantissa, moved into float32's fields, into its value (subnormals
included)."""


def float16_to_float32_small(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float32)`` for small float16 arrays of finite values, exact, in a few vectorised integer
    operations (numpy's conversion is a scalar loop, ~8 ns a value; torch's costs ~50 µs a call)."""
    u = np.ascontiguousarray(x, dtype=np.float16).view(np.int16).astype(np.int32)
    bits = ((u & 0x7FFF) << 13) | ((u & -0x8000) << 16)
    return bits.view(np.float32) * _F16_TO_F32_SCALE


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
