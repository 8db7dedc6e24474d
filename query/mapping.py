"""Does a query map onto the atlas? A query-level verdict from the index's mapping calibration, and which cells are
out of the atlas.

The calibration (:mod:`index.mapping`) held out each atlas dataset and recorded how such a "new" dataset maps: the
norm of its MNN shift and the share of its cells whose score (percentile of the mean top-k similarity among
held-out atlas cells) falls under the atlas' low tail. A query that needs a larger shift, or has a larger share of
cells in that tail, than any atlas dataset (with the margins of :func:`index.mapping.derive_thresholds`) maps
poorly: then each cell that does not map well on its own is out of the atlas. A query that maps well loses only its
cells below anything atlas datasets show.

Both query-level numbers are properties of a dataset, not of a cell: a query of fewer than :data:`MIN_QUERY_CELLS`
cells gets no query-level verdict (``too_few_cells``, no score); its cells are judged on their own, as those of a
query that maps well are (out of the atlas only below anything atlas datasets show).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from scatlas.index import ALIGN_MIN_SAMPLE, MappingCalibration

Verdict = Literal["maps_well", "maps_poorly", "too_few_cells", "uncalibrated"]

MIN_QUERY_CELLS = ALIGN_MIN_SAMPLE
"""Fewer query cells than this get no query-level verdict (``too_few_cells``): both of its numbers are rates over a
dataset. The low-tail share: an atlas-like query has ~5% of its cells in the tail (``low_score``) and maps poorly
over ``max_low_fraction`` (at least 10%); with under 10 cells one tail cell is already over 10%, and the binomial
chance that an atlas-like query exceeds 10% by chance falls under 4% only from about 50 cells on. The shift: the mean
offset over MNN pairs (:func:`index.estimate_shift`, ``MNN_K`` = 20 neighbours a side) measures a dataset's offset
only when many cells pair; with few query cells, every atlas neighbour of a query cell pairs with it and the
"shift" just moves those cells onto their own neighbours, so such queries are not aligned at all
(:data:`index.ALIGN_MIN_SAMPLE`, the same number)."""


GROUPING_WORDS = {"dataset": "datasets", "donor": "donors", "random": "random folds of its cells"}
"""How the report names the atlas' held-out groups (the calibration's ``grouping``)."""

LOW_FRACTION_Z = 2.33
"""A share of cells counts as over ``max_low_fraction`` only when it is over by this many binomial standard errors
of a query of its size (one-sided, ~1%): an atlas dataset queried back (290 cells, 12.4% in the tail against a
limit of 12.2%) mapped "poorly" by chance."""


def low_fraction_limit(max_low_fraction: float, n_cells: int) -> float:
    """The share of ``n_cells`` cells over which a query maps poorly: ``max_low_fraction`` plus
    :data:`LOW_FRACTION_Z` binomial standard errors."""
    p = float(max_low_fraction)
    return p + LOW_FRACTION_Z * float(np.sqrt(p * (1 - p) / max(int(n_cells), 1)))


@dataclass(frozen=True)
class MappingVerdict:
    """The verdict on a query (see :func:`assess_mapping`).

    ``verdict``: ``"maps_well"``, ``"maps_poorly"``, ``"too_few_cells"`` (the query has fewer than
    :data:`MIN_QUERY_CELLS` cells: no query-level verdict) or ``"uncalibrated"`` (the index has no mapping
    calibration); ``score``: share of the query's cells that map as atlas datasets' cells do (score at least the
    calibration's ``low_score``), None when uncalibrated or too few cells; ``evidence``: the numbers behind it;
    ``thresholds``: the cuts used; ``note``: why there is no verdict, when there is none.
    """

    verdict: Verdict
    score: float | None
    evidence: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    note: str = ""
    expression: dict[str, Any] = field(default_factory=dict)
    by_expression: bool = False  # the expression match picks the cells out one by one (see with_expression)
    strict_expression: bool = False  # maps poorly by the expression match: its cells must match well on their own

    def out_of_atlas(self, cell_scores: np.ndarray) -> np.ndarray:
        """Bool mask of cells out of the atlas: when the query maps poorly, every cell scoring under
        ``individual_score``; when it maps well or has too few cells for a verdict, only those under
        ``extreme_score`` (below what any atlas dataset shows); none when uncalibrated. NaN scores count as out
        (when calibrated). A query whose cells the expression match judges one by one (``by_expression``: it maps
        poorly by that match alone, or by its shift alone; see :func:`with_expression`) is judged as one that maps
        well here: its cells whose expression matches no atlas type are out by that check."""
        s = np.asarray(cell_scores, dtype=np.float64)
        if self.verdict == "uncalibrated":
            return np.zeros(s.shape, dtype=bool)
        poorly = self.verdict == "maps_poorly" and not self.by_expression
        cut = self.thresholds["individual_score" if poorly else "extreme_score"]
        out: np.ndarray = ~(s >= cut)
        return out

    def to_report(self) -> dict[str, Any]:
        """The verdict as a JSON-ready dict for the annotation report."""
        report: dict[str, Any] = {
            "verdict": self.verdict,
            "score": None if self.score is None else round(self.score, 4),
            "reasons": list(self.reasons),
            "evidence": self.evidence,
            "thresholds": self.thresholds,
        }
        if self.verdict == "too_few_cells":
            report["n_cells"] = self.evidence.get("n_cells")
            report["min_cells"] = self.evidence.get("min_cells", MIN_QUERY_CELLS)
        if self.note:
            report["note"] = self.note
        if self.expression:
            report["expression"] = self.expression
        if self.by_expression:
            report["cells_judged_by"] = "expression match (each cell on its own)"
        return report


def assess_mapping(
    cell_scores: np.ndarray, shift_norm: float | None, calibration: MappingCalibration | None
) -> MappingVerdict:
    """The verdict on a query from its cells' scores (:meth:`MappingCalibration.cell_scores`) and the norm of its
    MNN shift (None: not aligned). It maps poorly when the share of cells scoring under ``low_score`` exceeds
    ``max_low_fraction`` by more than chance (:func:`low_fraction_limit`), or, where the calibration held out atlas
    datasets, the shift exceeds
    ``max_shift_norm``. Under :data:`MIN_QUERY_CELLS` cells it says ``too_few_cells``, with no score (the numbers
    stay in the evidence)."""
    if calibration is None:
        return MappingVerdict("uncalibrated", None, {"note": "the index has no mapping calibration (mapping.json)"})
    t = dict(calibration.thresholds)
    s = np.asarray(cell_scores, dtype=np.float64)
    low = float(np.mean(~(s >= t["low_score"]))) if len(s) else 0.0
    groups = calibration.groups
    key = "aligned" if shift_norm is not None else "unaligned"
    atlas_low = [g.below[key].get("0.05", 0.0) for g in groups]  # share under the pooled 5% quantile
    evidence: dict[str, Any] = {
        "n_cells": int(len(s)),
        "min_cells": MIN_QUERY_CELLS,
        "shift_norm": None if shift_norm is None else round(float(shift_norm), 4),
        "atlas_shift_norm_range": [min(g.shift_norm for g in groups), max(g.shift_norm for g in groups)],
        "low_fraction": round(low, 4),
        "atlas_low_fraction_max": round(max(atlas_low), 4) if atlas_low else None,
        "median_cell_score": round(float(np.nanmedian(s)), 4) if len(s) else None,
        "grouping": calibration.grouping,
        "n_groups": len(groups),
    }
    if len(s) < MIN_QUERY_CELLS:
        note = (
            f"the query has {len(s)} cell{'' if len(s) == 1 else 's'}, under the {MIN_QUERY_CELLS} the query-level "
            "mapping check needs (its shift and low-tail share are dataset rates, noise for a handful of cells): "
            "no verdict and no score; each cell is out of the atlas only when its own mapping score is below "
            f"anything atlas datasets show (under {t['extreme_score']})"
        )
        evidence["shift_rule"] = evidence["low_fraction_rule"] = f"off (under {MIN_QUERY_CELLS} cells)"
        return MappingVerdict("too_few_cells", None, evidence, t, (), note)
    reasons = []
    # Shifts between donors of one dataset, or random folds, say nothing of those between labs and conditions:
    # the shift rule needs atlas datasets held out.
    shift_rule = calibration.grouping == "dataset"
    evidence["shift_rule"] = "on" if shift_rule else f"off (the atlas' held-out groups are {GROUPING_WORDS.get(calibration.grouping, calibration.grouping)})"
    if shift_rule and shift_norm is not None and float(shift_norm) > t["max_shift_norm"]:
        reasons.append(
            f"the query needed a shift of {float(shift_norm):.3f} to align, over {t['max_shift_norm']:.3f} "
            f"(atlas {calibration.grouping}s held out: at most {evidence['atlas_shift_norm_range'][1]:.3f})"
        )
    limit = low_fraction_limit(t["max_low_fraction"], len(s))
    evidence["low_fraction_limit"] = round(limit, 4)
    evidence["low_fraction_over"] = bool(low > limit)
    if low > limit:
        low_pct, limit_pct = percents(low, limit)
        reasons.append(
            f"{low_pct}% of its cells map below the atlas' {100 * t['low_score']:.0f}% tail, over "
            f"{limit_pct}% (atlas datasets held out: at most {100 * t['max_low_fraction']:.0f}%, plus the "
            f"chance margin of {len(s)} cells)"
        )
    verdict: Verdict = "maps_poorly" if reasons else "maps_well"
    return MappingVerdict(verdict, 1.0 - low, evidence, t, tuple(reasons))


def percents(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` (fractions) as percentages with the fewest decimals (up to 2) that tell them apart."""
    for digits in (0, 1, 2):
        a, b = f"{100 * value:.{digits}f}", f"{100 * limit:.{digits}f}"
        if a != b:
            break
    return a, b


def with_expression(
    verdict: MappingVerdict, unlike: np.ndarray | None, record: dict[str, Any]
) -> MappingVerdict:
    """``verdict`` with the expression match's record (:mod:`query.expression_match`) and, when it ran, the share of
    cells (``unlike``: bool over the cells judged) whose expression matches no atlas cell type: a query that maps
    well by similarity but holds more such cells than ``max_low_fraction`` (with the chance margin of
    :func:`low_fraction_limit`) maps poorly (another tissue that the embedding places among atlas cells). A query
    that maps poorly by its shift alone (not by the low tail) while few of its cells fall under the expression cut
    is judged cell by cell (``by_expression``): another lab of the atlas' tissue, where the atlas' datasets come
    from one lab and show small shifts among themselves."""
    if unlike is None:
        return replace(verdict, expression=dict(record))
    share = float(np.mean(unlike)) if len(unlike) else 0.0
    expression = {**record, "cells_below": int(np.sum(unlike)), "fraction_below": round(share, 4)}
    most = verdict.thresholds.get("max_low_fraction")
    limit = None if most is None else low_fraction_limit(most, len(unlike))
    if verdict.verdict == "maps_poorly" and limit is not None and share <= limit and \
            verdict.evidence.get("low_fraction_over") is False:
        # poorly by its shift alone (another lab, where the atlas' datasets come from one), while its cells' expression
        # matches atlas types: each cell is judged on its own, as in a query that maps well
        note = ("the query needed a larger shift than the atlas' datasets show among themselves, but its cells map "
                "as atlas cells do and their expression matches atlas cell types: each cell is judged on its own")
        return replace(verdict, expression=expression, by_expression=True, note=note)
    if verdict.verdict not in ("maps_well", "maps_poorly") or limit is None or share <= limit:
        return replace(verdict, expression=expression)
    share_pct, limit_pct = percents(share, limit)
    reason = (
        f"{share_pct}% of its cells' expression matches no atlas cell type as well as held-out atlas "
        f"datasets' cells do (over {limit_pct}%)"
    )
    if verdict.verdict == "maps_poorly":  # poorly by its shift or similarities, and its expression agrees: strict
        return replace(verdict, reasons=(*verdict.reasons, reason), expression=expression, strict_expression=True)
    return replace(verdict, verdict="maps_poorly", reasons=(*verdict.reasons, reason), expression=expression,
                   by_expression=True, strict_expression=True)


def out_of_atlas(verdict: MappingVerdict, cell_scores: np.ndarray) -> np.ndarray:
    """:meth:`MappingVerdict.out_of_atlas` as a function."""
    return verdict.out_of_atlas(cell_scores)
