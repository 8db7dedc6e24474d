"""Atlas columns written beside a command's own (search hits, sweep hits) keep their names unless they clash with
one of the command's, ignoring case: then they are prefixed, never dropped or shadowing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scatlas.atlas import ingest
from scatlas.atlas.validate import beside
from scatlas.index import AtlasIndex, BuildConfig, build_index
from scatlas.query.hunt import sweep, train
from scatlas.query.search import search_cells
from tests.conftest import make_adata


def test_clashing_names_are_prefixed_until_free():
    got = beside(["cell_type", "Similarity", "atlas_similarity", "score"], ["similarity", "rank"])
    assert got == {"cell_type": "cell_type", "Similarity": "atlas_Similarity",
                   "atlas_similarity": "atlas_atlas_similarity", "score": "score"}


def test_search_and_sweep_hits_keep_an_atlas_column_named_like_their_own(tmp_path: Path):
    adata = make_adata(200, 60, seed=1)
    adata.obs["Similarity"] = "atlas value"
    adata.obs["query_row"] = 7
    adata.obs["Score"] = "atlas score"
    adata.write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", embedder_options={"n_hvg": 50, "n_components": 8},
                label_keys=(), progress=False, config=BuildConfig(eval_queries=50, calibration_cells=100))
    with AtlasIndex.open(tmp_path / "index") as idx:
        hits = search_cells(make_adata(5, 60, seed=2), idx, k=3, progress=False).hits
    assert hits["similarity"].dtype.kind == "f" and hits["query_row"].tolist() == sorted(hits["query_row"])
    assert set(hits["atlas_Similarity"]) == {"atlas value"} and set(hits["atlas_query_row"]) == {7}
    clf = train(tmp_path / "index", positive_sql="cell_type = 'B cell'", background=100, progress=False,
                two_stage=False)
    swept = pd.read_parquet(sweep(tmp_path / "index", clf, tmp_path / "sweep", progress=False).hits_path)
    assert swept["score"].dtype.kind == "f" and set(swept["atlas_Score"]) == {"atlas score"}
