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
    ``dataset_id``: the dataset the cells come from (a query: the source's name).
    ``obs``: the cell metadata columns an embedder asked for (:attr:`Embedder.obs_columns`), each an object array
    of ``len(chunk)`` strings, None where a cell has no value (:func:`obs_values`); a column the cells lack
    altogether (a query without it) is absent.
    ``measured``: bool per gene of ``genes``, the genes the cells' dataset measured (an atlas store's chunks are in
    the store's gene space, where the genes a dataset lacks are columns of zeros); None: every gene of ``genes``.
    """

    ids: np.ndarray
    X: sp.csr_matrix | None
    x_kind: XKind
    genes: GeneVocabulary
    obsm: Mapping[str, np.ndarray] = field(default_factory=dict)
    dataset_id: str | None = None
    obs: Mapping[str, np.ndarray] = field(default_factory=dict)
    measured: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def obs_values(values: object) -> np.ndarray:
    """Cell metadata values as :attr:`CellChunk.obs` holds them: an object array of ``str(value)``, None where a
    value is missing (None, NaN, ``pd.NA``, NaT)."""
    import pandas as pd

    arr = np.asarray(values, dtype=object).ravel()
    if len(arr) == 0:
        return np.zeros(0, dtype=object)
    missing = np.asarray(pd.isna(arr), dtype=bool)
    out = np.array([str(v) for v in arr], dtype=object)
    out[missing] = None
    return out
