"""A Census experiment's feature_dataset_presence_matrix: the genes each dataset measured are recorded at ingest (the
others read as not measured, not as zero counts); without its Census around it the matrix cannot be read, and that
is said."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from scatlas.atlas import ingest
from scatlas.atlas.store import AtlasStore
from tests.conftest import make_adata, run_cli

N_GENES = 50
MEASURED_A = 30  # dataset ds_a measured the first 30 genes only; ds_b all 50


def _census(root: Path) -> Path:
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
