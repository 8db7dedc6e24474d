"""Writing a synthetic counts-level atlas as one ``.h5ad`` per dataset, with h5py, chunk by chunk.

Memory is bounded by the chunk size: obs columns and the CSR matrices are resizable datasets filled in place,
in the element encodings anndata reads (``csr_matrix`` 0.1.0, ``dataframe``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.outputs import H5AD_MARK
from scatlas.atlas.synthetic._common import prepare_out
from scatlas.atlas.synthetic.cells import empty_cells, iter_cells, make_obs
from scatlas.atlas.synthetic.config import H5adLayout, SyntheticAtlasConfig
from scatlas.atlas.synthetic.counts import layout_matrices, resolve_layout
from scatlas.atlas.synthetic.plan import AtlasPlan, DatasetPlan, plan_atlas, select_datasets

try:
    from anndata.io import write_elem
except ImportError:  # anndata < 0.11
    from anndata.experimental import write_elem  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

SYNTH_MARK = "synth"
"""The value of the :data:`~scatlas.atlas.outputs.H5AD_MARK` root attribute of every ``.h5ad`` written here."""


class _CsrAppender:
    """A CSR matrix element (anndata encoding ``csr_matrix`` 0.1.0) filled row-block by row-block."""

    def __init__(self, parent: h5py.Group, key: str, shape: tuple[int, int], compression: str | None) -> None:
        group = parent.create_group(key)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array(shape, dtype=np.int64)
        kw: dict[str, Any] = {"maxshape": (None,), "chunks": (1 << 18,), "compression": compression}
        self._data = group.create_dataset("data", shape=(0,), dtype=np.float32, **kw)
        self._indices = group.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
        self._indptr = group.create_dataset("indptr", shape=(shape[0] + 1,), dtype=np.int64)
        self._indptr[0] = 0
        self._n_rows = shape[0]
        self.rows = 0
        self.nnz = 0

    def append(self, X: sp.csr_matrix) -> None:
        """Add the rows of ``X`` after those written."""
        stop = self.nnz + X.nnz
        self._data.resize((stop,))
        self._indices.resize((stop,))
        self._data[self.nnz : stop] = X.data.astype(np.float32, copy=False)
        self._indices[self.nnz : stop] = X.indices.astype(np.int32, copy=False)
        self._indptr[self.rows + 1 : self.rows + 1 + X.shape[0]] = X.indptr[1:].astype(np.int64) + self.nnz
        self.rows += X.shape[0]
        self.nnz = stop

    def close(self) -> None:
        """Check that every row of the declared shape was written."""
        if self.rows != self._n_rows:
            raise RuntimeError(f"CSR writer got {self.rows} rows, expected {self._n_rows}")


class _ObsAppender:
    """A dataframe element written by anndata (empty, resizable) and then filled slice by slice."""

    def __init__(self, parent: h5py.Group, key: str, template: pd.DataFrame, n_rows: int) -> None:
        write_elem(parent, key, template, dataset_kwargs={"maxshape": (None,), "chunks": True})
        self._group = parent[key]
        self._columns = list(template.columns)
        self._categorical = {c for c in self._columns if isinstance(template[c].dtype, pd.CategoricalDtype)}
        for ds in self._datasets():
            ds.resize((n_rows,))
        self.rows = 0

    def _column(self, name: str) -> h5py.Dataset:
        return self._group[name]["codes"] if name in self._categorical else self._group[name]

    def _datasets(self) -> list[h5py.Dataset]:
        return [self._group[self._group.attrs["_index"]]] + [self._column(c) for c in self._columns]

    def append(self, df: pd.DataFrame) -> None:
        """Write the rows of ``df`` (same columns and categories as the template) after those written."""
        lo, hi = self.rows, self.rows + len(df)
        self._group[self._group.attrs["_index"]][lo:hi] = np.asarray(df.index, dtype=object)
        for name in self._columns:
            values = df[name].cat.codes.to_numpy() if name in self._categorical else df[name].to_numpy()
            target = self._column(name)
            target[lo:hi] = values.astype(target.dtype, copy=False)
        self.rows = hi


def _write_dataset_h5ad(
    plan: AtlasPlan, ds: DatasetPlan, path: Path, layout: str, compression: str | None
) -> None:
    """Write dataset ``ds`` of ``plan`` to ``path`` in ``layout``, one chunk of cells at a time."""
    shape = (ds.n_cells, plan.config.n_genes)
    template = make_obs(plan, ds, empty_cells())
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        f.attrs[H5AD_MARK] = SYNTH_MARK  # scatlas wrote it: a later synth (or another command) may replace it
        obs = _ObsAppender(f, "obs", template, ds.n_cells)
        write_elem(f, "var", plan.var)
        for key in ("obsm", "obsp", "varm", "varp", "layers"):
            write_elem(f, key, {})
        write_elem(f, "uns", {"scatlas_synthetic": {"config": plan.config.to_json(), "layout": layout}})
        writers = {"X": _CsrAppender(f, "X", shape, compression)}
        if layout == "lognorm+counts":
            writers["layers/counts"] = _CsrAppender(f["layers"], "counts", shape, compression)
        if layout == "lognorm+raw":
            writers["raw/X"] = _raw_group(f, plan.var, shape, compression)
        for cells in iter_cells(plan, ds, plan.config.chunk_size):
            obs.append(make_obs(plan, ds, cells))
            X, extra = layout_matrices(cells.counts, layout)
            writers["X"].append(X)
            for key, matrix in extra.items():
                writers[key].append(matrix)
        for writer in writers.values():
            writer.close()


def _raw_group(
    f: h5py.File, var: pd.DataFrame, shape: tuple[int, int], compression: str | None
) -> _CsrAppender:
    """The ``raw`` group (var, empty varm) and the writer of its X."""
    raw = f.create_group("raw")
    raw.attrs["encoding-type"] = "raw"
    raw.attrs["encoding-version"] = "0.1.0"
    write_elem(raw, "var", var)
    write_elem(raw, "varm", {})
    return _CsrAppender(raw, "X", shape, compression)


def write_h5ad_datasets(
    config: SyntheticAtlasConfig,
    out_dir: str | os.PathLike[str],
    *,
    layout: H5adLayout | None = None,
    datasets: Sequence[int] | None = None,
    overwrite: bool = False,
    compression: str | None = None,
) -> list[Path]:
    """Write one ``<dataset_id>.h5ad`` per dataset, streaming chunk by chunk (memory ~ chunk size).

    ``layout`` (default ``config.layout``) picks what X holds; see :data:`H5adLayout`. Each file is written to
    a temporary name and renamed when complete. ``compression`` is an h5py filter for X (e.g. ``"lzf"``,
    ``"gzip"``).
    """
    chosen = resolve_layout(layout, config)
    if compression not in (None, "lzf", "gzip"):
        raise InputError(f"compression={compression!r}: use None, 'lzf' or 'gzip'")
    plan = plan_atlas(config)
    selected = select_datasets(plan, datasets)
    out = prepare_out(out_dir, [f"{ds.dataset_id}.h5ad" for ds in selected], overwrite)
    paths = []
    for ds in selected:
        path = out / f"{ds.dataset_id}.h5ad"
        tmp = out / f".{ds.dataset_id}.h5ad.partial"
        t0 = time.perf_counter()
        try:
            _write_dataset_h5ad(plan, ds, tmp, chosen, compression)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info(
            "wrote %s: %d cells x %d genes (%s) in %.1fs",
            path,
            ds.n_cells,
            config.n_genes,
            chosen,
            time.perf_counter() - t0,
        )
        paths.append(path)
    return paths
