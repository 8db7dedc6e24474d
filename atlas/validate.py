"""Checks of untrusted input: expression values against their kind, CSR structure, names taken from data.

Every row that is read is checked, not a sample: a value that breaks the kind the source was classified as (a
negative or fractional count, a log value of 1e30) is an error naming the row, raised before anything is stored.
Names that come from files (obs columns, dataset ids) are checked before they reach SQL or a path; messages show
them escaped with :func:`escaped`, never raw.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.xkind import LOG_SCALE_MAX, XKind

MAX_VALUE = 1e9
"""No count or normalised value of one gene in one cell comes near this; larger ones are corrupt input."""

INTEGER_TOLERANCE = 1e-6
"""How far from an integer a stored count may be (float32 counts are exact integers)."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest value the store's float32 matrices hold (about 3.4e38)."""

MAX_NAME_LENGTH = 256
"""Longest name (obs column, dataset id) taken from data."""


def escaped(name: object, limit: int = 80) -> str:
    """``name`` as a printable, quoted, length-capped string for messages (control characters escaped)."""
    text = str(name)
    short = text if len(text) <= limit else text[:limit] + "..."
    return ascii(short) if not short.isprintable() else repr(short)


def escaped_list(names: Iterable[object], limit: int = 30) -> str:
    """``names`` for a message: each :func:`escaped`, comma-separated, at most ``limit`` of them, then how many
    more."""
    items = list(names)
    text = ", ".join(escaped(n, 60) for n in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def beside(columns: Iterable[str], taken: Iterable[str], prefix: str = "atlas_") -> dict[str, str]:
    """Output names for ``columns`` (the atlas cell table's) written beside a command's own ``taken`` columns: each
    keeps its name unless it equals one of them, or another output name, ignoring case (tables and SQL tell names
    apart without case), in which case ``prefix`` is put before it until it is free."""
    used = {str(t).casefold() for t in taken}
    out: dict[str, str] = {}
    for column in columns:
        name = str(column)
        while name.casefold() in used:
            name = prefix + name
        used.add(name.casefold())
        out[str(column)] = name
    return out


def check_name(name: object, what: str) -> str:
    """``name`` as a string when it is usable as a column or dataset name; InputError otherwise.

    Refused: empty or blank names, control characters, more than :data:`MAX_NAME_LENGTH` characters.
    """
    text = str(name)
    if not text.strip():
        raise InputError(f"{what}: an empty name {escaped(text)}; rename it (e.g. adata.obs.rename(columns=...))")
    if len(text) > MAX_NAME_LENGTH:
        raise InputError(
            f"{what}: the name {escaped(text)} is {len(text)} characters long (at most {MAX_NAME_LENGTH}); shorten it"
        )
    if not text.isprintable():
        raise InputError(f"{what}: the name {escaped(text)} holds control characters; rename it")
    return text


def _rows_where(block: sp.csr_matrix, bad: np.ndarray) -> np.ndarray:
    """Row numbers (within ``block``) of the stored values flagged in ``bad``."""
    return np.unique(np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[bad])


def _refuse(block: sp.csr_matrix, bad: np.ndarray, rows: np.ndarray, what: str, problem: str, fix: str) -> None:
    cells = np.asarray(rows)[_rows_where(block, bad)]
    raise InputError(
        f"{what}: {problem} in {len(cells)} cell(s), first at row {int(cells[0])} (rows {cells[:5].tolist()}); {fix}"
    )


def check_values(block: sp.csr_matrix, rows: np.ndarray, kind: XKind, what: str) -> sp.csr_matrix:
    """``block`` unchanged when every stored value fits ``kind``; InputError naming the rows otherwise.

    ``rows``: the source row of each row of ``block`` (for the message). Every kind needs finite values; counts
    are non-negative integers, normalised values non-negative, log-normalised values non-negative and at most
    :data:`atlas.xkind.LOG_SCALE_MAX`; counts and normalised values above :data:`MAX_VALUE` are refused.
    """
    data = block.data
    if data.size == 0:
        return block
    finite = np.isfinite(data)
    if not finite.all():
        _refuse(block, ~finite, rows, what, "NaN or infinite values", "fix or drop those cells and retry")
    if kind == "scaled":
        return block
    negative = data < 0
    if negative.any():
        _refuse(block, negative, rows, what, f"negative values in a matrix read as {kind}",
                "the file mixes kinds of values; provide raw counts or log-normalised values for every cell")
    if kind == "counts":
        fractional = np.abs(data - np.round(data)) > INTEGER_TOLERANCE
        if fractional.any():
            _refuse(block, fractional, rows, what, "non-integer values in a matrix of counts (told from its first rows)",
                    "the file mixes counts with normalised values; provide one kind for every cell")
    ceiling = LOG_SCALE_MAX if kind == "lognorm" else MAX_VALUE
    huge = data > ceiling
    if huge.any():
        _refuse(block, huge, rows, what, f"values above {ceiling:g} in a matrix read as {kind}",
                "they are not expression values; fix or drop those cells")
    return block


def to_float32(values: object, what: str) -> np.ndarray:
    """``values`` (an array of any number type) as float32, how every matrix is read and stored; InputError when a
    finite value lies beyond float32's range (cast, it would turn infinite, and be reported as such)."""
    array = np.asarray(values)
    if array.dtype == np.float32:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.dtype.itemsize > 4 and array.size:
        with np.errstate(invalid="ignore"):
            too_large = np.isfinite(array) & (np.abs(array) > FLOAT32_MAX)
        if too_large.any():
            raise InputError(
                f"{what}: {int(too_large.sum())} value(s) too large for float32 storage (above {FLOAT32_MAX:.1e}); "
                "they are not expression values: check that the matrix holds counts or normalised values (choose "
                "another with --x-layer), or fix or drop those cells"
            )
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


def float32_csr(matrix: object, what: str) -> sp.csr_matrix:
    """``matrix`` (dense or sparse) as a float32 CSR matrix, values checked by :func:`to_float32`."""
    if not sp.issparse(matrix) and np.asarray(matrix).dtype == np.float16:  # scipy.sparse has no float16
        matrix = np.asarray(matrix, dtype=np.float32)
    block = sp.csr_matrix(matrix)
    if block.dtype == np.float32:
        return block
    return sp.csr_matrix((to_float32(block.data, what), block.indices, block.indptr), shape=block.shape)


def check_csr(indptr: np.ndarray, indices: np.ndarray, n_data: int, n_cols: int, what: str) -> None:
    """InputError unless ``indptr`` / ``indices`` describe a valid CSR block of ``n_data`` values, ``n_cols`` wide.

    ``indptr`` is the block's slice of the file's pointer array (not yet rebased); ``indices`` the column indices
    it points to.
    """
    if len(indptr) == 0:
        return
    steps = np.diff(indptr)
    if indptr[0] < 0 or (steps < 0).any():
        first = int(np.flatnonzero(steps < 0)[0]) if (steps < 0).any() else 0
        raise InputError(f"{what}: the sparse matrix is damaged: its row pointers decrease at row {first}; "
                         "rewrite the file (e.g. adata.write_h5ad)")
    if indptr[-1] > n_data:
        raise InputError(f"{what}: the sparse matrix is damaged: row pointers point past its {n_data} values; "
                         "rewrite the file")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
        raise InputError(f"{what}: the sparse matrix is damaged: a column index lies outside its {n_cols} columns; "
                         "rewrite the file")


def check_embedding(values: np.ndarray, rows: np.ndarray, what: str) -> np.ndarray:
    """``values`` unchanged when finite; InputError naming the first bad row otherwise (precomputed embeddings)."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise InputError(f"{what}: NaN or infinite values in {len(bad)} cell(s), first at row "
                         f"{int(np.asarray(rows)[bad[0]])}; fix or drop those cells")
    return values
