"""Ingest into the atlas store: content round-trips, gene harmonisation, X kinds, bad input leaves the store as it was."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.atlas import AtlasStore, ingest
from scatlas.atlas.errors import DatasetExistsError, InputError, StoreError
from scatlas.atlas.normalize import to_lognorm
from tests.conftest import make_adata


def store_X(store: AtlasStore, dataset_id: str) -> sp.csr_matrix:
    chunks = [c for c in store.iter_chunks(chunk_size=37) if c.dataset_id == dataset_id]
    return sp.vstack([c.X for c in chunks]).tocsr()


def in_source_gene_order(store: AtlasStore, X: sp.csr_matrix, var: pd.DataFrame) -> np.ndarray:
    cols = store.genes.locate(list(var.index))
    assert (cols >= 0).all()
    return X[:, cols].toarray()


def fingerprint(atlas: Path) -> str:
    """What a reader can see: store.json plus the DuckDB cells table and every committed X value."""
    store = AtlasStore.open(atlas)
    h = hashlib.sha256((atlas / "store.json").read_bytes())
    with store.connect() as con:
        h.update(str(con.execute("SELECT * FROM cells ORDER BY soma_joinid").fetchall()).encode())
        h.update(str(con.execute("SELECT * FROM genes ORDER BY var_joinid").fetchall()).encode())
    for c in store.iter_chunks():
        h.update(c.X.toarray().tobytes())
    return h.hexdigest()


def test_ingest_round_trips_counts_labels_and_genes(tmp_path, h5ad_factory):
    a = h5ad_factory("ds_a", seed=1, n_cells=90)
    b = h5ad_factory("ds_b", seed=2, n_cells=70, gene_offset=30)  # half the genes shared with ds_a
    report = ingest([a, b], tmp_path / "atlas", chunk_size=25, progress=False)
    assert [d.dataset_id for d in report.datasets] == ["ds_a", "ds_b"]
    store = AtlasStore.open(tmp_path / "atlas")
    assert store.n_cells == 160
    assert len([k for k in store.genes.keys if k]) == 90  # 60 + 60 - 30 shared
    assert report.datasets[1].genes["n_existing"] == 30 and report.datasets[1].genes["n_new"] == 30
    for path, name in ((a, "ds_a"), (b, "ds_b")):
        src = anndata.read_h5ad(path)
        got = in_source_gene_order(store, store_X(store, name), src.var)
        np.testing.assert_array_equal(got, src.X.toarray())
        rec = store.dataset(name)
        with store.connect() as con:
            rows = con.execute(
                "SELECT obs_id, cell_type, donor_id, tissue, n_counts FROM cells WHERE dataset_id = ? ORDER BY soma_joinid",
                [name],
            ).df()
        assert list(rows.obs_id) == list(src.obs_names)
        assert list(rows.cell_type) == list(src.obs.cell_type.astype(str))
        np.testing.assert_allclose(rows.n_counts, src.obs.n_counts)
        assert rec.x_kind == "counts" and rec.x_source == "X"
    # ids are contiguous per dataset and stable
    assert (store.dataset("ds_a").start, store.dataset("ds_b").start) == (0, 90)


def test_append_never_renumbers_and_refuses_duplicates(tmp_path, h5ad_factory):
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("one", seed=1)], atlas, mode="write", progress=False)
    before = AtlasStore.open(atlas).obs(np.arange(120), ["obs_id"]).obs_id.tolist()
    ingest([h5ad_factory("two", seed=2)], atlas, mode="append", progress=False)
    store = AtlasStore.open(atlas)
    assert store.obs(np.arange(120), ["obs_id"]).obs_id.tolist() == before
    assert store.dataset("two").start == 120
    with pytest.raises(DatasetExistsError):
        ingest([h5ad_factory("one", seed=3)], atlas, progress=False)
    for twin in ("ONE", "one "):  # one id in other case or with a blank: the same dataset to the cell table
        with pytest.raises(DatasetExistsError, match="differing only in case"):
            ingest([h5ad_factory("x", seed=3)], atlas, dataset_id=twin, progress=False)
    with pytest.raises(InputError, match="occur more than once"):
        ingest([h5ad_factory("pair", seed=4), h5ad_factory("PAIR", seed=5)], atlas, progress=False)
    with pytest.raises(StoreError, match="already exists"):
        ingest([h5ad_factory("three", seed=3)], atlas, mode="write", progress=False)
    ingest([h5ad_factory("one", seed=3)], atlas, dataset_id="one_again", progress=False)
    assert AtlasStore.open(atlas).n_cells == 360


def test_obs_map_renames_and_keeps_other_columns(tmp_path, h5ad_factory):
    def transform(ad):
        ad.obs = ad.obs.rename(columns={"cell_type": "cluster_id", "donor_id": "sample_id"})
        ad.obs["batch"] = "b1"
        return ad

    path = h5ad_factory("mapped", transform=transform)
    ingest([path], tmp_path / "atlas", obs_map={"cluster_id": "cell_type", "sample_id": "donor_id"}, progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    with store.connect() as con:
        df = con.execute("SELECT cell_type, donor_id, batch FROM cells").df()
    assert set(df.cell_type) == {"T cell", "B cell", "monocyte"}
    assert set(df.donor_id) == {"d1", "d2"}
    assert set(df.batch) == {"b1"}


def test_gene_harmonisation_learns_symbol_to_ensembl(tmp_path, h5ad_factory):
    atlas = tmp_path / "atlas"
    sym_only = h5ad_factory("symbols_first", seed=1, ensembl=False)
    both = h5ad_factory("both", seed=2)
    sym_later = h5ad_factory("symbols_later", seed=3, ensembl=False)
    ens_only = h5ad_factory("ensembl_only", seed=4, symbols=False)
    ingest([sym_only], atlas, progress=False)
    r = ingest([both, sym_later, ens_only], atlas, progress=False)
    store = AtlasStore.open(atlas)
    assert len([k for k in store.genes.keys if k]) == 60  # one gene each, whatever the identifiers
    both_r, later_r, ens_r = r.datasets
    assert both_r.genes["n_existing"] == 60 and both_r.genes["n_new"] == 0
    assert later_r.genes["n_symbol_mapped_to_ensembl"] == 60
    assert ens_r.genes["n_existing"] == 60
    # the symbol-keyed genes learned their Ensembl ids
    assert (store.genes.locate([f"ENSG{1000000 + i:011d}" for i in range(60)]) >= 0).all()
    X_sym = in_source_gene_order(store, store_X(store, "symbols_later"), anndata.read_h5ad(sym_later).var)
    np.testing.assert_array_equal(X_sym, anndata.read_h5ad(sym_later).X.toarray())


def test_x_kind_choice_prefers_counts(tmp_path, h5ad_factory):
    def lognorm_with_counts(ad):
        ad.layers["counts"] = ad.X.copy()
        ad.X = to_lognorm(ad.X, "counts")
        return ad

    def scaled_with_raw_lognorm(ad):
        ln = anndata.AnnData(X=to_lognorm(ad.X, "counts"), obs=ad.obs, var=ad.var)
        ad = ln.copy()
        ad.raw = ln
        dense = ad.X.toarray()
        ad.X = (dense - dense.mean(0)) / (dense.std(0) + 1e-3)
        return ad

    def scaled_only(ad):
        dense = ad.X.toarray()
        ad.X = (dense - dense.mean(0)) / (dense.std(0) + 1e-3)
        return ad

    atlas = tmp_path / "atlas"
    r = ingest([h5ad_factory("ln_counts", transform=lognorm_with_counts),
                h5ad_factory("scaled_raw", transform=scaled_with_raw_lognorm)], atlas, progress=False)
    assert (r.datasets[0].x_source, r.datasets[0].x_kind) == ("layers/counts", "counts")
    assert (r.datasets[1].x_source, r.datasets[1].x_kind) == ("raw/X", "lognorm")
    before = fingerprint(atlas)
    with pytest.raises(InputError, match="Scaled"):
        ingest([h5ad_factory("scaled", transform=scaled_only)], atlas, progress=False)
    assert fingerprint(atlas) == before


def _lognorm_to(X, total):
    """log1p(x / cell total * ``total``) of counts, as scanpy's normalize_total + log1p or log1p(CPM) give."""
    X = sp.csr_matrix(X, dtype=np.float64)
    Y = sp.csr_matrix(sp.diags(total / np.asarray(X.sum(axis=1)).ravel()) @ X)
    Y.data = np.log1p(Y.data)
    return Y.astype(np.float32)


def test_detect_lognorm_total():
    from scatlas.atlas.xkind import detect_lognorm_total

    counts = make_adata(300, 60, seed=4).X
    assert detect_lognorm_total(_lognorm_to(counts, 1e4)) == pytest.approx(1e4, rel=1e-4)
    assert detect_lognorm_total(_lognorm_to(counts, 1e6)) == pytest.approx(1e6, rel=1e-4)
    empty_rows = sp.vstack([_lognorm_to(counts, 2500.0), sp.csr_matrix((5, 60), dtype=np.float32)])
    assert detect_lognorm_total(empty_rows) == pytest.approx(2500.0, rel=1e-4)  # empty cells do not count
    # a subset of the genes (highly variable genes only): rows sum to different values, nothing can be told
    assert detect_lognorm_total(_lognorm_to(counts, 1e4)[:, :30]) is None
    assert detect_lognorm_total(sp.csr_matrix((4, 60), dtype=np.float32)) is None


def test_log_normalised_inputs_of_another_total_are_rescaled_to_cp10k(tmp_path, h5ad_factory):
    """log1p(CPM) or scanpy's median-total normalisation read as log1p(CP10k): the scale the atlas uses."""
    from scatlas.atlas.sources import open_h5ad

    counts = make_adata(120, 60, seed=4).X
    expect = to_lognorm(counts, "counts").toarray()
    for total in (1e6, 1234.5):
        src = open_h5ad(anndata.AnnData(X=_lognorm_to(counts, total)))
        assert src.expression.lognorm_total == pytest.approx(total, rel=1e-4)
        assert "rescaled to log1p CP10k" in src.expression.describe()
        got = sp.vstack([X for _, X in src.iter_rows(np.arange(120), 50)]).toarray()
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
    assert open_h5ad(anndata.AnnData(X=_lognorm_to(counts, 1e4))).expression.lognorm_total is None
    log2_tpm = _lognorm_to(counts, 1e6)
    log2_tpm.data = (np.expm1(log2_tpm.data.astype(np.float64)) + 1).astype(np.float64)
    log2_tpm.data = np.log2(log2_tpm.data).astype(np.float32)  # log2(1 + TPM-like values)
    src = open_h5ad(anndata.AnnData(X=log2_tpm))
    assert src.expression.lognorm_base == 2 and src.expression.lognorm_total == pytest.approx(1e6, rel=1e-4)
    got = sp.vstack([X for _, X in src.iter_rows(np.arange(120), 50)]).toarray()
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
    hvg_only = open_h5ad(anndata.AnnData(X=_lognorm_to(counts, 1e6)[:, :30]))
    assert hvg_only.expression.lognorm_total is None  # cannot be told: used as it is

    def cpm(ad):
        ad.X = _lognorm_to(ad.X, 1e6)
        return ad

    path = h5ad_factory("cpm", transform=cpm)
    r = ingest([path], tmp_path / "atlas", progress=False)
    assert r.datasets[0].x_kind == "lognorm" and "rescaled to log1p CP10k" in r.datasets[0].x_source
    store = AtlasStore.open(tmp_path / "atlas")
    src_counts = anndata.read_h5ad(h5ad_factory("cpm_counts"))
    np.testing.assert_allclose(
        in_source_gene_order(store, store_X(store, "cpm"), src_counts.var),
        to_lognorm(src_counts.X, "counts").toarray(), rtol=1e-4, atol=1e-5,
    )


def test_non_primary_cells_skipped_by_default(tmp_path, h5ad_factory):
    def flag(ad):
        ad.obs["is_primary_data"] = np.arange(ad.n_obs) % 4 != 0
        return ad

    path = h5ad_factory("dups", transform=flag)
    r = ingest([path], tmp_path / "a1", progress=False)
    assert r.datasets[0].n_cells == 90 and r.datasets[0].n_skipped_non_primary == 30
    store = AtlasStore.open(tmp_path / "a1")
    src = anndata.read_h5ad(path)
    keep = src.obs.is_primary_data.to_numpy()
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "dups"), src.var), src.X.toarray()[keep])
    r2 = ingest([path], tmp_path / "a2", keep_non_primary=True, progress=False)
    assert r2.datasets[0].n_cells == 120


@pytest.mark.parametrize(
    "case",
    ["missing_file", "corrupt", "empty", "duplicate_names", "unknown_obs_map", "dataset_id_with_two_inputs"],
)
def test_bad_input_leaves_store_unchanged(tmp_path, h5ad_factory, case):
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("existing", seed=9)], atlas, progress=False)
    before = fingerprint(atlas)
    files_before = sorted(p.name for p in atlas.iterdir())
    kwargs: dict = {}
    if case == "missing_file":
        inputs = [tmp_path / "nope.h5ad"]
    elif case == "corrupt":
        bad = tmp_path / "corrupt.h5ad"
        bad.write_bytes(b"not an hdf5 file" * 100)
        inputs = [bad]
    elif case == "empty":
        inputs = [h5ad_factory("empty", transform=lambda ad: ad[:0].copy())]
    elif case == "duplicate_names":
        def dup(ad):
            ad.obs_names = ["same"] * ad.n_obs
            return ad
        inputs = [h5ad_factory("dupnames", transform=dup)]
    elif case == "unknown_obs_map":
        inputs = [h5ad_factory("ok1")]
        kwargs = {"obs_map": {"no_such_column": "cell_type"}}
    else:
        inputs = [h5ad_factory("ok2"), h5ad_factory("ok3")]
        kwargs = {"dataset_id": "x"}
    good = h5ad_factory("good_one", seed=5)
    with pytest.raises(InputError):
        ingest([good, *inputs], atlas, progress=False, **kwargs)
    assert fingerprint(atlas) == before  # validated before writing: not even the good file was added
    assert sorted(p.name for p in atlas.iterdir()) == files_before


def test_an_hdf5_file_that_is_not_anndata_gets_one_message_everywhere(tmp_path):
    import h5py
    from click.testing import CliRunner

    from scatlas.atlas.sources import open_h5ad
    from scatlas.cli import cli
    from scatlas.server.uploads import check_h5ad

    path = tmp_path / "other.h5ad"
    with h5py.File(path, "w") as f:
        f["foo"] = np.arange(3)
    message = "is an HDF5 file but not an AnnData .h5ad (no obs, var, X)"
    res = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(tmp_path / "atlas"), "--no-progress"])
    assert res.exit_code == 1 and message in res.output and "keyword argument" not in res.output, res.output
    assert not (tmp_path / "atlas").exists()
    for x_layer in (None, "raw"):  # annotate reads queries through open_h5ad too
        with pytest.raises(InputError, match=re.escape(message)):
            open_h5ad(path, x_layer=x_layer)
    with pytest.raises(InputError, match=re.escape(message)):
        check_h5ad(path, path.stat().st_size, name="other.h5ad")


def test_nan_values_refuse_the_whole_command_and_leave_the_store_as_it_was(tmp_path, h5ad_factory):
    """Non-finite values are found while a dataset streams in (checking first would read every file twice); the
    command publishes all its datasets or none: the good file before the bad one is not added either, and both
    ingest once the bad one is fixed."""
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("base", seed=4)], atlas, progress=False)
    before = fingerprint(atlas)

    def nan(ad):
        X = ad.X.toarray()
        X[-1, 0] = np.nan
        ad.X = sp.csr_matrix(X)
        return ad

    good, bad = h5ad_factory("good", seed=5), h5ad_factory("bad", seed=6, transform=nan)
    with pytest.raises(InputError, match=r"bad\.h5ad.*NaN or infinite values in 1 cell"):
        ingest([good, bad], atlas, chunk_size=30, progress=False)
    assert fingerprint(atlas) == before
    store = AtlasStore.open(atlas)
    assert [d.dataset_id for d in store.datasets] == ["base"]
    n_base = store.n_cells
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == n_base
    ingest([good, h5ad_factory("bad", seed=6)], atlas, progress=False)
    assert AtlasStore.open(atlas).n_cells == 3 * n_base


def test_interrupted_ingest_is_invisible_and_next_ingest_works(tmp_path, h5ad_factory, monkeypatch):
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("first", seed=1)], atlas, progress=False)
    before = fingerprint(atlas)

    import scatlas.atlas.ingestion as ingest_mod

    real = ingest_mod.pa.table
    calls = {"n": 0}

    def exploding_table(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # a few arrays into the second dataset's write
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_mod.pa, "table", exploding_table)
    with pytest.raises(KeyboardInterrupt):
        ingest([h5ad_factory("second", seed=2, gene_offset=100)], atlas, chunk_size=30, progress=False)
    monkeypatch.setattr(ingest_mod.pa, "table", real)
    assert (atlas / "ingest.journal.json").exists()
    assert fingerprint(atlas) == before  # readers never see the half-written dataset

    r = ingest([h5ad_factory("second", seed=2, gene_offset=100)], atlas, progress=False)
    assert not (atlas / "ingest.journal.json").exists()
    store = AtlasStore.open(atlas)
    assert r.datasets[0].first_cell_id == 240  # the interrupted run's ids [120, 240) stay unused
    assert store.n_cells == 240
    src = anndata.read_h5ad(h5ad_factory("second", seed=2, gene_offset=100))
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "second"), src.var), src.X.toarray())
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == 240


def test_first_failed_ingest_leaves_no_store(tmp_path, h5ad_factory, monkeypatch):
    import scatlas.atlas.ingestion as ingest_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ingest_mod, "_write_dataset", boom)
    with pytest.raises(RuntimeError):
        ingest([h5ad_factory("x")], tmp_path / "fresh", progress=False)
    assert not AtlasStore.exists(tmp_path / "fresh")


def test_first_ingest_failing_on_bad_values_warns_of_no_interrupted_ingest(tmp_path, h5ad_factory, caplog):
    def nan(ad):
        X = ad.X.toarray()
        X[0, 0] = np.nan
        ad.X = sp.csr_matrix(X)
        return ad

    with caplog.at_level("WARNING"), pytest.raises(InputError, match="NaN or infinite"):
        ingest([h5ad_factory("bad", transform=nan)], tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_store_reads_stream_in_bounded_chunks(tmp_path, h5ad_factory):
    ingest([h5ad_factory("a", n_cells=100), h5ad_factory("b", n_cells=50, seed=3)], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    chunks = list(store.iter_chunks(chunk_size=40))
    assert [len(c) for c in chunks] == [40, 40, 20, 40, 10]  # never spans datasets
    ids = store.sample_ids(30, seed=0)
    assert len(ids) == 30 and len(np.unique(ids)) == 30
    assert ((ids < 100).sum(), (ids >= 100).sum()) == (15, 15)  # stratified by dataset
    picked = list(store.read_cells(ids, chunk_size=7))
    assert sum(len(c) for c in picked) == 30
    full = sp.vstack([c.X for c in chunks]).tocsr()
    np.testing.assert_array_equal(sp.vstack([c.X for c in picked]).toarray(), full[ids].toarray())
    with pytest.raises(InputError):
        list(store.read_cells([5, 3]))


def test_obsm_embeddings_are_stored(tmp_path, h5ad_factory):
    def with_emb(ad):
        ad.obsm["X_emb"] = np.random.default_rng(0).normal(size=(ad.n_obs, 8)).astype(np.float32)
        return ad

    path = h5ad_factory("emb", transform=with_emb)
    ingest([path], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    got = np.vstack([c.obsm["X_emb"] for c in store.iter_chunks(chunk_size=50, with_X=False, obsm_keys=["X_emb"])])
    np.testing.assert_allclose(got, anndata.read_h5ad(path).obsm["X_emb"])


def test_census_layout_soma_experiment(tmp_path):
    import tiledbsoma.io

    ad = make_adata(n_cells=100, seed=4)
    ad.obs["dataset_id"] = np.where(np.arange(100) < 60, "census_ds1", "census_ds2")
    ad.obs["is_primary_data"] = np.arange(100) % 10 != 0
    ad.obs["assay"] = "10x 3' v3"
    ad.var = ad.var.rename(columns={})
    uri = str(tmp_path / "census_exp")
    tiledbsoma.io.from_anndata(uri, ad, measurement_name="RNA", X_layer_name="raw")
    r = ingest([uri], tmp_path / "atlas", progress=False)
    assert sorted(d.dataset_id for d in r.datasets) == ["census_ds1", "census_ds2"]
    assert sum(d.n_cells for d in r.datasets) == 90
    store = AtlasStore.open(tmp_path / "atlas")
    with store.connect() as con:
        got = con.execute("SELECT dataset_id, count(*) FROM cells GROUP BY 1 ORDER BY 1").fetchall()
    assert got == [("census_ds1", 54), ("census_ds2", 36)]
    keep = ad.obs.is_primary_data.to_numpy() & (ad.obs.dataset_id == "census_ds1").to_numpy()
    np.testing.assert_array_equal(
        in_source_gene_order(store, store_X(store, "census_ds1"), ad.var), ad.X.toarray()[keep]
    )
    with store.connect() as con:  # from_anndata's obs_id is the cells' names, not a clashing column
        columns = [c for (c,) in con.execute("SELECT column_name FROM (DESCRIBE cells)").fetchall()]
        assert "obs_id_orig" not in columns
        assert con.execute("SELECT min(obs_id) FROM cells").fetchone()[0] in set(ad.obs_names)
    # --dataset-id would merge its two datasets into one: refused
    with pytest.raises(InputError, match="holds 2 datasets .* --dataset-id would merge them"):
        ingest([uri], tmp_path / "atlas2", dataset_id="everything", progress=False)


@pytest.mark.slow
def test_real_datasets_ingest(tmp_path, shared_raw):
    files = {
        "kang2018_ifnb_ctrl_stim_2800.h5ad": ("cell_type", "counts"),
        "pbmc3k_seurat_labels_clustifyr.h5ad": ("classified", "lognorm"),
        "scanpy_pbmc68k_reduced.h5ad": ("bulk_labels", "lognorm"),
        "tian2019_3celllines_celseq2_dropseq.h5ad": ("cell_line", "counts"),
        "pancreas_3studies_beta_ductal_cepo.h5ad": ("cellTypes", "normalized"),
    }
    atlas = tmp_path / "atlas"
    for name, (label, kind) in files.items():
        r = ingest([shared_raw / name], atlas, obs_map={label: "cell_type"}, progress=False)
        src = anndata.read_h5ad(shared_raw / name)
        d = r.datasets[0]
        assert d.n_cells == src.n_obs and d.x_kind == kind
        with AtlasStore.open(atlas).connect() as con:
            labels = con.execute(
                "SELECT cell_type, count(*) FROM cells WHERE dataset_id = ? GROUP BY 1", [d.dataset_id]
            ).fetchall()
        assert dict(labels) == src.obs[label].astype(str).value_counts().to_dict()
    store = AtlasStore.open(atlas)
    # symbols of the PBMC sets overlap; the Ensembl-only cell-line set shares none of them
    assert store.dataset("pbmc3k_seurat_labels_clustifyr").genes["n_existing"] > 1500
    kang = anndata.read_h5ad(shared_raw / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    got = in_source_gene_order(store, store_X(store, "kang2018_ifnb_ctrl_stim_2800")[:200], kang.var)
    np.testing.assert_array_equal(got, kang.X[:200].toarray())
    state = json.loads((atlas / "store.json").read_text())
    assert len(state["datasets"]) == 5


def test_the_same_cells_ingested_again_under_another_id_are_warned_about(tmp_path, h5ad_factory, caplog):
    """The refusal of a repeated dataset id says to use --dataset-id: with it the same file went in twice, silently."""
    first = h5ad_factory("kang", seed=1)
    ingest([first], tmp_path / "atlas", progress=False)
    with caplog.at_level("WARNING"):
        ingest([h5ad_factory("other", seed=2, prefix="o")], tmp_path / "atlas", progress=False)
    assert "cell names in common" not in caplog.text  # another dataset's cells: no warning
    with caplog.at_level("WARNING"):
        ingest([first], tmp_path / "atlas", dataset_id="kang_again", progress=False)
    assert "dataset 'kang_again' has 120 of its 120 cell names in common with stored dataset 'kang'" in caplog.text


def test_a_dataset_sharing_few_genes_with_the_store_is_warned_about(tmp_path, h5ad_factory, caplog):
    ingest([h5ad_factory("a", seed=1)], tmp_path / "atlas", progress=False)
    with caplog.at_level("WARNING"):
        ingest([h5ad_factory("b", seed=2, prefix="b")], tmp_path / "atlas", progress=False)
    assert "genes with the store" not in caplog.text
    foreign = make_adata(80, 60, seed=3, prefix="f", gene_offset=10_000)  # ids and symbols the store lacks
    foreign.write_h5ad(tmp_path / "foreign.h5ad")
    with caplog.at_level("WARNING"):
        ingest([tmp_path / "foreign.h5ad"], tmp_path / "atlas", progress=False)
    assert "dataset 'foreign' shares 0 of its 60 genes with the store" in caplog.text


def test_default_cell_names_are_no_evidence_of_a_copy_but_mixed_ones_are(tmp_path, h5ad_factory, caplog):
    """AnnData's default names (0, 1, ...) repeat across unrelated files; names of which only some are digits are
    judged like any others (the check looked at the first 1,000 sorted names, where digits come first)."""
    def numbered(adata):
        adata.obs_names = [str(i) for i in range(adata.n_obs)]
        return adata

    def mixed(adata):  # over 1,000 digit names, which sort first
        adata.obs_names = [str(i) if i < 1050 else f"cell{i}" for i in range(adata.n_obs)]
        return adata

    ingest([h5ad_factory("a", numbered, seed=1)], tmp_path / "atlas", progress=False)
    with caplog.at_level("WARNING"):
        ingest([h5ad_factory("b", numbered, seed=2)], tmp_path / "atlas", progress=False)
    assert "cell names in common" not in caplog.text
    ingest([h5ad_factory("c", mixed, seed=3, n_cells=1100)], tmp_path / "atlas2", progress=False)
    with caplog.at_level("WARNING"):
        ingest([h5ad_factory("d", mixed, seed=4, n_cells=1100)], tmp_path / "atlas2", progress=False)
    assert "dataset 'd' has 1100 of its 1100 cell names in common with stored dataset 'c'" in caplog.text
