"""The source interface shared by h5ad files, in-memory AnnData and SOMA experiments."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk, obs_values
from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import GeneVocabulary, is_ensembl
from scatlas.atlas.normalize import TARGET_SUM
from scatlas.atlas.validate import check_values
from scatlas.atlas.xkind import LOGNORM_TOTAL_TOLERANCE, XKind, detect_lognorm_total, detect_x_kind

logger = logging.getLogger(__name__)

ENSEMBL_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id", "ensembl", "ensembl_gene_id", "gene_ids-0")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name", "gene_names", "Symbol", "name")
COUNTS_LAYERS = ("counts", "raw_counts", "count", "umi", "UMI")


@dataclass(frozen=True)
class ExpressionChoice:
    """Which matrix of a source is read, and what it holds."""

    location: str  # "X", "layers/<name>", "raw/X"
    x_kind: XKind
    candidates: dict[str, XKind]  # every matrix inspected and its kind
    lognorm_total: float | None = None  # log-normalised to this per-cell total (None: 10,000 or not told)
    lognorm_base: float = float(np.e)  # the logarithm's base (2 for log2(1 + x) values)

    def rescale_note(self) -> str | None:
        """What the values were and that they are rescaled as read; None when they are used as they are."""
        if self.lognorm_total is None:
            return None
        log = "log2(1 + x)" if self.lognorm_base == 2 else "log1p"
        return f"{log} of values normalised to {self.lognorm_total:,.6g} per cell, rescaled to log1p CP10k"

    def describe(self) -> str:
        """Where the values come from, their kind and what was inspected, for logs and reports."""
        seen = ", ".join(f"{k}={v}" for k, v in self.candidates.items())
        note = self.rescale_note()
        return f"{self.location} ({self.x_kind}{f', {note}' if note else ''}; inspected: {seen})"


def with_lognorm_total(choice: ExpressionChoice, sample: sp.csr_matrix) -> ExpressionChoice:
    """``choice`` with ``lognorm_total`` set when it reads log-normalised values normalised to a total other than
    10,000 (log1p CPM, scanpy's median total) or log2(1 + x) values of a known total: such values are rescaled to log1p(CP10k) as they are read
    (:func:`rescale_lognorm`), the scale the atlas and the embedders use."""
    if choice.x_kind != "lognorm":
        return choice
    total = detect_lognorm_total(sample)
    if total is not None:
        if abs(total / TARGET_SUM - 1.0) <= LOGNORM_TOTAL_TOLERANCE:
            return choice
        base = float(np.e)
    else:
        total, base = detect_lognorm_total(sample, base=2.0), 2.0
        if total is None:
            return choice
    logger.info("%s holds log%s(1 + x) of values normalised to %.6g per cell: rescaling to log1p CP10k",
                choice.location, "2" if base == 2 else "", total)
    return replace(choice, lognorm_total=total, lognorm_base=base)


def rescale_lognorm(block: sp.csr_matrix, choice: ExpressionChoice) -> sp.csr_matrix:
    """log1p(x * 10,000 / total) of a block read from ``choice``, x = base ** v - 1 (unchanged when no rescale is
    due)."""
    if choice.lognorm_total is None or block.nnz == 0:
        return block
    out = block.copy()
    data = np.expm1(out.data.astype(np.float64) * np.log(choice.lognorm_base)) * (TARGET_SUM / choice.lognorm_total)
    out.data = np.log1p(data).astype(out.data.dtype)
    return out


def expression_from_samples(samples: dict[str, sp.csr_matrix], what: str) -> ExpressionChoice:
    """The matrix a source reads, from a sample of rows of each candidate: its kind (:func:`choose_expression`)
    and, for log-normalised values, the per-cell total they were normalised to (:func:`with_lognorm_total`)."""
    # a matrix whose sample holds no value at all (an empty X beside counts in a layer) comes last
    ordered = sorted(samples, key=lambda loc: sp.csr_matrix(samples[loc]).nnz == 0)
    chosen = choose_expression({loc: detect_x_kind(samples[loc]) for loc in ordered}, what)
    return with_lognorm_total(chosen, samples[chosen.location])


def choose_expression(candidates: dict[str, XKind], what: str) -> ExpressionChoice:
    """Prefer raw counts wherever they are (X, layers['counts'], .raw); else log-normalised/normalised X, then .raw.

    Scaled values with nothing else are refused.
    """
    for loc, kind in candidates.items():
        if kind == "counts":
            return ExpressionChoice(loc, kind, candidates)
    for loc, kind in candidates.items():
        if kind in ("lognorm", "normalized"):
            return ExpressionChoice(loc, kind, candidates)
    raise InputError(
        f"{what}: no usable expression values: {', '.join(f'{k} holds {v} values' for k, v in candidates.items())}. "
        "Scaled (centred) data cannot be embedded or stored; provide raw counts in X, layers['counts'] or .raw, "
        "or log-normalised values."
    )


def _ensembl_fraction(values: pd.Index | pd.Series) -> float:
    vals = [str(v) for v in values[: min(len(values), 2000)]]
    return float(np.mean([is_ensembl(v) for v in vals])) if vals else 0.0


def genes_from_var(var: pd.DataFrame, what: str) -> GeneVocabulary:
    """Find Ensembl ids and symbols among ``var``'s index and columns (Census: feature_id / feature_name)."""
    if len(var) == 0:
        raise InputError(f"{what}: the dataset has no genes (var is empty)")
    candidates: list[tuple[str, pd.Index | pd.Series]] = [("var_names", var.index)]
    candidates += [(c, var[c]) for c in var.columns if var[c].dtype == object or isinstance(var[c].dtype, pd.CategoricalDtype)]
    ens = next(
        (vals for name, vals in candidates if (name in ENSEMBL_COLUMNS or name == "var_names") and _ensembl_fraction(vals) >= 0.5),
        None,
    )
    sym = next(
        (
            vals
            for name, vals in sorted(candidates, key=lambda c: (c[0] not in SYMBOL_COLUMNS, c[0] != "var_names"))
            if (name in SYMBOL_COLUMNS or name == "var_names") and _ensembl_fraction(vals) < 0.5
        ),
        None,
    )
    n = len(var)
    fid = list(np.asarray(ens, dtype=object)) if ens is not None else [""] * n
    fname = list(np.asarray(sym, dtype=object)) if sym is not None else [""] * n
    vocab = GeneVocabulary.from_arrays(fid, fname)
    if not any(vocab.keys):
        raise InputError(f"{what}: found no gene identifiers in var_names or var columns")
    return vocab


class DatasetSource(Protocol):
    """One dataset to ingest or query: metadata in memory, expression values streamed in row chunks."""

    name: str
    obs: pd.DataFrame  # one row per cell, index = cell names
    genes: GeneVocabulary  # columns of the expression matrix
    expression: ExpressionChoice

    @property
    def n_obs(self) -> int:
        """Cells (rows) of the dataset."""
        ...

    def obsm_keys(self) -> list[str]:
        """Keys of the per-cell matrices (``obsm``) the dataset has."""
        ...

    def iter_rows(self, rows: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield (row positions, CSR float32 block) for the given sorted row positions, in order."""
        ...

    def read_obsm(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted positions) of ``obsm[key]``."""
        ...

    def close(self) -> None:
        """Release open files."""
        ...


def checked_block(block: sp.csr_matrix, rows: np.ndarray, what: str, choice: ExpressionChoice) -> sp.csr_matrix:
    """What every source yields for a block of rows it read: refused when a value breaks the source's kind
    (:func:`atlas.validate.check_values`: non-finite, negative, fractional counts, absurd), rescaled to
    log1p(CP10k) where the source's values are on another scale (:func:`rescale_lognorm`)."""
    return rescale_lognorm(check_values(block, rows, choice.x_kind, what), choice)


def iter_cell_chunks(
    source: DatasetSource, chunk_size: int = 10_000, rows: Sequence[int] | np.ndarray | None = None,
    obsm_keys: Sequence[str] = (), obs_columns: Sequence[str] = (),
) -> Iterator[CellChunk]:
    """Stream a source as CellChunks whose ids are row positions in the source and whose dataset id is the
    source's name. ``obsm_keys``: the stored embeddings to read; ``obs_columns``: the obs columns to read into
    :attr:`CellChunk.obs` (:func:`atlas.chunks.obs_values`); InputError for a column the source lacks (callers
    leave out the ones a query may lack)."""
    positions = np.arange(source.n_obs, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    columns = list(dict.fromkeys(str(c) for c in obs_columns))
    missing = [c for c in columns if c not in source.obs.columns]
    if missing:
        raise InputError(f"{source.name}: no obs column {missing[0]!r}")
    for pos, X in source.iter_rows(positions, chunk_size):
        obsm = {k: source.read_obsm(k, pos) for k in obsm_keys}
        obs = {c: obs_values(source.obs[c].iloc[pos]) for c in columns}
        yield CellChunk(ids=pos, X=X, x_kind=source.expression.x_kind, genes=source.genes, obsm=obsm,
                        dataset_id=source.name, obs=obs)
