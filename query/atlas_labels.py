"""The atlas side of an annotation: the classes to choose among (under ``where``), their vote weights, the label
heads that decide, the ontology terms answers may fall back to, the atlas datasets and the far-from-atlas
thresholds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.ontology_levels import curated_subclasses
from scatlas.atlas.validate import escaped, escaped_list
from scatlas.index import AtlasIndex, LabelClasses, LabelHead
from scatlas.query.fallback import Ontology
from scatlas.query.vote import UNKNOWN, balance_weights

logger = logging.getLogger(__name__)

DATASET_COLUMN = "dataset_id"
FAR_QUANTILE_WHEN_ON = 0.001
"""The far-from-atlas quantile to use when turning the rule on (the strictest one every index calibrates since it
was added; an older index falls back to its lowest)."""


def as_str_values(values: Any) -> np.ndarray:
    """``values`` as an object array of str, None for missing."""
    s = pd.Series(np.asarray(values, dtype=object))
    return s.where(s.notna(), None).map(lambda v: None if v is None else str(v)).to_numpy(dtype=object)


def codes(values: Any, categories: pd.Index) -> np.ndarray:
    """Positions of ``values`` in ``categories`` (-1: absent or missing)."""
    return np.asarray(categories.get_indexer(pd.Index(as_str_values(values), dtype=object)), dtype=np.int64)


@dataclass
class AtlasLabels:
    """What the atlas contributes to an annotation of ``keys``.

    ``classes``: per key, the atlas label values merged into classes (values mapped to one Cell Ontology term
    are one class); ``categories`` the class names allowed under ``where``; ``class_weights`` their vote factors;
    ``ontology`` the terms answers may fall back to; ``heads`` the label heads that decide (keys without one use
    the neighbours' vote); ``head_columns`` each head class' position in ``categories`` (-1: not allowed).
    """

    keys: list[str]
    selected_ids: np.ndarray | None
    classes: dict[str, LabelClasses]
    categories: dict[str, pd.Index]
    class_weights: dict[str, np.ndarray]
    ontology: dict[str, Ontology]
    heads: dict[str, LabelHead]
    head_columns: dict[str, np.ndarray]
    has_datasets: bool
    datasets: pd.Index
    far_threshold: float | None
    far_nearest: float | None
    far_k: int | None
    far_used: float | None

    @property
    def n_where(self) -> int | None:
        return None if self.selected_ids is None else len(self.selected_ids)

    def class_codes(self, key: str, values: Any) -> np.ndarray:
        """Atlas label values of ``key`` -> positions of their classes in ``categories[key]`` (-1: none)."""
        return codes(self.classes[key].class_of(as_str_values(values)), self.categories[key])


SPARSE_LABELS = 0.5
"""Under this share of the searched atlas cells holding a label, annotating it by the neighbour vote warns: many
query cells will have no labelled neighbour."""


def _class_counts(idx: AtlasIndex, key: str, classes: LabelClasses, ids: np.ndarray | None) -> pd.Series:
    """Cells per class of ``key`` (sorted by name), among the cells ``ids`` (None: all cells).

    ``ids`` come from the ``where`` predicate through :meth:`AtlasIndex.filter_ids`, the one checked path from a
    user predicate to SQL; the predicate itself is never put into this query.
    """
    values, counts = idx.value_counts(key, ids)
    cls = classes.class_of(as_str_values(values))
    series = pd.Series(counts, index=pd.Index(cls, dtype=object))
    return series[series.index.notna()].groupby(level=0).sum().sort_index()


def _ontology(classes: LabelClasses, counts: pd.Series) -> Ontology:
    """The fallback terms among the allowed classes (``counts``: atlas cells per class; flat when no class has a
    term)."""
    categories = list(counts.index)
    if not any(c in classes.class_term for c in categories):
        return Ontology.flat(categories)
    return Ontology.from_terms(
        categories, classes.class_term, classes.term_ancestors, classes.term_names, curated_subclasses(),
        class_cells=counts.to_numpy(dtype=np.float64),
    )


def far_threshold(
    index: AtlasIndex, far_quantile: float | None
) -> tuple[float | None, float | None, int | None, float | None]:
    """(threshold on the mean top-k similarity or None, threshold on the nearest neighbour's similarity or
    None, the k the index calibrated them with or None, the quantile used or None)."""
    cal = index.manifest.calibration
    if not cal.mean_topk:
        if far_quantile is not None:
            logger.warning(
                "the index has no neighbour calibration (too few cells?): 'far_from_atlas' calls are off"
            )
        return None, None, None, None
    if far_quantile is None:
        return None, None, int(cal.k), None
    if far_quantile == FAR_QUANTILE_WHEN_ON and far_quantile not in cal.quantiles:
        lowest = min(cal.quantiles)
        logger.warning(
            "the index was calibrated before far_quantile %s existed: using its lowest calibrated "
            "quantile %s (rebuild the index to get %s)", far_quantile, lowest, far_quantile,
        )
        far_quantile = lowest
    try:
        nearest = float(cal.threshold("first_neighbor", far_quantile)) if cal.first_neighbor else None
        return float(cal.threshold("mean_topk", far_quantile)), nearest, int(cal.k), float(far_quantile)
    except KeyError as exc:
        raise InputError(
            f"the far-from-atlas quantile {far_quantile} is not among the index's calibrated quantiles "
            f"{cal.quantiles}: choose one of them, or leave it unset to turn the far-from-atlas rule off"
        ) from exc


def deciding_heads(
    idx: AtlasIndex, keys: list[str], predictor: str, max_votes_per_dataset: int | None
) -> dict[str, LabelHead]:
    """The label heads that decide the labels ``keys`` (none for the vote)."""
    if max_votes_per_dataset is not None and predictor == "heads":
        raise InputError(
            "max_votes_per_dataset caps the neighbours' vote, which predictor 'heads' does not use (the heads "
            "are trained on a sample spread evenly over atlas datasets); use predictor 'knn' or 'auto'"
        )
    if max_votes_per_dataset is not None and predictor == "auto":
        logger.info("max_votes_per_dataset given: labels come from the capped neighbour vote, not the heads")
    heads = {} if predictor == "knn" or max_votes_per_dataset is not None else idx.label_heads()
    missing_heads = [key for key in keys if key not in heads]
    if predictor == "heads" and missing_heads:
        raise InputError(
            f"the index has no label head for {missing_heads} (heads: {sorted(heads) or 'none'}); train them "
            "with `scatlas build --atlas ATLAS --index INDEX --label-key KEY` (on a built index, with its own build "
            "arguments, this only trains the heads) or use predictor 'knn'/'auto'"
        )
    return {key: heads[key] for key in keys if key in heads}


MAX_LABEL_CLASSES = 5_000
"""A label key with more distinct values among the atlas cells is refused: every query cell gets a probability per
class (CELLxGENE's cell types number in the hundreds; an id column, one per cell, would take gigabytes)."""


def atlas_labels(
    idx: AtlasIndex, keys: list[str], where: str | None, far_quantile: float | None, class_balance: float,
    predictor: str, max_votes_per_dataset: int | None,
) -> AtlasLabels:
    """Read what the atlas contributes to an annotation (see :class:`AtlasLabels`), checking the label keys,
    ``where`` and the predictor against the index."""
    available = idx.columns()
    missing = [c for c in keys if c not in available]
    if missing:
        raise InputError(
            f"label key(s) {escaped_list(missing)} are not columns of the index's cell table; available: "
            f"{escaped_list(available)}"
        )
    selected_ids = None if where is None else idx.filter_ids(where)  # the index's error for a bad or empty filter
    far = far_threshold(idx, far_quantile)
    classes = {key: idx.label_classes(key) for key in keys}
    counts = {key: _class_counts(idx, key, classes[key], selected_ids) for key in keys}
    categories = {key: pd.Index(c.index, dtype=object) for key, c in counts.items()}
    for key, cats in categories.items():
        if len(cats) > MAX_LABEL_CLASSES:
            raise InputError(
                f"the atlas cells hold {len(cats):,} distinct {escaped(key)} values, over the {MAX_LABEL_CLASSES:,} a "
                "label transfer takes: that column names cells or samples, not types (its class probabilities alone "
                f"would take {4 * len(cats):,} bytes per query cell); transfer a label column such as cell_type"
            )
    class_weights = {key: balance_weights(c.to_numpy(), float(class_balance)) for key, c in counts.items()}
    for key, cats in categories.items():
        if UNKNOWN in set(cats):
            logger.warning("the atlas has a %r label %r: it cannot be told apart from abstentions", key, UNKNOWN)
        if len(cats) == 0:
            logger.warning(
                "no atlas cell has a %r label%s: every cell will be unknown", key, f" under where={where!r}" if where else "",
            )
        elif len(cats) == 1 and where is not None:
            logger.warning(
                "the atlas cells under where= hold one %r label: every answer is that label (or unknown), with "
                "confidence 1 by construction; widen the filter to let the confidence tell classes apart", key,
            )
    heads = deciding_heads(idx, keys, predictor, max_votes_per_dataset)
    searched = idx.n_cells if selected_ids is None else len(selected_ids)
    for key in keys:
        labelled = int(counts[key].sum())
        if key not in heads and len(categories[key]) and labelled < SPARSE_LABELS * searched:
            logger.warning(
                "only %.0f%% of the atlas cells searched have a %r label: cells whose nearest atlas cells have none "
                "are unknown (no_labelled_neighbours); search the labelled cells only with --where \"%s IS NOT NULL\"",
                100 * labelled / max(searched, 1), key, key,
            )
    head_columns = {key: codes(h.classes, categories[key]) for key, h in heads.items()}
    for key, cols in head_columns.items():
        if not (cols >= 0).any():
            logger.warning("none of the %r label head's classes is among the atlas labels selected", key)
    has_datasets = DATASET_COLUMN in available
    datasets = pd.Index(
        _dataset_names(idx, selected_ids) if has_datasets else [], dtype=object
    )
    if max_votes_per_dataset is not None and not has_datasets:
        raise InputError(f"max_votes_per_dataset needs a {DATASET_COLUMN!r} column in the index's cell table")
    return AtlasLabels(
        keys=keys, selected_ids=selected_ids, classes=classes, categories=categories, class_weights=class_weights,
        ontology={key: _ontology(classes[key], counts[key]) for key in keys}, heads=heads,
        head_columns=head_columns, has_datasets=has_datasets, datasets=datasets, far_threshold=far[0],
        far_nearest=far[1], far_k=far[2], far_used=far[3],
    )


def _dataset_names(idx: AtlasIndex, ids: np.ndarray | None) -> list[str]:
    values, _ = idx.value_counts(DATASET_COLUMN, ids)
    return sorted({v for v in as_str_values(values) if v is not None})
