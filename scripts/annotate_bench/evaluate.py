"""Scoring predictions against a prepared pair's query labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import LABEL
from .methods import Prepared


def query_truth(p: Prepared) -> tuple[np.ndarray, set[str]]:
    from scatlas.atlas.sources import open_h5ad

    src = open_h5ad(p.query)
    truth = src.obs[LABEL].to_numpy(dtype=object)
    src.close()
    ref_labels: set[str] = set()
    for r in p.refs:
        s = open_h5ad(r)
        ref_labels |= {str(v) for v in s.obs[LABEL] if v is not None and v == v}
        s.close()
    return truth, ref_labels


def score(p: Prepared, pred: np.ndarray) -> dict[str, Any]:
    from scatlas.query.evaluate import evaluate_labels

    truth, ref_labels = query_truth(p)
    m = evaluate_labels(truth, pred, ref_labels)
    return {
        k: m[k]
        for k in (
            "n_known",
            "n_absent",
            "accuracy",
            "macro_f1",
            "macro_f1_open",
            "unknown_rate_known",
            "accuracy_assigned",
            "abstention_rate_absent",
            "absent_types",
        )
    }
