"""Label transfer end to end on tiny atlases: ingest -> build_index -> annotate -> write."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.atlas import ingest
from scatlas.atlas.errors import GeneOverlapError, InputError
from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.index import AtlasIndex, build_index
from scatlas.query import AnnotationResult, annotate
from scatlas.query.annotate import FAR_QUANTILE_WHEN_ON, MIN_GENE_OVERLAP_REFIT
from scatlas.query.vote import UNKNOWN
from tests.conftest import make_adata

HELD_OUT = "fibroblast"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Datasets 0 and 1 form the atlas; dataset 2 (with a type the atlas lacks) is the query."""
    root = tmp_path_factory.mktemp("annot_synth")
    cfg = SyntheticAtlasConfig(
        n_cells=3000,
        n_genes=400,
        n_datasets=3,
        n_donors=2,
        seed=3,
        rare_types=(),
        non_primary_fraction=0.0,
        absent_types={HELD_OUT: (0, 1)},
    )
    paths = write_h5ad_datasets(cfg, root / "h5ad")
    ingest(paths[:2], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 300, "n_components": 20})
    return {"index": root / "index", "query": paths[2]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 400-cell atlas of 3 planted types (genes with Ensembl ids and symbols)."""
    root = tmp_path_factory.mktemp("annot_tiny")
    make_adata(400, 60, seed=1, prefix="a").write_h5ad(root / "atlas_a.h5ad")
    ingest([root / "atlas_a.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 40, "n_components": 8})
    return {"index": root / "index", "root": root}


def test_synthetic_transfer_recovers_labels_and_abstains_on_absent_type(synthetic: dict[str, Path]) -> None:
    """With the settings for queries that may hold types the atlas lacks (min_confidence 0.5 + the far rule), the
    held-out type is mostly unknown; the defaults abstain less on it (the measured trade-off: on real pairs
    abstaining mostly loses known cells) while recovering the known types as well."""
    res = annotate(
        synthetic["query"], synthetic["index"], truth_key="cell_type", progress=False,
        min_confidence=0.5, far_quantile=FAR_QUANTILE_WHEN_ON,
    )
    best = res.report["evaluation"]["cell_type"]  # flat scores of the best class (no abstention)
    ev = best["with_abstention"]
    assert best["n_known"] > 500 and best["n_absent"] > 20
    assert best["accuracy"] > 0.9 and best["macro_f1"] > 0.9
    assert ev["accuracy"] > 0.9 and ev["macro_f1"] > 0.9
    assert best["absent_types"][HELD_OUT]["unknown_rate"] == 0.0
    absent = res.predictions["cell_type_level"][
        anndata.read_h5ad(synthetic["query"]).obs["cell_type"].astype(str).to_numpy() == HELD_OUT
    ]
    assert (absent == "fine").mean() < 0.5  # the rest is unknown or only a coarse ancestor
    assert ev["absent_types"][HELD_OUT]["unknown_rate"] > 0.25
    default = annotate(synthetic["query"], synthetic["index"], truth_key="cell_type", progress=False)
    ev_default = default.report["evaluation"]["cell_type"]["with_abstention"]
    assert ev_default["macro_f1"] > 0.9 and ev_default["unknown_rate_known"] < 0.01
    assert ev_default["absent_types"][HELD_OUT]["unknown_rate"] <= ev["absent_types"][HELD_OUT]["unknown_rate"]
    assert default.report["params"]["far_quantile"] is None
    p = res.predictions
    fine = p["cell_type_level"] == "fine"
    assert set(p.loc[fine, "cell_type_pred"]) <= set(best["per_class"]) | {"plasma cell"}
    assert (p.loc[fine, "cell_type_pred"].astype(str) == p.loc[fine, "cell_type_pred_fine"].astype(str)).all()
    assert ((p["cell_type_pred"] == UNKNOWN) == (p["cell_type_level"] == "unknown")).all()
    reasons = p.loc[p["cell_type_pred"] == UNKNOWN, "cell_type_unknown_reason"]
    assert set(reasons) <= {"low_confidence", "far_from_atlas", "out_of_atlas"} and len(reasons) > 0
    assert (
        res.predictions.loc[res.predictions["cell_type_pred"] != UNKNOWN, "cell_type_unknown_reason"] == ""
    ).all()


def test_outputs_shape_and_report(tiny: dict[str, Any]) -> None:
    q = make_adata(90, 60, seed=2, prefix="q")
    res = annotate(q, tiny["index"], k=10, label_keys=["cell_type", "donor_id"], progress=False)
    assert isinstance(res, AnnotationResult)
    p = res.predictions
    assert list(p.index) == list(q.obs_names)
    for key in ("cell_type", "donor_id"):
        assert {f"{key}_pred", f"{key}_confidence", f"{key}_unknown_reason"} <= set(p.columns)
        assert p[f"{key}_confidence"].between(0, 1).all()
    n = res.neighbors
    assert list(n.columns) == ["query_row", "query_cell", "atlas_cell_id", "rank", "similarity", "dataset_id"]
    assert len(n) == 90 * 10
    assert (n.groupby("query_row")["similarity"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert set(n["dataset_id"].astype(str)) == {"atlas_a"}
    rep = res.report
    assert rep["gene_overlap"]["fraction_of_target"] == 1.0
    assert rep["index"]["embedder"]["fingerprint"] and rep["index"]["manifest_sha256"]
    assert rep["labels"]["cell_type"]["counts"]
    assert rep["timings"]["total_s"] > 0
    assert rep["evaluation"] == {}
    json.dumps(rep)  # serialisable


def test_ensembl_and_symbol_queries_give_the_same_result(tiny: dict[str, Any]) -> None:
    by_ens = make_adata(80, 60, seed=5, prefix="q", symbols=False)
    by_sym = make_adata(80, 60, seed=5, prefix="q", ensembl=False)
    assert by_ens.var_names[0].startswith("ENSG") and by_sym.var_names[0].startswith("GENE")
    a = annotate(by_ens, tiny["index"], progress=False)
    b = annotate(by_sym, tiny["index"], progress=False)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    assert a.report["gene_overlap"]["n_matched"] == b.report["gene_overlap"]["n_matched"] > 0


def test_zero_gene_overlap_is_refused(tiny: dict[str, Any]) -> None:
    q = make_adata(30, 60, seed=2, gene_offset=10_000)
    with pytest.raises(GeneOverlapError, match="none of"):
        annotate(q, tiny["index"], progress=False)


def test_partial_gene_overlap_warns_then_refuses_below_the_predictors_floor(
    tiny: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    q = make_adata(60, 60, seed=2, prefix="q")
    with AtlasIndex.open(tiny["index"]) as idx:
        emb_genes = set(idx.embedder.genes.feature_id)  # type: ignore[attr-defined]
    used = [g for g in q.var_names if g in emb_genes]
    keep_most = [
        g for g in q.var_names if g not in used[: len(used) // 4]
    ]  # drop a quarter of the embedder genes
    with caplog.at_level("WARNING"):
        res = annotate(q[:, keep_most].copy(), tiny["index"], progress=False)
    frac = res.report["gene_overlap"]["fraction_of_target"]
    assert 0.5 <= frac < 0.8
    assert any("genes are in the query" in r.getMessage() for r in caplog.records)
    keep_few = [g for g in q.var_names if g not in used[: int(len(used) * 0.7)]]
    # the label heads decide and are refitted for the genes the query has: the floor is 15%
    res = annotate(q[:, keep_few].copy(), tiny["index"], progress=False)
    assert res.report["gene_overlap"]["fraction_of_target"] < 0.5
    assert res.report["params"]["min_gene_overlap"] == MIN_GENE_OVERLAP_REFIT
    assert res.report["params"]["heads_refit_for_query_genes"]["keys"] == ["cell_type"]
    # the neighbour vote has nothing to adapt: the floor stays at 50%
    with pytest.raises(GeneOverlapError, match="at least 50%"):
        annotate(q[:, keep_few].copy(), tiny["index"], progress=False, predictor="knn")
    res = annotate(q[:, keep_few].copy(), tiny["index"], progress=False, predictor="knn", min_gene_overlap=0.2)
    assert res.report["params"]["min_gene_overlap"] == 0.2
    keep_very_few = [g for g in q.var_names if g not in used[: int(len(used) * 0.9)]]
    with pytest.raises(GeneOverlapError, match="at least 15%"):
        annotate(q[:, keep_very_few].copy(), tiny["index"], progress=False)


def test_empty_query_is_refused(tiny: dict[str, Any], tmp_path: Path) -> None:
    q = make_adata(20, 60, seed=2)
    with pytest.raises(InputError, match="no cells"):
        annotate(q[:0].copy(), tiny["index"], progress=False)
    q[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(InputError, match="no cells"):
        annotate(tmp_path / "empty.h5ad", tiny["index"], progress=False)


def test_nan_expression_is_refused_with_the_cells_named(tiny: dict[str, Any], tmp_path: Path) -> None:
    q = make_adata(30, 60, seed=2, prefix="q")
    X = q.X.toarray()
    X[[3, 17], 5] = np.nan
    q.X = sp.csr_matrix(X)
    with pytest.raises(InputError, match=r"NaN or infinite values in 2 cell\(s\).*\[3, 17\]"):
        annotate(q, tiny["index"], progress=False)
    X[[3, 17], 5] = np.inf
    q.X = X  # dense, written to a file: the file reader checks too
    q.write_h5ad(tmp_path / "inf.h5ad")
    with pytest.raises(InputError, match="NaN or infinite"):
        annotate(tmp_path / "inf.h5ad", tiny["index"], progress=False)


def test_log1p_cpm_and_median_total_queries_give_the_counts_result(tiny: dict[str, Any]) -> None:
    q = make_adata(80, 60, seed=2, prefix="q")
    base = annotate(q, tiny["index"], progress=False).predictions
    X = sp.csr_matrix(q.X, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    for target in (1e6, float(np.median(totals))):  # log1p(CPM); scanpy's normalize_total default + log1p
        Y = sp.csr_matrix(sp.diags(target / totals) @ X)
        Y.data = np.log1p(Y.data)
        ln = anndata.AnnData(X=Y.astype(np.float32), obs=q.obs, var=q.var)
        res = annotate(ln, tiny["index"], progress=False)
        assert "rescaled to log1p CP10k" in res.report["query"]["expression"]
        pd.testing.assert_series_equal(res.predictions["cell_type_pred"], base["cell_type_pred"])
        np.testing.assert_allclose(res.predictions["cell_type_confidence"], base["cell_type_confidence"], atol=1e-3)


def test_cells_without_expression_on_the_embedders_genes_are_unknown(tiny: dict[str, Any]) -> None:
    q = make_adata(40, 60, seed=2, prefix="q")
    X = q.X.toarray()
    X[:4] = 0.0  # empty droplets
    q.X = sp.csr_matrix(X)
    res = annotate(q, tiny["index"], min_confidence=0.0, far_quantile=None, progress=False)
    p = res.predictions
    assert (p["cell_type_pred"].iloc[:4] == UNKNOWN).all()
    assert (p["cell_type_unknown_reason"].iloc[:4] == "no_expression").all()
    assert (p["cell_type_confidence"].iloc[:4] == 0).all()
    # every other cell is labelled (both abstention rules are off)
    assert (p["cell_type_pred"].iloc[4:] != UNKNOWN).all()
    assert res.report["labels"]["cell_type"]["unknown_reasons"] == {"no_expression": 4}


def test_unknown_label_key_lists_columns(tiny: dict[str, Any]) -> None:
    q = make_adata(20, 60, seed=2)
    with pytest.raises(InputError, match="available: .*cell_type"):
        annotate(q, tiny["index"], label_keys=["celltype_typo"], progress=False)


def test_unknown_truth_column_is_refused(tiny: dict[str, Any]) -> None:
    with pytest.raises(InputError, match="truth column"):
        annotate(make_adata(20, 60, seed=2), tiny["index"], truth_key="nope", progress=False)


def test_where_matching_no_atlas_cell_is_the_index_error(tiny: dict[str, Any]) -> None:
    q = make_adata(20, 60, seed=2)
    with pytest.raises(InputError, match="matches no cell"):
        annotate(q, tiny["index"], where="tissue = 'nowhere'", progress=False)
    res = annotate(q, tiny["index"], where="tissue = 'blood'", progress=False)
    assert res.report["params"]["atlas_cells_matching_where"] == 400


def test_where_leaving_one_label_warns_that_confidence_says_nothing(
    tiny: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    q = make_adata(20, 60, seed=2)
    with caplog.at_level(logging.WARNING, logger="scatlas"):
        res = annotate(q, tiny["index"], where="cell_type = 'B cell'", progress=False)
    assert "hold one 'cell_type' label" in caplog.text and "confidence 1 by construction" in caplog.text
    assert set(res.predictions["cell_type_pred"]) <= {"B cell", UNKNOWN}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scatlas"):
        annotate(q, tiny["index"], where="cell_type <> 'B cell'", progress=False)
    assert "hold one" not in caplog.text


def test_bad_parameters(tiny: dict[str, Any]) -> None:
    q = make_adata(20, 60, seed=2)
    for kw in (
        {"k": 0},
        {"min_confidence": 2.0},
        {"max_votes_per_dataset": 0},
        {"far_quantile": 0.3},
        {"align": "harmony"},
        {"label_keys": []},
    ):
        with pytest.raises(InputError):
            annotate(q, tiny["index"], progress=False, **kw)  # type: ignore[arg-type]


def test_query_labels_absent_from_atlas_are_evaluated_apart(tiny: dict[str, Any]) -> None:
    q = make_adata(150, 60, seed=2, prefix="q", cell_types=("T cell", "B cell", "monocyte", "NK cell"))
    res = annotate(q, tiny["index"], truth_key="cell_type", progress=False)
    ev = res.report["evaluation"]["cell_type"]
    assert ev["n_absent"] == int((q.obs["cell_type"] == "NK cell").sum()) > 0
    assert "NK cell" in ev["absent_types"] and "NK cell" not in ev["per_class"]
    assert ev["abstention_rate_absent"] is not None
    assert ev["accuracy_assigned"] > 0.9  # abstentions aside, the known types are transferred


def test_cap_per_dataset_runs_and_is_reported(tiny: dict[str, Any]) -> None:
    q = make_adata(40, 60, seed=2)
    res = annotate(q, tiny["index"], k=10, max_votes_per_dataset=3, progress=False)
    assert res.report["params"]["max_votes_per_dataset"] == 3
    # one atlas dataset: only its 3 nearest vote, so with uniform weights the confidence comes in thirds
    res_u = annotate(
        q,
        tiny["index"],
        k=10,
        max_votes_per_dataset=3,
        weighting="uniform",
        class_balance=0.0,
        progress=False,
    )
    conf_u = res_u.predictions["cell_type_confidence"].to_numpy()
    np.testing.assert_allclose(conf_u * 3, np.round(conf_u * 3), atol=1e-5)


def test_input_unchanged_and_outputs_written_atomically(tiny: dict[str, Any], tmp_path: Path) -> None:
    q = make_adata(100, 60, seed=2, prefix="q", cell_types=("T cell", "B cell", "monocyte", "NK cell"))
    qpath = tmp_path / "query.h5ad"
    q.write_h5ad(qpath)
    before = _sha(qpath)
    res = annotate(qpath, tiny["index"], truth_key="cell_type", progress=False)
    out = tmp_path / "out"
    written = res.write(
        out / "annotated.h5ad", out / "neighbors.parquet", out / "report.json", out / "confusion.png"
    )
    assert _sha(qpath) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "annotated.h5ad",
        "confusion.png",
        "neighbors.parquet",
        "report.json",
    ]
    assert set(written) == {"h5ad", "neighbors", "report", "confusion"}
    ann = anndata.read_h5ad(out / "annotated.h5ad")
    orig = anndata.read_h5ad(qpath)
    assert list(ann.obs_names) == list(orig.obs_names)
    assert (ann.X != orig.X).nnz == 0
    for col in orig.obs.columns:
        assert (ann.obs[col].astype(str) == orig.obs[col].astype(str)).all()
    assert (
        ann.obs["cell_type_pred"].astype(str).to_numpy() == res.predictions["cell_type_pred"].astype(str)
    ).all()
    assert "cell_type_confidence" in ann.obs and "cell_type_unknown_reason" in ann.obs
    nb = pd.read_parquet(out / "neighbors.parquet")
    assert len(nb) == len(res.neighbors)
    assert json.loads((out / "report.json").read_text())["evaluation"]["cell_type"]["n_absent"] > 0
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="query file itself"):
        res.write(qpath)
    assert _sha(qpath) == before


def test_in_memory_query_is_not_modified(tiny: dict[str, Any], tmp_path: Path) -> None:
    q = make_adata(60, 60, seed=2, prefix="q")
    q.obs["note"] = ["x"] * q.n_obs  # a string column anndata would turn into a categorical when writing
    obs_before, X_before = q.obs.copy(), q.X.copy()
    res = annotate(q, tiny["index"], progress=False)
    res.write(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(q.obs, obs_before)
    assert q.obs["note"].dtype == object
    assert abs(q.X - X_before).nnz == 0
    assert "cell_type_pred" not in q.obs
    assert "cell_type_pred" in anndata.read_h5ad(tmp_path / "a.h5ad").obs


def test_failed_write_leaves_nothing(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_adata(30, 60, seed=2, prefix="q")
    qpath = tmp_path / "q.h5ad"
    q.write_h5ad(qpath)
    res = annotate(qpath, tiny["index"], progress=False)
    out = tmp_path / "out"
    out.mkdir()

    def broken_copy(src: Any, dst: Any) -> None:
        Path(dst).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("scatlas.query.outputs.shutil.copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        res.write(out / "a.h5ad")
    assert list(out.iterdir()) == []
    with pytest.raises(InputError, match="truth"):
        res.write(None, confusion_png=out / "c.png")
    assert list(out.iterdir()) == []


def test_opened_index_is_accepted_and_left_open(tiny: dict[str, Any]) -> None:
    q = make_adata(20, 60, seed=2)
    with AtlasIndex.open(tiny["index"]) as idx:
        a = annotate(q, idx, progress=False, align="none")
        b = annotate(q, idx, progress=False, align="none")
        pd.testing.assert_frame_equal(a.predictions, b.predictions)
