"""`scatlas annotate` answers through the command line: the neighbour vote's ontology fallback and out-of-atlas
calls, the per-cell reasons of ``unknown`` (low confidence, no expression), truth labels given CL terms by
``--ontology-map`` (and a malformed map refused), and how ``scatlas build`` groups an atlas of one dataset for the
mapping calibration (donors, else random folds).

The main atlas is the synthetic blood-like one of tests/test_annotate_trust.py, except that every CD4 and CD8
alpha-beta T cell of the atlas is relabelled at random as one of the two: their expression no longer tells them
apart, so a query T cell's neighbours (and the label head) split between two sibling classes whose nearest shared
Cell Ontology ancestor the answer can fall back to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner, Result

from scatlas.atlas.ontology import cell_ontology
from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.cli import cli
from scatlas.index import AtlasIndex
from scatlas.query.atlas_labels import atlas_labels
from tests.conftest import make_adata

KEY = "cell_type"
CD4, CD8 = "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell"
SIBLINGS = {CD4: "CL:0000624", CD8: "CL:0000625"}
STRICT = 0.8
"""A cut above any two-way split's winner share (a two-way split's winner always holds at least half the vote)."""


def _run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


class Annotated(NamedTuple):
    result: Result
    adata: anndata.AnnData
    report: dict[str, Any]
    neighbors: Path

    @property
    def obs(self) -> pd.DataFrame:
        return self.adata.obs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Datasets 0 and 1 of the synthetic atlas (CD4/CD8 labels shuffled between the two, their CL terms with them)
    ingested and indexed (label head for cell_type, no reference map); dataset 2, with its true labels, the query."""
    root = tmp_path_factory.mktemp("cli_answers")
    cfg = SyntheticAtlasConfig(n_cells=3000, n_genes=300, n_datasets=3, n_donors=2, seed=5, rare_types=(),
                               non_primary_fraction=0.0)
    paths = write_h5ad_datasets(cfg, root / "h5ad")
    rng = np.random.default_rng(0)
    atlas_files = []
    for i, path in enumerate(paths[:2]):
        a = anndata.read_h5ad(path)
        original = a.obs[KEY].astype(str).to_numpy()
        labels = original.copy()
        t_cells = np.isin(original, list(SIBLINGS))
        for sibling in SIBLINGS:  # half of each type's cells to either label, in a random order
            rows = rng.permutation(np.flatnonzero(original == sibling))
            labels[rows[: len(rows) // 2]], labels[rows[len(rows) // 2 :]] = CD4, CD8
        terms = a.obs[f"{KEY}_ontology_term_id"].astype(str).to_numpy().copy()
        terms[t_cells] = [SIBLINGS[v] for v in labels[t_cells]]
        a.obs[KEY] = pd.Categorical(labels)
        a.obs[f"{KEY}_ontology_term_id"] = pd.Categorical(terms)
        atlas_files.append(root / f"atlas{i}.h5ad")
        a.write_h5ad(atlas_files[-1])
    res = _run("ingest", *atlas_files, "--atlas", root / "atlas", "--no-progress")
    assert res.exit_code == 0, res.output
    res = _run("build", "--atlas", root / "atlas", "--index", root / "index", "--embedder-option", "n_hvg=250",
               "--embedder-option", "n_components=20", "--no-map", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "label heads  cell_type:" in res.output  # the heads path exists, to compare the vote with
    return {"root": root, "index": root / "index", "query": paths[2]}


_CACHE: dict[tuple[str, ...], Annotated] = {}


def annotate(world: dict[str, Path], query: Path, out: str, *extra: str) -> Annotated:
    """`scatlas annotate QUERY --out ROOT/OUT EXTRA...` (succeeding), its .h5ad, report and neighbours table;
    each distinct run once per module."""
    key = (str(world["root"]), str(query), out, *extra)
    if key not in _CACHE:
        out_path = world["root"] / out
        res = _run("annotate", query, "--index", world["index"], "--out", out_path, "--no-progress", *extra)
        assert res.exit_code == 0, res.output
        stem = out_path.with_suffix("")
        report = json.loads(stem.with_name(stem.name + ".report.json").read_text())
        _CACHE[key] = Annotated(res, anndata.read_h5ad(out_path), report,
                                stem.with_name(stem.name + ".neighbors.parquet"))
    return _CACHE[key]


def _proba(adata: anndata.AnnData) -> tuple[list[str], np.ndarray]:
    classes = [str(c) for c in adata.uns[f"{KEY}_proba_classes"]]
    return classes, np.asarray(adata.obsm[f"{KEY}_proba"], dtype=np.float64)


def _split_cells(adata: anndata.AnnData, cut: float) -> np.ndarray:
    """Cells whose class probabilities lie (to 0.1%) on the two siblings, both above 0, neither reaching ``cut``."""
    classes, p = _proba(adata)
    a, b = p[:, classes.index(CD4)], p[:, classes.index(CD8)]
    return np.asarray((a + b > 0.999) & (a > 0) & (b > 0) & (np.maximum(a, b) < cut))


def _foreign(world: dict[str, Path]) -> Path:
    """The query with its gene names shuffled: profiles no atlas cell has (another tissue, as the atlas sees it)."""
    path = world["root"] / "foreign.h5ad"
    if not path.exists():
        q = anndata.read_h5ad(world["query"])
        order = np.random.default_rng(0).permutation(q.n_vars)
        anndata.AnnData(X=q.X, obs=q.obs[[KEY]].copy(), var=q.var.iloc[order].copy()).write_h5ad(path)
    return path


# -- 1. the neighbour vote -----------------------------------------------------------------------------------------


def test_knn_split_between_sibling_classes_falls_back_to_their_shared_ancestor(world: dict[str, Path]) -> None:
    """Under --predictor knn with a cut above the split, a query cell whose neighbours are CD4 and CD8 alpha-beta T
    cells (checked in the neighbours table) is answered at level ``ancestor`` with one CL term that is an ancestor
    of both siblings and of no other atlas class, named by CL, with the summed share as its confidence; the label
    head path (--predictor heads) answers such cells with the same term, and confident cells stay ``fine``."""
    run = annotate(world, world["query"], "knn_strict.h5ad", "--predictor", "knn", "--min-confidence", str(STRICT))
    obs, report = run.obs, run.report
    assert report["labels"][KEY]["predicted_by"] == "knn"
    assert report["params"]["min_confidence"] == {KEY: STRICT}
    assert "neighbour vote (--predictor knn)" in run.result.output
    split = _split_cells(run.adata, STRICT)
    assert split.sum() >= 100, "the shuffled CD4/CD8 labels should split many T cells' votes"
    assert set(obs.loc[split, KEY].astype(str)) <= set(SIBLINGS)  # they are the query's T cells

    # the vote really was split: the split cells' neighbours are labelled with both siblings
    nb = pd.read_parquet(run.neighbors)
    nb = nb[nb["query_row"].isin(np.flatnonzero(split))]
    with AtlasIndex.open(world["index"]) as idx:
        labels = idx.cells(nb["atlas_cell_id"].to_numpy(), columns=[KEY])[KEY].astype(str).to_numpy()
    assert np.isin(labels, list(SIBLINGS)).mean() > 0.95
    per_cell = pd.Series(labels).groupby(nb["query_row"].to_numpy()).agg(lambda v: set(v) & set(SIBLINGS))
    assert (per_cell.map(len) == 2).all()

    # ... and each is answered with the siblings' shared ancestor
    part = obs[split]
    assert (part[f"{KEY}_level"] == "ancestor").all()
    assert (part[f"{KEY}_unknown_reason"] == "").all()
    terms = set(part[f"{KEY}_pred_ontology_term_id"])
    assert len(terms) == 1
    term = terms.pop()
    onto = cell_ontology()
    assert all(term in onto.ancestors(t) for t in SIBLINGS.values())
    others = {t for c, t in zip(obs[f"{KEY}_pred_fine"].astype(str), obs[f"{KEY}_pred_ontology_term_id"],
                                strict=True) if c not in SIBLINGS and str(t).startswith("CL:")}
    assert others, "the query has fine answers of other classes"
    assert not any(term == t or term in onto.ancestors(t) for t in others)  # the T cells' branch, not "lymphocyte"
    assert (part[f"{KEY}_pred"].astype(str) == onto.name(term)).all()
    assert set(part[f"{KEY}_pred_fine"].astype(str)) == set(SIBLINGS)
    assert (part[f"{KEY}_pred_fine"].astype(str) != part[f"{KEY}_runner_up"].astype(str)).all()
    assert set(part[f"{KEY}_runner_up"].astype(str)) == set(SIBLINGS)
    assert (part[f"{KEY}_confidence"] >= STRICT).all()
    assert (part[f"{KEY}_runner_up_proba"] > 0).all()
    assert report["labels"][KEY]["levels"]["ancestor"] >= int(split.sum())

    # cells the vote is sure of keep their class
    _, p = _proba(run.adata)
    sure = p.max(axis=1) >= STRICT
    assert sure.sum() > 500
    assert (obs.loc[sure, f"{KEY}_level"] == "fine").all()

    # the heads path answers cells torn between the same siblings with the same term
    heads = annotate(world, world["query"], "heads_strict.h5ad", "--predictor", "heads", "--min-confidence",
                     str(STRICT))
    assert heads.report["labels"][KEY]["predicted_by"] == "heads"
    torn = _split_cells(heads.adata, STRICT)
    assert torn.sum() >= 50
    hobs = heads.obs[torn]
    assert (hobs[f"{KEY}_level"] == "ancestor").all()
    assert set(hobs[f"{KEY}_pred_ontology_term_id"]) == {term}


def test_knn_query_that_maps_poorly_is_unknown_out_of_atlas(world: dict[str, Path]) -> None:
    """Under --predictor knn, a query of shuffled genes maps poorly: nearly every cell is ``unknown`` with reason
    ``out_of_atlas`` (level unknown, no CL term), the warning is printed; with --no-mapping-check the same query
    is voted on and no cell is out_of_atlas, so the check is what made them unknown."""
    run = annotate(world, _foreign(world), "foreign_knn.h5ad", "--predictor", "knn")
    obs, report = run.obs, run.report
    assert report["labels"][KEY]["predicted_by"] == "knn"
    assert report["mapping"]["verdict"] == "maps_poorly" and report["mapping"]["applied"] is True
    assert "maps poorly onto the atlas" in run.result.output and "WARNING" in run.result.output
    out = obs[f"{KEY}_unknown_reason"] == "out_of_atlas"
    assert out.mean() >= 0.9
    assert (obs.loc[out, f"{KEY}_pred"] == "unknown").all() and (obs.loc[out, f"{KEY}_level"] == "unknown").all()
    assert (obs.loc[out, f"{KEY}_pred_ontology_term_id"] == "").all()
    assert report["labels"][KEY]["unknown_reasons"].get("out_of_atlas") == int(out.sum())
    assert report["mapping"]["cells_out_of_atlas"] == int(out.sum())
    assert np.isfinite(obs[f"{KEY}_mapping_score"]).all()

    off = annotate(world, _foreign(world), "foreign_knn_nocheck.h5ad", "--predictor", "knn", "--no-mapping-check")
    assert off.report["mapping"]["verdict"] == "maps_poorly" and off.report["mapping"]["applied"] is False
    assert (off.obs[f"{KEY}_unknown_reason"] == "out_of_atlas").sum() == 0
    assert (off.obs[f"{KEY}_pred"] != "unknown").mean() > 0.5


# -- 2. per-cell reasons --------------------------------------------------------------------------------------------


def test_a_strict_cut_makes_cells_unknown_for_low_confidence(world: dict[str, Path]) -> None:
    """With --min-confidence 0.95, a cell is ``unknown`` (``low_confidence``) exactly when neither its best class
    nor any ancestor term the answer may use (the atlas' allowed terms) holds 0.95 of its probability; those cells
    were answered (not low_confidence) at the default cut, and the report counts them."""
    cut = 0.95
    run = annotate(world, world["query"], "strict95.h5ad", "--min-confidence", str(cut))
    obs, report = run.obs, run.report
    assert report["labels"][KEY]["predicted_by"] == "heads"
    classes, p = _proba(run.adata)
    with AtlasIndex.open(world["index"]) as idx:
        onto = atlas_labels(idx, [KEY], None, None, 0.5, "auto", None).ontology[KEY]
    assert list(onto.classes) == classes and len(onto.terms) > 0
    mass = p @ onto.members.astype(np.float64)  # each allowed ancestor term's summed probability
    unsure = (p.max(axis=1) < cut) & (mass.max(axis=1) < cut)
    reason = obs[f"{KEY}_unknown_reason"].astype(str).to_numpy()
    low = reason == "low_confidence"
    other = ~np.isin(reason, ["", "low_confidence"])  # a reason that overrides (e.g. a cell out of the atlas)
    assert other.mean() < 0.01
    assert low.sum() >= 5
    np.testing.assert_array_equal(low[~other], unsure[~other])
    assert (obs.loc[low, f"{KEY}_level"] == "unknown").all() and (obs.loc[low, f"{KEY}_pred"] == "unknown").all()
    assert (obs.loc[low, f"{KEY}_pred_ontology_term_id"] == "").all()
    assert (obs.loc[low, f"{KEY}_confidence"] < cut).all()
    assert (obs.loc[low, f"{KEY}_pred_fine"] != "unknown").all()  # the best class is kept, only not given
    assert report["labels"][KEY]["unknown_reasons"] == {"low_confidence": int(low.sum())}

    default = annotate(world, world["query"], "default.h5ad")
    assert (default.obs[f"{KEY}_unknown_reason"].to_numpy()[low] != "low_confidence").all()


@pytest.mark.parametrize("predictor", ["heads", "knn"])
def test_cells_without_expression_on_the_embedders_genes_are_unknown_no_expression(
        world: dict[str, Path], predictor: str) -> None:
    """Query cells with no counts at all, and cells with counts only on genes the embedder does not read, are
    ``unknown`` with reason ``no_expression`` (no probability, confidence 0, no mapping score or similarity), with
    a warning naming their number; every other cell is answered as usual."""
    path = world["root"] / "silent.h5ad"
    with AtlasIndex.open(world["index"]) as idx:
        read = set(idx.embedder.gene_feature_names or ())
    if not path.exists():
        q = anndata.read_h5ad(world["query"])
        embedder_genes = np.isin(q.var_names.astype(str), list(read))
        assert 0 < embedder_genes.sum() < q.n_vars  # some genes the embedder does not read
        X = sp.csr_matrix(q.X).tolil()
        X[0:5, :] = 0  # nothing at all
        for row in range(5, 10):  # counts only outside the embedder's genes
            X[row, np.flatnonzero(embedder_genes)] = 0
        q.X = sp.csr_matrix(X)
        assert (np.asarray(q.X[5:10][:, ~embedder_genes].sum(axis=1)).ravel() > 0).all()
        q.write_h5ad(path)
    run = annotate(world, path, f"silent_{predictor}.h5ad", "--predictor", predictor)
    obs = run.obs
    silent = np.zeros(len(obs), bool)
    silent[:10] = True
    reason = obs[f"{KEY}_unknown_reason"].to_numpy()
    np.testing.assert_array_equal(reason == "no_expression", silent)
    part = obs[silent]
    assert (part[f"{KEY}_pred"] == "unknown").all() and (part[f"{KEY}_level"] == "unknown").all()
    assert (part[f"{KEY}_confidence"] == 0).all()
    assert part[f"{KEY}_mapping_score"].isna().all() and part["atlas_similarity"].isna().all()
    assert np.all(np.asarray(run.adata.obsm[f"{KEY}_proba"])[silent] == 0)
    assert (obs.loc[~silent, f"{KEY}_level"] != "unknown").mean() > 0.95
    assert obs.loc[~silent, f"{KEY}_mapping_score"].notna().all()
    assert run.report["labels"][KEY]["unknown_reasons"].get("no_expression") == 10
    nb = pd.read_parquet(run.neighbors)  # a cell without expression has no neighbours to show, the others have k
    assert not nb["query_row"].isin(range(10)).any() and nb["query_row"].nunique() == len(obs) - 10
    assert run.report["mapping"]["verdict"] == "maps_well"
    assert f"10 of {len(obs)} query cells have no expression" in run.result.output


# -- 3. --ontology-map for the truth labels -------------------------------------------------------------------------


NAMES = {"B cell": "grp Bee", "classical monocyte": "grp CM", CD4: "grp four", CD8: "grp eight",
         "natural killer cell": "grp NaKi", "fibroblast": "grp Fb", "endothelial cell": "grp En",
         "non-classical monocyte": "grp NCM", "conventional dendritic cell": "grp cd", "plasma cell": "grp Pl"}
"""The query's truth labels renamed to names neither the atlas nor the Cell Ontology knows."""


def _renamed_query(world: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    """The query with a truth column ``mine`` of :data:`NAMES`; and each name's true CL term."""
    path = world["root"] / "renamed.h5ad"
    q = anndata.read_h5ad(world["query"])
    pairs = q.obs[[KEY, f"{KEY}_ontology_term_id"]].astype(str).drop_duplicates()
    terms = {NAMES[c]: t for c, t in zip(pairs[KEY], pairs[f"{KEY}_ontology_term_id"], strict=True)}
    if not path.exists():
        q.obs["mine"] = pd.Categorical(q.obs[KEY].astype(str).map(NAMES))
        assert q.obs["mine"].notna().all()
        q.write_h5ad(path)
    return path, terms


def _write_map(path: Path, terms: dict[str, str]) -> Path:
    pd.DataFrame({"label": list(terms), "ontology_term_id": list(terms.values())}).to_csv(path, index=False)
    return path


def test_ontology_map_gives_the_truth_labels_terms_and_ontology_aware_scores(world: dict[str, Path]) -> None:
    """The query's truth labels have names the atlas and CL lack: without a map nothing can be scored (no truth
    term, every label absent from the atlas, no ontology accuracy or ECE, and the CLI points to --ontology-map);
    with --ontology-map every cell's truth gets its CL term from the user's table (``truth_terms_by: user``), the
    labels match atlas classes through those terms, and the ontology-aware accuracy counts the vote's "T cell"
    answers as right where the flat accuracy cannot; a map that gives one label a wrong term lowers both."""
    query, terms = _renamed_query(world)
    extra = ("--truth-key", "mine", "--predictor", "knn", "--min-confidence", str(STRICT))
    bare = annotate(world, query, "omap_none.h5ad", *extra)
    ev = bare.report["evaluation"][KEY]
    assert ev["truth_column"] == "mine"
    assert ev["n_known"] == 0 and ev["accuracy"] is None
    assert set(ev["truth_labels_absent_from_atlas"]) == set(NAMES.values())
    assert ev["ontology"]["n_cells_with_truth_term"] == 0
    assert ev["ontology"]["ontology_accuracy"] is None and ev["ontology"]["ece"] is None
    assert ev["ontology"]["truth_terms_by"] == {"unmapped": len(NAMES)}
    assert "no ontology-aware score (give the query's labels terms with --ontology-map)" in bare.result.output

    good = _write_map(world["root"] / "good_map.csv", terms)
    mapped = annotate(world, query, "omap_good.h5ad", *extra, "--ontology-map", str(good))
    ev = mapped.report["evaluation"][KEY]
    n = len(mapped.obs)
    assert ev["n_known"] == n and ev["n_absent"] == 0 and ev["truth_labels_absent_from_atlas"] == {}
    onto = ev["ontology"]
    assert onto["truth_terms_by"] == {"user": len(NAMES)}
    assert onto["n_cells_with_truth_term"] == n
    assert onto["ontology_accuracy"] > 0.97
    assert onto["ancestor_rate"] > 0.2  # the T cells, answered "T cell"
    assert onto["ontology_accuracy"] > ev["accuracy"] + 0.1  # the flat score counts their coin-toss classes
    assert onto["ece"] is not None and 0 <= onto["ece"] < 0.1
    assert onto["fine_rate"] + onto["ancestor_rate"] + onto["unknown_rate"] == pytest.approx(1.0, abs=2e-4)
    assert "ontology-aware accuracy" in mapped.result.output and "no ontology-aware score" not in mapped.result.output
    assert mapped.report["params"]["ontology_map"] == {"labels": len(NAMES), "unused": 0}
    assert "are not values of the truth column" not in mapped.result.output

    stray = _write_map(world["root"] / "stray_map.csv", {**terms, "no such label": "CL:0000236"})
    strayed = annotate(world, query, "omap_stray.h5ad", *extra, "--ontology-map", str(stray))
    assert "1 of the ontology map's 11 labels are not values of the truth column" in strayed.result.output
    assert strayed.report["params"]["ontology_map"] == {"labels": len(NAMES) + 1, "unused": 1}
    assert f"{onto['ontology_accuracy']:.3f}" in mapped.result.output

    wrong_terms = {**terms, NAMES["B cell"]: terms["grp Fb"]}  # B cells declared fibroblasts
    wrong = _write_map(world["root"] / "wrong_map.csv", wrong_terms)
    bad = annotate(world, query, "omap_wrong.h5ad", *extra, "--ontology-map", str(wrong))
    ev_bad = bad.report["evaluation"][KEY]
    b_share = float((mapped.obs["mine"] == NAMES["B cell"]).mean())
    assert b_share > 0.05
    assert ev_bad["ontology"]["ontology_accuracy"] < onto["ontology_accuracy"] - 0.8 * b_share
    assert ev_bad["accuracy"] < ev["accuracy"] - 0.8 * b_share


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("header", "name,term\ngrp Bee,CL:0000236\n", "row 1 must be the header label,ontology_term_id"),
        ("not_an_id", "label,ontology_term_id\ngrp Bee,B-cell\n", "row 2: the term id"),
        ("no_such_term", "label,ontology_term_id\ngrp Bee,CL:9999999\n", "CL:9999999"),
        ("two_terms", "label,ontology_term_id\ngrp Bee,CL:0000236\ngrp Bee,CL:0000057\n", "row 3"),
        ("empty", "label,ontology_term_id\n", "no label rows"),
    ],
)
def test_a_malformed_ontology_map_is_a_one_line_error(world: dict[str, Path], name: str, text: str,
                                                      said: str) -> None:
    """A malformed --ontology-map (bad header, a term id that is not a CL id or not a CL term, one label given two
    terms, no rows) exits 1 with ``Error: --ontology-map ...`` naming the problem, no traceback, and writes no
    output."""
    query, _ = _renamed_query(world)
    csv = world["root"] / f"bad_{name}.csv"
    csv.write_text(text)
    out = world["root"] / f"bad_{name}.h5ad"
    res = CliRunner().invoke(cli, ["annotate", str(query), "--index", str(world["index"]), "--out", str(out),
                                   "--truth-key", "mine", "--ontology-map", str(csv), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: --ontology-map") and said in errors[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not out.with_name(out.stem + ".report.json").exists()


def test_an_ontology_map_without_a_truth_key_is_refused(world: dict[str, Path]) -> None:
    """--ontology-map gives terms to --truth-key's labels: alone it would do nothing, so it is refused (exit 2)
    before any work."""
    query, _ = _renamed_query(world)
    csv = world["root"] / "alone_map.csv"
    csv.write_text("label,ontology_term_id\ngrp Bee,CL:0000236\n")
    out = world["root"] / "alone.h5ad"
    res = CliRunner().invoke(cli, ["annotate", str(query), "--index", str(world["index"]), "--out", str(out),
                                   "--ontology-map", str(csv), "--no-progress"])
    assert res.exit_code == 2 and "give --truth-key COLUMN too" in res.output, res.output
    assert not out.exists()


# -- 4. the mapping calibration's groups at build time --------------------------------------------------------------


CALIBRATION_ATLASES = {
    "donor": "one dataset with donor_id (two donors)",
    "batch": "one dataset without donor_id, with a batch column (two batches)",
    "random": "one dataset without any donor or sample column",
    "dataset": "two datasets, each with donors",
}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Small atlases (:data:`CALIBRATION_ATLASES`) ingested and built through the CLI, each with a held-back query
    of the same cells: per name, the index, the query, the atlas' cells and the group labels of its cells."""
    root = tmp_path_factory.mktemp("calibration")
    whole = make_adata(n_cells=600, n_genes=60, seed=3)
    atlas, query = whole[:400].copy(), whole[400:].copy()
    out: dict[str, dict[str, Any]] = {}
    for name in CALIBRATION_ATLASES:
        a = atlas.copy()
        if name in ("batch", "random"):
            donors = a.obs.pop("donor_id")
            if name == "batch":
                a.obs["batch"] = donors.map({"d1": "run-A", "d2": "run-B"})
        files = []
        if name == "dataset":
            for part, rows in (("one", slice(0, 250)), ("two", slice(250, 400))):
                files.append(root / f"{name}_{part}.h5ad")
                a[rows].copy().write_h5ad(files[-1])
        else:
            files.append(root / f"{name}.h5ad")
            a.write_h5ad(files[-1])
        res = _run("-q", "ingest", *files, "--atlas", root / f"{name}_atlas", "--no-progress")
        assert res.exit_code == 0, res.output
        res = _run("-q", "build", "--atlas", root / f"{name}_atlas", "--index", root / f"{name}_index",
                   "--embedder-option", "n_hvg=40", "--embedder-option", "n_components=8", "--no-map",
                   "--no-label-heads", "--no-progress")
        assert res.exit_code == 0, res.output
        q = query.copy()
        q.write_h5ad(root / f"{name}_query.h5ad")
        groups = {"donor": a.obs.get("donor_id"), "batch": a.obs.get("batch"), "random": None,
                  "dataset": None}[name]
        out[name] = {"index": root / f"{name}_index", "query": root / f"{name}_query.h5ad", "root": root,
                     "n_cells": a.n_obs, "groups": groups, "files": files}
    return out


@pytest.mark.parametrize("name", list(CALIBRATION_ATLASES))
def test_build_records_how_the_mapping_calibration_grouped_the_atlas(
        calibrated: dict[str, dict[str, Any]], name: str) -> None:
    """The index's mapping.json (written by `scatlas build`) records the held-out grouping: one dataset with
    donor_id is calibrated leave-one-donor-out (a group per donor, column donor_id), one without donor_id falls
    back to the next donor-like column (batch), one with no such column to five random folds (column null) that
    partition the atlas, two datasets hold out datasets; groups within one dataset get the wider low-tail floor.
    `scatlas annotate` on that index reports the same grouping and, off the dataset grouping, no shift rule."""
    case = calibrated[name]
    with AtlasIndex.open(case["index"]) as idx:
        mapping_file = idx.path / "mapping.json"
    assert mapping_file.is_file()
    cal = json.loads(mapping_file.read_text())
    group_names = sorted(g["name"] for g in cal["groups"])
    sizes = {g["name"]: g["n_cells"] for g in cal["groups"]}
    if name == "donor":
        assert (cal["grouping"], cal["column"]) == ("donor", "donor_id")
        assert group_names == ["d1", "d2"]
        assert sizes == case["groups"].value_counts().to_dict()
        assert "donor_id" in cal["note"]
    elif name == "batch":
        assert (cal["grouping"], cal["column"]) == ("donor", "batch")
        assert group_names == ["run-A", "run-B"]
        assert sizes == case["groups"].value_counts().to_dict()
        assert "batch" in cal["note"]
    elif name == "random":
        assert cal["grouping"] == "random" and cal["column"] is None
        assert group_names == [f"fold {i}" for i in range(5)]
        assert "random folds" in cal["note"]
    else:
        assert (cal["grouping"], cal["column"]) == ("dataset", "dataset_id")
        assert group_names == sorted(f.stem for f in case["files"])
        assert sizes == {"dataset_one": 250, "dataset_two": 150}
    assert cal["n_groups_total"] == len(cal["groups"])
    assert sum(sizes.values()) == case["n_cells"]  # every atlas cell held out once (groups under 1,000 cells)
    assert cal["thresholds"]["max_low_fraction"] >= (0.10 if name == "dataset" else 0.25)  # within: wider floor

    res = _run("annotate", case["query"], "--index", case["index"], "--out", case["root"] / f"{name}_out.h5ad",
               "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads((case["root"] / f"{name}_out.report.json").read_text())
    evidence = report["mapping"]["evidence"]
    assert evidence["grouping"] == cal["grouping"] and evidence["n_groups"] == len(cal["groups"])
    assert report["mapping"]["verdict"] == "maps_well", res.output
    if name == "dataset":
        assert evidence["shift_rule"] == "on"
        assert "the atlas has one dataset" not in res.output
    else:
        assert evidence["shift_rule"].startswith("off")
        assert "the atlas has one dataset, so how far another lab's data must shift is not judged" in res.output


def test_a_boolean_batch_column_is_held_out_by_its_values(tmp_path: Path) -> None:
    """One dataset without donor_id whose ``batch`` column is boolean: the calibration holds out the true and the
    false cells in turn (grouping donor, column batch), as it does for a text batch column (its groups were named
    'True' / 'False' while DuckDB reads the values as 'true' / 'false': no group matched a cell and the build called
    a 400-cell atlas too small to calibrate)."""
    a = make_adata(n_cells=400, n_genes=60, seed=3)
    a.obs["batch"] = (a.obs.pop("donor_id") == "d1").to_numpy()
    a.write_h5ad(tmp_path / "bool.h5ad")
    assert _run("-q", "ingest", tmp_path / "bool.h5ad", "--atlas", tmp_path / "atlas", "--no-progress").exit_code == 0
    res = _run("-q", "build", "--atlas", tmp_path / "atlas", "--index", tmp_path / "index", "--embedder-option",
               "n_hvg=40", "--embedder-option", "n_components=8", "--no-map", "--no-label-heads", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "too small to calibrate mapping" not in res.output
    with AtlasIndex.open(tmp_path / "index") as idx:
        mapping_file = idx.path / "mapping.json"
    assert mapping_file.is_file()
    cal = json.loads(mapping_file.read_text())
    assert (cal["grouping"], cal["column"]) == ("donor", "batch")
    assert sorted(g["name"] for g in cal["groups"]) == ["false", "true"]  # as DuckDB writes them
