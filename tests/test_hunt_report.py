"""``hunt report``: default breakdown (atlas label, donor, dataset), all-missing columns left out, the scores plot,
genes up and down against matched non-hits and what they were matched on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

from scatlas.cli import cli
from scatlas.index import build_from_source
from scatlas.query.hunt import report
from scatlas.query.hunt.de import MATCHED, matched_background
from scatlas.query.hunt.report import ReportResult, _markdown, strongest_changes
from tests.test_index_helpers import array_source, config

N = 400


def _cells(ids: np.ndarray) -> pa.Table:
    n = len(ids)
    return pa.table({
        "soma_joinid": np.asarray(ids, dtype=np.int64),
        "cell_type": pa.array(np.array(["A cell", "B cell", "Norn cell", "C cell"])[np.arange(n) % 4], pa.string()),
        "donor_id": pa.array([None] * n, pa.string()),  # missing in every cell
        "dataset_id": pa.array(np.array(["ds0", "ds1"])[np.arange(n) % 2], pa.string()),
        "tissue": pa.array(np.array(["blood", "lung"])[np.arange(n) % 2], pa.string()),
    })


def report_world(root: Path) -> dict[str, Any]:
    """An index of :data:`N` cells (cell table :func:`_cells`) in ``root/idx`` and 60 of its Norn cells as sweep
    hits in ``root/hits.parquet``."""
    src = array_source(N, 8, seed=2)
    build_from_source(src, root / "idx", config(shard_size=400), cells=_cells(src._ids))
    ids = np.asarray(src._ids, dtype=np.int64)
    hit_ids = ids[np.arange(N) % 4 == 2][:60]  # Norn cells
    hits = pd.DataFrame({"soma_joinid": hit_ids, "score": np.linspace(1.0, 4.0, len(hit_ids))})
    hits.to_parquet(root / "hits.parquet")
    return {"root": root, "index": root / "idx", "hits": root / "hits.parquet", "n_hits": len(hit_ids),
            "hit_ids": hit_ids, "ids": ids}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return report_world(tmp_path_factory.mktemp("hunt_report"))


def test_default_breakdown_is_label_donor_dataset_and_all_missing_columns_are_left_out(world, tmp_path):
    res = report(world["hits"], world["index"], tmp_path / "rep", de=False, progress=False)
    assert res.by == ["cell_type", "dataset_id"]  # donor_id is NULL in every cell
    assert res.left_out == {"donor_id": "missing in every cell"}
    assert set(res.enrichment["column"]) == {"cell_type", "dataset_id"}
    assert "(missing)" not in set(res.enrichment["group"])
    norn = res.enrichment[res.enrichment["group"] == "Norn cell"].iloc[0]
    assert norn["n_hits"] == world["n_hits"] and norn["fold"] > 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Left out of the breakdown: donor_id (missing in every cell)" in md
    assert md.index("## By cell_type") < md.index("## By dataset_id")
    assert "donor_id" in (tmp_path / "rep" / "report.html").read_text()
    old = pd.read_csv(tmp_path / "rep" / "enrichment.csv")  # the existing outputs keep their columns
    assert list(old.columns) == ["column", "group", "n_cells", "n_hits", "fraction", "fold", "odds_ratio", "pvalue",
                                 "qvalue"]


def test_the_scores_plot_is_written_atomically(world, tmp_path):
    res = report(world["hits"], world["index"], tmp_path / "rep", by=("tissue", "donor_id"), de=False,
                 progress=False)
    png = tmp_path / "rep" / "scores.png"
    assert res.files["scores_png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "rep").glob(".*.tmp-*"))
    assert res.by == ["tissue"] and "donor_id" in res.left_out  # given columns missing everywhere are left out too
    frame = pd.read_parquet(world["hits"]).drop(columns="score")  # hits without scores: no plot, no error
    res = report(frame, world["index"], tmp_path / "noscore", de=False, progress=False)
    assert "scores_png" not in res.files and (tmp_path / "noscore" / "enrichment.png").is_file()


def test_cli_prints_the_breakdown_and_what_was_left_out(world, tmp_path):
    res = CliRunner().invoke(cli, ["-q", "hunt", "report", str(world["hits"]), "--index", str(world["index"]),
                                   "--out", str(tmp_path / "rep"), "--no-de", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "by cell_type, dataset_id" in res.output and "donor_id (missing in every cell)" in res.output
    assert "cell_type: Norn cell" in res.output and "scores_png:" in res.output


def _de_frame() -> pd.DataFrame:
    rows = [("UPG1", 3.0, 1e-6), ("UPG2", 1.5, 1e-3), ("DOWNG1", -2.5, 1e-5), ("FLAT", 0.1, 0.5)]
    return pd.DataFrame({
        "comparison": MATCHED, "gene_key": [r[0] for r in rows], "gene_symbol": [r[0] for r in rows],
        "feature_id": [r[0] for r in rows], "log2fc": [r[1] for r in rows], "mean_a": 1.0, "mean_b": 1.0,
        "pct_a": 0.5, "pct_b": 0.5, "statistic": 0.0, "auc": 0.5, "pvalue": [r[2] for r in rows],
        "qvalue": [r[2] for r in rows], "n_a": 10, "n_b": 10,
    })


def test_markdown_lists_genes_up_and_down_and_what_non_hits_were_matched_on():
    sentence = "The 10 non-hits are matched to the 10 hits on dataset_id: as many ..."
    res = ReportResult(out_dir="x", n_hits=10, n_cells=100, hit_rate=0.1, enrichment=pd.DataFrame(
        columns=["column", "group", "n_cells", "n_hits", "fraction", "fold", "qvalue"]), de=_de_frame(),
        de_skipped=None, by=[], de_matching=sentence)
    md = _markdown(res, [], "hits.parquet")
    assert sentence in md and "2 up-regulated, 1 down-regulated" in md
    up, down = md.index("Top up-regulated"), md.index("Top down-regulated")
    assert up < md.index("UPG1") < down < md.index("DOWNG1") and "FLAT" not in md


def test_matched_non_hits_say_they_are_matched_on_dataset_or_on_nothing():
    con = duckdb.connect()
    ids = np.arange(40, dtype=np.int64)
    con.register("cells", pa.table({"soma_joinid": ids, "dataset_id": np.array(["a", "b"])[ids % 2]}))
    comp = matched_background(con, ids[:6], 100, seed=0)
    assert comp.matched_on == ("dataset_id",) and "matched to the 6 hits on dataset_id" in comp.matching()
    assert not np.isin(comp.ids_b, ids[:6]).any() and len(comp.ids_b) == 6
    con2 = duckdb.connect()
    con2.register("cells", pa.table({"soma_joinid": ids}))
    comp = matched_background(con2, ids[:6], 100, seed=0)
    assert comp.matched_on == () and "not matched on anything" in comp.matching() and len(comp.ids_b) == 6



def test_with_no_significant_gene_the_strongest_changes_are_shown_as_such():
    de = _de_frame()
    de["qvalue"] = de["pvalue"] = 0.2 + np.arange(len(de)) / 100  # nothing at q < 0.05
    res = ReportResult(out_dir="x", n_hits=10, n_cells=100, hit_rate=0.1, enrichment=pd.DataFrame(
        columns=["column", "group", "n_cells", "n_hits", "fraction", "fold", "qvalue"]), de=de,
        de_skipped=None, by=[], de_matching=None)
    md = _markdown(res, [], "hits.parquet")
    assert "0 genes at q < 0.05" in md and "little power" in md and "not significant" in md
    assert "Top up-regulated" not in md and md.index(str(de["gene_symbol"].iloc[0])) > md.index("little power")
    top = strongest_changes(de, 2)
    assert list(top["gene_symbol"]) == list(de["gene_symbol"].iloc[:2])


def test_a_report_on_filtered_cells_compares_with_those_cells_only(world, tmp_path):
    """The server's hunt `where` filtered the hits but compared them with the whole atlas' group sizes (a false
    enrichment of the groups the filter keeps, and wrong shares); group sizes come from the filtered cells now."""
    last = int(world["hit_ids"][29])  # the first 30 hits, and every cell up to them
    n_inside = int((world["ids"] <= last).sum())
    res = report(world["hits"], world["index"], tmp_path / "rep", de=False, progress=False,
                 where=f"soma_joinid <= {last}")
    assert res.n_hits == 30 and res.n_cells == n_inside
    norn = res.enrichment[(res.enrichment["column"] == "cell_type") & (res.enrichment["group"] == "Norn cell")]
    assert int(norn["n_cells"].iloc[0]) == 30 and float(norn["fraction"].iloc[0]) == 1.0  # 60% of the atlas' Norns
    cli_out = CliRunner().invoke(cli, ["-q", "hunt", "report", str(world["hits"]), "--index", str(world["index"]),
                                       "--out", str(tmp_path / "rep2"), "--no-de", "--no-progress", "--where",
                                       f"soma_joinid <= {last}"])
    assert cli_out.exit_code == 0 and f"30 hits of {n_inside:,} cells" in cli_out.output, cli_out.output
    bad = CliRunner().invoke(cli, ["-q", "hunt", "report", str(world["hits"]), "--index", str(world["index"]),
                                   "--out", str(tmp_path / "rep3"), "--no-de", "--where", "read_csv('/etc/passwd')"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "root:" not in bad.output
