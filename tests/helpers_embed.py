"""Small synthetic data for the embedder tests: counts with planted cell types and marker genes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.normalize import to_lognorm


@dataclass
class Synthetic:
    counts: sp.csr_matrix  # (n_cells, n_genes) float32 integer counts
    labels: np.ndarray  # (n_cells,) int planted type
    genes: GeneVocabulary  # Ensembl ids + symbols
    dataset: np.ndarray  # (n_cells,) str dataset id


def gene_vocabulary(n_genes: int) -> GeneVocabulary:
    return GeneVocabulary.from_arrays(
        [f"ENSG{i + 1:011d}" for i in range(n_genes)], [f"GENE{i + 1}" for i in range(n_genes)]
    )


def make_counts(
    n_cells: int = 360,
    n_genes: int = 300,
    n_types: int = 3,
    n_markers: int = 25,
    n_zero_genes: int = 10,
    n_datasets: int = 1,
    seed: int = 0,
) -> Synthetic:
    """Gamma-Poisson counts; each type has ``n_markers`` genes 6x up; the last ``n_zero_genes`` genes are all zero.

    With several datasets, each dataset gets its own per-gene scaling (a mild batch effect).
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, n_genes) * 0.5
    base[n_genes - n_zero_genes :] = 0.0
    profiles = np.tile(base, (n_types, 1))
    for t in range(n_types):
        markers = np.arange(t * n_markers, (t + 1) * n_markers)
        profiles[t, markers] = base[markers] * 6 + 1.0
    labels = np.arange(n_cells) % n_types
    dataset = np.array([f"d{i % n_datasets}" for i in range(n_cells)])
    batch = {f"d{d}": rng.lognormal(0.0, 0.15, n_genes) for d in range(n_datasets)}
    libsize = rng.lognormal(0.0, 0.3, n_cells)
    rates = profiles[labels] * libsize[:, None] * np.stack([batch[d] for d in dataset])
    rates = rng.gamma(2.0, rates / 2.0)
    counts = rng.poisson(rates).astype(np.float32)
    return Synthetic(sp.csr_matrix(counts), labels, gene_vocabulary(n_genes), dataset)


def chunk_of(
    X: sp.csr_matrix,
    genes: GeneVocabulary,
    kind: str = "counts",
    ids: np.ndarray | None = None,
    dataset_id: str | None = "d0",
    obsm: dict[str, np.ndarray] | None = None,
) -> CellChunk:
    ids = np.arange(X.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    return CellChunk(
        ids=ids,
        X=sp.csr_matrix(X, dtype=np.float32),
        x_kind=kind,  # type: ignore[arg-type]
        genes=genes,
        obsm=obsm or {},
        dataset_id=dataset_id,
    )


def chunks_of(data: Synthetic, size: int = 100, kind: str = "counts") -> list[CellChunk]:
    """Chunks of ``size`` cells, never spanning datasets (as the store yields them)."""
    X = data.counts if kind == "counts" else to_lognorm(data.counts, "counts")
    out = []
    for d in np.unique(data.dataset):
        rows = np.flatnonzero(data.dataset == d)
        for s in range(0, len(rows), size):
            r = rows[s : s + size]
            out.append(chunk_of(X[r], data.genes, kind, ids=r, dataset_id=str(d)))
    return out


def nearest_centroid_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    cents = np.stack([emb[labels == t].mean(axis=0) for t in np.unique(labels)])
    d = ((emb[:, None, :] - cents[None]) ** 2).sum(axis=2)
    return float((np.unique(labels)[d.argmin(axis=1)] == labels).mean())


def knn_transfer_accuracy(ref: np.ndarray, ref_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray,
                          k: int = 15) -> float:
    """Majority vote over the k nearest reference cells by cosine similarity."""
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sims = unit(query) @ unit(ref).T
    nn = np.argsort(-sims, axis=1)[:, :k]
    classes, codes = np.unique(ref_labels, return_inverse=True)
    votes = np.zeros((len(query), len(classes)))
    np.add.at(votes, (np.repeat(np.arange(len(query)), k), codes[nn].ravel()), 1)
    return float((classes[votes.argmax(axis=1)] == query_labels).mean())


def tiny_scvi_model(adata, path, *, n_latent: int = 6, epochs: int = 2):
    """A tiny scVI model of ``adata``'s counts (its first and second half as batches ``b1``/``b2``, which ``adata.obs``
    gains as ``batch``), trained for ``epochs`` on the CPU and saved with ``model.save`` into ``path``; returned.
    Seeded: an unseeded model's random start made the tests that annotate with it flaky (accuracy 0.49-0.95)."""
    import scvi

    from scatlas.atlas.embed.scvi_backend import quiet, seeded

    adata.obs["batch"] = np.where(np.arange(adata.n_obs) < adata.n_obs // 2, "b1", "b2")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    with seeded(0):
        model = scvi.model.SCVI(adata, n_latent=n_latent, n_hidden=32, encode_covariates=True)
    with seeded(0), quiet():
        model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    model.save(str(path))
    return model
