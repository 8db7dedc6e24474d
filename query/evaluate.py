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
