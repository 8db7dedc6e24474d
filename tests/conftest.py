"""Shared fixtures: small synthetic AnnData files in the conventions of real atlas dumps, and ../shared data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

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
