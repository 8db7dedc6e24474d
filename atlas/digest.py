"""A checksum of a dataset's expression values, computed as they are ingested and again by ``scatlas verify``.

The digest is SHA-256 over the values in canonical order (cell id, then gene id) of ``(cell id int64, gene id
int64, value float32)``, fed chunk by chunk; chunks must cover whole cells in increasing id order, so any chunking
gives the same digest.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp


def canonical(block: sp.csr_matrix) -> sp.csr_matrix:
    """``block`` with duplicate entries summed, explicit zeros dropped and column indices sorted (a copy)."""
    out = sp.csr_matrix(block, dtype=np.float32, copy=True)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    return out


_ENTRY = np.dtype([("cell", "<i8"), ("gene", "<i8"), ("value", "<f4")])  # packed: 20 bytes a value


class XDigest:
    """Streaming SHA-256 of expression values; :meth:`update` with consecutive canonical blocks."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, ids: np.ndarray, block: sp.csr_matrix) -> None:
        """Add a canonical CSR ``block`` whose row ``i`` is cell ``ids[i]``; its columns are atlas gene ids."""
        entries = np.empty(block.nnz, dtype=_ENTRY)
        entries["cell"] = np.repeat(np.asarray(ids, dtype=np.int64), np.diff(block.indptr))
        entries["gene"] = block.indices
        entries["value"] = block.data
        self._hash.update(entries.tobytes())

    def hexdigest(self) -> str:
        """The digest of the values fed so far (hex)."""
        return self._hash.hexdigest()
