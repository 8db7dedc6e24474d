"""Bring any accepted expression matrix onto one scale: log1p of counts per 10k (``lognorm``)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.xkind import XKind

TARGET_SUM = 1e4


def to_lognorm(X: sp.csr_matrix, kind: XKind, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Return a new float32 CSR matrix of log1p(x / rowsum * target_sum); ``lognorm`` input is returned as is.

    Row-preserving and row-independent: a cell's values do not depend on the other rows. The input is not modified.
    """
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if kind == "lognorm":
        return X
    if kind == "scaled":
        raise InputError(
            "scaled (centred) values cannot be normalised: provide raw counts (layers['counts'] or .raw) or "
            "log-normalised values"
        )
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
    X.data *= np.repeat(scale, np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X
