"""The whole job through the command line: synth -> ingest -> build -> info -> annotate -> hunt, and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.cli import cli
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_pipeline")
    run_cli("synth", "--out", str(root / "h5ad"), "--cells", "3000", "--genes", "300", "--datasets", "3",
        "--rare", "norn cell=0.04@0,1,2", "--absent", "fibroblast=0,1", "--no-progress")
    files = sorted((root / "h5ad").glob("*.h5ad"))
    run_cli("ingest", *map(str, files[:2]), "--atlas", str(root / "atlas"), "--no-progress")
    return root


def test_build_and_info(pipeline):
    out = run_cli("build", "--atlas", str(pipeline / "atlas"), "--index", str(pipeline / "index"), "--shard-size", "700",
              "--embedder-option", "n_components=20", "--fit-sample", "2000")
    assert "recall@30" in out and "shard(s)" in out
    assert "label heads" in out and "cell_type:" in out  # trained by default: the atlas has cell_type labels
    info = json.loads(run_cli("info", str(pipeline / "index"), "--json"))
    assert info["dim"] == 20 and info["shards"] >= 2 and info["recall"] > 0.95
    assert info["label_heads"]["cell_type"]["features"] == ["embedding", "genes"]
    # rerunning the same build resumes (nothing to do) and keeps the index
    run_cli("build", "--atlas", str(pipeline / "atlas"), "--index", str(pipeline / "index"), "--shard-size", "700",
        "--embedder-option", "n_components=20", "--fit-sample", "2000")


def test_annotate_cli(pipeline):
    if not (pipeline / "index" / "manifest.json").exists():
        test_build_and_info(pipeline)
    query = sorted((pipeline / "h5ad").glob("*.h5ad"))[-1]
    before = query.read_bytes()
    # the settings for a query that may hold types the atlas lacks (fibroblasts are held out of it)
    out = run_cli("annotate", str(query), "--index", str(pipeline / "index"), "--out", str(pipeline / "q.h5ad"),
              "--truth-key", "cell_type", "--min-confidence", "0.5", "--far-quantile", "0.001", "--no-progress")
    assert "macro-F1" in out
    params = json.loads((pipeline / "q.report.json").read_text())["params"]
    assert params["min_confidence"] == {"cell_type": 0.5} and params["far_quantile"] == 0.001
    assert query.read_bytes() == before  # input never modified
    annotated = anndata.read_h5ad(pipeline / "q.h5ad")
    assert {"cell_type_pred", "cell_type_confidence", "cell_type_unknown_reason"} <= set(annotated.obs.columns)
    assert (pipeline / "q.neighbors.parquet").is_file() and (pipeline / "q.report.json").is_file()
    assert (pipeline / "q.confusion.png").is_file()
    fib = annotated.obs["cell_type"] == "fibroblast"
    assert (annotated.obs.loc[fib, "cell_type_pred"] == "unknown").mean() > 0.5


def test_hunt_cli(pipeline):
    if not (pipeline / "index" / "manifest.json").exists():
        test_build_and_info(pipeline)
    query = sorted((pipeline / "h5ad").glob("*.h5ad"))[-1]
    idx = str(pipeline / "index")
    out = run_cli("hunt", "train", "--index", idx, "--cells", str(query), "--positive", "cell_type == 'norn cell'",
              "--out", str(pipeline / "clf"), "--background", "1000", "--no-progress")
    assert "threshold" in out
    out = run_cli("hunt", "sweep", "--index", idx, "--classifier", str(pipeline / "clf"), "--out", str(pipeline / "sweep"),
              "--no-progress")
    assert "hits" in out and "GB/s" in out
    hits = pd.read_parquet(pipeline / "sweep" / "hits.parquet")
    assert len(hits) > 0 and "dataset_id" in hits.columns
    assert not hits["training_positive"].any() and "trained on" not in out  # the labelled file is not in the atlas
    out = run_cli("hunt", "report", str(pipeline / "sweep" / "hits.parquet"), "--index", idx, "--out", str(pipeline / "rep"))
    assert (pipeline / "rep" / "enrichment.csv").is_file()
    # atlas cells as positives: every one is a training cell, and the sweep and report say how many hits are new
    out = run_cli("hunt", "train", "--index", idx, "--positive-sql", "cell_type = 'norn cell'", "--out",
                  str(pipeline / "clf_sql"), "--background", "1000", "--stages", "1", "--no-progress")
    counts = next(line for line in out.splitlines() if line.startswith("classifier "))
    assert "positives from atlas" in counts and "background from labelled otherwise" not in counts  # not the 0/1 flag
    out = run_cli("hunt", "sweep", "--index", idx, "--classifier", str(pipeline / "clf_sql"), "--out",
                  str(pipeline / "sweep_sql"), "--no-progress")
    hits = pd.read_parquet(pipeline / "sweep_sql" / "hits.parquet")
    trained = hits["training_positive"]
    assert trained.any() and (hits.loc[trained, "cell_type"] == "norn cell").all()
    assert f"{int(trained.sum()):,} of the hits are cells the classifier was trained on" in out
    out = run_cli("hunt", "report", str(pipeline / "sweep_sql"), "--index", idx, "--out", str(pipeline / "rep_sql"),
                  "--no-de")
    assert f"{len(hits) - int(trained.sum()):,} are not" in out


def test_cli_errors_for_bad_index_and_query(pipeline, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    empty = tmp_path / "empty.h5ad"
    anndata.read_h5ad(sorted((pipeline / "h5ad").glob("*.h5ad"))[-1])[:0].copy().write_h5ad(empty)
    if not (pipeline / "index" / "manifest.json").exists():
        test_build_and_info(pipeline)
    result = runner.invoke(cli, ["annotate", str(empty), "--index", str(pipeline / "index"), "--out", str(tmp_path / "o.h5ad")])
    assert result.exit_code == 1 and "Error: " in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = run_cli("demo", "--out", str(tmp_path / "demo"), "--cells", "4000", "--no-progress")
    for stage in ("synthesise", "ingest", "build", "annotate", "hunt"):
        assert f"== {stage}" in out
    assert (tmp_path / "demo" / "query.annotated.h5ad").is_file()
    assert (tmp_path / "demo" / "hunt" / "report" / "enrichment.csv").is_file()
