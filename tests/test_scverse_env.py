"""The environment `make setup` builds runs the scverse workflow that users run beside scatlas.

Each test runs a real step of that workflow on small synthetic data with planted cell types (tests/conftest.py's
make_adata) and checks its outcome: scanpy's preprocessing, neighbours, UMAP and ``tl.ingest`` (label transfer
from a reference to a query), and CellTypist training a model of its own and annotating held-out cells. Nothing is
downloaded: CellTypist's model is trained here, and its download function is replaced by one that fails.

These break when a dependency moves under scanpy or CellTypist (scanpy 1.11.5's tl.ingest with pynndescent 0.7,
CellTypist 1.7.1 with scikit-learn >= 1.8): see the pins of the ``scverse`` extra in pyproject.toml. The steps
that numba compiles (neighbours, UMAP, ingest's search) cost tens of seconds once per process: those are ``slow``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import anndata
import numpy as np
import pytest

from tests.conftest import make_adata

IN_FRESH_PROCESS = os.environ.get("SCATLAS_FRESH_PROCESS") == "1"
fresh_process_only = pytest.mark.skipif(
    not IN_FRESH_PROCESS, reason="run in a fresh process by test_ingest_steps_in_a_fresh_process"
)
"""scanpy's ``tl.ingest`` failed with a numba TypingError inside pynndescent after hundreds of other tests in one
pytest process (clean-clone `make test`, 2026-12-06), and passed alone, in the same environment; a user runs it in
a process of their own, so these steps run in one too."""

N_GENES = 200
CELL_TYPES = ("T cell", "B cell", "monocyte", "NK cell")


@pytest.fixture(scope="module")
def sc() -> ModuleType:
    import scanpy

    return scanpy


@pytest.fixture(scope="module")
def celltypist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """CellTypist, with its data folder (created at import) in a temporary folder and downloads made to fail."""
    mp = pytest.MonkeyPatch()
    if "celltypist" not in sys.modules:
        mp.setenv("CELLTYPIST_FOLDER", str(tmp_path_factory.mktemp("celltypist")))
    module = importlib.import_module("celltypist")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test must not download CellTypist models")

    mp.setattr(module.models, "download_models", no_download)
    mp.setattr(module.models, "_requests_get", no_download)
    yield module
    mp.undo()


def _pair() -> tuple[anndata.AnnData, anndata.AnnData]:
    """A reference and a query drawn with the same planted programs over the same genes, different cells."""
    ref = make_adata(600, N_GENES, seed=1, prefix="ref", cell_types=CELL_TYPES)
    query = make_adata(300, N_GENES, seed=2, prefix="query", cell_types=CELL_TYPES)
    assert list(ref.var_names) == list(query.var_names)
    return ref, query


def _normalize(sc: ModuleType, adata: anndata.AnnData) -> anndata.AnnData:
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def reference(sc: ModuleType) -> anndata.AnnData:
    """The reference through scanpy's standard steps, once per module (numba compiles each step's kernels once)."""
    ref, _ = _pair()
    _normalize(sc, ref)
    sc.pp.pca(ref, n_comps=20, random_state=0)
    sc.pp.neighbors(ref, n_neighbors=15, random_state=0)
    sc.tl.umap(ref, random_state=0)
    return ref


def test_scanpy_normalize_log1p_pca(sc: ModuleType) -> None:
    ref, _ = _pair()
    counts = ref.X.copy()
    _normalize(sc, ref)
    totals = np.expm1(ref.X.toarray()).sum(axis=1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert (ref.X.toarray() >= 0).all() and ref.X.nnz == counts.nnz
    sc.pp.pca(ref, n_comps=20, random_state=0)
    assert ref.obsm["X_pca"].shape == (ref.n_obs, 20)
    assert ref.varm["PCs"].shape == (N_GENES, 20)
    ratio = ref.uns["pca"]["variance_ratio"]
    assert (np.diff(ratio) <= 1e-9).all()
    # Four planted programs: the first three components carry the structure, the next ones noise.
    assert ratio[:3].sum() > 1.5 * ratio[3:6].sum()


@pytest.mark.slow
def test_scanpy_neighbors_and_umap(reference: anndata.AnnData) -> None:
    ref = reference
    conn = ref.obsp["connectivities"]
    assert conn.shape == (ref.n_obs, ref.n_obs) and conn.nnz > 0
    # Planted programs: a cell's neighbours are overwhelmingly of its own type.
    dist = ref.obsp["distances"].tocsr()
    labels = ref.obs["cell_type"].to_numpy()
    same = [
        np.mean(labels[dist.indices[dist.indptr[i] : dist.indptr[i + 1]]] == labels[i])
        for i in range(ref.n_obs)
    ]
    assert np.mean(same) > 0.95
    emb = ref.obsm["X_umap"]
    assert emb.shape == (ref.n_obs, 2) and np.isfinite(emb).all()
    # The types separate in the embedding too: a cell's own type centroid is its nearest one on most cells.
    types = np.unique(labels)
    centroids = np.stack([emb[labels == t].mean(axis=0) for t in types])
    nearest = types[np.argmin(((emb[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert np.mean(nearest == labels) > 0.9


@pytest.mark.slow
@pytest.mark.skipif(IN_FRESH_PROCESS, reason="the parent of the fresh-process tests")
def test_ingest_steps_in_a_fresh_process() -> None:
    """scanpy's ingest, on synthetic and on real data, in a fresh Python process (see :data:`fresh_process_only`)."""
    names = ["test_scanpy_ingest_transfers_labels", "test_scanpy_ingest_on_real_pbmc"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"{__file__}::{n}" for n in names)],
        env={**os.environ, "SCATLAS_FRESH_PROCESS": "1"}, cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " failed" not in proc.stdout and " passed" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
@fresh_process_only
def test_scanpy_ingest_transfers_labels(sc: ModuleType, reference: anndata.AnnData) -> None:
    _, query = _pair()
    truth = query.obs["cell_type"].to_numpy().astype(str)
    query.obs = query.obs.drop(columns=["cell_type"])
    _normalize(sc, query)
    sc.tl.ingest(query, reference.copy(), obs="cell_type", embedding_method=["pca", "umap"])
    assert query.obsm["X_pca"].shape == (query.n_obs, 20)
    assert query.obsm["X_umap"].shape == (query.n_obs, 2) and np.isfinite(query.obsm["X_umap"]).all()
    predicted = query.obs["cell_type"].to_numpy().astype(str)
    assert set(predicted) <= set(CELL_TYPES)
    assert np.mean(predicted == truth) > 0.95
    # The query lands beside its own type in the reference's UMAP.
    ref_labels = reference.obs["cell_type"].to_numpy().astype(str)
    types = np.unique(ref_labels)
    centroids = np.stack([reference.obsm["X_umap"][ref_labels == t].mean(axis=0) for t in types])
    emb = query.obsm["X_umap"]
    nearest = types[np.argmin(((emb[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert np.mean(nearest == truth) > 0.9


def test_celltypist_trains_and_annotates_held_out_cells(
    sc: ModuleType, celltypist: ModuleType, tmp_path: Path
) -> None:
    ref, query = _pair()
    truth = query.obs["cell_type"].to_numpy().astype(str)
    _normalize(sc, ref)
    _normalize(sc, query)
    model = celltypist.train(ref, labels="cell_type", n_jobs=1, max_iter=200, feature_selection=False)
    assert sorted(model.cell_types) == sorted(CELL_TYPES)
    # CellTypist drops genes that no training cell expresses; the rest are the model's features.
    assert set(model.features) <= set(ref.var_names) and len(model.features) > 0.9 * N_GENES
    result = celltypist.annotate(query, model=model, majority_voting=False)
    predicted = result.predicted_labels["predicted_labels"].to_numpy().astype(str)
    assert predicted.shape == (query.n_obs,)
    assert np.mean(predicted == truth) > 0.95
    probs = result.probability_matrix
    assert list(probs.index) == list(query.obs_names)
    assert set(probs.columns) == set(CELL_TYPES)
    # The model round-trips through its own file format, and predicts the same from the reloaded copy.
    out = tmp_path / "synthetic.pkl"
    model.write(str(out))
    reloaded = celltypist.models.Model.load(str(out))
    again = celltypist.annotate(query, model=reloaded, majority_voting=False)
    assert (again.predicted_labels["predicted_labels"].to_numpy().astype(str) == predicted).all()


@pytest.mark.slow
def test_celltypist_majority_voting_over_scanpy_clusters(sc: ModuleType, celltypist: ModuleType) -> None:
    """Majority voting over-clusters the query with scanpy's Leiden on the query's own neighbour graph."""
    ref, query = _pair()
    truth = query.obs["cell_type"].to_numpy().astype(str)
    _normalize(sc, ref)
    _normalize(sc, query)
    sc.pp.pca(query, n_comps=20, random_state=0)
    sc.pp.neighbors(query, n_neighbors=15, random_state=0)
    model = celltypist.train(ref, labels="cell_type", n_jobs=1, max_iter=200)
    result = celltypist.annotate(query, model=model, majority_voting=True)
    voted = result.predicted_labels["majority_voting"].to_numpy().astype(str)
    assert np.mean(voted == truth) > 0.95
    labelled = result.to_adata()
    assert "majority_voting" in labelled.obs and "conf_score" in labelled.obs
    # One vote per over-cluster.
    per_cluster = result.predicted_labels.groupby("over_clustering", observed=True)[
        "majority_voting"
    ].nunique()
    assert (per_cluster == 1).all() and len(per_cluster) > len(CELL_TYPES)


@pytest.mark.slow
@fresh_process_only
def test_scanpy_ingest_on_real_pbmc(sc: ModuleType, shared_raw: Path) -> None:
    """Ingest one half of scanpy's own reduced PBMC set onto the other; the Louvain labels carry over."""
    path = shared_raw / "scanpy_pbmc68k_reduced.h5ad"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in ../shared/data/raw")
    adata = anndata.read_h5ad(path)
    if "louvain" not in adata.obs:
        pytest.skip("no louvain labels in the PBMC file")
    rng = np.random.default_rng(0)
    is_ref = rng.random(adata.n_obs) < 0.6
    ref = adata[is_ref].copy()
    del ref.obsm["X_umap"]  # the file's UMAP has no parameters in uns; ingest would need them to project
    query = adata[~is_ref].copy()
    truth = query.obs["louvain"].to_numpy().astype(str)
    query.obs = query.obs.drop(columns=["louvain"])
    sc.pp.pca(ref, n_comps=30, random_state=0)
    sc.pp.neighbors(ref, n_neighbors=15, random_state=0)
    sc.tl.ingest(query, ref, obs="louvain", embedding_method="pca")
    predicted = query.obs["louvain"].to_numpy().astype(str)
    assert np.mean(predicted == truth) > 0.8


def test_celltypist_on_real_pbmc(sc: ModuleType, celltypist: ModuleType, shared_raw: Path) -> None:
    """Train on 60% of the Kang 2018 control PBMCs (UMI counts, Seurat labels), annotate the other 40%.

    On scanpy's 1,000 most variable genes, so that training stays a few seconds."""
    path = shared_raw / "kang2018_ifnb_ctrl_stim_2800.h5ad"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in ../shared/data/raw")
    adata = anndata.read_h5ad(path)
    adata = adata[adata.obs["sample"].astype(str) == "CTRL"].copy()
    _normalize(sc, adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=1000)
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    rng = np.random.default_rng(0)
    is_ref = rng.random(adata.n_obs) < 0.6
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    # A gene subset no longer sums to 10,000 per cell, which CellTypist's input check would reject.
    model = celltypist.train(ref, labels="cell_type", n_jobs=1, max_iter=300, check_expression=False)
    assert len(model.cell_types) == adata.obs["cell_type"].nunique()
    result = celltypist.annotate(query, model=model, majority_voting=False)
    predicted = result.predicted_labels["predicted_labels"].to_numpy().astype(str)
    truth = query.obs["cell_type"].to_numpy().astype(str)
    assert np.mean(predicted == truth) > 0.8
