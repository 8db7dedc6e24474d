"""Label classes (index/label_classes.py): values merged by Cell Ontology term at build, stored, verified, used by
the label heads; which columns get heads by default."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import IndexFormatError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, LabelClasses, build_index, verify_index
from scatlas.index.label_classes import ensure_label_classes
from scatlas.index.label_heads import HEADS_DIR, HEADS_FILE
from scatlas.index.manifest import LABELS_DIR, LABELS_FILE, MANIFEST_FILE, manifest_digest
from tests.conftest import make_adata, run_cli

B_CELL, CLASSICAL_MONO, T_CELL, LYMPHOCYTE = "CL:0000236", "CL:0000860", "CL:0000084", "CL:0000542"
OPTS = {"n_hvg": 40, "n_components": 8}


def _mixed_atlas(root: Path) -> Path:
    """Two datasets in two vocabularies: A says "B cell" / "classical monocyte" with term ids; B says "B cells"
    (no term: found by normalised name) and "CD14+ monocyte" (with the classical monocyte's term); both "T cell"."""
    a = make_adata(300, 60, seed=1, prefix="a", cell_types=("B cell", "classical monocyte", "T cell"))
    a.obs["cell_type_ontology_term_id"] = a.obs["cell_type"].astype(str).map(
        {"B cell": B_CELL, "classical monocyte": CLASSICAL_MONO, "T cell": T_CELL}).astype(object)
    b = make_adata(200, 60, seed=2, prefix="b", cell_types=("B cells", "CD14+ monocyte", "T cell"))
    b.obs["cell_type_ontology_term_id"] = b.obs["cell_type"].astype(str).map(
        {"CD14+ monocyte": CLASSICAL_MONO}).astype(object)
    a.write_h5ad(root / "a.h5ad")
    b.write_h5ad(root / "b.h5ad")
    ingest([root / "a.h5ad", root / "b.h5ad"], root / "atlas", progress=False)
    return root / "atlas"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("classes")
    atlas = _mixed_atlas(root)
    build_index(atlas, root / "index", embedder_options=OPTS, progress=False)
    return {"root": root, "atlas": atlas, "index": root / "index"}


def test_one_class_per_term_keeping_the_most_frequent_value(mixed: dict[str, Any]) -> None:
    with AtlasIndex.open(mixed["index"]) as idx:
        lc = idx.label_classes("cell_type")
        values, counts = idx.value_counts("cell_type")
    n = dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert n["B cell"] > n["B cells"] and n["classical monocyte"] > n["CD14+ monocyte"]
    assert isinstance(lc, LabelClasses) and lc.key == "cell_type"
    assert lc.classes == ("B cell", "T cell", "classical monocyte")
    assert dict(lc.value_class) == {"B cell": "B cell", "B cells": "B cell", "classical monocyte": "classical monocyte",
                                    "CD14+ monocyte": "classical monocyte", "T cell": "T cell"}
    assert dict(lc.class_term) == {"B cell": B_CELL, "classical monocyte": CLASSICAL_MONO, "T cell": T_CELL}
    assert LYMPHOCYTE in lc.term_ancestors[B_CELL] and B_CELL not in lc.term_ancestors[B_CELL]
    assert lc.term_names[B_CELL] == "B cell" and lc.term_names[LYMPHOCYTE] == "lymphocyte"
    assert all(a in lc.term_names for anc in lc.term_ancestors.values() for a in anc)
    assert lc.merged == {"B cell": ["B cell", "B cells"], "classical monocyte": ["CD14+ monocyte", "classical monocyte"]}
    got = lc.class_of(np.array(["B cells", None, "never seen", "CD14+ monocyte"], dtype=object))
    assert got.dtype == object and got.tolist() == ["B cell", None, "never seen", "classical monocyte"]
    rep = lc.report
    assert rep["term_column"] == "cell_type_ontology_term_id" and rep["ontology"]["ontology"] == "CL"
    assert rep["datasets"]["a"]["by_how"]["data"] == 3
    assert rep["datasets"]["b"]["mapped"]["B cells"] == [B_CELL, "normalised"]
    assert rep["datasets"]["b"]["mapped"]["CD14+ monocyte"] == [CLASSICAL_MONO, "data"]
    assert rep["datasets"]["b"]["mapped"]["T cell"] == [T_CELL, "name"]


def test_heads_are_trained_on_the_merged_classes_and_only_for_cell_type(mixed: dict[str, Any]) -> None:
    meta = json.loads((mixed["index"] / HEADS_DIR / HEADS_FILE).read_text())
    assert list(meta["heads"]) == ["cell_type"]  # the default: cell_type only (donor_id is label-like too)
    assert meta["heads"]["cell_type"]["classes"] == ["B cell", "T cell", "classical monocyte"]
    assert meta["heads"]["cell_type"]["n_train"] == 500
    with AtlasIndex.open(mixed["index"]) as idx:
        assert idx.label_heads()["cell_type"].classes == list(idx.label_classes("cell_type").classes)
        assert meta["label_classes"]["cell_type"] == idx.label_classes("cell_type").digest()


def test_classes_are_recorded_and_verified(mixed: dict[str, Any], tmp_path: Path) -> None:
    manifest = json.loads((mixed["index"] / MANIFEST_FILE).read_text())
    assert set(manifest["labels_files"]) == {f"{LABELS_DIR}/{LABELS_FILE}"}
    assert verify_index(mixed["index"], progress=False).ok
    copy = tmp_path / "index"
    shutil.copytree(mixed["index"], copy)
    path = copy / LABELS_DIR / LABELS_FILE
    text = path.read_text()
    path.write_text(text.replace('"B cells": "B cell"', '"B cells": "B cel!"'))
    report = verify_index(copy, progress=False)
    assert not report.ok and any(p.file == f"{LABELS_DIR}/{LABELS_FILE}" for p in report.problems)
    with AtlasIndex.open(copy) as idx, pytest.raises(IndexFormatError, match="label classes"):
        idx.label_classes("cell_type")


def test_old_index_without_classes_gets_identity_classes(mixed: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "index"
    shutil.copytree(mixed["index"], copy)
    digest = manifest_digest(copy)
    shutil.rmtree(copy / LABELS_DIR)
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    del raw["labels_files"]
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    assert manifest_digest(copy) == digest  # recording the classes never changed the build id
    with AtlasIndex.open(copy) as idx:
        lc = idx.label_classes("cell_type")
        assert lc.classes == ("B cell", "B cells", "CD14+ monocyte", "T cell", "classical monocyte")
        assert dict(lc.value_class) == {v: v for v in lc.classes} and not lc.class_term and not lc.report
        assert idx.label_classes("donor_id").classes == ("d1", "d2")  # a column without stored classes
    assert verify_index(copy, progress=False).ok


def _classes_of_another_build(mixed: dict[str, Any], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the index whose stored label classes name another build and are not recorded in its manifest (as
    if written by hand, or by an earlier state of a resumed build): (index, classes file)."""
    copy = tmp_path / "index"
    shutil.copytree(mixed["index"], copy)
    path = copy / LABELS_DIR / LABELS_FILE
    payload = json.loads(path.read_text())
    payload["manifest_sha256"] = "0" * 16
    path.write_text(json.dumps(payload))
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    del raw["labels_files"]
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    return copy, path


def test_classes_of_another_build_are_ignored(mixed: dict[str, Any], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    copy, _ = _classes_of_another_build(mixed, tmp_path)
    with caplog.at_level(logging.WARNING), AtlasIndex.open(copy) as idx:
        assert "B cells" in idx.label_classes("cell_type").classes
    assert "another build" in caplog.text


def test_build_cli_label_keys(tmp_path: Path) -> None:
    atlas = _mixed_atlas(tmp_path)
    runner = CliRunner()
    common = ["build", "--atlas", str(atlas), "--embedder-option", "n_hvg=40", "--embedder-option", "n_components=8",
              "--no-progress", "--index", str(tmp_path / "index")]
    res = runner.invoke(cli, [*common, "--label-key", "donor_id"])
    assert res.exit_code == 0, res.output
    heads = json.loads((tmp_path / "index" / HEADS_DIR / HEADS_FILE).read_text())["heads"]
    assert list(heads) == ["cell_type", "donor_id"]  # cell_type and the columns named
    classes = json.loads((tmp_path / "index" / LABELS_DIR / LABELS_FILE).read_text())["keys"]
    assert set(classes) == {"cell_type", "donor_id"}
    assert classes["donor_id"]["class_term"] == {} and classes["donor_id"]["report"]["cell_type_column"] is False
    res = runner.invoke(cli, [*common, "--label-key", "all"])
    assert res.exit_code == 0, res.output
    heads = json.loads((tmp_path / "index" / HEADS_DIR / HEADS_FILE).read_text())["heads"]
    assert {"cell_type", "donor_id"} <= set(heads) and "tissue" not in heads  # every label-like column
    res = runner.invoke(cli, [*common, "--label-key", "all", "--label-key", "tissue"])
    assert res.exit_code == 2 and "give it alone" in res.output
    res = runner.invoke(cli, [*common, "--label-key", "nope"])
    assert res.exit_code == 1 and "not a column" in res.output


def test_classes_of_an_earlier_state_are_recomputed_without_a_warning(
    mixed: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A resumed build or update finds label classes stored before its manifest changed: it recomputes them, and
    the warning meant for readers (with its advice to rebuild) is not shown."""
    copy, path = _classes_of_another_build(mixed, tmp_path)
    with caplog.at_level(logging.INFO):
        classes = ensure_label_classes(copy, ["cell_type"])
    assert "recomputing" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "B cells" not in classes["cell_type"].classes  # merged by CL term again
    assert json.loads(path.read_text())["manifest_sha256"] != "0" * 16


def test_build_lists_labels_without_a_term_with_the_closest_term(tmp_path: Path) -> None:
    """A label no CL name, synonym or normalised name matches ("CD4 T cells") stays a class of its own; build says
    so with the closest CL term as a suggestion, which is never applied."""
    a = make_adata(300, 60, seed=3, prefix="a", cell_types=("B cell", "CD4 T cells", "T cell"))
    a.write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "atlas", progress=False)
    res = CliRunner().invoke(cli, ["build", "--atlas", str(tmp_path / "atlas"), "--index", str(tmp_path / "index"),
                                   "--embedder-option", "n_hvg=40", "--embedder-option", "n_components=8",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    line = next(row for row in res.output.splitlines() if row.startswith("classes      cell_type:"))
    assert "3 values -> 3 classes, 2 with a Cell Ontology term" in line
    assert "no term: 'CD4 T cells' (closest CL term: CL:" in line
    with AtlasIndex.open(tmp_path / "index") as idx:
        lc = idx.label_classes("cell_type")
    assert "CD4 T cells" in lc.classes and "CD4 T cells" not in lc.class_term  # the suggestion was not applied


def test_a_cell_type_column_without_any_term_still_gets_suggestions(tmp_path: Path) -> None:
    """cell_type is the schema's cell-type column: even when none of its values maps to a CL term (a lab's own
    abbreviations), build suggests close terms for them (other columns get suggestions only when a value maps)."""
    a = make_adata(300, 60, seed=4, prefix="a", cell_types=("CD4 T cells", "Mono_CD14x", "NK cellz"))
    a.write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", embedder_options=OPTS, progress=False,
                reference_map=False)
    with AtlasIndex.open(tmp_path / "index") as idx:
        lc = idx.label_classes("cell_type")
    assert lc.class_term == {} and lc.report["cell_type_column"] is True
    assert lc.report["unmapped"]["CD4 T cells"][0][0] == "CL:0000624"  # CD4-positive, alpha-beta T cell
    # info lists them most cells first (the stored JSON sorts its keys alphabetically)
    counts = a.obs["cell_type"].astype(str).value_counts()
    line = next(r for r in run_cli("info", str(tmp_path / "index")).splitlines() if r.startswith("classes"))
    listed = sorted(counts.index, key=lambda v: line.index(f"'{v}'"))
    assert listed == list(counts.sort_values(ascending=False, kind="stable").index), (line, counts.to_dict())
