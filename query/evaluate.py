"""Scoring predicted labels against known ones, with abstention and cell types the atlas does not have.

Query cells fall in three groups:

* **known**: the truth label is in the atlas label set; accuracy, macro-F1 and per-class precision/recall are
  computed on them, and an ``"unknown"`` prediction counts as a miss (it lowers recall, adds no false
  positive).
* **absent**: the truth label is not in the atlas label set; the right answer is to abstain, so they are
  scored by ``abstention_rate_absent`` (fraction predicted ``"unknown"``) and excluded from accuracy and F1.
* **unlabelled**: no truth label (NULL/NaN/empty); ignored.

``macro_f1_open`` scores both groups at once: macro-F1 over the known classes plus one ``"unknown"`` class whose
truth is every absent cell. An absent cell called ``B`` is a false positive of ``B``, a known cell called
``"unknown"`` a false positive of ``"unknown"``, so abstaining pays exactly when it catches more absent cells
than it loses known ones. With no absent cells it equals ``macro_f1``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import pandas as pd

from scatlas.query.vote import UNKNOWN


def _as_str(values: Sequence[object] | np.ndarray | pd.Series) -> np.ndarray:
    s = pd.Series(np.asarray(values, dtype=object))
    out = s.astype(object).where(s.notna(), None).map(lambda v: None if v is None or str(v) == "" else str(v))
    return out.to_numpy(dtype=object)


def _ratio(num: float, den: float) -> float | None:
    return round(float(num) / float(den), 4) if den else None


def evaluate_labels(
    truth: Sequence[object] | np.ndarray | pd.Series,
    pred: Sequence[object] | np.ndarray | pd.Series,
    atlas_labels: Collection[str],
    *,
    unknown: str = UNKNOWN,
) -> dict[str, Any]:
    """Metrics of ``pred`` against ``truth``, JSON-serialisable (groups: see the module docstring)."""
    t = _as_str(truth)
    p = _as_str(pred)
    if len(t) != len(p):
        raise ValueError(f"truth ({len(t)}) and predictions ({len(p)}) differ in length")
    p = np.where(pd.isna(p), unknown, p).astype(object)
    atlas = {str(a) for a in atlas_labels}
    labelled = np.array([v is not None for v in t], dtype=bool)
    known = labelled & np.array([v in atlas for v in t], dtype=bool)
    absent = labelled & ~known
    tk, pk = t[known], p[known]
    classes = sorted(set(tk))
    per_class: dict[str, dict[str, float | int | None]] = {}
    f1s: list[float] = []
    for c in classes:
        tp = int(np.sum((tk == c) & (pk == c)))
        fp = int(np.sum((tk != c) & (pk == c)))
        fn = int(np.sum((tk == c) & (pk != c)))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_class[c] = {
            "precision": round(prec, 4),
            "recall": round(rec, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
            "unknown_rate": _ratio(np.sum((tk == c) & (pk == unknown)), tp + fn),
        }
    # open-set: absent cells are one more class, "unknown"
    tl, pl = t[labelled], p[labelled]
    to = np.where(known[labelled], tl, unknown).astype(object)
    open_classes = classes + ([unknown] if absent.any() and unknown not in classes else [])
    f1_open: list[float] = []
    for c in open_classes:
        tp = int(np.sum((to == c) & (pl == c)))
        fp = int(np.sum((to != c) & (pl == c)))
        fn = int(np.sum((to == c) & (pl != c)))
        f1_open.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assigned = pk != unknown
    absent_types: dict[str, dict[str, Any]] = {}
    for c in sorted(set(t[absent])):
        pc = p[absent][t[absent] == c]
        absent_types[c] = {
            "n": len(pc),
            "unknown_rate": _ratio(np.sum(pc == unknown), len(pc)),
            "predicted_as": dict(Counter(pc.tolist()).most_common(5)),
        }
    return {
        "n_cells": len(t),
        "n_known": int(known.sum()),
        "n_absent": int(absent.sum()),
        "n_unlabelled": int((~labelled).sum()),
        "accuracy": _ratio(np.sum(tk == pk), len(tk)),
        "macro_f1": round(float(np.mean(f1s)), 4) if f1s else None,
        "macro_f1_open": round(float(np.mean(f1_open)), 4) if f1_open else None,
        "unknown_rate_known": _ratio(np.sum(~assigned), len(pk)),
        "accuracy_assigned": _ratio(np.sum((tk == pk) & assigned), np.sum(assigned)),
        "abstention_rate_absent": _ratio(np.sum(p[absent] == unknown), absent.sum()),
        "unknown_rate": _ratio(np.sum(p[labelled] == unknown), labelled.sum()),
        "per_class": per_class,
        "absent_types": absent_types,
    }


def confusion_table(
    truth: Sequence[object] | np.ndarray | pd.Series,
    pred: Sequence[object] | np.ndarray | pd.Series,
    *,
    unknown: str = UNKNOWN,
) -> pd.DataFrame:
    """Counts of (truth row, predicted column) over labelled cells; ``unknown`` is the last column."""
    t = _as_str(truth)
    p = _as_str(pred)
    p = np.where(pd.isna(p), unknown, p).astype(object)
    keep = np.array([v is not None for v in t], dtype=bool)
    table = pd.crosstab(pd.Series(t[keep], name="truth"), pd.Series(p[keep], name="predicted"))
    rows = sorted(table.index)
    cols = sorted(c for c in table.columns if c != unknown)
    cols = sorted(set(cols) | set(rows) - {unknown}) + [unknown]
    return table.reindex(index=rows, columns=cols, fill_value=0)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float | None:
    """Expected calibration error: the cell-weighted mean, over ``n_bins`` equal-width confidence bins, of
    |accuracy - mean confidence| in the bin (None without cells)."""
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    ok = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        return None
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=ok, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins))
    return round(float(gap.sum() / conf.size), 4) if count.sum() else None


def term_contains(answer: str, truth: str, ancestors_of: Any) -> bool:
    """Whether an answer's CL term is the truth's term or one of its ancestors (``ancestors_of``: a callable giving
    a CL id's ancestors); an answer without a term ("") contains nothing."""
    return bool(answer) and (answer == truth or answer in ancestors_of(truth))


def ontology_metrics(
    truth_terms: Sequence[str | None] | np.ndarray,
    level: Sequence[str] | np.ndarray,
    answer_terms: Sequence[str] | np.ndarray,
    confidence: np.ndarray,
    ancestors_of: Any,
) -> dict[str, Any]:
    """Ontology-aware scores of the answers (see :mod:`query.fallback`) against the truth's CL terms.

    ``truth_terms``: each cell's true CL id (None: unlabelled or without a term; left out). ``level``: ``fine``,
    ``ancestor`` or ``unknown``. ``answer_terms``: the answer's CL id ("" when it has none). ``ancestors_of``: a
    callable giving a CL id's ancestors. An answer, fine or ancestor, is right when its term is the truth's or one
    of the truth's ancestors (a fine answer coarser than the truth is the atlas' finest class for it: "CD4 T cell"
    for a naive CD4 T cell when the atlas does not split them; ``fine_coarser_rate`` counts them, since an atlas that
    does split them answered more coarsely than it could). Accuracy and the expected calibration error of
    ``confidence`` are over the answered cells (fine or ancestor).
    """
    t = np.asarray([v or "" for v in truth_terms], dtype=object)
    lv = np.asarray(level, dtype=object)
    a = np.asarray(answer_terms, dtype=object)
    scored = t != ""
    answered = scored & (lv != "unknown")
    correct = np.zeros(len(t), dtype=bool)
    for i in np.flatnonzero(answered):
        correct[i] = term_contains(a[i], t[i], ancestors_of)
    n_scored, n_answered = int(scored.sum()), int(answered.sum())
    return {
        "n_cells_with_truth_term": n_scored,
        "answered_rate": _ratio(n_answered, n_scored),
        "fine_rate": _ratio(np.sum(scored & (lv == "fine")), n_scored),
        # right, but with a class coarser than the truth ("CD4 T cell" for a naive CD4 T cell): what "fine" overstates
        "fine_coarser_rate": _ratio(np.sum(correct & (lv == "fine") & (a != t)), n_scored),
        "ancestor_rate": _ratio(np.sum(scored & (lv == "ancestor")), n_scored),
        "unknown_rate": _ratio(np.sum(scored & (lv == "unknown")), n_scored),
        "ontology_accuracy": _ratio(np.sum(correct), n_answered),
        "ece": expected_calibration_error(np.asarray(confidence)[answered], correct[answered]),
    }
