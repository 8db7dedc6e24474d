"""Class-balanced, L2-regularised multinomial logistic regression in torch (the model of a label head).

Training minimises

    sum_i s_i * CE(softmax(x_i W + b), y_i) + ||W||^2 / (2 C)

with balanced sample weights ``s_i = n / (K * n_{y_i})`` (each of the K classes carries the same total weight)
and an unpenalised intercept: the objective of scikit-learn's ``LogisticRegression(class_weight="balanced",
C=C)``, so ``C`` means what it means there. It is convex; it is solved full-batch with L-BFGS (strong Wolfe line
search) in float32 (the float32 features are used in place, with no copy), on the CPU or a GPU, for at most
:data:`DEFAULT_MAX_ITER` iterations (see docs/benchmarks.md#label-heads-iterations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from scatlas.atlas.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITER = 200


@dataclass(frozen=True)
class SoftmaxModel:
    """``logits = X @ weights + bias``; ``weights (d, K) float32``, ``bias (K,) float32``."""

    weights: np.ndarray
    bias: np.ndarray
    n_iter: int
    loss: float

    @property
    def n_classes(self) -> int:
        return int(self.bias.shape[0])

    def logits(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32) @ self.weights + self.bias[None, :]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, K)`` float32 (rows sum to 1)."""
        return softmax_rows(self.logits(X))


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def minimize_lbfgs(
    params: list[Any], objective: Callable[[], Any], *, max_iter: int, tolerance_grad: float,
    tolerance_change: float,
) -> tuple[int, float]:
    """Minimise ``objective()`` (a scalar torch tensor of ``params``) full-batch with L-BFGS and a strong Wolfe
    line search; returns (iterations, final loss). Shared by the label heads and the hunt's binary classifier."""
    import torch

    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> Any:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    loss = opt.step(closure)
    n_iter = int(opt.state[params[0]].get("n_iter", 0))
    return n_iter, float(loss.detach().cpu()) if isinstance(loss, torch.Tensor) else float("nan")


def balanced_sample_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (K * n_c)`` per sample, K = the classes present (scikit-learn's ``class_weight="balanced"``)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w[y]


def fit_softmax(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    C: float = 1.0,
    max_iter: int = DEFAULT_MAX_ITER,
    device: str = "cpu",
) -> SoftmaxModel:
    """Fit the class-balanced L2 multinomial model on dense features ``X (n, d)`` and class codes ``y`` in
    ``0..n_classes-1``. Classes with no sample get a large negative bias (never predicted)."""
    import torch

    X = np.asarray(X)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y):
        raise InputError(f"features {X.shape} and labels {y.shape} do not match")
    if len(y) == 0:
        raise InputError("a label head needs at least one labelled cell")
    if y.min() < 0 or y.max() >= n_classes:
        raise InputError(f"class codes must lie in 0..{n_classes - 1}")
    if not C > 0:
        raise InputError(f"C must be > 0 (got {C})")
    present = np.bincount(y, minlength=n_classes) > 0
    d = X.shape[1]
    if present.sum() < 2:  # nothing to learn: a constant prediction
        bias = np.where(present, 0.0, -30.0).astype(np.float32)
        return SoftmaxModel(np.zeros((d, n_classes), np.float32), bias, 0, 0.0)
    dtype = torch.float32
    n = float(len(y))
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
    yt = torch.as_tensor(y, device=device)
    st = torch.as_tensor(balanced_sample_weights(y, n_classes) / n, dtype=dtype, device=device)
    mask = torch.as_tensor(np.where(present, 0.0, -np.inf), dtype=dtype, device=device)
    W = torch.zeros((d, n_classes), dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=dtype, device=device, requires_grad=True)
    penalty = 1.0 / (2.0 * float(C) * n)  # the objective divided by n (same minimiser, better scaled)
    log_softmax = torch.nn.functional.log_softmax

    def objective() -> torch.Tensor:
        logp = log_softmax(Xt @ W + b + mask, dim=1)
        return -(st * logp.gather(1, yt[:, None])[:, 0]).sum() + penalty * (W * W).sum()

    n_iter, loss = minimize_lbfgs([W, b], objective, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9)
    if n_iter >= max_iter:
        logger.debug("label head: L-BFGS stopped at max_iter=%d", max_iter)
    bias = b.detach().cpu().numpy()
    bias = np.where(present, bias, -30.0 + bias[present].min())
    return SoftmaxModel(
        weights=W.detach().cpu().numpy().astype(np.float32),
        bias=bias.astype(np.float32),
        n_iter=n_iter,
        loss=loss,
    )
