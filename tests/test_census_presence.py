"""A Census experiment's feature_dataset_presence_matrix: the genes each dataset measured are recorded at ingest (the
others read as not measured, not as zero counts); without its Census around it the matrix cannot be read, and that
is said."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import anndata
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from scatlas.atlas import ingest
from scatlas.atlas.store import AtlasStore
from tests.conftest import make_adata, run_cli

N_GENES = 50
MEASURED_A = 30  # dataset ds_a measured the first 30 genes only; ds_b all 50


def _census(root: Path, dense: bool = False) -> Path:
    """A Census-layout collection: census_info/datasets (rows named by soma_joinid, in another order than the
    experiment's obs) and census_data/homo_sapiens with two datasets and their presence matrix. Returns the
    experiment's path."""
    import tiledbsoma
    import tiledbsoma.io

    ad = make_adata(n_cells=80, n_genes=N_GENES, seed=7)
    ad.obs["dataset_id"] = np.where(np.arange(80) < 40, "ds_a", "ds_b")
    X = ad.X.toarray()
    X[:40, MEASURED_A:] = 0  # what the Census holds for genes ds_a never measured
    ad.X = sp.csr_matrix(X)
    exp_uri = root / "census_data" / "homo_sapiens"
    with tiledbsoma.Collection.create(str(root)) as census:
        info = census.add_new_collection("census_info")
        table = info.add_new_dataframe("datasets", schema=pa.schema([("dataset_id", pa.large_string())]),
                                        domain=[(0, 1)])
        table.write(pa.table({"soma_joinid": pa.array([0, 1], pa.int64()), "dataset_id": ["ds_b", "ds_a"]}))
        census.add_new_collection("census_data")
    tiledbsoma.io.from_anndata(str(exp_uri), ad, measurement_name="RNA", X_layer_name="raw")
    with tiledbsoma.Collection.open(str(root / "census_data"), "w") as data, \
            tiledbsoma.Experiment.open(str(exp_uri)) as exp:
        data.set("homo_sapiens", exp, use_relative_uri=True)
    rows = [0] * N_GENES + [1] * MEASURED_A  # ds_b (row 0) measured every gene, ds_a (row 1) the first 30
    cols = list(range(N_GENES)) + list(range(MEASURED_A))
    with tiledbsoma.Experiment.open(str(exp_uri), "w") as exp:
        if dense:  # not as the Census writes it
            grid = exp.ms["RNA"].add_new_dense_ndarray("feature_dataset_presence_matrix", type=pa.int8(),
                                                       shape=(2, N_GENES))
            grid.write((slice(None), slice(None)), pa.Tensor.from_numpy(np.ones((2, N_GENES), dtype=np.int8)))
            return exp_uri
        matrix = exp.ms["RNA"].add_new_sparse_ndarray("feature_dataset_presence_matrix", type=pa.bool_(),
                                                      shape=(2, N_GENES))
        matrix.write(pa.table({"soma_dim_0": pa.array(rows, pa.int64()), "soma_dim_1": pa.array(cols, pa.int64()),
                               "soma_data": pa.array([True] * len(rows))}))
    return exp_uri


def test_census_presence_matrix_records_the_genes_each_dataset_measured(tmp_path: Path) -> None:
    exp_uri = _census(tmp_path / "census")
    out = run_cli("ingest", str(exp_uri), "--atlas", str(tmp_path / "atlas"), "--no-progress")
    assert "ds_a: 40 cells" in out and f"{MEASURED_A} measured (the Census presence matrix" in out
    ds_b_line = next(line for line in out.splitlines() if line.startswith("ds_b:"))
    assert "measured (the Census" not in ds_b_line  # every gene measured: nothing to say
    listing = run_cli("datasets", "--atlas", str(tmp_path / "atlas"))
    ds_a_line = next(line for line in listing.splitlines() if line.startswith("ds_a:"))
    assert f"{MEASURED_A} measured, the Census presence matrix" in ds_a_line
    store = AtlasStore.open(tmp_path / "atlas")
    a, b = store.measured("ds_a"), store.measured("ds_b")
    assert a is not None and b is not None and b.all()
    feature = np.asarray(store.genes.feature_id)
    expected = {f"ENSG{1000000 + i:011d}" for i in range(MEASURED_A)}
    assert set(feature[a]) == expected  # by gene, whatever order the store keeps them in


def test_a_presence_matrix_outside_its_census_is_said_and_not_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exp_uri = _census(tmp_path / "census")
    alone = tmp_path / "alone"
    shutil.copytree(exp_uri, alone)  # the experiment copied out of its Census: the matrix's rows have no names
    with caplog.at_level(logging.WARNING):
        ingest([str(alone)], tmp_path / "atlas", progress=False)
    assert "its rows are named by the Census' census_info/datasets table, and the experiment was not given inside a Census" in caplog.text
    store = AtlasStore.open(tmp_path / "atlas")
    a = store.measured("ds_a")
    assert a is not None and a.all()


def test_a_relative_path_to_the_experiment_reads_its_census(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment given as a relative path (as a user types it) is found inside its Census as an absolute one."""
    _census(tmp_path / "census")
    monkeypatch.chdir(tmp_path)
    ingest(["census/census_data/homo_sapiens"], tmp_path / "atlas", progress=False)
    a = AtlasStore.open(tmp_path / "atlas").measured("ds_a")
    assert a is not None and int(a.sum()) == MEASURED_A


def test_a_presence_row_that_misses_genes_with_counts_is_said_and_widened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row saying ds_b measured nothing while its X has counts: the genes with counts are taken as measured (and
    the warning says the matrix does not describe this X), not a whole dataset read as unmeasured."""
    import tiledbsoma

    exp_uri = _census(tmp_path / "census")
    with tiledbsoma.Experiment.open(str(exp_uri), "w") as exp:  # row 0 (ds_b) emptied: deletes are not possible,
        matrix = exp.ms["RNA"]["feature_dataset_presence_matrix"]  # so its entries are overwritten with False
        matrix.write(pa.table({"soma_dim_0": pa.array([0] * N_GENES, pa.int64()),
                               "soma_dim_1": pa.array(list(range(N_GENES)), pa.int64()),
                               "soma_data": pa.array([False] * N_GENES)}))
    with caplog.at_level(logging.WARNING):
        ingest([str(exp_uri)], tmp_path / "atlas", progress=False)
    assert "dataset 'ds_b' has counts in" in caplog.text and "does not describe this X" in caplog.text
    b = AtlasStore.open(tmp_path / "atlas").measured("ds_b")
    assert b is not None and b.sum() > 0.9 * N_GENES  # every gene the dataset's cells have counts in


def _one_dataset_census(root: Path, ad: anndata.AnnData, measured: int) -> Path:
    """A Census-layout collection of one dataset (``ds_a``) whose presence row says it measured the first
    ``measured`` genes. Returns the experiment's path."""
    import tiledbsoma
    import tiledbsoma.io

    ad.obs["dataset_id"] = "ds_a"
    exp_uri = root / "census_data" / "homo_sapiens"
    with tiledbsoma.Collection.create(str(root)) as census:
        table = census.add_new_collection("census_info").add_new_dataframe(
            "datasets", schema=pa.schema([("dataset_id", pa.large_string())]), domain=[(0, 0)])
        table.write(pa.table({"soma_joinid": pa.array([0], pa.int64()), "dataset_id": ["ds_a"]}))
        census.add_new_collection("census_data")
    tiledbsoma.io.from_anndata(str(exp_uri), ad, measurement_name="RNA", X_layer_name="raw")
    with tiledbsoma.Collection.open(str(root / "census_data"), "w") as data, \
            tiledbsoma.Experiment.open(str(exp_uri)) as exp:
        data.set("homo_sapiens", exp, use_relative_uri=True)
    with tiledbsoma.Experiment.open(str(exp_uri), "w") as exp:
        matrix = exp.ms["RNA"].add_new_sparse_ndarray("feature_dataset_presence_matrix", type=pa.bool_(),
                                                      shape=(1, ad.n_vars))
        matrix.write(pa.table({"soma_dim_0": pa.array([0] * measured, pa.int64()),
                               "soma_dim_1": pa.array(list(range(measured)), pa.int64()),
                               "soma_data": pa.array([True] * measured)}))
    return exp_uri


def test_counts_beyond_the_first_cells_in_genes_called_unmeasured_are_kept_as_measured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The presence check at open time reads a dataset's first 2,000 cells; a gene called unmeasured with counts only
    in later cells is found while the cells are written, and recorded as measured (its counts are data)."""
    ad = make_adata(n_cells=2100, n_genes=N_GENES, seed=8)
    X = ad.X.toarray()
    X[:, MEASURED_A:] = 0
    X[2050:, N_GENES - 1] = 3  # counts in the last gene, in cells past the first 2,000 only
    ad.X = sp.csr_matrix(X)
    exp_uri = _one_dataset_census(tmp_path / "census", ad, MEASURED_A)
    with caplog.at_level(logging.WARNING):
        ingest([str(exp_uri)], tmp_path / "atlas", progress=False)
    assert "has counts in 1 genes its source says it did not measure" in caplog.text
    store = AtlasStore.open(tmp_path / "atlas")
    a = store.measured("ds_a")
    assert a is not None and int(a.sum()) == MEASURED_A + 1
    assert f"ENSG{1000000 + N_GENES - 1:011d}" in set(np.asarray(store.genes.feature_id)[a])


def test_a_lone_census_dataset_renamed_by_dataset_id_keeps_its_presence_row(tmp_path: Path) -> None:
    """--dataset-id renames the store dataset, not the Census row its measured genes are looked up by."""
    ad = make_adata(n_cells=60, n_genes=N_GENES, seed=9)
    X = ad.X.toarray()
    X[:, MEASURED_A:] = 0
    ad.X = sp.csr_matrix(X)
    exp_uri = _one_dataset_census(tmp_path / "census", ad, MEASURED_A)
    ingest([str(exp_uri)], tmp_path / "atlas", progress=False, dataset_id="mine")
    a = AtlasStore.open(tmp_path / "atlas").measured("mine")
    assert a is not None and int(a.sum()) == MEASURED_A

def test_a_presence_matrix_not_as_the_census_writes_it_is_an_error(tmp_path: Path) -> None:
    """A dense array under the presence matrix's name: one InputError saying what is expected (not a traceback),
    and the experiment's sources closed."""
    from scatlas.atlas.errors import InputError

    exp_uri = _census(tmp_path / "census", dense=True)

    with pytest.raises(InputError, match="feature_dataset_presence_matrix cannot be read as the Census writes it"):
        ingest([str(exp_uri)], tmp_path / "atlas", progress=False)

