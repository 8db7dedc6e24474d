"""Ingest takes what people have (--x-layer, --obs-set, the original of an --obs-map column) and uses the machine
(chunks read ahead in a thread, TileDB writes in global order) without changing what is stored or how a failure
leaves the store."""

from __future__ import annotations

import threading
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

import scatlas.atlas.ingestion as ingestion
from scatlas.atlas import AtlasStore, ingest
from scatlas.atlas.errors import InputError
from scatlas.atlas.ingest_pipeline import GlobalOrder, read_ahead
from scatlas.atlas.normalize import to_lognorm
from scatlas.cli import cli
from scatlas.index.predicate import validate_predicate
from tests.conftest import make_adata
from tests.test_ingest import fingerprint, in_source_gene_order, store_X

# -- --x-layer: SOMA experiments -------------------------------------------------------------------------------------


def _soma(tmp_path: Path, name: str, ad: anndata.AnnData, **kwargs: object) -> str:
    import tiledbsoma.io

    uri = str(tmp_path / name)
    tiledbsoma.io.from_anndata(uri, ad, measurement_name="RNA", **kwargs)
    return uri


def test_soma_written_by_from_anndata_ingests_with_no_flag(tmp_path):
    ad = make_adata(n_cells=80, seed=4)
    uri = _soma(tmp_path, "exp", ad)  # one X layer, named "data"
    r = ingest([uri], tmp_path / "atlas", progress=False)
    assert r.datasets[0].x_source == "X/data" and r.datasets[0].x_kind == "counts"
    store = AtlasStore.open(tmp_path / "atlas")
    assert store.datasets[0].x_source == "X/data"
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "exp"), ad.var), ad.X.toarray())


def test_soma_layers_raw_default_several_refused_named_and_absent(tmp_path):
    ad = make_adata(n_cells=60, seed=5)
    ad.layers["spliced"] = sp.csr_matrix(ad.X.toarray() * 2)
    uri = _soma(tmp_path, "two", ad)  # X layers "data" and "spliced", no "raw"
    with pytest.raises(InputError, match=r"several|2 layers") as err:
        ingest([uri], tmp_path / "a1", progress=False)
    assert "'data'" in str(err.value) and "'spliced'" in str(err.value) and "--x-layer" in str(err.value)
    assert not AtlasStore.exists(tmp_path / "a1")
    with pytest.raises(InputError, match="no X layer 'nope'") as err:
        ingest([uri], tmp_path / "a1", x_layer="nope", progress=False)
    assert "'data'" in str(err.value) and "'spliced'" in str(err.value)
    r = ingest([uri], tmp_path / "a1", x_layer="spliced", progress=False)
    assert r.datasets[0].x_source == "X/spliced"
    store = AtlasStore.open(tmp_path / "a1")
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "two"), ad.var), ad.X.toarray() * 2)

    ad.layers["spliced"] = sp.csr_matrix(ad.X.toarray() * 3)
    raw_uri = _soma(tmp_path, "with_raw", ad, X_layer_name="raw")  # "raw" and "spliced": raw is the default
    r = ingest([raw_uri], tmp_path / "a2", progress=False)
    assert r.datasets[0].x_source == "X/raw"
    store = AtlasStore.open(tmp_path / "a2")
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "with_raw"), ad.var), ad.X.toarray())


def test_soma_layer_names_from_the_file_are_escaped(tmp_path):
    from scatlas.atlas.sources.soma import choose_x_layer

    with pytest.raises(InputError) as err:
        choose_x_layer(["a\x1b[31mred", "b"], None, "exp")
    assert "\x1b" not in str(err.value) and "\\x1b" in str(err.value)
    with pytest.raises(InputError, match="control characters"):
        choose_x_layer(["a\x1b[31mred"], None, "exp")  # the only layer, but its name cannot be recorded


# -- --x-layer: h5ad ------------------------------------------------------------------------------------------------


def _layered(ad: anndata.AnnData) -> anndata.AnnData:
    counts = ad.X.copy()
    ad.layers["counts"] = counts
    ad.layers["ambient"] = sp.csr_matrix(counts.toarray() + 1)
    ad.raw = ad.copy()
    ad.X = to_lognorm(counts, "counts")
    return ad


def test_h5ad_x_layer_default_named_layer_x_raw_and_absent(tmp_path, h5ad_factory):
    path = h5ad_factory("lay", transform=_layered, n_cells=70, seed=6)
    src = anndata.read_h5ad(path)
    r = ingest([path], tmp_path / "d", progress=False)  # the default is unchanged: counts wherever they are
    assert (r.datasets[0].x_source, r.datasets[0].x_kind) == ("layers/counts", "counts")
    for flag, where, kind, expected in [
        ("ambient", "layers/ambient", "counts", src.layers["ambient"].toarray()),
        ("layers/ambient", "layers/ambient", "counts", src.layers["ambient"].toarray()),
        ("X", "X", "lognorm", None),
        ("raw", "raw/X", "counts", src.raw.X.toarray()),
    ]:
        atlas = tmp_path / f"a_{flag.replace('/', '_')}"
        r = ingest([path], atlas, x_layer=flag, progress=False)
        assert (r.datasets[0].x_source, r.datasets[0].x_kind) == (where, kind), flag
        assert AtlasStore.open(atlas).datasets[0].x_source == where
        if expected is not None:
            store = AtlasStore.open(atlas)
            np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "lay"), src.var), expected)
    with pytest.raises(InputError, match="no matrix 'spliced'") as err:
        ingest([path], tmp_path / "absent", x_layer="spliced", progress=False)
    assert "'ambient'" in str(err.value) and "'counts'" in str(err.value) and "raw" in str(err.value)
    assert not AtlasStore.exists(tmp_path / "absent")


def test_h5ad_x_layer_of_scaled_values_is_refused_and_in_memory_sources_take_it_too(tmp_path, h5ad_factory):
    from scatlas.atlas.sources.h5ad import open_h5ad

    def scaled(ad):
        dense = ad.X.toarray()
        ad.layers["scaled"] = (dense - dense.mean(0)) / (dense.std(0) + 1)
        return ad

    path = h5ad_factory("sc", transform=scaled, n_cells=50, seed=7)
    with pytest.raises(InputError, match="Scaled"):
        ingest([path], tmp_path / "s", x_layer="scaled", progress=False)
    ad = _layered(make_adata(n_cells=40, seed=8))
    assert open_h5ad(ad, x_layer="ambient").expression.location == "layers/ambient"
    with pytest.raises(InputError, match="no matrix"):
        open_h5ad(ad, x_layer="nope")


def test_h5ad_layer_names_in_messages_are_escaped(tmp_path, h5ad_factory):
    def odd(ad):
        ad.layers["bad\x1b[2Jname"] = ad.X.copy()
        return ad

    path = h5ad_factory("odd", transform=odd, n_cells=30)
    with pytest.raises(InputError) as err:
        ingest([path], tmp_path / "o", x_layer="missing", progress=False)
    text = str(err.value)
    assert "\x1b" not in text and "'bad\\x1b[2Jname'" in text
    with pytest.raises(InputError, match="control characters") as err:
        ingest([path], tmp_path / "o", x_layer="bad\x1b[2Jname", progress=False)  # it exists, but is not recorded
    assert "\x1b" not in str(err.value)


# -- --obs-set ------------------------------------------------------------------------------------------------------


def _no_tissue(ad):
    ad.obs = ad.obs.drop(columns=["tissue"])
    return ad


def test_obs_set_fills_every_cell_and_works_in_a_predicate(tmp_path, h5ad_factory):
    a = h5ad_factory("a", transform=_no_tissue, n_cells=40, seed=1)
    b = h5ad_factory("b", transform=_no_tissue, n_cells=30, seed=2)
    atlas = tmp_path / "atlas"
    ingest([a, b], atlas, obs_set={"tissue": "blood", "study": "pilot 1"}, progress=False)
    ingest([h5ad_factory("c", transform=_no_tissue, n_cells=20, seed=3)], atlas, obs_set={"tissue": "lung"},
           progress=False)
    store = AtlasStore.open(atlas)
    assert "study" in store.dataset("a").obs_columns and "tissue" not in store.dataset("a").obs_columns
    with store.connect() as con:
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall())
        rows = con.execute("SELECT dataset_id, tissue, study, count(*) FROM cells GROUP BY ALL ORDER BY 1").fetchall()
        pred = validate_predicate("tissue = 'blood' AND study = 'pilot 1'", types)
        hits = con.execute(pred.sql).fetchall()
    assert types["study"] == "VARCHAR"
    assert rows == [("a", "blood", "pilot 1", 40), ("b", "blood", "pilot 1", 30), ("c", "lung", None, 20)]
    assert len(hits) == 70
    import tiledbsoma

    with tiledbsoma.Experiment.open(store.experiment_uri) as exp:  # the schema column is in SOMA obs too
        tissue = exp.obs.read(column_names=["soma_joinid", "tissue"]).concat().to_pandas()
    assert set(tissue["tissue"]) == {"blood", "lung"}


def test_obs_set_refuses_a_column_the_data_has_and_reserved_names(tmp_path, h5ad_factory):
    path = h5ad_factory("t", n_cells=30)  # has a tissue column
    atlas = tmp_path / "atlas"
    with pytest.raises(InputError, match="--obs-map") as err:
        ingest([path], atlas, obs_set={"tissue": "lung"}, progress=False)
    assert "'tissue'" in str(err.value)
    with pytest.raises(InputError, match="already"):
        ingest([path], atlas, obs_set={"N_COUNTS": "1"}, progress=False)  # another case of n_counts
    for col in ("dataset_id", "is_primary_data", "obs_id", "soma_joinid"):
        with pytest.raises(InputError, match="cannot be set"):
            ingest([path], atlas, obs_set={col: "x"}, progress=False)
    with pytest.raises(InputError, match="'tissue'; use that name"):
        ingest([path], atlas, obs_set={"Tissue": "x"}, progress=False)
    with pytest.raises(InputError, match="control characters"):
        ingest([path], atlas, obs_set={"bad\x1bname": "x"}, progress=False)
    assert not AtlasStore.exists(atlas)
    # renamed out of the way with --obs-map, the file's column is kept under the new name and the constant is set
    ingest([path], atlas, obs_map={"tissue": "tissue_in_file"}, obs_set={"tissue": "lung"}, progress=False)
    with AtlasStore.open(atlas).connect() as con:
        assert con.execute("SELECT DISTINCT tissue, tissue_in_file FROM cells").fetchall() == [("lung", "blood")]


# -- the original of an --obs-map column ---------------------------------------------------------------------------


def test_obs_map_keeps_the_source_column(tmp_path, h5ad_factory):
    def cluster(ad):
        ad.obs["cluster"] = ad.obs["cell_type"].astype(str).str.upper()
        ad.obs = ad.obs.drop(columns=["cell_type"])
        ad.obs["Cell_Type"] = "x"
        ad.obs["flag"] = np.where(np.arange(ad.n_obs) % 4 == 0, "no", "yes")
        return ad

    path = h5ad_factory("k", transform=cluster, n_cells=40)
    atlas = tmp_path / "atlas"
    r = ingest([path], atlas, obs_map={"cluster": "cell_type", "flag": "is_primary_data", "donor_id": "donor"},
               progress=False)
    rec = AtlasStore.open(atlas).dataset("k")
    assert "cluster" in rec.obs_columns and "donor" in rec.obs_columns
    assert "flag" not in rec.obs_columns  # is_primary_data decided which cells were stored: not kept
    assert "donor_id" not in rec.obs_columns  # a schema column's name is not kept (donor_id is NULL now)
    assert rec.renamed_columns == {"Cell_Type": "Cell_Type_orig"}  # clash rules as for other extras
    assert r.datasets[0].n_skipped_non_primary == 10
    with AtlasStore.open(atlas).connect() as con:
        rows = con.execute("SELECT DISTINCT cell_type, cluster FROM cells ORDER BY 1").fetchall()
        assert con.execute("SELECT count(*) FROM cells WHERE donor_id IS NOT NULL").fetchone()[0] == 0
    assert rows and all(a == b for a, b in rows)
    assert {a for a, _ in rows} <= {"T CELL", "B CELL", "MONOCYTE"}


def test_obs_map_of_a_dataset_id_column_applies_and_is_not_kept(tmp_path, h5ad_factory):
    def with_ds(ad):
        ad.obs["dataset_id"] = "submitter-7"
        return ad

    path = h5ad_factory("ds", transform=with_ds, n_cells=20)
    ingest([path], tmp_path / "atlas", obs_map={"dataset_id": "batch"}, progress=False)
    rec = AtlasStore.open(tmp_path / "atlas").dataset("ds")
    assert "batch" in rec.obs_columns and "source_dataset_id" not in rec.obs_columns
    with AtlasStore.open(tmp_path / "atlas").connect() as con:
        assert con.execute("SELECT DISTINCT dataset_id, batch FROM cells").fetchall() == [("ds", "submitter-7")]


# -- the pipeline stores the same thing -----------------------------------------------------------------------------


def _store_content(atlas: Path) -> dict:
    import tiledbsoma

    store = AtlasStore.open(atlas)
    with store.connect() as con:
        cells = con.execute("SELECT * FROM cells ORDER BY soma_joinid").df()
        genes = con.execute("SELECT * FROM genes ORDER BY var_joinid").fetchall()
        types = con.execute("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall()
    keys = sorted(store.state.obsm_dims)
    chunks = list(store.iter_chunks(chunk_size=50))
    with_obsm = [d for d in store.datasets if d.obsm]
    obsm = {k: np.vstack([c.obsm[k] for d in with_obsm for c in
                          store.iter_chunks(d.start, d.stop, chunk_size=50, with_X=False, obsm_keys=[k])])
            for k in keys}
    with tiledbsoma.Experiment.open(store.experiment_uri) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
    records = [(d.dataset_id, d.start, d.stop, d.x_sha256, d.x_source, d.obs_columns, d.genes) for d in store.datasets]
    return {"cells": cells, "genes": genes, "types": types, "X": sp.vstack([c.X for c in chunks]).tocsr(),
            "obsm": obsm, "obs": obs, "records": records}


def _wide(ad):
    ad.obsm["X_emb"] = np.random.default_rng(1).normal(size=(ad.n_obs, 5)).astype(np.float32)
    ad.obs["score"] = np.linspace(0, 1, ad.n_obs)
    ad.obs.loc[ad.obs.index[::7], "score"] = np.nan
    ad.obs["ok"] = np.arange(ad.n_obs) % 3 == 0
    ad.obs["n"] = pd.array(np.arange(ad.n_obs), dtype="Int64")
    return ad


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_read_ahead_stores_exactly_what_chunk_by_chunk_stores(tmp_path, h5ad_factory, chunk_size):
    # 4,100 genes: the X array's columns span several 2,048-wide tiles, so writes are permuted into global order
    a = h5ad_factory("wide", transform=_wide, n_cells=150, n_genes=4100, seed=1)
    b = h5ad_factory("narrow", n_cells=60, n_genes=50, seed=2, gene_offset=5000)
    got = {}
    for ahead in (0, 1, 3):
        atlas = tmp_path / f"atlas_{ahead}"
        ingest([a, b], atlas, chunk_size=chunk_size, read_ahead=ahead, obs_set={"study": "s"}, progress=False)
        got[ahead] = _store_content(atlas)
    ref = got[0]
    src = anndata.read_h5ad(a)
    store = AtlasStore.open(tmp_path / "atlas_0")
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "wide"), src.var), src.X.toarray())
    for ahead in (1, 3):
        other = got[ahead]
        pd.testing.assert_frame_equal(ref["cells"], other["cells"])
        pd.testing.assert_frame_equal(ref["obs"], other["obs"])
        assert ref["genes"] == other["genes"] and ref["types"] == other["types"]
        assert ref["records"] == other["records"]
        assert (ref["X"] != other["X"]).nnz == 0 and ref["X"].shape == other["X"].shape
        np.testing.assert_array_equal(ref["obsm"]["X_emb"], other["obsm"]["X_emb"])


def test_global_order_matches_tiledb_order():
    rng = np.random.default_rng(0)
    order = GlobalOrder(row_extent=4, col_extent=3)
    X = sp.random(13, 11, density=0.4, format="csr", random_state=1)
    X.sort_indices()
    rows = np.repeat(np.arange(100, 113), np.diff(X.indptr))
    cols = X.indices.astype(np.int64)
    perm = order.permutation(rows, cols)
    want = np.lexsort((cols, rows, cols // 3, rows // 4))
    np.testing.assert_array_equal(perm, want)
    assert GlobalOrder(4, 100).permutation(rows, cols) is None  # one column tile: row-major is the global order
    big = rng.integers(0, 1 << 20, size=1000)
    rows = np.sort(rng.integers(0, 1 << 24, size=1000))
    perm = GlobalOrder(2, 2).permutation(rows, big)  # a key too wide for the radix path
    np.testing.assert_array_equal(perm, np.lexsort((big, rows, big // 2, rows // 2)))


# -- failures: the store stays recoverable exactly as before ---------------------------------------------------------


def _readers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ingest-read")]


@pytest.mark.parametrize("where", ["write", "read"])
def test_an_interrupt_mid_way_leaves_the_store_as_it_was(tmp_path, h5ad_factory, monkeypatch, where):
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("first", seed=1)], atlas, progress=False)
    before = fingerprint(atlas)
    second = h5ad_factory("second", seed=2, gene_offset=100, n_cells=200)
    name = "_write_chunk" if where == "write" else "_prepare_chunk"
    real = getattr(ingestion, name)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ingestion, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest([second], atlas, chunk_size=20, read_ahead=3, progress=False)
    monkeypatch.setattr(ingestion, name, real)
    assert not _readers_alive()  # the read-ahead thread stopped before the sources were closed
    assert (atlas / "ingest.journal.json").exists()
    assert fingerprint(atlas) == before
    r = ingest([second], atlas, progress=False)
    assert r.datasets[0].first_cell_id == 320  # the interrupted run's ids [120, 320) stay unused
    store = AtlasStore.open(atlas)
    src = anndata.read_h5ad(second)
    np.testing.assert_array_equal(in_source_gene_order(store, store_X(store, "second"), src.var), src.X.toarray())
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == 320


def test_a_bad_value_found_ahead_is_raised_in_order(tmp_path, h5ad_factory):
    def nan_late(ad):
        X = ad.X.toarray()
        X[95, 3] = np.nan
        ad.X = sp.csr_matrix(X)
        return ad

    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("ok", seed=1)], atlas, progress=False)
    before = fingerprint(atlas)
    with pytest.raises(InputError, match="NaN"):
        ingest([h5ad_factory("bad", transform=nan_late, seed=3)], atlas, chunk_size=10, read_ahead=4, progress=False)
    assert not _readers_alive()
    assert fingerprint(atlas) == before


def test_read_ahead_stops_its_producer_when_the_consumer_fails():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    with pytest.raises(RuntimeError), read_ahead(items(), 2, name="ingest-read-test") as ready:
        for i in ready:
            if i == 3:
                raise RuntimeError("stop")
    assert not _readers_alive()
    assert len(made) <= 3 + 2 + 2  # bounded by the queue, not the input


def test_read_ahead_passes_items_and_errors_in_order():
    def items():
        yield 1
        yield 2
        raise ValueError("third")

    seen = []
    with pytest.raises(ValueError, match="third"), read_ahead(items(), 1) as ready:
        seen.extend(ready)
    assert seen == [1, 2]
    with read_ahead(iter(range(5)), 0) as ready:
        assert list(ready) == [0, 1, 2, 3, 4]


# -- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_ingest_options(tmp_path, h5ad_factory):
    path = h5ad_factory("cli", transform=_layered, n_cells=30)
    atlas = tmp_path / "atlas"
    res = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(atlas), "--no-progress", "--x-layer", "ambient",
                                   "--obs-set", "study=a=b", "--obs-set", "assay=10x 3' v3", "--read-ahead", "0"])
    assert res.exit_code == 0, res.output
    assert "X from layers/ambient" in res.output
    with AtlasStore.open(atlas).connect() as con:
        assert con.execute("SELECT DISTINCT study, assay FROM cells").fetchall() == [("a=b", "10x 3' v3")]
    bad = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(tmp_path / "b"), "--obs-set", "tissue"])
    assert bad.exit_code != 0 and "COLUMN=VALUE" in bad.output


def test_cli_read_ahead_default_is_the_library_default():
    ingest_cmd = cli.commands["ingest"]  # type: ignore[attr-defined]
    opt = next(p for p in ingest_cmd.params if p.name == "read_ahead")
    assert opt.default == ingestion.DEFAULT_READ_AHEAD


def test_store_arrays_are_written_in_global_order(tmp_path, h5ad_factory):
    """The fast path is on for the arrays a store has (a layout it cannot tell would fall back to TileDB's sort)."""
    ingest([h5ad_factory("e", transform=_wide, n_cells=20)], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    import tiledbsoma

    with tiledbsoma.Experiment.open(store.experiment_uri) as exp:
        rna = exp.ms["RNA"]
        assert GlobalOrder.of(rna.X["raw"]) == GlobalOrder(2048, 2048)
        assert GlobalOrder.of(rna["obsm"]["X_emb"]) is not None
        assert GlobalOrder.of(exp.obs) is None  # not a 2-d sparse array
