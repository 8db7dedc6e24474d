"""``--tune``: the grid of voting parameters on every pair, and the declared rule that picks the defaults."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import LABEL, TUNED, log
from .evaluate import query_truth
from .methods import Prepared

GRID_METRICS = ("macro_f1", "macro_f1_open", "accuracy", "unknown_rate_known", "abstention_rate_absent")
"""The metrics recorded for each setting of the grid."""


def _grid() -> list[tuple[Any, ...]]:
    """The (predictor, k, weighting, class_balance, align) settings annotate is run with."""
    from scatlas.query.annotate import DEFAULT_CLASS_BALANCE, DEFAULT_K, DEFAULT_WEIGHTING

    grid: list[tuple[Any, ...]] = [
        ("knn", k, w, b, a)
        for k in (10, 15, 30, 50)
        for w in ("uniform", "similarity", "adaptive")
        for b in (0.0, 0.5, 1.0)
        for a in ("none", "mnn")
    ]
    # k, weighting and class_balance shape the vote only: the heads are tried once per alignment
    grid += [("heads", DEFAULT_K, DEFAULT_WEIGHTING, DEFAULT_CLASS_BALANCE, a) for a in ("none", "mnn")]
    return grid


def tune(p: Prepared) -> list[dict[str, Any]]:
    """Vote once per (k, weighting) without abstention, then apply every threshold pair offline."""
    from scatlas.atlas.errors import GeneOverlapError
    from scatlas.index import AtlasIndex
    from scatlas.query.annotate import annotate

    truth, ref_labels = query_truth(p)
    with AtlasIndex.open(p.index_dir) as idx:  # type: ignore[arg-type]
        cal = idx.manifest.calibration
    rows = []
    refused: set[str] = set()
    for setting in _grid():
        predictor, k, weighting, balance, align = setting
        if predictor in refused:
            continue
        try:
            res = annotate(
                p.query,
                p.index_dir,
                **p.annotate_kw,
                label_keys=[LABEL],
                k=k,
                weighting=weighting,
                class_balance=balance,
                align=align,
                min_confidence=0.0,
                far_quantile=None,
                predictor=predictor,
                progress=False,
            )
        except GeneOverlapError as exc:  # the vote's 50% floor on a partial query: no row, so `pick` skips it
            log.info("%s: predictor %s refused (%s); its settings are left out of the pick", p.name, predictor, exc)
            refused.add(predictor)
            continue
        rows += _threshold_rows(p.name, setting, res.predictions, cal, truth, ref_labels)
    return rows


def _threshold_rows(
    pair: str, setting: tuple[Any, ...], predictions: Any, cal: Any, truth: np.ndarray, ref_labels: set[str]
) -> list[dict[str, Any]]:
    """One grid row per (min_confidence, far_quantile) applied to predictions made without abstention."""
    from scatlas.query.evaluate import evaluate_labels
    from scatlas.query.vote import UNKNOWN, far_from_atlas

    raw = predictions[f"{LABEL}_pred"].astype(str).to_numpy()
    conf = predictions[f"{LABEL}_confidence"].to_numpy()
    sim = predictions["atlas_similarity"].to_numpy()
    near = predictions["atlas_nearest_similarity"].to_numpy()
    rows = []
    for mc in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        for fq in (None, *[q for q in cal.quantiles if q <= 0.01]):
            if fq is None:
                far = np.zeros(len(sim), dtype=bool)
            else:  # annotate's rule: both statistics below their calibrated quantiles
                far = far_from_atlas(sim, cal.threshold("mean_topk", fq), near, cal.threshold("first_neighbor", fq))
            pred = np.where((conf >= mc) & ~far, raw, UNKNOWN)
            m = evaluate_labels(truth, pred, ref_labels)
            rows.append({"pair": pair, **dict(zip(TUNED, (*setting, mc, fq), strict=True)),
                         **{c: m[c] for c in GRID_METRICS}})
    return rows


def tune_score(r: dict[str, Any]) -> float:
    """Open-set macro-F1 (query.evaluate: absent types are one more class, "unknown"; equal to macro-F1 when
    the query has none). It replaced (macro-F1 + abstention rate on absent types) / 2, which counted an
    abstention on an absent cell as worth more than a correct call on a known one and so favoured abstaining on
    in-distribution cells of other batches (macro-F1 -0.1 on symphony and zheng with the old defaults)."""
    return float(r.get("macro_f1_open") or r["macro_f1"] or 0.0)


def pick(rows: list[dict[str, Any]], baseline: dict[str, float]) -> dict[str, Any]:
    """Declared rule: for each setting, (1) its worst margin over the real pairs (those in ``baseline``) of
    macro-F1 minus the baseline's (logreg on the same genes, same run), to the nearest 0.001 so that a fraction
    of a cell does not decide; then (2) the mean over all tuned pairs of :func:`tune_score`. The best setting
    wins on (1), then (2) (ties: the earlier, smaller k). The margin comes first because label transfer that loses
    to a logistic regression somewhere is the failure that matters; the mean alone chose abstention settings that
    won the synthetic pair's absent types and lost up to 0.05 on real pairs."""
    by_setting: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault(tuple(r[c] for c in TUNED), []).append(r)
    n_pairs = max(len(v) for v in by_setting.values())

    def key(item: tuple[tuple[Any, ...], list[dict[str, Any]]]) -> tuple[float, float]:
        margins = [r["macro_f1"] - baseline[r["pair"]] for r in item[1] if r["pair"] in baseline]
        worst = round(min(margins), 3) if margins else 0.0
        return worst, float(np.mean([tune_score(r) for r in item[1]]))

    best = max((v for v in by_setting.items() if len(v[1]) == n_pairs), key=key)
    worst, mean = key(best)
    return {
        **dict(zip(TUNED, best[0], strict=True)),
        "score": round(mean, 4),
        "worst_margin_vs_baseline": worst,
        "per_pair": {r["pair"]: round(tune_score(r), 4) for r in best[1]},
    }
