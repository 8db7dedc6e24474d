"""A store changed while its index is built: the index never ends with cells whose metadata it lacks, and `verify`
finds an index whose cell table does not cover its cells."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import StoreError
from scatlas.atlas.lifecycle import remove_datasets
from scatlas.cli import cli
from scatlas.index import build as build_module
from scatlas.index import build_index, verify_index
from scatlas.index.manifest import CELLS_DB_FILE
from scatlas.index.metadata import write_cells_db
from tests.conftest import make_adata


def _atlas(tmp_path: Path) -> Path:
    paths = []
    for i in range(2):
        path = tmp_path / f"d{i}.h5ad"
        make_adata(150, 60, seed=i, prefix=f"d{i}_").write_h5ad(path)
        paths.append(path)
    ingest(paths, tmp_path / "atlas", progress=False)
    return tmp_path / "atlas"


def test_a_dataset_removed_during_the_build_fails_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atlas = _atlas(tmp_path)
    real = build_module._build_shards

    def then_remove(*args, **kwargs):  # the shards hold both datasets; the store loses one before the cell copy
        shards = real(*args, **kwargs)
        remove_datasets(atlas, ["d1"])
        return shards

    monkeypatch.setattr(build_module, "_build_shards", then_remove)
    with pytest.raises(StoreError, match="store changed while the index was built"):
        build_index(atlas, tmp_path / "index", label_keys=[], reference_map=False, progress=False)
    assert not (tmp_path / "index" / CELLS_DB_FILE).exists()
    assert not (tmp_path / "index" / "manifest.json").exists()  # nothing that looks like a finished index


def test_write_cells_db_checks_the_count(tmp_path: Path) -> None:
    import numpy as np

    with pytest.raises(StoreError, match="holds 3 of the 4 cells"):
        write_cells_db(tmp_path / "c.duckdb", None, ids=np.arange(3), expect=4)
    assert not list(tmp_path.iterdir())
    assert write_cells_db(tmp_path / "c.duckdb", None, ids=np.arange(3), expect=3) == 3


def test_verify_finds_a_cell_table_short_of_the_indexed_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index written before the build checked the count (or by another tool): the cell table misses a cell."""
    atlas = _atlas(tmp_path)
    real = build_module.write_cells_db

    def short(path, cells, ids=None, ranges=None, expect=None):  # the copy without the check, one cell lost
        n = real(path, cells, ids, ranges)
        with duckdb.connect(str(path)) as con:
            con.execute("DELETE FROM cells WHERE soma_joinid = 0")
        return n - 1

    monkeypatch.setattr(build_module, "write_cells_db", short)
    build_index(atlas, tmp_path / "index", label_keys=[], reference_map=False, progress=False)
    report = verify_index(tmp_path / "index", progress=False)
    assert not report.ok
    expect = "299 rows (299 distinct ids) for the 300 indexed cells, 1 of which it lacks"
    assert any(p.file == CELLS_DB_FILE and expect in p.what for p in report.problems), report.problems
    result = CliRunner().invoke(cli, ["verify", "--index", str(tmp_path / "index")])
    assert result.exit_code != 0 and "build --update" in result.output


def test_the_cell_table_must_hold_the_indexed_ids_not_just_as_many(tmp_path: Path) -> None:
    from scatlas.index.manifest import read_manifest
    from scatlas.index.verify import _cell_table_problems

    build_index(_atlas(tmp_path), tmp_path / "index", label_keys=[], reference_map=False, progress=False)
    manifest = read_manifest(tmp_path / "index")
    assert _cell_table_problems(tmp_path / "index", manifest) == []
    with duckdb.connect(str(tmp_path / "index" / CELLS_DB_FILE)) as con:  # another cell in one's place
        con.execute("UPDATE cells SET soma_joinid = 100000 WHERE soma_joinid = 0")
    (problem,) = _cell_table_problems(tmp_path / "index", manifest)
    assert "300 rows (300 distinct ids) for the 300 indexed cells, 1 of which it lacks" in problem.what
