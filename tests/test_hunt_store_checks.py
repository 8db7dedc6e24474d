"""The atlas store the hunt reads expression from must hold the cells the index was built from: another store with
the same dataset ids and id ranges but other values is refused by ``hunt report`` (DE) and leaves stage 2 out of a
sweep; and ``hunt train --stages 2`` refuses, rather than falling back to stage 1, when stage 2 cannot be trained."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError
from scatlas.atlas.store import AtlasStore
from scatlas.atlas.synthetic import RareType, SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.cli import cli
from scatlas.index import AtlasIndex, BuildConfig, build_index
from scatlas.query.hunt import report, sweep, train
from scatlas.query.hunt.gene_reads import open_index_store, store_differences

RARE = "Norn cell"
POSITIVE = f"cell_type = '{RARE}'"
CONFIG = SyntheticAtlasConfig(
    n_cells=800, n_genes=60, n_datasets=2, n_donors=2, seed=3, non_primary_fraction=0.0, n_markers=5,
    n_lineage_markers=5, rare_types=(RareType(RARE, 0.05, datasets=(0, 1)),), n_rare_markers=6,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An 800-cell atlas store (``atlas``) and its index; ``other``: a store of other cells (deeper sequenced)
    ingested under the same dataset ids and id ranges; ``copy``: a copy of ``atlas`` elsewhere; ``hits``: the
    rare cells, as hits without a sweep summary."""
    root = tmp_path_factory.mktemp("hunt_store_checks")
    ingest(write_h5ad_datasets(CONFIG, root / "h5ad"), root / "atlas", progress=False)
    ingest(write_h5ad_datasets(replace(CONFIG, median_umis=3000.0), root / "h5ad_other"), root / "other",
           progress=False)
    shutil.copytree(root / "atlas", root / "copy")
    build_index(root / "atlas", root / "index", embedder="pca", fit_sample=800,
                embedder_options={"n_hvg": 50, "n_components": 4}, label_keys=(), reference_map=False,
                config=BuildConfig(shard_size=400, eval_queries=50, calibration_cells=100), progress=False)
    idx = AtlasIndex.open(root / "index")
    rare = idx.connect().cursor().execute(f"SELECT soma_joinid FROM cells WHERE {POSITIVE}").df()
    (root / "hits").mkdir()
    pd.DataFrame({"soma_joinid": rare["soma_joinid"]}).to_parquet(root / "hits" / "hits.parquet")
    return {"root": root, "index": idx, "atlas": root / "atlas", "other": root / "other", "copy": root / "copy",
            "hits": root / "hits" / "hits.parquet"}


@contextlib.contextmanager
def _store_replaced(world: dict[str, Any], by: Path | None) -> Iterator[None]:
    """The index's own atlas store (the path its manifest names) replaced by ``by`` (None: gone) for the block."""
    atlas = world["atlas"]
    os.rename(atlas, atlas.with_name("atlas.moved"))
    try:
        if by is not None:
            os.rename(by, atlas)
        try:
            yield
        finally:
            if by is not None:
                os.rename(atlas, by)
    finally:
        os.rename(atlas.with_name("atlas.moved"), atlas)


def test_the_same_ranges_with_other_content_differ_and_a_copy_does_not(world):
    idx = world["index"]
    with AtlasStore.open(world["other"]) as other:
        assert [(r.dataset_id, r.start, r.stop) for r in other.cell_ranges_records()] == [
            (d["dataset_id"], d["start"], d["stop"]) for d in idx.manifest.atlas_snapshot["datasets"]]
        got = store_differences(idx, other)
    assert got[0].startswith("it is another store than the one the index was built from")  # ingested separately
    assert len(got) == 3 and all("holds other expression values (its content fingerprint, x_sha256, differs)" in g
                                 for g in got[1:])
    assert got[1].startswith("dataset 'synth-000' ")
    with AtlasStore.open(world["copy"]) as copy:
        assert store_differences(idx, copy) == []
    store, why = open_index_store(idx, world["other"])
    assert store is None and why is not None
    assert why.startswith(f"the atlas store {world['other']} does not hold the cells the index was built from: ")
    assert "x_sha256" in why
    store, why = open_index_store(idx, world["copy"])
    assert store is not None and why is None
    store.close()


def test_moved_ranges_and_lost_ingests_are_differences(world, tmp_path):
    """Without content fingerprints, another ingest (time) differs; another id range differs; a lost dataset
    differs only when other datasets hold its ids."""
    idx = world["index"]
    shutil.copytree(world["copy"], tmp_path / "s")
    state = json.loads((tmp_path / "s" / "store.json").read_text())
    with AtlasStore.open(tmp_path / "s") as store:
        first, second = store.cell_ranges_records()
        first.x_sha256 = ""
        first.ingested_at = "2000-01-01T00:00:00"
        got = store_differences(idx, store)
        assert got == ["dataset 'synth-000' was ingested at another time and has no content fingerprint (x_sha256) to "
                       "compare"]
        second.start += 1
        assert "dataset 'synth-001' holds cell ids" in store_differences(idx, store)[1]
        second.start -= 1
        second.dataset_id = "renamed"
        assert store_differences(idx, store)[1].startswith("dataset 'synth-001' is not in the store, and other datasets")
        store.state.datasets.remove(second)
        assert len(store_differences(idx, store)) == 1  # gone, its ids held by no other dataset: not a difference
    assert json.loads((tmp_path / "s" / "store.json").read_text()) == state  # changed in memory only


def test_cli_report_refuses_de_on_a_store_of_other_cells(world, tmp_path):
    base = ["-q", "hunt", "report", str(world["hits"]), "--index", str(world["index"].path), "--no-progress"]
    res = CliRunner().invoke(cli, [*base, "--atlas", str(world["other"]), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 1 and res.output.startswith("Error: the atlas store "), res.output
    assert "does not hold the cells the index was built from: it is another store" in res.output
    assert "dataset 'synth-000' holds other expression values" in res.output
    assert "--atlas" in res.output and "--no-de" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "rep").exists()
    res = CliRunner().invoke(cli, [*base, "--atlas", str(world["copy"]), "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ok" / "de.csv").is_file()  # a copy of the store the index was built from: DE runs
    res = CliRunner().invoke(cli, [*base, "--atlas", str(world["other"]), "--no-de", "--out", str(tmp_path / "node")])
    assert res.exit_code == 0, res.output  # no DE: no store read


def test_report_refuses_the_index_own_store_once_it_holds_other_cells(world, tmp_path):
    with _store_replaced(world, world["other"]), pytest.raises(InputError, match="'synth-001' holds other expression"):
        report(world["hits"], world["index"], tmp_path / "rep", progress=False)
    assert not (tmp_path / "rep").exists()


def test_stage_two_needs_the_store_the_index_was_built_from(world, tmp_path):
    """A sweep refuses a store of other cells given on purpose and leaves stage 2 out (said) on one it finds;
    ``train(two_stage=True)`` and
    ``hunt train --stages 2`` refuse without a usable store, where ``auto`` trains stage 1 alone and says why."""
    idx = world["index"]
    clf = train(idx, positive_sql=POSITIVE, background=300, n_folds=3, progress=False, two_stage=True)
    assert clf.stage2 is not None
    with pytest.raises(InputError, match=r"stage 2 cannot read the atlas store given .*x_sha256.*--stage1-only"):
        sweep(idx, clf, tmp_path / "other", atlas=world["other"], progress=False)  # named on purpose: refused
    with _store_replaced(world, world["other"]):  # the store the index records: stage 1 alone, said
        s = sweep(idx, clf, tmp_path / "found", progress=False)
    assert s.stages.startswith("stage 1 only: the atlas store ") and "x_sha256" in s.stages
    assert s.n_stage2_kept is None
    s = sweep(idx, clf, tmp_path / "copy", atlas=world["copy"], progress=False)
    assert s.stages.startswith("two stages") and s.n_stage2_kept is not None

    with _store_replaced(world, world["other"]):
        with pytest.raises(InputError, match=r"stage 2 was asked for \(--stages 2; two_stage=True\) but cannot be "
                                             r"trained: the atlas store .* 'synth-000' holds other expression values"):
            train(idx, positive_sql=POSITIVE, background=300, n_folds=3, progress=False, two_stage=True)
        auto = train(idx, positive_sql=POSITIVE, background=300, n_folds=3, progress=False)
        assert auto.stage2 is None and "x_sha256" in auto.params["stage2_skipped"]

    args = ["-q", "hunt", "train", "--index", str(idx.path), "--positive-sql", POSITIVE, "--background", "300",
            "--no-progress"]
    with _store_replaced(world, None):
        for flags in (["--stages", "2"], ["--two-stage"]):
            res = CliRunner().invoke(cli, [*args, *flags, "--out", str(tmp_path / "two")])
            assert res.exit_code == 1 and res.output.startswith("Error: stage 2 was asked for"), res.output
            assert "is not reachable" in res.output and "--stages auto" in res.output
            assert "Traceback" not in res.output and not (tmp_path / "two").exists()
        res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "auto")])
    assert res.exit_code == 0, res.output
    assert "stages: stage 1 alone; no stage 2: the atlas store " in res.output and "not reachable" in res.output


def test_a_store_given_to_a_stage_one_sweep_is_said_to_be_unread(world, tmp_path, caplog):
    clf = train(world["index"], positive_sql=POSITIVE, background=300, n_folds=3, progress=False, two_stage=False)
    with caplog.at_level(logging.WARNING):
        s = sweep(world["index"], clf, tmp_path / "one", atlas=tmp_path / "nowhere", progress=False)
    assert s.stages.startswith("stage 1 only") and "is not read" in caplog.text and "has none" in caplog.text


def test_stage_two_reads_a_store_that_gained_datasets_and_names_update_when_one_was_removed(world, tmp_path):
    """Cells ingested after the build are no cells of the index: stage 2 still reads the store. A dataset of the
    index removed from the store is: stage 2 cannot read those cells, and the reason names `build --update`."""
    from scatlas.atlas import remove_datasets

    idx = world["index"]
    grown, shrunk = tmp_path / "grown", tmp_path / "shrunk"
    shutil.copytree(world["atlas"], grown)
    shutil.copytree(world["atlas"], shrunk)
    extra = write_h5ad_datasets(replace(CONFIG, seed=CONFIG.seed + 1), tmp_path / "extra", datasets=[0])[0]
    ingest([extra], grown, dataset_id="added-later", progress=False)
    store, why = open_index_store(idx, grown)
    assert store is not None and why is None
    store.close()
    first = str(AtlasStore.open(shrunk).datasets[0].dataset_id)
    remove_datasets(shrunk, [first])
    store, why = open_index_store(idx, shrunk)
    assert store is None and why is not None
    assert "is not in the store" in why and "build --update" in why
    assert store_differences(idx, AtlasStore.open(shrunk)) == []  # the report's rule: a removed dataset alone is fine


def test_verify_notes_an_index_and_a_store_that_are_not_one_atlas(world):
    args = ["verify", "--index", str(world["index"].path), "--no-progress"]
    res = CliRunner().invoke(cli, [*args, "--atlas", str(world["other"])])
    assert res.exit_code == 0, res.output  # both intact on their own
    assert "note: the index was not built from this store" in res.output and "x_sha256" in res.output
    res = CliRunner().invoke(cli, [*args, "--atlas", str(world["atlas"])])
    assert res.exit_code == 0 and "not built from this store" not in res.output and "note:" not in res.output, \
        res.output


def test_verify_notes_datasets_added_or_relabelled_since_the_build(world, tmp_path):
    from scatlas.atlas import relabel_dataset

    grown = tmp_path / "grown"
    shutil.copytree(world["atlas"], grown)
    extra = write_h5ad_datasets(replace(CONFIG, seed=CONFIG.seed + 2), tmp_path / "extra", datasets=[0])[0]
    ingest([extra], grown, dataset_id="added-later", progress=False)
    first = str(AtlasStore.open(grown).datasets[0].dataset_id)
    relabel_dataset(grown, first, {"donor_id": "cell_type"})
    res = CliRunner().invoke(cli, ["verify", "--index", str(world["index"].path), "--atlas", str(grown),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1 dataset(s) ingested after the index was built" in res.output and "'added-later'" in res.output
    assert "1 dataset(s) of the index were relabelled" in res.output
