"""Label transfer: stream a query through the index's embedder, search the atlas, answer each label key.

Search and deciding are kept apart (as in cellxgene-census' ``find_nearest_obs`` / ``predict_obs_metadata``):
:mod:`query.transfer` streams the query and gathers class probabilities (label heads, or the neighbours' vote);
:mod:`query.fallback` answers (a class, a Cell Ontology ancestor, or ``unknown``); :mod:`query.mapping` judges
whether the query maps onto the atlas at all; :mod:`query.annotate_report` reports and evaluates;
:mod:`query.outputs` writes files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import anndata
import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import MIN_GENE_OVERLAP
from scatlas.atlas.ontology_map import ontology_table, term_column
from scatlas.atlas.outputs import check_distinct
from scatlas.atlas.validate import escaped_list
from scatlas.index import (
    ALIGN_MIN_SAMPLE,
    ALIGN_SAMPLE,
    DEFAULT_K,
    Alignment,
    AtlasIndex,
    LabelHead,
    Progress,
    ReferenceMap,
    estimate_shift,
    l2_normalize,
    mapping_calibration,
    progress_bar,
    refit_for_genes,
    sample_sorted,
)
from scatlas.query.annotate_report import (
    evaluate,
    far_summary,
    index_summary,
    label_summary,
    query_summary,
    read_truth,
)
from scatlas.query.atlas_labels import FAR_QUANTILE_WHEN_ON, AtlasLabels, atlas_labels
from scatlas.query.evaluate import confusion_table
from scatlas.query.expression_match import ExpressionMatch, expression_match
from scatlas.query.gene_set_cache import cached, key_of
from scatlas.query.mapping import MappingVerdict, assess_mapping, with_expression
from scatlas.query.outputs import (
    MapPlacement,
    plot_annotation_map,
    plot_confusion,
    published_together,
    write_annotated_h5ad,
    write_json,
    write_parquet,
)
from scatlas.query.prepare import QueryCells, open_query
from scatlas.query.search import no_expression_error, searchable_k
from scatlas.query.transfer import REASON_OUT_OF_ATLAS, Transfer
from scatlas.query.vote import REASON_NO_EXPRESSION, Weighting

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALIGN", "DEFAULT_ALIGN_SAMPLE", "DEFAULT_BATCH_SIZE", "DEFAULT_CLASS_BALANCE", "DEFAULT_FAR_QUANTILE",
    "DEFAULT_K", "DEFAULT_MIN_CONFIDENCE", "DEFAULT_MISSING_GENES", "DEFAULT_PREDICTOR", "DEFAULT_WEIGHTING",
    "FAR_QUANTILE_WHEN_ON", "MAP_OBSM", "MIN_CONFIDENCE_FLAT", "MIN_CONFIDENCE_ONTOLOGY", "MIN_GENE_OVERLAP_REFIT",
    "REFIT_BELOW",
    "AnnotationResult", "annotate",
]

Align = Literal["none", "mnn"]
Predictor = Literal["auto", "heads", "knn"]
PREDICTORS: tuple[str, ...] = ("auto", "heads", "knn")
MissingGenes = Literal["refit", "impute"]
MISSING_GENES: tuple[str, ...] = ("refit", "impute")
DEFAULT_MISSING_GENES: MissingGenes = "refit"

REFIT_BELOW = 0.98
"""``missing_genes="refit"`` refits the label heads only when the query has under this share of the embedder's
genes; above it, the few missing genes read as their atlas means (``"impute"``): refitting a nearly complete gene set
gained nothing on the bench pairs and cost seconds to a minute (docs/benchmarks.md#annotate-defaults)."""

MIN_GENE_OVERLAP_REFIT = 0.15
"""Default gene-overlap floor when label heads refitted for the query's genes decide every label (see
docs/benchmarks.md#annotate-gene-overlap)."""

DEFAULT_MIN_CONFIDENCE: float | None = None
"""None: per label key, :data:`MIN_CONFIDENCE_ONTOLOGY` where at least half of its classes have Cell Ontology terms
(an unsure class can fall back to an ancestor), else :data:`MIN_CONFIDENCE_FLAT`."""
MIN_CONFIDENCE_ONTOLOGY = 0.5
"""The cut with ancestor answers: chosen by scripts/bench_fallback.py's rule (docs/benchmarks.md)."""
MIN_CONFIDENCE_FLAT = 0.3
"""The cut for labels without terms (unsure means unknown): chosen by scripts/bench_annotate.py --tune
(docs/benchmarks.md#annotate-defaults)."""
DEFAULT_WEIGHTING: Weighting = "adaptive"
DEFAULT_FAR_QUANTILE: float | None = None
DEFAULT_CLASS_BALANCE = 0.5
DEFAULT_ALIGN: Align = "mnn"
DEFAULT_ALIGN_SAMPLE = ALIGN_SAMPLE
DEFAULT_BATCH_SIZE = 10_000
DEFAULT_PREDICTOR: Predictor = "auto"
MAP_OBSM = "X_atlas_umap"
"""The ``obsm`` key of the query cells' coordinates on the atlas' reference map in the annotated ``.h5ad``."""


@dataclass
class AnnotationResult:
    """Answers for every query cell, the neighbours they came from, and a report.

    ``predictions``: indexed like the query's obs; per label key K: ``K_pred`` (the answer: an atlas class, a
    Cell Ontology name at the ``ancestor`` level, or ``"unknown"``), ``K_pred_ontology_term_id`` (``CL:...``, ""
    when the answer has no term), ``K_pred_fine`` (the best class before any fallback or abstention),
    ``K_confidence`` (the answer's probability), ``K_level`` (``fine``, ``ancestor`` or ``unknown``),
    ``K_unknown_reason`` (``""``, ``low_confidence``, ``far_from_atlas``, ``out_of_atlas``, ``no_expression`` or
    ``no_labelled_neighbours``),
    ``K_runner_up`` and ``K_runner_up_proba``, ``K_mapping_score`` (the percentile of the cell's similarity to the
    atlas among atlas cells held out as new data; NaN where the index has no mapping calibration); plus
    ``atlas_similarity`` (mean similarity of the cell's calibration-k nearest atlas cells) and
    ``atlas_nearest_similarity``, and ``atlas_expression_match`` where the expression match ran
    (:mod:`query.expression_match`). ``probabilities``: per key, (class names, ``(n_cells, n_classes)`` float32).
    ``neighbors``: one row per (query cell, neighbour) kept, none for cells without expression (``query_row``,
    ``query_cell``, ``atlas_cell_id`` =
    soma_joinid, ``rank`` from 0, ``similarity``, ``dataset_id``). ``report``: JSON-serialisable summary (species,
    gene overlap, mapping verdict, label counts and levels, index identity, timings, and ``evaluation`` when a
    truth column was given). ``placement``: the query cells on the index's reference map (None when the index has
    none; see :meth:`AtlasIndex.reference_map`).
    """

    predictions: pd.DataFrame
    neighbors: pd.DataFrame
    report: dict[str, Any]
    _query: str | Path | anndata.AnnData = field(repr=False)
    probabilities: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict, repr=False)
    _truth: dict[str, pd.Series] = field(default_factory=dict, repr=False)
    placement: MapPlacement | None = field(default=None, repr=False)

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
        map_png: str | Path | None = None,
    ) -> dict[str, Path]:
        """Write the outputs that are given a path, each to a temporary file, all renamed into place once every one
        is written (:func:`~query.outputs.published_together`): an interrupted or failed write leaves the paths as
        they were.

        ``out_h5ad``: a new ``.h5ad`` = the query with the prediction columns added to obs, each key's class
        probabilities in ``obsm["K_proba"]`` and their class names in ``uns["K_proba_classes"]``, and the cells'
        place on the atlas' reference map in ``obsm["X_atlas_umap"]`` when the index has one (the query itself is
        never modified). ``confusion_png`` needs truth labels (``truth_key``); ``map_png`` (the query on the atlas
        map, coloured by the first label key's prediction and confidence) a reference map.
        """
        if confusion_png is not None and not self._truth:
            raise InputError("a confusion matrix needs truth labels: annotate with truth_key=...")
        if map_png is not None and self.placement is None:
            raise InputError("the index has no reference map (built with --no-map, or before maps existed): "
                             "rebuild it (`scatlas build --overwrite ...`) to draw the query on the atlas")
        check_distinct([out_h5ad, neighbors_parquet, report_json, confusion_png, map_png])
        with published_together():
            return self._write(out_h5ad, neighbors_parquet, report_json, confusion_png, map_png)

    def _write(
        self, out_h5ad: str | Path | None, neighbors_parquet: str | Path | None, report_json: str | Path | None,
        confusion_png: str | Path | None, map_png: str | Path | None,
    ) -> dict[str, Path]:
        inputs = () if isinstance(self._query, anndata.AnnData) else (Path(self._query),)
        written: dict[str, Path] = {}
        if out_h5ad is not None:
            obsm = {f"{key}_proba": matrix for key, (_, matrix) in self.probabilities.items()}
            uns = {f"{key}_proba_classes": list(names) for key, (names, _) in self.probabilities.items()}
            if self.placement is not None:
                obsm[MAP_OBSM] = self.placement.query_xy
            written["h5ad"] = write_annotated_h5ad(self._query, self.predictions, out_h5ad, obsm=obsm, uns=uns)
        if neighbors_parquet is not None:
            written["neighbors"] = write_parquet(self.neighbors, neighbors_parquet, inputs=inputs)
        if report_json is not None:
            written["report"] = write_json(self.report, report_json, inputs=inputs)
        if confusion_png is not None:
            key = next(iter(self._truth))
            plotted = plot_confusion(self.confusion(key), confusion_png, title=f"{key}: truth vs predicted",
                                     inputs=inputs)
            if plotted is not None:
                written["confusion"] = plotted
        if map_png is not None and self.placement is not None:
            key = self.report["params"]["label_keys"][0]
            written["map"] = plot_annotation_map(
                self.placement, self.predictions[f"{key}_pred"], self.predictions[f"{key}_confidence"].to_numpy(),
                map_png, key=key, inputs=inputs,
            )
        return written


# -- helpers -------------------------------------------------------------------------------------------------


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
    min_confidence: float | None,
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
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise InputError(f"min_confidence must be between 0 and 1 (got {min_confidence})")
    if max_votes_per_dataset is not None and int(max_votes_per_dataset) < 1:
        raise InputError(
            f"max_votes_per_dataset must be at least 1 (got {max_votes_per_dataset}); None = no cap"
        )
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1 (got {batch_size})")
    if far_quantile is not None and not 0.0 < float(far_quantile) < 1.0:
        raise InputError(f"the far-from-atlas quantile must be above 0 and below 1 (got {far_quantile}); leave it "
                         "unset to turn the far-from-atlas rule off")
    if align not in ("none", "mnn"):
        raise InputError(f"align must be 'none' or 'mnn' (got {align!r})")
    if not float(class_balance) >= 0:
        raise InputError(f"class_balance must be >= 0 (got {class_balance})")
    if predictor not in PREDICTORS:
        raise InputError(f"predictor must be one of {', '.join(PREDICTORS)} (got {predictor!r})")
    if missing_genes not in MISSING_GENES:
        raise InputError(f"missing_genes must be one of {', '.join(MISSING_GENES)} (got {missing_genes!r})")
    if int(align_sample) < ALIGN_MIN_SAMPLE:
        raise InputError(f"align_sample must be at least {ALIGN_MIN_SAMPLE}, the fewest cells a shift is estimated "
                         f"from (got {align_sample})")


# -- the function --------------------------------------------------------------------------------------------


def annotate(
    query: str | Path | anndata.AnnData,
    index: str | Path | AtlasIndex,
    *,
    label_keys: Sequence[str] | str = ("cell_type",),
    k: int = DEFAULT_K,
    where: str | None = None,
    min_confidence: float | None = DEFAULT_MIN_CONFIDENCE,
    max_votes_per_dataset: int | None = None,
    truth_key: str | Mapping[str, str] | None = None,
    ontology_map: str | Path | Mapping[str, str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    min_gene_overlap: float | None = None,
    weighting: Weighting = DEFAULT_WEIGHTING,
    class_balance: float = DEFAULT_CLASS_BALANCE,
    align: Align = DEFAULT_ALIGN,
    align_sample: int = DEFAULT_ALIGN_SAMPLE,
    far_quantile: float | None = DEFAULT_FAR_QUANTILE,
    check_mapping: bool = True,
    allow_species_mismatch: bool = False,
    keep_neighbors: bool = True,
    predictor: Predictor = DEFAULT_PREDICTOR,
    missing_genes: MissingGenes = DEFAULT_MISSING_GENES,
    progress: Progress = True,
    x_layer: str | None = None,
) -> AnnotationResult:
    """Transfer atlas labels to the cells of ``query``: each label from the index's label heads or a vote of the
    cell's nearest atlas cells; a Cell Ontology ancestor where the fine call is unsure but a coarser one is not;
    ``"unknown"`` where neither is confident or the cell does not map onto the atlas.

    query: an ``.h5ad`` path (read in chunks) or an AnnData; never modified. Its genes must look like the index's
        species (SpeciesMismatchError otherwise, unless ``allow_species_mismatch``). ``x_layer``: its matrix to
        read (``X``, ``raw`` or a layer's name; default: raw counts wherever they are, else log-normalised values).
    index: an index directory or an opened :class:`~index.AtlasIndex`.
    label_keys: columns of the index's cell table to transfer, each on its own.
    k: neighbours that vote per cell. where: an SQL predicate restricting the atlas cells searched.
    min_confidence: the probability (heads) or vote share an answer needs, fine or ancestor (``low_confidence``);
        None: :data:`MIN_CONFIDENCE_ONTOLOGY` for label keys with Cell Ontology terms, else
        :data:`MIN_CONFIDENCE_FLAT`.
    max_votes_per_dataset: at most this many of a cell's voters from one atlas dataset (None: no cap).
    truth_key: a query obs column of known labels (for ``label_keys[0]``), or ``{label_key: column}``; adds
        ``report["evaluation"]``. ontology_map: the truth labels' CL terms (a ``label,ontology_term_id`` CSV or a
        dict) where neither the query nor the atlas gives them.
    batch_size: query cells embedded and searched at a time (bounds memory).
    min_gene_overlap: refuse a query with a smaller fraction of the embedder's genes (None:
        :data:`MIN_GENE_OVERLAP_REFIT` when refitted heads decide every label, else
        :data:`atlas.genes.MIN_GENE_OVERLAP`).
    weighting: vote weights from similarities (:mod:`query.vote`). class_balance: each vote is divided by its
        label's atlas cell count to this power (0: plain votes, 1: fully balanced).
    align: ``"mnn"`` shifts the query onto the atlas first (:func:`index.estimate_shift`, estimated on
        ``align_sample`` cells, at least :data:`index.ALIGN_MIN_SAMPLE`; a query of fewer cells is searched as
        embedded and the report's ``alignment.skipped`` says why); ``"none"`` searches with the vectors as embedded.
    far_quantile: a cell whose mean top-k and nearest similarities are both below this quantile of the atlas'
        own is unknown (``far_from_atlas``); None: off.
    check_mapping: judge how the query maps onto the atlas (:mod:`query.mapping`) and call the cells of a query
        that maps poorly ``unknown`` (``out_of_atlas``) unless they map well on their own; False: report only.
    keep_neighbors: keep the neighbours table (``n_cells x k`` rows).
    predictor: ``"heads"`` (the index's label heads), ``"knn"`` (the vote) or ``"auto"`` (heads where they exist).
    missing_genes: for a query lacking some of the embedder's genes, ``"refit"`` the heads on the genes it has (when
        it has under :data:`REFIT_BELOW` of them; above, as ``"impute"``), or ``"impute"`` (each missing gene reads
        as its atlas mean).
    progress: a progress bar (:data:`index.progress.Progress`).

    How the defaults were chosen: docs/benchmarks.md#annotate-defaults. Raises InputError (empty query, unknown
    column, invalid parameter, a ``where`` matching no atlas cell), SpeciesMismatchError and GeneOverlapError.
    """
    t_start = time.perf_counter()
    keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    _validate(keys, label_keys, k=k, min_confidence=min_confidence, max_votes_per_dataset=max_votes_per_dataset,
              batch_size=batch_size, far_quantile=far_quantile, align=align, class_balance=class_balance,
              predictor=predictor, missing_genes=missing_genes, align_sample=align_sample)
    truth_map = _normalise_truth(truth_key, keys)
    user_map = None if ontology_map is None else ontology_table(ontology_map)
    own_index = not isinstance(index, AtlasIndex)
    idx = AtlasIndex.open(index) if not isinstance(index, AtlasIndex) else index
    cells: QueryCells | None = None
    try:
        atlas = atlas_labels(idx, keys, where, far_quantile, class_balance, predictor, max_votes_per_dataset)
        t_open = time.perf_counter() - t_start
        cells = open_query(query, idx, allow_species_mismatch=allow_species_mismatch, x_layer=x_layer)
        _check_truth_columns(cells, truth_map)
        if min_gene_overlap is None:
            min_gene_overlap = _default_min_overlap(cells, keys, atlas.heads, missing_genes)
        cells.check(min_gene_overlap)
        heads_refit = _refit_heads(idx, cells, atlas, missing_genes)
        alignment, t_align = _align(cells, align, align_sample, batch_size, where)
        placing = _PlacingIndex(idx, idx.reference_map(), cells.n_cells)
        k_used = searchable_k(k, atlas.n_where if atlas.n_where is not None else idx.n_cells,
                              cells.n_cells if keep_neighbors else None)
        run = Transfer(cast(AtlasIndex, placing), atlas, k=k_used, weighting=weighting,
                       max_votes_per_dataset=max_votes_per_dataset, where=where, keep_neighbors=keep_neighbors,
                       n=cells.n_cells, shift=alignment.shift if alignment is not None and alignment.applied else None)
        expression = _expression_check(idx, atlas, cells)
        if isinstance(expression, ExpressionMatch):
            run.expression = expression
        with progress_bar(progress, total=cells.n_cells, desc="annotate", unit="cell") as bar:
            for chunk in cells.chunks(batch_size):
                placing.rows = np.asarray(chunk.ids, dtype=np.int64)
                run.add(chunk)
                bar.update(len(chunk.ids))
        if run.n_silent == cells.n_cells:
            raise no_expression_error(cells.n_cells)
        run.similarity[run.silent] = np.nan  # a cell without expression has no place relative to the atlas
        run.nearest[run.silent] = np.nan
        if run.n_silent:
            logger.warning(
                "%d of %d query cells have no expression on the index embedder's genes: they are 'unknown' "
                "(reason %r)", run.n_silent, cells.n_cells, REASON_NO_EXPRESSION,
            )
        mapping = _mapping(idx, run, alignment, check_mapping, expression)
        _warn_blind_mapping(cells, mapping.verdict)
        params = {
            "label_keys": keys, "k": int(k), "k_used": k_used, "where": where, "atlas_cells_matching_where": atlas.n_where,
            "min_confidence": _cuts(atlas, min_confidence), "max_votes_per_dataset": max_votes_per_dataset,
            "weighting": weighting, "class_balance": float(class_balance), "align": align,
            "far_quantile": far_quantile, "check_mapping": bool(check_mapping), "predictor": predictor,
            "predicted_by": {key: ("heads" if key in atlas.heads else "knn") for key in keys},
            "missing_genes": missing_genes, "heads_refit_for_query_genes": heads_refit,
            "batch_size": int(batch_size), "min_gene_overlap": float(min_gene_overlap),
        }
        timings = {"open_index_s": round(t_open, 3), "align_s": round(t_align, 3), "map_s": round(placing.seconds, 3)}
        result = _result(query, cells, atlas, run, alignment, mapping, truth_map, user_map, params, timings, t_start)
        for key in keys:
            result.report["labels"][key]["predicted_by_reason"] = _vote_reason(key, atlas, predictor,
                                                                               max_votes_per_dataset)
        result.placement = placing.placement(run.silent, keys[0])
        result.report["map"] = result.placement.summary() if result.placement is not None else {"available": False}
        return result
    finally:
        if cells is not None:
            cells.close()
        if own_index:
            idx.close()


VOTE_REASONS = {
    "knn_asked": "predictor 'knn' asked for",
    "max_votes_per_dataset": "max_votes_per_dataset caps the neighbours' vote, which label heads do not use",
    "no_label_head": "the index has no label head for it",
}
"""Why a label key is decided by the neighbours' vote, not a label head (``report["labels"][key]
["predicted_by_reason"]``)."""


def _vote_reason(key: str, atlas: AtlasLabels, predictor: str, max_votes_per_dataset: int | None) -> str | None:
    """The key of :data:`VOTE_REASONS` saying why ``key`` is decided by the vote; None when a head decides it."""
    if key in atlas.heads:
        return None
    if predictor == "knn":
        return "knn_asked"
    if max_votes_per_dataset is not None:
        return "max_votes_per_dataset"
    return "no_label_head"


class _PlacingIndex:
    """The index as :class:`Transfer` sees it, placing on the reference map each batch of query vectors it searches
    with (the embedded and shifted vectors) before searching; ``rows``: the query rows of the batch being added.
    Everything else is the index's own."""

    def __init__(self, idx: AtlasIndex, refmap: ReferenceMap | None, n: int) -> None:
        self._idx, self._map = idx, refmap
        self.rows: np.ndarray | None = None
        self.xy = np.full((n, 2), np.nan, dtype=np.float32) if refmap is not None else None
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._idx, name)

    def search(self, vectors: np.ndarray, k: int | None = None, where: str | None = None, **kwargs: Any) -> Any:
        if self.xy is not None and self._map is not None and self.rows is not None:
            t0 = time.perf_counter()
            self.xy[self.rows] = self._map.transform(vectors)
            self.seconds += time.perf_counter() - t0
        self.rows = None
        return self._idx.search(vectors, k, where, **kwargs)

    def placement(self, silent: np.ndarray, key: str) -> MapPlacement | None:
        """The query on the map (cells with no expression on the embedder's genes not placed), the atlas sample
        with its values of ``key`` when the cells table has it."""
        if self._map is None or self.xy is None:
            return None
        self.xy[np.asarray(silent, dtype=bool)] = np.nan
        labels = None
        if key in self._idx.columns():
            labels = self._idx.cells(self._map.ids, columns=[key])[key].to_numpy()
        return MapPlacement(self.xy, self._map.coords, labels, key)


def _cuts(atlas: AtlasLabels, min_confidence: float | None) -> dict[str, float]:
    """The confidence cut of each label key (see :data:`DEFAULT_MIN_CONFIDENCE`)."""
    if min_confidence is not None:
        return {key: float(min_confidence) for key in atlas.keys}
    def mostly_with_terms(terms: tuple[str, ...]) -> bool:  # else most unsure calls have nothing to fall back to
        return bool(terms) and 2 * sum(1 for t in terms if t) >= len(terms)

    return {
        key: MIN_CONFIDENCE_ONTOLOGY if mostly_with_terms(atlas.ontology[key].class_terms) else MIN_CONFIDENCE_FLAT
        for key in atlas.keys
    }


def _check_truth_columns(cells: QueryCells, truth_map: dict[str, str]) -> None:
    missing = [c for c in truth_map.values() if c not in cells.source.obs.columns]
    if missing:
        raise InputError(
            f"truth column(s) {escaped_list(missing, 10)} are not in the query's obs; "
            f"obs has: {escaped_list(cells.source.obs.columns)}"
        )


@dataclass(frozen=True)
class _Mapping:
    """The mapping verdict, the per-cell scores (None without a calibration) and the cells out of the atlas."""

    verdict: MappingVerdict
    scores: np.ndarray | None
    out_of_atlas: np.ndarray
    applied: bool


def _expression_check(idx: AtlasIndex, atlas: AtlasLabels, cells: QueryCells) -> ExpressionMatch | dict[str, Any]:
    """The per-cell expression match (:mod:`query.expression_match`) for this query, or the record of why it is off
    (with the mapping check off it is measured and reported, not applied)."""
    present = cells.match.target_present() if cells.match is not None else None
    if cells.embedder.gene_feature_names is None:
        present = None
    check, reused = cached(key_of("expression", idx, atlas.heads, present),
                           lambda: expression_match(idx, atlas.heads, present))
    if isinstance(check, ExpressionMatch):
        logger.info("expression match: cut %.3f from %d held-out datasets%s", check.cut, check.record["n_groups"],
                    " (reused from an earlier query with the same genes)" if reused else "")
    else:
        logger.info("expression match off: %s", check["reason"])
    return check


def _mapping(idx: AtlasIndex, run: Transfer, alignment: Alignment | None, apply: bool,
             expression: ExpressionMatch | dict[str, Any]) -> _Mapping:
    """Judge how the query maps onto the atlas (:func:`query.mapping.assess_mapping`, with the cells whose
    expression matches no atlas cell type, :mod:`query.expression_match`); warn when poorly."""
    calibration = mapping_calibration(idx)  # as read when the index was opened, from the version opened
    aligned = alignment is not None and alignment.applied
    used = ~run.silent  # cells without expression on the embedder's genes have no say in the verdict
    scores = None
    if calibration is not None:
        scores = np.full(len(run.similarity), np.nan)
        scores[used] = calibration.cell_scores(run.similarity[used], aligned=aligned)
    shift = float(np.linalg.norm(alignment.shift)) if alignment is not None and aligned else None
    verdict = assess_mapping(scores[used] if scores is not None else np.zeros(0), shift, calibration)
    unlike = np.zeros(len(run.similarity), bool)
    if isinstance(expression, ExpressionMatch):
        unlike = used & expression.below(run.expression_match, run.expression_depth)
        verdict = with_expression(verdict, unlike[used], expression.record)
        if verdict.strict_expression:  # another tissue: a cell keeps its label only if it matches well on its own
            unlike = used & expression.below(run.expression_match, run.expression_depth, strict=True)
        verdict = replace(verdict, expression={  # the cut that decided the cells, and how many it made unknown
            **verdict.expression, "cuts_applied": "strict" if verdict.strict_expression else "usual",
            "cells_out": int(unlike.sum())})
    else:
        verdict = with_expression(verdict, None, expression)
    out = np.zeros(len(run.similarity), bool)
    if scores is not None and apply:
        out[used] = verdict.out_of_atlas(scores[used])
    if apply:
        out |= unlike
    if verdict.verdict == "maps_poorly":
        logger.warning(
            "the query maps poorly onto the atlas (another tissue or a cell type the atlas lacks?): %s; %s",
            "; ".join(verdict.reasons) + (f" ({verdict.note})" if verdict.by_expression and verdict.note else ""),
            f"{int(out.sum())} of {len(out)} cells are 'unknown' ({REASON_OUT_OF_ATLAS})" if apply
            else "cells are labelled anyway (mapping check off)",
        )
    elif verdict.verdict == "uncalibrated":
        logger.info("the index has no mapping calibration: rebuild it to judge whether queries map onto the atlas")
    return _Mapping(verdict, scores, out, apply)


MAPPING_MIN_OVERLAP = 0.5
"""Below this share of the embedder's genes the mapping check is weak: the missing genes read as the atlas mean pull
every query cell towards the atlas (docs/benchmarks.md#query-mapping-check)."""


def _warn_blind_mapping(cells: QueryCells, verdict: MappingVerdict) -> None:
    """Warn when a query that shares fewer genes than annotate asks for by default (the floor was lowered) is
    judged to map well: with so few genes the check cannot tell another tissue (docs/benchmarks.md#query-mapping-check)."""
    overlap = cells.match.fraction_of_target if cells.match is not None else 1.0
    if verdict.verdict == "maps_well" and overlap < MIN_GENE_OVERLAP_REFIT:
        logger.warning(
            "the query has %.0f%% of the embedder's genes, under the %.0f%% annotate asks for by default: its "
            "'maps well' means little (a query of another tissue looks the same with so few genes); check the "
            "answers against known markers before trusting them", 100 * overlap, 100 * MIN_GENE_OVERLAP_REFIT,
        )


WEAK_EXPRESSION_CUT = 0.3
"""An expression-match cut under this is a weak check: cells of a tissue the atlas lacks correlate 0.35-0.46 (medians)
with its types' profiles through the genes every cell expresses (blood cells against a pancreas atlas' profiles,
pancreatic cells against a blood atlas'; measured ad hoc on the shared files), so under 0.3 most of them pass. An
atlas whose own datasets match each other's profiles that weakly (e.g. a few types from labs of different
technologies: the shared pancreas file's atlas has cuts of 0.12-0.13) cannot tell another tissue from another lab."""


def _mapping_caveat(cells: QueryCells, expression: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The caveats of a mapping verdict: a query with few of the embedder's genes, an atlas whose expression match
    is weak (:data:`WEAK_EXPRESSION_CUT`)."""
    said = []
    overlap = cells.match.fraction_of_target if cells.match is not None else 1.0
    if overlap < MAPPING_MIN_OVERLAP:
        said.append(f"the query has {100 * overlap:.0f}% of the embedder's genes: with so few, a query of another "
                    "tissue can still look as if it maps well")
    cut = (expression or {}).get("cut")
    if (expression or {}).get("status") == "on" and isinstance(cut, float) and cut < WEAK_EXPRESSION_CUT:
        said.append(f"the atlas' own datasets match each other's cell-type profiles weakly (the expression cut is "
                    f"{cut:.2f}; cells of another tissue typically correlate 0.35 or more with any profile through "
                    "the genes all cells express), so a query of a tissue the atlas lacks can pass this check: check "
                    "the answers against known markers")
    return {"caveat": "; ".join(said)} if said else {}


def _result(
    query: Any, cells: QueryCells, atlas: AtlasLabels, run: Transfer, alignment: Alignment | None,
    mapping: _Mapping, truth_map: dict[str, str], user_map: Mapping[str, str] | None, params: dict[str, Any],
    timings: dict[str, Any], t_start: float,
) -> AnnotationResult:
    """The annotation's result: predictions, probabilities, neighbours and report (logged in one line)."""
    source, idx, keys, n = cells.source, cells.index, atlas.keys, cells.n_cells
    obs_names = pd.Index(source.obs.index.astype(str), name=source.obs.index.name)
    predictions = run.predictions(
        obs_names, min_confidence=params["min_confidence"], out_of_atlas=mapping.out_of_atlas,
        mapping_score=mapping.scores,
    )
    obs = source.obs.reset_index(drop=True)
    if user_map and not truth_map:
        logger.warning("the ontology map gives terms to the truth labels, and no truth column was given: it is not "
                       "used (pass truth_key too)")
    elif user_map:
        present = {str(v) for col in truth_map.values() for v in pd.unique(obs[col].dropna())}
        unused = [label for label in user_map if label not in present]
        if unused:
            logger.warning("%d of the ontology map's %d labels are not values of the truth column (e.g. %s): they give "
                           "no cell a term; is it the map of another file's labels?", len(unused), len(user_map),
                           escaped_list(unused, 3))
        params = {**params, "ontology_map": {"labels": len(user_map), "unused": len(unused)}}
    truth = {
        key: read_truth(obs[col], atlas.classes[key], user_map=user_map,
                        term_column=obs[term_column(col)].to_numpy() if term_column(col) in obs.columns else None)
        for key, col in truth_map.items()
    }
    evaluation = {
        key: {"truth_column": col, **evaluate(key, truth[key], predictions, atlas)} for key, col in truth_map.items()
    }
    t_total = time.perf_counter() - t_start
    report: dict[str, Any] = {
        "query": query_summary(source, query, n),
        "index": index_summary(idx),
        "params": params,
        "species": getattr(cells, "species", {}),
        "gene_overlap": cells.match.summary() if cells.match is not None else None,
        "query_update": cells.query_update or None,
        "alignment": alignment.summary() if alignment is not None else None,
        "mapping": {**mapping.verdict.to_report(), "applied": mapping.applied,
                    **_mapping_caveat(cells, mapping.verdict.expression),
                    "cells_out_of_atlas": int(mapping.out_of_atlas.sum())},
        "far_from_atlas": far_summary(atlas, run, params["k_used"], predictions),
        "labels": {key: label_summary(predictions, key, atlas) for key in keys},
        "evaluation": evaluation,
        "timings": {
            **timings, "embed_s": round(run.t_embed, 3), "search_s": round(run.t_search, 3),
            "vote_s": round(run.t_vote, 3), "total_s": round(t_total, 3),
            "cells_per_second": round(n / t_total, 1) if t_total > 0 else None,
        },
    }
    summary = ", ".join(
        f"{key}: {report['labels'][key]['n_predicted_labels']} labels, "
        f"{100 * report['labels'][key]['unknown_rate']:.1f}% unknown"
        for key in keys
    )
    logger.info("annotated %d cells in %.1f s (%.0f cells/s); %s", n, t_total, n / max(t_total, 1e-9), summary)
    return AnnotationResult(
        predictions=predictions, neighbors=run.neighbors_frame(obs_names), report=report, _query=query,
        _truth={key: pd.Series(t.classes, dtype=object) for key, t in truth.items()},
        probabilities={key: (list(atlas.categories[key]), run.proba[key]) for key in keys},
    )


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


def _refit_heads(idx: AtlasIndex, cells: QueryCells, atlas: AtlasLabels, missing_genes: str) -> dict[str, Any] | None:
    """Refit ``atlas.heads`` in place for the embedder's genes the query has (``missing_genes="refit"``, some
    missing); the report's record of it, or None."""
    embedder = cells.embedder
    if cells.match is None or embedder.gene_feature_names is None:
        return None
    present = cells.match.target_present()  # which of the embedder's gene features the query has
    if missing_genes != "refit" or not atlas.heads or present.mean() >= REFIT_BELOW:
        return None
    t0 = time.perf_counter()
    heads = atlas.heads
    atlas.heads, reused = cached(
        key_of("refit", idx, heads, present),
        lambda: refit_for_genes(heads, present, lambda g: l2_normalize(embedder.transform_gene_features(g, present))),
    )
    refit = sorted(k for k, h in atlas.heads.items() if "refit_for_genes" in h.record)
    record = {
        "genes_present": int(present.sum()), "genes": int(len(present)), "keys": refit,
        "seconds": round(time.perf_counter() - t0, 2), "reused": reused,
    }
    if refit:
        logger.info(
            "the query has %d of the embedder's %d genes: label heads for %s refitted on the atlas training sample "
            "as the query sees it (%s)", int(present.sum()), len(present), ", ".join(refit),
            "reused from an earlier query with the same genes" if reused else f"{record['seconds']:.1f} s",
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


