"""Mapping calibration of a built index: how well atlas cells map when their own dataset is held out.

A query is a dataset the atlas has not seen. To tell "maps like a new atlas dataset would" from "maps poorly", each
atlas dataset (else donor, else a random fold of cells) is held out in turn: a sample of its stored vectors is
aligned onto the rest of the atlas (:func:`index.align.estimate_shift`, as a query is) and, with and without that
shift, each sampled cell gets ``s`` = the mean similarity of its ``k`` nearest atlas cells outside its group
(``k`` of the index's similarity calibration, :func:`mean_top_similarity`). The pooled
``s`` values are the reference a query cell's ``s`` is ranked against (:meth:`MappingCalibration.cell_scores`);
per-group shift norms and shares of cells in the pooled low tail give the query-level thresholds
(:func:`derive_thresholds`). Written to ``<index>/mapping.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import read_json_object, write_json_atomic
from scatlas.atlas.errors import IndexFormatError, InputError, TooFewCellsError
from scatlas.atlas.sql import quote_ident, quote_literal
from scatlas.index.align import Alignment, apply_shift, estimate_shift
from scatlas.index.atlas_index import AtlasIndex
from scatlas.index.manifest import MAPPING_FILE, mapping_fix
from scatlas.index.predicate import ID_COLUMN
from scatlas.index.progress import Progress, progress_bar
from scatlas.index.sampling import sample_sorted
from scatlas.index.vectors import l2_normalize

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATASET_COLUMN = "dataset_id"
DONOR_COLUMNS = ("donor_id", "donor", "sample", "sample_id", "batch")
"""Columns tried, in order, for leave-one-donor-out when the atlas holds one dataset."""
RANDOM_FOLDS = 5
"""Folds of cells (``soma_joinid % 5``) held out in turn when the atlas has neither datasets nor donors to hold out."""
MAX_GROUPS = 40
"""At most this many groups are held out (a seeded draw among them beyond that)."""
REFERENCE_SIZE = 4000
"""Values of ``s`` kept (evenly spaced order statistics of the pooled sample) as the reference."""
LOW_QUANTILES = (0.01, 0.05)
"""Pooled quantiles of ``s`` whose per-group exceedance is recorded (``below``)."""
LOW_SCORE = 0.05
"""A cell "maps below the atlas" when its score (percentile of ``s`` in the reference) is under this."""
EXTREME_QUANTILE = 0.001
"""The pooled quantile of ``s`` whose per-group minimum sets the "extreme" cut of a query that maps well."""

# Thresholds from the held-out groups (the rule; see derive_thresholds and docs/benchmarks.md):
SHIFT_FACTOR = 1.5
SHIFT_FLOOR = 0.2
LOW_FRACTION_MARGIN = 0.05
LOW_FRACTION_FLOOR = 0.10
LOW_FRACTION_FLOOR_WITHIN = 0.25
"""The floor when the held-out groups are donors or random folds of one dataset: they show less spread than
another lab's data of the same tissue does (a stimulated PBMC query of another lab: 14% in the tail against a
single sorted-PBMC dataset, docs/benchmarks.md#query-mapping-check)."""
INDIVIDUAL_SCORE = 0.5
"""In a query that maps poorly, a cell whose own score reaches this (the median held-out atlas cell) still maps."""


def mean_top_similarity(scores: np.ndarray, k: int) -> np.ndarray:
    """Mean similarity of each row's first ``k`` valid neighbours (NaN where a row has none): the statistic the
    mapping calibration and annotation's similarity columns share."""
    s = np.asarray(scores, dtype=np.float64)[:, :k]
    valid = np.isfinite(s)
    count = valid.sum(axis=1)
    total = np.where(valid, s, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(len(s), np.nan), where=count > 0)


@dataclass(frozen=True)
class GroupStats:
    """One held-out group: its ``name`` (a dataset id, a donor, ``fold N``), the cells sampled, the norm of its MNN
    shift onto the rest, the medians of ``s`` and the shares of its cells below the pooled low quantiles
    (``below[aligned|unaligned][str(q)]``)."""

    name: str
    n_cells: int
    shift_norm: float
    median: dict[str, float]
    below: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_cells": self.n_cells, "shift_norm": self.shift_norm, "median": self.median,
                "below": self.below}


@dataclass(frozen=True)
class MappingCalibration:
    """The held-out statistics of an index (see the module docstring).

    ``grouping``: ``"dataset"``, ``"donor"`` or ``"random"`` (then ``column`` is None: random folds of cells, which
    share donors and datasets with the rest, so the reference is optimistic); ``k``: neighbours in ``s``;
    ``reference[aligned|unaligned]``: sorted values of ``s``; ``groups``: per held-out group; ``thresholds``: what
    :mod:`query.mapping` decides with (:func:`derive_thresholds`).
    """

    grouping: str
    column: str | None
    k: int
    reference: dict[str, np.ndarray]
    groups: list[GroupStats]
    thresholds: dict[str, float]
    n_groups_total: int
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def cell_scores(self, similarity: np.ndarray, aligned: bool) -> np.ndarray:
        """Percentile in ``[0, 1]`` of each cell's ``s`` (mean top-``k`` similarity) among held-out atlas cells
        (``aligned``: the query was shifted by MNN alignment, as they were); 0.5 is typical of an atlas dataset seen
        as new, NaN (no neighbour) scores 0."""
        ref = self.reference["aligned" if aligned else "unaligned"]
        s = np.asarray(similarity, dtype=np.float64)
        if len(ref) == 0:
            return np.full(s.shape, np.nan)
        lo = np.searchsorted(ref, s, side="left")
        hi = np.searchsorted(ref, s, side="right")
        out = (lo + hi) / (2.0 * len(ref))
        return np.where(np.isfinite(s), out, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "grouping": self.grouping,
            "column": self.column,
            "k": self.k,
            "reference": {key: [round(float(v), 5) for v in values] for key, values in self.reference.items()},
            "groups": [g.to_dict() for g in self.groups],
            "thresholds": self.thresholds,
            "n_groups_total": self.n_groups_total,
            "note": self.note,
            "params": self.params,
        }

    @classmethod
    def from_dict(cls, data: Any) -> MappingCalibration:
        """Parse (and check) what :meth:`to_dict` wrote; ValueError on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r} (expected {FORMAT_VERSION})")
        grouping = data.get("grouping")
        if grouping not in ("dataset", "donor", "random"):
            raise ValueError("unknown grouping")
        column = data.get("column")
        if column is not None and not isinstance(column, str):
            raise ValueError("column is not text")
        k = data.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError("k is not a positive integer")
        reference = {}
        raw_ref = data.get("reference")
        if not isinstance(raw_ref, dict):
            raise ValueError("reference is not an object")
        for key in ("aligned", "unaligned"):
            values = _finite_array(raw_ref.get(key), f"reference.{key}")
            if len(values) == 0 or np.any(np.diff(values) < 0):
                raise ValueError(f"reference.{key} is empty or not sorted")
            reference[key] = values
        groups_raw = data.get("groups")
        if not isinstance(groups_raw, list) or not groups_raw:
            raise ValueError("groups is not a non-empty list")
        groups = [_group_from(g) for g in groups_raw]
        thresholds_raw = data.get("thresholds")
        if not isinstance(thresholds_raw, dict):
            raise ValueError("thresholds is not an object")
        thresholds = {}
        for name in THRESHOLD_KEYS:
            thresholds[name] = _finite(thresholds_raw.get(name), f"thresholds.{name}")
        n_total = data.get("n_groups_total", len(groups))
        if not isinstance(n_total, int) or n_total < len(groups):
            raise ValueError("n_groups_total is not an integer >= the groups recorded")
        note = data.get("note", "")
        params = data.get("params", {})
        return cls(grouping=grouping, column=column, k=k, reference=reference, groups=groups,
                   thresholds=thresholds, n_groups_total=n_total, note=str(note)[:1000],
                   params=params if isinstance(params, dict) else {})


THRESHOLD_KEYS = ("max_shift_norm", "max_low_fraction", "individual_score", "extreme_score", "low_score")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number")
    return float(value)


def _finite_array(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) > 10 * REFERENCE_SIZE:
        raise ValueError(f"{what} is not a list of at most {10 * REFERENCE_SIZE} numbers")
    return np.array([_finite(v, what) for v in value], dtype=np.float64)


def _group_from(g: Any) -> GroupStats:
    if not isinstance(g, dict):
        raise ValueError("a group is not an object")
    below_raw = g.get("below")
    median_raw = g.get("median")
    if not isinstance(below_raw, dict) or not isinstance(median_raw, dict):
        raise ValueError("a group has no below/median")
    below = {}
    for key in ("aligned", "unaligned"):
        b = below_raw.get(key)
        if not isinstance(b, dict):
            raise ValueError(f"a group has no below.{key}")
        below[key] = {str(q): _finite(b.get(str(q)), "group below") for q in LOW_QUANTILES}
    n = g.get("n_cells")
    if not isinstance(n, int) or n < 0:
        raise ValueError("a group's n_cells is not a count")
    return GroupStats(
        name=str(g.get("name", ""))[:200], n_cells=n, shift_norm=_finite(g.get("shift_norm"), "group shift_norm"),
        median={key: _finite(median_raw.get(key), "group median") for key in ("aligned", "unaligned")},
        below=below,
    )


def derive_thresholds(groups: list[GroupStats], low_fractions: list[float], extreme_scores: list[float],
                      grouping: str = "dataset") -> dict[str, float]:
    """The query-level cuts from the held-out groups (every group is a dataset the atlas saw as new):

    * ``max_shift_norm`` = max(SHIFT_FACTOR x the largest group shift, SHIFT_FLOOR);
    * ``max_low_fraction`` = max(the largest group share of cells scoring under ``low_score``
      + LOW_FRACTION_MARGIN, LOW_FRACTION_FLOOR, or LOW_FRACTION_FLOOR_WITHIN when ``grouping`` is not
      ``"dataset"``);
    * ``extreme_score`` = the lowest score any group's EXTREME_QUANTILE reaches (cells of a query that maps well are
      out of the atlas only under it); ``individual_score`` = INDIVIDUAL_SCORE.
    """
    shift = max(g.shift_norm for g in groups)
    low = max(low_fractions) if low_fractions else 0.0
    extreme = min(extreme_scores) if extreme_scores else 0.0
    return {
        "max_shift_norm": round(max(SHIFT_FACTOR * shift, SHIFT_FLOOR), 4),
        "max_low_fraction": round(
            max(low + LOW_FRACTION_MARGIN, LOW_FRACTION_FLOOR if grouping == "dataset" else LOW_FRACTION_FLOOR_WITHIN),
            4,
        ),
        "individual_score": INDIVIDUAL_SCORE,
        "extreme_score": round(extreme, 5),
        "low_score": LOW_SCORE,
    }


# -- computing it -------------------------------------------------------------------------------------------------
def _groups_of(idx: AtlasIndex) -> tuple[str, str | None, list[str]]:
    """(grouping, column, group values) for the held-out loop."""
    columns = idx.columns()
    if DATASET_COLUMN in columns:
        values = _values_as_text(idx, DATASET_COLUMN)
        if len(values) >= 2:
            return "dataset", DATASET_COLUMN, values
    for col in DONOR_COLUMNS:
        if col in columns:
            values = _values_as_text(idx, col)
            if len(values) >= 2:
                return "donor", col, values
    return "random", None, [str(f) for f in range(RANDOM_FOLDS)]


def _values_as_text(idx: AtlasIndex, column: str) -> list[str]:
    """The column's distinct non-NULL values as :func:`_predicates` compares them (DuckDB's VARCHAR cast: a boolean
    is ``true``, not Python's ``True``), sorted."""
    with idx.cursor() as con:
        col = quote_ident(column)
        rows = con.execute(f"SELECT DISTINCT CAST({col} AS VARCHAR) FROM cells WHERE {col} IS NOT NULL").fetchall()
    return sorted(str(v) for (v,) in rows)


def _predicates(column: str | None, value: str) -> tuple[str, str]:
    """(the group's cells, the atlas without them) as predicates over the cells table (values quoted as literals)."""
    if column is None:
        fold = f"{ID_COLUMN} % {RANDOM_FOLDS}"
        return f"{fold} = {int(value)}", f"{fold} <> {int(value)}"
    col = f"CAST({quote_ident(column)} AS VARCHAR)"
    lit = quote_literal(value)
    return f"{col} IS NOT DISTINCT FROM {lit}", f"{col} IS DISTINCT FROM {lit}"


def _held_out(idx: AtlasIndex, column: str | None, value: str, n: int, k: int, rng: np.random.Generator
              ) -> tuple[Alignment, np.ndarray, np.ndarray] | None:
    """(alignment, s aligned, s unaligned) of up to ``n`` cells of one group, or None when it cannot be held out."""
    inside, outside = _predicates(column, value)
    ids = idx.filter_ids(inside, allow_empty=True, what="mapping group")
    rest = idx.filter_ids(outside, allow_empty=True, what="mapping group")
    if len(ids) == 0 or len(rest) < k:
        return None
    vectors = l2_normalize(idx.vectors(sample_sorted(ids, n, rng)))
    alignment = estimate_shift(idx, vectors, where=outside)
    plain = mean_top_similarity(idx.search(vectors, k, outside).scores, k)
    shifted = mean_top_similarity(idx.search(apply_shift(vectors, alignment.shift), k, outside).scores, k)
    return alignment, shifted, plain


def calibrate_mapping(
    index_dir: str | Path, *, cells_per_group: int = 1000, seed: int = 0, progress: Progress = False
) -> MappingCalibration:
    """Hold out each dataset of the index at ``index_dir`` (else donor, else random fold), up to
    ``cells_per_group`` cells of each, and write the resulting :class:`MappingCalibration` to
    ``<index_dir>/mapping.json`` (atomically)."""
    if int(cells_per_group) < 10:
        raise InputError(f"cells_per_group must be at least 10 (got {cells_per_group})")
    path = Path(index_dir)
    rng = np.random.default_rng(seed)
    with AtlasIndex.open(path, unfinished_ok=True) as idx:
        k = int(idx.manifest.calibration.k or idx.manifest.search.k)
        grouping, column, values = _groups_of(idx)
        n_total = len(values)
        if n_total > MAX_GROUPS:
            values = sorted(sample_sorted(np.array(values, dtype=object), MAX_GROUPS, rng).tolist())
        per: list[tuple[str, Alignment, np.ndarray, np.ndarray]] = []
        with progress_bar(progress, total=len(values), desc="mapping calibration", unit="group") as bar:
            for value in values:
                got = _held_out(idx, column, value, int(cells_per_group), k, rng)
                if got is None:
                    logger.info("mapping calibration: group %r skipped (no cells, or too few left without it)",
                                value[:80])
                else:
                    per.append((value, *got))
                bar.update(1)
    if not per:
        raise TooFewCellsError(
            f"the index at {path} is too small to calibrate mapping: no group could be held out with {k} "
            "cells left; index more cells"
        )
    calibration = _summarise(per, grouping, column, k, n_total, cells_per_group, seed)
    write_json_atomic(path / MAPPING_FILE, calibration.to_dict())
    logger.info(
        "mapping calibration: %d %s groups held out, shift norms %.3f-%.3f, thresholds %s",
        len(per), grouping, min(g.shift_norm for g in calibration.groups),
        max(g.shift_norm for g in calibration.groups), calibration.thresholds,
    )
    return calibration


def _reference(values: np.ndarray) -> np.ndarray:
    """Evenly spaced order statistics (at most REFERENCE_SIZE) of the finite ``values``."""
    v = np.sort(values[np.isfinite(values)])
    if len(v) > REFERENCE_SIZE:
        v = v[np.round(np.linspace(0, len(v) - 1, REFERENCE_SIZE)).astype(np.int64)]
    return np.round(v, 5)


def _summarise(
    per: list[tuple[str, Alignment, np.ndarray, np.ndarray]], grouping: str, column: str | None, k: int,
    n_total: int, cells_per_group: int, seed: int,
) -> MappingCalibration:
    pooled = {"aligned": np.concatenate([p[2] for p in per]), "unaligned": np.concatenate([p[3] for p in per])}
    reference = {key: _reference(v) for key, v in pooled.items()}
    cuts = {key: {str(q): float(np.nanquantile(v, q)) for q in LOW_QUANTILES} for key, v in pooled.items()}
    groups: list[GroupStats] = []
    low_fractions: list[float] = []
    extremes: list[float] = []
    draft = MappingCalibration(grouping, column, k, reference, [], {}, n_total)
    for name, alignment, shifted, plain in per:
        by = {"aligned": shifted, "unaligned": plain}
        below = {
            key: {q: round(float(np.mean(~(s >= cut))), 4) for q, cut in cuts[key].items()} for key, s in by.items()
        }
        groups.append(GroupStats(
            name=name if grouping != "random" else f"fold {name}", n_cells=len(shifted),
            shift_norm=round(float(np.linalg.norm(alignment.shift)), 4),
            median={key: round(float(np.nanmedian(s)), 5) for key, s in by.items()}, below=below,
        ))
        for key, s in by.items():
            scores = draft.cell_scores(s, aligned=key == "aligned")
            low_fractions.append(float(np.mean(scores < LOW_SCORE)))
            extremes.append(float(np.quantile(scores, EXTREME_QUANTILE)))
    note = {
        "dataset": "each atlas dataset held out in turn",
        "donor": f"one dataset: each value of {column} held out in turn",
        "random": f"one dataset and donor: random folds of cells ({ID_COLUMN} % {RANDOM_FOLDS}) held out in turn, "
                  "which share donors and batches with the rest: the reference is optimistic",
    }[grouping]
    if n_total > len(per):
        note += f"; {len(per)} of {n_total} groups"
    return MappingCalibration(
        grouping=grouping, column=column, k=k, reference=reference, groups=groups,
        thresholds=derive_thresholds(groups, low_fractions, extremes, grouping), n_groups_total=n_total, note=note,
        params={"cells_per_group": int(cells_per_group), "seed": int(seed), "low_cuts": cuts},
    )


def read_mapping_calibration(index_dir: str | Path) -> MappingCalibration | None:
    """The mapping calibration of the index at ``index_dir``; None when it has none (built before it existed).
    IndexFormatError when the file is unreadable or malformed (it is parsed as untrusted input)."""
    path = Path(index_dir) / MAPPING_FILE
    if not path.is_file():
        return None
    fix = mapping_fix(path.parent)
    return _parsed(read_json_object(path, fix), path, fix)


def mapping_calibration(idx: AtlasIndex) -> MappingCalibration | None:
    """The mapping calibration of an opened index, from its file as read when the index was opened (the version
    opened, whatever updates did since: :attr:`AtlasIndex.mapping_data`); None when it has none. IndexFormatError
    when the file was unreadable or is malformed."""
    data = idx.mapping_data
    if data is None:
        return None
    return _parsed(data, idx.path / MAPPING_FILE, mapping_fix(idx.path))


def _parsed(data: dict[str, Any], path: Path, fix: str) -> MappingCalibration:
    try:
        return MappingCalibration.from_dict(data)
    except (ValueError, RecursionError) as exc:
        raise IndexFormatError(f"{path} is damaged ({str(exc)[:200]}): {fix}") from None
