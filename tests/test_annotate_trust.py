"""Annotation you can trust, through the CLI: every output column, ontology fallback, out-of-atlas queries, species
refusal, heads only where asked, and a truth column that shares no label with the atlas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.cli import cli

KEY = "cell_type"
COLUMNS = ("pred", "pred_ontology_term_id", "pred_fine", "confidence", "level", "unknown_reason", "runner_up",
           "runner_up_proba", "mapping_score")


def _run(*args: str) -> Any:
    result = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic blood-like atlas of two datasets (CL names as labels), and a third dataset as a query."""
    root = tmp_path_factory.mktemp("trust")
    cfg = SyntheticAtlasConfig(n_cells=3000, n_genes=300, n_datasets=3, n_donors=2, seed=5, rare_types=(),
                               non_primary_fraction=0.0)
    paths = write_h5ad_datasets(cfg, root / "h5ad")
    assert _run("ingest", *paths[:2], "--atlas", root / "atlas", "--no-progress").exit_code == 0
    res = _run("build", "--atlas", root / "atlas", "--index", root / "index", "--embedder-option", "n_hvg=250",
               "--embedder-option", "n_components=20", "--no-progress")
    assert res.exit_code == 0, res.output
    # the build says how labels became classes: the synthetic types are CL names, each its own term
    assert "classes      cell_type:" in res.output and "with a Cell Ontology term" in res.output
    assert "label heads  cell_type:" in res.output and "donor_id:" not in res.output  # heads only where asked
    return {"root": root, "index": root / "index", "query": paths[2]}


def _annotate(built: dict[str, Path], query: Path, out: str, *extra: str) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    out_path = built["root"] / out
    res = _run("annotate", query, "--index", built["index"], "--out", out_path, "--no-progress", *extra)
    if res.exit_code != 0:
        return res, pd.DataFrame(), {}
    report = json.loads(out_path.with_suffix("").with_name(out_path.stem + ".report.json").read_text())
    return res, anndata.read_h5ad(out_path).obs, report


def test_every_output_column_and_the_probabilities(built: dict[str, Path]) -> None:
    res, obs, report = _annotate(built, built["query"], "same.h5ad", "--truth-key", KEY)
    assert res.exit_code == 0, res.output
    for c in COLUMNS:
        assert f"{KEY}_{c}" in obs.columns, c
    adata = anndata.read_h5ad(built["root"] / "same.h5ad")
    proba, classes = adata.obsm[f"{KEY}_proba"], list(adata.uns[f"{KEY}_proba_classes"])
    assert proba.shape == (adata.n_obs, len(classes))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-4)
    fine = obs[f"{KEY}_level"] == "fine"
    assert (obs.loc[fine, f"{KEY}_pred"].astype(str) == obs.loc[fine, f"{KEY}_pred_fine"].astype(str)).all()
    assert obs.loc[fine, f"{KEY}_pred_ontology_term_id"].str.fullmatch(r"CL:\d{7}").all()
    best = np.asarray(classes)[proba.argmax(axis=1)]
    assert (best == obs[f"{KEY}_pred_fine"].astype(str).to_numpy()).mean() > 0.99
    # a same-tissue query of other donors: it maps well, few unknowns, the ontology-aware scores are reported
    assert report["mapping"]["verdict"] == "maps_well"
    assert (obs[f"{KEY}_pred"] == "unknown").mean() <= 0.03
    ev = report["evaluation"][KEY]
    assert ev["ontology"]["ontology_accuracy"] > 0.95 and ev["ontology"]["fine_rate"] > 0.85
    assert ev["ontology"]["ece"] is not None
    assert "ontology-aware accuracy" in res.output and "(by label head)" in res.output


def test_truth_labels_absent_from_the_atlas_do_not_crash(built: dict[str, Path], tmp_path: Path) -> None:
    q = anndata.read_h5ad(built["query"])
    q.obs["other"] = pd.Categorical(np.where(np.arange(q.n_obs) % 2, "Zorblax cells", "Quux"))
    q.write_h5ad(tmp_path / "q.h5ad")
    res, _, report = _annotate(built, tmp_path / "q.h5ad", "absent.h5ad", "--truth-key", "other")
    assert res.exit_code == 0, res.output
    assert "truth labels the atlas does not have" in res.output
    ev = report["evaluation"][KEY]
    assert ev["n_known"] == 0 and ev["accuracy"] is None and ev["macro_f1"] is None
    assert set(ev["truth_labels_absent_from_atlas"]) == {"Zorblax cells", "Quux"}
    assert "n/a" in res.output


def test_a_query_that_maps_poorly_is_unknown_out_of_atlas(built: dict[str, Path], tmp_path: Path) -> None:
    """Shuffling the query's gene names makes profiles no atlas cell has: another tissue, as the atlas sees it."""
    q = anndata.read_h5ad(built["query"])
    order = np.random.default_rng(0).permutation(q.n_vars)
    foreign = anndata.AnnData(X=q.X, obs=q.obs[[KEY]].copy(), var=q.var.iloc[order].copy())
    foreign.write_h5ad(tmp_path / "foreign.h5ad")
    res, obs, report = _annotate(built, tmp_path / "foreign.h5ad", "foreign_out.h5ad")
    assert res.exit_code == 0, res.output
    assert res.output.count("the query maps poorly onto the atlas (another tissue") == 1, res.output  # said once
    assert "WARNING" in res.output
    assert report["mapping"]["verdict"] == "maps_poorly" and report["mapping"]["reasons"]
    assert (obs[f"{KEY}_pred"] == "unknown").mean() >= 0.9
    assert (obs.loc[obs[f"{KEY}_pred"] == "unknown", f"{KEY}_unknown_reason"] == "out_of_atlas").mean() > 0.9
    # --no-mapping-check reports the verdict but labels anyway
    res2, obs2, report2 = _annotate(built, tmp_path / "foreign.h5ad", "foreign_nocheck.h5ad", "--no-mapping-check")
    assert res2.exit_code == 0 and report2["mapping"]["verdict"] == "maps_poorly"
    assert (obs2[f"{KEY}_unknown_reason"] == "out_of_atlas").sum() == 0


def test_another_species_is_refused_with_both_named(built: dict[str, Path], tmp_path: Path) -> None:
    q = anndata.read_h5ad(built["query"])
    names = q.var["feature_name"].astype(str) if "feature_name" in q.var else q.var_names.to_series()
    mouse = anndata.AnnData(X=q.X, obs=q.obs[[KEY]].copy(),
                            var=pd.DataFrame(index=[n[:1] + n[1:].lower() for n in names]))
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    res, _, _ = _annotate(built, tmp_path / "mouse.h5ad", "mouse_out.h5ad")
    assert res.exit_code != 0
    first = next(line for line in res.output.splitlines() if line.startswith("Error:"))
    assert first.startswith("Error:") and "species" in first and "mouse" in first and "human" in first
    assert "Traceback" not in res.output
    res2, obs2, _ = _annotate(built, tmp_path / "mouse.h5ad", "mouse_allowed.h5ad", "--allow-species-mismatch")
    assert res2.exit_code == 0, res2.output
    assert len(obs2) == q.n_obs


def test_a_column_without_a_head_is_voted_and_said_so(built: dict[str, Path]) -> None:
    res, obs, report = _annotate(built, built["query"], "donor.h5ad", "--label-key", "donor_id",
                                 "--label-key", KEY)
    assert res.exit_code == 0, res.output
    assert report["labels"]["donor_id"]["predicted_by"] == "knn"
    assert report["labels"][KEY]["predicted_by"] == "heads"
    assert "donor_id (by neighbour vote (the index has no label head for it))" in res.output
    assert "donor_id_pred" in obs.columns


def test_few_shared_genes_come_with_a_caveat_on_the_mapping(built: dict[str, Path], tmp_path: Path) -> None:
    q = anndata.read_h5ad(built["query"])
    keep = np.random.default_rng(1).random(q.n_vars) < 0.3
    q[:, keep].copy().write_h5ad(tmp_path / "partial.h5ad")
    res, _, report = _annotate(built, tmp_path / "partial.h5ad", "partial_out.h5ad")
    assert res.exit_code == 0, res.output
    assert "can still look as if it maps well" in report["mapping"]["caveat"]
    res2, _, full = _annotate(built, built["query"], "full_out.h5ad")
    assert "caveat" not in full["mapping"]


def test_an_unsure_class_falls_back_to_a_cell_ontology_ancestor(built: dict[str, Path]) -> None:
    """With a strict cut, cells torn between related classes (CD4 vs CD8 alpha-beta T cells) are answered with a
    term that holds both: its CL name and id, level ``ancestor``, and the term is an ancestor of the best class'."""
    from scatlas.atlas.ontology import cell_ontology

    res, obs, report = _annotate(built, built["query"], "strict.h5ad", "--min-confidence", "0.9", "--truth-key", KEY)
    assert res.exit_code == 0, res.output
    anc = obs[obs[f"{KEY}_level"] == "ancestor"]
    assert len(anc) > 0
    onto = cell_ontology()
    fine_terms = dict(zip(obs[f"{KEY}_pred_fine"].astype(str), obs[f"{KEY}_pred_ontology_term_id"], strict=True))
    for _, row in anc.iterrows():
        term = row[f"{KEY}_pred_ontology_term_id"]
        assert onto.name(term) == str(row[f"{KEY}_pred"])  # named by CL at the ancestor level
        best = onto.lookup(str(row[f"{KEY}_pred_fine"]))[0] or fine_terms.get(str(row[f"{KEY}_pred_fine"]))
        assert best is None or term in onto.ancestors(best)
        assert row[f"{KEY}_confidence"] >= 0.9 > row[f"{KEY}_runner_up_proba"]
    assert report["labels"][KEY]["levels"]["ancestor"] == len(anc)
    assert report["params"]["min_confidence"] == {KEY: 0.9}


def test_truth_types_the_atlas_lacks_answered_with_a_type_containing_theirs(built: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """A finer truth label than the atlas has ("naive B cell" where the atlas has "B cell"): not in the atlas, yet an
    answer "B cell" contains it; the report and the CLI say how often absent types got such an answer."""
    q = anndata.read_h5ad(built["query"])
    q.obs["finer"] = q.obs[KEY].astype(str).replace({"B cell": "naive B cell"})
    q.write_h5ad(tmp_path / "q.h5ad")
    res, _, report = _annotate(built, tmp_path / "q.h5ad", "finer.h5ad", "--truth-key", "finer")
    assert res.exit_code == 0, res.output
    ev = report["evaluation"][KEY]
    assert set(ev["truth_labels_absent_from_atlas"]) == {"naive B cell"}
    assert ev["absent_answered_with_a_broader_type"] >= 0.9
    assert "answered with a type whose Cell Ontology term contains theirs" in res.output
    labelled = ev["n_cells"] - ev["n_unlabelled"]
    assert f"(best class, on the {ev['n_known']:,} of {labelled:,} labelled cells whose truth is an atlas class)" in (
        res.output)  # the headline accuracy says what it was computed on


def test_search_warns_of_a_query_that_maps_poorly(built: dict[str, Path], tmp_path: Path) -> None:
    """A tryout: `search` of another tissue's cells reported "enriched" atlas types with no word; it runs annotate's
    query-level check on the hits' similarities (cells mode, whole atlas)."""
    import json

    q = anndata.read_h5ad(built["query"])
    order = np.random.default_rng(0).permutation(q.n_vars)
    anndata.AnnData(X=q.X, obs=q.obs[[KEY]].copy(), var=q.var.iloc[order].copy()).write_h5ad(tmp_path / "f.h5ad")
    res = _run("search", tmp_path / "f.h5ad", "--index", built["index"], "--out", tmp_path / "f.csv", "--no-progress")
    assert res.exit_code == 0 and "WARNING" in res.output and "maps poorly onto the atlas" in res.output, res.output
    assert json.loads((tmp_path / "f.report.json").read_text())["mapping"]["verdict"] == "maps_poorly"
    res = _run("search", built["query"], "--index", built["index"], "--out", tmp_path / "q.csv", "--no-progress")
    assert res.exit_code == 0 and "maps poorly" not in res.output, res.output
    assert json.loads((tmp_path / "q.report.json").read_text())["mapping"]["verdict"] == "maps_well"
    res = _run("search", built["query"], "--index", built["index"], "--out", tmp_path / "c.csv", "--mode", "centroid",
               "--no-progress")
    assert json.loads((tmp_path / "c.report.json").read_text())["mapping"]["verdict"] == "not_judged"
