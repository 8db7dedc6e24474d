"""Label transfer by voting over nearest atlas neighbours (kept apart from the search that finds them).

Inputs are plain arrays for one batch of query cells: the neighbours' label codes ``(n, k)`` (``-1`` where the
neighbour has a NULL label or there is no neighbour), their similarities ``(n, k)`` (cosine, larger is nearer,
``-inf`` padded) and optionally their dataset codes ``(n, k)`` for a per-dataset cap. Nothing here touches an
index, a file or a label name: :mod:`query.annotate` maps names to codes and back.

Rules
-----
* Weights (``weighting``): ``"uniform"`` (1 per neighbour), ``"similarity"`` (the cosine similarity, clipped
  at 0), or ``"adaptive"`` (``exp(-(d - d_1) / s)`` with cosine distances ``d = 1 - similarity``, ``d_1`` the
  nearest neighbour's distance and ``s`` the mean gap ``mean(d - d_1)`` of the cell's own neighbours:
  scale-free, the nearest neighbour weighs 1 and a neighbour one mean gap further weighs ``1/e``).
* ``class_weights`` (optional, per label code) multiply the votes: ``count ** -class_balance`` of each label
  among atlas cells counters the atlas' label frequencies, so a rare type with few atlas cells can still win
  where its cells are the nearest (as ``class_weight="balanced"`` does for a classifier); 0 = plain votes.
* Neighbours with a NULL label (code ``-1``) do not vote and take no part in the confidence.
* ``max_votes_per_dataset``: only the ``m`` nearest neighbours of each atlas dataset vote (so that one large
  dataset cannot outvote the others); applied before NULL labels are dropped, on rank order.
* Confidence = the winner's share of the total voting weight (in ``[0, 1]``; 0 when nobody voted).
* Ties (equal weight within 1e-6 relative) go to the label of the nearest tied neighbour, so the result does
  not depend on label codes or names.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.index import mean_top_similarity as mean_top_similarity  # the index's statistic, used here

Weighting = Literal["uniform", "similarity", "adaptive"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)

UNKNOWN = "unknown"
"""The predicted label of abstained cells."""
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_FAR = "far_from_atlas"
REASON_NO_EXPRESSION = "no_expression"
REASON_NO_LABEL = "no_labelled_neighbours"
"""The vote's reason when none of a cell's neighbours has the label (an atlas where only some datasets hold it)."""
REASON_NONE = ""

_TIE_RTOL = 1e-6


class Votes(NamedTuple):
    """The outcome of a vote for ``n`` query cells."""

    winner: np.ndarray  # (n,) int64 label code; -1 where no neighbour voted
    confidence: np.ndarray  # (n,) float32 weighted vote share of the winner; 0 where nobody voted
    n_voters: np.ndarray  # (n,) int32 neighbours that voted (labelled, within the cap)


def vote_weights(scores: np.ndarray, weighting: Weighting = "adaptive") -> np.ndarray:
    """Non-negative float64 weights ``(n, k)`` from similarities; missing neighbours (non-finite) weigh 0."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise InputError(f"similarities must be a 2-d (cells x neighbours) array, got shape {s.shape}")
    valid = np.isfinite(s)
    if weighting == "uniform":
        w = np.ones_like(s)
    elif weighting == "similarity":
        w = np.clip(np.where(valid, s, 0.0), 0.0, None)
    else:
        d = 1.0 - np.where(valid, s, np.nan)
        with np.errstate(invalid="ignore"):
            d1 = np.nanmin(d, axis=1, keepdims=True) if s.shape[1] else np.zeros((len(s), 1))
            gap = d - d1
            scale = np.nanmean(gap, axis=1, keepdims=True) if s.shape[1] else np.ones((len(s), 1))
        scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
        w = np.exp(-np.where(valid, gap, 0.0) / scale)
    w[~valid] = 0.0
    return w


def cap_per_dataset(datasets: np.ndarray, max_votes: int | None) -> np.ndarray:
    """Boolean mask ``(n, k)``: True for the first ``max_votes`` columns (in rank order) of each dataset code.

    ``datasets`` holds int dataset codes per neighbour, ``-1`` for no neighbour (always False). ``None`` = no
    cap.
    """
    d = np.asarray(datasets)
    present = d >= 0
    if max_votes is None:
        return present
    if max_votes < 1:
        raise InputError(f"max_votes_per_dataset must be at least 1 (got {max_votes}); use None for no cap")
    n, k = d.shape
    if k == 0:
        return present
    # Occurrence number of each entry's dataset code within its row, in column (rank) order.
    order = np.argsort(d, axis=1, kind="stable")
    sorted_d = np.take_along_axis(d, order, axis=1)
    start = np.ones((n, k), dtype=bool)
    start[:, 1:] = sorted_d[:, 1:] != sorted_d[:, :-1]
    cols = np.broadcast_to(np.arange(k), (n, k))
    run_start = np.maximum.accumulate(np.where(start, cols, 0), axis=1)
    occurrence_sorted = cols - run_start
    occurrence = np.empty_like(occurrence_sorted)
    np.put_along_axis(occurrence, order, occurrence_sorted, axis=1)
    return present & (occurrence < max_votes)


def vote(
    labels: np.ndarray,
    weights: np.ndarray,
    *,
    n_labels: int | None = None,
    datasets: np.ndarray | None = None,
    max_votes_per_dataset: int | None = None,
    class_weights: np.ndarray | None = None,
) -> Votes:
    """Weighted vote over each row's neighbours (columns in rank order, nearest first).

    ``labels``: int codes ``(n, k)`` in ``[0, n_labels)``, ``-1`` = NULL label / no neighbour (does not vote).
    ``weights``: non-negative ``(n, k)`` (see :func:`vote_weights`). ``datasets``: int codes ``(n, k)`` for
    the cap. ``class_weights``: non-negative ``(n_labels,)`` factors applied to each vote by its label.
    """
    labels = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if labels.shape != w.shape or labels.ndim != 2:
        raise InputError(f"labels {labels.shape} and weights {w.shape} must be 2-d arrays of the same shape")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise InputError("vote weights must be finite and non-negative")
    n, k = labels.shape
    if n_labels is None:
        n_labels = int(labels.max()) + 1 if labels.size else 0
    if labels.size and labels.max() >= n_labels:
        raise InputError(f"label code {int(labels.max())} out of range for {n_labels} labels")
    if class_weights is not None:
        cw = np.asarray(class_weights, dtype=np.float64)
        if cw.shape != (n_labels,) or np.any(cw < 0) or not np.all(np.isfinite(cw)):
            raise InputError(
                f"class_weights must be {n_labels} finite non-negative values (got shape {cw.shape})"
            )
        w = w * np.where(labels >= 0, cw[np.maximum(labels, 0)] if n_labels else 0.0, 0.0)
    voting = labels >= 0
    if max_votes_per_dataset is not None:
        if datasets is None:
            raise InputError("max_votes_per_dataset needs the neighbours' dataset codes")
        ds = np.asarray(datasets)
        if ds.shape != labels.shape:
            raise InputError(f"datasets {ds.shape} must have the shape of labels {labels.shape}")
        voting &= cap_per_dataset(ds, max_votes_per_dataset)
    winner = np.full(n, -1, dtype=np.int64)
    confidence = np.zeros(n, dtype=np.float32)
    n_voters = voting.sum(axis=1).astype(np.int32)
    if n == 0 or n_labels == 0 or not voting.any():
        return Votes(winner, confidence, n_voters)

    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))[voting]
    codes = labels[voting]
    wv = w[voting]
    # Per (row, label): summed weight and the best (smallest) rank of a neighbour with that label.
    key = rows * n_labels + codes
    uniq, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, weights=wv, minlength=len(uniq))
    ranks = np.broadcast_to(np.arange(k), (n, k))[voting]
    best_rank = np.full(len(uniq), k, dtype=np.int64)
    np.minimum.at(best_rank, inv, ranks)
    u_row = uniq // n_labels
    u_code = uniq % n_labels
    row_total = np.bincount(rows, weights=wv, minlength=n)
    row_max = np.full(n, -np.inf)
    np.maximum.at(row_max, u_row, total)
    tied = total >= row_max[u_row] - _TIE_RTOL * np.maximum(row_max[u_row], 1e-300)
    # Among tied labels of a row, the one with the nearest neighbour wins: sort by (row, best_rank).
    cand = np.flatnonzero(tied)
    order = np.lexsort((best_rank[cand], u_row[cand]))
    cand = cand[order]
    first = np.ones(len(cand), dtype=bool)
    first[1:] = u_row[cand][1:] != u_row[cand][:-1]
    chosen = cand[first]
    r = u_row[chosen]
    winner[r] = u_code[chosen]
    share = np.divide(total[chosen], row_total[r], out=np.zeros(len(chosen)), where=row_total[r] > 0)
    # All weights zero (e.g. every similarity <= 0 with weighting="similarity"): fall back to counting heads.
    zero = row_total[r] <= 0
    if zero.any():
        heads = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
        share[zero] = heads[chosen[zero]] / np.maximum(n_voters[r[zero]], 1)
    confidence[r] = share.astype(np.float32)
    return Votes(winner, confidence, n_voters)


def vote_shares(
    labels: np.ndarray,
    weights: np.ndarray,
    *,
    n_labels: int,
    datasets: np.ndarray | None = None,
    max_votes_per_dataset: int | None = None,
    class_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Each label's share of a row's voting weight, ``(n, n_labels)`` float64 (rows sum to 1, or 0 where nobody
    voted): the class probabilities of the vote, under the same rules as :func:`vote` (where all weights of a row
    are zero, each voter counts 1)."""
    labels = np.asarray(labels, dtype=np.int64)
    n, k = labels.shape
    w = np.asarray(weights, dtype=np.float64)
    if class_weights is not None:
        cw = np.asarray(class_weights, dtype=np.float64)
        w = w * np.where(labels >= 0, cw[np.maximum(labels, 0)] if n_labels else 0.0, 0.0)
    voting = labels >= 0
    if max_votes_per_dataset is not None:
        if datasets is None:
            raise InputError("max_votes_per_dataset needs the neighbours' dataset codes")
        voting &= cap_per_dataset(np.asarray(datasets), max_votes_per_dataset)
    out = np.zeros((n, n_labels), dtype=np.float64)
    if n == 0 or n_labels == 0:
        return out
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))[voting]
    codes = labels[voting]
    np.add.at(out, (rows, codes), w[voting])
    total = out.sum(axis=1)
    zero = (total <= 0) & voting.any(axis=1)
    if zero.any():  # every weight zero: count heads
        counts = np.zeros_like(out)
        np.add.at(counts, (rows, codes), 1.0)
        out[zero] = counts[zero]
        total = out.sum(axis=1)
    np.divide(out, total[:, None], out=out, where=total[:, None] > 0)
    return out


def balance_weights(counts: np.ndarray, exponent: float) -> np.ndarray:
    """Per-label vote factors ``count ** -exponent``, 1 for the most frequent label (0: no cells)."""
    c = np.asarray(counts, dtype=np.float64)
    if exponent < 0:
        raise InputError(f"class_balance must be >= 0 (got {exponent})")
    if exponent == 0 or c.size == 0:
        return np.ones_like(c)
    out = np.zeros_like(c)
    pos = c > 0
    out[pos] = (c[pos] / c.max()) ** -exponent
    return out


def far_from_atlas(
    mean_similarity: np.ndarray,
    far_threshold: float,
    nearest_similarity: np.ndarray | None = None,
    far_nearest_threshold: float | None = None,
) -> np.ndarray:
    """Cells beyond the atlas: mean top-k similarity below ``far_threshold`` (NaN, no neighbour, counts as far)
    and, when ``far_nearest_threshold`` is given, the nearest neighbour's similarity below it too."""
    m = np.asarray(mean_similarity, dtype=np.float64)
    far: np.ndarray = ~(m >= far_threshold)
    if far_nearest_threshold is not None:
        if nearest_similarity is None:
            raise InputError("far_nearest_threshold needs the nearest neighbours' similarities")
        far &= ~(np.asarray(nearest_similarity, dtype=np.float64) >= far_nearest_threshold)
    return far
