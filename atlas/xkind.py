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


def detect_x_kind(values: np.ndarray | sp.spmatrix | sp.sparray) -> XKind:
    """Classify a (sample of a) matrix. Pass a few thousand rows; all stored values are inspected."""
    data = values.data if sp.issparse(values) else np.asarray(values).ravel()
    data = np.asarray(data, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return "counts"
    if data.min() < 0:
        return "scaled"
    if np.all(np.abs(data - np.round(data)) < 1e-6):
        return "counts"
    if data.max() <= LOG_SCALE_MAX:
        return "lognorm"
    return "normalized"
