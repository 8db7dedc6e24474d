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
from tqdm.auto import tqdm

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import MIN_GENE_OVERLAP, check_overlap
from scatlas.atlas.outputs import check_distinct
from scatlas.atlas.sources import open_h5ad
from scatlas.atlas.sources.base import iter_cell_chunks
from scatlas.index import AtlasIndex
from scatlas.index.label_heads import refit_for_genes
from scatlas.index.manifest import manifest_digest
from scatlas.index.metadata import columns_of, value_counts
from scatlas.index.vectors import l2_normalize
from scatlas.query.align import DEFAULT_SAMPLE as DEFAULT_ALIGN_SAMPLE
from scatlas.query.align import Alignment, apply_shift, estimate_shift
from scatlas.query.evaluate import confusion_table, evaluate_labels
from scatlas.query.outputs import plot_confusion, write_annotated_h5ad, write_json, write_parquet
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
"""Default gene-overlap floor when the label heads decide and are refitted for the query's genes. Measured with
``scripts/bench_annotate.py --gene-dropout`` on three real pairs (random draws of the embedder's genes kept;
docs/benchmarks.md): refitted heads stay level with logistic regression trained on the same genes down to 10%
kept, but macro-F1 falls with the genes for both: about 0.66-0.76 at 20% kept (0.78-0.89 with every gene) and
0.46-0.66 at 10%, where too little is left to tell the types apart; a real partial query (pbmc3k's own 2,000
highly variable genes, 20% of kang's) scored 0.725 against logreg's 0.713."""

DEFAULT_K = 30
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
    values, counts = value_counts(index.connect(), column, ids)
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


def _manifest_id(index: AtlasIndex) -> str | None:
    try:
        return manifest_digest(index.path)
    except OSError:
        return None


def _validate(
    k: int,
    min_confidence: float,
    max_votes_per_dataset: int | None,
    batch_size: int,
    far_quantile: float | None,
) -> None:
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
    progress: bool = True,
) -> AnnotationResult:
    """Transfer atlas labels to query cells by similarity-weighted voting of their nearest atlas cells.

    Parameters
    ----------
    query: an ``.h5ad`` path (read in chunks; raw counts are taken from X, ``layers['counts']`` or ``.raw``
        when present, else log-normalised values) or an in-memory AnnData. Never modified.
    index: an index directory (``build_index``) or an opened :class:`~index.AtlasIndex`.
    label_keys: columns of the index's cell table to transfer, each predicted on its own.
    k: neighbours that vote per query cell.
    where: SQL predicate restricting the atlas cells searched (e.g. ``"tissue = 'blood'"``).
    min_confidence: a cell whose winning label has less than this confidence (the heads' probability or the
        vote's weighted share) is ``"unknown"`` (reason ``low_confidence``). The default 0.3 abstains only on
        calls spread over four or more labels (a winner below 1/3 needs that); see "Defaults" below for why not
        higher. To hunt for types the atlas may lack, raise it (0.5 abstained on 33% of the synthetic pair's
        absent cells, 4% at 0.3) and accept losing known cells: on real pairs no signal tells absent types apart
        (below).
    max_votes_per_dataset: at most this many of a cell's neighbours from any one atlas dataset vote (None: no
        cap).
    truth_key: a query obs column with known labels (for ``label_keys[0]``), or ``{label_key: obs column}``;
        adds accuracy, macro-F1 and per-class precision/recall on cells whose label the atlas has, and the
        abstention rate on cells whose label it lacks, to ``report["evaluation"]``.
    batch_size: query cells embedded and searched at a time (memory is bounded by it, not by the query size).
    min_gene_overlap: refuse the query when fewer than this fraction of the embedder's genes are present.
        None (default): :data:`MIN_GENE_OVERLAP_REFIT` (0.15) when every label column is decided by label heads
        that can be refitted for the query's genes (``missing_genes="refit"``, heads with their training sample),
        else :data:`atlas.genes.MIN_GENE_OVERLAP` (0.5): the neighbour vote has nothing to adapt to the missing
        genes. The value used is in the report's ``params``.
    weighting: vote weights by similarity (see :mod:`query.vote`): ``adaptive``, ``similarity`` or
        ``uniform``.
    class_balance: each vote is divided by (its label's atlas cell count) ** class_balance (0 = plain votes,
        1 = fully balanced), so that rare atlas types are not outvoted by frequent neighbours.
    align: ``"mnn"`` shifts the query as a whole onto the atlas in the embedding space before searching (one
        vector, estimated from mutual nearest neighbours of ``align_sample`` random query cells; see
        :mod:`query.align`); ``"none"`` searches with the vectors as embedded.
    far_quantile: a cell whose mean similarity to its nearest atlas cells *and* whose similarity to its
        nearest atlas cell are both below this quantile of the same statistics among atlas cells themselves
        (the index manifest's calibration) is ``"unknown"`` (reason ``far_from_atlas``). Off (None) by default;
        :data:`FAR_QUANTILE_WHEN_ON` (0.001) is the value to turn it on with. Atlas cells are compared with cells
        of their own batch, so a query from another lab or condition sits lower on both statistics even where its
        types are in the atlas: at 0.001 the rule called 0.9% of the known cells of zheng_sorted_to_kang_ctrl and
        1.8% of zheng_sorted_to_kang_stim far and none of their absent types (DC, megakaryocytes, erythrocytes
        sit next to known types in any embedding of the sorted reference's genes), which cost those pairs 0.008
        and 0.021 macro-F1 (``--tune`` grid, docs/benchmarks.md); it catches some of what no atlas type resembles
        (the synthetic pair: 8.5% of absent cells against 0.9% of known ones; fibroblasts held out of the
        synthetic atlas of tests/test_annotate.py). Requiring the nearest neighbour too spares the cells of types
        with fewer atlas cells than the calibration's k, whose k nearest cannot all be of their type.
    keep_neighbors: keep the neighbours table (``n_cells x k`` rows; turn off for very large queries).
    predictor: what decides the label. ``"heads"``: the index's supervised label heads for that column
        (:mod:`index.label_heads`: the mean class probability of a logistic model on the embedder's gene features
        and one on the MNN-shifted embedding; confidence = the winner's probability); ``"knn"``: the neighbours'
        vote; ``"auto"`` (default): heads for the columns that have them, the vote for the others. With
        ``where``, the heads choose among the labels of the cells it selects. ``k``, ``weighting``,
        ``class_balance`` and ``max_votes_per_dataset`` shape the vote only; the neighbours are searched in
        every mode (far-from-atlas calls, the neighbours table).
    missing_genes: what the label heads do when the query lacks some of the embedder's genes. ``"refit"``
        (default): refit them on their stored training sample as the query sees it (the gene head on the genes it
        has; the embedding head on the sample re-embedded without the others), which costs a fit on that sample
        (bounded by its size, not the atlas); ``"impute"``: use them as trained, reading each missing gene as its
        atlas mean. Over 5 random draws of the genes of three real pairs (``scripts/bench_annotate.py
        --gene-dropout``, docs/benchmarks.md), ``refit`` gained -0.004 to +0.022 macro-F1 on average with 90% of
        the genes kept, +0.008 to +0.032 with 50% and +0.029 to +0.088 with 30%.

    Defaults were chosen by measurement with ``scripts/bench_annotate.py --tune`` (grid and results in
    docs/benchmarks.md) on every bench pair (16 real reference/query pairs and a synthetic atlas with two cell
    types held out of the reference): predictor in {heads, knn} x (for the vote) k in {10, 15, 30, 50} x
    weighting x class_balance in {0, 0.5, 1}, x align in {none, mnn} x min_confidence in {0 .. 0.8} x far_quantile
    in {off, 0.001 .. 0.01}. Declared rule: first the worst margin over the real pairs against logistic regression
    on the same genes (the baseline label transfer has to beat), then the mean open-set macro-F1 (macro-F1 with
    the cells of absent types as one more class, ``unknown``). Until session 5 the rule was the mean over two
    tuning pairs only (kang2018 CTRL -> STIM and the synthetic atlas), which chose ``min_confidence=0.5`` and
    ``far_quantile=0.001`` for the sake of the synthetic absent types; four pairs added afterwards showed what
    that cost on real data: symphony 3'v1 -> 3'v2 0.751 against 0.800 without abstention (logreg 0.792),
    zheng_sorted_to_kang_stim 0.783 against 0.818 (logreg 0.813).

    Raises
    ------
    InputError: empty query, unknown label or truth column, invalid parameters; the index's own error for an
        invalid ``where`` or one matching no atlas cell.
    GeneOverlapError: the query shares too few genes with the index's embedder.
    """
    t_start = time.perf_counter()
    keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    if not keys or any(not isinstance(x, str) or not x for x in keys) or len(set(keys)) != len(keys):
        raise InputError(f"label_keys must be one or more distinct column names (got {label_keys!r})")
    _validate(k, min_confidence, max_votes_per_dataset, batch_size, far_quantile)
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
    truth_map = _normalise_truth(truth_key, keys)

    own_index = not isinstance(index, AtlasIndex)
    idx = AtlasIndex.open(index) if not isinstance(index, AtlasIndex) else index
    source = None
    try:
        available = columns_of(idx.connect())
        missing = [c for c in keys if c not in available]
        if missing:
            raise InputError(
                f"label key(s) {missing} are not columns of the index's cell table; "
                f"available: {', '.join(available)}"
            )
        selected_ids = None if where is None else idx.filter_ids(where)  # the index's error for a bad or empty filter
        n_where = None if selected_ids is None else len(selected_ids)
        far_threshold, far_nearest, far_k, far_used = _far_threshold(idx, far_quantile)
        label_counts = {key: _atlas_label_counts(idx, key, selected_ids) for key in keys}
        categories = {key: pd.Index(c.index, dtype=object) for key, c in label_counts.items()}
        class_weights = {
            key: balance_weights(c.to_numpy(), float(class_balance)) for key, c in label_counts.items()
        }
        for key, cats in categories.items():
            if UNKNOWN in set(cats):
                logger.warning(
                    "the atlas has a %r label %r: it cannot be told apart from abstentions", key, UNKNOWN
                )
            if len(cats) == 0:
                logger.warning(
                    "no atlas cell has a %r label%s: every cell will be unknown",
                    key,
                    f" under where={where!r}" if where else "",
                )
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
        use_heads = {key: heads[key] for key in keys if key in heads}
        head_columns = {  # head class j -> position in categories[key] (-1: not among the labels allowed)
            key: _codes(h.classes, categories[key]) for key, h in use_heads.items()
        }
        for key, cols in head_columns.items():
            if not (cols >= 0).any():
                logger.warning("none of the %r label head's classes is among the atlas labels selected", key)
        has_datasets = DATASET_COLUMN in available
        datasets = pd.Index(
            _atlas_label_counts(idx, DATASET_COLUMN, selected_ids).index if has_datasets else [], dtype=object
        )
        if max_votes_per_dataset is not None and not has_datasets:
            raise InputError(
                f"max_votes_per_dataset needs a {DATASET_COLUMN!r} column in the index's cell table"
            )
        t_open = time.perf_counter() - t_start

        source = open_h5ad(query)
        n = source.n_obs
        if n == 0:
            raise InputError(f"the query {getattr(source, 'name', '')!r} has no cells")
        missing_truth = [c for c in truth_map.values() if c not in source.obs.columns]
        if missing_truth:
            raise InputError(
                f"truth column(s) {missing_truth} are not in the query's obs; "
                f"obs has: {', '.join(map(str, source.obs.columns))}"
            )
        embedder = idx.embedder
        match = embedder.gene_match(source.genes)
        if min_gene_overlap is None:
            refittable = (
                missing_genes == "refit" and embedder.gene_feature_names is not None
                and all(key in use_heads and use_heads[key].can_refit_for_genes for key in keys)
            )
            min_gene_overlap = MIN_GENE_OVERLAP_REFIT if refittable else MIN_GENE_OVERLAP
        if match is not None:
            check_overlap(match, what="query", against="index embedder", min_fraction=min_gene_overlap)
        obsm_keys: tuple[str, ...] = ()
        if embedder.needs == "obsm":
            key_needed = embedder.obsm_key
            if key_needed is None or key_needed not in source.obsm_keys():
                raise InputError(
                    f"the index's embedder reads obsm[{key_needed!r}], which the query lacks "
                    f"(obsm keys: {source.obsm_keys() or 'none'}); compute that embedding for the query first"
                )
            obsm_keys = (key_needed,)

        present: np.ndarray | None = None  # which of the embedder's gene features the query has
        if match is not None and embedder.gene_feature_names is not None:
            present = match.target_present()
        heads_refit: dict[str, Any] | None = None
        if missing_genes == "refit" and use_heads and present is not None and not present.all():
            t0 = time.perf_counter()
            use_heads = refit_for_genes(
                use_heads, present,
                lambda g: l2_normalize(embedder.transform_gene_features(g, present)),
            )
            refit = sorted(k for k, h in use_heads.items() if "refit_for_genes" in h.record)
            heads_refit = {
                "genes_present": int(present.sum()), "genes": int(len(present)), "keys": refit,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if refit:
                logger.info(
                    "the query has %d of the embedder's %d genes: label heads for %s refitted on the atlas "
                    "training sample as the query sees it (%.1f s)",
                    int(present.sum()), len(present), ", ".join(refit), heads_refit["seconds"],
                )

        alignment: Alignment | None = None
        t_align = 0.0
        if align == "mnn":
            t0 = time.perf_counter()
            rng = np.random.default_rng(0)
            rows_s = np.sort(rng.choice(n, size=min(n, int(align_sample)), replace=False))
            sample = np.concatenate(
                [
                    idx.embed(c)
                    for c in iter_cell_chunks(
                        source, chunk_size=int(batch_size), rows=rows_s, obsm_keys=obsm_keys
                    )
                ]
            )
            alignment = estimate_shift(idx, sample, where=where)
            t_align = time.perf_counter() - t0
        shift = alignment.shift if alignment is not None else None
        stat_k = far_k or int(
            k
        )  # the similarity statistic uses the calibration's k, to be comparable with it
        k_search = max(int(k), stat_k)
        pred = {key: np.full(n, -1, dtype=np.int64) for key in keys}
        conf = {key: np.zeros(n, dtype=np.float32) for key in keys}
        reason = {key: np.zeros(n, dtype=np.int8) for key in keys}
        reason_code = {r: i for i, r in enumerate(REASONS)}
        similarity = np.full(n, np.nan, dtype=np.float32)
        nearest = np.full(n, np.nan, dtype=np.float32)
        neigh: list[tuple[np.ndarray, ...]] = []
        t_embed = t_search = t_vote = 0.0
        n_silent = 0
        lookup_columns = list(dict.fromkeys([*keys, *([DATASET_COLUMN] if has_datasets else [])]))
        bar = tqdm(total=n, desc="annotate", unit="cell", disable=not progress)
        want_genes = any(h.needs_gene_features for h in use_heads.values())
        for chunk in iter_cell_chunks(source, chunk_size=int(batch_size), obsm_keys=obsm_keys):
            rows = np.asarray(chunk.ids, dtype=np.int64)
            t0 = time.perf_counter()
            if want_genes:
                raw, gene_features = embedder.transform_with_features(chunk)
                vectors = l2_normalize(raw)  # as idx.embed(chunk)
            else:
                vectors, gene_features = idx.embed(chunk), None
            vectors = apply_shift(vectors, shift)
            silent = ~embedder.expressed(chunk)
            n_silent += int(silent.sum())
            t1 = time.perf_counter()
            result = idx.search(vectors, k_search, where)
            t2 = time.perf_counter()
            ids, scores = result.ids, result.scores
            valid = ids >= 0
            uniq = np.unique(ids[valid])
            meta = idx.cells(uniq, columns=lookup_columns)
            pos = np.searchsorted(uniq, np.where(valid, ids, uniq[0] if len(uniq) else 0))
            dcodes = None
            if has_datasets:
                dcodes = (
                    np.where(valid, _codes(meta[DATASET_COLUMN], datasets)[pos], -1)
                    if len(uniq)
                    else -np.ones_like(ids)
                )
            similarity[rows] = mean_top_similarity(scores, stat_k)
            nearest[rows] = mean_top_similarity(scores, 1)
            top_ids, top_scores = ids[:, :k], scores[:, :k]
            weights = vote_weights(top_scores, weighting)
            for key in keys:
                codes = (
                    np.where(valid, _codes(meta[key], categories[key])[pos], -1)
                    if len(uniq)
                    else -np.ones_like(ids)
                )
                if key in use_heads:
                    v = votes_from_probabilities(
                        _head_probabilities(
                            use_heads[key].predict_proba(vectors, gene_features),
                            head_columns[key],
                            len(categories[key]),
                        )
                    )
                else:
                    v = vote(
                        codes[:, :k],
                        weights,
                        n_labels=len(categories[key]),
                        datasets=None if dcodes is None else dcodes[:, :k],
                        max_votes_per_dataset=max_votes_per_dataset,
                        class_weights=class_weights[key],
                    )
                d = decide(
                    v,
                    similarity[rows],
                    min_confidence=float(min_confidence),
                    far_threshold=far_threshold,
                    nearest_similarity=nearest[rows],
                    far_nearest_threshold=far_nearest,
                )
                pred[key][rows] = np.where(silent, -1, d.code)
                conf[key][rows] = np.where(silent, 0.0, v.confidence)
                reason[key][rows] = np.select(
                    [silent, d.reason == REASON_LOW_CONFIDENCE, d.reason == REASON_FAR],
                    [
                        reason_code[REASON_NO_EXPRESSION],
                        reason_code[REASON_LOW_CONFIDENCE],
                        reason_code[REASON_FAR],
                    ],
                    0,
                ).astype(np.int8)
            if keep_neighbors:
                m = top_ids >= 0
                r_idx, c_idx = np.nonzero(m)
                neigh.append(
                    (
                        rows[r_idx].astype(np.int64),
                        top_ids[m],
                        c_idx.astype(np.int16),
                        top_scores[m].astype(np.float32),
                        (dcodes[:, :k][m] if dcodes is not None else np.full(int(m.sum()), -1)).astype(
                            np.int32
                        ),
                    )
                )
            t3 = time.perf_counter()
            t_embed += t1 - t0
            t_search += t2 - t1
            t_vote += t3 - t2
            bar.update(len(rows))
        bar.close()
        if n_silent:
            logger.warning(
                "%d of %d query cells have no expression on the index embedder's genes: they are 'unknown' "
                "(reason %r)", n_silent, n, REASON_NO_EXPRESSION,
            )

        obs_names = pd.Index(source.obs.index.astype(str), name=source.obs.index.name)
        predictions = pd.DataFrame(index=obs_names)
        for key in keys:
            cats = [*categories[key], *([UNKNOWN] if UNKNOWN not in set(categories[key]) else [])]
            unk = cats.index(UNKNOWN)
            predictions[f"{key}_pred"] = pd.Categorical.from_codes(
                np.where(pred[key] >= 0, pred[key], unk), categories=cats
            )
            predictions[f"{key}_confidence"] = conf[key]
            predictions[f"{key}_unknown_reason"] = pd.Categorical.from_codes(
                reason[key].astype(np.int64), categories=list(REASONS)
            )
        predictions[SIMILARITY_COLUMN] = similarity
        predictions[NEAREST_COLUMN] = nearest
        neighbors = _neighbors_frame(neigh, obs_names, datasets)
        truth = {key: source.obs[col].reset_index(drop=True) for key, col in truth_map.items()}
        t_total = time.perf_counter() - t_start
        report = _report(
            source=source,
            query=query,
            idx=idx,
            match=match,
            keys=keys,
            predictions=predictions,
            categories=categories,
            truth=truth,
            truth_map=truth_map,
            far_threshold=far_threshold,
            far_nearest=far_nearest,
            far_k=far_k,
            far_used=far_used,
            alignment=alignment,
            params={
                "label_keys": keys,
                "k": int(k),
                "where": where,
                "atlas_cells_matching_where": n_where,
                "min_confidence": float(min_confidence),
                "max_votes_per_dataset": max_votes_per_dataset,
                "weighting": weighting,
                "class_balance": float(class_balance),
                "align": align,
                "far_quantile": far_quantile,
                "predictor": predictor,
                "predicted_by": {key: ("heads" if key in use_heads else "knn") for key in keys},
                "missing_genes": missing_genes,
                "heads_refit_for_query_genes": heads_refit,
                "batch_size": int(batch_size),
                "min_gene_overlap": float(min_gene_overlap),
            },
            timings={
                "open_index_s": round(t_open, 3),
                "align_s": round(t_align, 3),
                "embed_s": round(t_embed, 3),
                "search_s": round(t_search, 3),
                "vote_s": round(t_vote, 3),
                "total_s": round(t_total, 3),
                "cells_per_second": round(n / t_total, 1) if t_total > 0 else None,
            },
        )
        summary = ", ".join(
            f"{key}: {report['labels'][key]['n_predicted_labels']} labels, "
            f"{100 * report['labels'][key]['unknown_rate']:.1f}% unknown"
            for key in keys
        )
        logger.info(
            "annotated %d cells in %.1f s (%.0f cells/s); %s", n, t_total, n / max(t_total, 1e-9), summary
        )
        return AnnotationResult(
            predictions=predictions, neighbors=neighbors, report=report, _query=query, _truth=truth
        )
    finally:
        if source is not None:
            source.close()
        if own_index:
            idx.close()


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
            "manifest_sha256": _manifest_id(idx),
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
