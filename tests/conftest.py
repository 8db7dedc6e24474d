"""Shared fixtures: small synthetic AnnData files in the conventions of real atlas dumps, a small synthetic atlas
and index with a planted rare type, the toy embedder plug-in, the CLI runner, and ../shared data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.synthetic import RareType, SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.cli import cli
from scatlas.index import build_index
from tests.plugin_pkg import install, uninstall

PLANTED = "norn cell"
SHARED_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


@pytest.fixture(scope="session")
def shared_raw() -> Path:
    """The real datasets in ../shared/data/raw; tests using it skip when it is absent."""
    if not SHARED_RAW.is_dir():
        pytest.skip("../shared/data/raw is not available")
    return SHARED_RAW


def make_adata(
    n_cells: int = 120,
    n_genes: int = 60,
    *,
    seed: int = 0,
    prefix: str = "cell",
    cell_types: tuple[str, ...] = ("T cell", "B cell", "monocyte"),
    ensembl: bool = True,
    symbols: bool = True,
    gene_offset: int = 0,
) -> anndata.AnnData:
    """Counts with planted cell-type programs; var has Ensembl ids (index + feature_id) and symbols (feature_name)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(cell_types), size=n_cells)
    base = rng.gamma(1.0, 0.5, size=n_genes)
    programs = np.tile(base, (len(cell_types), 1))
    for t in range(len(cell_types)):
        programs[t, t * 5 : t * 5 + 5] += 6.0
    lib = rng.lognormal(0, 0.3, size=n_cells)
    counts = rng.poisson(programs[labels] * lib[:, None]).astype(np.float32)
    ens_ids = [f"ENSG{1000000 + gene_offset + i:011d}" for i in range(n_genes)]
    syms = [f"GENE{gene_offset + i}" for i in range(n_genes)]
    var = pd.DataFrame(index=ens_ids if ensembl else syms)
    if ensembl:
        var["feature_id"] = ens_ids
    if symbols and ensembl:
        var["feature_name"] = syms
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(cell_types)[labels]),
            "donor_id": rng.choice(["d1", "d2"], size=n_cells),
            "tissue": "blood",
            "n_counts": counts.sum(axis=1),
        },
        index=[f"{prefix}{i}" for i in range(n_cells)],
    )
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def h5ad_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a small AnnData to tmp_path/<name>.h5ad; kwargs go to make_adata, ``transform`` may edit it first."""

    def factory(name: str, transform: Callable[[anndata.AnnData], anndata.AnnData] | None = None, **kwargs: object) -> Path:
        adata = make_adata(**kwargs)  # type: ignore[arg-type]
        if transform is not None:
            adata = transform(adata)
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        return path

    return factory


@pytest.fixture(scope="session")
def planted_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three synthetic datasets (2,400 cells, 6% :data:`PLANTED` cells in each): datasets 0 and 1 ingested into
    ``root/atlas`` and indexed (default build) in ``index``, dataset 2 the ``query``. Built once per session; the
    tests that share it (search, serve, the browser) only read it."""
    root = tmp_path_factory.mktemp("planted_world")
    cfg = SyntheticAtlasConfig(
        n_cells=2400, n_genes=300, n_datasets=3, n_donors=2, seed=5, non_primary_fraction=0.0,
        rare_types=(RareType(PLANTED, 0.06, datasets=(0, 1, 2)),),
    )
    paths = write_h5ad_datasets(cfg, root / "h5ad")
    ingest(paths[:2], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 250, "n_components": 20},
                progress=False)
    return {"root": root, "index": root / "index", "query": paths[2]}


def run_cli(*args: str) -> str:
    """The output of ``scatlas -q ARGS`` (exceptions propagate), asserting that it succeeded."""
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The toy embedder plug-in (tests/plugin_pkg) installed for one test (its site dir), uninstalled after."""
    yield install(monkeypatch, tmp_path / "plugin")
    uninstall()
