from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas.atlas.embed.base import EMBEDDER_FILE
from scatlas.atlas.embed.pca import PCAEmbedder
from scatlas.atlas.embed.registry import load_embedder, make_embedder
from scatlas.atlas.errors import GeneOverlapError, InputError, StoreError
from scatlas.atlas.genes import GeneVocabulary, check_overlap, identifier_hint
from scatlas.atlas.normalize import to_lognorm
from tests.helpers_embed import (
    chunk_of,
    chunks_of,
    knn_transfer_accuracy,
    make_counts,
    nearest_centroid_accuracy,
)

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"
KANG = RAW / "kang2018_ifnb_ctrl_stim_2800.h5ad"

N_HVG, N_PC = 100, 10


@pytest.fixture(scope="module")
def data():
    return make_counts(n_cells=360, seed=0)


@pytest.fixture(scope="module")
def fitted(data):
    emb = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC)
    emb.fit(chunks_of(data, size=100))
    return emb


def test_separates_planted_types(fitted, data):
    out = fitted.transform(chunk_of(data.counts, data.genes))
    assert out.shape == (360, N_PC) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert nearest_centroid_accuracy(out, data.labels) > 0.95
    # the marker genes of every type are among the selected genes
    keys = set(fitted.genes.keys)
    for t in range(3):
        markers = {f"ENSG{i + 1:011d}" for i in range(t * 25, (t + 1) * 25)}
        assert len(markers & keys) >= 20


def _divisor(scale, stds):
    return {"zscore": stds, "floor": np.maximum(stds, np.median(stds)), "none": np.ones_like(stds)}[scale]


@pytest.mark.parametrize("scale", ["floor", "zscore", "none"])
def test_matches_dense_reference(fitted, data, scale):
    """The streamed fit equals a dense PCA of the scaled, clipped selected genes."""
    if scale != fitted.config.scale:
        fitted = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC, scale=scale)
        fitted.fit(chunks_of(data, size=100))
    model = fitted.model
    cols = data.genes.locate_vocabulary(model.genes)
    L = to_lognorm(data.counts, "counts")[:, cols].toarray().astype(np.float64)
    assert np.allclose(L.mean(axis=0), model.means, atol=1e-8)
    assert np.allclose(L.std(axis=0, ddof=1), model.stds, atol=1e-8)
    Z = np.clip((L - model.means) / _divisor(scale, model.stds), -10, 10)
    Zc = Z - Z.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(Zc, rowvar=False))
    ref = evecs[:, ::-1][:, :N_PC].T
    signs = np.sign(ref[np.arange(N_PC), np.abs(ref).argmax(axis=1)])
    ref = ref * signs[:, None]
    assert np.allclose(model.components, ref, atol=1e-5)
    assert np.allclose(model.explained_variance, evals[::-1][:N_PC], rtol=1e-6)
    out = fitted.transform(chunk_of(data.counts, data.genes))
    assert np.allclose(out, Zc @ ref.T, atol=1e-4)
    # deterministic signs: the largest |loading| of each component is positive
    comps = model.components
    assert (comps[np.arange(N_PC), np.abs(comps).argmax(axis=1)] > 0).all()


def test_zero_variance_genes_never_selected(data):
    emb = PCAEmbedder(n_hvg=1000, n_components=5)  # more than the genes that vary: all varying genes are used
    emb.fit(chunks_of(data))
    zero = {f"ENSG{i + 1:011d}" for i in range(290, 300)}
    assert not zero & set(emb.genes.keys)
    varying = to_lognorm(data.counts, "counts").toarray().var(axis=0) > 0
    assert set(emb.genes.keys) == set(data.genes.keys[varying])


def test_row_independent_and_chunking_invariant(fitted, data):
    full = fitted.transform(chunk_of(data.counts, data.genes))
    for i in (0, 17, 359):
        alone = fitted.transform(chunk_of(data.counts[i : i + 1], data.genes))
        np.testing.assert_allclose(alone[0], full[i], atol=1e-5)
    parts = np.vstack([fitted.transform(c) for c in chunks_of(data, size=7)])
    np.testing.assert_allclose(parts, full, atol=1e-5)
    # a cell's vector does not change when its chunk mates change
    mates = fitted.transform(chunk_of(data.counts[[5, 200, 3]], data.genes))
    np.testing.assert_allclose(mates[0], full[5], atol=1e-5)


def test_expressed_reads_only_the_embedders_genes(fitted, data):
    X = sp.csr_matrix(data.counts[:6], dtype=np.float32).toarray()
    read = np.zeros(X.shape[1], dtype=bool)
    read[fitted.gene_match(data.genes).source_cols] = True
    X[0] = 0.0  # no counts at all
    X[1, read] = 0.0  # counts only on genes the embedder does not read
    X[1, ~read] = 3.0
    X[2, :] = 0.0
    X[2, np.flatnonzero(read)[0]] = 1.0  # one count on one of its genes
    X[3, read] = -0.0  # signed zeros are not expression
    X[3, ~read] = 0.0
    chunk = chunk_of(sp.csr_matrix(X), data.genes)
    np.testing.assert_array_equal(fitted.expressed(chunk), [False, False, True, False, True, True])
    assert chunk.X.nnz == sp.csr_matrix(X).nnz  # the chunk is not modified


def test_transform_from_gene_features_matches_transform(fitted, data):
    chunk = chunk_of(data.counts[:50], data.genes)
    G = fitted.gene_features(chunk)
    every = np.ones(G.shape[1], dtype=bool)
    np.testing.assert_allclose(fitted.transform_gene_features(G, every), fitted.transform(chunk), atol=1e-4)
    # a query without some of the embedder's genes: the same vectors as its own chunk gives
    names = fitted.gene_feature_names
    rng = np.random.default_rng(1)
    drop = set(rng.choice(names, size=len(names) // 3, replace=False))
    keep_cols = np.array([k not in drop for k in data.genes.keys])
    sub_genes = GeneVocabulary(
        keys=data.genes.keys[keep_cols], feature_id=data.genes.feature_id[keep_cols],
        feature_name=data.genes.feature_name[keep_cols],
    )
    partial = chunk_of(sp.csr_matrix(data.counts[:50])[:, np.flatnonzero(keep_cols)], sub_genes)
    present = np.array([k not in drop for k in names])
    Gp = fitted.gene_features(partial)  # normalised over the genes the partial query has
    np.testing.assert_allclose(fitted.transform_gene_features(Gp, present), fitted.transform(partial), atol=1e-4)
    # the genes it lacks play no part
    Gp[:, ~present] = 123.0
    np.testing.assert_allclose(fitted.transform_gene_features(Gp, present), fitted.transform(partial), atol=1e-4)
    with pytest.raises(InputError, match="present must mark"):
        fitted.transform_gene_features(G, present[:-1])


def test_counts_and_lognorm_give_the_same_vectors(fitted, data):
    a = fitted.transform(chunk_of(data.counts, data.genes, "counts"))
    b = fitted.transform(chunk_of(to_lognorm(data.counts, "counts"), data.genes, "lognorm"))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_fit_on_counts_or_lognorm_is_the_same(fitted, data):
    other = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC)
    other.fit(chunks_of(data, size=100, kind="lognorm"))
    assert other.fingerprint() == fitted.fingerprint()


def test_permuted_genes_and_symbols(fitted, data):
    ref = fitted.transform(chunk_of(data.counts, data.genes))
    perm = np.random.default_rng(1).permutation(len(data.genes))
    genes_p = GeneVocabulary(
        keys=data.genes.keys[perm], feature_id=data.genes.feature_id[perm], feature_name=data.genes.feature_name[perm]
    )
    out = fitted.transform(chunk_of(data.counts[:, perm], genes_p))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    by_symbol = GeneVocabulary.from_identifiers([s.lower() for s in data.genes.feature_name])
    out = fitted.transform(chunk_of(data.counts, by_symbol))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert fitted.gene_match(by_symbol).n_matched == N_HVG


def test_partial_gene_overlap(fitted, data):
    hvg_cols = data.genes.locate_vocabulary(fitted.genes)
    drop = hvg_cols[:: 5]  # 20 of the 100 selected genes
    keep = np.setdiff1d(np.arange(len(data.genes)), drop)
    genes_q = GeneVocabulary(
        keys=data.genes.keys[keep], feature_id=data.genes.feature_id[keep], feature_name=data.genes.feature_name[keep]
    )
    match = fitted.gene_match(genes_q)
    assert match.n_matched == N_HVG - len(drop)
    assert match.fraction_of_target == pytest.approx(0.8)
    check_overlap(match)  # accepted (warns below 80%)
    out = fitted.transform(chunk_of(data.counts[:, keep], genes_q))
    # reference: standardise with the query's own library sizes, the missing genes contribute zero
    model = fitted.model
    L = to_lognorm(data.counts[:, keep], "counts")
    full = np.zeros((L.shape[0], N_HVG))
    pos = genes_q.locate_vocabulary(model.genes)
    present = pos >= 0
    full[:, present] = L[:, pos[present]].toarray()
    Z = np.clip((full - model.means) / _divisor(fitted.config.scale, model.stds), -10, 10) - model.center
    Z[:, ~present] = 0
    np.testing.assert_allclose(out, Z @ model.components.T.astype(np.float64), atol=1e-4)
    assert nearest_centroid_accuracy(out, data.labels) > 0.95
    few = GeneVocabulary.from_identifiers(list(data.genes.keys[hvg_cols[:10]]))
    with pytest.raises(GeneOverlapError):
        check_overlap(fitted.gene_match(few))


def test_save_load_round_trip(fitted, data, tmp_path):
    fitted.save(tmp_path / "emb")
    meta = json.loads((tmp_path / "emb" / EMBEDDER_FILE).read_text())
    assert meta["name"] == "pca" and meta["dim"] == N_PC
    loaded = load_embedder(tmp_path / "emb")
    assert isinstance(loaded, PCAEmbedder)
    assert loaded.fingerprint() == fitted.fingerprint()
    chunk = chunk_of(data.counts, data.genes)
    np.testing.assert_array_equal(loaded.transform(chunk), fitted.transform(chunk))
    # a modified artefact is detected
    npz = dict(np.load(tmp_path / "emb" / "pca.npz"))
    npz["means"] = npz["means"] + 1e-3
    np.savez(tmp_path / "emb" / "pca.npz", **npz)
    with pytest.raises(StoreError):
        load_embedder(tmp_path / "emb")


def test_default_scale_is_zscore_and_bad_scale_is_refused():
    assert PCAEmbedder().config.scale == "zscore"
    with pytest.raises(InputError):
        PCAEmbedder(scale="unit")  # type: ignore[arg-type]


def test_scale_modes_differ_in_fingerprint_and_round_trip(data, tmp_path):
    chunks = chunks_of(data, size=100)
    chunk = chunk_of(data.counts, data.genes)
    fingerprints = set()
    for scale in ("floor", "zscore", "none"):
        emb = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC, scale=scale)
        unfitted = emb.fingerprint()
        emb.fit(chunks)
        fingerprints |= {unfitted, emb.fingerprint()}
        assert nearest_centroid_accuracy(emb.transform(chunk), data.labels) > 0.95
        emb.save(tmp_path / scale)
        meta = json.loads((tmp_path / scale / EMBEDDER_FILE).read_text())
        assert meta["params"]["scale"] == scale
        loaded = load_embedder(tmp_path / scale)
        assert loaded.config.scale == scale and loaded.fingerprint() == emb.fingerprint()
        np.testing.assert_array_equal(loaded.transform(chunk), emb.transform(chunk))
    assert len(fingerprints) == 6  # params (unfitted) and params + artefact (fitted) differ for every mode


def test_embedder_saved_before_the_scale_option_loads_as_zscore(data, tmp_path):
    """An ``embedder.json`` without ``scale`` (older builds) means unit-variance scaling, and its recorded
    fingerprint (computed without the key) still matches: indexes built before keep working unchanged."""
    emb = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC, scale="zscore")
    emb.fit(chunks_of(data, size=100))
    emb.save(tmp_path / "old")
    meta_path = tmp_path / "old" / EMBEDDER_FILE
    meta = json.loads(meta_path.read_text())
    del meta["params"]["scale"], meta["params"]["gene_coverage"]  # neither option existed then
    # the fingerprint an older version wrote: sha256 of name + params (no scale) + artefact digest
    import hashlib

    payload = json.dumps({"name": "pca", "params": meta["params"]}, sort_keys=True, default=str)
    meta["fingerprint"] = hashlib.sha256((payload + emb.artefact_digest()).encode()).hexdigest()[:16]
    meta_path.write_text(json.dumps(meta))
    assert meta["fingerprint"] == emb.fingerprint()
    loaded = load_embedder(tmp_path / "old")
    assert loaded.config.scale == "zscore"
    chunk = chunk_of(data.counts, data.genes)
    np.testing.assert_array_equal(loaded.transform(chunk), emb.transform(chunk))
    floor = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC, scale="floor")
    floor.fit(chunks_of(data, size=100))
    assert not np.allclose(floor.transform(chunk), emb.transform(chunk), atol=1e-3)


def test_fingerprint_tracks_params_and_fit(data):
    chunks = chunks_of(data)
    a = make_embedder("pca", n_hvg=N_HVG, n_components=N_PC)
    b = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC, max_value=5.0)
    assert a.fingerprint() != b.fingerprint()
    a.fit(chunks)
    b.fit(chunks)
    assert a.fingerprint() != b.fingerprint()
    c = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC)
    c.fit(lambda: iter(chunks))  # a callable returning a fresh iterator is accepted
    assert c.fingerprint() == a.fingerprint()
    d = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC)
    d.fit(chunks[:2])
    assert d.fingerprint() != a.fingerprint()


def test_bad_samples(data):
    emb = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC)
    with pytest.raises(InputError, match="empty"):
        emb.fit([])
    with pytest.raises(InputError, match="empty"):
        emb.fit([chunk_of(sp.csr_matrix((0, 300), dtype=np.float32), data.genes)])
    with pytest.raises(InputError, match="fewer"):
        emb.fit([chunk_of(data.counts[:5], data.genes)])
    with pytest.raises(InputError, match="one-shot"):
        emb.fit(c for c in chunks_of(data))
    with pytest.raises(InputError, match="not fitted"):
        emb.transform(chunk_of(data.counts[:3], data.genes))
    with pytest.raises(InputError):
        PCAEmbedder(n_hvg=10, n_components=20)
    no_x = chunk_of(data.counts[:3], data.genes)
    with pytest.raises(InputError, match="X is None"):
        emb.fit([type(no_x)(ids=no_x.ids, X=None, x_kind="counts", genes=data.genes)])
    scaled = chunk_of(sp.csr_matrix(-np.ones((3, 300), dtype=np.float32)), data.genes, "scaled")
    with pytest.raises(InputError, match="scaled"):
        emb.fit([scaled])


def test_several_datasets_and_gene_spaces(caplog):
    """Datasets with different gene lists are pooled; each dataset's variable genes are selected."""
    a = make_counts(n_cells=300, seed=1)
    b = make_counts(n_cells=60, seed=2)
    # dataset b measures only genes 50..299, named by symbol; its planted markers become genes 100..174
    cols = np.arange(50, 300)
    source = np.empty(250, dtype=np.int64)
    rest = np.r_[0:50, 125:250]
    source[50:125] = np.arange(75)  # b's markers (its genes 0..74) -> genes 100..174
    source[rest] = np.arange(75, 250)
    b_counts = b.counts[:, source]
    b_genes = GeneVocabulary.from_identifiers(list(b.genes.feature_name[cols]))
    chunks = [chunk_of(a.counts[:150], a.genes, dataset_id="A"), chunk_of(a.counts[150:], a.genes, dataset_id="A"),
              chunk_of(b_counts, b_genes, dataset_id="B")]
    emb = PCAEmbedder(n_hvg=150, n_components=8, gene_coverage=0)  # every gene a candidate
    emb.fit(chunks)
    keys = set(emb.genes.feature_name)
    a_markers = {f"GENE{i + 1}" for i in range(75)}
    b_markers = {f"GENE{i + 1}" for i in range(100, 175)}
    # each dataset's markers rank top there; B does not measure 50 of A's, which it ranks last: most of B's markers
    # and A's that B measures are selected, a few of the others (30 and 52 of 75 when written)
    assert len(a_markers & keys) >= 25
    assert len(b_markers & keys) >= 45
    out_a = emb.transform(chunk_of(a.counts, a.genes))
    assert nearest_centroid_accuracy(out_a, a.labels) > 0.95
    out_b = emb.transform(chunk_of(b_counts, b_genes))
    assert nearest_centroid_accuracy(out_b, b.labels) > 0.95
    # with gene_coverage=1 only genes both datasets measure (50..299) are candidates: A's markers of two types are
    # among the genes left out, which the fit says
    shared = PCAEmbedder(n_hvg=150, n_components=8, gene_coverage=1.0)
    with caplog.at_level("INFO"):
        shared.fit(chunks)
    assert set(shared.genes.feature_name) <= {f"GENE{i + 1}" for i in range(50, 300)}
    assert nearest_centroid_accuracy(shared.transform(chunk_of(b_counts, b_genes)), b.labels) > 0.95
    assert any("too few datasets measure" in r.getMessage() for r in caplog.records)


def _panel_and_full_datasets(store_space: bool = False):
    """Two datasets of the same cell types: A measures every gene and 140 of them also carry a strong program of
    A's own (a per-cell factor); B was measured on a panel without those 140 genes. ``store_space``: B's chunk in
    A's gene space, the genes it lacks as columns of zeros, as an atlas store holds it (``measured`` marks its own)."""
    d = make_counts(n_cells=600, n_datasets=2, seed=1)
    X = d.counts.toarray()
    rng = np.random.default_rng(5)
    a = d.dataset == "d0"
    program = np.arange(150, 290)
    X[np.ix_(a, program)] = rng.poisson(X[np.ix_(a, program)] * rng.lognormal(0, 1.5, (int(a.sum()), 1)))
    panel = np.setdiff1d(np.arange(300), program)
    b_genes = GeneVocabulary(keys=d.genes.keys[panel], feature_id=d.genes.feature_id[panel],
                             feature_name=d.genes.feature_name[panel])
    if store_space:
        Xb = X[~a].copy()
        Xb[:, program] = 0
        measured = np.isin(np.arange(300), panel)
        b_chunk = chunk_of(sp.csr_matrix(Xb), d.genes, dataset_id="B")
        b_chunk = type(b_chunk)(**{**b_chunk.__dict__, "measured": measured})
    else:
        b_chunk = chunk_of(sp.csr_matrix(X[~a][:, panel]), b_genes, dataset_id="B")
    chunks = [chunk_of(sp.csr_matrix(X[a]), d.genes, dataset_id="A"), b_chunk]
    return chunks, d.labels[a], d.labels[~a], b_genes


def _own_dataset_share(va: np.ndarray, vb: np.ndarray, k: int = 15) -> float:
    """Of B's cells' k nearest cells (cosine, A and B pooled), the share from B itself."""
    v = np.vstack([va, vb])
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argsort(-sims, axis=1)[len(va):, :k]
    return float((nn >= len(va)).mean())


def _fit_and_share(chunks, **params) -> tuple[PCAEmbedder, float]:
    emb = PCAEmbedder(n_hvg=100, n_components=10, **params)
    emb.fit(chunks)
    return emb, _own_dataset_share(emb.transform(chunks[0]), emb.transform(chunks[1]))


def test_a_dataset_measured_on_a_smaller_panel_embeds_among_the_others():
    """The genes a dataset lacks are imputed for its cells (not read as zero expression), a dataset ranks the genes
    it lacks last, so B's cells mix with A's (a share of 0.5 is full mixing); read as zeros they embed apart."""
    chunks, la, lb, b_genes = _panel_and_full_datasets()
    emb, mixed = _fit_and_share(chunks)
    assert mixed < 0.7  # 0.58 when written
    assert knn_transfer_accuracy(emb.transform(chunks[0]), la, emb.transform(chunks[1]), lb) > 0.95
    # the same cells as an atlas store holds them: in the store's gene space, the genes B lacks as zeros
    store_chunks, _, _, _ = _panel_and_full_datasets(store_space=True)
    _, from_store = _fit_and_share(store_chunks)
    assert abs(from_store - mixed) < 0.05
    unmarked = [store_chunks[0], type(store_chunks[1])(**{**store_chunks[1].__dict__, "measured": None})]
    _, zeros = _fit_and_share(unmarked)  # a store that did not record what B measured: its zeros are data
    assert zeros > mixed + 0.2  # 0.85 against 0.58 when written
    # gene_coverage=1: only the genes both measure
    shared, _ = _fit_and_share(chunks, gene_coverage=1.0)
    assert set(shared.genes.keys) <= set(b_genes.keys)


def test_fewer_shared_genes_than_asked_are_all_used_and_said(caplog):
    chunks, _, _, b_genes = _panel_and_full_datasets()
    emb = PCAEmbedder(n_hvg=250, n_components=10, gene_coverage=1.0)
    with caplog.at_level("WARNING"):
        emb.fit(chunks)
    assert set(emb.genes.keys) <= set(b_genes.keys) and len(emb.genes.keys) > 140
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "measure" in text and "gene_coverage" in text and "GENE" not in text  # no gene names echoed
    with pytest.raises(InputError, match="that enough of them share.*gene_coverage"):
        PCAEmbedder(n_hvg=250, n_components=200, gene_coverage=1.0).fit(chunks)
    PCAEmbedder(n_hvg=250, n_components=200, gene_coverage=0.5).fit(chunks)  # half of two datasets: every gene
    for bad in (-0.1, 1.5, "x", float("nan")):
        with pytest.raises(InputError, match="gene_coverage"):
            PCAEmbedder(gene_coverage=bad)


def test_embedder_saved_before_the_gene_coverage_option_keeps_its_fingerprint(data, tmp_path):
    """An ``embedder.json`` without ``gene_coverage`` loads with every gene a candidate (what it did, and the
    default), and its fingerprint is unchanged; another coverage is part of the fingerprint."""
    emb = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC)
    emb.fit(chunks_of(data, size=100))
    emb.save(tmp_path / "old")
    meta_path = tmp_path / "old" / EMBEDDER_FILE
    meta = json.loads(meta_path.read_text())
    del meta["params"]["gene_coverage"]
    meta_path.write_text(json.dumps(meta))
    loaded = load_embedder(tmp_path / "old")
    assert loaded.config.gene_coverage == 0.0 and loaded.fingerprint() == meta["fingerprint"]
    strict = PCAEmbedder(n_hvg=N_HVG, n_components=N_PC, gene_coverage=1.0)
    strict.fit(chunks_of(data, size=100))  # one dataset: the same genes, another fingerprint
    assert list(strict.genes.keys) == list(emb.genes.keys) and strict.fingerprint() != emb.fingerprint()


@pytest.mark.slow
@pytest.mark.skipif(not KANG.is_file(), reason=f"{KANG} absent")
def test_kang_ctrl_to_stim_label_transfer():
    import anndata as ad

    adata = ad.read_h5ad(KANG)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    genes = GeneVocabulary.from_identifiers(list(adata.var_names))
    ctrl = np.flatnonzero((adata.obs["sample"] == "CTRL").to_numpy())
    stim = np.flatnonzero((adata.obs["sample"] == "STIM").to_numpy())
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    sample = [chunk_of(X[ctrl[s : s + 500]], genes, dataset_id="ctrl") for s in range(0, len(ctrl), 500)]
    emb = PCAEmbedder()
    emb.fit(sample)
    ref = np.vstack([emb.transform(c) for c in sample])
    query = emb.transform(chunk_of(X[stim], genes, dataset_id="stim"))
    acc = knn_transfer_accuracy(ref, labels[ctrl], query, labels[stim], k=15)
    print(f"kang2018 CTRL -> STIM kNN(k=15) label transfer accuracy: {acc:.3f}")
    assert acc > 0.7


def test_a_refusal_says_when_query_and_index_name_genes_differently():
    ensembl = GeneVocabulary.from_identifiers([f"ENSMUSG{i:011d}" for i in range(50)])
    symbols = [f"Gene{i}" for i in range(40)]
    hint = identifier_hint(ensembl, symbols)
    assert "Ensembl id only" in hint and "feature_name" in hint
    back = identifier_hint(GeneVocabulary.from_identifiers(symbols), [f"ENSG{i:011d}" for i in range(50)])
    assert "by symbol only" in back and "feature_id" in back
    assert identifier_hint(GeneVocabulary.from_identifiers(symbols), symbols) == ""
    from scatlas.atlas.genes import match_genes

    with pytest.raises(GeneOverlapError, match="Ensembl id only"):
        check_overlap(match_genes(ensembl, GeneVocabulary.from_identifiers(symbols)), hint=hint)
