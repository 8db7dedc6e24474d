"""Ranking metrics on scores (AUPRC, ROC AUC, the precision/recall curve) and the choice of a decision threshold."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PRCurve:
    """Counts at each distinct score, from the highest: predicting ``score >= thresholds[i]`` positive."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.tp + self.fp, 1)

    @property
    def recall(self) -> np.ndarray:
        return self.tp / max(self.n_pos, 1)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        return np.divide(2 * p * r, p + r, out=np.zeros_like(p, dtype=np.float64), where=(p + r) > 0)


def pr_curve(y: np.ndarray, scores: np.ndarray) -> PRCurve:
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.zeros(0, dtype=np.int64)
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    return PRCurve(thresholds=s[last], tp=tp, fp=fp, n_pos=int(y.sum()), n_neg=int((~y).sum()))


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function (sklearn's ``average_precision_score``)."""
    curve = pr_curve(y, scores)
    if curve.n_pos == 0:
        return float("nan")
    recall = np.r_[0.0, curve.recall]
    return float(np.sum(np.diff(recall) * curve.precision))


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the rank-sum statistic (ties count one half)."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold on raw scores (``score >= threshold`` is a hit) and its cross-validated operating point."""

    threshold: float
    rule: str
    precision: float
    recall: float
    f1: float
    false_positive_rate: float
    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threshold(y: np.ndarray, scores: np.ndarray, *, target_precision: float | None = None) -> ThresholdChoice:
    """Pick the cut on out-of-fold scores.

    Default (``target_precision=None``): maximum F1 (ties -> the higher threshold). With ``target_precision``:
    the lowest threshold whose precision is at least the target (most recall at that precision); when no cut
    reaches it, maximum F1 with a warning. The threshold is the midpoint between the last score kept and the next
    lower score, so it does not sit exactly on a training cell.
    """
    curve = pr_curve(y, scores)
    if curve.n_pos == 0:
        raise ValueError("no positives to choose a threshold from")
    rule = "max_f1"
    i = int(np.argmax(curve.f1))
    if target_precision is not None:
        ok = np.flatnonzero(curve.precision >= target_precision)
        if len(ok):
            i = int(ok[-1])
            rule = f"precision>={target_precision:g}"
        else:
            logger.warning(
                "no threshold reaches the target precision %.3f on cross-validation (best %.3f); using max F1",
                target_precision, float(curve.precision.max()),
            )
    thr = float(curve.thresholds[i])
    if i + 1 < len(curve.thresholds):
        thr = 0.5 * (thr + float(curve.thresholds[i + 1]))
    tp, fp = int(curve.tp[i]), int(curve.fp[i])
    fn, tn = curve.n_pos - tp, curve.n_neg - fp
    return ThresholdChoice(
        threshold=thr,
        rule=rule,
        precision=float(curve.precision[i]),
        recall=float(curve.recall[i]),
        f1=float(curve.f1[i]),
        false_positive_rate=fp / max(curve.n_neg, 1),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
    )
