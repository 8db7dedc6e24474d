"""The annotation's JSON report, and its evaluation against known labels (flat and ontology-aware)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

import anndata
import numpy as np
import pandas as pd

from scatlas.atlas.ontology import cell_ontology
from scatlas.index import AtlasIndex, LabelClasses
from scatlas.query.atlas_labels import AtlasLabels, as_str_values
from scatlas.query.evaluate import evaluate_labels, ontology_metrics, term_contains
from scatlas.query.transfer import REASON_NONE, SIMILARITY_COLUMN, Transfer
from scatlas.query.vote import UNKNOWN


def truth_terms(
    values: np.ndarray, classes: LabelClasses, *, user_map: Mapping[str, str] | None = None,
    term_column: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Each truth label's CL term ("" when none) and how each distinct label got it.

    In order: the user's table (``user_map``), the query's own term column (its most frequent CL term per label;
    other values, like CELLxGENE's placeholder ``unknown``, are none),
    the atlas class the label names (its term), then CL names and synonyms (exact, then normalised).
    """
    labels = as_str_values(values)
    onto = None
    found: dict[str, tuple[str, str]] = {}
    own: dict[str, str] = {}
    if term_column is not None:
        onto = cell_ontology()
        pairs = Counter(  # a placeholder ("unknown", CELLxGENE's) or any other non-CL value is no term
            (lbl, t) for lbl, t in zip(labels, as_str_values(term_column), strict=True)
            if lbl is not None and t and onto.is_term(t)
        )
        for (lbl, t), _ in sorted(pairs.items(), key=lambda kv: -kv[1]):
            own.setdefault(lbl, t)
    for lbl in {v for v in labels if v is not None}:
        cls = classes.value_class.get(lbl, lbl)
        if user_map and lbl in user_map:
            found[lbl] = (user_map[lbl], "user")
        elif lbl in own:
            found[lbl] = (own[lbl], "query")
        elif cls in classes.class_term:
            found[lbl] = (classes.class_term[cls], "atlas")
        else:
            onto = onto or cell_ontology()
            term, how = onto.lookup(lbl)
            found[lbl] = (term or "", how if term else "unmapped")
    terms = np.array([found[v][0] if v is not None else "" for v in labels], dtype=object)
    return terms, {lbl: how for lbl, (_, how) in sorted(found.items())}


def truth_classes(values: np.ndarray, classes: LabelClasses, terms: np.ndarray) -> np.ndarray:
    """Truth labels as atlas class names where they name one: an atlas value maps to its class, a label with the
    CL term of a class to that class; other labels stay as they are (absent from the atlas)."""
    by_term = {t: c for c, t in classes.class_term.items()}
    labels = as_str_values(values)
    out = [
        None if v is None else classes.value_class.get(v) or by_term.get(t) or v
        for v, t in zip(labels, terms, strict=True)
    ]
    return np.asarray(out, dtype=object)


class Truth(NamedTuple):
    """Known labels of one key: as atlas class names where they name one (``classes``), their CL terms
    (``terms``, "" when none) and how each distinct label got its term (``how``)."""

    classes: np.ndarray
    terms: np.ndarray
    how: dict[str, str]


def read_truth(
    truth: pd.Series, classes: LabelClasses, *, user_map: Mapping[str, str] | None = None,
    term_column: np.ndarray | None = None,
) -> Truth:
    """The known labels ``truth`` mapped onto the atlas' classes and CL terms (:func:`truth_terms`)."""
    raw = truth.to_numpy()
    terms, how = truth_terms(raw, classes, user_map=user_map, term_column=term_column)
    return Truth(truth_classes(raw, classes, terms), terms, how)


def evaluate(key: str, truth: Truth, predictions: pd.DataFrame, atlas: AtlasLabels) -> dict[str, Any]:
    """Scores of one label key: flat (accuracy, macro-F1 of ``{key}_pred_fine`` against the atlas classes), the
    same with abstentions counted as misses, and ontology-aware (accuracy of the answers, ECE of their
    confidence)."""
    categories = set(atlas.categories[key])
    t = truth.classes
    flat = evaluate_labels(t, predictions[f"{key}_pred_fine"].to_numpy(), categories)
    strict = evaluate_labels(t, predictions[f"{key}_pred"].to_numpy(), categories)
    ontology = ontology_metrics(
        truth.terms, predictions[f"{key}_level"].astype(str).to_numpy(),
        predictions[f"{key}_pred_ontology_term_id"].to_numpy(), predictions[f"{key}_confidence"].to_numpy(),
        cell_ontology().ancestors,
    )
    absent = Counter(v for v in t if v is not None and v not in categories)
    return {
        **flat,
        "with_abstention": {name: value for name, value in strict.items() if name != "per_class"},
        "ontology": {**ontology, "truth_terms_by": dict(Counter(truth.how.values()))},
        "truth_labels_absent_from_atlas": dict(absent.most_common()),
        "absent_answered_with_a_broader_type": _absent_contained(truth, predictions[f"{key}_pred_ontology_term_id"],
                                                                 categories),
    }


def _absent_contained(truth: Truth, answer_terms: pd.Series, categories: set[str]) -> float | None:
    """Of the cells whose truth label the atlas lacks and has a CL term, the share answered with that term or one
    of its ancestors (a monocyte class for "FCGR3A+ Mono": right, if coarser); None when there are none."""
    ancestors = cell_ontology().ancestors
    a = answer_terms.to_numpy()
    rows = [i for i, (v, term) in enumerate(zip(truth.classes, truth.terms, strict=True))
            if v is not None and v not in categories and term]
    if not rows:
        return None
    right = sum(term_contains(a[i], truth.terms[i], ancestors) for i in rows)
    return round(right / len(rows), 4)


def label_summary(predictions: pd.DataFrame, key: str, atlas: AtlasLabels) -> dict[str, Any]:
    """Counts, unknown rate and reasons, levels and mean confidence of one label key's answers."""
    p = predictions[f"{key}_pred"]
    counts = p.value_counts()
    reasons = predictions[f"{key}_unknown_reason"].value_counts()
    levels = predictions[f"{key}_level"].value_counts()
    return {
        "predicted_by": "heads" if key in atlas.heads else "knn",
        "n_atlas_labels": len(atlas.categories[key]),
        "n_predicted_labels": int(predictions.loc[predictions[f"{key}_level"] == "fine", f"{key}_pred"].nunique()),
        "counts": {str(lbl): int(c) for lbl, c in counts.items() if c > 0},
        "unknown_rate": round(float((p == UNKNOWN).mean()), 4) if len(p) else 0.0,
        "unknown_reasons": {str(r): int(c) for r, c in reasons.items() if r != REASON_NONE and c > 0},
        "levels": {str(lv): int(c) for lv, c in levels.items() if c > 0},
        "mean_confidence": round(float(predictions[f"{key}_confidence"].mean()), 4) if len(p) else 0.0,
        "ontology_terms": len(atlas.ontology[key].terms),
        "classes_with_term": int(sum(bool(t) for t in atlas.ontology[key].class_terms)),
    }


def index_summary(idx: AtlasIndex) -> dict[str, Any]:
    """The index an annotation used: path, build id, embedder, atlas."""
    m = idx.manifest
    return {
        "path": str(idx.path),
        "manifest_sha256": idx.build_id,
        "n_cells": m.n_cells,
        "embedder": {"name": m.embedder.name, "fingerprint": m.embedder.fingerprint, "dim": m.embedder.dim},
        "atlas": {
            "n_cells": m.atlas_snapshot.get("n_cells"),
            "gene_vocabulary": m.atlas_snapshot.get("gene_vocabulary"),
            "datasets": [d.get("dataset_id") for d in m.atlas_snapshot.get("datasets", [])],
        },
        "factory": m.factory,
    }


def far_summary(atlas: AtlasLabels, run: Transfer, k: int, predictions: pd.DataFrame) -> dict[str, Any]:
    """The far-from-atlas rule and the query's similarity quantiles."""
    sim = predictions[SIMILARITY_COLUMN].to_numpy(dtype=np.float64)
    return {
        "statistic": f"mean similarity of the {atlas.far_k or k} nearest atlas cells, and similarity "
        "of the nearest one (far = both below their thresholds)",
        "threshold": atlas.far_threshold,
        "nearest_threshold": atlas.far_nearest,
        "quantile": atlas.far_used if atlas.far_threshold is not None else None,
        "query_similarity_quantiles": {str(q): round(float(np.nanquantile(sim, q)), 4) for q in (0.01, 0.05, 0.5)}
        if np.isfinite(sim).any()
        else {},
    }


def query_summary(source: Any, query: Any, n: int) -> dict[str, Any]:
    """The query: where it came from, its size and what its expression values are."""
    return {
        "source": str(query) if not isinstance(query, anndata.AnnData) else "<AnnData in memory>",
        "n_cells": n,
        "n_genes": len(source.genes),
        "expression": source.expression.describe(),
        "x_kind": source.expression.x_kind,
    }
