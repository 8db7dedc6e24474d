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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import MIN_GENE_OVERLAP, check_overlap
from scatlas.atlas.outputs import CLASSIFIER, check_output_dir
from scatlas.atlas.sources.base import iter_cell_chunks
from scatlas.atlas.sources.h5ad import open_h5ad
from scatlas.query.align import DEFAULT_SAMPLE as ALIGN_SAMPLE
from scatlas.query.align import apply_shift, estimate_shift
from scatlas.query.hunt.access import (
    IndexLike,
    embedder_fingerprint,
    gather_vectors,
    index_dim,
    manifest_id,
    open_index,
    sample_ids,
    shard_sizes,
    sql_ids,
)
from scatlas.query.hunt.calibration import CalibrationMethod, fit_calibration
from scatlas.query.hunt.classifier import HuntClassifier
from scatlas.query.hunt.device import resolve_device
from scatlas.query.hunt.logistic import DEFAULT_L2_GRID, cross_validate, fit_logistic
from scatlas.query.hunt.metrics import average_precision, choose_threshold, roc_auc
from scatlas.query.hunt.predicate import evaluate_predicate

logger = logging.getLogger(__name__)

MIN_POSITIVES = 3
"""Fewer labelled positives than this cannot be cross-validated; training refuses them."""
FEW_POSITIVES = 10
"""Below this, metrics are reported with a warning that they are very uncertain."""
DUPLICATE_COSINE = 0.9995
"""Background cells this similar to a labelled positive are the same cell (the labelled dataset is in the atlas)."""
SPY_QUANTILE = 0.1
MAX_EXCLUDED = 0.01


def _embed_rows(index: Any, source: Any, rows: np.ndarray, chunk_size: int, progress: bool) -> np.ndarray:
    embedder = index.embedder
    obsm_keys: tuple[str, ...] = ()
    if getattr(embedder, "needs", "X") == "obsm":
        key = embedder.obsm_key
        if key not in source.obsm_keys():
            raise InputError(
                f"the index's embedder reads obsm[{key!r}], which {source.name} does not have (it has: "
                f"{source.obsm_keys() or 'none'}); embed the cells with the same model first"
            )
        obsm_keys = (key,)
    out = np.empty((len(rows), index_dim(index)), dtype=np.float32)
    pos = 0
    with tqdm(total=len(rows), desc="embed cells", unit="cell", disable=not progress) as bar:
        for chunk in iter_cell_chunks(source, chunk_size=chunk_size, rows=rows, obsm_keys=obsm_keys):
            vec = np.asarray(index.embed(chunk), dtype=np.float32)
            if vec.shape != (len(chunk), out.shape[1]):
                raise InputError(f"the embedder returned shape {vec.shape} for {len(chunk)} cells")
            out[pos : pos + len(chunk)] = vec
            pos += len(chunk)
            bar.update(len(chunk))
    return out


def _as_stored(x: np.ndarray) -> np.ndarray:
    """L2-normalise and round through float16, as the index stores vectors."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return x.astype(np.float16).astype(np.float32)


IN_ATLAS_PROBE = 200
IN_ATLAS_SIMILARITY = 0.999
"""A labelled cell whose nearest atlas cell is this similar (cosine; float16 storage rounds ~1e-4) is an atlas cell."""


def _align_to_atlas(
    idx: Any, pos: np.ndarray, neg: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Shift the labelled cells' vectors onto the atlas by the MNN offset estimated on a sample of all of them.

    When the labelled cells are themselves in the atlas (most of a sample has an identical stored vector), there is
    no offset to correct and they are left as they are.
    """
    both = np.concatenate([pos, neg])
    rng = np.random.default_rng(seed)
    probe = both[np.sort(rng.choice(len(both), size=min(len(both), IN_ATLAS_PROBE), replace=False))]
    top = idx.search(probe, k=1).scores[:, 0]
    in_atlas = float(np.mean(top >= IN_ATLAS_SIMILARITY))
    if in_atlas >= 0.5:
        logger.info("%.0f%% of the labelled cells are atlas cells: no alignment needed", 100 * in_atlas)
        return pos, neg, {"skipped": "the labelled cells are in the atlas", "in_atlas_fraction": in_atlas}
    rows = np.sort(rng.choice(len(both), size=min(len(both), ALIGN_SAMPLE), replace=False))
    alignment = estimate_shift(idx, both[rows])
    info = {"shift_norm": float(np.linalg.norm(alignment.shift)), "mnn_pairs": alignment.n_pairs,
            "sample": alignment.n_sample, "in_atlas_fraction": in_atlas}
    logger.info("aligned the labelled cells onto the atlas: shift %.3f from %d MNN pairs", info["shift_norm"],
                alignment.n_pairs)
    return apply_shift(pos, alignment.shift), apply_shift(neg, alignment.shift), info


def _cells_part(
    index: Any,
    cells: Any,
    positive: str | None,
    max_positives: int,
    cell_negatives: int,
    min_gene_overlap: float,
    chunk_size: int,
    seed: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embedded positives and sampled negatives of the labelled cells, and a report."""
    if positive is None:
        raise InputError("labelled cells were given without a positive predicate; pass positive=\"cell_type == 'X'\"")
    source = open_h5ad(cells)
    try:
        mask = evaluate_predicate(source.obs, positive)
        pos_rows = np.flatnonzero(mask).astype(np.int64)
        neg_all = np.flatnonzero(~mask).astype(np.int64)
        rng = np.random.default_rng(seed)
        if len(pos_rows) > max_positives:
            logger.info("using %d of the %d matching labelled cells (max_positives)", max_positives, len(pos_rows))
            pos_rows = np.sort(rng.choice(pos_rows, size=max_positives, replace=False))
        n_neg = min(max(int(cell_negatives), 0), len(neg_all))
        neg_rows = np.sort(rng.choice(neg_all, size=n_neg, replace=False)) if n_neg else np.zeros(0, dtype=np.int64)
        report: dict[str, Any] = {
            "source": getattr(source, "name", "cells"),
            "n_cells": int(source.n_obs),
            "n_matching": len(pos_rows),
            "expression": source.expression.describe(),
        }
        if len(pos_rows) == 0:
            return np.zeros((0, index_dim(index)), np.float32), np.zeros((0, index_dim(index)), np.float32), report
        match = index.embedder.gene_match(source.genes)
        if match is not None:
            check_overlap(match, what=f"labelled cells ({report['source']})", against="index's embedder",
                          min_fraction=min_gene_overlap)
            report["gene_overlap"] = match.summary()
        rows = np.union1d(pos_rows, neg_rows)
        vec = _as_stored(_embed_rows(index, source, rows, chunk_size, progress))
        is_pos = np.isin(rows, pos_rows)
        return vec[is_pos], vec[~is_pos], report
    finally:
        source.close()


def _duplicates(bg: np.ndarray, pos: np.ndarray, block: int = 4096) -> np.ndarray:
    """Background rows whose vector is (nearly) identical to a labelled positive's (cosine >= DUPLICATE_COSINE)."""
    out = np.zeros(len(bg), dtype=bool)
    for a in range(0, len(pos), block):
        sims = bg @ pos[a : a + block].T
        out |= sims.max(axis=1) >= DUPLICATE_COSINE
    return out


def _likely_positives(pos_oof: np.ndarray, bg_oof: np.ndarray) -> np.ndarray:
    """Background cells scoring like held-out positives: out-of-fold score >= the SPY_QUANTILE of the positives'.

    The held-out positives act as "spies" (PU learning): a background cell above most of them is more likely an
    unlabelled member of the rare population than a negative. At most MAX_EXCLUDED of the background is excluded
    (the best-scoring ones): a rare population cannot be more than that.
    """
    cut = float(np.quantile(pos_oof, SPY_QUANTILE))
    suspect = bg_oof >= cut
    cap = max(1, int(MAX_EXCLUDED * len(bg_oof)))
    if suspect.sum() > cap:
        logger.warning(
            "%d background cells (%.1f%%) score like the positives; excluding only the best %d: the classifier "
            "separates the positives poorly", int(suspect.sum()), 100 * suspect.mean(), cap,
        )
        keep = np.argsort(-bg_oof, kind="stable")[:cap]
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
    progress: bool = True,
    align: Literal["none", "mnn"] = "mnn",
) -> HuntClassifier:
    """Train a hunt classifier; save it to ``out`` when given.

    Parameters
    ----------
    index: an opened :class:`index.AtlasIndex` or the path of an index directory.
    cells: labelled cells: an ``.h5ad`` path or an AnnData (never modified); embedded with the index's embedder
        (gene overlap reported, refused below ``min_gene_overlap``).
    positive: which of ``cells`` are positives: a predicate over their obs such as ``"cell_type == 'Norn cell'"``
        (``==``, ``!=``, ``<``..., ``in [...]``, ``and`` / ``or`` / ``not``; see :mod:`query.hunt.predicate`).
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
    clean_background: the atlas background is unlabelled, so it holds some cells of the rare population too. With
        this (default), background cells identical to a labelled positive are dropped, and after a first
        cross-validation the background cells whose out-of-fold score reaches the 10% quantile of the held-out
        positives' scores (at most 1% of the background) are excluded as likely unlabelled positives, and the
        model is cross-validated and fitted again; ``counts`` records how many. The reported metrics are those of
        the second round (cells excluded as likely positives count neither way).

    align: ``"mnn"`` (default) shifts the labelled cells' vectors onto the atlas before training, as annotate does
        for queries (:mod:`query.align`: one offset from mutual nearest neighbours). Without it, labelled cells from
        another batch or condition than the atlas differ from every atlas cell by that batch's offset; because all
        positives come from the labelled cells and most negatives from the atlas, the classifier learns the offset
        as "positive" and then scores the atlas' own rare cells too low (measured on kang2018 and the symphony
        chemistries: see docs/benchmarks.md, rare-cell hunt on real data). ``"none"`` trains on the vectors as
        embedded.

    Raises InputError when no positive or no negative cell is found, or fewer than 3 positives.
    """
    t0 = time.perf_counter()
    inputs = _input_paths(index, cells)
    if out is not None:  # refuse a bad output before the work, not after it
        check_output_dir(out, CLASSIFIER, inputs=inputs, replace=True)
    idx = open_index(index)
    if cells is None and positive_sql is None:
        raise InputError("no positives: give labelled cells with positive=..., or positive_sql=... over the atlas")
    if cells is None and positive is not None:
        raise InputError("positive=... selects among labelled cells, but no cells were given; use positive_sql for atlas cells")
    if n_folds < 2:
        raise InputError(f"n_folds must be at least 2 (got {n_folds})")
    if align not in ("none", "mnn"):
        raise InputError(f"align must be 'none' or 'mnn' (got {align!r})")
    if background < 0 or cell_negatives < 0 or max_positives < MIN_POSITIVES:
        raise InputError(f"background and cell_negatives must be >= 0 and max_positives >= {MIN_POSITIVES}")
    torch_device = resolve_device(device)
    dim = index_dim(idx)

    pos_parts: list[np.ndarray] = []
    labelled_pos = np.zeros((0, dim), dtype=np.float32)
    neg_parts: list[np.ndarray] = []
    counts: dict[str, int] = {}
    report: dict[str, Any] = {}
    if cells is not None:
        cpos, cneg, report = _cells_part(
            idx, cells, positive, max_positives, cell_negatives, min_gene_overlap, chunk_size, seed, progress
        )
        labelled_pos = cpos  # as embedded: compared with stored atlas vectors to find the labelled cells in the atlas
        if align == "mnn" and len(cpos) + len(cneg):
            cpos, cneg, report["alignment"] = _align_to_atlas(idx, cpos, cneg, seed)
        pos_parts.append(cpos)
        neg_parts.append(cneg)
        counts["positives_from_cells"], counts["negatives_from_cells"] = len(cpos), len(cneg)
    atlas_pos_ids = np.zeros(0, dtype=np.int64)
    if positive_sql is not None:
        atlas_pos_ids = sql_ids(idx, positive_sql)
        counts["atlas_cells_matching_sql"] = len(atlas_pos_ids)
        if len(atlas_pos_ids) > max_positives:
            logger.info("using %d of the %d atlas cells matching the SQL predicate (max_positives)", max_positives,
                        len(atlas_pos_ids))
            rng = np.random.default_rng(seed)
            atlas_pos_ids = np.sort(rng.choice(atlas_pos_ids, size=max_positives, replace=False))
        if len(atlas_pos_ids):
            pos_parts.append(gather_vectors(idx, atlas_pos_ids))
        counts["positives_from_atlas"] = len(atlas_pos_ids)
    n_pos = sum(len(p) for p in pos_parts)
    if n_pos == 0:
        where = []
        if cells is not None:
            where.append(f"the predicate {positive!r} matches none of the {report.get('n_cells', '?')} labelled cells")
        if positive_sql is not None:
            where.append(f"the SQL predicate {positive_sql!r} matches no atlas cell")
        raise InputError(f"empty positive set: {' and '.join(where)}; check the column values (e.g. spelling, case)")
    if n_pos < MIN_POSITIVES:
        raise InputError(f"only {n_pos} positive cell(s); at least {MIN_POSITIVES} are needed to cross-validate")
    bg_ids = sample_ids(idx, background, exclude=atlas_pos_ids, seed=seed)
    bg = gather_vectors(idx, bg_ids) if len(bg_ids) else np.zeros((0, dim), np.float32)
    P = np.concatenate([p for p in pos_parts if len(p)]).astype(np.float32)
    N = np.concatenate([p for p in neg_parts if len(p)] or [np.zeros((0, dim), np.float32)]).astype(np.float32)
    if cells is not None and len(labelled_pos) and len(bg):
        dup = _duplicates(bg, labelled_pos)
        if dup.any():
            logger.info("dropped %d background cells identical to labelled positives (the labelled dataset is in "
                        "the atlas)", int(dup.sum()))
            bg, bg_ids = bg[~dup], bg_ids[~dup]
        counts["background_duplicates_dropped"] = int(dup.sum())
    if len(N) + len(bg) == 0:
        raise InputError("no negative cells: the atlas background is empty (background=0 or every atlas cell is "
                         "positive) and the labelled cells have no non-matching cells; raise background")
    if n_pos < FEW_POSITIVES:
        logger.warning("only %d positive cells: cross-validated metrics are very uncertain", n_pos)

    k = int(min(n_folds, n_pos))
    grid = (float(l2),) if l2 is not None else DEFAULT_L2_GRID
    X = np.concatenate([P, N, bg])
    y = np.r_[np.ones(len(P), dtype=bool), np.zeros(len(N) + len(bg), dtype=bool)]
    cv = cross_validate(X, y, l2_grid=grid, n_folds=k, seed=seed, device=torch_device)
    counts["background_excluded_as_likely_positive"] = 0
    if clean_background and len(bg):
        suspect = _likely_positives(cv.oof_scores[: len(P)], cv.oof_scores[len(P) + len(N) :])
        if suspect.any():
            logger.info(
                "excluding %d of %d background cells that score like the labelled positives (likely unlabelled "
                "positives); refitting", int(suspect.sum()), len(bg),
            )
            bg, bg_ids = bg[~suspect], bg_ids[~suspect]
            counts["background_excluded_as_likely_positive"] = int(suspect.sum())
            X = np.concatenate([P, N, bg])
            y = np.r_[np.ones(len(P), dtype=bool), np.zeros(len(N) + len(bg), dtype=bool)]
            cv = cross_validate(X, y, l2_grid=grid, n_folds=k, seed=seed, device=torch_device)
    counts["negatives_from_atlas"] = len(bg)
    n_neg = len(N) + len(bg)
    counts["n_positive"], counts["n_negative"] = n_pos, n_neg
    choice = choose_threshold(y, cv.oof_scores, target_precision=target_precision)
    calib = fit_calibration(cv.oof_scores, y, calibration)
    final = fit_logistic(X, y, cv.l2, device=torch_device)

    n_index = sum(n for _, n in shard_sizes(idx))
    metrics: dict[str, Any] = {
        "cv_folds": k,
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
        "expected_false_hits_in_index": choice.false_positive_rate * n_index,
        "n_index_cells": n_index,
        "l2_selection": "given" if l2 is not None else "cross-validated AUPRC on the same folds (slightly optimistic)",
        "final_fit_iterations": final.n_iter,
        "note": "precision/recall/AUPRC are cross-validated on the training mix (labelled positives vs the "
        "background sample); atlas-wide precision depends on the prevalence: use expected_false_hits_in_index",
    }
    import torch

    clf = HuntClassifier(
        weights=final.weights,
        bias=final.bias,
        threshold=choice.threshold,
        calibration=calib,
        embedder_fingerprint=embedder_fingerprint(idx),
        index_manifest_id=manifest_id(idx),
        metrics=metrics,
        counts=counts,
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
            "cells": report,
        },
        versions={"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
    )
    secs = time.perf_counter() - t0
    logger.info(
        "trained hunt classifier %s on %d positive / %d negative cells in %.1fs: CV AUPRC %.3f (baseline %.3f), "
        "at threshold %.3f precision %.3f recall %.3f; expected false hits %.1f per million atlas cells",
        clf.fingerprint(), n_pos, n_neg, secs, metrics["auprc"], metrics["auprc_baseline"], clf.threshold,
        choice.precision, choice.recall, metrics["expected_false_hits_per_million"],
    )
    if out is not None:
        clf.save(out, inputs=inputs)
    return clf


def _input_paths(index: Any, cells: Any) -> tuple[Path, ...]:
    """The files and directories training reads: the index directory and the labelled cells' file."""
    found = [index, getattr(index, "path", None), cells]
    return tuple(Path(p) for p in found if isinstance(p, str | Path))
