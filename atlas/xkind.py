"""What a matrix of expression values holds: raw counts, normalised, log-normalised or scaled.

Detected from a sample of non-zero values, recorded per dataset at ingest and per query at annotation, so that the
same normalisation is applied to atlas and query cells.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

XKind = Literal["counts", "normalized", "lognorm", "scaled"]
"""``counts``: non-negative integers (UMI or reads). ``normalized``: non-negative, non-integer, not log scale
(CPM, TPM, RPKM). ``lognorm``: log1p of normalised values. ``scaled``: centred/scaled (has negative values)."""

X_KINDS: tuple[str, ...] = get_args(XKind)

# log1p(CP10k) tops out near 10; log1p of CPM near 14. Anything non-integer above this is not on a log scale.
LOG_SCALE_MAX = 30.0


STRAY_SHARE = 0.001
"""A kind of value held by fewer than this share of a sample's non-zero values does not decide the matrix' kind: one
negative or fractional value in a matrix of counts is a bad value (refused at ingest, naming its row:
:func:`atlas.validate.check_values`), not a sign that the whole matrix is scaled or normalised."""


def detect_x_kind(values: np.ndarray | sp.spmatrix | sp.sparray) -> XKind:
    """Classify a (sample of a) matrix. Pass a few thousand rows; all stored values are inspected, and a kind of
    value held by under :data:`STRAY_SHARE` of them is left out (a stray value, not the matrix' kind)."""
    data = values.data if sp.issparse(values) else np.asarray(values).ravel()
    data = np.asarray(data, dtype=np.float64)
    data = data[np.isfinite(data) & (data != 0)]
    if data.size == 0:
        return "counts"
    negative = data < 0
    if negative.mean() >= STRAY_SHARE:
        return "scaled"
    data = data[~negative]
    fractional = np.abs(data - np.round(data)) >= 1e-6
    if fractional.mean() < STRAY_SHARE:
        return "counts"
    if np.quantile(data[fractional], 1 - STRAY_SHARE) <= LOG_SCALE_MAX:
        return "lognorm"
    return "normalized"


LOGNORM_TOTAL_TOLERANCE = 0.02
"""Rows whose expm1 sums lie within this relative distance of their median count as normalised to one total."""


def detect_lognorm_total(
    values: np.ndarray | sp.spmatrix | sp.sparray, base: float = float(np.e)
) -> float | None:
    """The per-cell total that a log-normalised matrix was normalised to, or None when it cannot be told.

    ``log1p(x / total_i * T)`` over all of a cell's genes gives rows whose ``expm1`` sums are all ``T``: 10,000 for
    Seurat's LogNormalize (CP10k), 1e6 for log1p(CPM), the median total count for scanpy's ``normalize_total``
    without ``target_sum``. When at least 99% of the non-empty rows of the sample sum to within
    :data:`LOGNORM_TOTAL_TOLERANCE` of their median, that median is returned. A matrix holding a subset of the
    genes (highly variable genes only) has rows that sum to different values: None, and the values are used as
    they are. ``base=2`` tells the total of ``log2(1 + x)`` values (log2 CPM/TPM) the same way.
    """
    X = sp.csr_matrix(values, dtype=np.float64)
    if X.nnz == 0:
        return None
    E = X.copy()
    E.data = np.expm1(E.data * np.log(base))
    totals = np.asarray(E.sum(axis=1)).ravel()[np.diff(X.indptr) > 0]
    median = float(np.median(totals))
    if not np.isfinite(median) or median <= 0:
        return None
    within = np.abs(totals - median) <= LOGNORM_TOTAL_TOLERANCE * median
    return median if within.mean() >= 0.99 else None
