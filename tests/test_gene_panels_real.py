"""An atlas of public files measured on different gene panels (../shared/data/raw; skipped when it is absent).

Zheng's sorted PBMCs hold 8,863 genes, the symphony PBMC file 1,767 (its authors kept a panel); the two share 782.
The store records the genes each dataset measured: the genes a dataset lacks are imputed for its cells (not read as
zero expression, which split the atlas by file, so that a PBMC query of another lab mapped onto neither), and each
dataset ranks the genes it lacks last when the embedder's genes are chosen; ``gene_coverage=1`` (atlas/embed/pca.py)
selects only genes every dataset measures.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import duckdb
import numpy as np
import pytest

from scatlas.atlas import ingest
from scatlas.atlas.store import CELLS_DB, MEASURED_TABLE, AtlasStore
from scatlas.index import AtlasIndex, build_index
from scatlas.query import annotate

SHARED_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_RAW.is_dir(), reason="../shared/data/raw is not available"),
]


def _subset(name: str, column: str, value: str, path: Path) -> Path:
    adata = anndata.read_h5ad(SHARED_RAW / name)
    adata[adata.obs[column].astype(str) == value].copy().write_h5ad(path)
    return path


def _own_file_share(idx: AtlasIndex, k: int = 15) -> dict[str, float]:
    """Per file (zheng, symphony: its two datasets are one file), the share of its cells' k nearest atlas cells
    (self excluded) from the same file."""
    ids = np.arange(idx.n_cells, dtype=np.int64)
    found = idx.search(idx.vectors(ids), k=k + 1).ids[:, 1:]
    datasets = idx.cells(ids, columns=["dataset_id"])["dataset_id"].astype(str).to_numpy()
    files = np.where(np.char.startswith(datasets.astype(str), "sym_"), "symphony", "zheng")
    own = files[found] == files[:, None]
    return {f: float(own[files == f].mean()) for f in np.unique(files)}


def test_a_pbmc_atlas_of_two_gene_panels_maps_a_pbmc_query(tmp_path: Path) -> None:
    files = [SHARED_RAW / "zheng2017_pbmc_sorted_reference_mudan.h5ad",
             _subset("symphony_pbmc_10x_3chemistries.h5ad", "donor", "3pv2", tmp_path / "sym_3pv2.h5ad"),
             _subset("symphony_pbmc_10x_3chemistries.h5ad", "donor", "5p", tmp_path / "sym_5p.h5ad")]
    query = _subset("kang2018_ifnb_ctrl_stim_2800.h5ad", "sample", "CTRL", tmp_path / "kang_ctrl.h5ad")
    ingest(files, tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    measured = {rec.dataset_id: store.measured(rec.dataset_id) for rec in store.state.datasets}
    assert sorted(int(m.sum()) for m in measured.values()) == [1767, 1767, 8863]  # each dataset's own genes

    def run(name: str, coverage: float) -> tuple[set[str], dict[str, float], str, float]:
        out = tmp_path / name
        build_index(tmp_path / "atlas", out, embedder_options={"gene_coverage": coverage}, label_keys=[],
                    progress=False)
        with AtlasIndex.open(out) as idx:
            genes, share = set(idx.embedder.genes.keys), _own_file_share(idx)
        res = annotate(query, out, label_keys=["cell_type"], progress=False)
        unknown = float((res.predictions["cell_type_pred"].astype(str) == "unknown").mean())
        return genes, share, res.report["mapping"]["verdict"], unknown

    store_genes = store.genes.keys
    genes, share, verdict, unknown = run("shared_genes", 1.0)  # gene_coverage=1
    for mask in measured.values():  # every selected gene is measured by every dataset
        assert genes <= set(store_genes[mask])
    assert verdict == "maps_well" and unknown <= 0.03
    # the default, every gene a candidate: the genes a dataset lacks are imputed for its cells; the query maps
    genes0, _, verdict0, unknown0 = run("every_gene", 0.0)
    assert not all(genes0 <= set(store_genes[m]) for m in measured.values())
    assert verdict0 == "maps_well" and unknown0 <= 0.03
    # a store that did not record what each dataset measured (written before it did): the genes a dataset lacks
    # read as zero expression, the atlas splits by file and the same query maps onto neither
    with duckdb.connect(str(tmp_path / "atlas" / CELLS_DB)) as con:
        con.execute(f"DROP TABLE {MEASURED_TABLE}")
    assert AtlasStore.open(tmp_path / "atlas").measured(store.state.datasets[0].dataset_id) is None
    _, share_old, verdict_old, unknown_old = run("zeros", 0.0)
    assert verdict_old == "maps_poorly" and unknown_old > 0.5, (verdict_old, unknown_old)
    assert share_old["symphony"] > 0.95 and share["symphony"] < share_old["symphony"], (share, share_old)
