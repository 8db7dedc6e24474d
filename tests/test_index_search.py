"""Index search API: SQL filters inside FAISS, metadata lookups, shard sweeps, embedder, argument checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import scatlas.index.atlas_index as atlas_index_module
from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.precomputed import PrecomputedEmbedder
from scatlas.atlas.errors import EmbedderMismatchError, InputError
from scatlas.atlas.genes import GeneVocabulary
from scatlas.index import AtlasIndex, build_from_source
from scatlas.index.evaluate import recall_at_k
from tests.test_index_helpers import array_source, assert_exact, brute_force, clustered, config, metadata

N, D = 6000, 32


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    src = array_source(N, D, seed=4, start_id=10)
    out = tmp_path_factory.mktemp("flat") / "idx"
    build_from_source(src, out, config(shard_size=2500), cells=metadata(src._ids, seed=1))
    return out, src


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
    src = array_source(12_000, D, seed=7)
    out = tmp_path_factory.mktemp("ivf") / "idx"
    build_from_source(src, out, config(factory="IVF64,PQ4", shard_size=5000), cells=metadata(src._ids, seed=2))
    return out, src


def subset_of(src, table, predicate_mask):
    keep = predicate_mask(table)
    return src._x[keep], src._ids[keep]


def test_where_filter_equals_brute_force_on_the_subset(flat):
    out, src = flat
    idx = AtlasIndex.open(out)
    table = metadata(src._ids, seed=1).to_pandas()
    keep = ((table.tissue == "lung") & (table.disease == "normal")).to_numpy()
    q = clustered(100, D, seed=12)
    res = idx.search(q, k=20, where="tissue = 'lung' AND disease = 'normal'")
    assert np.isin(res.ids, src._ids[keep]).all()
    assert_exact(res.ids, res.scores, src._x[keep], src._ids[keep], q)
    unfiltered = idx.search(q, k=20)
    assert not np.isin(unfiltered.ids, src._ids[keep]).all()  # the filter did something


def test_where_filter_on_ivf_runs_inside_faiss(ivf, monkeypatch):
    out, src = ivf
    idx = AtlasIndex.open(out)
    table = metadata(src._ids, seed=2).to_pandas()
    keep = (table.tissue != "gut").to_numpy()
    q = clustered(200, D, seed=13)
    truth, _ = brute_force(src._x[keep], src._ids[keep], q, 30)
    # large subsets go through FAISS with an IDSelector (force it for this small index)
    monkeypatch.setattr(atlas_index_module, "EXACT_FILTER_MAX", 0)
    res = idx.search(q, k=30, where="tissue <> 'gut'")
    assert np.isin(res.ids, src._ids[keep]).all()
    assert recall_at_k(res.ids, truth) >= 0.95
    # small subsets are searched exactly over their stored vectors
    monkeypatch.setattr(atlas_index_module, "EXACT_FILTER_MAX", 20_000)
    res = idx.search(q, k=30, where="tissue = 'liver' AND n_genes < 1000")
    small = ((table.tissue == "liver") & (table.n_genes < 1000)).to_numpy()
    assert_exact(res.ids, res.scores, src._x[small], src._ids[small], q, rounded=False)  # the residuals settle ties


def test_bad_or_empty_filters_are_input_errors(flat):
    idx = AtlasIndex.open(flat[0])
    q = clustered(3, D, seed=1)
    with pytest.raises(InputError, match=r"invalid where filter 'tisue = 1'.*Columns of the cells table: .*tissue"):
        idx.search(q, where="tisue = 1")
    with pytest.raises(InputError, match="invalid where filter"):
        idx.search(q, where="tissue = = 'lung'")
    with pytest.raises(InputError, match="matches no cell"):
        idx.search(q, where="tissue = 'brain'")
    with pytest.raises(InputError, match="one SQL predicate"):
        idx.search(q, where="1=1; DROP TABLE cells")


def test_cells_preserve_order_and_pad_missing(flat):
    out, src = flat
    idx = AtlasIndex.open(out)
    ids = np.array([[src._ids[5], -1], [src._ids[0], src._ids[5]]])
    df = idx.cells(ids, columns=["tissue"])
    assert list(df.columns) == ["soma_joinid", "tissue"] and len(df) == 4
    assert df.soma_joinid.tolist() == ids.ravel().tolist()
    assert df.tissue.iloc[0] == df.tissue.iloc[3] and df.tissue.isna().tolist() == [False, True, False, False]
    table = metadata(src._ids, seed=1).to_pandas().set_index("soma_joinid")
    assert df.tissue.iloc[2] == table.tissue.loc[src._ids[0]]
    assert set(idx.cells(ids[:1]).columns) == {"soma_joinid", "tissue", "disease", "n_genes"}
    with pytest.raises(InputError, match="unknown cell columns"):
        idx.cells(ids, columns=["nope"])
    assert idx.connect().execute("SELECT count(*) FROM cells").fetchone()[0] == N


def test_iter_shards_yields_every_stored_vector(flat):
    out, src = flat
    idx = AtlasIndex.open(out)
    parts = list(idx.iter_shards())
    assert [p[0] for p in parts] == [0, 1, 2]
    ids = np.concatenate([p[1] for p in parts])
    vecs = np.concatenate([p[2] for p in parts])
    assert np.array_equal(ids, src._ids) and vecs.dtype == np.float16 and vecs.shape == (N, D)
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(vecs, src._x / np.linalg.norm(src._x, axis=1, keepdims=True), atol=1e-3)


def test_stored_vectors_sampled_ids_and_build_id_of_an_opened_index(flat):
    out, src = flat
    idx = AtlasIndex.open(out)
    stored = np.concatenate([np.asarray(v, dtype=np.float32) for _, _, v in idx.iter_shards()])
    rows = np.array([5999, 0, 2600, 1])  # any order, across shards
    np.testing.assert_array_equal(idx.vectors(src._ids[rows]), stored[rows])
    with pytest.raises(InputError, match="not in the index"):
        idx.vectors(np.array([10, 3]))  # 3 is below every id
    sample = idx.sample_ids(50, exclude=src._ids[:3000], seed=1)
    assert len(sample) == 50 and (np.diff(sample) > 0).all() and (sample >= src._ids[3000]).all()
    assert np.array_equal(sample, idx.sample_ids(50, exclude=src._ids[:3000], seed=1))
    assert len(idx.sample_ids(10**6)) == N
    assert idx.build_id == AtlasIndex.open(out).build_id and len(idx.build_id) == 16


def test_search_arguments_are_checked_and_results_padded(tmp_path):
    build_from_source(array_source(50, 8), tmp_path / "tiny", config(eval_queries=10, calibration_cells=20))
    idx = AtlasIndex.open(tmp_path / "tiny", threads=1)
    import faiss

    assert faiss.omp_get_max_threads() == 1
    res = idx.search(clustered(4, 8, seed=3), k=80)
    assert (res.ids[:, 50:] == -1).all() and np.isneginf(res.scores[:, 50:]).all()
    assert (res.ids[:, :50] >= 0).all()
    with pytest.raises(InputError, match="8-d vectors"):
        idx.search(np.ones((2, 9), dtype=np.float32))
    with pytest.raises(InputError, match="k must be"):
        idx.search(np.ones((2, 8), dtype=np.float32), k=0)
    with pytest.raises(InputError, match="NaN"):
        idx.search(np.full((1, 8), np.nan, dtype=np.float32))
    one = idx.search(np.ones(8, dtype=np.float32), k=3)  # a single vector is one query
    assert one.ids.shape == (1, 3)


def test_embed_uses_the_index_embedder_and_checks_its_fingerprint(tmp_path):
    src = array_source(1000, 16)
    emb = PrecomputedEmbedder(key="X_emb", dim=16)
    m = build_from_source(src, tmp_path / "idx", config(), embedder=emb)
    assert m.embedder.name == "precomputed" and m.embedder.fingerprint == emb.fingerprint()
    idx = AtlasIndex.open(tmp_path / "idx")
    x = clustered(5, 16, seed=2) * 3.0
    chunk = CellChunk(ids=np.arange(5), X=None, x_kind="lognorm", genes=GeneVocabulary.from_identifiers([]),
                      obsm={"X_emb": x})
    vec = idx.embed(chunk)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-6)
    assert idx.search(vec, k=1).ids.shape == (5, 1)
    manifest = tmp_path / "idx" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["embedder"]["fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(raw))
    with pytest.raises(EmbedderMismatchError, match="fingerprint"):
        _ = AtlasIndex.open(tmp_path / "idx").embedder
    build_from_source(src, tmp_path / "raw", config())
    with pytest.raises(InputError, match="without an embedder"):
        _ = AtlasIndex.open(tmp_path / "raw").embedder
