"""The expression match on a real atlas mixing gene panels: zheng2017's sorted PBMCs (8,863 genes) and pbmc3k (its
2,000 variable genes), whose missing genes the store holds as zeros. Lung cancer cell lines (tian2019 CEL-seq2,
whole transcriptome) must not map; Kang's control PBMCs (another lab) must."""

from __future__ import annotations

from pathlib import Path

import anndata
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT.parent / "shared" / "data" / "raw"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/raw is not available"),
]


def _symbols(path: Path) -> Path:
    """tian2019's CEL-seq2/Drop-seq cells with their Ensembl ids as symbols (CellTypist's GENCODE table), as a
    query a user of a symbol-named atlas would bring."""
    celltypist = pytest.importorskip("celltypist")
    table = Path(celltypist.__file__).parent / "data" / "samples" / "GENCODEv44_Gene_id2name.csv"
    if not table.is_file():
        pytest.skip("CellTypist's GENCODE id-to-name table is not installed")
    names = pd.read_csv(table, header=None)
    id2name = dict(zip(names[0].str.split(".").str[0], names[1], strict=True))
    cells = anndata.read_h5ad(RAW / "tian2019_3celllines_celseq2_dropseq.h5ad")
    symbols = [id2name.get(g) for g in cells.var_names]
    cells = cells[:, [s is not None for s in symbols]].copy()
    cells.var_names = [s for s in symbols if s is not None]
    cells.var_names_make_unique()
    out = path / "celllines.h5ad"
    cells.write_h5ad(out)
    return out


def test_an_atlas_of_two_gene_panels_tells_cell_lines_from_blood(tmp_path):
    from scatlas.atlas import ingest
    from scatlas.index import build_index
    from scatlas.query import annotate

    celllines = _symbols(tmp_path)
    ingest([RAW / "zheng2017_pbmc_sorted_reference_mudan.h5ad"], tmp_path / "atlas", progress=False)
    ingest([RAW / "pbmc3k_seurat_labels_clustifyr.h5ad"], tmp_path / "atlas", obs_map={"classified": "cell_type"},
           progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", progress=False)

    lines = annotate(celllines, tmp_path / "index", progress=False, keep_neighbors=False)
    expression = lines.report["mapping"]["expression"]
    assert expression["status"] == "on" and expression["n_groups"] == 2
    # before each dataset was compared on the genes it measured: cut 0.32, 3.2% unknown, "maps well"
    assert lines.report["mapping"]["verdict"] == "maps_poorly"
    assert (lines.predictions["cell_type_pred"] == "unknown").mean() >= 0.9, expression
    # turned by expression (it maps as atlas cells do by similarity): a cell keeps a label only if it matches well
    assert expression["cuts_applied"] == "strict" and expression["cells_out"] >= expression["cells_below"]

    kang = anndata.read_h5ad(RAW / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    kang = kang[kang.obs["sample"].astype(str) == "CTRL"].copy()
    blood = annotate(kang, tmp_path / "index", progress=False, keep_neighbors=False)
    assert blood.report["mapping"]["verdict"] == "maps_well"
    assert (blood.predictions["cell_type_pred"] == "unknown").mean() <= 0.03
    assert "weakly" not in blood.report["mapping"].get("caveat", "")  # a blood atlas' check is no weak one


def test_an_atlas_whose_datasets_match_weakly_says_its_check_is_weak(tmp_path):
    """The shared pancreas file: two types (beta, ductal) on 1,403 genes from three labs of different technologies.
    Its datasets match each other's profiles so weakly that blood cells pass the expression match (a tryout: every
    PBMC called beta, "maps well"): the verdict carries the caveat, on the CLI too."""
    from click.testing import CliRunner

    from scatlas.atlas import ingest
    from scatlas.cli import cli
    from scatlas.index import build_index

    pancreas = anndata.read_h5ad(RAW / "pancreas_3studies_beta_ductal_cepo.h5ad")
    files = []
    for batch in sorted(pancreas.obs["batch"].astype(str).unique()):
        files.append(tmp_path / f"{batch.replace(' ', '_')}.h5ad")
        pancreas[pancreas.obs["batch"].astype(str) == batch].copy().write_h5ad(files[-1])
    ingest(files, tmp_path / "atlas", obs_map={"cellTypes": "cell_type"}, progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", progress=False)
    res = CliRunner().invoke(cli, ["annotate", str(RAW / "zheng2017_pbmc_sorted_reference_mudan.h5ad"), "--index",
                                   str(tmp_path / "index"), "--out", str(tmp_path / "zheng.h5ad"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "match each other's cell-type profiles weakly" in res.output and "known markers" in res.output
