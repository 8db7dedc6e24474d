"""Which batch each cell is for the scVI embedder (:mod:`atlas.embed.scvi`), and the atlas vectors it passes
through from ``obsm`` (``atlas_obsm``).

``batch_key``: ``dataset_id`` (a cell's batch is its chunk's dataset id; for a query, the source's name), ``none``
(no batch), or an obs column whose values (as strings) are the batches; readers give the column in
:attr:`CellChunk.obs`. At fit every sampled atlas cell must have a value; at transform a cell without one (a query
lacking the column, or a value missing) is the batch named after its source (the chunk's dataset id): a query
without the column is one new batch.
"""

from __future__ import annotations

import logging

import numpy as np

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.pca import SampleSource, sample_pass
from scatlas.atlas.errors import InputError

logger = logging.getLogger("scatlas.atlas.embed.scvi")

BY_DATASET = "dataset_id"
NO_BATCH = "none"
FIT_ALL = "all"
"""The one batch name of a fit with ``batch_key=none`` (the model then has no batch covariate)."""


def check_batch_key(batch_key: object) -> str:
    """``batch_key`` as given (``dataset_id``, ``none`` or an obs column name); InputError when it is no name."""
    if not isinstance(batch_key, str) or not batch_key.strip():
        raise InputError(
            f"scvi option batch_key must be 'dataset_id', 'none' or an obs column name (got {batch_key!r})"
        )
    return batch_key


def batch_column(batch_key: str) -> str | None:
    """The obs column ``batch_key`` reads (None for ``dataset_id`` and ``none``)."""
    return None if batch_key in (BY_DATASET, NO_BATCH) else batch_key


def cell_batches(chunk: CellChunk, batch_key: str) -> np.ndarray | None:
    """Each cell's batch name for embedding: an object array of ``len(chunk)`` strings (None for a cell of a chunk
    without a dataset id and without a value), or None for ``batch_key=none``."""
    n = len(chunk)
    if batch_key == NO_BATCH:
        return None
    source = None if chunk.dataset_id is None else str(chunk.dataset_id)
    names = np.full(n, source, dtype=object)
    column = batch_column(batch_key)
    if column is not None and column in chunk.obs:
        values = np.asarray(chunk.obs[column], dtype=object)
        if values.shape != (n,):
            raise InputError(f"obs column {column!r} has {values.shape} values for a chunk of {n} cells")
        has = np.array([v is not None for v in values], dtype=bool)
        names[has] = [str(v) for v in values[has]]
    return names


def fit_batches(chunk: CellChunk, batch_key: str) -> np.ndarray:
    """Each sampled atlas cell's batch name for the fit (object array; None where a cell has no value in the
    batch column, refused by :func:`check_fit_batches`)."""
    n = len(chunk)
    if batch_key == NO_BATCH:
        return np.full(n, FIT_ALL, dtype=object)
    column = batch_column(batch_key)
    if column is None:
        return np.full(n, str(chunk.dataset_id), dtype=object)
    if column not in chunk.obs:
        raise InputError(
            f"scvi batch_key={column!r}: the atlas cells were read without obs column {column!r} (read them with "
            f"obs_columns=({column!r},), as build does)"
        )
    values = np.asarray(chunk.obs[column], dtype=object)
    return np.array([None if v is None else str(v) for v in values], dtype=object)


def check_fit_batches(batches: np.ndarray, batch_key: str) -> None:
    """InputError when sampled atlas cells have no value in the batch column (the message names the column and
    counts the cells; it never shows the data's values)."""
    missing = int(sum(1 for b in batches if b is None))
    if missing:
        raise InputError(
            f"scvi batch_key={batch_key!r}: {missing} of the {len(batches)} atlas cells sampled for the fit have no "
            f"value in obs column {batch_key!r}; every atlas cell needs one (set it for the datasets that lack it, "
            "e.g. `scatlas ingest --obs-set`), or use batch_key=dataset_id"
        )


def atlas_vectors(chunk: CellChunk, key: str, dim: int) -> np.ndarray:
    """The atlas cells' vectors read from ``obsm[key]`` (``atlas_obsm``): float32 ``(len(chunk), dim)``, every
    value finite; InputError naming the key otherwise (another model's embedding, or damaged values)."""
    values = np.asarray(chunk.obsm[key])
    if values.ndim != 2 or values.shape[0] != len(chunk):
        raise InputError(f"obsm[{key!r}] has shape {values.shape} for {len(chunk)} cells: it must be cells x dimensions")
    if values.shape[1] != dim:
        raise InputError(
            f"atlas_obsm={key!r}: obsm[{key!r}] has {values.shape[1]} dimensions but the scVI model's latent space has "
            f"{dim} (n_latent): the atlas vectors must be this model's embedding (the same model and version)"
        )
    out = np.array(values, dtype=np.float32, copy=True)
    bad = int((~np.isfinite(out).all(axis=1)).sum())
    if bad:
        raise InputError(f"obsm[{key!r}] has non-finite values (NaN or inf) in {bad} atlas cell(s): recompute them")
    return out


def check_atlas_sample(sample: SampleSource, key: str, dim: int) -> None:
    """``atlas_obsm`` at build: the atlas vectors of the sample's first non-empty chunk checked against the model
    (:func:`atlas_vectors`) before the build reads them all; InputError when the sample is empty or was read
    without ``obsm[key]``."""
    for chunk in sample_pass(sample):
        if len(chunk) == 0:
            continue
        if key not in chunk.obsm:
            raise InputError(f"atlas_obsm={key!r}: the atlas cells were read without obsm[{key!r}]")
        atlas_vectors(chunk, key, dim)
        logger.info("scvi: atlas vectors from obsm[%r] (%d dimensions, the model's n_latent)", key, dim)
        return
    raise InputError(f"cannot check atlas_obsm={key!r} on an empty sample: the atlas (or the sample) has no cells")
