"""Shared helpers of the hunt tests (no tests here): indexes of planted vectors, a small counts-level atlas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from scatlas.atlas.synthetic import SyntheticEmbeddingConfig, vectors_for_range
from scatlas.index import ArrayVectorSource, AtlasIndex, BuildConfig, EmbedderInfo, build_from_source

FAST = {"eval_queries": 100, "calibration_cells": 200}
DATASETS = np.array(["ds0", "ds1", "ds2"])
TISSUES = {"ds0": "kidney", "ds1": "lung", "ds2": "kidney"}
DISEASES = np.array(["normal", "CKD"])


@dataclass
class Planted:
    """Unit vectors of an atlas with a planted rare population, and their metadata."""

    vectors: np.ndarray  # (n, d) float32, L2-normalised
    ids: np.ndarray  # (n,) int64
    is_rare: np.ndarray  # (n,) bool
    dataset: np.ndarray  # (n,) str
    disease: np.ndarray  # (n,) str

    def cells(self) -> pa.Table:
        labelled = self.is_rare & (self.dataset == "ds0")  # the rare cells someone annotated: one dataset only
        return pa.table({
            "soma_joinid": self.ids,
            "dataset_id": self.dataset,
            "tissue": np.array([TISSUES[d] for d in self.dataset]),
            "disease": self.disease,
            "cell_type": np.where(labelled, "Norn cell", np.where(self.is_rare, "unknown", "common")),
            "truth_is_rare": self.is_rare,
        })


def planted(n: int = 20_000, d: int = 32, fraction: float = 0.005, seed: int = 0, gap: int = 0) -> Planted:
    """Clustered atlas vectors plus a rare population near (not on) one common cluster, in all datasets but ds1;
    each dataset has a small batch shift; rare cells are 3x enriched in the CKD donors."""
    rng = np.random.default_rng(seed)
    base = vectors_for_range(SyntheticEmbeddingConfig(n=n, d=d, n_clusters=30, seed=seed), 0, n)[0].astype(np.float64)
    dataset = DATASETS[rng.integers(0, 3, n)]
    disease = DISEASES[rng.integers(0, 2, n)]
    eligible = np.flatnonzero(dataset != "ds1")
    w = np.where(disease[eligible] == "CKD", 3.0, 1.0)
    n_rare = max(1, int(round(fraction * n)))
    rare_rows = rng.choice(eligible, size=n_rare, replace=False, p=w / w.sum())
    is_rare = np.zeros(n, dtype=bool)
    is_rare[rare_rows] = True
    anchor = base[0] / np.linalg.norm(base[0])
    direction = rng.standard_normal(d)
    direction -= direction.dot(anchor) * anchor
    direction /= np.linalg.norm(direction)
    rare = 0.75 * anchor + 0.66 * direction + 0.18 * rng.standard_normal((n_rare, d)) / np.sqrt(d)
    base[rare_rows] = rare
    shifts = {ds: 0.05 * rng.standard_normal(d) / np.sqrt(d) for ds in DATASETS}
    base += np.stack([shifts[ds] for ds in dataset])
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * (1 + gap)
    return Planted(base.astype(np.float32), ids, is_rare, dataset, disease)


def build_vector_index(
    tmp: Path, data: Planted, *, fingerprint: str = "emb-A", shard_size: int = 7000, name: str = "idx"
) -> AtlasIndex:
    """A real (flat) index of the planted vectors, recorded as made by an embedder with ``fingerprint``."""
    src = ArrayVectorSource(data.vectors, data.ids)
    info = EmbedderInfo("test", {"fingerprint": fingerprint}, fingerprint, data.vectors.shape[1])
    out = tmp / name
    build_from_source(src, out, BuildConfig(shard_size=shard_size, **FAST), cells=data.cells(), embedder_info=info)
    return AtlasIndex.open(out)


def stored(data: Planted) -> np.ndarray:
    """The vectors as the index stores them (normalised, float16, by the index's own storage function), as float64."""
    from scatlas.index.vectors import as_stored

    return as_stored(data.vectors)[0].astype(np.float64)


def exact_hits(data: Planted, weights: np.ndarray, bias: float, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: ids and scores with float32(w . x + b) >= cutoff on the stored vectors."""
    s = (stored(data) @ np.asarray(weights, dtype=np.float64) + bias).astype(np.float32)
    keep = s >= np.float32(cutoff)
    return data.ids[keep], s[keep]
