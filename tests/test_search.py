"""`scatlas search` end to end on a small synthetic atlas with a planted rare population: both modes, the query and
atlas filters (and their sandbox), the outputs and their enrichment."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex
from scatlas.query.search import CENTROID, SearchHits, search_cells
from tests.conftest import PLANTED

ATLAS_COLUMNS = {"cell_type", "dataset_id", "donor_id", "tissue"}


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, ["-q", "search", *args, "--no-progress"])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1, result.output
        assert "Error:" in result.output and "Traceback" not in result.output
    return result.output


def test_cells_mode_with_cells_where(planted_world: dict[str, Path], tmp_path: Path) -> None:
    """The planted cells' neighbours: one row per (cell, rank) with the atlas metadata; the enrichment puts the
    planted label first; the report, the enrichment table and the map are written beside the hits."""
    before = planted_world["query"].read_bytes()
    out = run(str(planted_world["query"]), "--index", str(planted_world["index"]),
              "--out", str(tmp_path / "hits.parquet"), "--k", "15", "--cells-where", f"cell_type = '{PLANTED}'")
    obs = anndata.read_h5ad(planted_world["query"], backed="r").obs
    n_planted = int((obs["cell_type"] == PLANTED).sum())
    hits = pd.read_parquet(tmp_path / "hits.parquet")
    assert len(hits) == 15 * n_planted and n_planted > 20
    assert set(hits.columns) >= ATLAS_COLUMNS and {"query_cell", "rank", "soma_joinid", "similarity"} <= set(hits.columns)
    assert set(hits["query_cell"].astype(str)) == set(obs.index[obs["cell_type"] == PLANTED].astype(str))
    assert (hits.groupby("query_cell", observed=True)["similarity"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert (hits["cell_type"] == PLANTED).mean() > 0.8
    enr = pd.read_parquet(tmp_path / "hits.enrichment.parquet")
    by_type = enr[enr["column"] == "cell_type"]
    assert by_type.iloc[0]["group"] == PLANTED and by_type.iloc[0]["qvalue"] < 1e-10 and by_type.iloc[0]["fold"] > 5
    assert {"n_hits", "n_cells", "share_hits", "share_atlas", "fold", "pvalue", "qvalue"} <= set(enr.columns)
    assert {"dataset_id", "cell_type"} <= set(enr["column"])
    report = json.loads((tmp_path / "hits.report.json").read_text())
    assert report["query"]["cells_used"] == n_planted and report["params"]["cells_where"] == f"cell_type = '{PLANTED}'"
    assert report["enriched"]["cell_type"][0]["group"] == PLANTED
    assert (tmp_path / "hits.umap.png").read_bytes().startswith(b"\x89PNG")
    assert f"{n_planted} cells used" in out and f"enriched cell_type: {PLANTED}" in out
    assert planted_world["query"].read_bytes() == before  # the query is never modified


def test_centroid_mode_csv(planted_world: dict[str, Path], tmp_path: Path) -> None:
    run(str(planted_world["query"]), "--index", str(planted_world["index"]), "--out", str(tmp_path / "c.csv"),
        "--mode", "centroid", "--k", "25", "--cells-where", f"cell_type = '{PLANTED}'")
    hits = pd.read_csv(tmp_path / "c.csv")
    assert len(hits) == 25 and (hits["query_cell"] == CENTROID).all() and list(hits["rank"]) == list(range(25))
    assert set(hits.columns) >= ATLAS_COLUMNS and (hits["cell_type"] == PLANTED).all()
    enr = pd.read_csv(tmp_path / "c.enrichment.csv")
    assert enr[enr["column"] == "cell_type"].iloc[0]["group"] == PLANTED
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["map"]["available"] and len(report["map"]["centroid_xy"]) == 2


def test_where_restricts_the_atlas(planted_world: dict[str, Path], tmp_path: Path) -> None:
    """Hits come only from the cells matching --where, and the enrichment compares with those cells."""
    res = search_cells(planted_world["query"], planted_world["index"], k=10, progress=False)
    assert isinstance(res, SearchHits)
    hits, _enrichment, report = res  # a plain three-field NamedTuple
    datasets = sorted(hits["dataset_id"].astype(str).unique())
    assert len(datasets) == 2 and report["hits"]["atlas_cells_searched"] == report["index"]["n_cells"]
    keep = datasets[0]
    run(str(planted_world["query"]), "--index", str(planted_world["index"]), "--out", str(tmp_path / "w.parquet"),
        "--where", f"dataset_id = '{keep}'", "--k", "10")
    hits = pd.read_parquet(tmp_path / "w.parquet")
    assert set(hits["dataset_id"].astype(str)) == {keep}
    enr = pd.read_parquet(tmp_path / "w.enrichment.parquet")
    searched = json.loads((tmp_path / "w.report.json").read_text())["hits"]["atlas_cells_searched"]
    assert enr[enr["column"] == "cell_type"]["n_cells"].sum() == searched < report["index"]["n_cells"]


@pytest.mark.parametrize(
    ("option", "predicate", "message"),
    [
        ("--cells-where", "no_such_column = 1", "no_such_column"),
        ("--cells-where", "cell_type = ", "cells-where"),
        ("--cells-where", "cell_type = 'no such type'", "matches none"),
        ("--where", "no_such_column = 1", "no_such_column"),
        ("--where", "cell_type = 'no such type'", "no"),
    ],
)
def test_bad_predicates_are_errors(planted_world: dict[str, Path], tmp_path: Path, option: str, predicate: str,
                                   message: str) -> None:
    out = run(str(planted_world["query"]), "--index", str(planted_world["index"]), "--out", str(tmp_path / "h.parquet"),
              option, predicate, ok=False)
    assert message in out
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("option", ["--cells-where", "--where"])
@pytest.mark.parametrize(
    "predicate",
    [
        "read_csv('/etc/passwd') IS NOT NULL",
        "EXISTS (SELECT * FROM read_csv('/etc/passwd'))",
        "cell_type = (SELECT content FROM read_text('/etc/passwd'))",
        "cell_type = 'x'); COPY (SELECT 1) TO '/tmp/pwned.csv'; SELECT (1",
    ],
)
def test_file_reads_through_predicates_are_refused(planted_world: dict[str, Path], tmp_path: Path, option: str,
                                                   predicate: str) -> None:
    out = run(str(planted_world["query"]), "--index", str(planted_world["index"]), "--out", str(tmp_path / "h.parquet"),
              option, predicate, ok=False)
    assert "root:" not in out and not list(tmp_path.iterdir())


def test_outputs_are_checked_before_any_work(planted_world: dict[str, Path], tmp_path: Path) -> None:
    base = (str(planted_world["query"]), "--index", str(planted_world["index"]))
    assert "parquet or .csv" in run(*base, "--out", str(tmp_path / "hits.txt"), ok=False)
    assert "inside" in run(*base, "--out", str(planted_world["index"] / "hits.parquet"), ok=False)
    raw = tmp_path / "keep.csv"
    raw.write_bytes(planted_world["query"].read_bytes()[:100])  # an .h5ad under a .csv name is not replaced
    assert "not a CSV file" in run(*base, "--out", str(raw), ok=False)
    with pytest.raises(InputError, match="mode must be"):
        search_cells(planted_world["query"], planted_world["index"], mode="nearest",  # type: ignore[arg-type]
                     progress=False)
    with pytest.raises(InputError, match="k must be"):
        search_cells(planted_world["query"], planted_world["index"], k=0, progress=False)


def test_hits_placed_on_the_map(planted_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    res = search_cells(planted_world["query"], planted_world["index"], k=5, cells_where=f"cell_type = '{PLANTED}'",
                       progress=False)
    placed = res.report["map"]
    assert placed["available"] and placed["query_cells_placed"] == res.report["query"]["cells_used"]
    xy, hits_xy = np.asarray(placed["query_xy"]), np.asarray(placed["hits_xy"])
    assert xy.shape == (placed["query_cells_placed"], 2) and hits_xy.shape == (res.report["hits"]["atlas_cells"], 2)
    assert np.isfinite(xy).all() and np.isfinite(hits_xy).all()
    # the planted query cells land among the atlas' planted cells
    with AtlasIndex.open(planted_world["index"]) as idx:
        refmap = idx.reference_map()
        assert refmap is not None
        planted = (idx.cells(refmap.ids, ["cell_type"])["cell_type"] == PLANTED).to_numpy()
    centre = np.median(xy, axis=0)
    to_planted = np.linalg.norm(refmap.coords[planted] - centre, axis=1)
    to_others = np.linalg.norm(refmap.coords[~planted] - centre, axis=1)
    assert np.median(to_planted) < np.quantile(to_others, 0.05)
    monkeypatch.setattr("scatlas.query.search.MAP_POINTS", 10)  # large queries: a sample of cells and hits is placed
    placed = search_cells(planted_world["query"], planted_world["index"], k=5, progress=False).report["map"]
    assert len(placed["query_xy"]) == len(placed["query_rows"]) == 10 and len(placed["hits_xy"]) == 10


def test_a_k_above_the_cells_searched_is_said(planted_world: dict[str, Path], tmp_path: Path) -> None:
    """--where leaves fewer atlas cells than --k: every query cell gets them all, and the summary says k was cut."""
    with AtlasIndex.open(planted_world["index"]) as idx:
        n = len(idx.filter_ids(f"cell_type = '{PLANTED}'"))
    out = run(str(planted_world["query"]), "--index", str(planted_world["index"]), "--out",
              str(tmp_path / "hits.parquet"), "--k", str(n + 50), "--where", f"cell_type = '{PLANTED}'",
              "--cells-where", f"cell_type = '{PLANTED}'")
    assert f"k={n:,} (--k {n + 50:,}, but only {n:,} atlas cells searched)" in out
    hits = pd.read_parquet(tmp_path / "hits.parquet")
    assert hits.groupby("query_cell").size().max() == n


def test_annotate_with_a_truth_column_holding_no_label_says_so(planted_world: dict[str, Path], tmp_path: Path) -> None:
    """(Here for the shared planted atlas.) A --truth-key column that is missing in every cell: nothing is scored,
    and the CLI says so instead of printing n/a figures."""
    adata = anndata.read_h5ad(planted_world["query"])[:80].copy()
    adata.obs["truth"] = pd.Categorical([None] * adata.n_obs, categories=["B cell"])
    adata.write_h5ad(tmp_path / "q.h5ad")
    result = CliRunner().invoke(cli, ["-q", "annotate", str(tmp_path / "q.h5ad"), "--index", str(planted_world["index"]),
                                      "--out", str(tmp_path / "a.h5ad"), "--truth-key", "truth", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "no query cell has a truth label in the --truth-key column" in result.output and "n/a" not in result.output
    assert not (tmp_path / "a.confusion.png").exists() and (tmp_path / "a.h5ad").is_file()
