"""build_index over an atlas store: embedder fitted and saved, ids = soma_joinid, metadata copied, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas.atlas import AtlasStore, ingest
from scatlas.atlas.errors import InputError
from scatlas.index import AtlasIndex, build_index, index_info


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    from tests.conftest import make_adata

    root = tmp_path_factory.mktemp("atlas")
    paths = []
    for name, seed, n in (("ds_a", 1, 300), ("ds_b", 2, 200)):
        path = root / f"{name}.h5ad"
        make_adata(n_cells=n, n_genes=60, seed=seed).write_h5ad(path)
        paths.append(path)
    ingest(paths, root / "atlas", progress=False)
    return root / "atlas"


def test_build_index_from_store_and_search_own_cells(atlas, tmp_path, monkeypatch):
    opts = {"n_hvg": 40, "n_components": 8}
    m = build_index(atlas, tmp_path / "idx", embedder="pca", embedder_options=opts, fit_sample=300,
                    shard_size=180, chunk_size=70)
    store = AtlasStore.open(atlas)
    assert m.n_cells == 500 and m.dim == 8 and [s.n for s in m.shards] == [180, 180, 140]
    assert m.embedder.name == "pca" and m.gene_vocabulary_hash == store.genes.fingerprint()
    assert m.atlas_snapshot["n_cells"] == 500
    idx = AtlasIndex.open(tmp_path / "idx")
    assert idx.embedder.fingerprint() == m.embedder.fingerprint
    vecs = np.concatenate([idx.embed(c) for c in store.read_cells(np.array([3, 250, 499]))])
    res = idx.search(vecs, k=5)
    assert res.ids[:, 0].tolist() == [3, 250, 499]  # each cell finds itself first
    np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=2e-3)
    df = idx.cells(res.ids[:, 0], columns=["dataset_id", "cell_type"])
    assert df.dataset_id.tolist() == ["ds_a", "ds_a", "ds_b"]
    truth = store.obs([3, 250, 499], ["cell_type"]).cell_type.astype(str).tolist()
    assert df.cell_type.astype(str).tolist() == truth
    sub = idx.search(vecs, k=5, where="dataset_id = 'ds_b'")
    assert (sub.ids >= 300).all()
    info = index_info(tmp_path / "idx")
    assert info["cells"] == 500 and info["embedder"] == "pca" and info["bytes_per_cell"] > 0
    assert info["datasets"] == [{"dataset_id": "ds_a", "cells": 300}, {"dataset_id": "ds_b", "cells": 200}]
    assert info["label_columns"].get("cell_type", 0) >= 2
    assert info["total_seconds"] >= info["build_seconds"]
    # a rerun with the same arguments is a no-op; other embedder arguments are refused
    again = build_index(atlas, tmp_path / "idx", embedder="pca", embedder_options=opts, fit_sample=300,
                        shard_size=180, chunk_size=70)
    assert again == m
    with pytest.raises(InputError, match="other arguments"):
        build_index(atlas, tmp_path / "idx", embedder="pca", embedder_options={"n_hvg": 30, "n_components": 8},
                    fit_sample=300, shard_size=180)
    # refused before the embedder is fitted again (minutes on a large atlas), naming what differs
    import scatlas.index.store_source as store_source

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the embedder was fitted before the arguments were checked")

    monkeypatch.setattr(store_source, "_fit_embedder", no_fit)
    with pytest.raises(InputError, match=r"the embedder's fit sample was 300 and is 400 now"):
        build_index(atlas, tmp_path / "idx", embedder="pca", embedder_options=opts, fit_sample=400,
                    shard_size=180, chunk_size=70)


def test_interrupted_store_build_resumes_with_the_saved_embedder(atlas, tmp_path):
    import shutil

    kw = {"embedder": "pca", "embedder_options": {"n_hvg": 40, "n_components": 8}, "fit_sample": 300,
          "shard_size": 200}
    first = build_index(atlas, tmp_path / "idx", **kw)
    (tmp_path / "idx" / "manifest.json").unlink()  # as if the build died after shard 0
    shutil.rmtree(tmp_path / "idx" / "shards" / "0001")
    shutil.rmtree(tmp_path / "idx" / "shards" / "0002")
    resumed = build_index(atlas, tmp_path / "idx", **kw)
    assert resumed.build["shards_reused"] == 1
    assert resumed.shards == first.shards and resumed.embedder == first.embedder
