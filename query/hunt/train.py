"""``hunt train``: learn a rare-cell classifier from a few labelled cells against an atlas background.

Positives come from labelled cells (an ``.h5ad`` / AnnData and a predicate over its obs, embedded with the
index's own embedder) and/or from atlas cells matching an SQL predicate (their stored vectors are read from the
index). Negatives are a uniform sample of atlas cells (positives excluded) plus, by default, the labelled file's
own non-matching cells -- the latter keep the classifier from learning "comes from this dataset" instead of "is
the rare type".

Training vectors are rounded through float16 exactly like the index's stored vectors, so training and sweep see
the same numbers.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import MIN_GENE_OVERLAP
from scatlas.atlas.outputs import CLASSIFIER, check_output_dir
from scatlas.atlas.validate import escaped
from scatlas.index import (
    ALIGN_SAMPLE,
    AtlasIndex,
    Progress,
    apply_shift,
    as_stored,
    estimate_shift,
    resolve_device,
    sample_sorted,
)
from scatlas.query.hunt.access import IndexLike, input_paths, open_index
from scatlas.query.hunt.calibration import CalibrationMethod, expected_hits_per_million, fit_calibration
from scatlas.query.hunt.classifier import HuntClassifier, exact_scores
from scatlas.query.hunt.gene_reads import dataset_gene_stats, open_index_store, read_gene_features
from scatlas.query.hunt.logistic import DEFAULT_L2_GRID, CVResult, cross_validate, fit_logistic
from scatlas.query.hunt.metrics import ThresholdChoice, average_precision, choose_threshold, roc_auc
from scatlas.query.hunt.predicate import evaluate_classes
from scatlas.query.hunt.stage2 import (
    BATCH_SAMPLE,
    GeneStage,
    GeneStats,
    fit_gene_stage,
    prefer_two_stages,
    standardize,
)
from scatlas.query.hunt.sweep_stage2 import STATS_SEED
from scatlas.query.prepare import open_query

logger = logging.getLogger(__name__)

MIN_POSITIVES = 3
"""Fewer labelled positives than this cannot be cross-validated; training refuses them."""
FEW_POSITIVES = 10
"""Below this, metrics are reported with a warning that they are very uncertain."""
DUPLICATE_COSINE = 0.9995
"""Background cells this similar to a labelled positive are the same cell (the labelled dataset is in the atlas)."""
SPY_QUANTILE = 0.1
MAX_EXCLUDED = 0.01
MIN_KNOWN_NEGATIVES = 200
"""With ``positive_sql``, the background is drawn from the atlas cells labelled otherwise (the predicate is false
for them) when at least this many are found among the sampled cells; else from all atlas cells."""
KNOWN_OVERSAMPLE = 4
"""Atlas cells sampled per background cell wanted, to find the cells labelled otherwise among them."""
POOR_PRECISION = 0.5
"""Under this cross-validated precision at its cut, training warns that most hits will be false."""
MAX_FALSE_POSITIVE_RATE = 0.5
"""A classifier calling more than this share of the negatives hits (cross-validated, at its cut) hunts nothing
rare: training refuses it."""


STAGE2_MIN_GENES = 0.9
"""Stage 2 is trained only when the labelled cells measure at least this share of the embedder's genes."""

IN_ATLAS_PROBE = 200
IN_ATLAS_SIMILARITY = 0.999
"""A labelled cell whose nearest atlas cell is this similar (cosine; float16 storage rounds ~1e-4) is an atlas cell."""


def _align_to_atlas(
    idx: AtlasIndex, pos: np.ndarray, neg: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Shift the labelled cells' vectors onto the atlas by the MNN offset estimated on a sample of all of them.

    When the labelled cells are themselves in the atlas (most of a sample has an identical stored vector), there is
    no offset to correct and they are left as they are.
    """
    both = np.concatenate([pos, neg])
    rng = np.random.default_rng(seed)
    probe = both[sample_sorted(len(both), IN_ATLAS_PROBE, rng)]
    top = idx.search(probe, k=1).scores[:, 0]
    in_atlas = float(np.mean(top >= IN_ATLAS_SIMILARITY))
    if in_atlas >= 0.5:
        logger.info("%.0f%% of the labelled cells are atlas cells: no alignment needed", 100 * in_atlas)
        return pos, neg, {"skipped": "the labelled cells are in the atlas", "in_atlas_fraction": in_atlas}
    rows = sample_sorted(len(both), ALIGN_SAMPLE, rng)
    alignment = estimate_shift(idx, both[rows])
    if not alignment.applied:
        return pos, neg, {"skipped": alignment.skipped, "in_atlas_fraction": in_atlas}
    info = {"shift_norm": float(np.linalg.norm(alignment.shift)), "mnn_pairs": alignment.n_pairs,
            "sample": alignment.n_sample, "in_atlas_fraction": in_atlas}
    logger.info("aligned the labelled cells onto the atlas: shift %.3f from %d MNN pairs", info["shift_norm"],
                alignment.n_pairs)
    return apply_shift(pos, alignment.shift), apply_shift(neg, alignment.shift), info


def _cells_part(
    index: AtlasIndex,
    cells: Any,
    positive: str | None,
    max_positives: int,
    cell_negatives: int,
    min_gene_overlap: float,
    chunk_size: int,
    seed: int,
    progress: Progress,
    want_genes: bool = False,
    allow_species_mismatch: bool = False,
    x_layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """Embedded positives and sampled negatives of the labelled cells (rounded as stored), a report, and with
    ``want_genes`` their gene features (positives, negatives; None when the cells lack too many of the genes)."""
    if positive is None:
        raise InputError("labelled cells were given without a positive predicate; pass one (--positive "
                         "\"cell_type = 'X'\", positive= in Python)")
    labelled = open_query(cells, index, what="labelled cells ({name})", allow_empty=True,
                          allow_species_mismatch=allow_species_mismatch, x_layer=x_layer)
    source = labelled.source
    try:
        mask, negative = evaluate_classes(source.obs, positive)
        pos_rows = np.flatnonzero(mask).astype(np.int64)
        neg_all = np.flatnonzero(negative).astype(np.int64)
        rng = np.random.default_rng(seed)
        if len(pos_rows) > max_positives:
            logger.info("using %d of the %d matching labelled cells (max_positives)", max_positives, len(pos_rows))
            pos_rows = sample_sorted(pos_rows, max_positives, rng)
        neg_rows = sample_sorted(neg_all, max(int(cell_negatives), 0), rng)
        report: dict[str, Any] = {
            "source": getattr(source, "name", "cells"),
            "n_cells": int(source.n_obs),
            "n_matching": len(pos_rows),
            # neither positive nor negative: a missing value where the predicate compares (SQL NULL)
            "n_undetermined": int(source.n_obs - mask.sum() - negative.sum()),
            "expression": source.expression.describe(),
        }
        if len(pos_rows) == 0:
            return np.zeros((0, index.dim), np.float32), np.zeros((0, index.dim), np.float32), report, None
        labelled.check(min_gene_overlap)
        if labelled.match is not None:
            report["gene_overlap"] = labelled.match.summary()
        rows = _expressed_rows(labelled, np.union1d(pos_rows, neg_rows), pos_rows, chunk_size, report)
        vec = as_stored(labelled.embed(rows, chunk_size, progress))[1]
        is_pos = np.isin(rows, pos_rows)
        keep = _first_copies(vec, is_pos, report)
        rows, vec, is_pos = rows[keep], vec[keep], is_pos[keep]
        genes = _labelled_gene_features(labelled, rows, chunk_size, report) if want_genes else None
        return vec[is_pos], vec[~is_pos], report, (genes[is_pos], genes[~is_pos]) if genes is not None else None
    finally:
        labelled.close()


def _expressed_rows(
    labelled: Any, rows: np.ndarray, pos_rows: np.ndarray, chunk_size: int, report: dict[str, Any]
) -> np.ndarray:
    """``rows`` without the cells that express none of the embedder's genes (their vector is that of an empty
    profile, the same for all: a classifier would learn it as the positives' signature); counted in ``report``."""
    expressed = np.concatenate([np.asarray(labelled.embedder.expressed(chunk), dtype=bool)
                                for chunk in labelled.chunks(chunk_size, rows)]) if len(rows) else np.ones(0, bool)
    silent = rows[~expressed]
    if len(silent):
        n_pos = int(np.isin(silent, pos_rows).sum())
        report["n_without_expression"] = {"positives": n_pos, "negatives": len(silent) - n_pos}
        logger.warning("%d labelled positives and %d negatives express none of the embedder's genes: left out",
                       n_pos, len(silent) - n_pos)
    return rows[expressed]


def _first_copies(vec: np.ndarray, is_pos: np.ndarray, report: dict[str, Any]) -> np.ndarray:
    """Bool over the rows: all but the repeats of a positive whose stored vector is exactly another positive's
    (a copied cell: its copies would sit in different folds and make the cross-validated figures perfect)."""
    keep = np.ones(len(vec), dtype=bool)
    pos = np.flatnonzero(is_pos)
    if len(pos) < 2:
        return keep
    _, first = np.unique(np.ascontiguousarray(vec[pos]).view(np.dtype((np.void, vec.dtype.itemsize * vec.shape[1]))),
                         return_index=True)
    repeats = np.setdiff1d(pos, pos[first])
    if len(repeats):
        keep[repeats] = False
        report["n_repeated_positives"] = len(repeats)
        logger.warning("%d labelled positives repeat another positive's expression exactly (copies of one cell?): "
                       "left out, so that cross-validation does not score a cell against its own copy", len(repeats))
    return keep


def _labelled_gene_features(labelled: Any, rows: np.ndarray, chunk_size: int, report: dict[str, Any]) -> np.ndarray | None:
    """Gene features of the labelled cells ``rows`` (sorted), or None (noted in ``report``) when they measure fewer
    than :data:`STAGE2_MIN_GENES` of the embedder's genes."""
    present = labelled.match.target_present() if labelled.match is not None else None
    if present is None or present.mean() < STAGE2_MIN_GENES:
        have = "no gene matrix" if present is None else f"{present.mean():.0%} of the embedder's genes"
        report["stage2_skipped"] = f"the labelled cells have {have} (stage 2 needs {STAGE2_MIN_GENES:.0%})"
        return None
    parts = [labelled.embedder.gene_features(chunk) for chunk in labelled.chunks(chunk_size, rows)]
    return np.concatenate(parts).astype(np.float32)


def _duplicates(bg: np.ndarray, pos: np.ndarray, block: int = 4096) -> np.ndarray:
    """Background rows whose vector is (nearly) identical to a labelled positive's (cosine >= DUPLICATE_COSINE)."""
    out = np.zeros(len(bg), dtype=bool)
    for a in range(0, len(pos), block):
        sims = bg @ pos[a : a + block].T
        out |= sims.max(axis=1) >= DUPLICATE_COSINE
    return out


def _likely_positives(pos_oof: np.ndarray, bg_oof: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Background cells scoring like held-out positives: out-of-fold score >= the SPY_QUANTILE of the positives'.

    The held-out positives act as "spies" (PU learning): a background cell above most of them is more likely an
    unlabelled member of the rare population than a negative. At most MAX_EXCLUDED of the background is excluded
    (the best-scoring ones): a rare population cannot be more than that. Cells ``known`` to be negatives (labelled
    otherwise) are never excluded.
    """
    cut = float(np.quantile(pos_oof, SPY_QUANTILE))
    suspect = (bg_oof >= cut) & ~known
    cap = max(1, int(MAX_EXCLUDED * len(bg_oof)))
    if suspect.sum() > cap:
        logger.warning(
            "%d background cells (%.1f%%) score at least as high as the weakest tenth of the labelled positives "
            "(held out); only the best %d are set aside as likely unlabelled positives: some labelled positives "
            "look like many atlas cells", int(suspect.sum()), 100 * suspect.mean(), cap,
        )
        keep = np.argsort(-np.where(known, -np.inf, bg_oof), kind="stable")[:cap]
        suspect = np.zeros(len(bg_oof), dtype=bool)
        suspect[keep] = True
    return suspect


def train(
    index: IndexLike,
    cells: Any = None,
    *,
    positive: str | None = None,
    positive_sql: str | None = None,
    background: int = 20_000,
    cell_negatives: int = 10_000,
    max_positives: int = 50_000,
    device: str = "auto",
    seed: int = 0,
    l2: float | None = None,
    n_folds: int = 5,
    calibration: CalibrationMethod = "platt",
    target_precision: float | None = None,
    clean_background: bool = True,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
    out: str | Path | None = None,
    chunk_size: int = 5_000,
    progress: Progress = True,
    align: Literal["none", "mnn"] = "mnn",
    two_stage: bool | Literal["auto"] = "auto",
    allow_species_mismatch: bool = False,
    x_layer: str | None = None,
) -> HuntClassifier:
    """Train a hunt classifier; save it to ``out`` when given.

    Parameters
    ----------
    index: an opened :class:`index.AtlasIndex` or the path of an index directory.
    cells: labelled cells: an ``.h5ad`` path or an AnnData (never modified); embedded with the index's embedder
        (gene overlap reported, refused below ``min_gene_overlap``).
    positive: which of ``cells`` are positives: an SQL predicate over their obs such as ``"cell_type = 'Norn
        cell'"``, the language of ``positive_sql`` and ``--where`` (the older pandas-like form, ``==`` and
        ``in [...]``, is still read: :mod:`query.hunt.predicate`).
    positive_sql: atlas cells that are positives: an SQL predicate over the index's ``cells`` table, e.g.
        ``"cell_type = 'Norn cell' AND dataset_id = 'kidney_1'"``; their stored vectors are used.
    background: number of atlas cells sampled uniformly (seeded) as negatives, positives excluded.
    cell_negatives: at most this many non-matching cells of ``cells`` are added as negatives (0: none).
    max_positives: at most this many positives from each source (sampled with ``seed``), bounding memory.
    device: ``auto`` (GPU when torch sees one), ``cpu`` or ``cuda`` (DependencyError without CUDA).
    l2: L2 penalty; ``None`` picks one of :data:`~query.hunt.logistic.DEFAULT_L2_GRID` by cross-validated AUPRC.
    n_folds: stratified cross-validation folds (at most the number of positives, at least 2).
    calibration: ``platt`` or ``isotonic``, fitted on the out-of-fold scores.
    target_precision: choose the threshold as the lowest cut reaching this cross-validated precision; default
        (``None``): the cut maximising F1.
    clean_background: drop background cells identical to a labelled positive, and, after a first
        cross-validation, those scoring like the held-out positives (likely unlabelled positives: at least the
        :data:`SPY_QUANTILE` quantile of the positives' out-of-fold scores, at most :data:`MAX_EXCLUDED` of the
        background), then cross-validate and fit again; ``counts`` records how many.
    align: ``"mnn"`` shifts the labelled cells' vectors onto the atlas before training, as annotate does for
        queries (:func:`index.estimate_shift`), so the classifier does not learn their batch offset as "positive" (see
        docs/benchmarks.md#hunt-align); ``"none"`` trains on the vectors as embedded.
    two_stage: also train stage 2 (:mod:`query.hunt.stage2`): a classifier on the embedder's gene features
        standardised within each batch, trained on the labelled cells (the atlas rows join only with atlas positives
        or without labelled negatives), with stage 1's folds; stage 1's candidate cut is then chosen for recall.
        ``"auto"``: train it, and keep it only when its two stages' cross-validated F1 beats stage 1 alone's on
        the same labelled cells (:func:`~query.hunt.stage2.prefer_two_stages`; ``params["stage_choice"]`` says
        which won). Trained when the embedder has gene features, the labelled cells measure its genes and the atlas store is
        reachable (else ``params["stage2_skipped"]`` says why and the classifier is one-stage; with
        ``two_stage=True``, InputError says why). Its features are
        held densely: the training rows x the embedder's genes, float64.

    allow_species_mismatch: go on (with a warning) when the labelled cells' genes look like another species than
        the index's (SpeciesMismatchError otherwise).
    x_layer: the labelled cells' matrix to read (``X``, ``raw`` or a layer's name; default: raw counts wherever they
        are, else log-normalised values).

    Raises InputError when no positive or no negative cell is found, or fewer than 3 positives.
    """
    t0 = time.perf_counter()
    if two_stage not in (True, False, "auto"):
        raise InputError(f"two_stage must be True, False or 'auto' (got {two_stage!r})")
    inputs = input_paths(index, cells)
    if out is not None:  # refuse a bad output before the work, not after it
        check_output_dir(out, CLASSIFIER, inputs=inputs, replace=True)
    idx = open_index(index)
    if cells is None and positive is not None:
        raise InputError("--positive (positive=) selects among labelled cells, but no --cells file (cells=) was given; "
                         "give one, or use --positive-sql (positive_sql=) for atlas cells")
    if cells is None and positive_sql is None:
        raise InputError("no positives: give labelled cells (--cells FILE --positive PREDICATE; cells=, positive= "
                         "in Python) or atlas cells (--positive-sql PREDICATE; positive_sql=)")
    if n_folds < 2:
        raise InputError(f"n_folds must be at least 2 (got {n_folds})")
    if align not in ("none", "mnn"):
        raise InputError(f"align must be 'none' or 'mnn' (got {align!r})")
    if background < 0 or cell_negatives < 0 or max_positives < MIN_POSITIVES:
        raise InputError(f"background and cell_negatives must be >= 0 and max_positives >= {MIN_POSITIVES}")
    torch_device = resolve_device(device, backend="torch")
    gene_names, skipped = _stage2_genes(idx) if two_stage else (None, "not requested (--stages 1, two_stage=False)")
    if two_stage is True:  # asked for: refuse now what would leave it untrained, before the work
        _require_stage2(skipped if gene_names is None else _store_unusable(idx))
    stage_choice, dropped = None, None
    ts = _TrainingSet(idx.dim)
    if cells is not None:
        ts.add_cells(idx, cells, positive, max_positives, cell_negatives, min_gene_overlap, chunk_size, seed,
                     progress, align, want_genes=gene_names is not None, allow_species_mismatch=allow_species_mismatch,
                     x_layer=x_layer)
    if positive_sql is not None:
        ts.add_atlas_positives(idx, positive_sql, max_positives, seed)
    ts.check_positives(cells is not None, positive, positive_sql)
    ts.add_background(idx, background, seed, drop_duplicates=cells is not None, positive_sql=positive_sql)
    fit = _fit(ts, l2=l2, n_folds=n_folds, seed=seed, device=torch_device, clean_background=clean_background)
    if cells is not None and positive_sql is None:  # (with atlas positives the background is their negatives)
        _warn_background_is_the_atlas(ts, idx.n_cells)
    choice = choose_threshold(fit.y, fit.cv.oof_scores, target_precision=target_precision)
    _check_separates(fit, choice, ts)
    stage2 = None
    if gene_names is not None:
        stage2, skipped = _train_stage2(idx, ts, fit, gene_names, choice.threshold, l2=l2, seed=seed, device=torch_device,
                                        calibration=calibration, target_precision=target_precision,
                                        chunk_size=chunk_size)
    if stage2 is None and two_stage is True:
        _require_stage2(skipped or "it could not be trained")
    if stage2 is not None and two_stage == "auto":
        keep, stage_choice = prefer_two_stages(stage2.metrics, atlas_background=len(ts.background_ids) > 0)
        logger.info("two_stage='auto': %s; %s", stage_choice, "two stages" if keep else "stage 1 alone")
        if not keep:
            dropped = stage2.metrics
            stage2, skipped = None, f"two_stage='auto' chose stage 1 alone: {stage_choice}"
    if skipped:
        logger.info("stage 2 not trained: %s; the classifier is one-stage", skipped)
    clf = HuntClassifier(
        weights=fit.weights,
        bias=fit.bias,
        threshold=choice.threshold,
        calibration=fit_calibration(fit.cv.oof_scores, fit.y, calibration),
        embedder_fingerprint=idx.embedder_fingerprint,
        index_manifest_id=idx.build_id,
        atlas_store_id=idx.atlas_store_id,
        metrics=_metrics(fit, choice, ts, idx.n_cells, given_l2=l2 is not None),
        counts=ts.counts,
        seed=seed,
        params={
            "positive": positive,
            "positive_sql": positive_sql,
            "background": background,
            "cell_negatives": cell_negatives,
            "max_positives": max_positives,
            "n_folds": n_folds,
            "calibration": calibration,
            "target_precision": target_precision,
            "clean_background": clean_background,
            "align": align,
            "l2": l2,
            "device": torch_device,
            "cells": ts.report,
            "two_stage": two_stage,
            **({"stage_choice": stage_choice} if stage_choice else {}),
            # what the stage 2 that --stages auto trained and did not keep measured (cross-validated)
            **({"stage2_not_kept": _stage2_summary(dropped)} if dropped else {}),
            **({"stage2_skipped": skipped} if skipped else {}),
        },
        versions=_versions(),
        stage2=stage2,
        training_ids=ts.training_ids(idx),
    )
    logger.info(
        "trained hunt classifier %s on %d positive / %d negative cells in %.1fs: CV AUPRC %.3f (baseline %.3f), "
        "at threshold %.3f precision %.3f recall %.3f; expected false hits %.1f per million atlas cells",
        clf.fingerprint(), ts.n_positive, ts.n_negative, time.perf_counter() - t0, clf.metrics["auprc"],
        clf.metrics["auprc_baseline"], clf.threshold, choice.precision, choice.recall,
        clf.metrics["expected_false_hits_per_million"],
    )
    if out is not None:
        clf.save(out, inputs=inputs)
    return clf


def _store_unusable(idx: AtlasIndex) -> str | None:
    """Why stage 2 cannot read the index's atlas store (:func:`~query.hunt.gene_reads.open_index_store`), or None."""
    store, why = open_index_store(idx)
    if store is not None:
        store.close()
    return why


def _require_stage2(why: str | None) -> None:
    """InputError when stage 2, asked for (``two_stage=True``, ``--stages 2``), cannot be trained (``why``)."""
    if why is None:
        return
    raise InputError(
        f"stage 2 was asked for (--stages 2; two_stage=True) but cannot be trained: {why}. Fix that (for the atlas "
        "store: restore the store the index was built from, or bring the index up to date with it with `scatlas "
        "build --update`), or train with --stages auto (two_stage='auto': stage 1 alone, said, when stage 2 cannot "
        "be trained) or --stages 1"
    )


def _stage2_genes(idx: AtlasIndex) -> tuple[list[str] | None, str | None]:
    """The embedder's gene feature names, or ``(None, why stage 2 cannot be trained)``."""
    try:
        names = idx.embedder.gene_feature_names
    except InputError as exc:
        return None, f"the index has no embedder to read genes with ({exc})"
    return (list(names), None) if names else (None, "the index's embedder has no gene features")


def _train_stage2(
    idx: AtlasIndex, ts: _TrainingSet, fit: _Fit, gene_names: list[str], stage1_threshold: float, *,
    l2: float | None, seed: int,
    device: str, calibration: CalibrationMethod, target_precision: float | None, chunk_size: int,
) -> tuple[GeneStage | None, str | None]:
    """Stage 2 on the gene features of stage 1's training rows whose batches hold both classes, standardised within
    each batch (:mod:`query.hunt.stage2`), or ``(None, why not)``.

    The labelled cells (positives and negatives: one batch) always train it; the atlas rows (read from the store,
    each standardised by its dataset's statistics, as the sweep will) join only when atlas cells are positives
    (``positive_sql``) or the labelled cells have no negatives: an all-negative atlas background, which also holds
    the unlabelled positives, would teach stage 2 the atlas' batch as "negative" (docs/benchmarks.md)."""
    if ts.labelled_positives is not None and ts.cell_genes is None:
        return None, ts.report.get("stage2_skipped", "the labelled cells have no gene features")
    store, why = open_index_store(idx)
    if store is None:
        return None, why
    n_genes = len(gene_names)
    cpos, cneg = ts.cell_genes if ts.cell_genes is not None else (np.zeros((0, n_genes), np.float32),) * 2
    n_cp, n_ap, n_cn, n_bg = len(cpos), len(ts.atlas_positive_ids), len(cneg), len(ts.background_ids)
    use_atlas = n_ap > 0 or n_cn == 0
    try:
        parts: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        floor = None
        if n_cp + n_cn:
            labelled = GeneStats.of(np.concatenate([cpos, cneg]))
            floor = labelled.floor()
            parts += [standardize(cpos, labelled, floor), standardize(cneg, labelled, floor)]
            rows += [np.arange(n_cp), n_cp + n_ap + np.arange(n_cn)]
        if use_atlas:
            ids = np.concatenate([ts.atlas_positive_ids, ts.background_ids])
            raw = read_gene_features(store, idx.embedder, ids, chunk_size)
            floor = floor if floor is not None else GeneStats.of(raw).floor()
            parts.append(_standardize_by_dataset(store, idx.embedder, ids, raw, floor, chunk_size))
            rows += [n_cp + np.arange(n_ap), n_cp + n_ap + n_cn + np.arange(n_bg)]
    finally:
        store.close()
    G, sel = np.concatenate(parts), np.concatenate(rows)
    if len(fit.y) != n_cp + n_ap + n_cn + n_bg:
        raise AssertionError(f"stage 2 counts {n_cp + n_ap + n_cn + n_bg} rows for stage 1's {len(fit.y)}")  # a bug
    excluded = _excluded_fraction(ts)
    assert floor is not None
    stage = fit_gene_stage(G, fit.y[sel], fit.cv.oof_scores[sel], gene_names, stage1_threshold=stage1_threshold,
                           l2=l2, n_folds=fit.n_folds, seed=seed, device=device, calibration=calibration,
                           target_precision=target_precision, excluded_fraction=excluded,
                           known_fraction=_known_fraction(ts, idx.n_cells), sd_floor=floor,
                           batch_sample=BATCH_SAMPLE)
    stage.metrics["training_rows"] = {"labelled_positives": n_cp, "labelled_negatives": n_cn,
                                      "atlas_positives": n_ap if use_atlas else 0,
                                      "atlas_background": n_bg if use_atlas else 0}
    return stage, None


def _standardize_by_dataset(
    store: Any, embedder: Any, ids: np.ndarray, raw: np.ndarray, floor: float, chunk_size: int
) -> np.ndarray:
    """Gene features ``raw`` of atlas cells ``ids`` standardised by their datasets' statistics (as the sweep's)."""
    ranges = store.cell_ranges()
    starts = np.array([a for _, a, _ in ranges], dtype=np.int64)
    which = np.searchsorted(starts, ids, side="right") - 1
    out = np.empty(raw.shape, dtype=np.float64)
    for k in np.unique(which):
        dataset_id = ranges[int(k)][0]
        stats = dataset_gene_stats(store, embedder, dataset_id, BATCH_SAMPLE, STATS_SEED, chunk_size)
        out[which == k] = standardize(raw[which == k], stats, floor)
    return out


@dataclass
class _TrainingSet:
    """The training vectors by origin: positives, the labelled cells' negatives, the atlas background."""

    dim: int
    positives: list[np.ndarray] = field(default_factory=list)
    negatives: list[np.ndarray] = field(default_factory=list)
    labelled_positives: np.ndarray | None = None  # as embedded: to find the labelled cells in the atlas
    labelled_negatives: np.ndarray | None = None  # as embedded: their atlas copies are no extra negatives
    atlas_positive_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    background: np.ndarray | None = None
    background_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    background_known: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # labelled negatives
    cell_genes: tuple[np.ndarray, np.ndarray] | None = None  # gene features of the labelled positives, negatives
    counts: dict[str, int] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def n_positive(self) -> int:
        return sum(len(p) for p in self.positives)

    @property
    def n_negative(self) -> int:
        return sum(len(n) for n in self.negatives) + (len(self.background) if self.background is not None else 0)

    def add_cells(
        self, idx: AtlasIndex, cells: Any, positive: str | None, max_positives: int, cell_negatives: int,
        min_gene_overlap: float, chunk_size: int, seed: int, progress: Progress, align: str, want_genes: bool = False,
        allow_species_mismatch: bool = False, x_layer: str | None = None,
    ) -> None:
        cpos, cneg, self.report, self.cell_genes = _cells_part(
            idx, cells, positive, max_positives, cell_negatives, min_gene_overlap, chunk_size, seed, progress,
            want_genes, allow_species_mismatch, x_layer,
        )
        self.labelled_positives, self.labelled_negatives = cpos, cneg
        if align == "mnn" and len(cpos) + len(cneg):
            cpos, cneg, self.report["alignment"] = _align_to_atlas(idx, cpos, cneg, seed)
        self.positives.append(cpos)
        self.negatives.append(cneg)
        self.counts["positives_from_cells"], self.counts["negatives_from_cells"] = len(cpos), len(cneg)
        if positive is not None and cell_negatives > 0 and len(cpos) and not len(cneg):
            logger.warning(
                "no labelled cell is left as a negative (the predicate %s matches every one that expresses the "
                "embedder's genes; %d positives kept): the negatives are atlas cells only, and the classifier can "
                "learn the labelled cells' batch as 'positive'; give a predicate that some labelled cells fail",
                escaped(positive, 200), len(cpos))

    def add_atlas_positives(self, idx: AtlasIndex, positive_sql: str, max_positives: int, seed: int) -> None:
        ids = idx.filter_ids(positive_sql, allow_empty=True, what="SQL predicate")
        self.counts["atlas_cells_matching_sql"] = len(ids)
        if len(ids) > max_positives:
            logger.info("using %d of the %d atlas cells matching the SQL predicate (max_positives)", max_positives,
                        len(ids))
            ids = sample_sorted(ids, max_positives, seed)
        vectors = idx.vectors(ids) if len(ids) else np.zeros((0, self.dim), np.float32)
        labelled = self.labelled_positives
        if labelled is not None and len(labelled) and len(ids):
            # a labelled positive that is an atlas cell matching the predicate would count twice (and sit in two
            # folds, scoring itself): its atlas copy is left out (it stays a training cell: training_ids finds it)
            copy = _duplicates(vectors, labelled)
            if copy.any():
                logger.info("%d atlas positives are copies of labelled positives: each counts once", int(copy.sum()))
                vectors, ids = vectors[~copy], ids[~copy]
            self.counts["atlas_positive_copies_dropped"] = int(copy.sum())
        if len(vectors):
            self.positives.append(vectors)
        self.atlas_positive_ids = ids
        self.counts["positives_from_atlas"] = len(ids)

    def check_positives(self, with_cells: bool, positive: str | None, positive_sql: str | None) -> None:
        n_pos = self.n_positive
        if n_pos == 0:
            where = []
            silent = (self.report.get("n_without_expression") or {}).get("positives", 0)
            if with_cells and silent:
                where.append(f"the predicate {positive!r} matches {silent} labelled cells, but none of them expresses "
                             "any of the embedder's genes (are their counts all zero, or the wrong matrix read? see "
                             "--x-layer)")
            elif with_cells:
                where.append(f"the predicate {positive!r} matches none of the {self.report.get('n_cells', '?')} "
                             "labelled cells")
            if positive_sql is not None:
                where.append(f"the SQL predicate {positive_sql!r} matches no atlas cell")
            hint = "" if "expresses" in " ".join(where) else "; check the column values (e.g. spelling, case)"
            raise InputError(f"empty positive set: {' and '.join(where)}{hint}")
        if n_pos < MIN_POSITIVES:
            raise InputError(f"only {n_pos} positive cell(s); at least {MIN_POSITIVES} are needed to cross-validate")

    def training_ids(self, idx: AtlasIndex) -> np.ndarray:
        """Sorted atlas ids of the cells learnt as positives: the atlas positives, and the labelled positives that
        are atlas cells (the labelled file was ingested: its cell's nearest atlas vector is the same one)."""
        found = np.zeros(0, dtype=np.int64)
        labelled = self.labelled_positives
        if labelled is not None and len(labelled):
            res = idx.search(labelled, k=1)
            found = res.ids[:, 0][(res.ids[:, 0] >= 0) & (res.scores[:, 0] >= DUPLICATE_COSINE)]
            self.counts["labelled_positives_in_atlas"] = len(np.unique(found))
            if len(found):
                logger.info("%d of the %d labelled positives are atlas cells (the labelled dataset is in the atlas): "
                            "a sweep marks them among its hits", len(np.unique(found)), len(labelled))
        return np.unique(np.concatenate([self.atlas_positive_ids, found]).astype(np.int64))

    def add_background(
        self, idx: AtlasIndex, n: int, seed: int, *, drop_duplicates: bool, positive_sql: str | None = None
    ) -> None:
        """``n`` atlas cells sampled as negatives (positives excluded; with ``drop_duplicates``, those identical to a
        labelled positive too). With ``positive_sql``, drawn from the cells it is false for (their label is known and
        is not the positives'; a cell without the label is neither, and may be an unlabelled positive) when enough
        are found (:data:`MIN_KNOWN_NEGATIVES`); those are never set aside as likely positives."""
        if positive_sql is not None and n > 0:
            ids, known = self._labelled_otherwise(idx, positive_sql, n, seed)
        else:
            ids = idx.sample_ids(n, exclude=self.atlas_positive_ids, seed=seed)
            known = np.zeros(len(ids), dtype=bool)
        bg = idx.vectors(ids) if len(ids) else np.zeros((0, self.dim), np.float32)
        labelled = np.concatenate([v for v in (self.labelled_positives, self.labelled_negatives) if v is not None]
                                  or [np.zeros((0, self.dim), np.float32)])
        if drop_duplicates and len(labelled) and len(bg):
            dup = _duplicates(bg, labelled)
            if dup.any():
                logger.info("dropped %d background cells identical to labelled cells (the labelled dataset is in the "
                            "atlas: each cell counts once)", int(dup.sum()))
                bg, ids, known = bg[~dup], ids[~dup], known[~dup]
            self.counts["background_duplicates_dropped"] = int(dup.sum())
        self.background, self.background_ids = bg, np.asarray(ids, dtype=np.int64)
        self.background_known = known
        if not any(len(p) for p in self.negatives) and len(bg) == 0:
            raise InputError("no negative cells: the atlas background is empty (background=0 or every atlas cell is "
                             "positive)" + (" and the labelled cells have no non-matching cells"
                                            if self.labelled_positives is not None else "") + "; raise --background")
        if self.n_positive < FEW_POSITIVES:
            logger.warning("only %d positive cells: cross-validated metrics are very uncertain", self.n_positive)

    def _labelled_otherwise(
        self, idx: AtlasIndex, positive_sql: str, n: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(background ids, bool: labelled otherwise): up to ``n`` atlas cells the predicate is false for, found
        among a wider uniform sample; a uniform sample of ``n`` and no known negative when fewer than
        :data:`MIN_KNOWN_NEGATIVES` are found (the atlas holds few labels of that column)."""
        wide = idx.sample_ids(KNOWN_OVERSAMPLE * n, exclude=self.atlas_positive_ids, seed=seed)
        found = idx.filter_ids(positive_sql, allow_empty=True, what="SQL predicate", negate=True, among=wide)
        self.counts["background_labelled_otherwise_found"] = len(found)
        if len(found) < min(MIN_KNOWN_NEGATIVES, n):
            logger.info("%d of %d sampled atlas cells are labelled otherwise (the predicate is false for them): the "
                        "background is drawn from all atlas cells", len(found), len(wide))
            self.counts["background_from_labelled_otherwise"] = 0
            sample = idx.sample_ids(n, exclude=self.atlas_positive_ids, seed=seed)
            return sample, np.zeros(len(sample), dtype=bool)
        ids = sample_sorted(found, n, seed) if len(found) > n else found
        logger.info("background: %d atlas cells labelled otherwise (the predicate is false for them; cells it is NULL "
                    "for, missing a value it needs, are left out: they may be positives)", len(ids))
        self.counts["background_from_labelled_otherwise"] = 1
        if "dataset_id" in idx.columns():
            with idx.cursor() as con:
                row = con.execute("SELECT count(DISTINCT dataset_id) FROM cells").fetchone()
            self.counts["atlas_datasets"] = int(row[0]) if row else 0
            self.counts["background_datasets"] = int(idx.cells(ids, columns=["dataset_id"])["dataset_id"].nunique())
        return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positives, the labelled cells' negatives, background), float32."""
        P = np.concatenate([p for p in self.positives if len(p)]).astype(np.float32)
        N = np.concatenate([p for p in self.negatives if len(p)] or [np.zeros((0, self.dim), np.float32)])
        bg = self.background if self.background is not None else np.zeros((0, self.dim), np.float32)
        return P, N.astype(np.float32), bg


@dataclass
class _Fit:
    """The cross-validated and final fits, on ``X`` / ``y``."""

    X: np.ndarray
    y: np.ndarray
    cv: CVResult
    n_folds: int
    weights: np.ndarray
    bias: float
    n_iter: int
    excluded: np.ndarray  # background vectors set aside as likely unlabelled positives (not trained on)


def _stack(P: np.ndarray, N: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([P, N, bg]),
            np.r_[np.ones(len(P), dtype=bool), np.zeros(len(N) + len(bg), dtype=bool)])


def _fit(
    ts: _TrainingSet, *, l2: float | None, n_folds: int, seed: int, device: str, clean_background: bool
) -> _Fit:
    """Cross-validate (choosing L2 unless given), exclude likely unlabelled positives from the background and
    cross-validate again (``clean_background``), then fit on everything."""
    P, N, bg = ts.arrays()
    k = int(min(n_folds, len(P)))
    grid = (float(l2),) if l2 is not None else DEFAULT_L2_GRID
    X, y = _stack(P, N, bg)
    cv = cross_validate(X, y, l2_grid=grid, n_folds=k, seed=seed, device=device)
    ts.counts["background_excluded_as_likely_positive"] = 0
    excluded = np.zeros((0, X.shape[1]), dtype=X.dtype)
    if clean_background and len(bg):
        suspect = _likely_positives(cv.oof_scores[: len(P)], cv.oof_scores[len(P) + len(N) :], ts.background_known)
        if suspect.any():
            logger.info(
                "excluding %d of %d background cells that score like the labelled positives (likely unlabelled "
                "positives); refitting", int(suspect.sum()), len(bg),
            )
            excluded = bg[suspect]
            bg = ts.background = bg[~suspect]
            ts.background_ids = ts.background_ids[~suspect]
            ts.background_known = ts.background_known[~suspect]
            ts.counts["background_excluded_as_likely_positive"] = int(suspect.sum())
            X, y = _stack(P, N, bg)
            cv = cross_validate(X, y, l2_grid=grid, n_folds=k, seed=seed, device=device)
    ts.counts["negatives_from_atlas"] = len(bg)
    ts.counts["n_positive"], ts.counts["n_negative"] = ts.n_positive, ts.n_negative
    final = fit_logistic(X, y, cv.l2, device=device)
    return _Fit(X, y, cv, k, final.weights, final.bias, final.n_iter, excluded)


def _stage2_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The cross-validated figures of a stage 2 (:func:`~query.hunt.stage2.fit_gene_stage`'s metrics) worth keeping
    when it is not used: its own precision, recall and AUPRC, and the two stages'."""
    two = metrics["two_stage"]
    return {"n_genes": metrics["n_genes"], "precision": metrics["precision"], "recall": metrics["recall"],
            "auprc": metrics["auprc"], "two_stage": {k: two[k] for k in ("precision", "recall", "f1") if k in two}}


def _known_fraction(ts: _TrainingSet, n_index: int) -> float:
    """The share of the atlas' cells a ``positive_sql`` predicate matches (0 without one). With one, the cells set
    aside from the background as likely positives may be among them: they are not counted again (see
    :func:`_excluded_fraction`)."""
    return min(1.0, ts.counts.get("atlas_cells_matching_sql", 0) / n_index) if n_index else 0.0


def _excluded_fraction(ts: _TrainingSet) -> float:
    """The share of the atlas background sample set aside as likely unlabelled positives (0 when none was drawn, and
    with atlas positives, whose count already holds the atlas' known positives)."""
    if ts.counts.get("atlas_cells_matching_sql"):
        return 0.0
    sampled = ts.counts.get("negatives_from_atlas", 0) + ts.counts.get("background_excluded_as_likely_positive", 0)
    return ts.counts.get("background_excluded_as_likely_positive", 0) / sampled if sampled else 0.0


def _metrics(fit: _Fit, choice: ThresholdChoice, ts: _TrainingSet, n_index: int, *, given_l2: bool) -> dict[str, Any]:
    """The classifier's record of its cross-validated quality."""
    cv, y = fit.cv, fit.y
    n_pos, n_neg = ts.n_positive, ts.n_negative
    excluded = _excluded_fraction(ts)
    return {
        "cv_folds": fit.n_folds,
        "l2": cv.l2,
        "auprc_by_l2": {f"{lam:g}": v for lam, v in sorted(cv.ap_by_l2.items())},
        "auprc": average_precision(y, cv.oof_scores),
        "auprc_by_fold": cv.ap_by_fold,
        "roc_auc": roc_auc(y, cv.oof_scores),
        "auprc_baseline": n_pos / (n_pos + n_neg),
        "threshold": choice.to_dict(),
        "precision": choice.precision,
        "recall": choice.recall,
        "f1": choice.f1,
        "false_positive_rate": choice.false_positive_rate,
        "expected_false_hits_per_million": choice.false_positive_rate * 1e6,
        "expected_hits_per_million": expected_hits_per_million(
            choice.false_positive_rate, choice.recall, known=_known_fraction(ts, n_index), likely=excluded),
        "expected_false_hits_per_million_upper": _upper_false_positive_rate(fit, choice, n_neg) * 1e6,
        "false_hits_per_million_95": _false_positive_bound(choice.false_positive_rate, n_neg) * 1e6,
        "expected_false_hits_in_index": choice.false_positive_rate * n_index,
        "n_index_cells": n_index,
        "l2_selection": "given" if given_l2 else "cross-validated AUPRC on the same folds (slightly optimistic)",
        "final_fit_iterations": fit.n_iter,
        "note": "precision/recall/AUPRC are cross-validated on the training mix (labelled positives vs the "
        "background sample); atlas-wide precision depends on the prevalence: use expected_false_hits_in_index",
    }


BACKGROUND_MOST = 0.5
"""A background over this share of the atlas' cells is warned about (:func:`_warn_background_is_the_atlas`)."""


def _warn_background_is_the_atlas(ts: _TrainingSet, n_atlas: int) -> None:
    """Warn when the atlas background (negatives) holds most of the atlas: the sweep then scores mostly cells the
    classifier was trained on as negatives, so the atlas' own cells of the hunted type (under other labels, in
    other datasets) score low by construction unless set aside as likely positives, and the cross-validated
    figures cannot show it."""
    n_bg = ts.counts.get("negatives_from_atlas", 0)
    if n_atlas and n_bg > BACKGROUND_MOST * n_atlas:
        logger.warning(
            "the atlas background holds %d of the atlas' %d cells (%.0f%%): the sweep scores cells the classifier "
            "learnt as negatives, so atlas cells of the hunted type (e.g. another study's, under its own labels) "
            "score low unless set aside as likely positives (%d were), and the cross-validated figures cannot show "
            "it; on an atlas this small, compare with a sweep trained with a smaller --background (or 0: negatives "
            "from the labelled cells only)", n_bg, n_atlas, 100 * n_bg / n_atlas,
            ts.counts.get("background_excluded_as_likely_positive", 0),
        )


def _check_separates(fit: _Fit, choice: ThresholdChoice, ts: _TrainingSet) -> None:
    """InputError when the classifier at its cut calls most negatives hits: nothing rare is being told apart (e.g.
    a positive predicate matching every labelled cell, or positives like the whole atlas); a warning when its
    cross-validated precision there is under :data:`POOR_PRECISION`."""
    if choice.false_positive_rate <= MAX_FALSE_POSITIVE_RATE and choice.precision >= POOR_PRECISION:
        return
    auprc = average_precision(fit.y, fit.cv.oof_scores)
    if choice.false_positive_rate <= MAX_FALSE_POSITIVE_RATE:
        logger.warning("the classifier separates the positives poorly: cross-validated precision %.3f at its cut "
                       "(AUPRC %.3f, %.3f by chance); most hits will be false", choice.precision, auprc,
                       ts.n_positive / (ts.n_positive + ts.n_negative))
        return
    raise InputError(
        f"the classifier cannot tell the {ts.n_positive} positives from the {ts.n_negative} negatives: at its best cut "
        f"it calls {100 * choice.false_positive_rate:.0f}% of the negatives hits (cross-validated AUPRC {auprc:.3f}, "
        f"{ts.n_positive / (ts.n_positive + ts.n_negative):.3f} by chance). Check the positive predicate: it should "
        "select a rare type that differs from the other cells"
    )


def _false_positive_bound(rate: float, n_neg: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a false-positive rate observed as ``rate`` on ``n_neg`` negatives
    (0 false hits among 5,641 negatives still allows up to 531 per million at 95%)."""
    from scipy.stats import beta

    if n_neg <= 0:
        return 1.0
    fp = int(round(rate * n_neg))
    return 1.0 if fp >= n_neg else float(beta.ppf(level, fp + 1, n_neg - fp))


def _upper_false_positive_rate(fit: _Fit, choice: ThresholdChoice, n_neg: int) -> float:
    """The false-positive rate at the threshold if the background cells set aside as likely unlabelled positives
    were negatives after all: those the final fit scores at or above the threshold (it never saw them, so its
    scores are held-out) counted as false hits."""
    if not len(fit.excluded):
        return choice.false_positive_rate
    above = int((exact_scores(fit.excluded, fit.weights, fit.bias) >= choice.threshold).sum())
    return (choice.false_positive_rate * n_neg + above) / (n_neg + len(fit.excluded))


def _versions() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
