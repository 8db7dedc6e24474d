"""The unit of streaming: a chunk of cells with their expression values and/or precomputed embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.xkind import XKind


@dataclass(frozen=True)
class CellChunk:
    """A block of cells.

    ``ids``: int64 cell ids (the atlas ``soma_joinid``; for query cells, their row positions).
    ``X``: float32 CSR, one row per cell, columns in the gene space ``genes`` (``None`` when not read).
    ``x_kind``: what ``X`` holds (one kind per chunk: chunks never span datasets).
    ``obsm``: precomputed per-cell matrices, e.g. ``{"uce": (n, 1280) float32}``.
    """

    ids: np.ndarray
    X: sp.csr_matrix | None
    x_kind: XKind
    genes: GeneVocabulary
    obsm: Mapping[str, np.ndarray] = field(default_factory=dict)
    dataset_id: str | None = None

    def __len__(self) -> int:
        return len(self.ids)
