"""Mapping calibration (held-out atlas datasets) and the query-level mapping verdict, on a synthetic atlas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pytest

from scatlas.atlas import ingest
from scatlas.atlas.errors import IndexFormatError
from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.index import (
    AtlasIndex,
    apply_shift,
    build_index,
    calibrate_mapping,
    estimate_shift,
    read_mapping_calibration,
)
from scatlas.index.mapping import MAPPING_FILE, MappingCalibration
from scatlas.query.mapping import assess_mapping
from scatlas.query.prepare import open_query
from scatlas.query.vote import mean_top_similarity


def four_dataset_atlas(root: Path, **build_kw: Any) -> list[Path]:
    """Datasets 0-2 of a synthetic atlas ingested and indexed in ``root/atlas`` and ``root/index`` (``build_kw`` go
    to ``build_index``); returns the four datasets' files (dataset 3: a new dataset of the same cells)."""
    cfg = SyntheticAtlasConfig(n_cells=1600, n_genes=300, n_datasets=4, n_donors=2, seed=5, rare_types=(),
                               non_primary_fraction=0.0)
    paths = write_h5ad_datasets(cfg, root / "h5ad")
    ingest(paths[:3], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 200, "n_components": 16},
                progress=False, **build_kw)
    return paths


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Datasets 0-2 form the atlas (three groups to hold out); dataset 3 is a new dataset of the same cells."""
    root = tmp_path_factory.mktemp("mapping")
    paths = four_dataset_atlas(root, label_keys=())
    cal = calibrate_mapping(root / "index", cells_per_group=300)
    return {"index": root / "index", "query": paths[3], "root": root, "cal": cal}


def _verdict(index: Path, query: Any) -> tuple[Any, np.ndarray]:
    cal = read_mapping_calibration(index)
    with AtlasIndex.open(index) as idx:
        cells = open_query(query, idx)
        try:
            vectors = cells.embed(np.arange(cells.n_cells), 1000)
        finally:
            cells.close()
        alignment = estimate_shift(idx, vectors)
        k = cal.k if cal is not None else 30
        s = mean_top_similarity(idx.search(apply_shift(vectors, alignment.shift), k).scores, k)
    scores = cal.cell_scores(s, aligned=True) if cal is not None else np.full(len(s), np.nan)
    verdict = assess_mapping(scores, float(np.linalg.norm(alignment.shift)), cal)
    return verdict, verdict.out_of_atlas(scores)


def test_calibration_holds_out_each_dataset_and_round_trips(atlas: dict[str, Any]) -> None:
    cal: MappingCalibration = atlas["cal"]
    assert cal.grouping == "dataset" and cal.column == "dataset_id" and len(cal.groups) == 3
    assert all(0 < g.n_cells <= 300 for g in cal.groups) and all(g.shift_norm >= 0 for g in cal.groups)
    for key in ("aligned", "unaligned"):
        ref = cal.reference[key]
        assert 0 < len(ref) <= 4000 and np.all(np.diff(ref) >= 0)
    assert set(cal.thresholds) >= {"max_shift_norm", "max_low_fraction", "individual_score", "extreme_score"}
    back = read_mapping_calibration(atlas["index"])
    assert back is not None and back.to_dict() == cal.to_dict()
    # the scores: percentiles of the reference
    ref = cal.reference["aligned"]
    scores = cal.cell_scores(np.array([ref[0] - 1, np.median(ref), ref[-1] + 1, np.nan]), aligned=True)
    assert scores[0] == 0 and scores[2] == 1 and abs(scores[1] - 0.5) < 0.05 and scores[3] == 0


def test_a_new_dataset_of_the_same_cells_maps_well(atlas: dict[str, Any]) -> None:
    verdict, out = _verdict(atlas["index"], atlas["query"])
    assert verdict.verdict == "maps_well", verdict.to_report()
    assert out.mean() <= 0.02
    report = verdict.to_report()
    assert report["score"] > 0.8 and report["evidence"]["grouping"] == "dataset"
    json.dumps(report)


def test_a_foreign_query_maps_poorly(atlas: dict[str, Any]) -> None:
    """The same dataset with its genes shuffled: another tissue's programs on the same gene names."""
    adata = anndata.read_h5ad(atlas["query"])
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    foreign = anndata.AnnData(adata.X[:, perm], obs=adata.obs, var=adata.var)
    verdict, out = _verdict(atlas["index"], foreign)
    assert verdict.verdict == "maps_poorly", verdict.to_report()
    assert verdict.reasons and out.mean() >= 0.9


def test_an_index_without_calibration_is_uncalibrated(atlas: dict[str, Any], tmp_path: Path) -> None:
    verdict = assess_mapping(np.array([0.1, 0.9]), 0.3, None)
    assert verdict.verdict == "uncalibrated" and verdict.score is None
    assert not verdict.out_of_atlas(np.array([0.0, 1.0])).any()
    assert read_mapping_calibration(tmp_path) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: "{not json",
        lambda d: json.dumps({**d, "format_version": 99}),
        lambda d: json.dumps({**d, "reference": {"aligned": [0.5, 0.1], "unaligned": [0.1]}}),
        lambda d: json.dumps({**d, "thresholds": {**d["thresholds"], "max_low_fraction": "high"}}),
        lambda d: json.dumps({**d, "groups": []}),
        lambda d: json.dumps([1, 2]),
    ],
)
def test_a_damaged_mapping_file_is_a_clear_error(atlas: dict[str, Any], tmp_path: Path, damage: Any) -> None:
    (tmp_path / MAPPING_FILE).write_text(damage(atlas["cal"].to_dict()))
    with pytest.raises(IndexFormatError, match=r"mapping.json (is damaged|is unreadable|does not hold).*recompute it with calibrate_mapping"):
        read_mapping_calibration(tmp_path)


def test_an_atlas_too_small_to_calibrate_still_builds_and_annotates(tmp_path: Path, caplog: Any) -> None:
    """40 cells: no group can be held out with k cells left. The build warns and writes no mapping.json; annotate
    then calls the query's mapping uncalibrated; calibrating it directly says why it cannot."""
    from scatlas.atlas.errors import TooFewCellsError
    from scatlas.index import build_index, calibrate_mapping
    from scatlas.query import annotate
    from tests.conftest import make_adata

    make_adata(40, 60, seed=1, prefix="a").write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "atlas", progress=False)
    with caplog.at_level("WARNING", logger="scatlas.index"):
        build_index(tmp_path / "atlas", tmp_path / "index", embedder_options={"n_hvg": 40, "n_components": 8},
                    progress=False)
    assert "too small to calibrate mapping" in caplog.text
    assert not (tmp_path / "index" / MAPPING_FILE).exists()
    res = annotate(make_adata(20, 60, seed=2, prefix="q"), tmp_path / "index", progress=False)
    assert res.report["mapping"]["verdict"] == "uncalibrated"
    assert res.predictions["cell_type_mapping_score"].isna().all()  # every cell has the column: NaN, not absent
    with pytest.raises(TooFewCellsError, match="too small to calibrate mapping"):
        calibrate_mapping(tmp_path / "index")


def test_the_low_tail_limit_allows_for_chance_in_small_queries(atlas: dict[str, Any]) -> None:
    from scatlas.query.mapping import low_fraction_limit

    cal: MappingCalibration = atlas["cal"]
    most = cal.thresholds["max_low_fraction"]
    limits = [low_fraction_limit(most, n) for n in (50, 290, 2000, 10**6)]
    assert all(a > b for a, b in zip(limits, limits[1:], strict=False)) and limits[-1] - most < 0.002
    # a query just over the atlas' own worst share, by less than chance for its size, maps well
    n = 290
    low = int(np.floor((most + 0.5 * (limits[1] - most)) * n))
    scores = np.r_[np.zeros(low), np.ones(n - low)]
    verdict = assess_mapping(scores, None, cal)
    assert low / n > most and verdict.verdict == "maps_well", verdict.to_report()
    assert verdict.evidence["low_fraction_limit"] == round(limits[1], 4)
    assert assess_mapping(np.r_[np.zeros(n // 2), np.ones(n - n // 2)], None, cal).verdict == "maps_poorly"
