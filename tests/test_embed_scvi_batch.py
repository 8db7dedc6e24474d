"""The scVI embedder's per-cell batch column (``batch_key=COLUMN``) and a Census-style index (``model_dir`` +
``atlas_obsm``: the atlas' precomputed vectors indexed, queries embedded by the pretrained model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

pytest.importorskip("scvi", reason="scvi-tools is not installed (pip install 'scatlas[scvi]'; the test extra has it)")

from scatlas.atlas.chunks import CellChunk, obs_values  # noqa: E402
from scatlas.atlas.embed import load_embedder, make_embedder  # noqa: E402
from scatlas.atlas.embed.base import CellReads  # noqa: E402
from scatlas.atlas.errors import InputError  # noqa: E402
from scatlas.atlas.genes import GeneVocabulary  # noqa: E402
from scatlas.atlas.store import AtlasStore  # noqa: E402
from scatlas.cli import cli  # noqa: E402
from scatlas.index import AtlasIndex, l2_normalize  # noqa: E402
from scatlas.index.embedding import obs_columns  # noqa: E402
from tests.conftest import make_adata  # noqa: E402
from tests.helpers_embed import tiny_scvi_model  # noqa: E402

TINY = {"max_epochs": 3, "n_hvg": 60, "n_latent": 8, "n_hidden": 32, "query_epochs": 2}
TINY_OPTS = [x for k, v in TINY.items() for x in ("--embedder-option", f"{k}={v}")]


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str) -> str:
    result = CliRunner().invoke(cli, ["-q", *args])
    assert result.exit_code == 1 and result.exception is not None, result.output
    return result.output


def chunks(adata, name: str, column: str | None = None, size: int = 100) -> list[CellChunk]:
    """Count chunks of ``adata`` as dataset ``name``, carrying obs ``column`` when given (as readers give it)."""
    genes = GeneVocabulary.from_arrays(adata.var["feature_id"], adata.var["feature_name"])
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    out = []
    for a in range(0, adata.n_obs, size):
        b = min(a + size, adata.n_obs)
        obs = {} if column is None else {column: obs_values(adata.obs[column].iloc[a:b])}
        out.append(CellChunk(ids=np.arange(a, b), X=X[a:b], x_kind="counts", genes=genes, dataset_id=name, obs=obs))
    return out


def embed(emb, parts: list[CellChunk]) -> np.ndarray:
    return np.concatenate([emb.transform(c) for c in parts])


def test_batch_column_fit_transform_and_query_update(tmp_path):
    atlas = make_adata(300, 100, seed=1)
    atlas.obs["plate"] = np.where(np.arange(300) % 2 == 0, "plateA", "plateB")  # every chunk mixes the batches
    emb = make_embedder("scvi", batch_key="plate", **TINY)
    assert emb.obs_columns == ("plate",) and obs_columns(emb) == ("plate",)
    assert emb.reads("atlas") == emb.reads("query") == CellReads(x=True, obs=("plate",))
    assert emb.fingerprint() != make_embedder("scvi", **TINY).fingerprint()  # the batch key changes the vectors

    lacking = atlas.copy()
    lacking.obs["plate"] = lacking.obs["plate"].astype(object)
    lacking.obs.iloc[:5, lacking.obs.columns.get_loc("plate")] = None
    with pytest.raises(InputError, match=r"batch_key='plate': 5 of the 300 atlas cells sampled for the fit have no "
                                         r"value in obs column 'plate'") as err:
        make_embedder("scvi", batch_key="plate", **TINY).fit(chunks(lacking, "d1", "plate"))
    assert "plateA" not in str(err.value) and "d1" not in str(err.value)  # no data values in the message
    with pytest.raises(InputError, match="read without obs column 'plate'"):
        make_embedder("scvi", batch_key="plate", **TINY).fit(chunks(atlas, "d1"))

    parts = chunks(atlas, "d1", "plate")
    emb.fit(parts)
    assert emb.batches == ["plateA", "plateB"] and emb.batch_counts == {"plateA": 150, "plateB": 150}
    whole = embed(emb, parts)
    np.testing.assert_array_equal(embed(emb, chunks(atlas, "d1", "plate", size=7)), whole)  # row-wise
    flipped = atlas.copy()
    flipped.obs["plate"] = np.where(atlas.obs["plate"] == "plateA", "plateB", "plateA")
    assert not np.allclose(embed(emb, chunks(flipped, "d1", "plate")), whole)  # each cell's own batch is used

    # a query without the column: one new batch named after its source, embedded as the reference batch
    query = make_adata(120, 100, seed=3)
    bare = chunks(query, "q1")
    as_reference = chunks(query, "q1")
    as_reference = [CellChunk(c.ids, c.X, c.x_kind, c.genes, dataset_id="q1",
                              obs={"plate": np.full(len(c), emb.reference_batch, dtype=object)}) for c in bare]
    np.testing.assert_array_equal(embed(emb, bare), embed(emb, as_reference))
    record = emb.prepare_query(bare)
    assert record["query_update"] and record["batches"] == ["q1"] and record["cells"] == 120
    emb.reset_query()

    # a query with the column: only its unseen values are updated, cells of known plates keep their vectors
    query.obs["plate"] = np.where(np.arange(120) < 40, "plateA", "plateNew")
    mixed = chunks(query, "q1", "plate", size=50)
    before = embed(emb, mixed)
    record = emb.prepare_query(mixed)
    assert record["batches"] == ["plateNew"] and record["cells"] == 80
    after = embed(emb, mixed)
    np.testing.assert_array_equal(after[:40], before[:40])
    assert not np.allclose(after[40:], before[40:])
    emb.reset_query()

    emb.save(tmp_path / "saved")
    again = load_embedder(tmp_path / "saved")
    assert again.fingerprint() == emb.fingerprint() and again.config.batch_key == "plate"
    assert again.batches == emb.batches and again.batch_counts == emb.batch_counts
    np.testing.assert_array_equal(embed(again, parts), whole)


@pytest.fixture(scope="module")
def donor_atlas(tmp_path_factory) -> Path:
    """Two datasets whose donor_id column is the batch; a third dataset without it, for the refusal."""
    root = tmp_path_factory.mktemp("scvi_donor")
    make_adata(200, 100, seed=1).write_h5ad(root / "a.h5ad")
    make_adata(200, 100, seed=2).write_h5ad(root / "b.h5ad")
    nodonor = make_adata(100, 100, seed=4)
    del nodonor.obs["donor_id"]
    nodonor.write_h5ad(root / "c.h5ad")
    query = make_adata(150, 100, seed=3)
    query.write_h5ad(root / "with_donor.h5ad")
    del query.obs["donor_id"]
    query.write_h5ad(root / "query.h5ad")
    run("ingest", str(root / "a.h5ad"), str(root / "b.h5ad"), "--atlas", str(root / "atlas"), "--no-progress")
    return root


def test_build_with_a_batch_column_and_annotate(donor_atlas):
    root = donor_atlas
    run("build", "--atlas", str(root / "atlas"), "--index", str(root / "index"), "--embedder", "scvi",
        "--embedder-option", "batch_key=donor_id", *TINY_OPTS, "--no-map", "--no-progress")
    store = AtlasStore.open(root / "atlas")
    with AtlasIndex.open(root / "index") as idx:
        emb = idx.embedder
        assert emb.config.batch_key == "donor_id" and emb.batches == ["d1", "d2"]  # make_adata's donors
        ids, stored = zip(*[(i, v) for _, i, v in idx.iter_shards()], strict=True)
        stored_all = np.concatenate(stored).astype(np.float32)[np.argsort(np.concatenate(ids))]
        with_donor = embed(emb, list(store.iter_chunks(chunk_size=128, obs_columns=obs_columns(emb))))
        np.testing.assert_allclose(l2_normalize(with_donor), stored_all, atol=2e-3)  # built with each cell's donor
        by_dataset = embed(emb, list(store.iter_chunks(chunk_size=128)))  # without the column: another batch
        assert not np.allclose(l2_normalize(by_dataset), stored_all, atol=2e-3)

    out = run("annotate", str(root / "query.h5ad"), "--index", str(root / "index"), "--out", str(root / "q.h5ad"),
              "--truth-key", "cell_type", "--no-progress")
    assert "macro-F1" in out
    update = json.loads((root / "q.report.json").read_text())["query_update"]
    assert update["query_update"] is True and update["batches"] == ["query"] and update["cells"] == 150
    run("annotate", str(root / "with_donor.h5ad"), "--index", str(root / "index"), "--out",
        str(root / "w.h5ad"), "--no-progress")
    update = json.loads((root / "w.report.json").read_text())["query_update"]
    assert update == {"query_update": False, "reason": "every cell is of a batch the model knows"}


def test_batch_column_refusals_at_build(donor_atlas, tmp_path):
    root = donor_atlas
    out = fails("build", "--atlas", str(root / "atlas"), "--index", str(tmp_path / "i1"), "--embedder", "scvi",
                "--embedder-option", "batch_key=plate", *TINY_OPTS, "--no-map", "--no-progress")
    assert "no obs column 'plate'" in out
    run("ingest", str(root / "a.h5ad"), str(root / "c.h5ad"), "--atlas", str(tmp_path / "atlas2"), "--no-progress")
    out = fails("build", "--atlas", str(tmp_path / "atlas2"), "--index", str(tmp_path / "i2"), "--embedder", "scvi",
                "--embedder-option", "batch_key=donor_id", *TINY_OPTS, "--no-map", "--no-progress")
    assert "batch_key='donor_id': 100 of the 300 atlas cells sampled for the fit have no value" in out


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> Path:
    """A pretrained scVI model (saved with model.save) and an atlas whose obsm holds its latent means."""
    root = tmp_path_factory.mktemp("scvi_census")
    ref = make_adata(300, 100, seed=5)
    model = tiny_scvi_model(ref, root / "model", epochs=5)
    atlas = make_adata(300, 100, seed=5)
    atlas.obs["batch"] = ref.obs["batch"].to_numpy()
    atlas.obsm["X_scvi"] = model.get_latent_representation(atlas).astype(np.float32)
    atlas.obsm["X_other"] = atlas.obsm["X_scvi"][:, :5].copy()  # another model's width
    del atlas.obs["batch"]
    atlas.write_h5ad(root / "census.h5ad")
    make_adata(150, 100, seed=6).write_h5ad(root / "query.h5ad")
    run("ingest", str(root / "census.h5ad"), "--atlas", str(root / "atlas"), "--no-progress")
    return root


def test_census_index_of_precomputed_vectors_with_the_model_for_queries(census, monkeypatch):
    root = census
    opts = ["--embedder-option", f"model_dir={root / 'model'}", "--embedder-option", "atlas_obsm=X_scvi",
            "--embedder-option", "query_epochs=2"]

    def no_x(*args, **kwargs):
        raise AssertionError("the build read X: atlas_obsm must index the stored vectors")

    monkeypatch.setattr(AtlasStore, "_read_x", no_x)
    run("build", "--atlas", str(root / "atlas"), "--index", str(root / "index"), "--embedder", "scvi", *opts,
        "--no-map", "--no-progress")
    monkeypatch.undo()
    obsm = np.asarray(__import__("anndata").read_h5ad(root / "census.h5ad").obsm["X_scvi"], dtype=np.float32)
    with AtlasIndex.open(root / "index") as idx:
        emb = idx.embedder
        assert idx.dim == 6 and emb.config.atlas_obsm == "X_scvi" and not emb.requires_fit
        assert emb.reads("atlas") == CellReads(x=False, obsm=("X_scvi",)) and emb.reads("query") == CellReads(x=True)
        ids, stored = zip(*[(i, v) for _, i, v in idx.iter_shards()], strict=True)
        stored_all = np.concatenate(stored).astype(np.float32)[np.argsort(np.concatenate(ids))]
        np.testing.assert_allclose(stored_all, l2_normalize(obsm), atol=2e-3)  # the obsm, normalised as always
        # the atlas' counts embedded by the model give the same vectors: the model and its embedding agree
        store = AtlasStore.open(root / "atlas")
        chunk = next(store.iter_chunks(chunk_size=150))
        np.testing.assert_allclose(
            emb.transform(CellChunk(chunk.ids, chunk.X, chunk.x_kind, chunk.genes, dataset_id="b1")),
            obsm[:150], atol=1e-4)

    out = run("annotate", str(root / "query.h5ad"), "--index", str(root / "index"), "--out", str(root / "q.h5ad"),
              "--truth-key", "cell_type", "--no-progress")
    assert "macro-F1" in out
    report = json.loads((root / "q.report.json").read_text())
    assert report["query_update"]["query_update"] is True and report["query_update"]["batches"] == ["query"]
    assert report["evaluation"]["cell_type"]["accuracy"] > 0.5

    out = fails("build", "--atlas", str(root / "atlas"), "--index", str(root / "bad"), "--embedder", "scvi",
                "--embedder-option", f"model_dir={root / 'model'}", "--embedder-option", "atlas_obsm=X_other",
                "--no-map", "--no-progress")
    assert "obsm['X_other'] has 5 dimensions but the scVI model's latent space has 6" in out


def test_batch_column_on_real_data(shared_raw, tmp_path):
    """kang2018 as one atlas dataset with its `sample` column (CTRL/STIM) as scVI's batch: the model is fitted on
    both batches, and a query holding only STIM cells, with that column, is embedded as the batch the model knows
    (no query update: every cell is of a known batch)."""
    import anndata

    adata = anndata.read_h5ad(shared_raw / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    adata.write_h5ad(tmp_path / "kang.h5ad")
    stim = adata[adata.obs["sample"] == "STIM"][:300].copy()
    stim.write_h5ad(tmp_path / "stim.h5ad")
    run("ingest", str(tmp_path / "kang.h5ad"), "--atlas", str(tmp_path / "atlas"), "--no-progress")
    opts = ["--embedder-option", "batch_key=sample", "--embedder-option", "max_epochs=2",
            "--embedder-option", "n_hvg=300", "--embedder-option", "n_latent=8"]
    run("build", "--atlas", str(tmp_path / "atlas"), "--index", str(tmp_path / "index"), "--embedder", "scvi",
        *opts, "--no-map", "--no-progress")
    with AtlasIndex.open(tmp_path / "index") as idx:
        assert sorted(idx.embedder.batch_counts) == ["CTRL", "STIM"]  # type: ignore[attr-defined]
    out = run("annotate", str(tmp_path / "stim.h5ad"), "--index", str(tmp_path / "index"), "--out",
              str(tmp_path / "q.h5ad"), "--no-progress")
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["query_update"] == {"query_update": False, "reason": "every cell is of a batch the model knows"}
    assert "query update: none (every cell is of a batch the model knows)" in out
