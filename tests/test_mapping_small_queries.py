"""The query-level mapping check needs a dataset's worth of cells: a query of one to a few cells gets no verdict
(``too_few_cells``, no score) and none of its cells is out of the atlas by the query-level rule, while queries of
hundreds of cells are judged as before (in-distribution maps well, another tissue maps poorly)."""

from __future__ import annotations

import json
from typing import Any

import anndata
import numpy as np
import pytest

from scatlas.index import read_mapping_calibration
from scatlas.index.align import MIN_SAMPLE
from scatlas.query import annotate
from scatlas.query.mapping import MIN_QUERY_CELLS, assess_mapping
from tests.test_mapping import four_dataset_atlas

KEY = "cell_type"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Datasets 0-2 form the atlas (calibrated by holding each out); dataset 3 is a new dataset of the same cells."""
    root = tmp_path_factory.mktemp("small_queries")
    paths = four_dataset_atlas(root)
    assert read_mapping_calibration(root / "index") is not None
    return {"root": root, "index": root / "index", "query": anndata.read_h5ad(paths[3])}


def _tiny(query: anndata.AnnData, n: int, seed: int) -> anndata.AnnData:
    rows = np.sort(np.random.default_rng(seed).choice(query.n_obs, n, replace=False))
    return query[rows].copy()


def test_the_minimum_is_below_every_query_of_the_tests_and_benchmarks(world: dict[str, Any]) -> None:
    # the benchmarks' smallest query holds 128 cells (docs/benchmarks.md), the synthetic ones hundreds
    assert 10 <= MIN_QUERY_CELLS <= 100
    assert world["query"].n_obs >= 2 * MIN_QUERY_CELLS


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (1, 2), (1, 3), (2, 3), (3, 4)])
def test_a_query_of_a_few_in_distribution_cells_has_too_few_cells_for_a_verdict(
    world: dict[str, Any], n: int, seed: int
) -> None:
    res = annotate(_tiny(world["query"], n, seed), world["index"], progress=False, keep_neighbors=False)
    mapping = res.report["mapping"]
    assert mapping["verdict"] == "too_few_cells", mapping
    assert mapping["score"] is None  # not a misleading 1.0 from a share of 0/1
    assert mapping["n_cells"] == n and mapping["min_cells"] == MIN_QUERY_CELLS
    assert f"{n} cell" in mapping["note"] and str(MIN_QUERY_CELLS) in mapping["note"]
    assert mapping["reasons"] == [] and mapping["cells_out_of_atlas"] == 0 and mapping["applied"]
    assert not (res.predictions[f"{KEY}_unknown_reason"] == "out_of_atlas").any()
    # each cell still carries its own mapping score
    assert res.predictions[f"{KEY}_mapping_score"].notna().all()
    json.dumps(mapping)


def test_a_few_cells_are_not_aligned_and_a_dataset_of_them_is(world: dict[str, Any]) -> None:
    """From one to a few cells the MNN "offset" is just the way to their own nearest atlas cells (the old rule read a
    single in-distribution cell's shift as over what any atlas dataset needs): no shift is estimated, and the report
    says so; a query of the minimum size from the same dataset is aligned and maps well."""
    assert MIN_SAMPLE == MIN_QUERY_CELLS  # no verdict, no alignment: a shift is checked against the atlas' cut
    for n, seed in ((1, 2), (3, 3), (MIN_SAMPLE - 1, 0)):
        rep = annotate(_tiny(world["query"], n, seed), world["index"], progress=False, keep_neighbors=False).report
        assert rep["alignment"]["skipped"] and str(MIN_SAMPLE) in rep["alignment"]["skipped"], rep["alignment"]
        assert rep["alignment"]["shift_norm"] == 0.0 and rep["mapping"]["evidence"]["shift_norm"] is None
    rep = annotate(_tiny(world["query"], MIN_QUERY_CELLS, 0), world["index"], progress=False,
                   keep_neighbors=False).report
    mapping = rep["mapping"]
    assert "skipped" not in rep["alignment"] and rep["alignment"]["shift_norm"] > 0
    assert mapping["verdict"] == "maps_well"
    assert mapping["evidence"]["shift_norm"] < mapping["thresholds"]["max_shift_norm"], mapping


def test_an_alignment_sample_under_the_minimum_is_refused(world: dict[str, Any]) -> None:
    from scatlas.atlas.errors import InputError

    with pytest.raises(InputError, match=f"at least {MIN_SAMPLE}"):
        annotate(_tiny(world["query"], 5, 0), world["index"], progress=False, align_sample=MIN_SAMPLE - 1)


@pytest.mark.parametrize("n", [3, 30])
def test_a_few_foreign_cells_are_not_shifted_onto_the_atlas(world: dict[str, Any], n: int) -> None:
    """A few cells of another tissue (genes shuffled): shifted by their own "offset" they would land on their nearest
    atlas cells and score as if they mapped; unaligned, they keep the scores they have as embedded."""
    q = _tiny(world["query"], n, 5)
    perm = np.random.default_rng(0).permutation(q.n_vars)
    foreign = anndata.AnnData(q.X[:, perm], obs=q.obs, var=q.var)
    got = annotate(foreign, world["index"], progress=False, keep_neighbors=False)
    plain = annotate(foreign, world["index"], progress=False, keep_neighbors=False, align="none")
    assert got.report["alignment"]["skipped"]
    col = f"{KEY}_mapping_score"
    np.testing.assert_allclose(got.predictions[col].to_numpy(), plain.predictions[col].to_numpy())
    assert (got.predictions[col] < 0.05).all(), got.predictions[col]


def test_the_query_level_rule_is_off_below_the_minimum_and_on_at_it(world: dict[str, Any]) -> None:
    """Cells deep in the low tail (not below anything atlas datasets show) and a shift over the cut: a query of
    fewer than MIN_QUERY_CELLS such cells has no verdict and keeps them; one of MIN_QUERY_CELLS maps poorly."""
    cal = read_mapping_calibration(world["index"])
    assert cal is not None
    t = cal.thresholds
    score = (t["extreme_score"] + t["low_score"]) / 2
    assert t["extreme_score"] < score < t["low_score"]
    shift = 2 * t["max_shift_norm"]
    for n in (1, 2, 3, MIN_QUERY_CELLS - 1):
        scores = np.full(n, score)
        v = assess_mapping(scores, shift, cal)
        assert v.verdict == "too_few_cells" and v.score is None and not v.reasons
        assert not v.out_of_atlas(scores).any()
        # the per-cell rule still holds: a cell below anything atlas datasets show is out of the atlas
        with_extreme = np.append(scores[:-1], -1.0) if n > 1 else np.array([-1.0])
        assert v.out_of_atlas(with_extreme)[-1]
    v = assess_mapping(np.full(MIN_QUERY_CELLS, score), shift, cal)
    assert v.verdict == "maps_poorly" and v.score == 0.0 and v.out_of_atlas(np.full(MIN_QUERY_CELLS, score)).all()
    assert assess_mapping(np.array([0.1]), 0.3, None).verdict == "uncalibrated"


def test_one_cell_through_the_cli_prints_no_warning(world: dict[str, Any]) -> None:
    from click.testing import CliRunner

    from scatlas.cli import cli

    q = world["root"] / "q1.h5ad"
    _tiny(world["query"], 1, 7).write_h5ad(q)
    out = world["root"] / "o" / "a.h5ad"
    res = CliRunner().invoke(cli, ["annotate", str(q), "--index", str(world["index"]), "--out", str(out),
                                   "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "maps poorly" not in res.output and "WARNING" not in res.output
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    assert report["mapping"]["verdict"] == "too_few_cells" and report["mapping"]["score"] is None
    assert (anndata.read_h5ad(out).obs[f"{KEY}_unknown_reason"] != "out_of_atlas").all()


def test_a_normal_size_in_distribution_query_still_maps_well(world: dict[str, Any]) -> None:
    res = annotate(world["query"], world["index"], progress=False, keep_neighbors=False)
    mapping = res.report["mapping"]
    assert mapping["verdict"] == "maps_well", mapping
    assert mapping["score"] is not None and mapping["score"] > 0.8 and "note" not in mapping
    assert (res.predictions[f"{KEY}_unknown_reason"] == "out_of_atlas").mean() <= 0.02


def test_a_normal_size_foreign_query_still_maps_poorly(world: dict[str, Any]) -> None:
    """The same dataset with its genes shuffled (as tests/test_mapping.py does): another tissue's programs."""
    q = world["query"]
    perm = np.random.default_rng(0).permutation(q.n_vars)
    foreign = anndata.AnnData(q.X[:, perm], obs=q.obs, var=q.var)
    res = annotate(foreign, world["index"], progress=False, keep_neighbors=False)
    mapping = res.report["mapping"]
    assert mapping["verdict"] == "maps_poorly" and mapping["reasons"], mapping
    assert (res.predictions[f"{KEY}_unknown_reason"] == "out_of_atlas").mean() >= 0.9
