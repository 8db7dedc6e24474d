"""The default embedder: highly variable genes -> scale -> PCA, fitted on a streamed sample of the atlas.

``fit`` makes two passes over the sample and never densifies it whole:

1. per dataset and gene, sums and sums of squares of the log-normalised values (and of ``expm1`` of them, for the
   dispersion). Each dataset ranks its genes by normalised dispersion (Seurat flavour: ``var/mean`` of the
   normalised values, z-scored within 20 bins of mean expression); genes are chosen by their rank averaged over
   datasets (each dataset counts once, so one big dataset cannot dominate; a dataset that does not measure a gene
   ranks it last). Genes with zero variance in the sample
   are never chosen, nor genes measured by fewer datasets than ``gene_coverage`` asks.
2. the covariance (float64, ``n_hvg x n_hvg``) of the selected genes after scaling (centre by the sample mean,
   divide as ``scale`` says, clip to ``[-max_value, max_value]``), then an exact eigendecomposition.

``scale`` (part of the params, hence of the fingerprint):

* ``"zscore"`` (default): unit variance (Seurat/scanpy ``scale``). What embedders saved before the option
  existed did, and what they still do when loaded (their ``embedder.json`` has no ``scale`` key).
* ``"floor"``: divide each gene by ``max(sd, median sd of the selected genes)``. Genes that vary more than the
  median selected gene get the same spread as with ``"zscore"``, but a gene that varies little is not blown up to
  unit variance (a lowly expressed gene that is mostly sampling noise, or one that only a batch switches on).
  Not the default: the genes it damps include the markers of rare populations, which only a few cells express.
* ``"none"``: centre only (PCA of log1p(CP10k), as scanpy's default): the few genes with the largest log-scale
  spread dominate the principal axes.

The measurements behind the default are in docs/benchmarks.md ("Figures behind the atlas defaults").

``gene_coverage`` (part of the params): a gene is a candidate only when the datasets that measure it (have it
among their genes; an atlas store records them at ingest, :attr:`CellChunk.measured`) make up at least this share of
the sample's datasets. A gene a dataset lacks is imputed with the atlas mean for its cells (never read as zero
expression), and that dataset ranks it last. The default 0 takes every gene; 1 keeps the genes every dataset
measures, so that every dataset's cells are placed on the same genes (fewer than ``n_hvg`` when they share fewer,
with a warning). Embedders saved before the option keep their fingerprints (their fit ranked every gene of a chunk's
gene space, measured or not).

``transform`` matches a chunk's genes to the selected genes (Ensembl id first, then symbol), normalises the chunk
with :func:`atlas.normalize.to_lognorm` (library size over *all* of the chunk's genes), scales, centres and
projects. Selected genes a chunk lacks contribute zero (i.e. they are imputed with the atlas mean). Every step is
row-wise, so a cell's vector does not depend on its chunk mates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.base import NPZ_LOAD_ERRORS, Embedder
from scatlas.atlas.errors import InputError, StoreError
from scatlas.atlas.genes import GeneMatch, GeneVocabulary, match_genes
from scatlas.atlas.normalize import to_lognorm

logger = logging.getLogger(__name__)

ARTEFACT_FILE = "pca.npz"

SampleSource = Iterable[CellChunk] | Callable[[], Iterable[CellChunk]]
"""A sample for :meth:`PCAEmbedder.fit`: a re-iterable (a list, or an object whose ``__iter__`` returns a fresh
iterator each time) or a zero-argument callable returning a fresh iterable. A one-shot iterator (a generator) is
refused, because fitting needs two passes."""

_N_BINS = 20
_BLOCK_ROWS = 4096  # rows densified at a time
_MAX_MATCH_CACHE = 64
_REL_VAR_EPS = 1e-9  # variance below this fraction of the mean square is rounding noise: the gene is constant

Scale = Literal["floor", "zscore", "none"]
SCALES: tuple[str, ...] = get_args(Scale)
DEFAULT_SCALE: Scale = "zscore"
LEGACY_SCALE: Scale = "zscore"
"""What embedders saved before ``scale`` existed did (their ``embedder.json`` has no ``scale`` key)."""
DEFAULT_GENE_COVERAGE = 0.0
LEGACY_GENE_COVERAGE = 0.0
"""What embedders saved before ``gene_coverage`` existed did (every gene a candidate)."""
FEW_MEASURED = 0.5
"""A dataset that measures fewer than this share of the selected genes is warned about at the fit."""
LOST_GENES_WARN = 0.1
"""Share of the ``n_hvg`` most variable genes that ``gene_coverage`` leaves out above which the fit warns."""
LEGACY_PARAMS: dict[str, Any] = {"scale": LEGACY_SCALE, "gene_coverage": LEGACY_GENE_COVERAGE}
"""Params an older ``embedder.json`` lacks, with the value they had then; left out of the fingerprint at that value,
so that indexes built before keep their fingerprint."""


@dataclass(frozen=True)
class PCAParams:
    """The parameters of a PCA embedder (part of its fingerprint).

    ``n_hvg``: highly variable genes selected; ``n_components``: output dimension (at most ``n_hvg``);
    ``max_value``: scaled values are clipped to ``[-max_value, max_value]``; ``seed``: recorded only (the fit
    draws nothing); ``scale``: how genes are scaled before the PCA; ``gene_coverage``: the share of the sample's
    datasets that must measure a gene for it to be selected (see the module docstring for both).
    """

    n_hvg: int = 2000
    n_components: int = 50
    max_value: float = 10.0
    seed: int = 0
    scale: Scale = DEFAULT_SCALE
    gene_coverage: float = DEFAULT_GENE_COVERAGE

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise InputError(f"scale must be one of {', '.join(SCALES)} (got {self.scale!r})")
        if not 0.0 <= self.gene_coverage <= 1.0:
            raise InputError(f"gene_coverage must be between 0 and 1 (got {self.gene_coverage})")
        if int(self.n_hvg) < 1 or int(self.n_components) < 1:
            raise InputError(f"n_hvg and n_components must be positive (got {self.n_hvg}, {self.n_components})")
        if self.n_components > self.n_hvg:
            raise InputError(
                f"n_components ({self.n_components}) cannot exceed n_hvg ({self.n_hvg}): lower n_components or "
                "raise n_hvg"
            )
        if not self.max_value > 0:
            raise InputError(f"max_value must be positive (got {self.max_value})")


@dataclass(frozen=True)
class PCAModel:
    """The fitted artefact: the selected genes, their means and spreads, and the principal axes."""

    genes: GeneVocabulary  # the selected (highly variable) genes, in the column order of ``components``
    means: np.ndarray  # (n_genes,) float64, sample mean of log-normalised values
    stds: np.ndarray  # (n_genes,) float64, sample standard deviation (ddof=1)
    center: np.ndarray  # (n_genes,) float64, mean of the scaled, clipped values (the PCA centre)
    components: np.ndarray  # (n_components, n_genes) float32, rows are unit principal axes
    explained_variance: np.ndarray  # (n_components,) float64
    explained_variance_ratio: np.ndarray  # (n_components,) float64
    n_cells: int  # cells of the sample used for the fit

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "gene_key": self.genes.keys.astype(str),
            "feature_id": self.genes.feature_id.astype(str),
            "feature_name": self.genes.feature_name.astype(str),
            "means": self.means,
            "stds": self.stds,
            "center": self.center,
            "components": self.components,
            "explained_variance": self.explained_variance,
            "explained_variance_ratio": self.explained_variance_ratio,
            "n_cells": np.array(self.n_cells, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> PCAModel:
        genes = GeneVocabulary(
            keys=a["gene_key"].astype(object),
            feature_id=a["feature_id"].astype(object),
            feature_name=a["feature_name"].astype(object),
        )
        return cls(
            genes=genes,
            means=a["means"].astype(np.float64),
            stds=a["stds"].astype(np.float64),
            center=a["center"].astype(np.float64),
            components=a["components"].astype(np.float32),
            explained_variance=a["explained_variance"].astype(np.float64),
            explained_variance_ratio=a["explained_variance_ratio"].astype(np.float64),
            n_cells=int(a["n_cells"]),
        )

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, arr in sorted(self.arrays().items()):
            h.update(name.encode())
            if arr.dtype.kind == "U":
                h.update("\0".join(arr.tolist()).encode())
            else:
                arr = np.ascontiguousarray(arr)
                h.update(f"{arr.dtype.str}{arr.shape}".encode())
                h.update(arr.tobytes())
        return h.hexdigest()


def sample_pass(sample: SampleSource, passes: int = 1) -> Iterator[CellChunk]:
    """A fresh iterator over ``sample`` (see :data:`SampleSource`); ``passes > 1`` refuses one-shot iterators."""
    if callable(sample) and not isinstance(sample, Iterable):
        return iter(sample())
    if not isinstance(sample, Iterable):
        raise InputError(f"the sample must be an iterable of CellChunk or a callable returning one (got {sample!r})")
    if passes > 1 and isinstance(sample, Iterator):
        raise InputError(
            "fitting needs two passes over the sample but got a one-shot iterator (e.g. a generator): pass a "
            "list of chunks, a re-iterable object, or a zero-argument callable returning a fresh iterator"
        )
    return iter(sample)


def _lognorm_X(chunk: CellChunk) -> sp.csr_matrix:
    if chunk.X is None:
        raise InputError(
            "the PCA embedder needs expression values but the chunk has none (X is None): read chunks with X"
        )
    if chunk.X.shape[0] != len(chunk) or chunk.X.shape[1] != len(chunk.genes):
        raise InputError(
            f"chunk X has shape {chunk.X.shape} but the chunk has {len(chunk)} cells and {len(chunk.genes)} genes"
        )
    X = sp.csr_matrix(chunk.X)
    if not X.has_canonical_format:  # duplicate entries would be normalised one by one
        X = X.copy()
        X.sum_duplicates()
    return to_lognorm(X, chunk.x_kind)


def match_key(genes: GeneVocabulary, measured: np.ndarray | None) -> str:
    """A cache key for matching ``genes`` of which only ``measured`` (bool per gene; None: all) fill a gene."""
    if measured is None:
        return genes.fingerprint()
    return genes.fingerprint() + hashlib.sha1(np.packbits(np.asarray(measured, dtype=bool)).tobytes()).hexdigest()


class _GeneUnion:
    """The union of the gene spaces seen during the fit (chunks may come from differently-keyed datasets)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.feature_id: list[str] = []
        self.feature_name: list[str] = []
        self._vocab: GeneVocabulary | None = None
        self._maps: dict[str, GeneMatch] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def vocabulary(self) -> GeneVocabulary:
        if self._vocab is None:
            self._vocab = GeneVocabulary(
                keys=np.array(self.keys, dtype=object),
                feature_id=np.array(self.feature_id, dtype=object),
                feature_name=np.array(self.feature_name, dtype=object),
            )
        return self._vocab

    def match(self, genes: GeneVocabulary, measured: np.ndarray | None = None) -> GeneMatch:
        """Map ``genes`` (of which ``measured`` fill union genes: :func:`match_key`) into the union, first adding the
        genes the union does not know yet."""
        fp = match_key(genes, measured)
        if fp in self._maps:
            return self._maps[fp]
        pos = self.vocabulary().locate_vocabulary(genes) if self.keys else np.full(len(genes), -1)
        new = np.flatnonzero(pos < 0)
        if len(new):
            _, first = np.unique(genes.keys[new].astype(str), return_index=True)
            new = new[np.sort(first)]
            self.keys.extend(str(k) for k in genes.keys[new])
            self.feature_id.extend(str(k) for k in genes.feature_id[new])
            self.feature_name.extend(str(k) for k in genes.feature_name[new])
            self._vocab = None
        match = match_genes(genes, self.vocabulary(), allowed=measured)
        # positions stay valid when the union grows later (genes are only appended); n_target is not used
        self._maps[fp] = match
        return match


class _DatasetStats:
    """Per-gene sums over one dataset's cells (log-normalised values and their expm1)."""

    def __init__(self, n_genes: int) -> None:
        self.n = 0
        self.present = np.zeros(n_genes, dtype=bool)
        self.s = np.zeros(n_genes)
        self.ss = np.zeros(n_genes)
        self.se = np.zeros(n_genes)
        self.sse = np.zeros(n_genes)

    def grow(self, n_genes: int) -> None:
        extra = n_genes - len(self.s)
        if extra > 0:
            self.present = np.concatenate([self.present, np.zeros(extra, dtype=bool)])
            for name in ("s", "ss", "se", "sse"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))

    def add(self, L: sp.csr_matrix, match: GeneMatch) -> None:
        """Add a chunk of log-normalised values (in the chunk's own gene space)."""
        n_cols = L.shape[1]
        idx = L.indices
        x = L.data.astype(np.float64)
        e = np.expm1(x)
        src, tgt = match.source_cols, match.target_cols
        self.n += L.shape[0]
        self.present[tgt] = True
        self.s[tgt] += np.bincount(idx, weights=x, minlength=n_cols)[src]
        self.ss[tgt] += np.bincount(idx, weights=x * x, minlength=n_cols)[src]
        self.se[tgt] += np.bincount(idx, weights=e, minlength=n_cols)[src]
        self.sse[tgt] += np.bincount(idx, weights=e * e, minlength=n_cols)[src]


def _say_unmeasured(chosen: np.ndarray, stats: list[_DatasetStats]) -> None:
    """Log how many of the selected genes the datasets lack: a warning when a dataset measures under
    :data:`FEW_MEASURED` of them (its cells are placed from those it has, the rest imputed with the atlas mean)."""
    have = np.array([int(st.present[chosen].sum()) for st in stats])
    if not len(have) or have.min() == len(chosen):
        return
    few = int((have < FEW_MEASURED * len(chosen)).sum())
    (logger.warning if few else logger.info)(
        "%d of the %d datasets measure fewer than %d%% of the %d selected genes (the fewest: %d): their cells are "
        "placed from the genes they have, the others taken at the atlas mean; `scatlas datasets` lists each "
        "dataset's genes, `--embedder-option gene_coverage=1` selects only genes every dataset measures",
        few, len(have), round(100 * FEW_MEASURED), len(chosen), int(have.min()),
    )


def _fraction(value: Any, name: str) -> float:
    """``value`` as a float (from a CLI string too); InputError when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number between 0 and 1") from None


def _variance(s: np.ndarray, ss: np.ndarray, n: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from sums; variance that is rounding noise (a constant gene) is set to 0."""
    n_arr = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_arr > 0, s / np.maximum(n_arr, 1), 0.0)
        var = np.where(n_arr > 1, (ss - n_arr * mean**2) / np.maximum(n_arr - 1, 1), 0.0)
        meansq = np.where(n_arr > 0, ss / np.maximum(n_arr, 1), 0.0)
    var = np.where(var > _REL_VAR_EPS * meansq, var, 0.0)
    return mean, var


def _normalized_dispersion(st: _DatasetStats) -> np.ndarray:
    """Seurat-flavour normalised dispersion of each gene in one dataset; NaN where undefined or absent."""
    mean, var = _variance(st.se, st.sse, st.n)
    out = np.full(len(mean), np.nan)
    ok = st.present & (mean > 0) & (var > 0)
    if ok.sum() == 0:
        return out
    log_disp = np.log(var[ok] / mean[ok])
    log_mean = np.log1p(mean[ok])
    edges = np.linspace(log_mean.min(), log_mean.max(), _N_BINS + 1)
    bins = np.clip(np.searchsorted(edges, log_mean, side="right") - 1, 0, _N_BINS - 1)
    z = np.zeros(len(log_disp))
    for b in np.unique(bins):
        members = bins == b
        vals = log_disp[members]
        sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
        # a bin with a single gene (or no spread) gives no reference: score its genes as average (z = 0)
        z[members] = (vals - vals.mean()) / sd if sd > 0 else 0.0
    out[np.flatnonzero(ok)] = z
    return out


class PCAEmbedder(Embedder):
    """Highly variable genes + scaling (``scale``) + PCA. ``fit`` takes a :data:`SampleSource` (two passes)."""

    name = "pca"
    needs = "X"

    def __init__(
        self,
        n_hvg: int = 2000,
        n_components: int = 50,
        max_value: float = 10.0,
        seed: int = 0,
        scale: Scale = DEFAULT_SCALE,
        gene_coverage: float = DEFAULT_GENE_COVERAGE,
    ) -> None:
        self.config = PCAParams(
            n_hvg=int(n_hvg),
            n_components=int(n_components),
            max_value=float(max_value),
            seed=int(seed),
            scale=scale,
            gene_coverage=_fraction(gene_coverage, "gene_coverage"),
        )
        self.model: PCAModel | None = None
        self._matches: dict[str, GeneMatch] = {}
        self._digest: str | None = None

    # -- interface ------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.n_components

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    @property
    def requires_fit(self) -> bool:
        return True

    @property
    def genes(self) -> GeneVocabulary:
        """The genes this embedder reads (the selected highly variable genes)."""
        return self._fitted().genes

    def params(self) -> dict[str, Any]:
        return asdict(self.config)

    def fingerprint(self) -> str:
        """As :meth:`Embedder.fingerprint`, except that params at their :data:`LEGACY_PARAMS` value (what every
        embedder saved before the option existed did) are left out of the hashed params: indexes built before keep
        their fingerprint."""
        params = {k: v for k, v in self.params().items() if k not in LEGACY_PARAMS or v != LEGACY_PARAMS[k]}
        payload = json.dumps({"name": self.name, "params": params}, sort_keys=True, default=str)
        return hashlib.sha256((payload + self.artefact_digest()).encode()).hexdigest()[:16]

    def artefact_digest(self) -> str:
        if self.model is None:
            return ""
        if self._digest is None:
            self._digest = self.model.digest()
        return self._digest

    def gene_match(self, genes: GeneVocabulary) -> GeneMatch:
        model = self._fitted()
        fp = genes.fingerprint()
        match = self._matches.get(fp)
        if match is None:
            match = match_genes(genes, model.genes)
            if len(self._matches) >= _MAX_MATCH_CACHE:
                self._matches.clear()
            self._matches[fp] = match
        return match

    def chunk_match(self, chunk: CellChunk) -> GeneMatch:
        """How the genes the chunk's dataset measured map onto this embedder's (:meth:`gene_match` of its genes, with
        only those :attr:`CellChunk.measured` marks filling a gene: where two store genes match one of the embedder's,
        the one the dataset measured)."""
        if chunk.measured is None:
            return self.gene_match(chunk.genes)
        key = match_key(chunk.genes, chunk.measured)
        match = self._matches.get(key)
        if match is None:
            match = match_genes(chunk.genes, self._fitted().genes, allowed=chunk.measured)
            if len(self._matches) >= _MAX_MATCH_CACHE:
                self._matches.clear()
            self._matches[key] = match
        return match

    def transform(self, chunk: CellChunk) -> np.ndarray:
        model = self._fitted()
        out = np.empty((len(chunk), self.dim), dtype=np.float32)
        if len(chunk) == 0:
            return out
        match = self.chunk_match(chunk)
        missing = ~match.target_present()
        W = model.components.astype(np.float64)
        for start, z in self._standardised_blocks(chunk, match):
            z -= model.center
            z[:, missing] = 0.0
            out[start : start + len(z)] = z @ W.T
        return out

    @property
    def gene_feature_names(self) -> list[str] | None:
        return [str(k) for k in self._fitted().genes.keys]

    def gene_features(self, chunk: CellChunk) -> np.ndarray:
        """log1p(CP10k) of the embedder's genes (unscaled, as a logistic regression on HVGs reads them); a gene
        the chunk lacks takes its atlas mean, as in :meth:`transform`, so a partial gene overlap does not read as
        zero expression."""
        model = self._fitted()
        if len(chunk) == 0:
            return np.zeros((0, len(model.means)), dtype=np.float32)
        match = self.chunk_match(chunk)
        out = np.asarray(match.project(_lognorm_X(chunk)).toarray(), dtype=np.float32)
        missing = ~match.target_present()
        if missing.any():
            out[:, missing] = model.means[missing].astype(np.float32)
        return out

    def transform_with_features(self, chunk: CellChunk) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's vectors computed from its gene features: one normalisation of the chunk for both."""
        features = self.gene_features(chunk)
        return self.transform_gene_features(features, self.chunk_match(chunk).target_present()), features

    def transform_gene_features(self, features: np.ndarray, present: np.ndarray) -> np.ndarray:
        """:meth:`transform` of cells given by their gene features (log1p CP10k of the embedder's genes), with the
        genes outside ``present`` treated as :meth:`transform` treats genes a query lacks (zero after centring).
        With every gene present it equals :meth:`transform` of the same cells."""
        model = self._fitted()
        present = np.asarray(present, dtype=bool)
        if present.shape != (len(model.means),):
            raise InputError(f"present must mark each of the embedder's {len(model.means)} genes (got {present.shape})")
        features = np.asarray(features)
        out = np.empty((len(features), self.dim), dtype=np.float32)
        W = model.components.astype(np.float64)
        divisor = self._divisor(model)
        mv = self.config.max_value
        for start in range(0, len(features), _BLOCK_ROWS):
            z = features[start : start + _BLOCK_ROWS].astype(np.float64) - model.means
            if divisor is not None:
                z /= divisor
            np.clip(z, -mv, mv, out=z)
            z -= model.center
            z[:, ~present] = 0.0
            out[start : start + len(z)] = z @ W.T
        return out

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(self, sample: SampleSource) -> None:
        """Fit on a sample of atlas chunks, stratified by dataset (see :data:`SampleSource` for what is accepted)."""
        cfg = self.config
        union = _GeneUnion()
        stats: dict[str, _DatasetStats] = {}
        n_cells = 0
        for chunk in sample_pass(sample, passes=2):
            if len(chunk) == 0:
                continue
            L = _lognorm_X(chunk)
            match = union.match(chunk.genes, chunk.measured)
            for st in stats.values():
                st.grow(len(union))
            key = str(chunk.dataset_id)
            st = stats.setdefault(key, _DatasetStats(len(union)))
            st.add(L, match)
            n_cells += len(chunk)
        if n_cells == 0:
            raise InputError("cannot fit the PCA embedder on an empty sample: the atlas (or the sample) has no cells")
        if n_cells < max(cfg.n_components, 2):
            raise InputError(
                f"the sample has {n_cells} cells, fewer than the {cfg.n_components} principal components asked "
                "for: ingest more cells or lower n_components"
            )
        selected, means, stds = self._select_genes(union, stats)
        vocab = union.vocabulary()
        hvg = GeneVocabulary(
            keys=vocab.keys[selected], feature_id=vocab.feature_id[selected], feature_name=vocab.feature_name[selected]
        )
        logger.info(
            "PCA fit: %d cells from %d dataset(s), %d genes seen, %d highly variable genes selected",
            n_cells,
            len(stats),
            len(union),
            len(selected),
        )
        # second pass: covariance of the scaled, clipped selected genes
        k = len(selected)
        gram = np.zeros((k, k))
        zsum = np.zeros(k)
        n2 = 0
        probe = PCAEmbedder(**self.params())
        probe.model = PCAModel(
            genes=hvg,
            means=means,
            stds=stds,
            center=np.zeros(k),
            components=np.zeros((0, k), dtype=np.float32),
            explained_variance=np.zeros(0),
            explained_variance_ratio=np.zeros(0),
            n_cells=n_cells,
        )
        for chunk in sample_pass(sample, passes=2):
            if len(chunk) == 0:
                continue
            match = probe.chunk_match(chunk)
            missing = ~match.target_present()
            for _, z in probe._standardised_blocks(chunk, match):
                z[:, missing] = 0.0
                gram += z.T @ z
                zsum += z.sum(axis=0)
                n2 += len(z)
        if n2 != n_cells:
            raise InputError(
                f"the sample changed between the two passes of the fit ({n_cells} then {n2} cells): pass a sample "
                "that yields the same chunks each time it is iterated"
            )
        center = zsum / n2
        cov = (gram - n2 * np.outer(center, center)) / (n2 - 1)
        cov = (cov + cov.T) / 2
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][: cfg.n_components]
        evals = np.clip(evals[order], 0.0, None)
        comps = evecs[:, order].T.copy()
        # deterministic signs: the entry of largest magnitude of each component is positive
        top = np.argmax(np.abs(comps), axis=1)
        comps *= np.sign(comps[np.arange(len(comps)), top])[:, None]
        total = float(np.trace(cov)) or 1.0  # the total variance of the scaled, clipped genes
        self.model = PCAModel(
            genes=hvg,
            means=means,
            stds=stds,
            center=center,
            components=comps.astype(np.float32),
            explained_variance=evals,
            explained_variance_ratio=evals / total,
            n_cells=n_cells,
        )
        self._matches = {}
        self._digest = None
        logger.info(
            "PCA fit: %d components explain %.1f%% of the variance of the scaled genes",
            cfg.n_components,
            100 * float(self.model.explained_variance_ratio.sum()),
        )

    def _select_genes(
        self, union: _GeneUnion, stats: dict[str, _DatasetStats]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices (into the union) of the selected genes, with their pooled means and standard deviations."""
        cfg = self.config
        G = len(union)
        for st in stats.values():
            st.grow(G)
        n_present = np.zeros(G)
        s = np.zeros(G)
        ss = np.zeros(G)
        rank_sum = np.zeros(G)
        rank_n = np.zeros(G)
        for st in stats.values():
            n_present += st.n * st.present
            s += st.s
            ss += st.ss
            disp = _normalized_dispersion(st)
            present = np.flatnonzero(st.present)
            if len(present) == 0:
                continue
            d = disp[present]
            # rank 0 = most variable; undefined dispersions last; ties by gene order (stable)
            order = np.lexsort((np.arange(len(d)), np.where(np.isnan(d), np.inf, -d)))
            ranks = np.empty(len(d))
            ranks[order] = np.arange(len(d)) / max(len(d) - 1, 1)
            rank_sum[present] += ranks
            rank_n[present] += 1
        mean, var = _variance(s, ss, n_present)
        varies = (var > 0) & (rank_n > 0)
        n_datasets = sum(1 for st in stats.values() if st.n > 0)
        # a dataset that does not measure a gene ranks it last (1): a gene few datasets measure is no favourite
        score = (rank_sum + n_datasets - rank_n) / max(n_datasets, 1)
        need = max(1, math.ceil(cfg.gene_coverage * n_datasets - 1e-9))
        eligible = np.flatnonzero(varies & (rank_n >= need))
        left_out = int(varies.sum()) - len(eligible)  # varying genes too few datasets measure
        if len(eligible) < cfg.n_components:
            if left_out:
                raise InputError(
                    f"the atlas' {n_datasets} datasets measure only {len(eligible)} varying genes that enough of them "
                    f"share (gene_coverage {cfg.gene_coverage:g}; of "
                    f"{int(varies.sum())}), fewer than the {cfg.n_components} principal components asked for: remove "
                    "the datasets measured on the fewest genes (`scatlas datasets` lists them), or build with "
                    "a lower `--embedder-option gene_coverage` to also select genes fewer datasets measure (their cells "
                    "are placed from the genes they have)"
                )
            raise InputError(
                f"only {len(eligible)} genes vary in the sample, fewer than the {cfg.n_components} principal "
                "components asked for: check that the atlas holds expression values, or lower n_components"
            )
        if len(eligible) < cfg.n_hvg:
            if left_out:
                logger.warning(
                    "the atlas' %d datasets measure %d varying genes that enough of them share: the embedder uses "
                    "all of them instead of %d highly variable genes, and leaves out %d genes too few datasets "
                    "measure (gene_coverage); `scatlas datasets` lists each dataset's genes, a lower "
                    "`--embedder-option gene_coverage` also selects genes fewer of them measure",
                    n_datasets, len(eligible), cfg.n_hvg, left_out,
                )
            else:
                logger.warning(
                    "only %d genes vary in the sample; using all of them instead of %d highly variable genes",
                    len(eligible),
                    cfg.n_hvg,
                )
        elif left_out:
            top = np.flatnonzero(varies)
            top = top[np.lexsort((top, score[top]))[: cfg.n_hvg]]
            lost = int((rank_n[top] < need).sum())  # of the genes chosen were every gene a candidate
            log = logger.warning if lost > LOST_GENES_WARN * cfg.n_hvg else logger.info
            log(
                "%d of the %d most variable genes are left out because too few datasets measure them (cells of "
                "the datasets that do lose what those genes tell apart); `scatlas datasets` lists each dataset's "
                "genes, a lower `--embedder-option gene_coverage` also selects genes fewer of them measure",
                lost, cfg.n_hvg,
            )
        chosen = eligible[np.lexsort((eligible, score[eligible]))[: cfg.n_hvg]]
        chosen = np.sort(chosen)
        _say_unmeasured(chosen, [st for st in stats.values() if st.n > 0])
        return chosen, mean[chosen], np.sqrt(var[chosen])

    # -- helpers --------------------------------------------------------------------------------------------------

    def _fitted(self) -> PCAModel:
        if self.model is None:
            raise InputError("the PCA embedder is not fitted: call fit(sample) first, or load a saved embedder")
        return self.model

    def _divisor(self, model: PCAModel) -> np.ndarray | None:
        """Per-gene divisor of the centred values (see the module docstring); None: no scaling."""
        mode = self.config.scale
        if mode == "zscore":
            return model.stds
        if mode == "floor":
            return np.maximum(model.stds, np.median(model.stds))
        return None

    def _standardised_blocks(self, chunk: CellChunk, match: GeneMatch) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, z)``: centred, scaled (``scale``), clipped values (float64) of blocks of rows."""
        model = self._fitted()
        L = _lognorm_X(chunk)
        Lh = match.project(L)
        mv = self.config.max_value
        divisor = self._divisor(model)
        for start in range(0, Lh.shape[0], _BLOCK_ROWS):
            z = Lh[start : start + _BLOCK_ROWS].toarray().astype(np.float64)
            z -= model.means
            if divisor is not None:
                z /= divisor
            np.clip(z, -mv, mv, out=z)
            yield start, z

    # -- persistence ----------------------------------------------------------------------------------------------

    def _save_artefact(self, directory: Path) -> None:
        model = self._fitted()
        arrays: dict[str, Any] = model.arrays()
        with open(directory / ARTEFACT_FILE, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def _load(cls, directory: Path, params: dict[str, Any]) -> PCAEmbedder:
        path = Path(directory) / ARTEFACT_FILE
        if not path.is_file():
            raise StoreError(f"the PCA embedder at {directory} has no {ARTEFACT_FILE}; rebuild the index")
        params = dict(params)
        for key, value in LEGACY_PARAMS.items():
            params.setdefault(key, value)  # saved before the option existed
        emb = cls(**params)
        try:
            with np.load(path, allow_pickle=False) as npz:
                emb.model = PCAModel.from_arrays({k: npz[k] for k in npz.files})
        except NPZ_LOAD_ERRORS as exc:
            raise StoreError(
                f"cannot read the PCA artefact {path} ({type(exc).__name__}: {exc}): it is damaged; rebuild the index"
            ) from exc
        return emb
