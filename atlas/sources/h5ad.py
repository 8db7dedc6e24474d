"""Chunked reading of ``.h5ad`` files (never densifying the whole matrix) and of in-memory AnnData objects."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.sources.base import (
    COUNTS_LAYERS,
    ExpressionChoice,
    checked_block,
    expression_from_samples,
    genes_from_var,
)
from scatlas.atlas.sources.hdf5_checks import check_self_contained
from scatlas.atlas.validate import check_csr, check_name, escaped, float32_csr, to_float32

logger = logging.getLogger(__name__)

_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)
"""What h5py, numpy and scipy raise on damaged bytes or structure of a file."""

ANNDATA_MEMBERS = ("obs", "var", "X")
"""What every AnnData .h5ad holds at its top level."""


def check_anndata_hdf5(f: h5py.File, what: str, members: tuple[str, ...] = ANNDATA_MEMBERS) -> None:
    """InputError unless the open HDF5 file ``f`` (``what``, for the message) holds the top-level ``members`` of an
    AnnData .h5ad, and holds its own data (:func:`~atlas.sources.hdf5_checks.check_self_contained`): the one check
    every reader of .h5ad files makes (ingest, annotate, the server's uploads), before it reads anything, so that an
    HDF5 file of another kind gets one clear message everywhere and none reads other files through links."""
    missing = [m for m in members if m not in f]
    if missing:
        raise InputError(f"{what} is an HDF5 file but not an AnnData .h5ad (no {', '.join(missing)}); give a file "
                         "written by AnnData (adata.write_h5ad)")
    check_self_contained(f, what)


SAMPLE_WINDOWS = 4
SAMPLE_ROWS_PER_WINDOW = 500


def _sample_windows(n_obs: int) -> list[tuple[int, int]]:
    if n_obs <= SAMPLE_WINDOWS * SAMPLE_ROWS_PER_WINDOW:
        return [(0, n_obs)]
    starts = np.linspace(0, n_obs - SAMPLE_ROWS_PER_WINDOW, SAMPLE_WINDOWS).astype(int)
    return [(int(s), int(s) + SAMPLE_ROWS_PER_WINDOW) for s in starts]


def _windows(positions: np.ndarray, chunk_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Split sorted row positions into row windows [a, b) of at most ``chunk_size`` rows."""
    if chunk_size <= 0:
        raise InputError(f"chunk size must be positive, got {chunk_size}")
    if len(positions) == 0:
        return
    if np.any(np.diff(positions) <= 0):
        raise InputError("row positions must be sorted and unique")
    first, last = int(positions[0]), int(positions[-1]) + 1
    for a in range(first, last, chunk_size):
        b = min(a + chunk_size, last)
        lo, hi = np.searchsorted(positions, [a, b])
        if hi > lo:
            yield a, b, positions[lo:hi]


class _MatrixReader:
    """Row-block access to one on-disk matrix element (CSR, CSC or dense)."""

    def __init__(self, element: h5py.Group | h5py.Dataset, what: str) -> None:
        self.what = what
        self.element = element
        if isinstance(element, h5py.Dataset):
            self.kind = "dense"
            self.shape = tuple(element.shape)
        else:
            enc = element.attrs.get("encoding-type", element.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            self.shape = tuple(int(s) for s in element.attrs.get("shape", element.attrs.get("h5sparse_shape")))
            if enc in ("csr_matrix", "csr"):
                self.kind = "csr"
            elif enc in ("csc_matrix", "csc"):
                self.kind = "csc"
                self._backed = anndata.io.sparse_dataset(element)
                logger.warning("%s is stored column-major (CSC): reading rows is slow; store it as CSR", what)
            else:
                raise InputError(f"{what}: unsupported matrix encoding {enc!r}")
        if len(self.shape) != 2:
            raise InputError(f"{what}: expected a 2-d matrix, got shape {self.shape}")
        if self.kind in ("csr", "csc"):
            major = self.shape[0] if self.kind == "csr" else self.shape[1]
            if element["indptr"].shape != (major + 1,):
                raise InputError(f"{what}: the sparse matrix is damaged: {element['indptr'].shape[0]} row pointers for "
                                 f"a {self.kind.upper()} matrix of shape {self.shape}; rewrite the file")

    def rows(self, a: int, b: int) -> sp.csr_matrix:
        """Rows ``a:b`` as float32 CSR; InputError when the file's bytes or structure are damaged."""
        try:
            return self._rows(a, b)
        except _READ_ERRORS as exc:
            raise InputError(f"{self.what}: rows {a}-{b - 1} cannot be read ({type(exc).__name__}): the file is "
                             "damaged; rewrite or re-download it") from exc

    def _rows(self, a: int, b: int) -> sp.csr_matrix:
        what = f"{self.what}: rows {a}-{b - 1}"
        if self.kind == "dense":
            return float32_csr(self.element[a:b], what)
        if self.kind == "csc":
            return float32_csr(self._backed[a:b], what)
        indptr = self.element["indptr"][a : b + 1].astype(np.int64)
        n_data = int(self.element["data"].shape[0])
        check_csr(indptr, np.zeros(0, dtype=np.int64), n_data, self.shape[1], self.what)
        lo, hi = int(indptr[0]), int(indptr[-1])
        if hi - lo > (b - a) * self.shape[1]:  # more entries than the rows can hold: do not allocate them
            raise InputError(f"{what}: the sparse matrix is damaged: {hi - lo:,} stored values for {b - a} rows of "
                             f"{self.shape[1]} columns; rewrite the file")
        data = to_float32(self.element["data"][lo:hi], what)
        indices = self.element["indices"][lo:hi]
        check_csr(indptr, indices, n_data, self.shape[1], self.what)
        return sp.csr_matrix((data, indices, indptr - lo), shape=(b - a, self.shape[1]))


RAW_NAMES = ("raw", "raw/X", "raw.X")
"""What ``--x-layer`` calls ``adata.raw.X``; ``X`` is ``adata.X``, anything else (or ``layers/NAME``) a layer."""


def requested_matrix(x_layer: str, layers: list[str], has_x: bool, has_raw: bool, what: str) -> str:
    """The location (``X``, ``raw/X``, ``layers/NAME``) of the matrix ``--x-layer`` names; InputError listing what
    the file holds when it is absent. Layer names come from the file: shown escaped, checked with check_name."""
    if x_layer == "X" and has_x:
        return "X"
    if x_layer in RAW_NAMES and has_raw:
        return "raw/X"
    name = x_layer[len("layers/"):] if x_layer.startswith("layers/") and x_layer[len("layers/"):] in layers else x_layer
    if name in layers:
        return f"layers/{check_name(name, f'{what}: layer')}"
    held = (["X"] if has_x else []) + (["raw"] if has_raw else []) + [escaped(n) for n in layers]
    raise InputError(f"{what}: no matrix {escaped(x_layer)} to read (--x-layer names X, raw or a layer); it holds: "
                     f"{', '.join(held) or 'none'}")


def _dataframe(element: h5py.Group, what: str) -> pd.DataFrame:
    """An AnnData dataframe element (obs, var); InputError when the file holds something else there."""
    frame = anndata.io.read_elem(element)
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"{what} is not a dataframe (it reads as {type(frame).__name__}); the file is damaged: "
                         "rewrite it with anndata")
    return frame


class H5adSource:
    """A ``.h5ad`` file read in row chunks. obs/var are read into memory; the matrix never is."""

    def __init__(self, path: str | Path, name: str | None = None, x_layer: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.x_layer = x_layer  # --x-layer: the one matrix to read (default: counts wherever they are)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: not a readable .h5ad (HDF5) file: {exc}") from exc
        try:
            self._setup()
        except InputError:
            self.close()
            raise
        except Exception as exc:  # corrupt groups, unexpected encodings
            self.close()
            # the reader's message can quote the file's contents (attribute values, column names): not repeated
            raise InputError(f"{self.path}: could not read the AnnData structure ({type(exc).__name__} in its obs, "
                             "var or matrix encoding): write the file again with anndata (adata.write_h5ad)") from exc

    def _setup(self) -> None:
        f = self._file
        what = str(self.path)
        check_anndata_hdf5(f, what, ANNDATA_MEMBERS if self.x_layer is None else ("obs", "var"))
        self.obs: pd.DataFrame = _dataframe(f["obs"], f"{what}: obs")
        self._var_main: pd.DataFrame = _dataframe(f["var"], f"{what}: var")
        layers = f["layers"] if "layers" in f and isinstance(f["layers"], h5py.Group) else None
        has_raw = "raw" in f and isinstance(f["raw"], h5py.Group) and "X" in f["raw"]
        self._readers: dict[str, _MatrixReader] = {}
        if self.x_layer is not None:
            loc = requested_matrix(self.x_layer, [str(k) for k in layers] if layers is not None else [], "X" in f,
                                   has_raw, what)
            if loc == "X":
                element = f["X"]
            elif loc == "raw/X":
                element = f["raw"]["X"]
            else:
                assert layers is not None  # requested_matrix only names layers the file has
                element = layers[loc[len("layers/"):]]
            self._readers[loc] = _MatrixReader(element, f"{what}: {loc}")
        else:
            self._readers["X"] = _MatrixReader(f["X"], f"{what}: X")
            for layer in COUNTS_LAYERS:
                if layers is not None and layer in layers:
                    self._readers[f"layers/{layer}"] = _MatrixReader(layers[layer], f"{what}: layers/{layer}")
                    break
            if has_raw:
                self._readers["raw/X"] = _MatrixReader(f["raw"]["X"], f"{what}: raw/X")
        n = len(self.obs)
        for loc, reader in self._readers.items():
            if reader.shape[0] != n:
                raise InputError(f"{what}: {loc} has {reader.shape[0]} rows but obs has {n} cells")
        if "X" in self._readers and self._readers["X"].shape[1] != len(self._var_main):
            raise InputError(f"{what}: X has {self._readers['X'].shape[1]} columns but var has {len(self._var_main)}")
        samples = {loc: self._sample(reader) for loc, reader in self._readers.items()}
        self.expression: ExpressionChoice = expression_from_samples(samples, what)
        self._reader = self._readers[self.expression.location]
        if self.expression.location == "raw/X":
            self.var: pd.DataFrame = _dataframe(f["raw"]["var"], f"{what}: raw/var")
        else:
            self.var = self._var_main
        if self._reader.shape[1] != len(self.var):
            raise InputError(f"{what}: {self.expression.location} columns do not match its var")
        self.genes: GeneVocabulary = genes_from_var(self.var, what)
        self._obsm_group = f["obsm"] if "obsm" in f and isinstance(f["obsm"], h5py.Group) else None
        logger.info("%s: %d cells x %d genes; expression from %s", what, n, len(self.var), self.expression.describe())

    def _sample(self, reader: _MatrixReader) -> sp.csr_matrix:
        """Rows from a few windows spread over the matrix (what its kind and scale are told from)."""
        blocks = [reader.rows(a, b) for a, b in _sample_windows(reader.shape[0])]
        return sp.csr_matrix(sp.vstack(blocks)) if blocks else sp.csr_matrix((0, reader.shape[1]))

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def obsm_keys(self) -> list[str]:
        if self._obsm_group is None:
            return []
        return [k for k, v in self._obsm_group.items() if isinstance(v, h5py.Dataset) and v.ndim == 2]

    def read_obsm(self, key: str, rows: np.ndarray) -> np.ndarray:
        if self._obsm_group is None or key not in self.obsm_keys():
            raise InputError(f"{self.path}: no obsm[{key!r}]; available: {self.obsm_keys() or 'none'}")
        ds = self._obsm_group[key]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, ds.shape[1]), dtype=np.float32)
        block = ds[int(rows[0]) : int(rows[-1]) + 1]
        return to_float32(block[rows - rows[0]], f"{self.path}: obsm[{escaped(key)}]")

    def iter_rows(self, rows: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        for a, b, pos in _windows(np.asarray(rows, dtype=np.int64), chunk_size):
            block = self._reader.rows(a, b)
            block = block if len(pos) == b - a else block[pos - a]
            yield pos, checked_block(block, pos, f"{self.path}: {self.expression.location}", self.expression)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken file must not mask the real error
            self._file.close()

    def __enter__(self) -> H5adSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_in_memory(matrix: Any, what: str) -> None:
    """InputError when an in-memory sparse matrix's structure is invalid (out-of-range indices, bad pointers,
    a column named twice in a row): a legacy file loaded whole skips the per-block checks of the chunked reader."""
    if not sp.issparse(matrix) or matrix.format not in ("csr", "csc"):
        return
    try:
        matrix.check_format(full_check=True)
    except ValueError as exc:
        raise InputError(f"{what}: the sparse matrix is damaged ({type(exc).__name__}); rewrite the file") from exc
    if matrix.has_canonical_format:  # sorted, no duplicates: told without a copy
        return
    copy = matrix.copy()
    copy.sum_duplicates()
    if copy.nnz != matrix.nnz:
        raise InputError(f"{what}: the sparse matrix is damaged: an entry is stored twice; rewrite the file")


class AnnDataSource:
    """An in-memory AnnData viewed as a source. The caller's object is never modified."""

    def __init__(self, adata: anndata.AnnData, name: str = "query", x_layer: str | None = None) -> None:
        self.name = name
        self._adata = adata
        self.obs = adata.obs
        mats: dict[str, Any] = {}
        if x_layer is not None:
            loc = requested_matrix(x_layer, [str(k) for k in adata.layers], adata.X is not None, adata.raw is not None,
                                   name)
            mats[loc] = adata.X if loc == "X" else adata.raw.X if loc == "raw/X" else adata.layers[loc[len("layers/"):]]
        else:
            mats["X"] = adata.X
            for layer in COUNTS_LAYERS:
                if layer in adata.layers:
                    mats[f"layers/{layer}"] = adata.layers[layer]
                    break
            if adata.raw is not None:
                mats["raw/X"] = adata.raw.X
        self._mats = {k: v for k, v in mats.items() if v is not None}
        if not self._mats:
            raise InputError(f"{name}: the AnnData has no expression matrix")
        for loc, m in self._mats.items():
            _check_in_memory(m, f"{name}: {loc}")
        samples = {
            loc: float32_csr(m[: SAMPLE_WINDOWS * SAMPLE_ROWS_PER_WINDOW], f"{name}: {loc}")
            for loc, m in self._mats.items()
        }
        self.expression = expression_from_samples(samples, name)
        self.var = adata.raw.var if self.expression.location == "raw/X" else adata.var
        self.genes = genes_from_var(self.var, name)

    @property
    def n_obs(self) -> int:
        return int(self._adata.n_obs)

    def obsm_keys(self) -> list[str]:
        return [k for k, v in self._adata.obsm.items() if getattr(v, "ndim", 0) == 2 and not isinstance(v, pd.DataFrame)]

    def read_obsm(self, key: str, rows: np.ndarray) -> np.ndarray:
        if key not in self.obsm_keys():
            raise InputError(f"{self.name}: no obsm[{key!r}]; available: {self.obsm_keys() or 'none'}")
        return to_float32(self._adata.obsm[key][np.asarray(rows)], f"{self.name}: obsm[{escaped(key)}]")

    def iter_rows(self, rows: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        m = self._mats[self.expression.location]
        for _a, _b, pos in _windows(np.asarray(rows, dtype=np.int64), chunk_size):
            block = float32_csr(m[pos], f"{self.name}: {self.expression.location}")
            yield pos, checked_block(block, pos, f"{self.name}: {self.expression.location}", self.expression)

    def close(self) -> None:
        pass


def _is_legacy(path: Path) -> bool:
    """Whether ``path`` is an AnnData file of the pre-0.7 layout; InputError for an HDF5 file that is no AnnData
    at all (:func:`check_anndata_hdf5`)."""
    try:
        with h5py.File(path, "r") as f:
            if "obs" not in f or "var" not in f:  # no AnnData (X alone may be missing: --x-layer, H5adSource)
                check_anndata_hdf5(f, str(path))
            legacy = "raw.X" in f or "encoding-type" not in f.attrs
            if legacy:  # read whole by anndata below, not by H5adSource (which checks): check here
                check_self_contained(f, str(path))
            return legacy
    except _READ_ERRORS:
        return False  # H5adSource reports the unreadable file


def open_h5ad(
    source: str | Path | anndata.AnnData, name: str | None = None, x_layer: str | None = None
) -> H5adSource | AnnDataSource:
    """Open a path to an ``.h5ad`` (chunked) or wrap an in-memory AnnData.

    ``x_layer``: read only this matrix: ``X``, ``raw`` (``adata.raw.X``) or a layer (``NAME`` or ``layers/NAME``);
    default: raw counts wherever they are (X, ``layers['counts']`` and the like, ``.raw``), else log-normalised
    values (:func:`atlas.sources.base.choose_expression`).

    Files written by anndata < 0.7 (no encoding attributes, ``raw.X``) cannot be read in chunks; they are loaded
    whole, with a warning (such files are small: they predate atlas-sized data).
    """
    if isinstance(source, anndata.AnnData):
        return AnnDataSource(source, name or "query", x_layer)
    path = Path(source)
    if path.is_file() and _is_legacy(path):
        logger.warning("%s: legacy (pre-0.7) AnnData layout: loading it whole instead of in chunks", path)
        try:
            with warnings.catch_warnings():  # anndata's notes on converting the old layout: said once above
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
                adata = anndata.read_h5ad(path)
        except Exception as exc:
            raise InputError(f"{path}: could not read legacy .h5ad ({type(exc).__name__}); write it again with a "
                             "current anndata (anndata.read_h5ad(path).write_h5ad(new_path))") from exc
        return AnnDataSource(adata, name or path.stem, x_layer)
    return H5adSource(path, name, x_layer)
