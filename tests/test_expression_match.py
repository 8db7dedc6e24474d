"""The per-cell expression match (query.expression_match): atlas cell types' profiles per dataset, the cut from
held-out datasets, cells of other programs out of the atlas, and the verdict it can turn; through the CLI too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.cli import cli
from scatlas.index import AtlasIndex, build_index
from scatlas.index.label_heads import SAMPLE_FILE, load_label_heads
from scatlas.query.expression_match import ExpressionMatch, expression_match
from scatlas.query.mapping import MappingVerdict, with_expression

KEY = "cell_type"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Datasets 0-2 of a synthetic atlas indexed (cell_type heads on gene features); dataset 3 is a new dataset of
    the same cell types; the same cells with their genes shuffled stand for another tissue."""
    root = tmp_path_factory.mktemp("expression_match")
    cfg = SyntheticAtlasConfig(n_cells=2400, n_genes=300, n_datasets=4, n_donors=2, seed=5, rare_types=(),
                               non_primary_fraction=0.0)
    paths = write_h5ad_datasets(cfg, root / "h5ad")
    ingest(paths[:3], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 250, "n_components": 16},
                label_keys=(KEY,), progress=False)
    new = anndata.read_h5ad(paths[3])
    perm = np.random.default_rng(0).permutation(new.n_vars)
    foreign = anndata.AnnData(new.X[:, perm], obs=new.obs.copy(), var=new.var.copy())
    foreign.obs_names = [f"foreign-{i}" for i in range(foreign.n_obs)]
    foreign.write_h5ad(root / "foreign.h5ad")
    mixed = anndata.concat([new, foreign], label="part", keys=["same", "foreign"])
    mixed.write_h5ad(root / "mixed.h5ad")
    return {"root": root, "index": root / "index", "same": paths[3], "foreign": root / "foreign.h5ad",
            "mixed": root / "mixed.h5ad", "one_dataset": paths[0]}


def _check(index: Path) -> ExpressionMatch | dict[str, Any]:
    with AtlasIndex.open(index) as idx:
        heads = load_label_heads(index, embedder_fingerprint=idx.embedder.fingerprint())
        return expression_match(idx, heads, np.ones(len(idx.embedder.gene_feature_names or []), bool))


def _annotate(world: dict[str, Any], query: Path, out: str, *extra: str) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    path = world["root"] / out
    res = CliRunner().invoke(cli, ["annotate", str(query), "--index", str(world["index"]), "--out", str(path),
                                   "--no-progress", *extra])
    assert res.exit_code == 0, res.output
    report = json.loads(path.with_name(path.stem + ".report.json").read_text())
    return res, anndata.read_h5ad(path).obs, report


def test_the_cut_comes_from_each_held_out_dataset(world: dict[str, Any]) -> None:
    check = _check(world["index"])
    assert isinstance(check, ExpressionMatch), check
    rec = check.record
    assert rec["status"] == "on" and rec["grouping"] == "dataset" and rec["n_groups"] == 3
    assert rec["label_key"] == KEY and rec["n_profiles"] >= 3 * 2
    assert check.cut == pytest.approx(min(rec["depth_bins"]["cuts"]), abs=1e-4) and -1 < check.cut < 1
    # each depth bin's cut is one held-out dataset's quantile in it, or the whole datasets' lowest where none has
    # enough cells there: never above the highest whole-dataset quantile by much, never NaN
    assert len(check.cuts) == len(check.edges) + 1 and np.isfinite(check.cuts).all()
    deep, shallow = np.array([check.edges[-1] + 1]), np.array([0])
    assert check.below(np.array([check.cuts[-1] - 0.01]), deep)[0] and not check.below(np.array([np.nan]), deep)[0]
    assert check.below(np.array([check.cuts[0] - 0.01]), shallow)[0]


def test_cells_of_the_atlas_types_match_and_other_programs_do_not(world: dict[str, Any]) -> None:
    _, same, report = _annotate(world, world["same"], "same.annotated.h5ad")
    expr = report["mapping"]["expression"]
    assert expr["status"] == "on" and expr["fraction_below"] <= 0.02
    assert report["mapping"]["verdict"] == "maps_well"
    assert "atlas_expression_match" in same.columns
    assert (same[f"{KEY}_pred"] == "unknown").mean() <= 0.05

    res, foreign, report = _annotate(world, world["foreign"], "foreign.annotated.h5ad")
    assert report["mapping"]["expression"]["fraction_below"] >= 0.9
    assert report["mapping"]["verdict"] == "maps_poorly" and "WARNING" in res.output
    below = foreign["atlas_expression_match"] < report["mapping"]["expression"]["cut"]
    assert (foreign.loc[below, f"{KEY}_unknown_reason"] == "out_of_atlas").all()
    strict = report["mapping"]["expression"]["strict_cuts"]  # a poorly mapped query's cells must reach these
    assert all(s >= c for s, c in zip(strict, report["mapping"]["expression"]["depth_bins"]["cuts"], strict=True))
    assert (foreign.loc[foreign["atlas_expression_match"] < min(strict), f"{KEY}_unknown_reason"]
            == "out_of_atlas").all()
    expr = report["mapping"]["expression"]  # the report and the CLI give the cut applied and what it made unknown
    assert expr["cells_out"] >= expr["cells_below"] if expr["cuts_applied"] == "strict" else \
        expr["cells_out"] == expr["cells_below"]
    assert expr["cells_out"] <= (foreign[f"{KEY}_unknown_reason"] == "out_of_atlas").sum()
    assert f"expression: {expr['cells_out']:,} cells match no atlas cell type" in res.output


def test_in_a_mixed_sample_the_foreign_cells_are_unknown_and_the_others_answered(world: dict[str, Any]) -> None:
    _, obs, report = _annotate(world, world["mixed"], "mixed.annotated.h5ad")
    part = anndata.read_h5ad(world["mixed"]).obs["part"].astype(str).to_numpy()
    unknown = (obs[f"{KEY}_pred"] == "unknown").to_numpy()
    assert unknown[part == "foreign"].mean() >= 0.9
    assert report["mapping"]["expression"]["cells_below"] >= 0.9 * (part == "foreign").sum()


def test_a_verdict_turned_by_expression_judges_cells_by_it() -> None:
    thresholds = {"max_low_fraction": 0.2, "individual_score": 0.5, "extreme_score": 0.001, "low_score": 0.05,
                  "max_shift_norm": 1.0}
    well = MappingVerdict("maps_well", 0.99, {}, thresholds)
    unlike = np.array([True] * 40 + [False] * 60)
    turned = with_expression(well, unlike, {"status": "on", "cut": 0.4})
    assert turned.verdict == "maps_poorly" and turned.by_expression and "matches no atlas cell type" in turned.reasons[0]
    assert turned.strict_expression  # another tissue: its cells must match well on their own to keep labels
    assert turned.to_report()["expression"]["fraction_below"] == 0.4
    scores = np.full(100, 0.3)  # under the individual score, over the extreme one
    assert not turned.out_of_atlas(scores).any()  # the similarity alone maps well: only the expression decides
    few = with_expression(well, unlike[40:], {"status": "on", "cut": 0.4})
    assert few.verdict == "maps_well" and few.to_report()["expression"]["cells_below"] == 0
    # a share over the limit by less than chance, for the query's size, does not turn the verdict
    assert with_expression(well, unlike[15:], {"status": "on"}).verdict == "maps_well"  # 25 of 85
    poorly = MappingVerdict("maps_poorly", 0.5, {}, thresholds, ("low tail",))
    both = with_expression(poorly, unlike, {})
    assert both.out_of_atlas(scores).all()  # similarity's own rule stands
    # poorly by similarity (or shift) and by expression: the expression's strict cut applies too, as when it turned
    # the verdict (a pancreas query that only just needed too large a shift kept 15% of its cells' labels without)
    assert both.strict_expression and not both.by_expression and both.reasons[1].startswith("40% of its cells")
    assert not with_expression(poorly, unlike[40:], {"status": "on"}).strict_expression


def test_off_with_one_dataset_and_for_a_sample_without_ids(world: dict[str, Any], tmp_path: Path) -> None:
    ingest([world["one_dataset"]], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", embedder_options={"n_hvg": 250, "n_components": 16},
                label_keys=(KEY,), reference_map=False, progress=False)
    check = _check(tmp_path / "index")
    assert isinstance(check, dict) and check["status"] == "off" and "fewer than two datasets" in check["reason"]

    sample = tmp_path / "index" / "heads" / SAMPLE_FILE
    with np.load(sample) as z:
        kept = {k: z[k] for k in z.files if k != "ids"}
    with open(sample, "wb") as fh:
        np.savez(fh, **kept)
    check = _check(tmp_path / "index")
    assert isinstance(check, dict) and "predates this check" in check["reason"]


def test_a_query_poorly_mapped_by_its_shift_alone_is_judged_cell_by_cell() -> None:
    """Another lab of the atlas' tissue, where the atlas' datasets come from one lab: its shift is over the atlas'
    own, its cells are not in the low tail and match atlas types: each cell keeps its own judgement."""
    thresholds = {"max_low_fraction": 0.2, "individual_score": 0.5, "extreme_score": 0.001, "low_score": 0.05,
                  "max_shift_norm": 0.4}
    shifted = MappingVerdict("maps_poorly", 0.97, {"low_fraction_over": False}, thresholds, ("a shift of 0.42",))
    few = np.zeros(200, bool)
    judged = with_expression(shifted, few, {"status": "on"})
    assert judged.verdict == "maps_poorly" and judged.by_expression and "judged on its own" in judged.note
    assert not judged.strict_expression  # another lab of the tissue: only the atlas' extreme tail is out
    scores = np.full(200, 0.3)
    assert not judged.out_of_atlas(scores).any()
    assert judged.to_report()["cells_judged_by"].startswith("expression")
    # poorly by the low tail too, or with many cells unlike the atlas: the similarity rule stands
    tail = MappingVerdict("maps_poorly", 0.7, {"low_fraction_over": True}, thresholds, ("tail", "shift"))
    assert with_expression(tail, few, {"status": "on"}).out_of_atlas(scores).all()
    many = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    assert not with_expression(shifted, many, {"status": "on"}).by_expression


def test_off_when_the_query_shares_few_genes_and_reported_with_the_check_off(world: dict[str, Any]) -> None:
    from scatlas.query.expression_match import MIN_GENES

    with AtlasIndex.open(world["index"]) as idx:
        heads = load_label_heads(world["index"], embedder_fingerprint=idx.embedder.fingerprint())
        present = np.zeros(len(idx.embedder.gene_feature_names or []), bool)
        present[: MIN_GENES - 1] = True
        check = expression_match(idx, heads, present)
    assert isinstance(check, dict) and f"under the {MIN_GENES}" in check["reason"]
    _, obs, report = _annotate(world, world["foreign"], "foreign.nocheck.h5ad", "--no-mapping-check")
    expr = report["mapping"]["expression"]
    assert expr["status"] == "on" and expr["fraction_below"] >= 0.9  # measured and reported
    assert "atlas_expression_match" in obs.columns
    assert not (obs[f"{KEY}_unknown_reason"] == "out_of_atlas").any()  # not applied


def test_a_second_query_with_the_same_genes_reuses_the_refit_and_the_calibration(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What annotate prepares for a query's gene set (heads refitted for it, the expression match's calibration) is
    kept for the next query with the same genes on the same heads, and recomputed once the heads' files change."""
    import os

    import scatlas.query.expression_match as em
    from scatlas.index.label_heads import HEADS_FILE
    from scatlas.query import annotate, gene_set_cache

    new = anndata.read_h5ad(world["same"])
    partial = new[:, np.random.default_rng(1).permutation(new.n_vars)[: int(0.9 * new.n_vars)]].copy()
    path = world["root"] / "partial.h5ad"
    partial.write_h5ad(path)
    reads: list[int] = []
    real = em.load_training_sample
    monkeypatch.setattr(em, "load_training_sample", lambda d: reads.append(1) or real(d))
    gene_set_cache.clear()
    with AtlasIndex.open(world["index"]) as idx:
        first = annotate(path, idx, label_keys=[KEY], progress=False)
        second = annotate(path, idx, label_keys=[KEY], progress=False)
        assert len(reads) == 1  # the calibration ran once
        assert first.report["params"]["heads_refit_for_query_genes"]["reused"] is False
        assert second.report["params"]["heads_refit_for_query_genes"]["reused"] is True
        assert second.report["mapping"]["expression"] == first.report["mapping"]["expression"]
        pd.testing.assert_frame_equal(first.predictions, second.predictions)
        second.report["mapping"]["expression"]["cut"] = 99.0  # a caller editing its report changes no cache entry
        heads_json = world["index"] / "heads" / HEADS_FILE
        st = heads_json.stat()
        os.utime(heads_json, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as if retrained
        third = annotate(path, idx, label_keys=[KEY], progress=False)
    assert len(reads) == 2 and third.report["params"]["heads_refit_for_query_genes"]["reused"] is False
    assert third.report["mapping"]["expression"] == first.report["mapping"]["expression"]
    # the index opened before the change holds the old heads: nothing it computes is cached under the new files'
    # identity; an index opened since caches again
    with AtlasIndex.open(world["index"]) as idx:
        fourth = annotate(path, idx, label_keys=[KEY], progress=False)
        fifth = annotate(path, idx, label_keys=[KEY], progress=False)
    assert len(reads) == 3 and fourth.report["params"]["heads_refit_for_query_genes"]["reused"] is False
    assert fifth.report["params"]["heads_refit_for_query_genes"]["reused"] is True
