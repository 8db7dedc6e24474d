"""Class-balanced, L2-regularised logistic regression in torch, and stratified cross-validation around it.

The model is ``score(x) = w . x + b`` on L2-normalised embeddings. Training minimises

    sum_i s_i * BCE(sigmoid(score(x_i)), y_i) + l2 / 2 * ||w||^2

where the sample weights ``s_i`` give each class half of the total weight (``sum_pos s = sum_neg s = 1/2``), so a
handful of positives is not swamped by thousands of background cells; the bias is not penalised, and the penalty
acts on the weights of standardised features (converted back to raw-vector weights after fitting). The problem is
convex and small (positives + a background sample), so it is solved full-batch with L-BFGS (strong Wolfe line
search), deterministic on CPU, on the GPU when asked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.index import minimize_lbfgs
from scatlas.query.hunt.metrics import average_precision

logger = logging.getLogger(__name__)

DEFAULT_L2_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Penalties tried when none is given (chosen by cross-validated AUPRC)."""


@dataclass(frozen=True)
class LogisticFit:
    weights: np.ndarray  # (d,) float32
    bias: float
    n_iter: int
    loss: float


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Sample weights giving each class half of the total weight."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"training needs both classes (got {n_pos} positive and {n_neg} negative cells)")
    return np.where(y, 0.5 / n_pos, 0.5 / n_neg).astype(np.float64)


def fit_logistic(
    X: np.ndarray,
    y: np.ndarray,
    l2: float,
    *,
    device: str = "cpu",
    init: tuple[np.ndarray, float] | None = None,
    max_iter: int = 200,
    standardize: bool = True,
) -> LogisticFit:
    """Fit the class-balanced L2 logistic model; ``init`` warm-starts from ``(w, b)``.

    With ``standardize`` (default) the features are centred and scaled to unit variance before fitting, so the
    penalty treats every embedding dimension alike (low-variance directions, where a rare population often
    differs, are not penalised more); the returned ``(w, b)`` act on the raw vectors.
    """
    import torch

    if l2 < 0:
        raise InputError(f"the L2 penalty must be >= 0 (got {l2})")
    dtype = torch.float64 if device == "cpu" else torch.float32
    X64 = np.asarray(X, dtype=np.float64)
    if standardize:
        mu = X64.mean(axis=0)
        sd = X64.std(axis=0)
        sd = np.where(sd > 1e-6 * max(float(sd.max()), 1e-30), sd, 1.0)
    else:
        mu, sd = np.zeros(X.shape[1]), np.ones(X.shape[1])
    if init is not None:  # raw-space (w, b) -> standardised space
        init = (np.asarray(init[0], dtype=np.float64) * sd, float(init[1]) + float(np.dot(init[0], mu)))
    Xt = torch.as_tensor((X64 - mu) / sd, dtype=dtype, device=device)
    yt = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=dtype, device=device)
    st = torch.as_tensor(balanced_weights(y), dtype=dtype, device=device)
    w = torch.zeros(X.shape[1], dtype=dtype, device=device)
    b = torch.zeros((), dtype=dtype, device=device)
    if init is not None:
        w = torch.as_tensor(np.asarray(init[0]), dtype=dtype, device=device).clone()
        b = torch.tensor(float(init[1]), dtype=dtype, device=device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    softplus = torch.nn.functional.softplus

    def objective() -> torch.Tensor:
        logits = Xt @ w + b
        # BCE with logits = softplus(z) - y z (softplus is the fastest stable form on CPU, float64 included)
        return (st * (softplus(logits) - yt * logits)).sum() + 0.5 * l2 * (w * w).sum()

    n_iter, loss = minimize_lbfgs([w, b], objective, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12)
    w_z = w.detach().cpu().numpy().astype(np.float64)
    w_raw = w_z / sd
    return LogisticFit(
        weights=w_raw.astype(np.float32),
        bias=float(b.detach().cpu()) - float(np.dot(w_raw, mu)),
        n_iter=n_iter,
        loss=loss,
    )


def decision(X: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """Raw scores ``X @ w + b`` in float64 (for CV predictions; the sweep has its own kernel)."""
    return np.asarray(X, dtype=np.float64) @ np.asarray(weights, dtype=np.float64) + float(bias)


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each sample; each class is shuffled and dealt round-robin over the folds."""
    y = np.asarray(y).astype(bool)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        start = int(rng.integers(k))  # do not always give the remainder to the first folds
        folds[idx] = (np.arange(len(idx)) + start) % k
    return folds


@dataclass(frozen=True)
class CVResult:
    l2: float
    oof_scores: np.ndarray  # (n,) raw out-of-fold scores at the chosen l2
    folds: np.ndarray  # (n,) fold of each sample
    ap_by_l2: dict[float, float]  # pooled out-of-fold AUPRC per penalty tried
    ap_by_fold: list[float]  # per-fold AUPRC at the chosen l2
    n_folds: int


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    *,
    l2_grid: Sequence[float],
    n_folds: int,
    seed: int,
    device: str = "cpu",
    standardize: bool = True,
) -> CVResult:
    """Out-of-fold scores for every penalty of ``l2_grid`` on the same stratified folds; choose by AUPRC.
    ``standardize`` is :func:`fit_logistic`'s (off for features already on a common scale).

    The choice follows the one-standard-error rule: the strongest penalty whose pooled out-of-fold AUPRC is within
    one standard error (of the per-fold AUPRCs at the best penalty) of the best.

    Choosing the penalty on the folds that also estimate the metrics makes those estimates slightly optimistic
    (a choice among a few values); with a single penalty they are plain k-fold estimates.
    """
    y = np.asarray(y).astype(bool)
    folds = stratified_folds(y, n_folds, seed)
    grid = sorted({float(v) for v in l2_grid}, reverse=True)  # strong -> weak penalty: warm starts help
    oof: dict[float, np.ndarray] = {}
    for f in range(n_folds):
        train, test = folds != f, folds == f
        init: tuple[np.ndarray, float] | None = None
        for lam in grid:
            fit = fit_logistic(X[train], y[train], lam, device=device, init=init, standardize=standardize)
            init = (fit.weights, fit.bias)
            oof.setdefault(lam, np.empty(len(y), dtype=np.float64))[test] = decision(X[test], fit.weights, fit.bias)
    ap_by_l2 = {lam: average_precision(y, oof[lam]) for lam in grid}

    def fold_aps(lam: float) -> list[float]:
        return [
            average_precision(y[folds == f], oof[lam][folds == f]) if y[folds == f].any() else float("nan")
            for f in range(n_folds)
        ]

    top = max(grid, key=lambda lam: (round(ap_by_l2[lam], 12), lam))  # ties -> the stronger penalty
    top_folds = np.asarray(fold_aps(top))
    se = float(np.nanstd(top_folds, ddof=1) / np.sqrt(np.isfinite(top_folds).sum())) if n_folds > 1 else 0.0
    se = se if np.isfinite(se) else 0.0
    # one-standard-error rule: the strongest penalty whose AUPRC is within one SE of the best (generalises
    # better to datasets the positives did not come from, which cross-validation cannot see)
    best = max(lam for lam in grid if ap_by_l2[lam] >= ap_by_l2[top] - se)
    logger.info(
        "cross-validation (%d folds): AUPRC by L2 penalty %s; best %g (SE %.3f), chosen %g (one-SE rule)",
        n_folds, {f"{k:g}": round(v, 4) for k, v in sorted(ap_by_l2.items())}, top, se, best,
    )
    return CVResult(l2=best, oof_scores=oof[best], folds=folds, ap_by_l2=ap_by_l2, ap_by_fold=fold_aps(best),
                    n_folds=n_folds)
