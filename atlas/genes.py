"""Gene identifiers: one vocabulary keyed by Ensembl id where known, symbol otherwise, and matching against it.

A *gene key* is a stable string per gene: the Ensembl gene id without version (``ENSG00000141510``) when one is
known, else the symbol (``TP53``). Matching an arbitrary list of identifiers (Ensembl ids, symbols, or a mix) to a
vocabulary tries Ensembl ids first, then symbols (case-sensitive, then case-insensitive for unique hits).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.errors import GeneOverlapError

logger = logging.getLogger(__name__)

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

MIN_GENE_OVERLAP = 0.5
"""Default: a query must carry at least this fraction of the genes an embedder reads, or it is refused (below half,
which genes are missing matters more than the method; figures in docs/benchmarks.md, "Figures behind the atlas
defaults")."""

WARN_GENE_OVERLAP = 0.8
"""Below this fraction of an embedder's genes, a query is accepted with a warning."""


def is_ensembl(value: str) -> bool:
    """Whether ``value`` looks like an Ensembl gene id (``ENSG...``, ``ENSMUSG...``, with or without version)."""
    return bool(_ENSEMBL_RE.match(str(value)))


def strip_version(ensembl_id: str) -> str:
    """An Ensembl id without its ``.version`` suffix; anything else unchanged."""
    return str(ensembl_id).split(".", 1)[0] if is_ensembl(ensembl_id) else str(ensembl_id)


def _clean(values: Sequence[object] | np.ndarray) -> np.ndarray:
    out = np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values], dtype=object)
    return out


@dataclass(frozen=True)
class GeneVocabulary:
    """An ordered list of genes: column ``i`` of a matrix in this space is gene ``keys[i]``.

    ``feature_id`` holds the Ensembl id (``""`` where unknown), ``feature_name`` the symbol (``""`` where unknown).
    """

    keys: np.ndarray
    feature_id: np.ndarray
    feature_name: np.ndarray
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)
    _fingerprint: list[str] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(self.feature_id) != n or len(self.feature_name) != n:
            raise ValueError("keys, feature_id and feature_name must have the same length")

    @classmethod
    def from_arrays(cls, feature_id: Sequence[object], feature_name: Sequence[object]) -> GeneVocabulary:
        """A vocabulary from parallel Ensembl ids (empty, None or a non-Ensembl value: unknown) and symbols."""
        fid = np.array([strip_version(v) if is_ensembl(v) else "" for v in _clean(feature_id)], dtype=object)
        fname = _clean(feature_name)
        keys = np.where(fid != "", fid, fname).astype(object)
        return cls(keys=keys, feature_id=fid, feature_name=fname)

    @classmethod
    def from_identifiers(cls, identifiers: Sequence[object]) -> GeneVocabulary:
        """A vocabulary from one list whose entries are Ensembl ids or symbols (e.g. ``var_names``)."""
        ids = _clean(identifiers)
        ens = np.array([is_ensembl(v) for v in ids])
        fid = np.where(ens, [strip_version(v) for v in ids], "").astype(object)
        fname = np.where(ens, "", ids).astype(object)
        return cls(keys=np.where(ens, fid, ids).astype(object), feature_id=fid, feature_name=fname)

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> str:
        """A digest of keys, Ensembl ids and symbols, in order (cached: the vocabulary is immutable)."""
        if self._fingerprint:
            return self._fingerprint[0]
        h = hashlib.sha256()
        for k, fid, name in zip(self.keys, self.feature_id, self.feature_name, strict=True):
            h.update(f"{k}\t{fid}\t{name}\0".encode())
        self._fingerprint.append(h.hexdigest()[:16])
        return self._fingerprint[0]

    def to_frame(self) -> pd.DataFrame:
        """The vocabulary as a table: ``gene_key``, ``feature_id``, ``feature_name``."""
        return pd.DataFrame({"gene_key": self.keys, "feature_id": self.feature_id, "feature_name": self.feature_name})

    def _index(self, what: str) -> dict[str, int]:
        if what not in self._lookup:
            values = {"id": self.feature_id, "name": self.feature_name, "lname": None}[what]
            table: dict[str, int] = {}
            if what == "lname":
                counts: dict[str, int] = {}
                for v in self.feature_name:
                    if v:
                        counts[v.lower()] = counts.get(v.lower(), 0) + 1
                for i, v in enumerate(self.feature_name):
                    if v and counts[v.lower()] == 1:
                        table[v.lower()] = i
            else:
                assert values is not None
                for i, v in enumerate(values):
                    if v and v not in table:
                        table[v] = i
            self._lookup[what] = table
        return self._lookup[what]

    def locate(self, identifiers: Sequence[object] | np.ndarray) -> np.ndarray:
        """Column of each identifier in this vocabulary (Ensembl id or symbol), -1 where unknown."""
        by_id, by_name, by_lname = self._index("id"), self._index("name"), self._index("lname")
        out = np.full(len(identifiers), -1, dtype=np.int64)
        for i, raw in enumerate(_clean(identifiers)):
            if not raw:
                continue
            if is_ensembl(raw):
                j = by_id.get(strip_version(raw), -1)
            else:
                j = by_name.get(raw, by_lname.get(raw.lower(), -1))
            out[i] = j
        return out

    def locate_vocabulary(self, other: GeneVocabulary) -> np.ndarray:
        """Column in this vocabulary of each gene of ``other``, matching Ensembl ids first, then symbols."""
        out = self.locate(other.feature_id)
        missing = out < 0
        if missing.any():
            out[missing] = self.locate(other.feature_name[missing])
        return out


@dataclass(frozen=True)
class GeneMatch:
    """How a source gene space maps onto a target gene space (e.g. a query's genes onto an embedder's)."""

    source_cols: np.ndarray  # columns of the source that are used
    target_cols: np.ndarray  # where they go in the target
    n_source: int
    n_target: int

    @property
    def n_matched(self) -> int:
        """Target genes the source has."""
        return len(np.unique(self.target_cols))

    @property
    def fraction_of_target(self) -> float:
        """Share of the target genes the source has (0 for an empty target)."""
        return self.n_matched / self.n_target if self.n_target else 0.0

    def target_present(self) -> np.ndarray:
        """``(n_target,)`` bool: the target genes the source has."""
        present = np.zeros(self.n_target, dtype=bool)
        present[self.target_cols] = True
        return present

    def summary(self) -> dict[str, float | int]:
        """Gene counts and the overlap, for reports."""
        return {
            "n_source_genes": self.n_source,
            "n_target_genes": self.n_target,
            "n_matched": self.n_matched,
            "fraction_of_target": round(self.fraction_of_target, 4),
        }

    def project(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """Re-index columns of a source matrix into the target space; target genes the source lacks are zero."""
        n_src = X.shape[1]
        P = sp.csr_matrix(
            (np.ones(len(self.source_cols), dtype=np.float32), (self.source_cols, self.target_cols)),
            shape=(n_src, self.n_target),
        )
        return sp.csr_matrix(X @ P, dtype=np.float32)


def match_genes(source: GeneVocabulary, target: GeneVocabulary, allowed: np.ndarray | None = None) -> GeneMatch:
    """Map each source gene onto the target vocabulary; a target gene is filled by the first source gene matching it.
    ``allowed``: bool per source gene, the ones that may fill a target gene (a dataset's measured genes); None: all."""
    pos = target.locate_vocabulary(source)
    if allowed is not None:
        pos = np.where(np.asarray(allowed, dtype=bool), pos, -1)
    src = np.flatnonzero(pos >= 0)
    tgt = pos[src]
    _, first = np.unique(tgt, return_index=True)
    keep = np.sort(first)
    return GeneMatch(source_cols=src[keep], target_cols=tgt[keep], n_source=len(source), n_target=len(target))


def identifier_hint(source: GeneVocabulary, target_keys: Sequence[object] | None, what: str = "query") -> str:
    """A sentence for a refusal when ``source`` names its genes one way (Ensembl ids) and the target (``target_keys``:
    the embedder's gene keys, Ensembl ids where the atlas had them, else symbols) the other; "" otherwise."""
    if target_keys is None or len(source) == 0 or len(target_keys) == 0:
        return ""
    source_ensembl = float(np.mean(source.feature_id != ""))
    source_symbols = float(np.mean(source.feature_name != ""))
    target_ensembl = float(np.mean([is_ensembl(str(k)) for k in target_keys]))
    if source_ensembl > 0.5 and source_symbols < 0.5 and target_ensembl < 0.5:
        return (f" The {what} names its genes by Ensembl id only, the index by symbol: add the symbols as a "
                "var['feature_name'] column (from the data's gene annotation) and annotate again.")
    if source_ensembl < 0.5 and target_ensembl > 0.5 and source_symbols > 0.5:
        return (f" The {what} names its genes by symbol only and the index by Ensembl id, with no symbol matching: "
                "add the Ensembl ids as a var['feature_id'] column.")
    return ""


def check_overlap(
    match: GeneMatch,
    *,
    what: str = "query",
    against: str = "embedder",
    min_fraction: float = MIN_GENE_OVERLAP,
    warn_fraction: float = WARN_GENE_OVERLAP,
    hint: str = "",
) -> None:
    """Log the overlap always; refuse below ``min_fraction`` (``hint``, e.g. :func:`identifier_hint`, ends the
    message); warn below ``warn_fraction``."""
    frac = match.fraction_of_target
    logger.info(
        "gene overlap: %d of the %s's %d genes found in the %s (%.1f%%)",
        match.n_matched,
        against,
        match.n_target,
        what,
        100 * frac,
    )
    if match.n_matched == 0:
        raise GeneOverlapError(
            f"none of the {against}'s {match.n_target} genes were found in the {what}'s {match.n_source} genes. "
            "Check that the gene identifiers are Ensembl ids or symbols of the same species (var_names, "
            "var['feature_id'] or var['feature_name'])." + hint
        )
    if frac < min_fraction:
        raise GeneOverlapError(
            f"only {match.n_matched} of the {against}'s {match.n_target} genes ({100 * frac:.1f}%) are in the "
            f"{what}; at least {100 * min_fraction:.0f}% are required. Provide the full gene set (not only highly "
            "variable genes), use Ensembl ids or symbols, or lower the threshold with --min-gene-overlap." + hint
        )
    if frac < warn_fraction:
        logger.warning(
            "only %.1f%% of the %s's genes are in the %s; the embedding is computed without the missing genes "
            "and results may degrade",
            100 * frac,
            against,
            what,
        )
