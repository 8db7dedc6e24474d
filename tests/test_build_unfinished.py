"""A build that stops after its shards leaves an index that says it is unfinished (not one that opens without its
heads or mapping check); a build that fails before any work leaves no directory; an update refuses another store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, build_index, store_source, update_index, verify_index
from scatlas.index.unfinished import BUILDING_FILE
from tests.conftest import make_adata

BUILD = dict(embedder="pca", shard_size=150, factory="auto", fit_sample=400, seed=0,
             embedder_options={"n_components": 10, "n_hvg": 50}, progress=False)


def _store(tmp: Path, name: str, seed: int) -> Path:
    path = tmp / f"{name}.h5ad"
    make_adata(n_cells=300, n_genes=80, seed=seed, prefix=f"{name}_").write_h5ad(path)
    ingest([path], tmp / f"atlas_{name}", progress=False)
    return tmp / f"atlas_{name}"


@pytest.mark.parametrize("step", ["train_label_heads", "calibrate_mapping"])
def test_a_build_stopped_after_its_shards_is_unfinished_until_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    atlas, index = _store(tmp_path, "A", 1), tmp_path / "index"

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store_source, step, stop)
        with pytest.raises(KeyboardInterrupt):
            build_index(atlas, index, **BUILD)
    assert (index / "manifest.json").is_file() and (index / BUILDING_FILE).is_file()
    with pytest.raises(IndexFormatError, match="did not finish .*rerun the same `scatlas build`"):
        AtlasIndex.open(index)
    report = verify_index(index, progress=False)
    assert not report.ok and report.problems[0].file == BUILDING_FILE
    for args in (["info", str(index)], ["verify", "--index", str(index)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and "did not finish" in res.output and "Traceback" not in res.output, res.output
        assert "--overwrite`, or re-ingest" not in res.output  # the fix is to rerun the build, not to rebuild
    q = tmp_path / "q.h5ad"
    make_adata(n_cells=60, n_genes=80, seed=3, prefix="A_").write_h5ad(q)
    res = CliRunner().invoke(cli, ["annotate", str(q), "--index", str(index), "--out", str(tmp_path / "o.h5ad")])
    assert res.exit_code != 0 and "did not finish" in res.output, res.output

    with pytest.raises(IndexFormatError, match="did not finish"):
        update_index(atlas, index, progress=False)
    build_index(atlas, index, **BUILD)  # the rerun finishes it
    assert not (index / BUILDING_FILE).exists()
    with AtlasIndex.open(index) as idx:
        assert idx.label_heads(), "the heads were trained by the rerun"
    assert (index / "mapping.json").is_file() and verify_index(index, progress=False).ok


def test_a_build_failing_before_any_work_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atlas = _store(tmp_path, "A", 1)

    def fail(*args: object, **kwargs: object) -> None:
        raise InputError("only 0 genes vary")

    monkeypatch.setattr(store_source, "_fit_embedder", fail)
    with pytest.raises(InputError):
        build_index(atlas, tmp_path / "new_index", **BUILD)
    assert not (tmp_path / "new_index").exists()
    with pytest.raises(InputError):
        build_index(atlas, tmp_path / "sub" / "deeper" / "idx", **BUILD)
    assert not (tmp_path / "sub").exists(), "the parents it created go too"
    mine = tmp_path / "mine"
    mine.mkdir()  # a directory the user made stays, empty as it was
    with pytest.raises(InputError):
        build_index(atlas, mine, **BUILD)
    assert mine.is_dir()

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_source, "_fit_embedder", stop)  # a Ctrl-C while the embedder is fitted
    with pytest.raises(KeyboardInterrupt):
        build_index(atlas, tmp_path / "stopped", **BUILD)
    assert not (tmp_path / "stopped").exists()


def test_update_refuses_another_store_and_accepts_a_moved_one(tmp_path: Path) -> None:
    a, b = _store(tmp_path, "A", 1), _store(tmp_path, "B", 2)
    index = tmp_path / "index"
    build_index(a, index, **BUILD, reference_map=False)
    with pytest.raises(InputError, match="not the one the index .* was built from"):
        update_index(b, index, progress=False)
    res = CliRunner().invoke(cli, ["build", "--update", "--atlas", str(b), "--index", str(index)])
    assert res.exit_code != 0 and "not the one the index" in res.output, res.output
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)  # the same store elsewhere: its datasets are the index's
    report = update_index(moved, index, progress=False)
    assert report.changes.empty
    twin = tmp_path / "twin"  # the same file ingested into a new store: the same dataset, another store
    ingest([tmp_path / "A.h5ad"], twin, progress=False)
    with pytest.raises(InputError, match="not the one the index .* was built from"):
        update_index(twin, index, progress=False)


def test_a_refused_rerun_leaves_a_finished_index_finished(tmp_path: Path) -> None:
    atlas, index = _store(tmp_path, "A", 1), tmp_path / "index"
    build_index(atlas, index, **BUILD, reference_map=False)
    other = {**BUILD, "embedder_options": {"n_components": 8, "n_hvg": 50}}
    with pytest.raises(InputError, match="built with other arguments"):
        build_index(atlas, index, **other, reference_map=False)
    assert not (index / BUILDING_FILE).exists()
    with AtlasIndex.open(index) as idx:
        assert idx.n_cells == 300


def test_an_unfinished_build_of_a_changed_atlas_is_sent_to_overwrite_not_update(tmp_path: Path) -> None:
    from scatlas.index.build import different_build_error

    old, new = {"source": {"cells": 10}, "k": 1}, {"source": {"cells": 12}, "k": 1}
    unfinished = str(different_build_error(tmp_path, old, new))
    assert "--overwrite" in unfinished and "--update" not in unfinished and "cannot be resumed" in unfinished
    (tmp_path / "manifest.json").write_text("{}")
    finished = str(different_build_error(tmp_path, old, new))
    assert "--update" in finished
    (tmp_path / BUILDING_FILE).write_text('{"step": "storing label classes"}')  # its shards done, not the rest
    after_shards = str(different_build_error(tmp_path, old, new))  # verify said rerun, build --update, update rerun
    assert "--overwrite" in after_shards and "--update" not in after_shards


def test_a_refused_rerun_leaves_an_unfinished_build_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atlas, index = _store(tmp_path, "A", 1), tmp_path / "index"

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store_source, "train_label_heads", stop)
        with pytest.raises(KeyboardInterrupt):
            build_index(atlas, index, **BUILD)
    record = (index / BUILDING_FILE).read_bytes()
    path = tmp_path / "more.h5ad"
    make_adata(n_cells=100, n_genes=80, seed=5, prefix="more_").write_h5ad(path)
    ingest([path], atlas, progress=False)
    with pytest.raises(InputError, match="unfinished build .* cannot be resumed or updated. Pass --overwrite"):
        build_index(atlas, index, **BUILD)
    assert (index / BUILDING_FILE).read_bytes() == record


def test_an_interrupted_overwrite_leaves_the_old_index_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`build --overwrite` removed the index before building its successor: killed midway, no index was left."""
    atlas, index = _store(tmp_path, "A", 1), tmp_path / "index"
    build_index(atlas, index, **BUILD)
    with AtlasIndex.open(index) as idx:
        old_id, probe = idx.build_id, idx.vectors(idx.sample_ids(3))

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store_source, "calibrate_mapping", stop)
        with pytest.raises(KeyboardInterrupt):
            build_index(atlas, index, **{**BUILD, "seed": 1}, overwrite=True)
    with AtlasIndex.open(index) as idx:  # the old index, whole
        assert idx.build_id == old_id and idx.search(probe, k=3).ids.shape == (3, 3)
    assert verify_index(index, progress=False).ok
    assert not (tmp_path / ".index.rebuild").exists()  # a rebuild starts anew: what it left is deleted
    build_index(atlas, index, **{**BUILD, "seed": 1}, overwrite=True)  # run again: replaced once complete
    with AtlasIndex.open(index) as idx:
        assert idx.build_id != old_id
    assert verify_index(index, progress=False).ok
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == []  # nothing left beside


def test_a_swap_killed_between_its_renames_is_named_and_its_leftover_cleared(tmp_path: Path) -> None:
    """`build --overwrite` swaps with two renames; killed between them, the index's directory is missing and the old
    index sits beside it under a hidden name: the next build says so instead of building anew past it; killed after
    them, the old index left beside is deleted by the next --overwrite."""
    import os
    import shutil

    atlas, index = _store(tmp_path, "A", 1), tmp_path / "index"
    build_index(atlas, index, **BUILD)
    hidden = tmp_path / ".index.replaced-4242"
    os.rename(index, hidden)
    with pytest.raises(InputError, match="index is missing, and the index it held is at .*replaced-4242.*Rename"):
        build_index(atlas, index, **BUILD)
    assert not index.exists()
    shutil.copytree(hidden, index)  # as after the second rename
    build_index(atlas, index, **{**BUILD, "seed": 1}, overwrite=True)
    assert not hidden.exists() and verify_index(index, progress=False).ok


def test_the_leftover_of_another_index_is_not_taken_for_this_one_s(tmp_path: Path) -> None:
    """Names with glob characters: `idx[1]`'s leftovers are its own, not `idx1`'s."""
    from scatlas.index.store_source import _replaced

    for name in ("idx1", "idx[1]", "idx*"):
        (tmp_path / f".{name}.replaced-7").mkdir()
        (tmp_path / f".{name}.replaced-7" / "manifest.json").write_text("{}")
    assert [p.name for p in _replaced(tmp_path / "idx[1]")] == [".idx[1].replaced-7"]
    assert [p.name for p in _replaced(tmp_path / "idx*")] == [".idx*.replaced-7"]
