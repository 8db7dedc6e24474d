"""The label transfer proper, chunk by chunk: embed, shift, search, class probabilities per label key; then, over
the whole query, the answers (:mod:`query.fallback`) and the reasons for each ``unknown``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from scatlas.index import AtlasIndex, apply_shift, l2_normalize
from scatlas.query.atlas_labels import DATASET_COLUMN, AtlasLabels, codes
from scatlas.query.expression_match import ExpressionMatch
from scatlas.query.fallback import LEVELS, answer
from scatlas.query.vote import (
    REASON_FAR,
    REASON_LOW_CONFIDENCE,
    REASON_NO_EXPRESSION,
    REASON_NO_LABEL,
    REASON_NONE,
    UNKNOWN,
    Weighting,
    far_from_atlas,
    mean_top_similarity,
    vote,
    vote_shares,
    vote_weights,
)

REASON_OUT_OF_ATLAS = "out_of_atlas"
REASONS = (REASON_NONE, REASON_LOW_CONFIDENCE, REASON_FAR, REASON_OUT_OF_ATLAS, REASON_NO_EXPRESSION, REASON_NO_LABEL)
SIMILARITY_COLUMN = "atlas_similarity"
NEAREST_COLUMN = "atlas_nearest_similarity"
EXPRESSION_COLUMN = "atlas_expression_match"


def head_probabilities(proba: np.ndarray, columns: np.ndarray, n_labels: int) -> np.ndarray:
    """A head's class probabilities moved onto the annotation's class codes; classes outside them (a ``where``
    filter that leaves some out) are dropped and the rest renormalised."""
    out = np.zeros((len(proba), n_labels), dtype=np.float64)
    keep = columns >= 0
    out[:, columns[keep]] = proba[:, keep]
    total = out.sum(axis=1, keepdims=True)
    np.divide(out, total, out=out, where=total > 0)
    return out


class Transfer:
    """Accumulates, chunk by chunk, each query cell's class probabilities per label key, its similarity to the
    atlas and (optionally) its neighbours; :meth:`predictions` turns them into answers."""

    def __init__(
        self, idx: AtlasIndex, atlas: AtlasLabels, *, k: int, weighting: Weighting,
        max_votes_per_dataset: int | None, where: str | None, keep_neighbors: bool, n: int, shift: np.ndarray | None,
    ) -> None:
        self.idx, self.atlas, self.k, self.where, self.shift = idx, atlas, k, where, shift
        self.weighting, self.max_votes, self.keep_neighbors = weighting, max_votes_per_dataset, keep_neighbors
        self.stat_k = atlas.far_k or k  # the similarity statistic uses the calibration's k, to be comparable with it
        self.k_search = max(k, self.stat_k)
        self.want_genes = any(h.needs_gene_features for h in atlas.heads.values())
        self.proba = {key: np.zeros((n, len(atlas.categories[key])), dtype=np.float32) for key in atlas.keys}
        self.preferred = {key: np.full(n, -1, dtype=np.int64) for key in atlas.keys}
        self.silent = np.zeros(n, dtype=bool)
        self.similarity = np.full(n, np.nan, dtype=np.float32)
        self.nearest = np.full(n, np.nan, dtype=np.float32)
        self.expression: ExpressionMatch | None = None  # set before add() to score each cell's expression match
        self.expression_match = np.full(n, np.nan, dtype=np.float32)
        self.expression_depth = np.zeros(n, dtype=np.int64)  # detected genes among those the match compares
        self.neighbors: list[tuple[np.ndarray, ...]] = []
        self.lookup = list(dict.fromkeys([*atlas.keys, *([DATASET_COLUMN] if atlas.has_datasets else [])]))
        self.t_embed = self.t_search = self.t_vote = 0.0

    @property
    def n_silent(self) -> int:
        return int(self.silent.sum())

    def add(self, chunk: Any) -> None:
        """Process one chunk of query cells (its ids are row positions in the query)."""
        rows = np.asarray(chunk.ids, dtype=np.int64)
        t0 = time.perf_counter()
        embedder = self.idx.embedder
        if self.want_genes:
            raw, gene_features = embedder.transform_with_features(chunk)
            vectors = l2_normalize(raw)  # as idx.embed(chunk)
        else:
            vectors, gene_features = self.idx.embed(chunk), None
        vectors = apply_shift(vectors, self.shift)
        self.silent[rows] = ~embedder.expressed(chunk)
        if self.expression is not None:
            features = gene_features if gene_features is not None else embedder.gene_features(chunk)
            if features is not None:
                self.expression_match[rows], self.expression_depth[rows] = self.expression.scores(features)
        t1 = time.perf_counter()
        result = self.idx.search(vectors, self.k_search, self.where)
        t2 = time.perf_counter()
        ids, scores = result.ids, result.scores
        valid = ids >= 0
        uniq = np.unique(ids[valid])
        meta = self.idx.cells(uniq, columns=self.lookup)
        pos = np.searchsorted(uniq, np.where(valid, ids, uniq[0] if len(uniq) else 0))
        self.similarity[rows] = mean_top_similarity(scores, self.stat_k)
        self.nearest[rows] = mean_top_similarity(scores, 1)
        dcodes = None
        if self.atlas.has_datasets and len(uniq):
            dcodes = np.where(valid, codes(meta[DATASET_COLUMN], self.atlas.datasets)[pos], -1)
        weights = vote_weights(scores[:, : self.k], self.weighting)
        for key in self.atlas.keys:
            if key in self.atlas.heads:
                p = self.atlas.heads[key].predict_proba(vectors, gene_features)
                p = head_probabilities(p, self.atlas.head_columns[key], len(self.atlas.categories[key]))
            else:
                labels = np.where(valid, self.atlas.class_codes(key, meta[key])[pos], -1) if len(uniq) else -np.ones_like(ids)
                p = self._vote(key, rows, labels[:, : self.k], weights, dcodes)
            self.proba[key][rows] = np.where(self.silent[rows, None], 0.0, p)
        if self.keep_neighbors:
            self._keep_neighbors(rows, ids[:, : self.k], scores[:, : self.k], dcodes)
        t3 = time.perf_counter()
        self.t_embed += t1 - t0
        self.t_search += t2 - t1
        self.t_vote += t3 - t2

    def _vote(self, key: str, rows: np.ndarray, labels: np.ndarray, weights: np.ndarray,
              dcodes: np.ndarray | None) -> np.ndarray:
        """The neighbours' vote shares per class; the vote's winner breaks ties (nearest tied neighbour)."""
        n_labels, cw = len(self.atlas.categories[key]), self.atlas.class_weights[key]
        ds = None if dcodes is None else dcodes[:, : self.k]
        self.preferred[key][rows] = vote(labels, weights, n_labels=n_labels, datasets=ds,
                                         max_votes_per_dataset=self.max_votes, class_weights=cw).winner
        return vote_shares(labels, weights, n_labels=n_labels, datasets=ds, max_votes_per_dataset=self.max_votes,
                           class_weights=cw)

    def _keep_neighbors(
        self, rows: np.ndarray, top_ids: np.ndarray, top_scores: np.ndarray, dcodes: np.ndarray | None
    ) -> None:
        m = (top_ids >= 0) & ~self.silent[rows, None]  # a cell without expression has no neighbours to show
        r_idx, c_idx = np.nonzero(m)
        datasets = dcodes[:, : self.k][m] if dcodes is not None else np.full(int(m.sum()), -1)
        self.neighbors.append(
            (rows[r_idx].astype(np.int64), top_ids[m], c_idx.astype(np.int16), top_scores[m].astype(np.float32),
             datasets.astype(np.int32))
        )

    def far(self) -> np.ndarray:
        """Cells beyond the atlas by the far-from-atlas rule (all False when it is off)."""
        a = self.atlas
        if a.far_threshold is None:
            return np.zeros(len(self.similarity), dtype=bool)
        return far_from_atlas(self.similarity, a.far_threshold, self.nearest, a.far_nearest)

    def predictions(
        self, obs_names: pd.Index, *, min_confidence: dict[str, float], out_of_atlas: np.ndarray,
        mapping_score: np.ndarray | None,
    ) -> pd.DataFrame:
        """The predictions table, one row per query cell (columns: see :class:`query.annotate.AnnotationResult`);
        ``min_confidence``: the cut of each label key."""
        predictions = pd.DataFrame(index=obs_names)
        far = self.far()
        for key in self.atlas.keys:
            for column, values in self._answer_columns(key, min_confidence[key], far, out_of_atlas).items():
                predictions[column] = values
            # NaN for every cell where the index has no mapping calibration (nothing to score against)
            predictions[f"{key}_mapping_score"] = (mapping_score.astype(np.float32) if mapping_score is not None
                                                   else np.full(len(obs_names), np.nan, dtype=np.float32))
        predictions[SIMILARITY_COLUMN] = self.similarity
        predictions[NEAREST_COLUMN] = self.nearest
        if self.expression is not None:
            predictions[EXPRESSION_COLUMN] = self.expression_match
        return predictions

    def _answer_columns(
        self, key: str, min_confidence: float, far: np.ndarray, out_of_atlas: np.ndarray
    ) -> dict[str, Any]:
        onto = self.atlas.ontology[key]
        classes = list(self.atlas.categories[key])
        a = answer(self.proba[key], onto, min_confidence, self.preferred[key])
        level = a.level.copy()
        reason = np.where(level == 2, REASONS.index(REASON_LOW_CONFIDENCE), 0)
        unlabelled = ~self.silent & (self.proba[key].sum(axis=1) <= 0)  # no neighbour (or head class) had the label
        for mask, name in ((unlabelled, REASON_NO_LABEL), (far, REASON_FAR), (out_of_atlas, REASON_OUT_OF_ATLAS),
                           (self.silent, REASON_NO_EXPRESSION)):
            reason = np.where(mask, REASONS.index(name), reason)
            level = np.where(mask, 2, level).astype(np.int8)
        names = [*classes, *(n for n in onto.names if n not in classes)]
        names += [UNKNOWN] if UNKNOWN not in names else []
        class_code = np.where(a.fine >= 0, a.fine, names.index(UNKNOWN))
        term_code = np.array([names.index(n) for n in onto.names], dtype=np.int64)
        pred = np.where(level == 0, class_code, names.index(UNKNOWN))
        if len(onto.names):
            pred = np.where(level == 1, term_code[np.maximum(a.term, 0)], pred)
        class_terms = np.asarray([*onto.class_terms, ""], dtype=object)
        terms = np.asarray([*onto.terms, ""], dtype=object)
        term_id = np.where(level == 0, class_terms[np.where(a.fine >= 0, a.fine, -1)], "")
        term_id = np.where(level == 1, terms[np.where(a.term >= 0, a.term, -1)], term_id)
        fine_names = [*classes, *([UNKNOWN] if UNKNOWN not in classes else [])]
        fine_code = np.where(a.fine >= 0, a.fine, fine_names.index(UNKNOWN))
        runner_names = [*classes, *([""] if "" not in classes else [])]
        runner_code = np.where(a.runner_up >= 0, a.runner_up, runner_names.index(""))
        return {
            f"{key}_pred": pd.Categorical.from_codes(pred, categories=names),
            f"{key}_pred_ontology_term_id": term_id.astype(str),
            f"{key}_pred_fine": pd.Categorical.from_codes(fine_code, categories=fine_names),
            f"{key}_confidence": a.confidence,
            f"{key}_level": pd.Categorical.from_codes(level.astype(np.int64), categories=list(LEVELS)),
            f"{key}_unknown_reason": pd.Categorical.from_codes(reason.astype(np.int64), categories=list(REASONS)),
            f"{key}_runner_up": pd.Categorical.from_codes(runner_code.astype(np.int64), categories=runner_names),
            f"{key}_runner_up_proba": a.runner_up_proba,
        }

    def neighbors_frame(self, obs_names: pd.Index) -> pd.DataFrame:
        """One row per (query cell, neighbour) kept: query_row, query_cell, atlas_cell_id, rank, similarity,
        dataset_id."""
        datasets = self.atlas.datasets
        if self.neighbors:
            q, a, r, s, d = (np.concatenate(x) for x in zip(*self.neighbors, strict=True))
        else:
            q = a = np.zeros(0, dtype=np.int64)
            r, s, d = np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int32)
        return pd.DataFrame(
            {
                "query_row": q,
                "query_cell": pd.Categorical.from_codes(q, categories=pd.Index(obs_names).unique())
                if obs_names.is_unique
                else np.asarray(obs_names)[q],
                "atlas_cell_id": a,
                "rank": r,
                "similarity": s,
                "dataset_id": pd.Categorical.from_codes(d, categories=list(datasets))
                if len(datasets)
                else pd.Categorical([None] * len(d)),
            }
        )
