"""One run's outputs replace an earlier run's together or not at all (query.outputs.published_together)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import anndata
import pytest

from scatlas.atlas import ingest
from scatlas.index import build_index
from scatlas.query import annotate
from scatlas.query.outputs import atomic_path, published_together, write_json
from tests.conftest import make_adata


def _run(path: Path) -> Any:
    return json.loads(path.read_text())["run"]


def test_files_appear_together_or_not_at_all(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.json"
    write_json({"run": 1}, a)
    with pytest.raises(KeyboardInterrupt), published_together():
        write_json({"run": 2}, a)
        assert _run(a) == 1  # not yet in place
        with atomic_path(b, file_kind="json") as tmp:
            tmp.write_text("{}")
        raise KeyboardInterrupt
    assert _run(a) == 1 and not b.exists()
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary files are removed"
    with published_together():
        write_json({"run": 3}, a)
        write_json({"run": 3}, b)
    assert _run(a) == _run(b) == 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("together")
    make_adata(400, 60, seed=1, prefix="a").write_h5ad(root / "atlas.h5ad")
    ingest([root / "atlas.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 40, "n_components": 8}, progress=False)
    q = make_adata(80, 60, seed=2, prefix="q")
    return {"index": root / "index", "query": q, "root": root}


def test_an_annotation_interrupted_while_writing_leaves_the_earlier_outputs(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = world["root"] / "out"
    paths = {"out_h5ad": out / "q.h5ad", "neighbors_parquet": out / "q.neighbors.parquet",
             "report_json": out / "q.report.json"}
    res = annotate(world["query"], world["index"], progress=False)
    res.write(**paths)
    before = {k: p.read_bytes() for k, p in paths.items()}
    again = annotate(world["query"], world["index"], progress=False, k=5)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    module = importlib.import_module("scatlas.query.annotate")  # the module (the package exports the function)
    monkeypatch.setattr(module, "write_json", interrupted)  # the report, written after the h5ad and table
    with pytest.raises(KeyboardInterrupt):
        again.write(**paths)
    assert {k: p.read_bytes() for k, p in paths.items()} == before, "the earlier run's outputs stay, all of them"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())
    monkeypatch.undo()
    again.write(**paths)
    assert json.loads(paths["report_json"].read_text())["params"]["k"] == 5
    assert anndata.read_h5ad(paths["out_h5ad"]).n_obs == world["query"].n_obs


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path: Path) -> None:
    """Labels and cell names come from data: in a CSV, text beginning with = + - @ (a formula in a spreadsheet) gets a
    leading ' (numbers stay numbers); Parquet keeps every value as it is."""
    import pandas as pd

    from scatlas.query.outputs import write_table

    frame = pd.DataFrame({"query_cell": ["=HYPERLINK(\"http://x\")", "cell1", "@SUM(1)"], "rank": [-1, 0, 1],
                          "label": pd.Categorical(["+A", "B", "-C"])})
    back = pd.read_csv(write_table(frame, tmp_path / "t.csv"), keep_default_na=False)
    assert back["query_cell"].tolist() == ["'=HYPERLINK(\"http://x\")", "cell1", "'@SUM(1)"]
    assert back["label"].tolist() == ["'+A", "B", "'-C"] and back["rank"].tolist() == [-1, 0, 1]
    kept = pd.read_parquet(write_table(frame, tmp_path / "t.parquet"))
    assert kept["query_cell"].tolist() == frame["query_cell"].tolist()
