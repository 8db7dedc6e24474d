"""Output guards found by an adversarial pass: a user's folder that merely holds a file named like a report's, outputs
inside a store or index, a first ingest killed before its store existed, `ingest --report` where it cannot be
written, and messages that must not echo cell names."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError, OutputError
from scatlas.atlas.outputs import ATLAS_STORE, REPORT, SWEEP, check_output_dir
from scatlas.atlas.store import CREATING_FILE, EXPERIMENT_DIR, LOCK_FILE, AtlasStore
from scatlas.cli import cli
from scatlas.query.hunt.report import REPORT_FILES
from tests.conftest import make_adata


def _folder(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def test_a_folder_with_a_report_named_file_and_other_files_is_not_a_report(tmp_path: Path) -> None:
    mine = _folder(tmp_path / "myproj", report_md="# thesis notes", thesis_tex="precious")
    with pytest.raises(OutputError, match="also holds 1 other entry"):
        check_output_dir(mine, REPORT)
    (mine / "thesis.tex").unlink()
    with pytest.raises(OutputError, match="mark"):  # a report.md alone may be the user's too
        check_output_dir(mine, REPORT)
    assert set(REPORT_FILES) == REPORT.entries
    with pytest.raises(OutputError, match="other entr"):
        check_output_dir(_folder(tmp_path / "sweep", sweep_json="{}", data_csv="x"), SWEEP)


def test_no_output_directory_inside_a_store(tmp_path: Path) -> None:
    path = tmp_path / "d.h5ad"
    make_adata(60, 40).write_h5ad(path)
    ingest([path], tmp_path / "atlas", progress=False)
    for kind in (REPORT, SWEEP):
        with pytest.raises(OutputError, match="lies inside an atlas store"):
            check_output_dir(tmp_path / "atlas" / "out", kind)
    # a folder that merely holds a file named like an index's (a web app's manifest.json) is no index
    _folder(tmp_path / "webapp", manifest_json='{"name": "app"}')
    for kind in (ATLAS_STORE, REPORT, SWEEP):
        check_output_dir(tmp_path / "webapp" / "out", kind)


def test_a_first_ingest_killed_before_its_store_existed_is_rerun(tmp_path: Path) -> None:
    path = tmp_path / "d.h5ad"
    make_adata(60, 40).write_h5ad(path)
    only_lock = tmp_path / "a1"
    only_lock.mkdir()
    (only_lock / LOCK_FILE).write_text("")  # killed at once: only the lock file
    ingest([path], only_lock, progress=False)
    assert AtlasStore.open(only_lock).n_cells == 60
    half = tmp_path / "a2"  # killed while laying the store out: its marker, part of the experiment
    (half / EXPERIMENT_DIR).mkdir(parents=True)
    (half / LOCK_FILE).write_text("")
    (half / CREATING_FILE).write_text("")
    check_output_dir(half, ATLAS_STORE)
    ingest([path], half, progress=False)
    assert AtlasStore.open(half).n_cells == 60 and not (half / CREATING_FILE).exists()
    foreign = tmp_path / "a3"  # an experiment/ that no scatlas ingest started is still refused
    (foreign / EXPERIMENT_DIR).mkdir(parents=True)
    with pytest.raises(OutputError):
        ingest([path], foreign, progress=False)


def test_ingest_report_is_checked_before_anything_is_ingested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scatlas.cli as cli_module

    path = tmp_path / "d.h5ad"
    make_adata(60, 40).write_h5ad(path)
    atlas = tmp_path / "atlas"
    r = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(atlas), "--report", str(atlas / "r.json")])
    assert r.exit_code != 0 and "inside the atlas store" in r.output and not atlas.exists()
    locked = tmp_path / "ro"
    locked.mkdir()
    real = cli_module.os.access
    # a directory this process may not write to (as root every chmod is writable: ask access() what it says)
    monkeypatch.setattr(cli_module.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    r = CliRunner().invoke(cli, ["ingest", str(path), "--atlas", str(atlas), "--report", str(locked / "r.json")])
    assert r.exit_code != 0 and "cannot write in" in r.output and not atlas.exists()


def test_duplicate_cell_names_are_not_echoed(tmp_path: Path) -> None:
    adata = make_adata(30, 40)
    adata.obs_names = ["secret-name"] * 30
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError) as err:
        ingest([path], tmp_path / "atlas", progress=False)
    assert "29 cell names" in str(err.value) and "secret-name" not in str(err.value)


def test_the_same_dataset_ingested_meanwhile_is_refused_under_the_lock(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ingests of one dataset id: the second one's check before the store lock passes, the first commits
    meanwhile; the second is refused as `already in` under the lock, not by a constraint error."""
    from scatlas.atlas import ingestion
    from scatlas.atlas.errors import DatasetExistsError

    path = tmp_path / "d.h5ad"
    make_adata(60, 40).write_h5ad(path)
    ingest([make_path(tmp_path)], tmp_path / "atlas", progress=False)  # the store exists
    real = ingestion.check_species

    def meanwhile(*args, **kwargs):
        monkeypatch.setattr(ingestion, "check_species", real)
        ingest([path], tmp_path / "atlas", progress=False)  # the other command, between check and lock
        return real(*args, **kwargs)

    monkeypatch.setattr(ingestion, "check_species", meanwhile)
    with pytest.raises(DatasetExistsError, match="already in"):
        ingest([path], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas", warn_unfinished=False)
    assert [d.dataset_id for d in store.datasets] == ["other", "d"]


def make_path(tmp_path: Path) -> Path:
    other = tmp_path / "other.h5ad"
    make_adata(50, 40, seed=3, prefix="o").write_h5ad(other)
    return other


def test_write_mode_starts_anew_a_store_whose_first_ingest_left_no_dataset(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A first `ingest --mode write` killed after store.json existed (no clean-up ran): the store holds no dataset,
    and the same command starts it anew; a store with datasets is still refused."""
    from scatlas.atlas import ingestion

    path = tmp_path / "d.h5ad"
    make_adata(60, 40).write_h5ad(path)

    def killed(writer, plans, *args, **kwargs):  # killed while writing: its id range reserved (journalled)
        writer.reserve(plans[0].dataset_id, 60, 40, {})
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ingestion, "_write_all", killed)
        m.setattr(ingestion, "_nothing_committed", lambda atlas: False)  # kill -9: nothing cleans up
        with pytest.raises(KeyboardInterrupt):
            ingest([path], tmp_path / "atlas", mode="write", progress=False)
    assert AtlasStore.exists(tmp_path / "atlas")
    assert not AtlasStore.open(tmp_path / "atlas", warn_unfinished=False).datasets
    ingest([path], tmp_path / "atlas", mode="write", progress=False)
    assert AtlasStore.open(tmp_path / "atlas").n_cells == 60
    with pytest.raises(Exception, match="already exists"):
        ingest([path], tmp_path / "atlas", mode="write", progress=False)
    (tmp_path / "emptied").mkdir()  # a store whose datasets were all removed is no interrupted first ingest
    ingest([path], tmp_path / "emptied", progress=False)
    from scatlas.atlas.lifecycle import remove_datasets

    remove_datasets(tmp_path / "emptied", ["d"])
    with pytest.raises(Exception, match="already exists"):
        ingest([path], tmp_path / "emptied", mode="write", progress=False)
