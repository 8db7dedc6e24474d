"""Generated bad inputs thrown at ``scatlas ingest`` and ``scatlas annotate``: each either works or fails with
``Error: ...`` and a non-zero exit, never a traceback, and a failed ingest leaves the store exactly as it was."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatlas.atlas.store import STATE_FILE, AtlasStore
from scatlas.cli import cli
from tests.conftest import make_adata

pytestmark = pytest.mark.slow

N_INGEST_CASES = 160
N_ANNOTATE_CASES = 120

NAMES = ["", " ", "a\"b", "x'); DROP TABLE cells; --", "a\x00b", "\x1b[31mred", "é名前", "n" * 400, "cell_type",
         "CELL_TYPE", "soma_joinid", "dataset_id", "1", "a;b", "--", "/etc/passwd", "\\", "NULL", "\ud7ff"]
VALUES = [np.nan, np.inf, -np.inf, -1.0, -3.0, 2.5, 1e30, 1e-30, 0.0, 3e9]


def _edit_x(rng: np.random.Generator) -> Callable[[anndata.AnnData], anndata.AnnData]:
    value = VALUES[rng.integers(len(VALUES))]
    n_bad = int(rng.integers(1, 4))

    def edit(ad: anndata.AnnData) -> anndata.AnnData:
        X = ad.X.toarray()
        for _ in range(n_bad):
            X[rng.integers(ad.n_obs), rng.integers(ad.n_vars)] = value
        ad.X = sp.csr_matrix(X)
        return ad

    return edit


def _edit_obs(rng: np.random.Generator) -> Callable[[anndata.AnnData], anndata.AnnData]:
    name = NAMES[rng.integers(len(NAMES))]
    value = [None, 1, True, 2.5, "x", NAMES[rng.integers(len(NAMES))]][rng.integers(6)]

    def edit(ad: anndata.AnnData) -> anndata.AnnData:
        ad.obs[name] = value
        return ad

    return edit


def _edit_names(rng: np.random.Generator) -> Callable[[anndata.AnnData], anndata.AnnData]:
    which = rng.integers(4)

    def edit(ad: anndata.AnnData) -> anndata.AnnData:
        if which == 0:
            ad.obs_names = ["dup"] * ad.n_obs
        elif which == 1:
            ad.var_names = [NAMES[i % len(NAMES)] + str(i // len(NAMES)) for i in range(ad.n_vars)]
            ad.var = ad.var.drop(columns=[c for c in ad.var.columns])
        elif which == 2:
            ad.var_names = ["same"] * ad.n_vars
            ad.var = ad.var.drop(columns=[c for c in ad.var.columns])
        else:
            ad.obs["is_primary_data"] = NAMES[rng.integers(len(NAMES))]
        return ad

    return edit


def _damage_file(rng: np.random.Generator, path: Path) -> None:
    """Structural damage with h5py, or bytes of the file itself."""
    kind = rng.integers(6)
    if kind == 5:
        raw = bytearray(path.read_bytes())
        for _ in range(int(rng.integers(1, 20))):
            raw[rng.integers(len(raw))] = int(rng.integers(256))
        if rng.random() < 0.3:
            raw = raw[: int(rng.integers(len(raw)))]
        path.write_bytes(bytes(raw))
        return
    with h5py.File(path, "r+") as f:
        if kind == 0:
            idx = f["X/indices"][...]
            idx[rng.integers(len(idx))] = int(rng.choice([-1, 10_000, 2**31 - 1]))
            f["X/indices"][...] = idx
        elif kind == 1:
            ptr = f["X/indptr"][...]
            i = int(rng.integers(1, len(ptr)))
            ptr[i] = int(rng.choice([-5, ptr[-1] + 100, max(ptr[i - 1] - 3, 0)]))
            f["X/indptr"][...] = ptr
        elif kind == 2:
            f["X"].attrs["shape"] = np.array([int(rng.integers(0, 500)), int(rng.integers(0, 500))])
        elif kind == 3:
            del f[str(rng.choice(["obs", "var", "X"]))]
        else:
            data = f["X/data"][...]
            del f["X/data"]
            f["X/data"] = data[: len(data) // 2]


def make_case(seed: int, directory: Path) -> Path:
    """One bad .h5ad: a value, an obs column, names, or the file's structure."""
    rng = np.random.default_rng(seed)
    kind = seed % 4
    adata = make_adata(n_cells=60, n_genes=40, seed=seed)
    if kind < 3:
        adata = [_edit_x, _edit_obs, _edit_names][kind](rng)(adata)
    path = directory / f"case{seed}.h5ad"
    try:
        adata.write_h5ad(path)
    except Exception:  # noqa: BLE001 - anndata itself refuses some names: write a damaged file instead
        make_adata(n_cells=60, n_genes=40, seed=seed).write_h5ad(path)
        kind = 3
    if kind == 3:
        _damage_file(rng, path)
    return path


def store_state(atlas: Path) -> str:
    """What readers see: the committed datasets and the cell and gene tables (a failed ingest may burn ids, so
    store.json's high-water marks can move)."""
    store = AtlasStore.open(atlas)
    h = hashlib.sha256(json.dumps(json.loads((atlas / STATE_FILE).read_text())["datasets"]).encode())
    with store.connect() as con:
        h.update(str(con.execute("SELECT * FROM cells ORDER BY soma_joinid").fetchall()).encode())
        h.update(str(con.execute("SELECT * FROM genes ORDER BY var_joinid").fetchall()).encode())
    return h.hexdigest()


def assert_clean(result, case: Path) -> None:
    """Success, or ``Error:`` with a non-zero exit and no traceback (click's exit is a SystemExit)."""
    if result.exit_code == 0:
        return
    assert isinstance(result.exception, SystemExit), f"{case.name}: {result.exception!r}\n{result.output}"
    assert "Error:" in result.output and "Traceback" not in result.output, f"{case.name}: {result.output}"


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    make_adata(n_cells=300, n_genes=40, seed=999).write_h5ad(root / "base.h5ad")
    runner = CliRunner()
    result = runner.invoke(cli, ["-q", "ingest", str(root / "base.h5ad"), "--atlas", str(root / "atlas"), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["-q", "build", "--atlas", str(root / "atlas"), "--index", str(root / "index"),
                                 "--embedder-option", "n_components=8", "--no-progress"])
    assert result.exit_code == 0, result.output
    return root


def test_bad_files_at_ingest(fuzz_root, tmp_path):
    atlas = fuzz_root / "atlas"
    runner = CliRunner()
    outcomes = {"ok": 0, "error": 0}
    for seed in range(N_INGEST_CASES):
        case = make_case(seed, tmp_path)
        before = store_state(atlas)
        result = runner.invoke(cli, ["-q", "ingest", str(case), "--atlas", str(atlas), "--no-progress"])
        assert_clean(result, case)
        if result.exit_code != 0:
            assert store_state(atlas) == before, f"{case.name} failed but changed the store"
        outcomes["ok" if result.exit_code == 0 else "error"] += 1
    assert outcomes["error"] > N_INGEST_CASES // 2, outcomes  # the generator makes mostly bad files


def test_bad_files_at_annotate(fuzz_root, tmp_path):
    runner = CliRunner()
    n_errors = 0
    for seed in range(1000, 1000 + N_ANNOTATE_CASES):
        case = make_case(seed, tmp_path)
        original = case.read_bytes()
        result = runner.invoke(cli, ["-q", "annotate", str(case), "--index", str(fuzz_root / "index"),
                                     "--out", str(tmp_path / f"out{seed}.h5ad"), "--no-progress"])
        assert_clean(result, case)
        assert case.read_bytes() == original
        n_errors += result.exit_code != 0
    assert n_errors > N_ANNOTATE_CASES // 2  # the generator makes mostly bad files
