"""A toy scatlas embedder plug-in: a fixed random projection of log1p(CP10k) of the atlas' most expressed genes.

Registered through the ``scatlas.embedders`` entry point (see ../pyproject.toml) as ``toy``; docs/embedders.md
("Writing an embedder") walks through it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.embed import Embedder
from scatlas.atlas.genes import GeneVocabulary, match_genes
from scatlas.atlas.normalize import to_lognorm


class ToyEmbedder(Embedder):
    """A fixed random projection (``dim`` seeded directions) of the log1p(CP10k) of the ``n_genes`` genes the fit
    sample expresses most; the chosen genes are its only fitted state."""

    name = "toy"

    def __init__(self, n_genes: int = 100, dim: int = 16, seed: int = 0, genes: list[str] | None = None) -> None:
        self.n_genes, self._dim, self.seed, self.genes = int(n_genes), int(dim), int(seed), genes

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def requires_fit(self) -> bool:
        return self.genes is None

    @property
    def is_fitted(self) -> bool:
        return self.genes is not None

    def fit(self, sample) -> None:
        totals: dict[str, float] = {}
        for chunk in sample() if callable(sample) else sample:
            sums = np.asarray(to_lognorm(sp.csr_matrix(chunk.X), chunk.x_kind).sum(axis=0)).ravel()
            for gene, total in zip(chunk.genes.keys, sums, strict=True):
                totals[str(gene)] = totals.get(str(gene), 0.0) + float(total)
        self.genes = sorted(totals, key=lambda g: (-totals[g], g))[: self.n_genes]

    def gene_match(self, genes: GeneVocabulary):
        return match_genes(genes, GeneVocabulary.from_identifiers(self.genes))

    def transform(self, chunk) -> np.ndarray:
        match = self.gene_match(chunk.genes)
        logged = to_lognorm(sp.csr_matrix(chunk.X), chunk.x_kind)[:, match.source_cols]
        values = np.zeros((len(chunk), len(self.genes)), dtype=np.float32)
        values[:, match.target_cols] = logged.toarray()
        directions = np.random.default_rng(self.seed).standard_normal((len(self.genes), self._dim))
        return (values @ directions.astype(np.float32)).astype(np.float32)

    def params(self) -> dict:
        return {"n_genes": self.n_genes, "dim": self._dim, "seed": self.seed, "genes": self.genes}

    @classmethod
    def _load(cls, directory, params: dict) -> ToyEmbedder:
        return cls(**params)
