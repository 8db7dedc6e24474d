"""Mapping raw classifier scores to probabilities, fitted on out-of-fold scores: Platt (sigmoid) or isotonic.

The probability is calibrated to the *training mix* (the labelled positives against the background sample), not
to the atlas: with a rare population the atlas-wide probability of a hit is much lower. It orders cells like the
raw score and is comparable between sweeps of the same classifier; use the classifier's metrics
(``expected_false_hits_per_million``) to judge atlas-wide precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize

from scatlas.atlas.errors import InputError

CalibrationMethod = Literal["platt", "isotonic"]


@dataclass(frozen=True)
class Calibration:
    """``method`` with its parameters: Platt ``p = sigmoid(a * s + b)``; isotonic: a step function ``x -> y``."""

    method: CalibrationMethod
    a: float = 1.0
    b: float = 0.0
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "platt":
            return 1.0 / (1.0 + np.exp(-(self.a * s + self.b)))
        if not self.x:
            return np.full(s.shape, np.nan)
        return np.interp(s, self.x, self.y)

    def min_score_for(self, probability: float) -> float:
        """The smallest raw score whose calibrated probability is at least ``probability``."""
        if not 0.0 < probability < 1.0:
            raise InputError(f"a minimum probability must be in (0, 1), got {probability}")
        if self.method == "platt":
            if self.a <= 0:
                raise InputError("the Platt calibration is not increasing; use a minimum raw score instead")
            return (math.log(probability / (1 - probability)) - self.b) / self.a
        xs, ys = np.asarray(self.x), np.asarray(self.y)
        ok = np.flatnonzero(ys >= probability)
        if len(ok) == 0:
            return math.inf
        j = int(ok[0])
        if j == 0 or ys[j] == ys[j - 1]:
            return float(xs[j])
        # linear interpolation between breakpoints j-1 and j
        t = (probability - ys[j - 1]) / (ys[j] - ys[j - 1])
        return float(xs[j - 1] + t * (xs[j] - xs[j - 1]))

    def to_dict(self) -> dict[str, Any]:
        if self.method == "platt":
            return {"method": "platt", "a": self.a, "b": self.b}
        return {"method": "isotonic", "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if d.get("method") == "platt":
            return cls("platt", a=float(d["a"]), b=float(d["b"]))
        if d.get("method") == "isotonic":
            return cls("isotonic", x=[float(v) for v in d["x"]], y=[float(v) for v in d["y"]])
        raise InputError(f"unknown calibration {d.get('method')!r}; expected platt or isotonic")


def expected_hits_per_million(false_positive_rate: float, recall: float, *, known: float = 0.0,
                              likely: float = 0.0) -> float:
    """Hits a sweep should return per million atlas cells: the atlas cells known to be positives (share ``known``:
    those a ``positive_sql`` predicate matches) and those that looked like positives (share ``likely`` of the rest:
    the background cells set aside as likely unlabelled positives) found at ``recall``, plus false hits among the
    others at ``false_positive_rate`` (all cross-validated)."""
    rest = 1.0 - known
    return 1e6 * (known * recall + rest * (likely * recall + (1.0 - likely) * false_positive_rate))


def fit_platt(scores: np.ndarray, y: np.ndarray) -> Calibration:
    """Platt scaling with Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``."""
    s = np.asarray(scores, dtype=np.float64)
    yb = np.asarray(y).astype(bool)
    n_pos, n_neg = int(yb.sum()), int((~yb).sum())
    t = np.where(yb, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    mu, sd = float(s.mean()), float(s.std()) or 1.0
    z = (s - mu) / sd

    def loss(p: np.ndarray) -> tuple[float, np.ndarray]:
        f = p[0] * z + p[1]
        # BCE with logits, numerically stable: log(1 + e^f) - t f
        lse = np.logaddexp(0.0, f)
        val = float(np.sum(lse - t * f))
        g = 1.0 / (1.0 + np.exp(-f)) - t
        return val, np.array([float(np.sum(g * z)), float(np.sum(g))])

    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a_z, b_z = float(res.x[0]), float(res.x[1])
    return Calibration("platt", a=a_z / sd, b=b_z - a_z * mu / sd)


def fit_isotonic(scores: np.ndarray, y: np.ndarray) -> Calibration:
    """Isotonic (non-decreasing) regression of the labels on the scores by pool-adjacent-violators."""
    s = np.asarray(scores, dtype=np.float64)
    yv = np.asarray(y, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s, yv = s[order], yv[order]
    # start with one block per distinct score
    uniq, start = np.unique(s, return_index=True)
    sums = np.add.reduceat(yv, start)
    counts = np.diff(np.r_[start, len(s)]).astype(np.float64)
    lo, hi = list(uniq), list(uniq)
    vals, wts = list(sums / counts), list(counts)
    out_v: list[float] = []
    out_w: list[float] = []
    out_lo: list[float] = []
    out_hi: list[float] = []
    for v, w, a, b in zip(vals, wts, lo, hi, strict=True):
        out_v.append(v)
        out_w.append(w)
        out_lo.append(a)
        out_hi.append(b)
        while len(out_v) > 1 and out_v[-2] > out_v[-1]:
            w2 = out_w[-2] + out_w[-1]
            v2 = (out_v[-2] * out_w[-2] + out_v[-1] * out_w[-1]) / w2
            a2, b2 = out_lo[-2], out_hi[-1]
            for arr in (out_v, out_w, out_lo, out_hi):
                del arr[-2:]
            out_v.append(v2)
            out_w.append(w2)
            out_lo.append(a2)
            out_hi.append(b2)
    xs: list[float] = []
    ys: list[float] = []
    for v, a, b in zip(out_v, out_lo, out_hi, strict=True):
        xs.append(float(a))
        ys.append(float(v))
        if b > a:
            xs.append(float(b))
            ys.append(float(v))
    return Calibration("isotonic", x=xs, y=ys)


def fit_calibration(scores: np.ndarray, y: np.ndarray, method: CalibrationMethod) -> Calibration:
    if method == "platt":
        return fit_platt(scores, y)
    if method == "isotonic":
        return fit_isotonic(scores, y)
    raise InputError(f"unknown calibration method {method!r}; use 'platt' or 'isotonic'")
