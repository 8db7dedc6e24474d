"""Does a query cell's expression look like any atlas cell type? A per-cell check in gene space, calibrated by
holding out atlas datasets.

The similarity-based mapping score (:mod:`query.mapping`) works in the embedding, where a cell of a tissue the atlas
lacks can land among atlas cells: an embedder fitted on blood genes places a pancreatic cell by the few blood genes
it expresses. Gene space keeps what the embedding drops. As scmap-cluster does, each query cell is compared with the
mean expression profile (log1p CP10k of the embedder's genes) of each atlas cell type (the label head's classes),
from the label heads' training sample; its *expression match* is its best Pearson correlation with any of them.
One profile per type, not per type and dataset, keeps the cost at cells x genes x types for any number of datasets.

Calibration (at annotate time, on the genes the query has): each atlas dataset of the sample (the
:data:`MAX_GROUPS` largest) is held out in turn and its cells matched against the profiles of the other datasets'
cells, which shows how well cells of a new lab or condition match when they are of types the atlas holds (each
dataset on the genes it measured, the profiles from the datasets that measured each gene: an atlas mixing gene
panels reads a file's missing genes as zeros, which are no measurement). The cut is
the lowest of the held-out datasets' :data:`QUANTILE` quantiles, moved per bin of detected genes (:func:`_depth_cuts`);
a query cell under its bin's cut matches no atlas cell type as well as almost every held-out atlas cell does, and is
out of the atlas. It needs at least two datasets in the sample (each with :data:`MIN_GROUP_CELLS` cells) and a
head that reads gene features; otherwise the check is off and the report says why.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scatlas.index import AtlasIndex, LabelHead, load_training_sample, load_training_sample_ids

logger = logging.getLogger(__name__)

QUANTILE = 0.001
"""The held-out datasets' quantile of expression match whose lowest value is the cut. Cells of few counts match
every profile worse, and a new dataset's share of them differs from the atlas': at 0.005 a new synthetic dataset of
the atlas' own types lost 2.1% of its cells, at 0.001 0.6% (real queries: docs/benchmarks.md#query-mapping-check)."""
QUANTILE_POORLY = 0.01
"""In a query that maps poorly by this check (another tissue), a cell keeps its label only when its match reaches
this quantile of the held-out datasets' (moved per depth bin like :data:`QUANTILE`): it maps well on its own, not
merely outside the atlas' extreme tail. 0.05 also took the labels of most blood cells of another lab mixed into
such a file (docs/benchmarks.md#query-mapping-check)."""
MIN_GROUP_CELLS = 50
"""A dataset needs this many cells in the training sample to be held out (its quantile is noise otherwise)."""
MIN_PROFILE_CELLS = 10
"""A cell type needs this many sample cells (outside the held-out dataset, when calibrating) to give a profile."""
MIN_GENES = 200
"""Below this many of the embedder's genes in the query, the check is off: a profile over a few dozen genes, of which
a cell detects a handful, correlates with anything or nothing (a cell-line file sharing 94 genes got a negative cut)."""
MAX_GROUPS = 50
"""At most this many datasets (the largest in the sample) are held out to calibrate: enough to see the spread
between labs, bounded for an atlas of hundreds of datasets."""
CALIBRATION_CELLS = 2_000
"""At most this many sample cells of a held-out dataset are matched (sampled with a fixed seed)."""
DEPTH_BINS = 5
"""Held-out cells are split into this many bins by their detected genes (quantiles): a cell of few detected genes
matches every profile worse, so each bin has its own cut (a new dataset's share of shallow cells differs from the
atlas')."""
MIN_BIN_CELLS = 20
"""A held-out dataset's bin needs this many cells for its median there to count."""
BLOCK_ROWS = 10_000


@dataclass(frozen=True)
class ExpressionMatch:
    """Profiles of the atlas' cell types, and the cuts calibrated on held-out datasets.

    ``profiles``: ``(n_types, n_present)`` the mean log1p CP10k of each type on the present genes,
    centred and scaled (:func:`_standardise`); ``present``: the embedder's genes the query has (bool; the only ones
    compared); ``edges``: the detected-gene counts that split cells into :data:`DEPTH_BINS` bins; ``cuts``: each
    bin's cut (cells matching below their bin's cut are out of the atlas); ``cut``: the lowest of them;
    ``record``: what the report says of it.
    """

    profiles: np.ndarray
    present: np.ndarray
    edges: np.ndarray
    cuts: np.ndarray
    cut: float
    record: dict[str, Any]
    strict_cuts: np.ndarray | None = None
    """Each bin's cut at :data:`QUANTILE_POORLY`: what a cell of a query that maps poorly by this check must reach
    to keep its label (it must map well on its own, not merely escape the atlas' extreme tail)."""

    def scores(self, gene_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's best Pearson correlation with any profile on the present genes (NaN for a cell whose present
        genes are all equal, e.g. no expression), and its detected genes among them."""
        X = np.asarray(gene_features, dtype=np.float32)[:, self.present]
        return _best_match(X, self.profiles), (X > 0).sum(axis=1)

    def below(self, match: np.ndarray, depth: np.ndarray, strict: bool = False) -> np.ndarray:
        """Bool: the cells whose match is under the cut of their depth's bin (NaN: not below); ``strict``: under
        the :attr:`strict_cuts`."""
        cuts = self.strict_cuts if strict and self.strict_cuts is not None else self.cuts
        cut = cuts[np.searchsorted(self.edges, np.asarray(depth), side="right")]
        out: np.ndarray = np.asarray(match) < cut
        return out


def _standardise(X: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (NaN where a row is constant): a dot product is then Pearson's r."""
    Xc = X - X.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(Xc, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: np.ndarray = np.where(norm > 0, Xc / norm, np.nan).astype(np.float32)
    return out


def _best_match(X: np.ndarray | sp.csr_matrix, centred_profiles: np.ndarray) -> np.ndarray:
    """Each row's best Pearson correlation with the profiles (rows densified a block at a time)."""
    out = np.full(X.shape[0], np.nan, dtype=np.float32)
    for a in range(0, X.shape[0], BLOCK_ROWS):
        block: Any = X[a : a + BLOCK_ROWS]
        Z = _standardise(np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32))
        r = Z @ centred_profiles.T
        with warnings.catch_warnings():  # a row of NaN (a cell without expression) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[a : a + len(Z)] = np.nanmax(r, axis=1) if r.shape[1] else np.nan
    return out


def off(reason: str, cause: str = "inputs") -> dict[str, Any]:
    """The report's record of a check that did not run: why, and whether the ``cause`` is the atlas' make-up
    (``atlas``: too few labelled datasets to calibrate it; the same for every query) or this run's inputs (``inputs``:
    no heads reading genes, too few shared genes)."""
    return {"status": "off", "reason": reason, "cause": cause}


def expression_match(
    idx: AtlasIndex, heads: dict[str, LabelHead], present: np.ndarray | None
) -> ExpressionMatch | dict[str, Any]:
    """The calibrated check for a query with the embedder's genes ``present`` (None: the embedder reads no genes),
    from the training sample of the first label head that reads gene features; the report's record of why not
    (:func:`off`) when it cannot run."""
    head = next((h for h in heads.values() if h.needs_gene_features and h.directory is not None), None)
    if present is None or head is None or head.directory is None:
        return off("no label head reads gene features (an embedder without them, or heads not trained)")
    ids = load_training_sample_ids(head.directory)
    G = load_training_sample(head.directory)
    if ids is None or G is None or len(ids) != G.shape[0]:
        return off("the label heads' training sample predates this check: retrain the heads "
                   "(`scatlas build ... --label-key KEY`) to turn it on")
    present = np.asarray(present, dtype=bool)
    if G.shape[1] != len(present) or present.sum() < MIN_GENES:
        return off(f"the query shares {int(present.sum())} of the embedder's genes, under the {MIN_GENES} a cell's "
                   "expression profile needs to be compared")
    with np.load(head.directory / head.record["file"], allow_pickle=False) as z:
        rows, y = np.asarray(z["train_rows"]), np.asarray(z["train_y"])
    datasets = _datasets(idx, ids[rows])
    sizes = {d: int((datasets == d).sum()) for d in np.unique(datasets[datasets != ""])}
    groups = sorted((d for d, n in sizes.items() if n >= MIN_GROUP_CELLS), key=lambda d: -sizes[d])[:MAX_GROUPS]
    if len(groups) < 2:
        return off("the atlas' training sample has fewer than two datasets to hold out", cause="atlas")
    Gp = sp.csr_matrix(G[rows][:, np.flatnonzero(present)], dtype=np.float64)
    onehot = sp.csr_matrix((np.ones(len(y)), (np.arange(len(y)), y)), shape=(len(y), int(y.max()) + 1))
    counts = np.asarray(onehot.sum(axis=0)).ravel()
    sums, n_cells, per = _measured_sums(Gp, onehot, datasets)
    rng = np.random.default_rng(0)
    held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for d in groups:
        mine = np.flatnonzero(datasets == d)
        own_sums, own_counts, measured = per[d]
        keep = counts - own_counts >= MIN_PROFILE_CELLS  # the types the other datasets hold
        if not keep.any():
            continue
        n_rest = (n_cells - own_counts[:, None] * measured[None, :])[keep]
        profiles = _profiles((sums - own_sums)[keep], n_rest)
        # compared on the genes this dataset and the others measured, not on zeros for genes either lacks
        cols = np.flatnonzero(measured & (n_rest > 0).any(axis=0))
        cells = mine if len(mine) <= CALIBRATION_CELLS else np.sort(rng.choice(mine, CALIBRATION_CELLS, replace=False))
        X = Gp[cells][:, cols]
        held[str(d)] = (_best_match(X, _standardise(profiles[:, cols])), np.asarray((X > 0).sum(axis=1)).ravel())
    if not held:
        return off("no atlas dataset shares cell types with another", cause="atlas")
    keep = counts >= MIN_PROFILE_CELLS
    centred = _standardise(_profiles(sums[keep], n_cells[keep]))
    quantiles = {d: float(np.nanquantile(match, QUANTILE)) for d, (match, _) in held.items()}
    edges, cuts = _depth_cuts(held, quantiles)
    _, strict = _depth_cuts(held, {d: float(np.nanquantile(m, QUANTILE_POORLY)) for d, (m, _) in held.items()})
    record = {
        "status": "on", "cut": round(float(cuts.min()), 4), "quantile": QUANTILE, "grouping": "dataset",
        "n_groups": len(quantiles), "n_profiles": int(keep.sum()), "label_key": head.key,
        "held_out_quantiles": {k: round(v, 4) for k, v in quantiles.items()},
        "depth_bins": {"detected_genes_from": [0, *map(int, edges)], "cuts": [round(float(c), 4) for c in cuts]},
    }
    record["strict_cuts"] = [round(float(c), 4) for c in strict]
    return ExpressionMatch(centred, present, edges, cuts, float(cuts.min()), record, strict)


def _measured_sums(
    Gp: sp.csr_matrix, onehot: sp.csr_matrix, datasets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per cell type and gene, ``(types, genes)``: the sum of the sample cells' values and the number of cells, both
    over the datasets that measured the gene (its values vary among their sample cells; a gene a dataset's file
    lacks reads as zeros, or as its atlas mean, which are no measurement); and per dataset its own ``(sums, cells per type,
    measured genes)``. An atlas mixing gene panels (a 2,000-gene file beside whole transcriptomes) otherwise gets
    profiles diluted by those zeros, and held-out cells compared on genes they never had."""
    k = onehot.shape[1]
    sums, n_cells = np.zeros((k, Gp.shape[1])), np.zeros((k, Gp.shape[1]))
    per: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for d in np.unique(datasets):
        rows = np.flatnonzero(datasets == d)
        block = Gp[rows]
        # a gene varies among a dataset's cells where it measured it: a gene its file lacks is all zeros (stores
        # that did not record what each dataset measured) or its atlas mean (:attr:`CellChunk.measured`)
        measured = np.asarray(block.max(axis=0).todense() != block.min(axis=0).todense()).ravel()
        if len(rows) < 2:  # one cell varies nowhere: its detected genes, as before imputation existed
            measured = np.asarray(block.getnnz(axis=0) > 0).ravel()
        own = onehot[rows]
        own_sums = np.asarray((own.T @ block).todense()) * measured[None, :]
        own_counts = np.asarray(own.sum(axis=0)).ravel()
        per[str(d)] = (own_sums, own_counts, measured)
        sums += own_sums
        n_cells += own_counts[:, None] * measured[None, :]
    return sums, n_cells, per


def _profiles(sums: np.ndarray, n_cells: np.ndarray) -> np.ndarray:
    """Mean profiles from :func:`_measured_sums`; where no dataset holding a type measured a gene, the gene's mean
    over the other types (neutral for a correlation)."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a gene no type has: all NaN, filled with 0
        out = np.where(n_cells > 0, sums / np.maximum(n_cells, 1), np.nan)
        fill = np.nan_to_num(np.nanmean(out, axis=0))
    return np.where(np.isnan(out), fill[None, :], out)


def _depth_cuts(
    held: dict[str, tuple[np.ndarray, np.ndarray]], tails: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges (detected genes) and each bin's cut. A held-out dataset's tail (``tails``: its :data:`QUANTILE`
    quantile over all its cells; a bin's few cells would put it too high) is moved by how far its median in the bin
    lies from its median overall (medians are steady on few cells); a bin's cut is the lowest over the datasets with
    :data:`MIN_BIN_CELLS` cells in it (the lowest tail, where none has)."""
    depth = np.concatenate([d for _, d in held.values()])
    edges = np.unique(np.quantile(depth, np.linspace(0, 1, DEPTH_BINS + 1)[1:-1]))
    cuts = np.full(len(edges) + 1, min(tails.values()))
    bins = {name: np.searchsorted(edges, d, side="right") for name, (_, d) in held.items()}
    medians = {name: float(np.nanmedian(match)) for name, (match, _) in held.items()}
    for b in range(len(edges) + 1):
        found = []
        for name, (match, _) in held.items():
            in_bin = (bins[name] == b) & np.isfinite(match)
            if in_bin.sum() >= MIN_BIN_CELLS:
                found.append(tails[name] + float(np.median(match[in_bin])) - medians[name])
        if found:
            cuts[b] = min(found)
    return edges, cuts


def _datasets(idx: AtlasIndex, ids: np.ndarray) -> np.ndarray:
    """The dataset id of each atlas id (``""`` where unknown)."""
    uniq = np.unique(ids)
    if "dataset_id" not in idx.columns():
        return np.full(len(ids), "", dtype=object)
    table = idx.cells(uniq, columns=["dataset_id"])  # one row per id, in the order of uniq
    if len(table) != len(uniq):
        return np.full(len(ids), "", dtype=object)
    values = table["dataset_id"].astype(object).where(table["dataset_id"].notna(), "").astype(str).to_numpy(object)
    return values[np.searchsorted(uniq, ids)]
