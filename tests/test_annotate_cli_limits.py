"""annotate / search at their limits, on the planted world of conftest.py: a --k larger than the atlas, a query no
cell of which expresses the embedder's genes, an index updated under an opened AtlasIndex, a user's .h5ad as --out,
why the vote decides, and --far-quantile's range."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatlas.atlas.errors import InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, mapping_calibration
from scatlas.index.mapping import MAPPING_FILE
from scatlas.query import annotate
from scatlas.query.search import search_cells

HUGE_K = 100_000_000


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["-q", *args, "--no-progress"])


@pytest.fixture(scope="module")
def small(planted_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The planted world and ``small`` (the first 60 cells of its query) and ``allzero`` (those cells, no counts)."""
    root = tmp_path_factory.mktemp("limits")
    q = anndata.read_h5ad(planted_world["query"])[:60].copy()
    q.write_h5ad(root / "small.h5ad")
    q.X = sp.csr_matrix(q.shape, dtype=np.float32)
    q.write_h5ad(root / "allzero.h5ad")
    return {**planted_world, "small": root / "small.h5ad", "allzero": root / "allzero.h5ad"}


def test_a_huge_k_is_capped_at_the_atlas_cells(small: dict[str, Path], tmp_path: Path) -> None:
    with AtlasIndex.open(small["index"]) as idx:
        n = idx.n_cells
        found = search_cells(small["small"], idx, k=HUGE_K, progress=False)
        assert found.report["params"]["k_used"] == n
        assert found.hits.groupby("query_cell", observed=True).size().max() == n
        res = annotate(small["small"], idx, k=HUGE_K, progress=False)
    assert res.report["params"]["k"] == HUGE_K and res.report["params"]["k_used"] == n
    out = _cli("search", str(small["small"]), "--index", str(small["index"]), "--out", str(tmp_path / "h.csv"),
               "--k", str(HUGE_K))
    assert out.exit_code == 0 and "Traceback" not in out.output, out.output
    assert f"but only {n:,} atlas cells searched" in out.output
    out = _cli("annotate", str(small["small"]), "--index", str(small["index"]), "--out", str(tmp_path / "a.h5ad"),
               "--k", str(HUGE_K))
    assert out.exit_code == 0 and "Traceback" not in out.output, out.output
    assert f"--k {HUGE_K:,}, but only {n:,} atlas cells searched" in out.output


def test_a_query_without_expression_is_refused_as_search_refuses_it(small: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError) as searched:
        search_cells(small["allzero"], small["index"], progress=False)
    with pytest.raises(InputError) as annotated:
        annotate(small["allzero"], small["index"], progress=False)
    assert str(annotated.value) == str(searched.value) and "expresses any of the embedder's genes" in str(searched.value)
    out = _cli("annotate", str(small["allzero"]), "--index", str(small["index"]), "--out", str(tmp_path / "z.h5ad"))
    assert out.exit_code == 1 and "Error: none of the 60 query cells" in out.output and "maps onto" not in out.output


def test_cells_without_expression_get_no_similarity_and_no_say_in_the_verdict(small: dict[str, Path]) -> None:
    q = anndata.read_h5ad(small["small"])
    X = q.X.toarray()
    X[:5] = 0.0
    q.X = sp.csr_matrix(X)
    res = annotate(q, small["index"], progress=False)
    p = res.predictions
    assert p["atlas_similarity"].iloc[:5].isna().all() and p["atlas_nearest_similarity"].iloc[:5].isna().all()
    assert p["atlas_similarity"].iloc[5:].notna().all()
    assert (p["cell_type_unknown_reason"].iloc[:5] == "no_expression").all()
    mapping = res.report["mapping"]
    assert mapping["evidence"]["n_cells"] == len(q) - 5
    if "cell_type_mapping_score" in p:
        assert p["cell_type_mapping_score"].iloc[:5].isna().all()


def test_the_mapping_calibration_is_read_when_the_index_is_opened(small: dict[str, Path], tmp_path: Path) -> None:
    """An update moves a superseded version's files away (index.versions): an opened index keeps the calibration
    of the version it opened."""
    index = tmp_path / "index"
    shutil.copytree(small["index"], index)
    assert (index / MAPPING_FILE).is_file()
    with AtlasIndex.open(index) as idx:
        (index / MAPPING_FILE).rename(tmp_path / "moved.json")
        res = annotate(small["small"], idx, progress=False)
        assert mapping_calibration(idx) is not None
    assert res.report["mapping"]["verdict"] != "uncalibrated"


def test_a_users_h5ad_as_out_is_refused_as_not_ours(small: dict[str, Path], tmp_path: Path) -> None:
    victim = tmp_path / "userdata.h5ad"
    shutil.copy(small["small"], victim)
    before = victim.read_bytes()
    out = _cli("annotate", str(small["small"]), "--index", str(small["index"]), "--out", str(victim))
    assert out.exit_code == 1 and "exists and was not written by scatlas" in out.output, out.output
    assert "is not a h5ad file" not in out.output and victim.read_bytes() == before
    (tmp_path / "notes.h5ad").write_text("my notes")
    out = _cli("annotate", str(small["small"]), "--index", str(small["index"]), "--out", str(tmp_path / "notes.h5ad"))
    assert out.exit_code == 1 and "is not a h5ad file" in out.output


@pytest.mark.parametrize(("args", "why"), [
    (("--max-votes-per-dataset", "5"), "--max-votes-per-dataset caps the vote"),
    (("--predictor", "knn"), "(by neighbour vote (--predictor knn))"),
])
def test_the_vote_says_why_it_decides(small: dict[str, Path], tmp_path: Path, args: tuple[str, ...],
                                      why: str) -> None:
    with AtlasIndex.open(small["index"]) as idx:
        assert "cell_type" in idx.label_heads()
    out = _cli("annotate", str(small["small"]), "--index", str(small["index"]), "--out", str(tmp_path / "v.h5ad"),
               *args)
    assert out.exit_code == 0, out.output
    assert why in out.output and "no label head" not in out.output
    report = json.loads((tmp_path / "v.report.json").read_text())
    assert report["labels"]["cell_type"]["predicted_by_reason"] in ("max_votes_per_dataset", "knn_asked")


def test_far_quantile_range_agrees_with_the_library(small: dict[str, Path], tmp_path: Path) -> None:
    out = _cli("annotate", str(small["small"]), "--index", str(small["index"]), "--out", str(tmp_path / "f.h5ad"),
               "--far-quantile", "1")
    assert out.exit_code == 2 and "--far-quantile" in out.output and "far_quantile" not in out.output
    with pytest.raises(InputError, match="far-from-atlas quantile must be above 0 and below 1"):
        annotate(small["small"], small["index"], far_quantile=1.0, progress=False)


def test_neighbour_rows_beyond_the_limit_are_refused(small: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A k the atlas can serve but whose neighbour rows (query cells x k) would not fit in memory is refused before
    the search; without kept neighbours (annotate's keep_neighbors=False) it is not."""
    import scatlas.query.search as search_module

    monkeypatch.setattr(search_module, "MAX_RESULT_ROWS", 100)
    with pytest.raises(InputError, match="neighbour rows, over the 100 kept"):
        search_cells(small["small"], small["index"], k=30, progress=False)
    with pytest.raises(InputError, match="lower --k"):
        annotate(small["small"], small["index"], k=30, progress=False)
    annotate(small["small"], small["index"], k=30, progress=False, keep_neighbors=False)
    search_cells(small["small"], small["index"], k=30, mode="centroid", progress=False)  # one row set


def test_a_forced_low_overlap_query_that_maps_well_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """Under the default gene-overlap floor (lowered by the user) the mapping check is blind: 'maps well' is said
    with a warning; above it, or when the query maps poorly, nothing more is said."""
    import importlib
    import logging
    from types import SimpleNamespace

    from scatlas.query.mapping import MappingVerdict

    module = importlib.import_module("scatlas.query.annotate")
    cells = lambda overlap: SimpleNamespace(match=SimpleNamespace(fraction_of_target=overlap))  # noqa: E731
    with caplog.at_level(logging.WARNING):
        module._warn_blind_mapping(cells(0.09), MappingVerdict("maps_well", 0.9))
        assert any("9% of the embedder's genes" in r.getMessage() and "means little" in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        module._warn_blind_mapping(cells(0.2), MappingVerdict("maps_well", 0.9))
        module._warn_blind_mapping(cells(0.09), MappingVerdict("maps_poorly", 0.5))
        assert not caplog.records


def test_a_label_key_of_ids_is_refused(small, tmp_path, monkeypatch):
    """Each query cell gets a probability per class: an id column (one value per atlas cell) would take gigabytes."""
    import scatlas.query.atlas_labels as atlas_labels

    monkeypatch.setattr(atlas_labels, "MAX_LABEL_CLASSES", 500)
    result = _cli("annotate", str(small["small"]), "--index", str(small["index"]), "--label-key", "obs_id",
                  "--out", str(tmp_path / "a.h5ad"))
    assert result.exit_code != 0 and result.output.startswith("Error: ")
    assert "distinct 'obs_id' values, over the 500 a label transfer takes" in result.output
    assert not (tmp_path / "a.h5ad").exists()
