"""How far cells added by ``build --update`` lie from what the index was built on: the gate of an update.

The measure: embed a sample of the added cells with the index's embedder and search the index as it is (before
the update) for each one's nearest cell. The build calibrated how close atlas cells are to their nearest other
atlas cell (:class:`index.manifest.SimilarityCalibration`); an added cell is *far* when its nearest similarity is
below that distribution's 1% quantile. Cells like the atlas's are far about 1% of the time (more across batches);
cells the embedder and quantizer were not fitted for (another tissue, another species, a gene panel that lacks
most of the embedder's genes) are mostly far. An update is refused when the far fraction exceeds
``max_far_fraction`` (default :data:`DEFAULT_MAX_FAR_FRACTION`): rebuild so that the embedder is fitted anew.
Beside it, the genes: of the embedder's genes, the share detected (non-zero in some cell) among the sampled added
cells, relative to the share among as many sampled indexed cells (``gene_ratio``). A dataset that lacks most of
the embedder's genes (another species, a panel, symbols the atlas cannot match) embeds onto one blurred point that
may even lie near atlas cells; it is refused when the ratio is below ``min_gene_ratio`` (default
:data:`DEFAULT_MIN_GENE_RATIO`). For IVF indexes the median distance of the added cells to their coarse centroid, relative to the atlas cells',
is reported beside it (``quantization_ratio``; 1 = as well quantized as the atlas).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scatlas.index.factory import ivf_of
from scatlas.index.vectors import l2_normalize

DEFAULT_MAX_FAR_FRACTION = 0.5
DEFAULT_MIN_GENE_RATIO = 0.5
DRIFT_SAMPLE = 2000
"""Added cells embedded to measure drift (spread over the added datasets)."""
FAR_QUANTILE = 0.01


@dataclass(frozen=True)
class Drift:
    """The drift of the added cells (``n_sampled`` of them) against the index before the update."""

    n_sampled: int
    far_fraction: float
    far_threshold: float
    median_similarity: float
    atlas_median_similarity: float
    quantization_ratio: float | None
    max_far_fraction: float
    gene_ratio: float | None = None
    min_gene_ratio: float = DEFAULT_MIN_GENE_RATIO
    gene_ratio_dataset: str | None = None
    """The added dataset whose ratio ``gene_ratio`` is (the lowest of the added datasets'); None: one dataset."""

    @property
    def too_far(self) -> bool:
        genes_lacking = self.gene_ratio is not None and self.gene_ratio < self.min_gene_ratio
        return self.n_sampled > 0 and (self.far_fraction > self.max_far_fraction or genes_lacking)

    def genes_sentence(self) -> str:
        """The gene measure in words ("" when not measured)."""
        if self.gene_ratio is None:
            return ""
        which = "" if self.gene_ratio_dataset is None else f" in dataset {self.gene_ratio_dataset!r}"
        return (f"{self.gene_ratio:.0%} as many of the embedder's genes detected{which} as in the atlas cells "
                f"(limit {self.min_gene_ratio:.0%})")

    def sentence(self) -> str:
        """The measure in words."""
        q = "" if self.quantization_ratio is None else f"; distance to the coarse centroids {self.quantization_ratio:.2f}x the atlas cells'"
        if self.gene_ratio is not None:
            q += "; " + self.genes_sentence()
        return (
            f"{self.far_fraction:.1%} of {self.n_sampled} sampled added cells are far from the indexed cells (nearest "
            f"similarity below the build's 1% quantile {self.far_threshold:.3f}; limit {self.max_far_fraction:.0%}); "
            f"median nearest similarity {self.median_similarity:.3f} against the atlas cells' "
            f"{self.atlas_median_similarity:.3f}{q}"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "too_far": self.too_far}


def _centroid_distance(index: Any, x: np.ndarray) -> np.ndarray | None:
    """Each vector's distance to its nearest coarse centroid, for IVF indexes (None otherwise)."""
    ivf = ivf_of(index)
    if ivf is None or ivf.quantizer.ntotal == 0:
        return None
    from scatlas.index.factory import apply_chain

    xt = apply_chain(index, np.ascontiguousarray(x, dtype=np.float32))
    _, assign = ivf.quantizer.search(xt, 1)
    centroids = ivf.quantizer.reconstruct_batch(assign[:, 0].astype(np.int64))
    return np.asarray(np.linalg.norm(xt - centroids, axis=1), dtype=np.float64)


def measure_drift(
    searcher: Any, manifest: Any, added: np.ndarray, atlas_sample: np.ndarray, *,
    max_far_fraction: float = DEFAULT_MAX_FAR_FRACTION, gene_ratio: float | None = None,
    min_gene_ratio: float = DEFAULT_MIN_GENE_RATIO, gene_ratio_dataset: str | None = None,
) -> Drift:
    """The drift of ``added`` (vectors of sampled added cells) against the index before the update: its
    :class:`~index.searcher.ShardSearcher` and :class:`~index.manifest.IndexManifest` (calibration, search
    defaults); ``atlas_sample``: stored vectors of sampled indexed cells, for the quantization ratio;
    ``gene_ratio``: :func:`detected_genes` of the added cells over that of indexed cells (None: not measured), of
    the added dataset ``gene_ratio_dataset``. The cells an update removes still count as neighbours: the embedder
    and quantizer were fitted on them, and a dataset removed and ingested again is no drift."""
    cal = manifest.calibration
    threshold = float(cal.threshold("first_neighbor", FAR_QUANTILE))
    atlas_median = float(cal.threshold("first_neighbor", 0.5))

    def drift(n: int, far: float, median: float, quantization: float | None) -> Drift:
        return Drift(n, far, threshold, median, atlas_median, quantization, max_far_fraction, gene_ratio,
                     min_gene_ratio, gene_ratio_dataset)

    if len(added) == 0:
        return drift(0, 0.0, float("nan"), None)
    q = l2_normalize(np.asarray(added, dtype=np.float32))
    _, scores = searcher.search(q, 1, nprobe=manifest.search.nprobe, rerank=manifest.search.rerank)
    nearest = scores[:, 0].astype(np.float64)
    ratio = None
    new_d, old_d = _centroid_distance(searcher.trained, q), _centroid_distance(searcher.trained, atlas_sample)
    if new_d is not None and old_d is not None and len(old_d) and float(np.median(old_d)) > 0:
        ratio = float(np.median(new_d) / np.median(old_d))
    return drift(len(q), float(np.mean(nearest < threshold)), float(np.median(nearest)), ratio)


def detected_genes(X: Any, match: Any) -> np.ndarray:
    """``(n_target,)`` bool: the target genes of ``match`` (an embedder's, :class:`atlas.genes.GeneMatch`) with a
    non-zero value in some row of ``X`` (cells x source genes, CSR)."""
    seen = np.unique(X.indices[X.data != 0]) if X.nnz else np.zeros(0, dtype=np.int64)
    hit = np.isin(match.source_cols, seen)
    out = np.zeros(match.n_target, dtype=bool)
    out[match.target_cols[hit]] = True
    return out
