"""Tests of the synthetic atlas (counts level) and the synthetic embeddings (vector level)."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.normalize import to_lognorm
from scatlas.atlas.schema import STANDARD_OBS_COLUMNS
from scatlas.atlas.synthetic import (
    CellType,
    RareType,
    SyntheticAtlasConfig,
    SyntheticEmbeddingConfig,
    dataset_anndata,
    ensembl_id,
    exact_knn,
    generate_chunks,
    generate_embedding_chunks,
    plan_atlas,
    sample_queries,
    synthesize,
    vectors_for_range,
    write_h5ad_datasets,
)
from scatlas.atlas.xkind import detect_x_kind

SMALL = SyntheticAtlasConfig(n_cells=2400, n_genes=150, n_datasets=3, n_donors=3, chunk_size=500, seed=7)


def _concat(chunks: list[ad.AnnData]) -> tuple[pd.DataFrame, sp.csr_matrix]:
    obs = pd.concat(
        [c.obs.astype({k: str for k in c.obs.columns if c.obs[k].dtype == "category"}) for c in chunks]
    )
    return obs, sp.csr_matrix(sp.vstack([c.X for c in chunks]))


# ------------------------------------------------------------ counts level


def test_same_config_same_cells_whatever_the_chunk_size() -> None:
    obs_a, X_a = _concat(list(generate_chunks(SMALL)))
    obs_b, X_b = _concat(
        list(generate_chunks(SyntheticAtlasConfig(**{**SMALL.__dict__, "chunk_size": 1777})))
    )
    pd.testing.assert_frame_equal(obs_a, obs_b)
    assert (X_a != X_b).nnz == 0
    obs_c, X_c = _concat(list(generate_chunks(SyntheticAtlasConfig(**{**SMALL.__dict__, "seed": 8}))))
    assert X_c.shape != X_a.shape or (X_a != X_c).nnz > 0


def test_chunks_belong_to_one_dataset_and_names_are_unique() -> None:
    chunks = list(generate_chunks(SMALL))
    assert all(c.n_obs <= SMALL.chunk_size for c in chunks)
    assert all(c.obs["dataset_id"].nunique() == 1 for c in chunks)
    names = np.concatenate([c.obs_names.to_numpy() for c in chunks])
    assert len(names) == SMALL.n_cells == len(set(names))
    required = (set(STANDARD_OBS_COLUMNS) - {"obs_id"}) | {"truth_is_rare"}  # obs_id is the obs index
    assert required <= set(chunks[0].obs.columns)
    obs, _ = _concat(chunks)
    per_type = obs.groupby("cell_type")["cell_type_ontology_term_id"].nunique()
    assert (per_type == 1).all()
    # the real Cell Ontology ids of the type names
    assert obs["cell_type_ontology_term_id"].str.fullmatch(r"CL:\d{7}").all()
    terms = obs.groupby("cell_type")["cell_type_ontology_term_id"].first()
    assert terms["B cell"] == "CL:0000236" and terms["classical monocyte"] == "CL:0000860"
    assert terms["CD4-positive, alpha-beta T cell"] == "CL:0000624" and terms["ionocyte"] == "CL:0005006"
    assert obs.groupby("cell_type_ontology_term_id")["cell_type"].nunique().max() == 1
    # donors are nested in datasets; donor-level metadata is constant per donor
    assert (obs.groupby("donor_id")["dataset_id"].nunique() == 1).all()
    assert (obs.groupby("donor_id")[["sex", "disease", "development_stage"]].nunique() == 1).all().all()
    assert 0.0 < 1 - obs["is_primary_data"].mean() < 0.05
    # one tissue and assay per dataset; tissue_general is a function of tissue
    assert (obs.groupby("dataset_id")[["tissue", "assay"]].nunique() == 1).all().all()
    assert (obs.groupby("tissue")["tissue_general"].nunique() == 1).all()
    assert set(obs.loc[obs["tissue"] == "lung parenchyma", "tissue_general"]) <= {"lung"}


def test_label_fractions_follow_the_config_and_rare_types_only_where_chosen() -> None:
    config = SyntheticAtlasConfig(
        n_cells=40_000,
        n_genes=60,
        n_datasets=4,
        n_donors=2,
        chunk_size=20_000,
        seed=3,
        n_markers=5,
        n_lineage_markers=5,
        n_rare_markers=8,
        composition_sigma=0.0,
        dataset_size_sigma=0.0,
        cell_types=(CellType("alpha", 3.0, "L"), CellType("beta", 1.0, "L"), CellType("gamma", 1.0)),
        rare_types=(RareType("rare_a", 0.01, datasets=(1, 3)), RareType("rare_b", 0.002)),
        absent_types={"gamma": (2,)},
    )
    plan = plan_atlas(config)
    obs, _ = _concat(list(generate_chunks(config)))
    assert plan.rare_datasets["rare_a"] == (1, 3)
    assert 1 <= len(plan.rare_datasets["rare_b"]) < config.n_datasets
    for ds in plan.datasets:
        cells = obs[obs["dataset_id"] == ds.dataset_id]
        n = len(cells)
        assert n == config.n_cells // config.n_datasets
        counts = cells["cell_type"].value_counts()
        for name in ("rare_a", "rare_b"):
            present = ds.index in plan.rare_datasets[name]
            fraction = {"rare_a": 0.01, "rare_b": 0.002}[name]
            observed = counts.get(name, 0)
            if present:
                assert abs(observed - n * fraction) < 5 * np.sqrt(n * fraction) + 1
            else:
                assert observed == 0
        assert (counts.get("gamma", 0) == 0) == (ds.index == 2)
        # common types share the rest in proportion to their abundances (composition_sigma=0)
        if ds.index != 2:
            assert abs(counts["alpha"] / counts["beta"] - 3.0) < 0.3
        assert (cells["truth_is_rare"] == cells["cell_type"].isin(["rare_a", "rare_b"])).all()


def test_counts_are_sparse_non_negative_integers_with_varying_depth() -> None:
    config = SyntheticAtlasConfig(n_cells=1500, n_genes=2000, n_datasets=2, seed=1)
    X = sp.vstack([c.X for c in generate_chunks(config)]).tocsr()
    assert X.dtype == np.float32
    assert X.data.min() >= 1 and np.all(X.data == np.round(X.data))
    zeros = 1 - X.nnz / (X.shape[0] * X.shape[1])
    assert 0.6 < zeros < 0.97
    depth = np.asarray(X.sum(axis=1)).ravel()
    assert 0.3 * config.median_umis < np.median(depth) < 3 * config.median_umis
    assert depth.std() / depth.mean() > 0.2
    assert detect_x_kind(X[:500]) == "counts"


def _nearest_centroid_accuracy(X: np.ndarray, y: np.ndarray) -> float:
    train = np.arange(len(y)) % 2 == 0
    labels = np.unique(y[train])
    centroids = np.stack([X[train & (y == lab)].mean(axis=0) for lab in labels])
    d2 = ((X[~train, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    return float((labels[d2.argmin(axis=1)] == y[~train]).mean())


def test_cell_types_are_separable_and_datasets_differ() -> None:
    config = SyntheticAtlasConfig(
        n_cells=6000,
        n_genes=600,
        n_datasets=3,
        seed=5,
        batch_sigma=0.4,
        rare_types=(RareType("ionocyte", 0.02, datasets=(0,)),),
    )
    plan = plan_atlas(config)
    chunks = list(generate_chunks(config))
    obs, X = _concat(chunks)
    markers = np.unique(np.concatenate([*plan.markers.values(), *plan.lineage_markers.values()]))
    L = to_lognorm(X, "counts")
    accuracy = _nearest_centroid_accuracy(L[:, markers].toarray(), obs["cell_type"].to_numpy())
    assert accuracy > 0.9
    # batch effects: within one cell type, the per-gene difference between two datasets' mean log expression
    # follows the planned difference of dataset effects
    cell_type = "CD4-positive, alpha-beta T cell"
    means = []
    for ds in plan.datasets[:2]:
        rows = ((obs["dataset_id"] == ds.dataset_id) & (obs["cell_type"] == cell_type)).to_numpy()
        means.append(np.log(np.asarray(X[rows].mean(axis=0)).ravel() + 1e-3))
    expressed = np.asarray(X.mean(axis=0)).ravel() > 1.0
    observed = (means[0] - means[1])[expressed]
    planned = (plan.dataset_effect(0) - plan.dataset_effect(1))[expressed]
    assert np.corrcoef(observed, planned)[0, 1] > 0.7
    assert np.abs(observed).mean() > 0.1


@pytest.mark.parametrize(
    ("layout", "x_kind", "counts_at"),
    [
        ("counts", "counts", "X"),
        ("lognorm+counts", "lognorm", "layers"),
        ("lognorm", "lognorm", None),
        ("lognorm+raw", "lognorm", "raw"),
    ],
)
def test_h5ad_round_trip_normal_and_backed(tmp_path, layout: str, x_kind: str, counts_at: str | None) -> None:
    config = SyntheticAtlasConfig(
        n_cells=900,
        n_genes=120,
        n_datasets=2,
        n_donors=2,
        chunk_size=250,
        seed=11,
        n_markers=5,
        n_lineage_markers=5,
        n_rare_markers=8,
    )
    paths = write_h5ad_datasets(config, tmp_path, layout=layout)  # type: ignore[arg-type]
    assert [p.name for p in paths] == [f"{ds.dataset_id}.h5ad" for ds in plan_atlas(config).datasets]
    assert not list(tmp_path.glob(".*partial"))
    for i, path in enumerate(paths):
        expected = dataset_anndata(config, i)  # counts layout: X = counts
        adata = ad.read_h5ad(path)
        pd.testing.assert_frame_equal(adata.obs, expected.obs)
        pd.testing.assert_frame_equal(adata.var, expected.var)
        assert detect_x_kind(adata.X) == x_kind
        counts = {
            "X": adata.X,
            "layers": adata.layers.get("counts"),
            "raw": adata.raw.X if adata.raw else None,
        }
        if counts_at is None:
            assert adata.raw is None and "counts" not in adata.layers
        else:
            assert (sp.csr_matrix(counts[counts_at]) != expected.X).nnz == 0
        if x_kind == "lognorm":
            assert np.allclose(adata.X.toarray(), to_lognorm(expected.X, "counts").toarray(), atol=1e-6)
        # the in-memory paths hold the same layout as the file
        same = dataset_anndata(config, i, layout=layout)  # type: ignore[arg-type]
        assert np.allclose(same.X.toarray(), adata.X.toarray())
        assert (same.raw is None) == (adata.raw is None) and set(same.layers) == set(adata.layers)
        first = next(generate_chunks(config, datasets=[i], layout=layout))  # type: ignore[arg-type]
        assert np.allclose(first.X.toarray(), adata.X[: first.n_obs].toarray())
        if first.raw is not None:
            assert sp.csr_matrix(first.raw.X - expected.X[: first.n_obs]).nnz == 0
        backed = ad.read_h5ad(path, backed="r")
        try:
            assert backed.shape == expected.shape
            block = sp.csr_matrix(backed.X[100:140])
            assert np.allclose(block.toarray(), sp.csr_matrix(adata.X)[100:140].toarray())
            assert list(backed.obs_names[:3]) == list(expected.obs_names[:3])
        finally:
            backed.file.close()


def test_write_refuses_to_overwrite_and_synthesize_dispatches(tmp_path) -> None:
    config = SyntheticAtlasConfig(
        n_cells=200, n_genes=80, n_datasets=1, n_markers=3, n_lineage_markers=3, n_rare_markers=3
    )
    paths = synthesize(config, tmp_path)
    assert len(paths) == 1 and paths[0].exists()
    with pytest.raises(InputError, match="already exist"):
        synthesize(config, tmp_path)
    assert synthesize(config, tmp_path, overwrite=True) == paths
    with pytest.raises(InputError, match="npy"):
        synthesize(SyntheticEmbeddingConfig(n=10, d=4, n_clusters=2), tmp_path / "v")
    vec_paths = synthesize(
        SyntheticEmbeddingConfig(n=300, d=8, n_clusters=3, chunk_size=70), tmp_path / "v", fmt="npy"
    )
    vectors = np.load(tmp_path / "v" / "vectors.npy")
    assert [p.name for p in vec_paths] == ["ids.npy", "vectors.npy", "labels.npy"]
    assert np.array_equal(
        vectors, vectors_for_range(SyntheticEmbeddingConfig(n=300, d=8, n_clusters=3), 0, 300)[0]
    )


def test_gene_identifiers() -> None:
    ids = [ensembl_id(i) for i in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"ENSG\d{11}", x) for x in ids[:1000])
    var = plan_atlas(SMALL).var
    assert list(var["feature_name"][:3]) == ["GENE1", "GENE2", "GENE3"]
    assert (var.index == var["feature_id"]).all()
    symbols = plan_atlas(SyntheticAtlasConfig(**{**SMALL.__dict__, "gene_ids": "symbol"})).var
    assert list(symbols.index[:2]) == ["GENE1", "GENE2"] and "feature_id" not in symbols.columns


def test_a_type_name_that_is_no_cl_term_has_no_term_id() -> None:
    config = SyntheticAtlasConfig(**{**SMALL.__dict__, "rare_types": (RareType("norn cell", 0.05, datasets=(0,)),)})
    obs = dataset_anndata(config, 0).obs
    norn = obs["cell_type"] == "norn cell"
    assert norn.sum() > 0 and obs.loc[norn, "cell_type_ontology_term_id"].isna().all()
    assert obs.loc[~norn, "cell_type_ontology_term_id"].notna().all()


def test_held_out_type_can_be_generated_for_one_dataset_only() -> None:
    config = SyntheticAtlasConfig(**{**SMALL.__dict__, "absent_types": {"B cell": (0, 1)}})
    atlas_types = {t for c in generate_chunks(config, datasets=[0, 1]) for t in c.obs["cell_type"].unique()}
    query = dataset_anndata(config, 2)
    assert "B cell" not in atlas_types
    assert (query.obs["cell_type"] == "B cell").sum() > 0
    # a dataset's cells do not depend on which other datasets are generated
    full = [
        c for c in generate_chunks(config) if c.obs["dataset_id"].iloc[0] == query.obs["dataset_id"].iloc[0]
    ]
    assert (sp.vstack([c.X for c in full]).tocsr() != query.X).nnz == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"n_cells": 0},
        {"n_cells": 2, "n_datasets": 3},
        {"n_genes": 10},
        {"chunk_size": 0},
        {"seed": -1},
        {"cell_types": ()},
        {"cell_types": (CellType("a", -1.0),)},
        {"rare_types": (RareType("r", 0.7),)},
        {"rare_types": (RareType("r", 0.01, datasets=(5,)),)},
        {"absent_types": {"nope": (0,)}},
        {"cell_types": (CellType("a"), CellType("a"))},
        {"layout": "dense"},
        {"gene_ids": "entrez"},
        {"non_primary_fraction": 1.5},
        {"tissue_general": ("x",)},
        {"marker_lfc": (2.0, 1.0)},
        {"cell_types": (CellType("a"),), "absent_types": {"a": (0, 1, 2)}},
    ],
)
def test_bad_atlas_config_raises_input_error(changes: dict) -> None:
    with pytest.raises(InputError):
        SyntheticAtlasConfig(**{**SMALL.__dict__, **changes})


# ------------------------------------------------------------ vector level

EMB = SyntheticEmbeddingConfig(n=5000, d=32, n_clusters=20, chunk_size=1300, seed=4)


def test_embedding_chunks_are_normalised_and_reproducible_per_range() -> None:
    chunks = list(generate_embedding_chunks(EMB))
    ids = np.concatenate([c[0] for c in chunks])
    vectors = np.concatenate([c[1] for c in chunks])
    labels = np.concatenate([c[2] for c in chunks])
    assert np.array_equal(ids, np.arange(EMB.n))
    assert vectors.dtype == np.float32 and labels.dtype == np.int32 and ids.dtype == np.int64
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again, again_labels = vectors_for_range(EMB, 1234, 3456)
    assert np.array_equal(again, vectors[1234:3456]) and np.array_equal(again_labels, labels[1234:3456])
    other = SyntheticEmbeddingConfig(**{**EMB.__dict__, "chunk_size": 999})
    assert np.array_equal(np.concatenate([c[1] for c in generate_embedding_chunks(other)]), vectors)
    sizes = np.bincount(labels, minlength=EMB.n_clusters)
    assert sizes.max() > 3 * max(1, sizes.min())  # uneven cluster sizes


def test_queries_come_from_the_mixture_and_search_is_not_trivial() -> None:
    base, base_labels = vectors_for_range(EMB, 0, EMB.n)
    queries, query_labels = sample_queries(EMB, 300, seed=1)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    sims = queries @ base.T
    assert sims.max() < 0.9999  # not copies of base vectors
    assert not np.array_equal(queries, sample_queries(EMB, 300, seed=2)[0])
    assert np.array_equal(queries, sample_queries(EMB, 300, seed=1)[0])
    top10 = np.argsort(-sims, axis=1)[:, :10]
    purity = (base_labels[top10] == query_labels[:, None]).mean()
    assert 0.5 < purity < 0.995  # mostly own-cluster neighbours, but overlapping clusters mix


def test_exact_knn_matches_brute_force() -> None:
    config = SyntheticEmbeddingConfig(n=2000, d=16, n_clusters=8, chunk_size=333, seed=2)
    queries, _ = sample_queries(config, 40, seed=3)
    ids, scores = exact_knn(lambda: generate_embedding_chunks(config), queries, k=7, max_block=5000)
    base, _ = vectors_for_range(config, 0, config.n)
    sims = queries @ base.T
    expected = np.argsort(-sims, axis=1)[:, :7]
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)
    few = list(generate_embedding_chunks(SyntheticEmbeddingConfig(n=5, d=16, n_clusters=2)))
    ids_few, scores_few = exact_knn(few, queries[:3], k=8)
    assert (
        (ids_few[:, :5] >= 0).all() and (ids_few[:, 5:] == -1).all() and np.isneginf(scores_few[:, 5:]).all()
    )
    with pytest.raises(InputError):
        exact_knn(few, queries[:, :4], k=3)


@pytest.mark.parametrize(
    "changes",
    [
        {"n": 0},
        {"d": 1},
        {"n_clusters": 0},
        {"close_fraction": 2.0},
        {"anisotropy": -0.1},
        {"chunk_size": 0},
        {"seed": -3},
    ],
)
def test_bad_embedding_config_raises_input_error(changes: dict) -> None:
    with pytest.raises(InputError):
        SyntheticEmbeddingConfig(**{**EMB.__dict__, **changes})
