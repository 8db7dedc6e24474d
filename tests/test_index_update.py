"""``build --update``: an index follows its atlas store (datasets added, removed, relabelled) without a rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.embed import load_embedder
from scatlas.atlas.errors import InputError
from scatlas.atlas.store import AtlasStore
from scatlas.cli import cli
from scatlas.index import AtlasIndex, BuildConfig, build_from_source, build_index, update_index, verify_index
from scatlas.index.changes import identity_changes, store_changes
from scatlas.index.store_source import StoreVectorSource, committed_cells
from scatlas.index.versions import CURRENT_FILE, current_version
from tests.conftest import make_adata

BUILD = dict(embedder="pca", shard_size=150, factory="auto", fit_sample=400, seed=0,
             embedder_options={"n_components": 10, "n_hvg": 50}, progress=False)


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, ["-q", *args])
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def _write(tmp: Path, name: str, seed: int, n: int = 300, **kw) -> Path:
    path = tmp / f"{name}.h5ad"
    make_adata(n_cells=n, n_genes=80, seed=seed, prefix=f"{name}_", **kw).write_h5ad(path)
    return path


@pytest.fixture
def store_ab(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Store with dataset A, and B's file ready to ingest."""
    a, b = _write(tmp_path, "A", 1), _write(tmp_path, "B", 2, n=250)
    ingest([a], tmp_path / "atlas", progress=False)
    return tmp_path / "atlas", b, tmp_path


def _ids_of(index: Path, dataset: str) -> np.ndarray:
    with AtlasIndex.open(index) as idx, idx.cursor() as con:
        return np.array([r[0] for r in con.execute(
            "SELECT soma_joinid FROM cells WHERE dataset_id = ? ORDER BY 1", [dataset]).fetchall()])


def _all_ids(index: Path) -> np.ndarray:
    with AtlasIndex.open(index) as idx:
        return np.sort(np.concatenate([ids for _, ids, _ in idx.iter_shards()]))


def test_update_adds_a_dataset_and_equals_a_fresh_build(store_ab):
    atlas, b, tmp = store_ab
    index = tmp / "index"
    first = build_index(atlas, index, **BUILD)
    assert first.exact and first.version == 1
    ingest([b], atlas, progress=False)
    report = update_index(atlas, index, progress=False)
    assert report.version == 2 and [d.dataset_id for d in report.changes.added] == ["B"]
    assert report.drift is not None and not report.drift.too_far
    assert current_version(index)[0] == 2
    with AtlasIndex.open(index) as idx:
        m = idx.manifest
        assert m.version == 2 and m.embedder.fingerprint == first.embedder.fingerprint
        assert m.n_cells == 550 and m.updates[-1]["added"] == ["B"]
        assert sorted(idx.label_heads()) == ["cell_type"]  # heads made anew for the new version
        # B's cells are found by search: each finds itself first
        b_ids = _ids_of(index, "B")
        assert len(b_ids) == 250
        res = idx.search(idx.vectors(b_ids[:40]), k=1)
        assert (res.ids[:, 0] == b_ids[:40]).mean() > 0.95
    # the same as a fresh build over A+B with the index's embedder, in cell ids and (exact index) search results
    store = AtlasStore.open(atlas)
    emb = load_embedder(current_version(index)[1] / "embedder")
    fresh = tmp / "fresh"
    build_from_source(StoreVectorSource(store, emb), fresh, BuildConfig(factory="auto", shard_size=150),
                      cells=committed_cells(store), embedder=emb)
    assert np.array_equal(_all_ids(index), _all_ids(fresh))
    with AtlasIndex.open(index) as u, AtlasIndex.open(fresh) as f:
        q = f.vectors(_all_ids(fresh)[::7])
        ru, rf = u.search(q, k=10), f.search(q, k=10)
        np.testing.assert_allclose(ru.scores, rf.scores, atol=1e-6)
        ties = np.isclose(ru.scores[:, :, None], rf.scores[:, None, :], atol=1e-6)
        same = (ru.ids[:, :, None] == rf.ids[:, None, :]) | ~ties
        assert ((ru.ids == rf.ids) | same.any(axis=2)).all()
    # nothing changed: nothing to do; a plain build says the index is up to date
    assert update_index(atlas, index, progress=False).up_to_date
    assert build_index(atlas, index, **BUILD).version == 2


def test_plain_build_says_the_atlas_gained_a_dataset(store_ab):
    atlas, b, tmp = store_ab
    build_index(atlas, tmp / "index", **BUILD)
    ingest([b], atlas, progress=False)
    with pytest.raises(InputError) as err:
        build_index(atlas, tmp / "index", **BUILD)
    text = str(err.value)
    assert "gained 1 dataset(s) (250 cells): 'B'" in text and "build --update" in text
    assert "{" not in text  # no dict dump
    assert "built of the atlas as it was before it changed" in text and "other arguments" not in text


def test_identity_changes_in_words():
    words = identity_changes({"factory": "IDMap2,Flat", "seed": 0}, {"factory": "IVF64,PQ8", "seed": 0})
    assert words == ["the FAISS index factory was 'IDMap2,Flat' and is 'IVF64,PQ8' now"]
    old = {"datasets": [{"dataset_id": "A", "start": 0, "stop": 10}, {"dataset_id": "B", "start": 10, "stop": 20,
                                                                       "obs_revision": 0}]}
    new = {"datasets": [{"dataset_id": "B", "start": 10, "stop": 20, "obs_revision": 1},
                        {"dataset_id": "C", "start": 20, "stop": 25}]}
    ch = store_changes(old, new)
    assert [d.dataset_id for d in ch.added] == ["C"] and [d.dataset_id for d in ch.removed] == ["A"]
    assert ch.relabelled == ["B"]
    # re-ingested under the same id: a new range is a removal and an addition
    again = store_changes(new, {"datasets": [{"dataset_id": "C", "start": 30, "stop": 35}]})
    assert [d.dataset_id for d in again.removed] == ["B", "C"] and [d.dataset_id for d in again.added] == ["C"]


def test_update_refuses_data_lacking_the_embedders_genes(tmp_path):
    a = _write(tmp_path, "A", 1)
    # a dataset on other genes (another species or panel): it would embed onto one blurred point
    far = _write(tmp_path, "F", 5, gene_offset=200)
    ingest([a], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", **BUILD)
    ingest([far], tmp_path / "atlas", progress=False)
    args = ("build", "--update", "--atlas", str(tmp_path / "atlas"), "--index", str(tmp_path / "index"), "--no-progress")
    out = run(*args, ok=False)
    assert "Error:" in out and ("too far" in out or "lacks most of the genes" in out) and "build --overwrite" in out
    assert "0% as many of the embedder's genes" in out
    assert not (tmp_path / "index" / CURRENT_FILE).exists()  # nothing committed
    with AtlasIndex.open(tmp_path / "index") as idx:
        assert idx.manifest.version == 1 and idx.n_cells == 300
    # the user's call: taken, and the measure is still reported (the store records that F measures none of the
    # embedder's genes: its cells embed as the atlas mean, far from every atlas cell, so both limits are relaxed)
    out = run(*args, "--min-gene-ratio", "0", "--max-far-fraction", "1")
    assert "version 2" in out and "drift" in out


def test_update_names_the_added_dataset_lacking_genes(tmp_path):
    """The gene ratio is per added dataset: one on other genes beside one like the atlas is not averaged away, and
    is named. A dataset removed and ingested again is no drift (the embedder was fitted on it)."""
    a, like, far = _write(tmp_path, "A", 1), _write(tmp_path, "L", 2, n=300), _write(tmp_path, "F", 5, gene_offset=200)
    ingest([a, like], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", **BUILD)
    run("remove", "--atlas", str(tmp_path / "atlas"), "--dataset", "L")
    ingest([like], tmp_path / "atlas", dataset_id="L2", progress=False)
    report = update_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    assert report.drift is not None and not report.drift.too_far
    ingest([_write(tmp_path, "L3", 2, n=300), far], tmp_path / "atlas", progress=False)
    out = run("build", "--update", "--atlas", str(tmp_path / "atlas"), "--index", str(tmp_path / "index"),
              "--no-progress", ok=False)
    assert "in dataset 'F'" in out and "0% as many of the embedder's genes" in out
    assert "lacks most of the genes the index's embedder reads" in out  # the measure that failed heads the message
    assert "scatlas remove" in out and "median nearest similarity" not in out  # no word of where such cells fall


def test_update_drift_on_real_data(shared_raw, tmp_path):
    """Kang's stimulated PBMCs join an index of its control PBMCs; pancreas islets are refused."""
    import anndata

    kang = anndata.read_h5ad(shared_raw / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    for value in ("CTRL", "STIM"):
        kang[kang.obs["sample"].astype(str) == value].copy().write_h5ad(tmp_path / f"kang_{value}.h5ad")
    ingest([tmp_path / "kang_CTRL.h5ad"], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    ingest([shared_raw / "pancreas_3studies_beta_ductal_cepo.h5ad"], tmp_path / "atlas", progress=False)
    with pytest.raises(InputError, match="lacks most of the genes|too far"):  # pancreas: 8% of the genes
        update_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    from scatlas.atlas.lifecycle import remove_datasets

    remove_datasets(tmp_path / "atlas", ["pancreas_3studies_beta_ductal_cepo"])
    ingest([tmp_path / "kang_STIM.h5ad"], tmp_path / "atlas", progress=False)
    report = update_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    assert report.drift is not None and report.drift.far_fraction < 0.05 and report.drift.gene_ratio > 0.8
    assert report.version == 2 and [d.dataset_id for d in report.changes.added] == ["kang_STIM"]


def test_update_cli_and_fixed_arguments(store_ab):
    atlas, b, tmp = store_ab
    index = tmp / "index"
    build_index(atlas, index, **BUILD)
    out = run("build", "--update", "--atlas", str(atlas), "--index", str(index), "--no-progress")
    assert "up to date" in out
    out = run("build", "--update", "--atlas", str(atlas), "--index", str(index), "--factory", "IVF8,Flat", ok=False)
    assert "--factory" in out and "build record" in out
    ingest([b], atlas, progress=False)
    out = run("build", "--update", "--atlas", str(atlas), "--index", str(index), "--no-progress")
    assert "version 2" in out and "gained 1 dataset(s)" in out and "drift" in out
    info = json.loads(run("info", str(index), "--json"))
    assert info["version"] == 2 and info["cells"] == 550 and info["embedder_genes"] == 50
    assert info["updated"] >= info["built"] and info["update_seconds"] > 0  # timestamps: to the second
    text = run("info", str(index))
    assert "updated      1 time(s), last " in text  # the update's time apart from the first build's
    assert "(the index; its label heads are the last update's)" in text
    # a version directory is the index's, not an index: no build or update into it (the next update deletes it)
    version_dir = index / "versions" / "0002"
    for args in (["build", "--update", "--atlas", str(atlas), "--index", str(version_dir)],
                 ["build", "--atlas", str(atlas), "--index", str(version_dir), "--overwrite"]):
        out = run(*args, "--no-progress", ok=False)
        assert f"is version 2 of the index at {index}" in out and f"pass --index {index}" in out, out
    assert not (version_dir / "versions").exists() and current_version(index)[0] == 2


def test_interrupted_update_resumes(store_ab, monkeypatch):
    import scatlas.index.update as upd

    atlas, b, tmp = store_ab
    index = tmp / "index"
    build_index(atlas, index, **BUILD)
    ingest([b], atlas, progress=False)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(upd, "write_cells_db", boom)  # after the new shards, before the manifest
    with pytest.raises(KeyboardInterrupt):
        update_index(atlas, index, progress=False)
    assert current_version(index)[0] == 1  # readers still get version 1, whole
    with AtlasIndex.open(index) as idx:
        assert idx.n_cells == 300
    staged = sorted((index / "versions" / "0002" / "shards").iterdir())
    assert staged  # the carried and new shards are kept for the rerun
    monkeypatch.undo()
    report = update_index(atlas, index, progress=False)
    assert report.version == 2 and report.n_cells == 550
    with AtlasIndex.open(index, verify=True) as idx:
        assert idx.n_cells == 550


def test_remove_then_update_drops_the_cells_and_equals_a_fresh_build(store_ab):

    atlas, b, tmp = store_ab
    index = tmp / "index"
    c = _write(tmp, "C", 3, n=200)
    ingest([b, c], atlas, progress=False)
    build_index(atlas, index, **BUILD)
    b_ids = _ids_of(index, "B")
    run("remove", "--atlas", str(atlas), "--dataset", "B")
    out = run("build", "--update", "--atlas", str(atlas), "--index", str(index), "--no-progress")
    assert "lost 1 dataset(s) (250 cells): 'B'" in out
    with AtlasIndex.open(index) as idx:
        assert idx.n_cells == 500 and idx.manifest.updates[-1]["removed"] == ["B"]
        assert not np.isin(_all_ids(index), b_ids).any()
        res = idx.search(idx.vectors(_ids_of(index, "C")), k=50)
        assert not np.isin(res.ids, b_ids).any()  # never returned
        with idx.cursor() as con:
            assert con.execute("SELECT count(*) FROM cells WHERE dataset_id = 'B'").fetchone()[0] == 0
    store = AtlasStore.open(atlas)
    emb = load_embedder(current_version(index)[1] / "embedder")
    build_from_source(StoreVectorSource(store, emb), tmp / "fresh", BuildConfig(factory="auto", shard_size=150),
                      cells=committed_cells(store), embedder=emb)
    assert np.array_equal(_all_ids(index), _all_ids(tmp / "fresh"))
    with AtlasIndex.open(index) as u, AtlasIndex.open(tmp / "fresh") as f:
        q = f.vectors(_all_ids(tmp / "fresh")[::5])
        np.testing.assert_allclose(u.search(q, k=10).scores, f.search(q, k=10).scores, atol=1e-6)
    # a second update (B again under a new id range) and a third: superseded versions are cleaned up
    ingest([b], atlas, dataset_id="B2", progress=False)
    assert update_index(atlas, index, progress=False, max_far_fraction=1.0).version == 3
    assert not (index / "shards").exists()  # version 1's files went once version 3 was current
    assert (index / "versions" / "0002").is_dir()  # the previous version stays for readers that had it open
    # --overwrite replaces an updated index with a fresh build (version 1 again)
    assert build_index(atlas, index, overwrite=True, **BUILD).version == 1
    assert not (index / CURRENT_FILE).exists() and not (index / "versions").exists()
    run("build", "--atlas", str(atlas), "--index", str(index), "--overwrite", "--shard-size", "150", "--no-progress")


def test_interrupted_removal_update_resumes_to_the_same_index(store_ab, monkeypatch):
    import scatlas.index.update as upd
    from scatlas.atlas.lifecycle import remove_datasets

    atlas, b, tmp = store_ab
    index = tmp / "index"
    ingest([b], atlas, progress=False)
    build_index(atlas, index, **BUILD)
    remove_datasets(atlas, ["A"])
    calls = {"n": 0}
    real = upd.strip_shard

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(upd, "strip_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        update_index(atlas, index, progress=False)
    assert current_version(index)[0] == 1
    monkeypatch.undo()
    report = update_index(atlas, index, progress=False)
    assert report.version == 2 and report.n_cells == 250
    assert report.warnings and "fitted on" in report.warnings[0]  # A was in the embedder's fit
    assert np.array_equal(_all_ids(index), _ids_of(index, "B"))
    from scatlas.index import verify_index

    assert verify_index(index, progress=False).ok


def test_relabel_then_update_refreshes_labels_and_annotate_finds_them(tmp_path):
    from scatlas.query import annotate

    def no_labels(adata):
        adata.obs["celltype"] = adata.obs.pop("cell_type").astype(str)
        return adata

    a = make_adata(n_cells=300, n_genes=80, seed=1, prefix="A_")
    a.write_h5ad(tmp_path / "A.h5ad")
    no_labels(make_adata(n_cells=300, n_genes=80, seed=2, prefix="M_")).write_h5ad(tmp_path / "M.h5ad")
    ingest([tmp_path / "A.h5ad", tmp_path / "M.h5ad"], tmp_path / "atlas", progress=False)  # --obs-map forgotten
    build_index(tmp_path / "atlas", tmp_path / "index", **BUILD)
    with AtlasIndex.open(tmp_path / "index") as idx:
        heads_before = idx.label_heads()["cell_type"].record.get("n_train")
        map_before = idx.reference_map()
    run("relabel", "--atlas", str(tmp_path / "atlas"), "--dataset", "M", "--obs-map", "celltype=cell_type")
    out = run("build", "--update", "--atlas", str(tmp_path / "atlas"), "--index", str(tmp_path / "index"),
              "--no-progress")
    assert "1 dataset(s) were relabelled: 'M'" in out
    with AtlasIndex.open(tmp_path / "index") as idx, idx.cursor() as con:
        assert con.execute("SELECT count(*) FROM cells WHERE dataset_id = 'M' AND cell_type IS NOT NULL"
                           ).fetchone()[0] == 300
        assert idx.manifest.updates[-1]["cells_embedded"] == 0  # nothing re-embedded
        assert idx.label_heads()["cell_type"].record.get("n_train") > heads_before  # heads see M's labels now
        refmap = idx.reference_map()  # the same cells and vectors: the map is carried over, not fitted again
        assert refmap is not None and "carried_from" in refmap.params and np.array_equal(refmap.ids, map_before.ids)
        assert np.array_equal(refmap.coords, map_before.coords)
    assert verify_index(tmp_path / "index", progress=False).ok
    query = no_labels(make_adata(n_cells=60, n_genes=80, seed=9, prefix="Q_"))
    truth = query.obs["celltype"].to_numpy()
    res = annotate(query, tmp_path / "index", progress=False)
    assert (res.predictions["cell_type_pred"].to_numpy() == truth).mean() > 0.9


KILLED_UPDATE = """
import os, signal, sys
import scatlas.index.update as upd
real = upd.{target}
calls = []
def killed(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no finally
    return real(*args, **kwargs)
setattr(upd, "{target}", killed)
upd.update_index(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("target,at", [("write_cells_db", 1), ("link_shard", 2), ("train_label_heads", 1)])
def test_killed_update_process_resumes(store_ab, target, at):
    import subprocess
    import sys

    atlas, b, tmp = store_ab
    index = tmp / "index"
    build_index(atlas, index, **BUILD)
    ingest([b], atlas, progress=False)
    proc = subprocess.run([sys.executable, "-c", KILLED_UPDATE.format(target=target, at=at), str(atlas), str(index)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    with AtlasIndex.open(index, verify=True) as idx:  # readers get version 1, whole
        assert idx.manifest.version == 1 and idx.n_cells == 300
    out = run("build", "--update", "--atlas", str(atlas), "--index", str(index), "--no-progress")
    assert "version 2" in out
    with AtlasIndex.open(index, verify=True) as idx:
        assert idx.manifest.version == 2 and idx.n_cells == 550 and sorted(idx.label_heads()) == ["cell_type"]


def test_update_keeps_class_names_and_warns_when_one_must_change(tmp_path, caplog):
    """"B cell" (dataset A) and "B cells" (dataset B) are one class (one CL term). Adding B's many B cells keeps
    the class' name (answers kept flipping between versions: B -> bcells -> B); removing A, whose value named it,
    renames it, and the update says so (report warnings and the log)."""
    import logging

    from scatlas.atlas.lifecycle import remove_datasets

    a = _write(tmp_path, "A", 1, n=200, cell_types=("B cell", "T cell", "monocyte"))
    b = _write(tmp_path, "B", 2, n=600, cell_types=("B cells", "T cell", "monocyte"))
    ingest([a], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", label_keys=(), **BUILD)
    with AtlasIndex.open(tmp_path / "index") as idx:
        assert "B cell" in idx.label_classes("cell_type").classes
    ingest([b], tmp_path / "atlas", progress=False)
    report = update_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    assert not [w for w in report.warnings if "renamed by this update" in w], report.warnings
    with AtlasIndex.open(tmp_path / "index") as idx:
        classes = idx.label_classes("cell_type")
        assert "B cell" in classes.classes and "B cells" not in classes.classes
        assert classes.class_of(["B cells"]).tolist() == classes.class_of(["B cell"]).tolist()
    remove_datasets(tmp_path / "atlas", ["A"])
    with caplog.at_level(logging.WARNING):
        report = update_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    renamed = [w for w in report.warnings if "renamed by this update" in w]
    assert len(renamed) == 1 and "'B cell' -> 'B cells'" in renamed[0], report.warnings
    assert "T cell" not in renamed[0]  # unchanged classes are not listed
    assert any("renamed by this update" in r.getMessage() for r in caplog.records)
    with AtlasIndex.open(tmp_path / "index") as idx:
        assert "B cells" in idx.label_classes("cell_type").classes


def test_an_update_left_without_labels_says_how_out(tmp_path):
    """Every labelled dataset removed: the heads cannot be retrained; the message names the ways out."""
    from scatlas.atlas.lifecycle import remove_datasets

    a = _write(tmp_path, "A", 1)
    bare = make_adata(n_cells=250, n_genes=80, seed=2, prefix="B_")
    bare.obs = bare.obs.drop(columns=["cell_type"])
    bare.write_h5ad(tmp_path / "B.h5ad")
    ingest([a, tmp_path / "B.h5ad"], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", **BUILD)
    remove_datasets(tmp_path / "atlas", ["A"])
    out = run("build", "--update", "--atlas", str(tmp_path / "atlas"), "--index", str(tmp_path / "index"),
              "--no-progress", ok=False)
    assert "no atlas cell has a 'cell_type' label" in out and "re-ingest labelled data" in out
    assert "--overwrite --no-label-heads" in out
    assert current_version(tmp_path / "index")[0] == 1  # nothing committed


def test_an_update_and_a_pickled_index_open_their_versions_without_a_warning(store_ab, caplog):
    """An update's own steps open the version it writes, and a pickled index reopens its current version's
    directory: neither is a user opening an old version (the warning is for that)."""
    import logging
    import pickle

    atlas, b, tmp = store_ab
    index = tmp / "index"
    build_index(atlas, index, **BUILD)
    ingest([b], atlas, progress=False)
    with caplog.at_level(logging.WARNING, logger="scatlas"):
        update_index(atlas, index, progress=False)
        with AtlasIndex.open(index) as idx:
            assert idx.path.name == "0002"
            pickle.loads(pickle.dumps(idx)).close()
    assert not [r for r in caplog.records if "opened as it is" in r.getMessage()], caplog.text
