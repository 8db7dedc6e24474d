"""Supervised label heads: the softmax fitter, training with the index, use by annotate, refusal of stale heads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import scatlas.index.heads_training as heads_training
import scatlas.index.label_heads as label_heads
from scatlas.atlas import ingest
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, build_index
from scatlas.index.heads_training import train_label_heads
from scatlas.index.label_heads import HEADS_DIR, HEADS_FILE
from scatlas.index.softmax import balanced_sample_weights, fit_softmax
from scatlas.index.vectors import l2_normalize
from scatlas.query import annotate
from scatlas.query.vote import UNKNOWN
from tests.conftest import make_adata

# -- the fitter --------------------------------------------------------------------------------------------------


def _blobs(n_per: tuple[int, ...], d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(len(n_per), d))
    X = np.concatenate([rng.normal(c, 1.0, size=(n, d)) for c, n in zip(centres, n_per, strict=True)])
    y = np.repeat(np.arange(len(n_per)), n_per)
    return X, y


def test_softmax_reaches_the_optimum_of_its_objective() -> None:
    """At the returned (W, b) the gradient of  sum_i s_i CE_i + ||W||^2 / (2C)  vanishes (first-order optimality)."""
    X, y = _blobs((60, 25, 10))
    C = 0.5
    m = fit_softmax(X, y, 3, C=C)
    P = m.predict_proba(X).astype(np.float64)
    s = balanced_sample_weights(y, 3)
    R = (P - np.eye(3)[y]) * s[:, None]
    grad_W = X.T @ R + m.weights.astype(np.float64) / C
    grad_b = R.sum(axis=0)
    scale = float(np.abs(X.T @ (np.eye(3)[y] * s[:, None])).max())
    assert np.abs(grad_W).max() < 1e-3 * scale
    assert np.abs(grad_b).max() < 1e-3 * scale


def test_softmax_balances_classes_and_ignores_absent_ones() -> None:
    X, y = _blobs((300, 6), seed=1)
    m = fit_softmax(X, y, 3, C=1.0)  # class 2 has no sample
    P = m.predict_proba(X)
    assert (P.argmax(axis=1)[y == 1] == 1).mean() == 1.0  # the 6-cell class is not swamped
    assert P[:, 2].max() < 1e-6  # never predicted
    assert np.allclose(P.sum(axis=1), 1.0, atol=1e-5)


def test_softmax_refuses_bad_input() -> None:
    X, y = _blobs((5, 5))
    with pytest.raises(InputError, match="class codes"):
        fit_softmax(X, y, 1)
    with pytest.raises(InputError, match="C must be"):
        fit_softmax(X, y, 2, C=0.0)
    with pytest.raises(InputError, match="at least one"):
        fit_softmax(X[:0], y[:0], 2)


# -- with an index -----------------------------------------------------------------------------------------------


def _two_dataset_atlas(root: Path) -> Path:
    a = make_adata(300, 60, seed=1, prefix="a")
    b = make_adata(200, 60, seed=2, prefix="b")
    a.obs["dataset_id"] = "A"
    b.obs["dataset_id"] = "B"
    a.write_h5ad(root / "a.h5ad")
    b.write_h5ad(root / "b.h5ad")
    ingest([root / "a.h5ad", root / "b.h5ad"], root / "atlas", progress=False)
    return root / "atlas"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("heads")
    atlas = _two_dataset_atlas(root)
    build_index(atlas, root / "index", embedder_options={"n_hvg": 40, "n_components": 8}, progress=False)
    return {"root": root, "atlas": atlas, "index": root / "index"}


def test_build_trains_heads_for_cell_type_by_default(built: dict[str, Any]) -> None:
    meta = json.loads((built["index"] / HEADS_DIR / HEADS_FILE).read_text())
    # cell_type only (donor_id also looks like a label: `--label-key all` would train it too)
    assert list(meta["heads"]) == ["cell_type"]
    entry = meta["heads"]["cell_type"]
    assert entry["classes"] == ["B cell", "T cell", "monocyte"]
    assert set(entry["features"]) == {"genes", "embedding"}
    assert entry["n_train"] == 500  # every cell: fewer than the per-label cap
    with AtlasIndex.open(built["index"]) as idx:
        head = idx.label_heads()["cell_type"]
        assert head.classes == entry["classes"]


def test_training_sample_is_capped_per_label_and_spread_over_datasets(built: dict[str, Any]) -> None:
    with AtlasIndex.open(built["index"]) as idx:
        con = idx.connect()
        config = heads_training.HeadsConfig(label_keys=("cell_type",), max_cells_per_label=40)
        ids, labels = heads_training.sample_training_cells(con, "cell_type", config)
        meta = idx.cells(ids, columns=["cell_type", "dataset_id"])
    assert np.all(np.diff(ids) > 0)
    counts = pd.Series(labels).value_counts()
    assert set(counts) == {40}
    assert (meta["cell_type"].astype(str).to_numpy() == labels).all()
    per_ds = meta.groupby(["cell_type", "dataset_id"], observed=True).size()
    assert set(per_ds) == {20}  # each label's 40 cells split evenly between datasets A and B


def test_annotate_uses_heads_and_recovers_labels(built: dict[str, Any]) -> None:
    q = make_adata(120, 60, seed=7, prefix="q")
    res = annotate(q, built["index"], truth_key="cell_type", progress=False)
    assert res.report["params"]["predicted_by"] == {"cell_type": "heads"}
    assert res.report["evaluation"]["cell_type"]["accuracy"] > 0.95
    conf = res.predictions["cell_type_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()
    knn = annotate(q, built["index"], truth_key="cell_type", predictor="knn", progress=False)
    assert knn.report["params"]["predicted_by"] == {"cell_type": "knn"}


def test_where_restricts_the_heads_to_the_selected_labels(built: dict[str, Any]) -> None:
    q = make_adata(90, 60, seed=8, prefix="q")
    res = annotate(q, built["index"], where="cell_type <> 'monocyte'", progress=False)
    pred = set(res.predictions["cell_type_pred"].astype(str))
    assert "monocyte" not in pred
    assert pred <= {"B cell", "T cell", UNKNOWN}


def test_heads_predictor_without_heads_and_cap_with_heads_are_refused(built: dict[str, Any]) -> None:
    q = make_adata(20, 60, seed=9)
    with pytest.raises(InputError, match="no label head for"):
        annotate(q, built["index"], label_keys=["tissue"], predictor="heads", progress=False)
    with pytest.raises(InputError, match="max_votes_per_dataset"):
        annotate(q, built["index"], predictor="heads", max_votes_per_dataset=2, progress=False)
    with pytest.raises(InputError, match="predictor must be"):
        annotate(q, built["index"], predictor="vote", progress=False)  # type: ignore[arg-type]


def test_retraining_is_skipped_when_settings_match_and_failure_keeps_old_heads(
    built: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    heads_json = built["index"] / HEADS_DIR / HEADS_FILE
    before = heads_json.read_bytes()

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(heads_training, "fit_softmax", boom)
    keys = json.loads(before)["config"]["label_keys"]  # what the build chose
    # same settings: nothing is retrained (the broken fitter is never called)
    train_label_heads(built["atlas"], built["index"], keys, progress=False)
    # other settings: training fails, and the heads already there stay as they were; no temporary dir is left
    with pytest.raises(RuntimeError, match="killed"):
        train_label_heads(built["atlas"], built["index"], keys, max_cells_per_label=50, progress=False)
    assert heads_json.read_bytes() == before
    assert not list(built["index"].glob(f".{HEADS_DIR}.*"))  # noqa: PIE810


def test_heads_of_another_build_are_refused(tmp_path: Path) -> None:
    atlas = _two_dataset_atlas(tmp_path)
    build_index(atlas, tmp_path / "index", embedder_options={"n_hvg": 40, "n_components": 8}, progress=False)
    manifest = tmp_path / "index" / "manifest.json"
    payload = json.loads(manifest.read_text())
    payload["built"] = "another time"
    manifest.write_text(json.dumps(payload))
    q = make_adata(10, 60, seed=3)
    with pytest.raises(IndexFormatError, match="another build"):
        annotate(q, tmp_path / "index", progress=False)
    # the neighbour vote does not read the heads and still works
    res = annotate(q, tmp_path / "index", predictor="knn", progress=False)
    assert len(res.predictions) == 10
    # `scatlas info` still describes the index and says why its heads are unusable
    for args in (["info", str(tmp_path / "index")], ["info", "--index", str(tmp_path / "index")]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        assert "label heads  unusable:" in out.output and "another build" in out.output
    out = CliRunner().invoke(cli, ["info"])
    assert out.exit_code == 2 and "give the index directory once" in out.output


def test_label_key_without_labels_is_refused_but_auto_skips(tmp_path: Path) -> None:
    a = make_adata(100, 60, seed=1)
    a.obs["cell_type"] = pd.Categorical([None] * 100, categories=["x"])
    a.write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "atlas", progress=False)
    opts = {"n_hvg": 40, "n_components": 8}
    build_index(tmp_path / "atlas", tmp_path / "index", embedder_options=opts, progress=False)
    assert not (tmp_path / "index" / HEADS_DIR).exists()  # the default (cell_type) has no labels: no heads
    build_index(tmp_path / "atlas", tmp_path / "index", embedder_options=opts, label_keys="all", progress=False)
    heads = json.loads((tmp_path / "index" / HEADS_DIR / HEADS_FILE).read_text())["heads"]
    assert set(heads) == {"donor_id"}  # the other text column with labels; tissue has one value
    with pytest.raises(InputError, match="no atlas cell has a 'cell_type' label"):
        train_label_heads(tmp_path / "atlas", tmp_path / "index", ["cell_type"], progress=False)
    with pytest.raises(InputError, match="not a column"):
        train_label_heads(tmp_path / "atlas", tmp_path / "index", ["nope"], progress=False)


def test_cli_build_label_heads_and_annotate_predictor(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scatlas.cli import cli

    atlas = _two_dataset_atlas(tmp_path)
    runner = CliRunner()
    common = ["build", "--atlas", str(atlas), "--embedder-option", "n_hvg=40", "--embedder-option", "n_components=8",
              "--no-progress"]
    res = runner.invoke(cli, [*common, "--index", str(tmp_path / "plain"), "--no-label-heads"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "plain" / HEADS_DIR).exists()
    res = runner.invoke(cli, [*common, "--index", str(tmp_path / "x"), "--no-label-heads", "--label-key", "cell_type"])
    assert res.exit_code != 0 and "exclude each other" in res.output
    query = tmp_path / "q.h5ad"
    make_adata(30, 60, seed=5, prefix="q").write_h5ad(query)
    res = runner.invoke(cli, ["annotate", str(query), "--index", str(tmp_path / "plain"), "--out",
                              str(tmp_path / "o.h5ad"), "--predictor", "heads", "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "no label head" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, [*common, "--index", str(tmp_path / "plain"), "--label-key", "cell_type",
                              "--head-cells-per-label", "50"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "plain" / HEADS_DIR / HEADS_FILE).read_text())
    assert meta["config"]["max_cells_per_label"] == 50 and meta["heads"]["cell_type"]["n_train"] == 150
    res = runner.invoke(cli, ["annotate", str(query), "--index", str(tmp_path / "plain"), "--out",
                              str(tmp_path / "o.h5ad"), "--predictor", "heads", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["params"]["predicted_by"] == {"cell_type": "heads"}
    # a query without a third of the genes: heads refitted by default, as trained with --missing-genes impute
    partial = tmp_path / "partial.h5ad"
    q = make_adata(30, 60, seed=5, prefix="q")
    q[:, q.var_names[20:]].copy().write_h5ad(partial)
    base = ["annotate", str(partial), "--index", str(tmp_path / "plain"), "--out", str(tmp_path / "p.h5ad"),
            "--no-progress"]
    res = runner.invoke(cli, base)
    assert res.exit_code == 0, res.output
    assert "label heads for cell_type refitted for the query's" in res.output
    assert json.loads((tmp_path / "p.report.json").read_text())["params"]["missing_genes"] == "refit"
    res = runner.invoke(cli, [*base, "--missing-genes", "impute"])
    assert res.exit_code == 0, res.output
    assert "refitted" not in res.output
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["params"]["missing_genes"] == "impute" and report["params"]["heads_refit_for_query_genes"] is None


@pytest.mark.gpu
def test_softmax_on_gpu_matches_cpu() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    X, y = _blobs((200, 80, 30), d=16, seed=4)
    cpu = fit_softmax(X, y, 3, C=0.5)
    gpu = fit_softmax(X, y, 3, C=0.5, device="cuda")
    assert (cpu.predict_proba(X).argmax(1) == gpu.predict_proba(X).argmax(1)).mean() > 0.99
    np.testing.assert_allclose(cpu.predict_proba(X), gpu.predict_proba(X), atol=1e-2)


# -- refitting for a query that lacks genes ------------------------------------------------------------------------


def _sample_gene_features(index_dir: Path, atlas: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids of the heads' training cells, their gene features computed afresh from the store)."""
    from scatlas.atlas.store import AtlasStore

    with AtlasIndex.open(index_dir) as idx:
        ids = np.unique(np.concatenate([
            heads_training.sample_training_cells(idx.connect(), key, heads_training.HeadsConfig(label_keys=(key,)))[0]
            for key in idx.label_heads()
        ]))
        store = AtlasStore.open(atlas)
        parts = {int(c.ids[0]): idx.embedder.gene_features(c) for c in store.read_cells(ids, with_X=True)}
        return ids, np.concatenate([parts[k] for k in sorted(parts)])


def test_training_sample_is_kept_and_refit_is_the_fit_on_the_present_genes(built: dict[str, Any]) -> None:
    heads_dir = built["index"] / HEADS_DIR
    meta = json.loads((heads_dir / HEADS_FILE).read_text())
    ids, fresh = _sample_gene_features(built["index"], built["atlas"])
    assert meta["training_sample"]["cells"] == len(ids) == 500
    G = label_heads.load_training_sample(heads_dir)
    assert G is not None and G.shape == fresh.shape == (500, 40)
    np.testing.assert_allclose(G.toarray(), fresh, rtol=1e-3, atol=1e-3)  # float16 values

    rng = np.random.default_rng(0)
    present = np.zeros(40, dtype=bool)
    present[rng.choice(40, size=25, replace=False)] = True
    with AtlasIndex.open(built["index"]) as idx:
        heads = idx.label_heads()
        emb = idx.embedder

        def embed(g: np.ndarray) -> np.ndarray:
            return l2_normalize(emb.transform_gene_features(g, present))

        refit = label_heads.refit_for_genes(heads, present, embed)
    head = refit["cell_type"]
    with np.load(heads_dir / heads["cell_type"].record["file"]) as z:
        rows, y = z["train_rows"], z["train_y"]
    Gd = G.toarray()
    expect_genes = fit_softmax(
        Gd[:, present][rows], y, 3, C=label_heads.DEFAULT_C_GENES * 40 / 25  # C x all genes / genes present
    )
    np.testing.assert_allclose(head.models["genes"].weights[present], expect_genes.weights, atol=1e-5)
    assert not head.models["genes"].weights[~present].any()  # a missing gene carries no weight
    expect_emb = fit_softmax(embed(Gd)[rows], y, 3, C=label_heads.DEFAULT_C_EMBEDDING)
    np.testing.assert_allclose(head.models["embedding"].weights, expect_emb.weights, atol=1e-5)
    assert head.record["refit_for_genes"] == 25
    assert "refit_for_genes" not in heads["cell_type"].record  # the loaded heads are not modified


def test_annotate_refits_the_heads_for_a_query_missing_genes(built: dict[str, Any]) -> None:
    q = make_adata(150, 60, seed=7, prefix="q")
    with AtlasIndex.open(built["index"]) as idx:
        emb_genes = set(idx.embedder.gene_feature_names or [])
    in_emb = [g for g in q.var_names if g in emb_genes]
    drop = in_emb[:3] + in_emb[5:8] + in_emb[20:30]  # some planted markers of two types, and ten other genes
    partial = q[:, [g for g in q.var_names if g not in set(drop)]].copy()
    kw: dict[str, Any] = {"truth_key": "cell_type", "min_gene_overlap": 0.5, "min_confidence": 0.0,
                          "far_quantile": None, "progress": False}
    res = annotate(partial, built["index"], **kw)
    refit = res.report["params"]["heads_refit_for_query_genes"]
    assert refit["genes_present"] == 24 and refit["genes"] == 40 and refit["keys"] == ["cell_type"]
    accuracy = res.report["evaluation"]["cell_type"]["accuracy"]
    # the heads as trained, reading the missing genes as their atlas means, do worse (0.95 against 0.99)
    imputed = annotate(partial, built["index"], missing_genes="impute", **kw)
    assert imputed.report["params"]["heads_refit_for_query_genes"] is None
    assert accuracy > 0.98 and accuracy > imputed.report["evaluation"]["cell_type"]["accuracy"]
    with pytest.raises(InputError, match="missing_genes must be one of refit, impute"):
        annotate(partial, built["index"], missing_genes="drop", **kw)  # type: ignore[arg-type]
    full = annotate(q, built["index"], truth_key="cell_type", progress=False)
    assert full.report["params"]["heads_refit_for_query_genes"] is None


def test_a_nearly_complete_gene_set_is_not_refitted(built: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """At or above REFIT_BELOW of the embedder's genes the heads are used as trained (the missing genes read as their
    atlas means): refitting for a few missing genes gained nothing on the bench and costs seconds to a minute."""
    import importlib

    q = make_adata(60, 60, seed=8, prefix="q")
    with AtlasIndex.open(built["index"]) as idx:
        emb_genes = set(idx.embedder.gene_feature_names or [])
    drop = [g for g in q.var_names if g in emb_genes][:4]  # 36 of 40: 90%
    partial = q[:, [g for g in q.var_names if g not in set(drop)]].copy()
    kw: dict[str, Any] = {"min_gene_overlap": 0.5, "progress": False, "keep_neighbors": False}
    assert annotate(partial, built["index"], **kw).report["params"]["heads_refit_for_query_genes"] is not None
    monkeypatch.setattr(importlib.import_module("scatlas.query.annotate"), "REFIT_BELOW", 0.9)
    assert annotate(partial, built["index"], **kw).report["params"]["heads_refit_for_query_genes"] is None


def test_heads_without_a_training_sample_are_used_as_they_are_and_retrained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    atlas = _two_dataset_atlas(tmp_path)
    index = tmp_path / "index"
    build_index(atlas, index, embedder_options={"n_hvg": 40, "n_components": 8}, label_keys=["cell_type"],
                progress=False)
    heads_json = index / HEADS_DIR / HEADS_FILE
    meta = json.loads(heads_json.read_text())  # as trained before the sample was kept
    del meta["training_sample"]
    heads_json.write_text(json.dumps(meta))
    (index / HEADS_DIR / label_heads.SAMPLE_FILE).unlink()
    manifest = index / "manifest.json"  # heads from before the manifest recorded them
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "heads_files"}))
    q = make_adata(60, 60, seed=7, prefix="q")
    partial = q[:, q.var_names[10:]].copy()
    with caplog.at_level("WARNING"):
        res = annotate(partial, index, min_gene_overlap=0.5, progress=False)
    assert "cannot be refitted" in caplog.text
    assert res.report["params"]["heads_refit_for_query_genes"]["keys"] == []
    # the same build settings retrain them, since they lack what refitting needs
    train_label_heads(atlas, index, ["cell_type"], progress=False)
    assert (index / HEADS_DIR / label_heads.SAMPLE_FILE).is_file()
