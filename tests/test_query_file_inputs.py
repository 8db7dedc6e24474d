"""Query files as users have them: counts only in a layer (or chosen with --x-layer), dense float16, repeated gene
names, repeated cell names in search hits, a truth column with thousands of values, hostile column names in
messages. Through the CLI, on the session's planted world."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatlas.cli import cli


@pytest.fixture(scope="module")
def query(planted_world: dict[str, Path]) -> anndata.AnnData:
    return anndata.read_h5ad(planted_world["query"])[:200].copy()


def _run(*args: str) -> object:
    return CliRunner().invoke(cli, list(args))


def _annotate(world: dict[str, Path], path: Path, out: Path, *extra: str) -> object:
    return _run("annotate", str(path), "--index", str(world["index"]), "--out", str(out), "--no-progress", *extra)


def test_counts_in_a_layer_beside_an_empty_x_are_read_and_x_layer_chooses(planted_world, query, tmp_path):
    q = query.copy()
    q.layers["counts"] = q.X.copy()
    q.X = sp.csr_matrix(q.shape, dtype=np.float32)  # nothing in X
    q.write_h5ad(tmp_path / "layer.h5ad")
    res = _annotate(planted_world, tmp_path / "layer.h5ad", tmp_path / "a.h5ad")
    assert res.exit_code == 0, res.output
    obs = anndata.read_h5ad(tmp_path / "a.h5ad").obs
    assert (obs["cell_type_unknown_reason"] != "no_expression").all()
    res = _annotate(planted_world, tmp_path / "layer.h5ad", tmp_path / "b.h5ad", "--x-layer", "X")  # as asked
    assert res.exit_code != 0 and "Error:" in res.output and "Traceback" not in res.output
    res = _annotate(planted_world, tmp_path / "layer.h5ad", tmp_path / "c.h5ad", "--x-layer", "nope")
    assert res.exit_code != 0 and "no matrix 'nope' to read" in res.output


def test_dense_float16_is_read(planted_world, query, tmp_path):
    q = query.copy()
    q.X = q.X.toarray().astype(np.float16)
    q.write_h5ad(tmp_path / "f16.h5ad")
    res = _annotate(planted_world, tmp_path / "f16.h5ad", tmp_path / "a.h5ad")
    assert res.exit_code == 0, res.output


def test_repeated_gene_names_are_warned_about(planted_world, query, tmp_path):
    zeros = anndata.AnnData(sp.csr_matrix(query.shape, dtype=np.float32), obs=query.obs.copy(), var=query.var.copy())
    with pytest.warns(UserWarning, match="not unique"):
        q = anndata.concat([zeros, query], axis=1, merge="first")  # every gene twice, the empty copy first
    q.write_h5ad(tmp_path / "dup.h5ad")
    res = _annotate(planted_world, tmp_path / "dup.h5ad", tmp_path / "a.h5ad")
    assert "names 300 genes more than once" in res.output and "the first column of each is read" in res.output


def test_search_hits_say_the_query_row_when_cell_names_repeat(planted_world, query, tmp_path):
    q = query[:5].copy()
    q.obs_names = ["c1"] * 5
    q.write_h5ad(tmp_path / "same.h5ad")
    res = _run("search", str(tmp_path / "same.h5ad"), "--index", str(planted_world["index"]), "--out",
               str(tmp_path / "hits.parquet"), "--k", "3", "--no-progress")
    assert res.exit_code == 0, res.output
    hits = pd.read_parquet(tmp_path / "hits.parquet")
    assert sorted(hits["query_row"].unique()) == [0, 1, 2, 3, 4] and (hits.groupby("query_row").size() == 3).all()


def test_a_truth_column_of_thousands_of_values_draws_no_plot(planted_world, query, tmp_path):
    q = query.copy()
    q.obs["serial"] = [f"s{i}" for i in range(q.n_obs)]
    q.write_h5ad(tmp_path / "serial.h5ad")
    from scatlas.query import outputs

    old = outputs.MAX_CONFUSION_LABELS
    outputs.MAX_CONFUSION_LABELS = 50  # 200 distinct truth values: over it
    try:
        res = _annotate(planted_world, tmp_path / "serial.h5ad", tmp_path / "a.h5ad", "--truth-key", "serial")
    finally:
        outputs.MAX_CONFUSION_LABELS = old
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "a.confusion.png").exists() and "a.confusion.png" not in res.output


def test_column_names_in_messages_are_escaped_and_bounded(planted_world, query, tmp_path):
    q = query.copy()
    for i in range(60):
        q.obs[f"extra_{i}"] = 1
    q.obs["x\nError: forged"] = 1
    q.write_h5ad(tmp_path / "cols.h5ad")
    res = _run("search", str(tmp_path / "cols.h5ad"), "--index", str(planted_world["index"]), "--out",
               str(tmp_path / "hits.parquet"), "--cells-where", "nosuch = 1", "--no-progress")
    assert res.exit_code != 0
    assert res.output.count("Error:") == 1 and "more" in res.output and "\nError: forged" not in res.output


def test_an_output_under_a_file_is_refused_before_the_work(planted_world, tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    res = _annotate(planted_world, planted_world["query"], tmp_path / "precious.txt" / "a.h5ad")
    assert res.exit_code != 0 and "precious.txt is a file" in res.output and "annotated" not in res.output
    assert (tmp_path / "precious.txt").read_text() == "keep"
