"""Stage 2 of a two-stage hunt: a logistic classifier on gene features, and stage 1's candidate cut.

Stage 1 (the linear score on stored vectors) passes candidates at a cut chosen for recall; stage 2 scores the
candidates on the embedder's gene features (log1p CP10k of its genes, read from the atlas store) and decides the
hits. Stage 2 is class-balanced and L2-regularised (:mod:`query.hunt.logistic`), calibrated, and its cut is chosen
on its out-of-fold scores, with stage 1's folds.

Batches (``batch_standardized``): the gene features of the labelled cells and of each atlas dataset differ by their
batch (chemistry, lab, a stimulation of the whole sample) as much as by cell type, and a classifier trained on one
batch's cells misreads another's. So each gene is standardised within its batch: the labelled cells by their own
mean and standard deviation, an atlas cell by those of its dataset (estimated on :data:`BATCH_SAMPLE` of its cells,
:func:`query.hunt.gene_reads.dataset_gene_stats`), the deviation floored at ``sd_floor`` (the median deviation of
the labelled cells' genes) so that a gene that barely varies in one batch is not blown up. Stage 2 trains only on
rows of batches that hold both classes (:func:`query.hunt.train`): an atlas background that is all negative
(and holds the unlabelled positives) would teach it "the atlas' batch is negative" (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.query.hunt.calibration import (
    Calibration,
    CalibrationMethod,
    expected_hits_per_million,
    fit_calibration,
)
from scatlas.query.hunt.logistic import DEFAULT_L2_GRID, cross_validate, fit_logistic
from scatlas.query.hunt.metrics import average_precision, choose_threshold, roc_auc

logger = logging.getLogger(__name__)

BATCH_SAMPLE = 1_000
"""Cells sampled from an atlas dataset to estimate its genes' mean and standard deviation."""

STAGE1_RECALL = 0.98
"""Stage 1's candidate cut keeps at least this fraction of the positives stage 2 recalls, and of all labelled
positives (cross-validated), and is never above stage 1's own threshold."""


@dataclass(frozen=True)
class GeneStats:
    """Per-gene mean and standard deviation (float64) of one batch's gene features, from ``n`` cells."""

    mean: np.ndarray
    sd: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> GeneStats:
        g = np.asarray(features, dtype=np.float64)
        if g.ndim != 2 or len(g) == 0:
            raise InputError(f"gene statistics need at least one cell (got features of shape {g.shape})")
        return cls(g.mean(axis=0), g.std(axis=0), len(g))

    def floor(self) -> float:
        """The median standard deviation of the genes that vary (1.0 when none does)."""
        varying = self.sd[self.sd > 0]
        return float(np.median(varying)) if len(varying) else 1.0


def standardize(features: np.ndarray, stats: GeneStats, sd_floor: float) -> np.ndarray:
    """``(features - mean) / max(sd, sd_floor)`` per gene, float64."""
    g = np.asarray(features, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != len(stats.mean):
        raise InputError(f"gene features of shape {g.shape} do not match statistics of {len(stats.mean)} genes")
    return (g - stats.mean) / np.maximum(stats.sd, sd_floor)


@dataclass
class GeneStage:
    """``score(g) = weights . g + bias`` on gene features ``g`` (columns ``gene_names``); ``>= threshold`` is a
    hit. ``stage1_cut``: the cut on stage 1's raw score that passes candidates to this stage.

    With ``batch_standardized`` the weights act on features standardised within each cell's batch
    (:func:`standardize`, floored at ``sd_floor``; an atlas dataset's statistics from ``batch_sample`` of its
    cells); without (classifiers trained before it existed), on the features as they are."""

    weights: np.ndarray
    bias: float
    threshold: float
    calibration: Calibration
    gene_names: list[str]
    stage1_cut: float
    metrics: dict[str, Any] = field(default_factory=dict)
    batch_standardized: bool = False
    sd_floor: float = 1.0
    batch_sample: int = BATCH_SAMPLE

    def __post_init__(self) -> None:
        self.weights = np.ascontiguousarray(np.asarray(self.weights, dtype=np.float32).ravel())
        self.bias, self.threshold, self.stage1_cut = float(self.bias), float(self.threshold), float(self.stage1_cut)
        self.gene_names = [str(g) for g in self.gene_names]
        if len(self.gene_names) != len(self.weights):
            raise InputError(f"stage 2 has {len(self.weights)} weights for {len(self.gene_names)} gene names")
        if not np.isfinite(self.weights).all() or not np.isfinite(self.bias):
            raise InputError("stage 2 weights must be finite")
        self.batch_standardized = bool(self.batch_standardized)
        self.sd_floor, self.batch_sample = float(self.sd_floor), int(self.batch_sample)
        if not (self.sd_floor > 0 and np.isfinite(self.sd_floor)) or self.batch_sample < 2:
            raise InputError(f"stage 2 needs sd_floor > 0 and batch_sample >= 2 (got {self.sd_floor}, {self.batch_sample})")

    def scores(self, features: np.ndarray, stats: GeneStats | None = None) -> np.ndarray:
        """Raw scores of gene features ``(n, n_genes)`` of one batch (``stats``: its statistics, required when
        ``batch_standardized``): float64 ``einsum`` (independent of how rows are chunked), as float32."""
        g = np.asarray(features, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != len(self.weights):
            raise InputError(f"gene features of shape {g.shape} do not match stage 2's {len(self.weights)} genes")
        if self.batch_standardized:
            if stats is None:
                raise InputError("this stage 2 standardises genes within each batch: give the batch's statistics")
            g = standardize(g, stats, self.sd_floor)
        return (np.einsum("ij,j->i", g, self.weights.astype(np.float64)) + self.bias).astype(np.float32)

    def _batch_record(self) -> dict[str, Any]:
        """What batch standardisation adds to the record (nothing for a stage 2 without it: its fingerprint stays)."""
        return ({"batch_standardized": True, "sd_floor": self.sd_floor, "batch_sample": self.batch_sample}
                if self.batch_standardized else {})

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.weights.tobytes())
        h.update(json.dumps({"bias": self.bias, "threshold": self.threshold, "stage1_cut": self.stage1_cut,
                             "calibration": self.calibration.to_dict(), "genes": self.gene_names,
                             **self._batch_record()}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """Everything but the weights (saved beside, with their SHA-256 here)."""
        return {"bias": self.bias, "threshold": self.threshold, "stage1_cut": self.stage1_cut,
                "calibration": self.calibration.to_dict(), "gene_names": self.gene_names, "metrics": self.metrics,
                "fingerprint": self.fingerprint(), **self._batch_record(),
                "weights_sha256": hashlib.sha256(self.weights.tobytes()).hexdigest()}

    @classmethod
    def from_json(cls, meta: dict[str, Any], weights: np.ndarray) -> GeneStage:
        return cls(weights=weights, bias=meta["bias"], threshold=meta["threshold"],
                   calibration=Calibration.from_dict(meta["calibration"]), gene_names=list(meta["gene_names"]),
                   stage1_cut=meta["stage1_cut"], metrics=dict(meta.get("metrics", {})),
                   batch_standardized=bool(meta.get("batch_standardized", False)),
                   sd_floor=meta.get("sd_floor", 1.0), batch_sample=meta.get("batch_sample", BATCH_SAMPLE))


def stage1_candidate_cut(stage1_oof: np.ndarray, recalled: np.ndarray, recall: float = STAGE1_RECALL) -> float:
    """The highest stage-1 cut keeping at least ``recall`` of the ``recalled`` positives (their out-of-fold
    stage-1 scores ``stage1_oof[recalled]``); all of the positives when stage 2 recalls none."""
    s = np.sort(np.asarray(stage1_oof, dtype=np.float64)[recalled])
    if len(s) == 0:
        raise InputError("no positive to choose stage 1's candidate cut from")
    drop = int(np.floor((1.0 - recall) * len(s) + 1e-9))
    return float(np.nextafter(np.float32(s[drop]), np.float32(-np.inf)))  # float32 scores at the cut pass


def prefer_two_stages(metrics: dict[str, Any], *, atlas_background: bool = True) -> tuple[bool, str]:
    """Whether a trained stage 2 should decide the hits (``two_stage="auto"``), and why: its two stages'
    cross-validated F1 must beat stage 1 alone's on the same training rows and folds (``metrics``: a
    :class:`GeneStage`'s). A tie keeps stage 1 alone, which reads no expression. ``atlas_background``: whether stage 1
    was trained with atlas background cells as negatives (said in the reason)."""
    two, one = metrics["two_stage"]["f1"], metrics["stage1_alone"]["f1"]
    verdict = two > one
    rows = metrics.get("rows") or {}
    origin = metrics.get("training_rows") or {}
    labelled = origin.get("labelled_positives", 1) + origin.get("labelled_negatives", 0) > 0
    atlas = origin.get("atlas_positives", 0) + origin.get("atlas_background", 0) > 0
    whose = {(False, True): "atlas cells", (True, True): "labelled and atlas cells"}.get((labelled, atlas),
                                                                                        "labelled cells")
    cells = f"{rows['positives']} positives and {rows['negatives']} negatives of the {whose}" if rows else \
        f"the same {whose}"
    return verdict, (f"cross-validated F1 of two stages {two:.3f} {'>' if verdict else '<='} stage 1 alone's {one:.3f} "
                     f"on {cells}, those stage 2 trains on" + ("; stage 1's own figures also count the atlas background "
                                                              "as negatives" if labelled and atlas_background else ""))


def _rates(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tp = int((predicted & y).sum())
    fp = int((predicted & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / n_pos if n_pos else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "false_positive_rate": fp / n_neg if n_neg else 0.0}


def fit_gene_stage(
    G: np.ndarray,
    y: np.ndarray,
    stage1_oof: np.ndarray,
    gene_names: list[str],
    *,
    stage1_threshold: float,
    l2: float | None,
    n_folds: int,
    seed: int,
    device: str,
    calibration: CalibrationMethod,
    target_precision: float | None,
    excluded_fraction: float = 0.0,
    known_fraction: float = 0.0,
    sd_floor: float | None = None,
    batch_sample: int = BATCH_SAMPLE,
) -> GeneStage:
    """Cross-validate and fit stage 2 on gene features ``G`` of the training cells ``y`` (the rows, order and
    folds of stage 1, whose out-of-fold scores are ``stage1_oof``); choose stage 1's candidate cut: the lowest of
    the :data:`STAGE1_RECALL` cut over the positives stage 2 recalls, that over all positives, and
    ``stage1_threshold`` (stage 1's own cut), so that stage 2 never sees fewer cells than stage 1 alone would hit.

    ``excluded_fraction``: the share of the atlas background sample dropped as likely positives, ``known_fraction``:
    the share of the atlas known to be positives (a ``positive_sql`` predicate's): both enter the expected hits per
    million atlas cells (:func:`~query.hunt.calibration.expected_hits_per_million`). ``sd_floor``: ``G`` is standardised within batches with this floor
    (:func:`standardize`; the stage is ``batch_standardized`` and fits the features as they are); None: ``G`` is
    the raw gene features (standardised globally by the fit, as before batches were).
    """
    y = np.asarray(y).astype(bool)
    grid = (float(l2),) if l2 is not None else DEFAULT_L2_GRID
    std = sd_floor is None
    n_folds = int(min(n_folds, y.sum()))
    cv = cross_validate(G, y, l2_grid=grid, n_folds=n_folds, seed=seed, device=device, standardize=std)
    choice = choose_threshold(y, cv.oof_scores, target_precision=target_precision)
    recalled = y & (cv.oof_scores >= choice.threshold)
    cut1 = min(stage1_candidate_cut(stage1_oof, recalled if recalled.any() else y), stage1_candidate_cut(stage1_oof, y),
               float(np.nextafter(np.float32(stage1_threshold), np.float32(-np.inf))))
    passed1 = np.asarray(stage1_oof) >= cut1
    both = passed1 & (cv.oof_scores >= choice.threshold)
    final = fit_logistic(G, y, cv.l2, device=device, standardize=std)
    two = _rates(y, both)
    one = _rates(y, np.asarray(stage1_oof) >= stage1_threshold)
    metrics = {
        "cv_folds": n_folds,
        "l2": cv.l2,
        "auprc_by_l2": {f"{lam:g}": v for lam, v in sorted(cv.ap_by_l2.items())},
        "auprc": average_precision(y, cv.oof_scores),
        "roc_auc": roc_auc(y, cv.oof_scores),
        "threshold": choice.to_dict(),
        "precision": choice.precision,
        "recall": choice.recall,
        "f1": choice.f1,
        "stage1_candidates": {**_rates(y, passed1), "cut": cut1, "recall_of_stage2_recalled":
                              float(passed1[recalled].mean()) if recalled.any() else float("nan")},
        "two_stage": {
            **two,
            "expected_false_hits_per_million": two["false_positive_rate"] * 1e6,
            "expected_hits_per_million": expected_hits_per_million(
                two["false_positive_rate"], two["recall"], known=known_fraction, likely=excluded_fraction),
        },
        # stage 1 alone at its own threshold, on these rows and folds: what "auto" weighs two stages against
        "stage1_alone": one,
        "rows": {"positives": int(y.sum()), "negatives": int((~y).sum())},
        "n_genes": G.shape[1],
        "final_fit_iterations": final.n_iter,
    }
    logger.info(
        "stage 2 on %d genes: CV AUPRC %.3f, precision %.3f recall %.3f at its cut; stage 1 passes %.4f%% of the "
        "negatives at cut %.4f; two stages: precision %.3f recall %.3f", G.shape[1], metrics["auprc"],
        choice.precision, choice.recall, 100 * metrics["stage1_candidates"]["false_positive_rate"], cut1,
        two["precision"], two["recall"],
    )
    return GeneStage(weights=final.weights, bias=final.bias, threshold=choice.threshold,
                     calibration=fit_calibration(cv.oof_scores, y, calibration), gene_names=list(gene_names),
                     stage1_cut=cut1, metrics=metrics, batch_standardized=not std,
                     sd_floor=sd_floor if sd_floor is not None else 1.0, batch_sample=batch_sample)
