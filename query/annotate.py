"""Label transfer: stream a query through the index's embedder, search the atlas, vote the neighbours' labels.

Search and voting are kept apart (as in cellxgene-census' ``find_nearest_obs`` / ``predict_obs_metadata``):
this module streams the query and looks up neighbours' labels; :mod:`query.vote` decides;
:mod:`query.evaluate` scores against known labels; :mod:`query.outputs` writes files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata
import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import MIN_GENE_OVERLAP
from scatlas.atlas.outputs import check_distinct
from scatlas.index import (
    DEFAULT_K,
    AtlasIndex,
    LabelHead,
    Progress,
    l2_normalize,
    progress_bar,
    refit_for_genes,
    sample_sorted,
)
from scatlas.query.align import DEFAULT_SAMPLE as DEFAULT_ALIGN_SAMPLE
from scatlas.query.align import Alignment, apply_shift, estimate_shift
from scatlas.query.evaluate import confusion_table, evaluate_labels
from scatlas.query.outputs import plot_confusion, write_annotated_h5ad, write_json, write_parquet
from scatlas.query.prepare import QueryCells, open_query
from scatlas.query.vote import (
    REASON_FAR,
    REASON_LOW_CONFIDENCE,
    REASON_NO_EXPRESSION,
    REASON_NONE,
    UNKNOWN,
    Weighting,
    balance_weights,
    decide,
    mean_top_similarity,
    vote,
    vote_weights,
    votes_from_probabilities,
)

logger = logging.getLogger(__name__)

Align = Literal["none", "mnn"]
Predictor = Literal["auto", "heads", "knn"]
PREDICTORS: tuple[str, ...] = ("auto", "heads", "knn")
MissingGenes = Literal["refit", "impute"]
MISSING_GENES: tuple[str, ...] = ("refit", "impute")
DEFAULT_MISSING_GENES: MissingGenes = "refit"

MIN_GENE_OVERLAP_REFIT = 0.15
"""Default gene-overlap floor when label heads refitted for the query's genes decide every label (see
docs/benchmarks.md#annotate-gene-overlap)."""

DEFAULT_MIN_CONFIDENCE = 0.3
DEFAULT_WEIGHTING: Weighting = "adaptive"
DEFAULT_FAR_QUANTILE: float | None = None
FAR_QUANTILE_WHEN_ON = 0.001
"""The far-from-atlas quantile to use when turning the rule on (the strictest one every index calibrates since it
was added; an older index falls back to its lowest)."""
DEFAULT_CLASS_BALANCE = 0.5
DEFAULT_ALIGN: Align = "mnn"
DEFAULT_BATCH_SIZE = 10_000
DEFAULT_PREDICTOR: Predictor = "auto"
DATASET_COLUMN = "dataset_id"
SIMILARITY_COLUMN = "atlas_similarity"
NEAREST_COLUMN = "atlas_nearest_similarity"
REASONS = (REASON_NONE, REASON_LOW_CONFIDENCE, REASON_FAR, REASON_NO_EXPRESSION)


@dataclass
class AnnotationResult:
    """Predictions for every query cell, the neighbours they came from, and a report.

    ``predictions``: indexed like the query's obs; per label key ``<key>_pred`` (``"unknown"`` when
    abstained), ``<key>_confidence`` (weighted vote share of the winner) and ``<key>_unknown_reason`` (``""``,
    ``"low_confidence"``, ``"far_from_atlas"`` or ``"no_expression"``: no count on any gene the embedder reads),
    plus ``atlas_similarity`` (mean similarity of the cell's
    calibration-k nearest atlas cells) and ``atlas_nearest_similarity`` (similarity of the nearest one).
    ``neighbors``: one row per (query cell, neighbour) that voted or could
    have (``query_row``, ``query_cell``, ``atlas_cell_id`` = soma_joinid, ``rank`` from 0, ``similarity``,
    ``dataset_id``). ``report``: JSON-serialisable summary (gene overlap, label counts, unknown rates, index
    identity, timings, and ``evaluation`` when a truth column was given).
    """

    predictions: pd.DataFrame
    neighbors: pd.DataFrame
    report: dict[str, Any]
    _query: str | Path | anndata.AnnData = field(repr=False)
    _truth: dict[str, pd.Series] = field(default_factory=dict, repr=False)

    def confusion(self, label_key: str | None = None) -> pd.DataFrame:
        """Counts of (truth, predicted) for a label key (default: the first evaluated one)."""
        if not self._truth:
            raise InputError("no truth labels: annotate with truth_key=... to get a confusion matrix")
        key = label_key or next(iter(self._truth))
        if key not in self._truth:
            raise InputError(f"no truth labels for {key!r}; evaluated keys: {list(self._truth)}")
        return confusion_table(self._truth[key].to_numpy(), self.predictions[f"{key}_pred"].to_numpy())

    def write(
        self,
        out_h5ad: str | Path | None,
        neighbors_parquet: str | Path | None = None,
        report_json: str | Path | None = None,
        confusion_png: str | Path | None = None,
    ) -> dict[str, Path]:
        """Write the outputs that are given a path; each atomically (temporary file, then rename).

        ``out_h5ad``: a new ``.h5ad`` = the query with the prediction columns added to obs (the query itself
        is never modified). ``confusion_png`` needs truth labels (``truth_key``).
        """
        if confusion_png is not None and not self._truth:
            raise InputError("a confusion matrix needs truth labels: annotate with truth_key=...")
        check_distinct([out_h5ad, neighbors_parquet, report_json, confusion_png])
        inputs = () if isinstance(self._query, anndata.AnnData) else (Path(self._query),)
        written: dict[str, Path] = {}
        if out_h5ad is not None:
            written["h5ad"] = write_annotated_h5ad(self._query, self.predictions, out_h5ad)
        if neighbors_parquet is not None:
            written["neighbors"] = write_parquet(self.neighbors, neighbors_parquet, inputs=inputs)
        if report_json is not None:
            written["report"] = write_json(self.report, report_json, inputs=inputs)
        if confusion_png is not None:
            key = next(iter(self._truth))
            written["confusion"] = plot_confusion(
                self.confusion(key), confusion_png, title=f"{key}: truth vs predicted", inputs=inputs
            )
        return written


# -- helpers -------------------------------------------------------------------------------------------------


def _as_str_values(values: Any) -> np.ndarray:
    s = pd.Series(np.asarray(values, dtype=object))
    return s.where(s.notna(), None).map(lambda v: None if v is None else str(v)).to_numpy(dtype=object)


def _atlas_label_counts(index: AtlasIndex, column: str, ids: np.ndarray | None) -> pd.Series:
    """Cells per non-NULL value of ``column`` (as strings, sorted), among the cells ``ids`` (None: all cells).

    ``ids`` come from the ``where`` predicate through :meth:`AtlasIndex.filter_ids`, the one checked path from a
    user predicate to SQL; the predicate itself is never put into this query.
    """
    values, counts = index.value_counts(column, ids)
    series = pd.Series(counts, index=pd.Index(_as_str_values(values), dtype=object))
    return series.groupby(level=0).sum().sort_index()


def _codes(values: Any, categories: pd.Index) -> np.ndarray:
    return np.asarray(categories.get_indexer(pd.Index(_as_str_values(values), dtype=object)), dtype=np.int64)


def _normalise_truth(truth_key: str | Mapping[str, str] | None, label_keys: Sequence[str]) -> dict[str, str]:
    if truth_key is None:
        return {}
    if isinstance(truth_key, str):
        return {label_keys[0]: truth_key}
    unknown = [k for k in truth_key if k not in label_keys]
    if unknown:
        raise InputError(
            f"truth_key maps label keys {unknown} that are not among label_keys {list(label_keys)}"
        )
    return dict(truth_key)


def _validate(
    keys: list[str],
    label_keys: Any,
    *,
    k: int,
    min_confidence: float,
    max_votes_per_dataset: int | None,
    batch_size: int,
    far_quantile: float | None,
    align: str,
    class_balance: float,
    predictor: str,
    missing_genes: str,
    align_sample: int,
) -> None:
    """InputError naming the first invalid argument of :func:`annotate`."""
    if not keys or any(not isinstance(x, str) or not x for x in keys) or len(set(keys)) != len(keys):
        raise InputError(f"label_keys must be one or more distinct column names (got {label_keys!r})")
    if int(k) < 1:
        raise InputError(f"k must be at least 1 (got {k})")
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise InputError(f"min_confidence must be between 0 and 1 (got {min_confidence})")
    if max_votes_per_dataset is not None and int(max_votes_per_dataset) < 1:
        raise InputError(
            f"max_votes_per_dataset must be at least 1 (got {max_votes_per_dataset}); None = no cap"
        )
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1 (got {batch_size})")
    if far_quantile is not None and not 0.0 < float(far_quantile) < 1.0:
        raise InputError(f"far_quantile must be in (0, 1) or None (got {far_quantile})")
    if align not in ("none", "mnn"):
        raise InputError(f"align must be 'none' or 'mnn' (got {align!r})")
    if not float(class_balance) >= 0:
        raise InputError(f"class_balance must be >= 0 (got {class_balance})")
    if predictor not in PREDICTORS:
        raise InputError(f"predictor must be one of {', '.join(PREDICTORS)} (got {predictor!r})")
    if missing_genes not in MISSING_GENES:
        raise InputError(f"missing_genes must be one of {', '.join(MISSING_GENES)} (got {missing_genes!r})")
    if int(align_sample) < 1:
        raise InputError(f"align_sample must be at least 1 (got {align_sample})")


def _far_threshold(
    index: AtlasIndex, far_quantile: float | None
) -> tuple[float | None, float | None, int | None, float | None]:
    """(threshold on the mean top-k similarity or None, threshold on the nearest neighbour's similarity or
    None, the k the index calibrated them with or None, the quantile used or None)."""
    cal = index.manifest.calibration
    if not cal.mean_topk:
        if far_quantile is not None:
            logger.warning(
                "the index has no neighbour calibration (too few cells?): 'far_from_atlas' calls are off"
            )
        return None, None, None, None
    if far_quantile is None:
        return None, None, int(cal.k), None
    if far_quantile == FAR_QUANTILE_WHEN_ON and far_quantile not in cal.quantiles:
        lowest = min(cal.quantiles)
        logger.warning(
            "the index was calibrated before far_quantile %s existed: using its lowest calibrated "
            "quantile %s (rebuild the index to get %s)", far_quantile, lowest, far_quantile,
        )
        far_quantile = lowest
    try:
        nearest = float(cal.threshold("first_neighbor", far_quantile)) if cal.first_neighbor else None
        return float(cal.threshold("mean_topk", far_quantile)), nearest, int(cal.k), float(far_quantile)
    except KeyError as exc:
        raise InputError(
            f"far_quantile={far_quantile} is not among the index's calibrated quantiles {cal.quantiles}; "
            "choose one of them or None"
        ) from exc


# -- the function --------------------------------------------------------------------------------------------


def annotate(
    query: str | Path | anndata.AnnData,
    index: str | Path | AtlasIndex,
    *,
    label_keys: Sequence[str] | str = ("cell_type",),
    k: int = DEFAULT_K,
    where: str | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    max_votes_per_dataset: int | None = None,
    truth_key: str | Mapping[str, str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    min_gene_overlap: float | None = None,
    weighting: Weighting = DEFAULT_WEIGHTING,
    class_balance: float = DEFAULT_CLASS_BALANCE,
    align: Align = DEFAULT_ALIGN,
    align_sample: int = DEFAULT_ALIGN_SAMPLE,
    far_quantile: float | None = DEFAULT_FAR_QUANTILE,
    keep_neighbors: bool = True,
    predictor: Predictor = DEFAULT_PREDICTOR,
    missing_genes: MissingGenes = DEFAULT_MISSING_GENES,
    progress: Progress = True,
) -> AnnotationResult:
    """Transfer atlas labels to the cells of ``query``: each label from the index's label heads or a vote of the
    cell's nearest atlas cells; ``"unknown"`` where the call is not confident or the cell lies far from the atlas.

    query: an ``.h5ad`` path (read in chunks) or an AnnData; never modified.
    index: an index directory or an opened :class:`~index.AtlasIndex`.
    label_keys: columns of the index's cell table to transfer, each on its own.
    k: neighbours that vote per cell. where: an SQL predicate restricting the atlas cells searched.
    min_confidence: below this winning probability (heads) or vote share a cell is unknown (``low_confidence``).
    max_votes_per_dataset: at most this many of a cell's voters from one atlas dataset (None: no cap).
    truth_key: a query obs column of known labels (for ``label_keys[0]``), or ``{label_key: column}``; adds
        ``report["evaluation"]``.
    batch_size: query cells embedded and searched at a time (bounds memory).
    min_gene_overlap: refuse a query with a smaller fraction of the embedder's genes (None:
        :data:`MIN_GENE_OVERLAP_REFIT` when refitted heads decide every label, else
        :data:`atlas.genes.MIN_GENE_OVERLAP`).
    weighting: vote weights from similarities (:mod:`query.vote`). class_balance: each vote is divided by its
        label's atlas cell count to this power (0: plain votes, 1: fully balanced).
    align: ``"mnn"`` shifts the query onto the atlas first (:mod:`query.align`, estimated on ``align_sample``
        cells); ``"none"`` searches with the vectors as embedded.
    far_quantile: a cell whose mean top-k and nearest similarities are both below this quantile of the atlas'
        own is unknown (``far_from_atlas``); None: off (:data:`FAR_QUANTILE_WHEN_ON` turns it on).
    keep_neighbors: keep the neighbours table (``n_cells x k`` rows).
    predictor: ``"heads"`` (the index's label heads), ``"knn"`` (the vote) or ``"auto"`` (heads where they exist).
    missing_genes: for a query lacking some of the embedder's genes, ``"refit"`` the heads on the genes it has, or
        ``"impute"`` (each missing gene reads as its atlas mean).
    progress: a progress bar (:data:`index.progress.Progress`).

    How the defaults were chosen: docs/benchmarks.md#annotate-defaults. Raises InputError (empty query, unknown
    column, invalid parameter, a ``where`` matching no atlas cell) and GeneOverlapError (too few shared genes).
    """
    t_start = time.perf_counter()
    keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    _validate(keys, label_keys, k=k, min_confidence=min_confidence, max_votes_per_dataset=max_votes_per_dataset,
              batch_size=batch_size, far_quantile=far_quantile, align=align, class_balance=class_balance,
              predictor=predictor, missing_genes=missing_genes, align_sample=align_sample)
    truth_map = _normalise_truth(truth_key, keys)
    own_index = not isinstance(index, AtlasIndex)
    idx = AtlasIndex.open(index) if not isinstance(index, AtlasIndex) else index
    cells: QueryCells | None = None
    try:
        atlas = _atlas_labels(idx, keys, where, far_quantile, class_balance, predictor, max_votes_per_dataset)
        t_open = time.perf_counter() - t_start
        cells = open_query(query, idx)
        missing_truth = [c for c in truth_map.values() if c not in cells.source.obs.columns]
        if missing_truth:
            raise InputError(
                f"truth column(s) {missing_truth} are not in the query's obs; "
                f"obs has: {', '.join(map(str, cells.source.obs.columns))}"
            )
        if min_gene_overlap is None:
            min_gene_overlap = _default_min_overlap(cells, keys, atlas.heads, missing_genes)
        cells.check(min_gene_overlap)
        heads_refit = _refit_heads(cells, atlas, missing_genes)
        alignment, t_align = _align(cells, align, align_sample, batch_size, where)
        run = _Transfer(idx, atlas, k=int(k), min_confidence=float(min_confidence), weighting=weighting,
                        max_votes_per_dataset=max_votes_per_dataset, where=where, keep_neighbors=keep_neighbors,
                        n=cells.n_cells, shift=alignment.shift if alignment is not None else None)
        with progress_bar(progress, total=cells.n_cells, desc="annotate", unit="cell") as bar:
            for chunk in cells.chunks(batch_size):
                run.add(chunk)
                bar.update(len(chunk.ids))
        if run.n_silent:
            logger.warning(
                "%d of %d query cells have no expression on the index embedder's genes: they are 'unknown' "
                "(reason %r)", run.n_silent, cells.n_cells, REASON_NO_EXPRESSION,
            )
        params = {
            "label_keys": keys,
            "k": int(k),
            "where": where,
            "atlas_cells_matching_where": atlas.n_where,
            "min_confidence": float(min_confidence),
            "max_votes_per_dataset": max_votes_per_dataset,
            "weighting": weighting,
            "class_balance": float(class_balance),
            "align": align,
            "far_quantile": far_quantile,
            "predictor": predictor,
            "predicted_by": {key: ("heads" if key in atlas.heads else "knn") for key in keys},
            "missing_genes": missing_genes,
            "heads_refit_for_query_genes": heads_refit,
            "batch_size": int(batch_size),
            "min_gene_overlap": float(min_gene_overlap),
        }
        timings = {"open_index_s": round(t_open, 3), "align_s": round(t_align, 3)}
        return _result(query, cells, atlas, run, alignment, truth_map, params, timings, t_start)
    finally:
        if cells is not None:
            cells.close()
        if own_index:
            idx.close()


def _result(
    query: Any, cells: QueryCells, atlas: _AtlasLabels, run: _Transfer, alignment: Alignment | None,
    truth_map: dict[str, str], params: dict[str, Any], timings: dict[str, Any], t_start: float,
) -> AnnotationResult:
    """The annotation's result: predictions, neighbours and report (logged in one line)."""
    source, idx, keys, n = cells.source, cells.index, atlas.keys, cells.n_cells
    obs_names = pd.Index(source.obs.index.astype(str), name=source.obs.index.name)
    predictions = run.predictions(obs_names)
    neighbors = _neighbors_frame(run.neighbors, obs_names, atlas.datasets)
    truth = {key: source.obs[col].reset_index(drop=True) for key, col in truth_map.items()}
    t_total = time.perf_counter() - t_start
    report = _report(
        source=source, query=query, idx=idx, match=cells.match, keys=keys, predictions=predictions,
        categories=atlas.categories, truth=truth, truth_map=truth_map, far_threshold=atlas.far_threshold,
        far_nearest=atlas.far_nearest, far_k=atlas.far_k, far_used=atlas.far_used, alignment=alignment,
        params=params,
        timings={
            **timings,
            "embed_s": round(run.t_embed, 3),
            "search_s": round(run.t_search, 3),
            "vote_s": round(run.t_vote, 3),
            "total_s": round(t_total, 3),
            "cells_per_second": round(n / t_total, 1) if t_total > 0 else None,
        },
    )
    summary = ", ".join(
        f"{key}: {report['labels'][key]['n_predicted_labels']} labels, "
        f"{100 * report['labels'][key]['unknown_rate']:.1f}% unknown"
        for key in keys
    )
    logger.info("annotated %d cells in %.1f s (%.0f cells/s); %s", n, t_total, n / max(t_total, 1e-9), summary)
    return AnnotationResult(predictions=predictions, neighbors=neighbors, report=report, _query=query, _truth=truth)


@dataclass
class _AtlasLabels:
    """The atlas side of an annotation: the labels to choose among (under ``where``), their vote weights, the label
    heads that decide, the atlas datasets, and the far-from-atlas thresholds."""

    keys: list[str]
    selected_ids: np.ndarray | None
    categories: dict[str, pd.Index]
    class_weights: dict[str, np.ndarray]
    heads: dict[str, LabelHead]
    head_columns: dict[str, np.ndarray]
    has_datasets: bool
    datasets: pd.Index
    far_threshold: float | None
    far_nearest: float | None
    far_k: int | None
    far_used: float | None

    @property
    def n_where(self) -> int | None:
        return None if self.selected_ids is None else len(self.selected_ids)


def _atlas_labels(
    idx: AtlasIndex, keys: list[str], where: str | None, far_quantile: float | None, class_balance: float,
    predictor: str, max_votes_per_dataset: int | None,
) -> _AtlasLabels:
    """Read what the atlas contributes to an annotation (see :class:`_AtlasLabels`), checking the label keys,
    ``where`` and the predictor against the index."""
    available = idx.columns()
    missing = [c for c in keys if c not in available]
    if missing:
        raise InputError(
            f"label key(s) {missing} are not columns of the index's cell table; available: {', '.join(available)}"
        )
    selected_ids = None if where is None else idx.filter_ids(where)  # the index's error for a bad or empty filter
    far_threshold, far_nearest, far_k, far_used = _far_threshold(idx, far_quantile)
    label_counts = {key: _atlas_label_counts(idx, key, selected_ids) for key in keys}
    categories = {key: pd.Index(c.index, dtype=object) for key, c in label_counts.items()}
    class_weights = {key: balance_weights(c.to_numpy(), float(class_balance)) for key, c in label_counts.items()}
    for key, cats in categories.items():
        if UNKNOWN in set(cats):
            logger.warning("the atlas has a %r label %r: it cannot be told apart from abstentions", key, UNKNOWN)
        if len(cats) == 0:
            logger.warning(
                "no atlas cell has a %r label%s: every cell will be unknown", key, f" under where={where!r}" if where else "",
            )
    heads = _deciding_heads(idx, keys, predictor, max_votes_per_dataset)
    head_columns = {  # head class j -> position in categories[key] (-1: not among the labels allowed)
        key: _codes(h.classes, categories[key]) for key, h in heads.items()
    }
    for key, cols in head_columns.items():
        if not (cols >= 0).any():
            logger.warning("none of the %r label head's classes is among the atlas labels selected", key)
    has_datasets = DATASET_COLUMN in available
    datasets = pd.Index(
        _atlas_label_counts(idx, DATASET_COLUMN, selected_ids).index if has_datasets else [], dtype=object
    )
    if max_votes_per_dataset is not None and not has_datasets:
        raise InputError(f"max_votes_per_dataset needs a {DATASET_COLUMN!r} column in the index's cell table")
    return _AtlasLabels(keys, selected_ids, categories, class_weights, heads, head_columns, has_datasets, datasets,
                        far_threshold, far_nearest, far_k, far_used)


def _deciding_heads(
    idx: AtlasIndex, keys: list[str], predictor: str, max_votes_per_dataset: int | None
) -> dict[str, LabelHead]:
    """The label heads that decide the labels ``keys`` (none for the vote)."""
    if max_votes_per_dataset is not None and predictor == "heads":
        raise InputError(
            "max_votes_per_dataset caps the neighbours' vote, which predictor 'heads' does not use (the heads "
            "are trained on a sample spread evenly over atlas datasets); use predictor 'knn' or 'auto'"
        )
    if max_votes_per_dataset is not None and predictor == "auto":
        logger.info("max_votes_per_dataset given: labels come from the capped neighbour vote, not the heads")
    heads = {} if predictor == "knn" or max_votes_per_dataset is not None else idx.label_heads()
    missing_heads = [key for key in keys if key not in heads]
    if predictor == "heads" and missing_heads:
        raise InputError(
            f"the index has no label head for {missing_heads} (heads: {sorted(heads) or 'none'}); train them "
            "with `scatlas build --atlas ATLAS --index INDEX --label-key KEY` (on a built index, with its own build "
            "arguments, this only trains the heads) or use predictor 'knn'/'auto'"
        )
    return {key: heads[key] for key in keys if key in heads}


def _default_min_overlap(
    cells: QueryCells, keys: list[str], heads: dict[str, LabelHead], missing_genes: str
) -> float:
    """:data:`MIN_GENE_OVERLAP_REFIT` when heads that can be refitted for the query's genes decide every label,
    else :data:`atlas.genes.MIN_GENE_OVERLAP` (the vote has nothing to adapt to missing genes)."""
    refittable = (
        missing_genes == "refit" and cells.embedder.gene_feature_names is not None
        and all(key in heads and heads[key].can_refit_for_genes for key in keys)
    )
    return MIN_GENE_OVERLAP_REFIT if refittable else MIN_GENE_OVERLAP


def _refit_heads(cells: QueryCells, atlas: _AtlasLabels, missing_genes: str) -> dict[str, Any] | None:
    """Refit ``atlas.heads`` in place for the embedder's genes the query has (``missing_genes="refit"``, some
    missing); the report's record of it, or None."""
    embedder = cells.embedder
    if cells.match is None or embedder.gene_feature_names is None:
        return None
    present = cells.match.target_present()  # which of the embedder's gene features the query has
    if missing_genes != "refit" or not atlas.heads or present.all():
        return None
    t0 = time.perf_counter()
    atlas.heads = refit_for_genes(
        atlas.heads, present, lambda g: l2_normalize(embedder.transform_gene_features(g, present))
    )
    refit = sorted(k for k, h in atlas.heads.items() if "refit_for_genes" in h.record)
    record = {
        "genes_present": int(present.sum()), "genes": int(len(present)), "keys": refit,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if refit:
        logger.info(
            "the query has %d of the embedder's %d genes: label heads for %s refitted on the atlas training sample "
            "as the query sees it (%.1f s)", int(present.sum()), len(present), ", ".join(refit), record["seconds"],
        )
    return record


def _align(
    cells: QueryCells, align: str, align_sample: int, batch_size: int, where: str | None
) -> tuple[Alignment | None, float]:
    """The MNN shift of the query onto the atlas (``align="mnn"``) and the seconds it took."""
    if align != "mnn":
        return None, 0.0
    t0 = time.perf_counter()
    rows = sample_sorted(cells.n_cells, int(align_sample), 0)
    alignment = estimate_shift(cells.index, cells.embed(rows, batch_size), where=where)
    return alignment, time.perf_counter() - t0


class _Transfer:
    """The label transfer proper, chunk by chunk: embed, search, decide each label; keeps the results."""

    def __init__(
        self, idx: AtlasIndex, atlas: _AtlasLabels, *, k: int, min_confidence: float, weighting: Weighting,
        max_votes_per_dataset: int | None, where: str | None, keep_neighbors: bool, n: int, shift: np.ndarray | None,
    ) -> None:
        self.idx, self.atlas, self.k, self.where, self.shift = idx, atlas, k, where, shift
        self.min_confidence, self.weighting, self.max_votes = min_confidence, weighting, max_votes_per_dataset
        self.keep_neighbors = keep_neighbors
        self.stat_k = atlas.far_k or k  # the similarity statistic uses the calibration's k, to be comparable with it
        self.k_search = max(k, self.stat_k)
        self.want_genes = any(h.needs_gene_features for h in atlas.heads.values())
        keys = atlas.keys
        self.pred = {key: np.full(n, -1, dtype=np.int64) for key in keys}
        self.conf = {key: np.zeros(n, dtype=np.float32) for key in keys}
        self.reason = {key: np.zeros(n, dtype=np.int8) for key in keys}
        self.similarity = np.full(n, np.nan, dtype=np.float32)
        self.nearest = np.full(n, np.nan, dtype=np.float32)
        self.neighbors: list[tuple[np.ndarray, ...]] = []
        self.lookup = list(dict.fromkeys([*keys, *([DATASET_COLUMN] if atlas.has_datasets else [])]))
        self.t_embed = self.t_search = self.t_vote = 0.0
        self.n_silent = 0

    def add(self, chunk: Any) -> None:
        """Annotate one chunk of query cells (its ids are row positions in the query)."""
        rows = np.asarray(chunk.ids, dtype=np.int64)
        t0 = time.perf_counter()
        embedder = self.idx.embedder
        if self.want_genes:
            raw, gene_features = embedder.transform_with_features(chunk)
            vectors = l2_normalize(raw)  # as idx.embed(chunk)
        else:
            vectors, gene_features = self.idx.embed(chunk), None
        vectors = apply_shift(vectors, self.shift)
        silent = ~embedder.expressed(chunk)
        self.n_silent += int(silent.sum())
        t1 = time.perf_counter()
        result = self.idx.search(vectors, self.k_search, self.where)
        t2 = time.perf_counter()
        ids, scores = result.ids, result.scores
        valid = ids >= 0
        uniq = np.unique(ids[valid])
        meta = self.idx.cells(uniq, columns=self.lookup)
        pos = np.searchsorted(uniq, np.where(valid, ids, uniq[0] if len(uniq) else 0))

        def codes_of(column: str, categories: pd.Index) -> np.ndarray:
            if not len(uniq):
                return -np.ones_like(ids)
            return np.where(valid, _codes(meta[column], categories)[pos], -1)

        dcodes = codes_of(DATASET_COLUMN, self.atlas.datasets) if self.atlas.has_datasets else None
        self.similarity[rows] = mean_top_similarity(scores, self.stat_k)
        self.nearest[rows] = mean_top_similarity(scores, 1)
        weights = vote_weights(scores[:, : self.k], self.weighting)
        for key in self.atlas.keys:
            self._decide(key, rows, silent, codes_of(key, self.atlas.categories[key]), dcodes, weights, vectors,
                         gene_features)
        if self.keep_neighbors:
            self._keep_neighbors(rows, ids[:, : self.k], scores[:, : self.k], dcodes)
        t3 = time.perf_counter()
        self.t_embed += t1 - t0
        self.t_search += t2 - t1
        self.t_vote += t3 - t2

    def _decide(
        self, key: str, rows: np.ndarray, silent: np.ndarray, codes: np.ndarray, dcodes: np.ndarray | None,
        weights: np.ndarray, vectors: np.ndarray, gene_features: np.ndarray | None,
    ) -> None:
        atlas, k = self.atlas, self.k
        n_labels = len(atlas.categories[key])
        if key in atlas.heads:
            proba = atlas.heads[key].predict_proba(vectors, gene_features)
            v = votes_from_probabilities(_head_probabilities(proba, atlas.head_columns[key], n_labels))
        else:
            v = vote(
                codes[:, :k], weights, n_labels=n_labels, datasets=None if dcodes is None else dcodes[:, :k],
                max_votes_per_dataset=self.max_votes, class_weights=atlas.class_weights[key],
            )
        d = decide(
            v, self.similarity[rows], min_confidence=self.min_confidence, far_threshold=atlas.far_threshold,
            nearest_similarity=self.nearest[rows], far_nearest_threshold=atlas.far_nearest,
        )
        self.pred[key][rows] = np.where(silent, -1, d.code)
        self.conf[key][rows] = np.where(silent, 0.0, v.confidence)
        self.reason[key][rows] = np.select(
            [silent, d.reason == REASON_LOW_CONFIDENCE, d.reason == REASON_FAR],
            [REASONS.index(REASON_NO_EXPRESSION), REASONS.index(REASON_LOW_CONFIDENCE), REASONS.index(REASON_FAR)],
            0,
        ).astype(np.int8)

    def _keep_neighbors(
        self, rows: np.ndarray, top_ids: np.ndarray, top_scores: np.ndarray, dcodes: np.ndarray | None
    ) -> None:
        m = top_ids >= 0
        r_idx, c_idx = np.nonzero(m)
        datasets = dcodes[:, : self.k][m] if dcodes is not None else np.full(int(m.sum()), -1)
        self.neighbors.append(
            (rows[r_idx].astype(np.int64), top_ids[m], c_idx.astype(np.int16), top_scores[m].astype(np.float32),
             datasets.astype(np.int32))
        )

    def predictions(self, obs_names: pd.Index) -> pd.DataFrame:
        """The predictions table (see :class:`AnnotationResult`)."""
        predictions = pd.DataFrame(index=obs_names)
        for key in self.atlas.keys:
            cats = [*self.atlas.categories[key], *([UNKNOWN] if UNKNOWN not in set(self.atlas.categories[key]) else [])]
            unk = cats.index(UNKNOWN)
            predictions[f"{key}_pred"] = pd.Categorical.from_codes(
                np.where(self.pred[key] >= 0, self.pred[key], unk), categories=cats
            )
            predictions[f"{key}_confidence"] = self.conf[key]
            predictions[f"{key}_unknown_reason"] = pd.Categorical.from_codes(
                self.reason[key].astype(np.int64), categories=list(REASONS)
            )
        predictions[SIMILARITY_COLUMN] = self.similarity
        predictions[NEAREST_COLUMN] = self.nearest
        return predictions


def _head_probabilities(proba: np.ndarray, columns: np.ndarray, n_labels: int) -> np.ndarray:
    """A head's class probabilities moved onto the annotation's label codes; classes outside them (a ``where``
    filter that leaves some labels out) are dropped and the rest renormalised."""
    out = np.zeros((len(proba), n_labels), dtype=np.float64)
    keep = columns >= 0
    out[:, columns[keep]] = proba[:, keep]
    total = out.sum(axis=1, keepdims=True)
    np.divide(out, total, out=out, where=total > 0)
    return out


def _neighbors_frame(
    parts: list[tuple[np.ndarray, ...]], obs_names: pd.Index, datasets: pd.Index
) -> pd.DataFrame:
    if parts:
        q, a, r, s, d = (np.concatenate(x) for x in zip(*parts, strict=True))
    else:
        q = a = np.zeros(0, dtype=np.int64)
        r, s, d = np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int32)
    return pd.DataFrame(
        {
            "query_row": q,
            "query_cell": pd.Categorical.from_codes(q, categories=pd.Index(obs_names).unique())
            if obs_names.is_unique
            else np.asarray(obs_names)[q],
            "atlas_cell_id": a,
            "rank": r,
            "similarity": s,
            "dataset_id": pd.Categorical.from_codes(d, categories=list(datasets))
            if len(datasets)
            else pd.Categorical([None] * len(d)),
        }
    )


def _report(
    *,
    source: Any,
    query: Any,
    idx: AtlasIndex,
    match: Any,
    keys: list[str],
    predictions: pd.DataFrame,
    categories: dict[str, pd.Index],
    truth: dict[str, pd.Series],
    truth_map: dict[str, str],
    far_threshold: float | None,
    far_nearest: float | None,
    far_k: int | None,
    far_used: float | None,
    alignment: Alignment | None,
    params: dict[str, Any],
    timings: dict[str, Any],
) -> dict[str, Any]:
    n = len(predictions)
    m = idx.manifest
    labels: dict[str, Any] = {}
    for key in keys:
        p = predictions[f"{key}_pred"]
        counts = p.value_counts()
        reasons = predictions[f"{key}_unknown_reason"].value_counts()
        labels[key] = {
            "n_atlas_labels": len(categories[key]),
            "n_predicted_labels": int((counts[counts.index != UNKNOWN] > 0).sum()),
            "counts": {str(lbl): int(c) for lbl, c in counts.items() if c > 0},
            "unknown_rate": round(float((p == UNKNOWN).mean()), 4),
            "unknown_reasons": {str(r): int(c) for r, c in reasons.items() if r != REASON_NONE and c > 0},
            "mean_confidence": round(float(predictions[f"{key}_confidence"].mean()), 4),
        }
    evaluation = {
        key: {
            "truth_column": truth_map[key],
            **evaluate_labels(
                truth[key].to_numpy(), predictions[f"{key}_pred"].to_numpy(), set(categories[key])
            ),
        }
        for key in truth
    }
    sim = predictions[SIMILARITY_COLUMN].to_numpy(dtype=np.float64)
    return {
        "query": {
            "source": str(query) if not isinstance(query, anndata.AnnData) else "<AnnData in memory>",
            "n_cells": n,
            "n_genes": len(source.genes),
            "expression": source.expression.describe(),
            "x_kind": source.expression.x_kind,
        },
        "index": {
            "path": str(idx.path),
            "manifest_sha256": idx.build_id,
            "n_cells": m.n_cells,
            "embedder": {
                "name": m.embedder.name,
                "fingerprint": m.embedder.fingerprint,
                "dim": m.embedder.dim,
            },
            "atlas": {
                "n_cells": m.atlas_snapshot.get("n_cells"),
                "gene_vocabulary": m.atlas_snapshot.get("gene_vocabulary"),
                "datasets": [d.get("dataset_id") for d in m.atlas_snapshot.get("datasets", [])],
            },
            "factory": m.factory,
        },
        "params": params,
        "gene_overlap": match.summary() if match is not None else None,
        "alignment": alignment.summary() if alignment is not None else None,
        "far_from_atlas": {
            "statistic": f"mean similarity of the {far_k or params['k']} nearest atlas cells, and similarity "
            "of the nearest one (far = both below their thresholds)",
            "threshold": far_threshold,
            "nearest_threshold": far_nearest,
            "quantile": far_used if far_threshold is not None else None,
            "query_similarity_quantiles": {
                str(q): round(float(np.nanquantile(sim, q)), 4) for q in (0.01, 0.05, 0.5)
            }
            if np.isfinite(sim).any()
            else {},
        },
        "labels": labels,
        "evaluation": evaluation,
        "timings": timings,
    }
