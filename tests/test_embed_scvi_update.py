"""``build --update`` on an scVI index: a dataset added to the atlas is embedded by the saved model as a batch it has
not seen (no retraining: the embedder's fingerprint is unchanged) and its cells are found by search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("scvi", reason="scvi-tools is not installed (pip install 'scatlas[scvi]'; the test extra has it)")

from scatlas.atlas.chunks import CellChunk  # noqa: E402
from scatlas.atlas.genes import GeneVocabulary  # noqa: E402
from scatlas.cli import cli  # noqa: E402
from scatlas.index import AtlasIndex, l2_normalize  # noqa: E402
from tests.conftest import make_adata  # noqa: E402

TINY = {"max_epochs": 3, "n_hvg": 60, "n_latent": 8, "n_hidden": 32}


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_update_embeds_an_added_dataset_with_the_saved_model(tmp_path: Path):
    for i, name in enumerate(["d1", "d2"]):
        make_adata(250, 100, seed=i + 1, prefix=f"{name}_").write_h5ad(tmp_path / f"{name}.h5ad")
    atlas, index = tmp_path / "atlas", tmp_path / "index"
    run("ingest", str(tmp_path / "d1.h5ad"), "--atlas", str(atlas), "--no-progress")
    opts = [x for k, v in TINY.items() for x in ("--embedder-option", f"{k}={v}")]
    run("build", "--atlas", str(atlas), "--index", str(index), "--embedder", "scvi", *opts, "--no-progress")
    with AtlasIndex.open(index) as idx:
        before = idx.manifest.embedder.fingerprint
        batches = dict(idx.embedder.batch_counts)  # type: ignore[attr-defined]

    run("ingest", str(tmp_path / "d2.h5ad"), "--atlas", str(atlas), "--no-progress")
    out = run("build", "--atlas", str(atlas), "--index", str(index), "--update", "--max-far-fraction", "1",
              "--no-progress")
    assert "version 2" in out

    with AtlasIndex.open(index) as idx:
        assert idx.manifest.version == 2 and idx.n_cells == 500
        assert idx.manifest.embedder.fingerprint == before  # the saved model, not a new fit
        assert dict(idx.embedder.batch_counts) == batches  # type: ignore[attr-defined]
        with idx.cursor() as con:
            d2 = np.array([r[0] for r in con.execute(
                "SELECT soma_joinid FROM cells WHERE dataset_id = 'd2' ORDER BY 1").fetchall()])
        assert len(d2) == 250
        # d2's stored vectors are the saved model's embedding of its counts, as the unseen batch 'd2'
        adata = make_adata(250, 100, seed=2, prefix="d2_")
        genes = GeneVocabulary.from_arrays(adata.var["feature_id"], adata.var["feature_name"])
        import scipy.sparse as sp

        chunk = CellChunk(ids=d2, X=sp.csr_matrix(adata.X, dtype=np.float32), x_kind="counts", genes=genes,
                          dataset_id="d2")
        expected = l2_normalize(idx.embedder.transform(chunk))
        np.testing.assert_allclose(idx.vectors(d2), expected, atol=2e-3)  # stored as float16
        hits = idx.search(idx.vectors(d2[:30]), k=1)
        assert (hits.ids[:, 0] == d2[:30]).mean() > 0.9


def test_hunt_on_an_scvi_index(tmp_path: Path):
    """hunt train (labelled cells embedded by the saved model, with the query update of their batch) and hunt sweep
    run on an scVI index through the CLI, and the sweep finds the trained type among the atlas' cells."""
    for i, name in enumerate(["d1", "d2", "labelled"]):
        make_adata(250, 100, seed=i + 1, prefix=f"{name}_").write_h5ad(tmp_path / f"{name}.h5ad")
    atlas, index = tmp_path / "atlas", tmp_path / "index"
    run("ingest", str(tmp_path / "d1.h5ad"), str(tmp_path / "d2.h5ad"), "--atlas", str(atlas), "--no-progress")
    opts = [x for k, v in TINY.items() for x in ("--embedder-option", f"{k}={v}")]
    run("build", "--atlas", str(atlas), "--index", str(index), "--embedder", "scvi", *opts, "--no-progress")
    out = run("hunt", "train", "--index", str(index), "--cells", str(tmp_path / "labelled.h5ad"),
              "--positive", "cell_type = 'B cell'", "--out", str(tmp_path / "clf"), "--background", "200",
              "--no-progress")
    assert "positives" in out
    run("hunt", "sweep", "--index", str(index), "--classifier", str(tmp_path / "clf"), "--out",
        str(tmp_path / "sweep"), "--no-progress")
    import pandas as pd

    hits = pd.read_parquet(next((tmp_path / "sweep").glob("hits*.parquet")))
    assert len(hits) > 0
    with AtlasIndex.open(index) as idx:
        types = idx.cells(hits["soma_joinid"].to_numpy(), columns=["cell_type"])["cell_type"]
    assert (types == "B cell").mean() > 0.8  # three planted types: the hits are the trained one
