"""Label transfer on real labelled data from ../shared/data/raw (skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import anndata
import pytest

from atlas import ingest
from index import build_index
from query import annotate

SHARED_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_RAW.is_dir(), reason="../shared/data/raw is not available"),
]


def _split(name: str, column: str, ref: str, query: str, tmp: Path) -> tuple[Path, Path]:
    adata = anndata.read_h5ad(SHARED_RAW / name)
    paths = []
    for value in (ref, query):
        path = tmp / f"{value}.h5ad"
        adata[adata.obs[column].astype(str) == value].copy().write_h5ad(path)
        paths.append(path)
    return paths[0], paths[1]


def test_kang2018_ctrl_to_stim(tmp_path: Path) -> None:
    """IFN-beta stimulated PBMCs annotated from the control ones (13 labels; the benchmark's tuning pair)."""
    ref, query = _split("kang2018_ifnb_ctrl_stim_2800.h5ad", "sample", "CTRL", "STIM", tmp_path)
    ingest([ref], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index")
    res = annotate(query, tmp_path / "index", truth_key="cell_type", progress=False)
    ev = res.report["evaluation"]["cell_type"]
    assert ev["n_known"] == 1490 and ev["n_absent"] == 0
    # measured 0.79 / 0.83 (scripts/bench_annotate.py); the floor leaves room for numerical noise only
    assert ev["accuracy"] > 0.75
    assert ev["macro_f1"] > 0.75
    assert ev["unknown_rate_known"] < 0.15


def test_tian_celseq2_to_dropseq(tmp_path: Path) -> None:
    """Three cell lines, CEL-seq2 reference, Drop-seq query (Ensembl ids)."""
    ref, query = _split("tian2019_3celllines_celseq2_dropseq.h5ad", "tech", "CELseq2", "Dropseq", tmp_path)
    ingest([ref], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index")
    res = annotate(query, tmp_path / "index", label_keys=["cell_line"], truth_key="cell_line", progress=False)
    ev = res.report["evaluation"]["cell_line"]
    assert ev["n_known"] == 225
    assert ev["accuracy"] > 0.9
