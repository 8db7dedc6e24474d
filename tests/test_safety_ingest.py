"""Untrusted .h5ad files at ingest: names from data never run SQL, every row is validated, one command commits all
of its datasets or none, and ``verify_store`` finds what changed behind the store's back."""

from __future__ import annotations

import errno
from pathlib import Path

import duckdb
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatlas.atlas.errors import InputError
from scatlas.atlas.ingestion import _standardise_obs, ingest
from scatlas.atlas.store import STATE_FILE, AtlasStore
from scatlas.atlas.verify import verify_store
from scatlas.cli import cli
from tests.test_ingest import fingerprint


@pytest.fixture
def base_atlas(tmp_path, h5ad_factory) -> Path:
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("base", seed=1)], atlas, progress=False)
    return atlas


def _with_obs_column(name: str, values: object = "x"):
    def edit(ad):
        ad.obs[name] = values
        return ad

    return edit


INJECTIONS = [
    "x\" VARCHAR; COPY (SELECT 1) TO 'out.csv'; --",
    'y" VARCHAR; DELETE FROM cells; DROP TABLE genes; COMMIT; --',
    "z'); DROP TABLE cells; --",
]


@pytest.mark.parametrize("column", INJECTIONS)
def test_obs_column_names_are_quoted_never_run(base_atlas, h5ad_factory, tmp_path, monkeypatch, column):
    monkeypatch.chdir(tmp_path)
    bad = h5ad_factory("inject", seed=2, transform=_with_obs_column(column))
    ingest([bad], base_atlas, progress=False)
    assert not (tmp_path / "out.csv").exists()
    store = AtlasStore.open(base_atlas)
    assert [d.dataset_id for d in store.datasets] == ["base", "inject"]
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == store.n_cells
        assert con.execute("SELECT count(*) FROM genes").fetchone()[0] > 0
        names = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
    assert column in names  # stored under its own (quoted) name
    assert verify_store(base_atlas, progress=False).ok


@pytest.mark.parametrize(
    "column, message",
    [("a\x01b", "control characters"), ("n" * 300, "characters long"), ("   ", "empty name")],
)
def test_absurd_obs_column_names_are_refused_escaped(base_atlas, h5ad_factory, column, message):
    before = fingerprint(base_atlas)
    bad = h5ad_factory("absurd", seed=2, transform=_with_obs_column(column))
    result = CliRunner().invoke(cli, ["ingest", str(bad), "--atlas", str(base_atlas), "--no-progress"])
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output and "Traceback" not in result.output
    assert "\x01" not in result.output
    assert fingerprint(base_atlas) == before


def test_empty_column_name_refused():
    obs = pd.DataFrame({"": ["a", "b"]}, index=["c1", "c2"])
    with pytest.raises(InputError, match="empty name"):
        _standardise_obs(obs, "ds", {}, "file.h5ad", from_soma=False)


def test_names_equal_after_normalisation_are_renamed_and_reported(base_atlas, h5ad_factory):
    def edit(ad):
        ad.obs["Batch"] = "b1"
        ad.obs["batch "] = "b2"
        ad.obs["CELL_TYPE"] = "shadow"
        return ad

    report = ingest([h5ad_factory("dups", seed=2, transform=edit)], base_atlas, progress=False)
    renamed = report.datasets[0].renamed_columns
    assert renamed == {"batch ": "batch _orig", "CELL_TYPE": "CELL_TYPE_orig"}
    store = AtlasStore.open(base_atlas)
    assert store.dataset("dups").renamed_columns == renamed
    df = store.obs(np.arange(store.dataset("dups").start, store.dataset("dups").start + 3))
    assert (df["Batch"] == "b1").all() and (df["batch _orig"] == "b2").all()
    assert (df["CELL_TYPE_orig"] == "shadow").all() and (df["cell_type"] != "shadow").all()


def _set_value(row: int, value: float):
    def edit(ad):
        X = ad.X.tolil()
        X[row, 0] = value
        ad.X = sp.csr_matrix(X)
        return ad

    return edit


@pytest.mark.parametrize("value, message", [(-3.0, "negative values"), (2.5, "non-integer values"), (1e30, "values above")])
def test_a_bad_value_after_the_sample_names_its_row(base_atlas, h5ad_factory, value, message):
    """The kind is told from sampled rows (3,000 is not among them); a value there that breaks it is refused,
    naming the row."""
    before = fingerprint(base_atlas)
    good = h5ad_factory("good", seed=3)
    bad = h5ad_factory("late", seed=4, n_cells=4000, transform=_set_value(3000, value))
    result = CliRunner().invoke(cli, ["ingest", str(good), str(bad), "--atlas", str(base_atlas), "--no-progress"])
    assert result.exit_code != 0, result.output
    assert "Error:" in result.output and message in result.output and "row 3000" in result.output
    assert "Traceback" not in result.output
    assert fingerprint(base_atlas) == before  # the good first file was not published either
    assert [d.dataset_id for d in AtlasStore.open(base_atlas).datasets] == ["base"]


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("where", ["sampled", "late"])
def test_values_beyond_float32_are_refused_as_too_large_not_as_infinite(tmp_path, h5ad_factory, layout, where):
    import warnings

    row = 5 if where == "sampled" else 3000

    def huge(ad):
        X = ad.X.toarray().astype(np.float64)
        X[row, :3] = 1e300
        ad.X = sp.csr_matrix(X) if layout == "csr" else X
        return ad

    bad = h5ad_factory("huge", seed=4, n_cells=3100, transform=huge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw "overflow encountered in cast"
        with pytest.raises(InputError, match="too large for float32 storage") as err:
            ingest([bad], tmp_path / "atlas", progress=False)
    assert "NaN or infinite" not in str(err.value) and "counts" in str(err.value)
    assert not (tmp_path / "atlas").exists()


def _damage_csr(what: str):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            if what == "indices":
                idx = f["X/indices"][...]
                idx[5] = 10_000  # beyond the 60 columns
                f["X/indices"][...] = idx
            else:
                ptr = f["X/indptr"][...]
                ptr[50] = ptr[48] - 1  # pointers go backwards
                f["X/indptr"][...] = ptr

    return damage


@pytest.mark.parametrize("what", ["indices", "indptr"])
def test_damaged_sparse_structure_is_refused(base_atlas, h5ad_factory, what):
    before = fingerprint(base_atlas)
    path = h5ad_factory("damaged", seed=5)
    _damage_csr(what)(path)
    result = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(base_atlas), "--no-progress"])
    assert result.exit_code != 0
    assert "Error:" in result.output and "damaged" in result.output and "Traceback" not in result.output
    assert fingerprint(base_atlas) == before


def test_nan_in_obsm_is_refused(base_atlas, h5ad_factory):
    def edit(ad):
        emb = np.random.default_rng(0).normal(size=(ad.n_obs, 4)).astype(np.float32)
        emb[100, 2] = np.nan
        ad.obsm["X_emb"] = emb
        return ad

    before = fingerprint(base_atlas)
    with pytest.raises(InputError, match=r"obsm\['X_emb'\].*NaN or infinite.*row 100"):
        ingest([h5ad_factory("nanobsm", seed=6, transform=edit)], base_atlas, progress=False)
    assert fingerprint(base_atlas) == before


def test_a_column_of_another_type_is_widened_not_coerced(tmp_path, h5ad_factory):
    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("ints", seed=1, transform=_with_obs_column("flag", 7))], atlas, progress=False)
    ingest([h5ad_factory("bools", seed=2, transform=_with_obs_column("flag", True))], atlas, progress=False)
    ingest([h5ad_factory("floats", seed=3, transform=_with_obs_column("score", 1))], atlas, progress=False)
    ingest([h5ad_factory("floats2", seed=4, transform=_with_obs_column("score", 2.5))], atlas, progress=False)
    store = AtlasStore.open(atlas)
    with store.connect() as con:
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall())
        flags = dict(con.execute("SELECT dataset_id, any_value(flag) FROM cells GROUP BY 1").fetchall())
        scores = dict(con.execute("SELECT dataset_id, any_value(score) FROM cells WHERE score IS NOT NULL GROUP BY 1").fetchall())
    assert types["flag"] == "VARCHAR" and types["score"] == "DOUBLE"
    assert flags["ints"] == "7" and flags["bools"].lower() == "true"
    assert scores == {"floats": 1.0, "floats2": 2.5}


def test_a_failure_before_store_json_leaves_the_old_state_visible_and_recovers(base_atlas, h5ad_factory, monkeypatch):
    """Killed between the DuckDB commit and store.json: readers see the old datasets, the next ingest clears the
    staged rows and goes on."""
    import scatlas.atlas.store_writer as store_mod

    real = store_mod.write_json_atomic

    def fail_on_state(path, payload):
        if Path(path).name == STATE_FILE:
            raise KeyboardInterrupt
        return real(path, payload)

    monkeypatch.setattr(store_mod, "write_json_atomic", fail_on_state)
    with pytest.raises(KeyboardInterrupt):
        ingest([h5ad_factory("half", seed=2, gene_offset=30)], base_atlas, progress=False)
    monkeypatch.setattr(store_mod, "write_json_atomic", real)
    store = AtlasStore.open(base_atlas)
    assert [d.dataset_id for d in store.datasets] == ["base"]
    assert len(store.genes) == store.state.var_high_water  # staged genes are not visible
    report = verify_store(base_atlas, progress=False)
    assert report.ok and any("staged rows" in n for n in report.notes)
    ingest([h5ad_factory("half", seed=2, gene_offset=30)], base_atlas, progress=False)
    store = AtlasStore.open(base_atlas)
    assert [d.dataset_id for d in store.datasets] == ["base", "half"]
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == store.n_cells
    assert verify_store(base_atlas, progress=False).ok


def test_disk_full_during_ingest_is_an_error_and_changes_nothing(base_atlas, h5ad_factory, monkeypatch):
    import scatlas.atlas.ingestion as ingestion

    real = ingestion._write_chunk
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    before = fingerprint(base_atlas)
    monkeypatch.setattr(ingestion, "_write_chunk", full)
    result = CliRunner().invoke(
        cli, ["ingest", str(h5ad_factory("big", seed=7, n_cells=300)), "--atlas", str(base_atlas), "--no-progress",
              "--chunk-size", "100"],
    )
    assert result.exit_code != 0 and "Error:" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(ingestion, "_write_chunk", real)
    assert fingerprint(base_atlas) == before


def test_verify_store_finds_changed_values_and_missing_rows(tmp_path, h5ad_factory):
    import pyarrow as pa
    import tiledbsoma

    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("a", seed=1), h5ad_factory("b", seed=2)], atlas, progress=False)
    report = verify_store(atlas, progress=False)
    assert report.ok and report.n_datasets == 2 and report.n_values > 0

    with tiledbsoma.Experiment.open(str(atlas / "experiment"), "w") as exp:  # one value changed behind our back
        exp.ms["RNA"].X["raw"].write(pa.table({
            "soma_dim_0": pa.array([130], pa.int64()), "soma_dim_1": pa.array([3], pa.int64()),
            "soma_data": pa.array([12345.0], pa.float32()),
        }))
    report = verify_store(atlas, progress=False)
    assert not report.ok and len(report.problems) == 1 and "'b'" in report.problems[0]

    with duckdb.connect(str(atlas / "cells.duckdb")) as con:
        con.execute("DELETE FROM cells WHERE soma_joinid = 3")
    problems = verify_store(atlas, progress=False).problems
    assert any("'a'" in p and "rows in the cells table" in p for p in problems)


LEAK = "cell_type\", current_setting('threads') || '/' || (SELECT count(*) FROM cells) AS \"leak"


def test_column_names_stay_quoted_through_hunt_sweep_and_report(tmp_path, h5ad_factory):
    """A name from an ingested file reaches the sweep's and the report's SQL quoted: no injected expression runs."""
    import pandas as pd

    def edit(ad):
        ad.obs[LEAK] = "x"
        ad.obs['q"uote'] = ad.obs["donor_id"].astype(str)
        return ad

    files = [h5ad_factory(f"leak{i}", seed=i, n_cells=200, transform=edit) for i in (1, 2)]
    atlas, index = tmp_path / "atlas", tmp_path / "index"
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["-q", *args])
        assert result.exit_code == 0, result.output
        return result.output

    run("ingest", *map(str, files), "--atlas", str(atlas), "--no-progress")
    run("build", "--atlas", str(atlas), "--index", str(index), "--embedder-option", "n_components=8",
        "--no-label-heads", "--no-progress")
    run("hunt", "train", "--index", str(index), "--positive-sql", "cell_type = 'B cell'", "--out",
        str(tmp_path / "clf"), "--no-progress")
    run("hunt", "sweep", "--index", str(index), "--classifier", str(tmp_path / "clf"), "--out",
        str(tmp_path / "sweep"), "--no-progress")
    hits = pd.read_parquet(tmp_path / "sweep" / "hits.parquet")
    assert len(hits) > 0 and "leak" not in hits.columns and LEAK in hits.columns
    assert (hits[LEAK] == "x").all() and 'q"uote' in hits.columns
    run("hunt", "report", str(tmp_path / "sweep" / "hits.parquet"), "--index", str(index), "--by", 'q"uote',
        "--out", str(tmp_path / "rep"))
    assert (tmp_path / "rep" / "enrichment.csv").is_file()


def _damage(kind: str):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            if kind == "duplicate":  # row 0 names its first column twice
                idx = f["X/indices"][...]
                ptr = f["X/indptr"][...]
                idx[ptr[0] + 1] = idx[ptr[0]]
                f["X/indices"][...] = idx
            elif kind == "csc_lie":
                f["X"].attrs["encoding-type"] = "csc_matrix"
            else:  # legacy layout (loaded whole) with an out-of-range column index
                for key in list(f.attrs):
                    del f.attrs[key]
                idx = f["X/indices"][...]
                idx[5] = 5000
                f["X/indices"][...] = idx

    return damage


@pytest.mark.parametrize("kind", ["duplicate", "csc_lie", "legacy_out_of_range"])
def test_damage_the_readers_could_take_for_data_is_refused(base_atlas, h5ad_factory, kind):
    before = fingerprint(base_atlas)
    path = h5ad_factory(f"dmg_{kind}", seed=5)
    _damage(kind)(path)
    result = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(base_atlas), "--no-progress"])
    assert result.exit_code != 0, result.output
    assert "Error:" in result.output and "damaged" in result.output and "Traceback" not in result.output
    assert fingerprint(base_atlas) == before


@pytest.mark.parametrize("key, rows, dims, message", [
    ("short", 50, 4, "one row per cell"), ("..", None, 4, "array name"), ("empty", None, 0, "no columns"),
])
def test_bad_obsm_entries_are_refused(base_atlas, h5ad_factory, key, rows, dims, message):
    def edit(ad):
        ad.obsm[key] = np.ones((ad.n_obs, dims), dtype=np.float32)
        return ad

    path = h5ad_factory(f"obsm_{dims}", seed=6, transform=edit)
    if rows is not None:
        with h5py.File(path, "r+") as f:
            data = f[f"obsm/{key}"][:rows]
            del f[f"obsm/{key}"]
            f[f"obsm/{key}"] = data
    before = fingerprint(base_atlas)
    result = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(base_atlas), "--no-progress"])
    assert result.exit_code != 0 and "Error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output and fingerprint(base_atlas) == before


def test_columns_named_like_reserved_ones_are_kept_renamed(base_atlas, h5ad_factory):
    def edit(ad):
        ad.obs["obs_id"] = "theirs"
        ad.obs["soma_joinid"] = 7
        return ad

    report = ingest([h5ad_factory("reserved", seed=8, transform=edit)], base_atlas, progress=False)
    assert report.datasets[0].renamed_columns == {"obs_id": "obs_id_orig", "soma_joinid": "soma_joinid_orig"}
    store = AtlasStore.open(base_atlas)
    df = store.obs([store.dataset("reserved").start])
    assert df["obs_id_orig"].iloc[0] == "theirs" and df["soma_joinid_orig"].iloc[0] == 7


def test_an_empty_dataset_id_is_refused(h5ad_factory, tmp_path):
    src = h5ad_factory("a", n_cells=20)
    res = CliRunner().invoke(cli, ["ingest", str(src), "--atlas", str(tmp_path / "atlas"), "--dataset-id", " "])
    assert res.exit_code == 1 and "Error: --dataset-id is empty" in res.output
    assert not (tmp_path / "atlas").exists()


@pytest.mark.parametrize("target", ["dataset_id", "soma_joinid", "obs_id", "Dataset_ID"])
def test_obs_map_onto_a_column_ingest_sets_is_refused(h5ad_factory, tmp_path, target):
    src = h5ad_factory("a", n_cells=20)
    res = CliRunner().invoke(cli, ["ingest", str(src), "--atlas", str(tmp_path / "atlas"),
                                   "--obs-map", f"cell_type={target}", "--no-progress"])
    assert res.exit_code == 1 and "Error: --obs-map 'cell_type'=" in res.output, res.output
    assert "cannot be a target" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "atlas").exists()


def _duckdb_interrupt(kind: str):
    """What DuckDB raises when a Ctrl-C arrives during one of its calls in the write of a chunk."""
    if kind == "register":
        raise RuntimeError("Query interrupted")
    if kind == "interrupt_exception":
        raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")
    try:  # the query stopped; the cleanup's next call fails on the aborted transaction
        raise RuntimeError("Query interrupted")
    except RuntimeError:
        raise duckdb.TransactionException(
            "TransactionContext Error: Current transaction is aborted (please ROLLBACK)") from None


@pytest.mark.parametrize("kind", ["register", "interrupt_exception", "aborted_transaction"])
def test_a_ctrl_c_duckdb_reports_as_its_own_error_is_an_interrupt(base_atlas, h5ad_factory, monkeypatch, kind):
    import scatlas.atlas.ingestion as ingestion

    real = ingestion._write_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            _duckdb_interrupt(kind)
        return real(*args, **kwargs)

    before = fingerprint(base_atlas)
    monkeypatch.setattr(ingestion, "_write_chunk", interrupted)
    args = ["ingest", str(h5ad_factory("big", seed=7, n_cells=300)), "--atlas", str(base_atlas), "--no-progress",
            "--chunk-size", "100"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130 and "Interrupted;" in result.output, result.output
    assert "Error:" not in result.output and "Traceback" not in result.output
    monkeypatch.setattr(ingestion, "_write_chunk", real)
    assert fingerprint(base_atlas) == before
    assert CliRunner().invoke(cli, args).exit_code == 0  # the rerun recovers the store and goes on


def test_a_ctrl_c_duckdb_reports_during_a_remove_is_an_interrupt(base_atlas, monkeypatch):
    from scatlas.atlas.store_writer import StoreWriter

    def interrupted(self, *args, **kwargs):
        _duckdb_interrupt("interrupt_exception")

    real = StoreWriter.delete_uncommitted_rows
    monkeypatch.setattr(StoreWriter, "delete_uncommitted_rows", interrupted)
    args = ["remove", "--atlas", str(base_atlas), "--dataset", "base"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130 and "Interrupted;" in result.output, result.output
    assert "Error:" not in result.output and "Traceback" not in result.output
    monkeypatch.setattr(StoreWriter, "delete_uncommitted_rows", real)
    result = CliRunner().invoke(cli, args)  # the rerun finishes the removal
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("value", "row", "problem"), [(0.5, 0, "non-integer values in a matrix of counts"),
                                                       (-1.0, 299, "negative values in a matrix read as counts")])
def test_one_stray_value_is_a_bad_row_not_the_matrix_kind(h5ad_factory, tmp_path, value, row, problem):
    """One fractional or negative value in a matrix of counts does not make it "normalized" or "scaled": the matrix
    is read as counts and the bad value refused, naming its row (the first or the last)."""
    def stray(adata):
        X = (adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)).astype(np.float32)
        X[row, 3] = value
        adata.X = sp.csr_matrix(X)
        return adata

    path = h5ad_factory("stray", transform=stray, n_cells=300, n_genes=60)
    res = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(tmp_path / "atlas"), "--no-progress"])
    assert res.exit_code == 1 and problem in res.output and f"first at row {row}" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "atlas").exists()
