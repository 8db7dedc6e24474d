"""The scVI embedder (scvi-tools): a tiny model trained through `scatlas build`, annotate against it, deterministic
atlas vectors, save/load and pretrained-model round trips, the query update, and what it refuses."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("scvi", reason="scvi-tools is not installed (pip install 'scatlas[scvi]'; the test extra has it)")

from click.testing import CliRunner  # noqa: E402

from scatlas.atlas.chunks import CellChunk  # noqa: E402
from scatlas.atlas.embed import load_embedder, make_embedder  # noqa: E402
from scatlas.atlas.errors import InputError, StoreError  # noqa: E402
from scatlas.atlas.genes import GeneVocabulary  # noqa: E402
from scatlas.atlas.store import AtlasStore  # noqa: E402
from scatlas.cli import cli  # noqa: E402
from scatlas.index import AtlasIndex, l2_normalize  # noqa: E402
from tests.conftest import make_adata, run_cli  # noqa: E402
from tests.helpers_embed import tiny_scvi_model  # noqa: E402

TINY = {"max_epochs": 3, "n_hvg": 60, "n_latent": 8, "n_hidden": 32, "query_epochs": 2}


def chunks(adata, name: str, size: int = 100, kind: str = "counts") -> list[CellChunk]:
    genes = GeneVocabulary.from_arrays(adata.var["feature_id"], adata.var["feature_name"])
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    if kind == "lognorm":
        X = X.copy()
        X.data = np.log1p(X.data)
    return [CellChunk(ids=np.arange(a, min(a + size, adata.n_obs)), X=X[a : a + size], x_kind=kind, genes=genes,
                      dataset_id=name) for a in range(0, adata.n_obs, size)]


def embed(emb, parts: list[CellChunk]) -> np.ndarray:
    return np.concatenate([emb.transform(c) for c in parts])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Two atlas datasets and a query (make_adata: planted cell-type programs), ingested and indexed with scvi."""
    root = tmp_path_factory.mktemp("scvi")
    for i, name in enumerate(["d1", "d2", "query"]):
        make_adata(300 if name != "query" else 150, 100, seed=i + 1).write_h5ad(root / f"{name}.h5ad")
    run_cli("ingest", str(root / "d1.h5ad"), str(root / "d2.h5ad"), "--atlas", str(root / "atlas"), "--no-progress")
    opts = [x for k, v in TINY.items() for x in ("--embedder-option", f"{k}={v}")]
    out = run_cli("build", "--atlas", str(root / "atlas"), "--index", str(root / "index"), "--embedder", "scvi", *opts,
              "--shard-size", "250", "--no-progress")
    assert "shard(s)" in out
    return root


def test_build_with_scvi_and_annotate(built):
    info = json.loads(run_cli("info", str(built / "index"), "--json"))
    assert info["embedder"] == "scvi" and info["dim"] == TINY["n_latent"]
    assert info["label_heads"]["cell_type"]["features"] == ["embedding"]  # no gene features: the embedding head
    saved = json.loads((built / "index" / "embedder" / "embedder.json").read_text())
    assert saved["params"]["max_epochs"] == 3 and saved["params"]["batch_key"] == "dataset_id"
    assert (built / "index" / "embedder" / "scvi_model" / "model.pt").is_file()
    out = run_cli("annotate", str(built / "query.h5ad"), "--index", str(built / "index"), "--out", str(built / "q.h5ad"),
              "--truth-key", "cell_type", "--no-progress")
    assert "macro-F1" in out
    report = json.loads((built / "q.report.json").read_text())
    assert report["evaluation"]["cell_type"]["accuracy"] > 0.5  # three planted types, a 3-epoch model
    update = report["query_update"]  # the query's dataset is a batch the model has not seen: updated, and said so
    assert update["query_update"] is True and update["cells"] == 150 and update["batches"] == ["query"]
    assert "query update: the embedder adapted to the query's 150 cells of 1 batch(es)" in out


def test_atlas_cells_embed_as_at_build(built):
    """The index's own cells: the loaded embedder gives the stored vectors, the same on every call and chunking."""
    store = AtlasStore.open(built / "atlas")
    with AtlasIndex.open(built / "index") as idx:
        emb = idx.embedder
        assert sorted(emb.batches) == ["d1", "d2"]
        first = embed(emb, list(store.iter_chunks(chunk_size=128)))
        again = embed(emb, list(store.iter_chunks(chunk_size=500)))
        np.testing.assert_array_equal(first, again)
        ids, stored = zip(*[(i, v) for _, i, v in idx.iter_shards()], strict=True)
        order = np.argsort(np.concatenate(ids))
        stored_all = np.concatenate(stored).astype(np.float32)[order]
        np.testing.assert_allclose(l2_normalize(first), stored_all, atol=2e-3)  # float16 storage


def test_save_load_round_trip(built, tmp_path):
    emb = load_embedder(built / "index" / "embedder")
    emb.save(tmp_path / "copy")
    again = load_embedder(tmp_path / "copy")
    assert again.fingerprint() == emb.fingerprint()
    parts = chunks(make_adata(120, 100, seed=1), "d1")
    np.testing.assert_array_equal(embed(emb, parts), embed(again, parts))
    shipped = pickle.loads(pickle.dumps(emb))  # as a Ray worker gets it: the model travels as its saved files
    assert shipped.fingerprint() == emb.fingerprint()
    np.testing.assert_array_equal(embed(shipped, parts), embed(emb, parts))


def test_query_update_moves_only_the_unseen_batch(built):
    emb = load_embedder(built / "index" / "embedder")
    atlas = chunks(make_adata(120, 100, seed=1), "d1")
    query = chunks(make_adata(150, 100, seed=3), "query")
    before_atlas, before = embed(emb, atlas), embed(emb, query)  # encoder alone, as the largest batch
    record = emb.prepare_query(query)
    assert record["query_update"] and record["batches"] == ["query"] and record["cells"] == 150
    assert record["epochs"] == 2 and record["seconds"] >= 0
    after = embed(emb, query)
    assert not np.allclose(after, before)  # the query's batch parameters were trained
    np.testing.assert_array_equal(embed(emb, query), after)  # no retraining per chunk
    np.testing.assert_array_equal(embed(emb, atlas), before_atlas)  # known batches untouched
    emb.reset_query()
    np.testing.assert_array_equal(embed(emb, query), before)
    off = make_embedder("scvi", query_update=False, **{k: v for k, v in TINY.items() if k != "query_update"})
    off.model, off.info, off.vocab = emb.model, emb.info, emb.vocab
    assert off.prepare_query(query) == {"query_update": False, "reason": "query_update=false"}


def test_pretrained_model_dir_round_trip(tmp_path):
    adata = make_adata(200, 80, seed=5)
    model = tiny_scvi_model(adata, tmp_path / "pretrained")
    expected = model.get_latent_representation(adata)

    emb = make_embedder("scvi", model_dir=str(tmp_path / "pretrained"))
    assert not emb.requires_fit and emb.is_fitted and emb.dim == 6
    assert list(emb.genes.keys) == list(adata.var_names)  # the model's var names (Ensembl ids) are the genes
    assert emb.batches == ["b1", "b2"] and emb.reference_batch == "b1"
    vocab = GeneVocabulary.from_arrays(adata.var["feature_id"], adata.var["feature_name"])
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    got = np.concatenate([emb.transform(CellChunk(ids=np.arange(a, a + 100), X=X[a : a + 100], x_kind="counts",
                                                  genes=vocab, dataset_id=b)) for a, b in ((0, "b1"), (100, "b2"))])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # genes are matched as for PCA (Ensembl id first, then symbol), in any order; the overlap is reported.
    # A model whose var names are Ensembl ids (the Census') has no symbols: symbol-only data matches nothing.
    part = GeneVocabulary.from_arrays(adata.var["feature_id"][::-1][:60], [""] * 60)
    assert emb.gene_match(part).n_matched == 60 and emb.gene_match(part).fraction_of_target == 0.75
    assert emb.gene_match(GeneVocabulary.from_identifiers(list(adata.var["feature_name"]))).n_matched == 0
    emb.save(tmp_path / "saved")
    again = load_embedder(tmp_path / "saved")
    assert again.fingerprint() == emb.fingerprint() and not again.requires_fit
    np.testing.assert_array_equal(again.transform(CellChunk(ids=np.arange(100), X=X[:100], x_kind="counts",
                                                            genes=vocab, dataset_id="b1")), got[:100])


def test_refuses_what_scvi_cannot_read():
    emb = make_embedder("scvi", **TINY)
    with pytest.raises(InputError, match="raw counts.*'lognorm'"):
        emb.fit(chunks(make_adata(100, 60), "d1", kind="lognorm"))
    with pytest.raises(InputError, match="batch_key must be 'dataset_id', 'none' or an obs column name"):
        make_embedder("scvi", batch_key=" ")
    with pytest.raises(InputError, match="atlas_obsm needs model_dir"):
        make_embedder("scvi", atlas_obsm="X_scvi")
    with pytest.raises(InputError, match="max_epochs"):
        make_embedder("scvi", max_epochs=0)
    with pytest.raises(InputError, match="not fitted"):
        emb.transform(chunks(make_adata(10, 60), "d1")[0])


def test_refuses_lognorm_query(built):
    emb = load_embedder(built / "index" / "embedder")
    with pytest.raises(InputError, match="raw counts"):
        emb.transform(chunks(make_adata(20, 100), "query", kind="lognorm")[0])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a crafted model.pt carries: a call to run on loading
        import os

        return (os.system, (f"touch {self.marker}",))


def test_an_index_whose_model_file_carries_code_is_refused_unrun(built, tmp_path):
    """scvi-tools loads model.pt with torch.load(weights_only=False): a crafted index ran code on `scatlas info`.
    The file's pickle is checked first; only weights and settings pass."""
    import hashlib
    import shutil

    import torch

    from scatlas.atlas.embed.safe_load import check_pickled_names

    index = tmp_path / "index"
    shutil.copytree(built / "index", index)
    model = index / "embedder" / "scvi_model" / "model.pt"
    check_pickled_names(model, "the model")  # scvi-tools' own file passes
    marker = tmp_path / "PWNED"
    # a pickle before a clean archive: zip readers find the archive, torch.load unpickles the front (found by a
    # retest of the first version of this check)
    polyglot = tmp_path / "polyglot.pt"
    polyglot.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2) + model.read_bytes())
    with pytest.raises(StoreError, match="not a PyTorch model file in its zip format"):
        check_pickled_names(polyglot, "the model")
    # an archive with a constants.pkl record: torch.load hands it to TorchScript, which runs the archive's code
    # while data.pkl looks plain (found by a review of the second version)
    scripted = tmp_path / "scripted.pt"
    writer = torch._C.PyTorchFileWriter(str(scripted))
    for name, payload in (("data.pkl", pickle.dumps({"attr_dict": {}}, protocol=2)),
                          ("constants.pkl", pickle.dumps((), protocol=2))):
        writer.write_record(name, payload, len(payload))
    writer.write_end_of_file()
    del writer
    with pytest.raises(StoreError, match="records torch.save does not write, e.g. 'constants.pkl'"):
        check_pickled_names(scripted, "the model")
    torch.save({"attr_dict": _RunsCode(marker), "model_state_dict": {}}, model)
    manifest = json.loads((index / "manifest.json").read_text())

    def mend(node):  # the attacker rewrites the manifest's size and checksum too
        for key, value in node.items():
            if key.endswith("scvi_model/model.pt") and isinstance(value, dict):
                value.update(bytes=model.stat().st_size, sha256=hashlib.sha256(model.read_bytes()).hexdigest())
            elif isinstance(value, dict):
                mend(value)

    mend(manifest)
    (index / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(cli, ["-q", "search", str(built / "query.h5ad"), "--index", str(index), "--out",
                                   str(tmp_path / "hits.csv")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "names 'posix.system'" in res.output and "could run code" in res.output, res.output
    with pytest.raises(StoreError, match="could run code"):
        load_embedder(index / "embedder")
    assert not marker.exists()


def test_training_stops_at_the_next_epoch_when_its_thread_is_interrupted():
    """A lab server's cancel reaches scVI training at its next epoch (it waited for the whole query update)."""
    from scatlas.atlas.errors import Interrupted
    from scatlas.atlas.interrupt import set_interrupt_check

    calls = []

    def check() -> None:
        calls.append(1)
        raise Interrupted("the job was cancelled")

    emb = make_embedder("scvi", **{**TINY, "max_epochs": 50})
    set_interrupt_check(check)
    try:
        with pytest.raises(Interrupted):
            emb.fit(chunks(make_adata(200, 100, seed=7), "d1"))
    finally:
        set_interrupt_check(None)
    assert len(calls) == 1  # stopped at the first epoch's end, not after 50
