"""One writer at a time per index: a build (``--overwrite`` included) or an update while another holds the index's
lock is refused with a clear error and leaves the index as it was. And a file of the index the user may not read is
a permission error, not damage."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.outputs import INDEX, check_output_dir
from scatlas.cli import cli
from scatlas.index import build_index
from scatlas.index.locking import LOCK_FILE, index_lock
from tests.conftest import make_adata


def _small_index(root: Path, n_cells: int = 150, n_genes: int = 60) -> tuple[list[Path], Path]:
    """Two small datasets ingested into ``root/atlas`` and indexed into ``root/index``: (their files, the index)."""
    files = []
    for i in range(2):
        path = root / f"d{i}.h5ad"
        make_adata(n_cells=n_cells, n_genes=n_genes, seed=i, prefix=f"d{i}_").write_h5ad(path)
        files.append(path)
    ingest(files, root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_components": 8}, label_keys=(),
                reference_map=False, progress=False)
    return files, root / "index"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def test_overwrite_and_update_wait_for_the_writer_holding_the_lock(tmp_path: Path) -> None:
    _, index = _small_index(tmp_path)
    before = _snapshot(index)
    base = ["--atlas", str(tmp_path / "atlas"), "--index", str(index), "--no-progress"]
    with index_lock(index):  # another build or update at work
        for extra in (["--overwrite", "--no-map"], ["--update"], ["--no-map"]):
            res = CliRunner().invoke(cli, ["build", *base, *extra])
            assert res.exit_code == 1 and "another build or update" in res.output, (extra, res.output)
            assert "Traceback" not in res.output
    assert _snapshot(index) == before
    # once free, --overwrite rebuilds (the lock file is no entry of its own)
    res = CliRunner().invoke(cli, ["build", *base, "--overwrite", "--no-map", "--embedder-option", "n_components=8"])
    assert res.exit_code == 0, res.output
    assert (index / "manifest.json").is_file()


def test_a_directory_holding_only_the_lock_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / LOCK_FILE).touch()
    assert check_output_dir(tmp_path / "idx", INDEX) == tmp_path / "idx"


def test_an_unreadable_shard_file_is_a_permission_error_not_damage(tmp_path: Path, monkeypatch) -> None:
    """A shard file the user may not read (a colleague's index): the CLI names the permission, and does not call the
    index damaged or advise rebuilding it with --overwrite. (Simulated: the tests may run as root.)"""
    import errno
    import os

    import numpy as np

    files, index = _small_index(tmp_path, n_cells=120, n_genes=40)
    real_load = np.load

    def load(path, *args, **kwargs):
        if str(path).endswith("ids.npy"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr("scatlas.index.shard.np.load", load)
    res = CliRunner().invoke(cli, ["search", str(files[0]), "--index", str(index), "--out",
                                   str(tmp_path / "hits.parquet"), "--no-progress"])
    assert res.exit_code == 1 and "Permission denied" in res.output and "ids.npy" in res.output, res.output
    assert "damaged" not in res.output and "--overwrite" not in res.output
