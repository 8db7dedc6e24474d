"""The atlas store's life cycle after ingest (atlas/lifecycle.py): `scatlas datasets`, `remove`, `relabel`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import anndata
import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas import AtlasStore, ingest, list_datasets, relabel_dataset, remove_datasets
from scatlas.atlas.errors import InputError
from scatlas.atlas.store_writer import StoreWriter
from scatlas.atlas.verify import verify_store
from scatlas.cli import cli

B_CELL, T_CELL, MONOCYTE = "CL:0000236", "CL:0000084", "CL:0000576"
TERMS = {"B cell": B_CELL, "T cell": T_CELL, "monocyte": MONOCYTE}


def _run(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _rows(atlas: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(atlas / "cells.duckdb"), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def _state(atlas: Path) -> dict:
    return json.loads((atlas / "store.json").read_text())


def _with_terms(a: anndata.AnnData) -> anndata.AnnData:
    a.obs["cell_type_ontology_term_id"] = a.obs["cell_type"].astype(str).map(TERMS).astype(object)
    return a


def _forgot_obs_map(a: anndata.AnnData) -> anndata.AnnData:
    """Labels in `celltype` (ingested without --obs-map celltype=cell_type), with stale terms of other labels."""
    a = _with_terms(a)
    a.obs["celltype"] = a.obs.pop("cell_type").astype(str).str.upper()
    return a


@pytest.fixture
def three(tmp_path: Path, h5ad_factory: Callable[..., Path]) -> Path:
    """A store of three small datasets a, b, c (40 cells each; b and c share half their genes with a)."""
    atlas = tmp_path / "atlas"
    paths = [h5ad_factory(name, seed=i, n_cells=40, n_genes=30, prefix=name, gene_offset=15 * i)
             for i, name in enumerate(("a", "b", "c"))]
    ingest(paths, atlas, progress=False)
    return atlas


# -- remove ---------------------------------------------------------------------------------------------------------


def test_remove_commits_and_ids_are_never_reused(three: Path, h5ad_factory: Callable[..., Path]) -> None:
    before = _state(three)
    res = _run("remove", "--atlas", str(three), "--dataset", "b")
    assert res.exit_code == 0, res.output
    assert "removed b: 40 cells (ids 40-79)" in res.output and "space is not reclaimed" in res.output
    state = _state(three)
    assert [d["dataset_id"] for d in state["datasets"]] == ["a", "c"]
    assert (state["obs_high_water"], state["var_high_water"]) == (before["obs_high_water"], before["var_high_water"])
    assert _rows(three, "SELECT count(*) FROM cells WHERE dataset_id = 'b'") == [(0,)]
    assert _rows(three, "SELECT dataset_id FROM datasets ORDER BY 1") == [("a",), ("c",)]
    store = AtlasStore.open(three)
    assert store.n_cells == 80 and [c.dataset_id for c in store.iter_chunks(with_X=False)] == ["a", "c"]
    report = verify_store(three, progress=False)
    assert report.ok, report.problems
    listing = _run("datasets", "--atlas", str(three))
    assert listing.exit_code == 0 and "\nb:" not in listing.output and "40 ids unused" in listing.output
    # a later ingest gets ids beyond the old high-water mark; b's genes are still known
    ingest([h5ad_factory("d", seed=7, n_cells=20, n_genes=30, prefix="d", gene_offset=15)], three, progress=False)
    d = AtlasStore.open(three).dataset("d")
    assert d.start >= before["obs_high_water"]
    assert d.genes["n_new"] == 0


def test_removing_every_dataset_leaves_an_empty_store_that_takes_new_ones(
    three: Path, h5ad_factory: Callable[..., Path]
) -> None:
    high = _state(three)["obs_high_water"]
    report = remove_datasets(three, ["a", "b", "c", "a"])
    assert [r[0] for r in report.removed] == ["a", "b", "c"] and report.n_cells == 0 and report.n_unused_ids == high
    assert _rows(three, "SELECT count(*) FROM cells") == [(0,)]
    assert list_datasets(three).datasets == []
    res = _run("datasets", "--atlas", str(three))
    assert res.exit_code == 0 and "0 dataset(s), 0 cells" in res.output
    ingest([h5ad_factory("again", seed=3, n_cells=20, n_genes=30, prefix="x")], three, progress=False)
    store = AtlasStore.open(three)
    assert store.dataset("again").start == high and store.dataset("again").genes["n_new"] == 0


def test_removing_an_unknown_dataset_fails_cleanly(three: Path) -> None:
    before = (three / "store.json").read_bytes()
    res = _run("remove", "--atlas", str(three), "--dataset", "a", "--dataset", "nope")
    assert res.exit_code == 1 and res.output.startswith("Error: ")
    assert "'nope'" in res.output and "scatlas datasets" in res.output
    assert "'a'" not in res.output and "'c'" not in res.output  # the store's datasets are not listed
    assert (three / "store.json").read_bytes() == before
    res = _run("remove", "--atlas", str(three.parent / "missing"), "--dataset", "a")
    assert res.exit_code == 1 and "not an atlas store" in res.output and not (three.parent / "missing").exists()
    res = _run("remove", "--atlas", str(three), "--dataset", "A")  # ingest takes ids case-insensitively
    assert res.exit_code == 1 and "did you mean 'a'?" in res.output and (three / "store.json").read_bytes() == before


@pytest.mark.parametrize("recovery", ["rerun", "writer"])
def test_a_remove_killed_after_its_commit_point_is_finished_later(
    three: Path, monkeypatch: pytest.MonkeyPatch, recovery: str
) -> None:
    real = StoreWriter.delete_uncommitted_rows
    calls: list[int] = []

    def killed(self: StoreWriter) -> list[str]:
        calls.append(1)
        if len(calls) > 1:  # the first call is the writer's recovery on open; the second is the remove's delete
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(StoreWriter, "delete_uncommitted_rows", killed)
    with pytest.raises(RuntimeError, match="killed"):
        remove_datasets(three, ["b"])
    monkeypatch.undo()
    # committed: readers no longer see b, though its rows are still in the cell table
    assert [d.dataset_id for d in AtlasStore.open(three).datasets] == ["a", "c"]
    assert _rows(three, "SELECT count(*) FROM cells WHERE dataset_id = 'b'") == [(40,)]
    if recovery == "rerun":
        res = _run("remove", "--atlas", str(three), "--dataset", "b")
        assert res.exit_code == 0, res.output
        assert "already removed by an interrupted remove" in res.output
    else:
        with StoreWriter.open(three, create=False) as writer:
            assert writer.cleaned_datasets == ["b"]
    assert _rows(three, "SELECT count(*) FROM cells WHERE dataset_id = 'b'") == [(0,)]
    assert _rows(three, "SELECT dataset_id FROM datasets ORDER BY 1") == [("a",), ("c",)]
    assert verify_store(three, progress=False).ok


def test_a_remove_whose_row_delete_fails_on_a_full_disk_says_it_is_removed_and_how_to_finish(
    three: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    real = StoreWriter.delete_uncommitted_rows
    calls: list[int] = []

    def full(self: StoreWriter) -> list[str]:
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self)

    monkeypatch.setattr(StoreWriter, "delete_uncommitted_rows", full)
    res = _run("remove", "--atlas", str(three), "--dataset", "b")
    monkeypatch.undo()
    assert res.exit_code == 1 and "Traceback" not in res.output  # type: ignore[attr-defined]
    text = res.output  # type: ignore[attr-defined]
    assert "removed from" in text and "No space left on device" in text and "rerun the same remove" in text
    res = _run("remove", "--atlas", str(three), "--dataset", "b")
    assert res.exit_code == 0 and verify_store(three, progress=False).ok  # type: ignore[attr-defined]


# -- relabel --------------------------------------------------------------------------------------------------------


@pytest.fixture
def forgot(tmp_path: Path, h5ad_factory: Callable[..., Path]) -> Path:
    """A store with `fx` (labels in `celltype`, stale CL terms) and `ok` (labels and terms in the schema)."""
    atlas = tmp_path / "atlas"
    fx = h5ad_factory("fx", _forgot_obs_map, seed=1, n_cells=60, n_genes=30, prefix="fx")
    ok = h5ad_factory("ok", _with_terms, seed=2, n_cells=40, n_genes=30, prefix="ok")
    ingest([fx, ok], atlas, progress=False)
    return atlas


def test_relabel_mends_a_forgotten_obs_map_and_clears_the_stale_terms(forgot: Path, tmp_path: Path) -> None:
    src = anndata.read_h5ad(tmp_path / "fx.h5ad")
    assert _rows(forgot, "SELECT count(cell_type) FROM cells WHERE dataset_id = 'fx'") == [(0,)]
    columns = ", ".join(f'"{c}"' for (c,) in _rows(forgot, "SELECT column_name FROM (DESCRIBE cells)"))
    ok_before = _rows(forgot, f"SELECT {columns} FROM cells WHERE dataset_id = 'ok' ORDER BY soma_joinid")
    stale = _rows(forgot, "SELECT cell_type_ontology_term_id FROM cells WHERE dataset_id = 'fx' ORDER BY soma_joinid")
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--obs-map", "celltype=cell_type")
    assert res.exit_code == 0, res.output
    assert "fx: 60 cells, obs revision 1" in res.output and "celltype -> cell_type: 60 cells changed" in res.output
    assert "cell_type_ontology_term_id: cleared for this dataset" in res.output
    # nothing is lost: the empty labels need no keeping, the stale terms are kept beside
    assert "the terms cell_type_ontology_term_id held are kept in cell_type_rev0_ontology_term_id" in res.output
    assert _rows(forgot, "SELECT cell_type_rev0_ontology_term_id FROM cells WHERE dataset_id = 'fx' "
                         "ORDER BY soma_joinid") == stale
    labels = _rows(forgot, "SELECT cell_type, cell_type_ontology_term_id FROM cells WHERE dataset_id = 'fx' "
                           "ORDER BY soma_joinid")
    assert [lab for lab, _ in labels] == list(src.obs["celltype"].astype(str))
    assert {term for _, term in labels} == {None}
    assert _rows(forgot, f"SELECT {columns} FROM cells WHERE dataset_id = 'ok' ORDER BY soma_joinid") == ok_before
    records = {d["dataset_id"]: d for d in _state(forgot)["datasets"]}
    assert (records["fx"]["obs_revision"], records["ok"]["obs_revision"]) == (1, 0)
    snap = {d["dataset_id"]: d for d in AtlasStore.open(forgot).snapshot()["datasets"]}
    assert snap["fx"]["obs_revision"] == 1 and snap["fx"]["x_sha256"] == records["fx"]["x_sha256"] != ""
    # a second relabel with an ontology map refills the terms from it (upper-case labels here)
    table = tmp_path / "terms.csv"
    table.write_text(f"label,ontology_term_id\nB CELL,{B_CELL}\nT CELL,{T_CELL}\n")
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--obs-map", "celltype=cell_type",
               "--ontology-map", str(table))
    assert res.exit_code == 0, res.output
    assert "0 cells changed" in res.output and "obs revision 2" in res.output
    assert "ontology map (cell_type -> cell_type_ontology_term_id): 3 labels" in res.output
    assert "not mapped: 'MONOCYTE'" in res.output
    pairs = set(_rows(forgot, "SELECT cell_type, cell_type_ontology_term_id FROM cells WHERE dataset_id = 'fx'"))
    assert pairs == {("B CELL", B_CELL), ("T CELL", T_CELL), ("MONOCYTE", None)}
    assert _rows(forgot, f"SELECT {columns} FROM cells WHERE dataset_id = 'ok' ORDER BY soma_joinid") == ok_before


def test_a_relabel_that_changes_nothing_leaves_the_store_and_its_revision_alone(forgot: Path) -> None:
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--obs-map", "celltype=cell_type")
    assert res.exit_code == 0 and "obs revision 1" in res.output  # type: ignore[attr-defined]
    state = (forgot / "store.json").read_bytes()
    again = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--obs-map", "celltype=cell_type")
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    out = again.output  # type: ignore[attr-defined]
    assert "obs revision 1" in out and "0 cells changed" in out and "cleared" not in out
    assert (forgot / "store.json").read_bytes() == state


def test_relabel_library_reports_and_finds_a_renamed_obs_column(tmp_path: Path,
                                                                 h5ad_factory: Callable[..., Path]) -> None:
    def clash(a: anndata.AnnData) -> anndata.AnnData:  # `Tissue` clashes with the schema's `tissue`: stored renamed
        a.obs["Tissue"] = np.where(np.arange(a.n_obs) % 2 == 0, "lung", "gut")
        return a

    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("cl", clash, n_cells=30, n_genes=30)], atlas, progress=False)
    assert AtlasStore.open(atlas).dataset("cl").renamed_columns == {"Tissue": "Tissue_orig"}
    report = relabel_dataset(atlas, "cl", {"Tissue": "tissue", "cell_type": "donor_id"})
    by_target = {c.target: c for c in report.columns}
    assert by_target["tissue"].stored_source == "Tissue_orig" and by_target["tissue"].n_changed == 30
    assert dict(by_target["tissue"].values) == {"lung": 15, "gut": 15} and by_target["tissue"].n_values == 2
    assert by_target["donor_id"].term_column is None and by_target["donor_id"].terms is None
    assert report.obs_revision == 1 and report.to_json()["columns"][0]["target"] == "tissue"
    assert _rows(atlas, "SELECT count(*) FROM cells WHERE cell_type IS DISTINCT FROM donor_id") == [(0,)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "fx", "--obs-map", "nope=cell_type"], "has no obs column 'nope'"),
        (["--dataset", "fx", "--obs-map", "celltype=dataset_id"], "cannot be relabelled"),
        (["--dataset", "fx", "--obs-map", "celltype=soma_joinid"], "cannot be relabelled"),
        (["--dataset", "fx", "--obs-map", "celltype=brand_new"], "not a column of the store's cell table"),
        (["--dataset", "fx", "--obs-map", "celltype=cell_type", "--obs-map", "donor_id=cell_type"],
         "the target of two pairs"),
        (["--dataset", "fx", "--obs-map", "celltype"], "expected SOURCE=TARGET"),
        (["--dataset", "nope", "--obs-map", "celltype=cell_type"], "`scatlas datasets --atlas"),
        (["--dataset", "fx", "--obs-map", "celltype=donor_id", "--ontology-map", "TERMS"],
         "no target has a Cell Ontology term column"),
    ],
)
def test_relabel_errors_change_nothing(forgot: Path, tmp_path: Path, args: list[str], message: str) -> None:
    table = tmp_path / "terms.csv"
    table.write_text(f"label,ontology_term_id\nB CELL,{B_CELL}\n")
    before = ((forgot / "store.json").read_bytes(), _rows(forgot, "SELECT * FROM cells ORDER BY soma_joinid"))
    res = _run("relabel", "--atlas", str(forgot), *[str(table) if a == "TERMS" else a for a in args])
    assert res.exit_code != 0 and "Error:" in res.output and message in res.output, res.output
    assert "Traceback" not in res.output
    assert ((forgot / "store.json").read_bytes(), _rows(forgot, "SELECT * FROM cells ORDER BY soma_joinid")) == before


def test_relabel_of_a_column_of_another_dataset_is_refused(forgot: Path) -> None:
    with pytest.raises(InputError, match="dataset 'ok' has no obs column 'celltype'"):
        relabel_dataset(forgot, "ok", [("celltype", "cell_type")])


# -- datasets ---------------------------------------------------------------------------------------------------------


def test_datasets_lists_text_and_json(forgot: Path, tmp_path: Path) -> None:
    out = tmp_path / "listing.json"
    res = _run("datasets", "--atlas", str(forgot), "--json-out", str(out))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{forgot}: 2 dataset(s), 100 cells, 30 genes")
    assert any(line.startswith("fx: 60 cells (ids 0-59), 30 genes (30 added to the atlas), X counts from X")
               for line in lines)
    assert any(line.startswith("ok: 40 cells (ids 60-99), 30 genes (0 added") for line in lines)
    assert "obs revision 0" in res.output and "celltype (3 values): " in res.output
    assert "donor_id (2 values): " in res.output and "cell_type_ontology_term_id" not in res.output
    payload = json.loads(out.read_text())
    assert payload["n_cells"] == 100 and payload["n_unused_ids"] == 0
    by_id = {d["dataset_id"]: d for d in payload["datasets"]}
    fx_labels = {c["name"]: c for c in by_id["fx"]["label_columns"]}
    assert set(fx_labels) == {"donor_id", "celltype"}  # tissue has one value; cell_type none
    assert sum(n for _, n in fx_labels["celltype"]["top"]) == 60 and fx_labels["celltype"]["n_values"] == 3
    n_ok = by_id["ok"]["n_cells"]  # its labels have terms (the fixture's schema columns): counted in the listing
    assert {c["name"]: c["n_with_term"] for c in by_id["ok"]["label_columns"]}.get("cell_type") == n_ok
    ok_cell_type = next(c for c in by_id["ok"]["label_columns"] if c["name"] == "cell_type")
    assert f"cell_type ({ok_cell_type['n_values']} values; {n_ok} cells with a Cell Ontology term)" in res.output
    ok_labels = {c["name"] for c in by_id["ok"]["label_columns"]}
    assert ok_labels == {"cell_type", "donor_id"}
    assert by_id["ok"]["source_format"] == "h5ad" and by_id["ok"]["obs_revision"] == 0
    listing = list_datasets(forgot)
    assert [d.dataset_id for d in listing.datasets] == ["fx", "ok"] and listing.n_genes == 30


@pytest.mark.parametrize("command", [
    ["datasets"], ["remove", "--dataset", "a"], ["relabel", "--dataset", "a", "--obs-map", "x=cell_type"],
    ["verify"], ["build", "--index", "NEW"],
])
def test_an_index_given_as_the_store_is_named_and_never_to_be_deleted(tmp_path: Path, command: list[str]) -> None:
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    (index / "build.json").write_text("{}")
    args = [str(tmp_path / "new_index") if a == "NEW" else a for a in command]
    res = CliRunner().invoke(cli, [*args, "--atlas", str(index)])
    assert res.exit_code == 1 and res.output.startswith("Error: "), res.output
    assert "holds a scatlas index, not an atlas store" in res.output
    assert "delete" not in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in index.iterdir()) == ["build.json", "manifest.json"]


def test_relabel_with_an_ontology_map_alone_fills_the_labels_terms(tmp_path: Path,
                                                                   h5ad_factory: Callable[..., Path]) -> None:
    """A dataset ingested without --ontology-map gets its labels' terms afterwards (a forgotten map), only where the
    term is empty; the obs revision is bumped so an index sees the change; nothing else changes."""
    atlas = tmp_path / "atlas"
    def broad(adata: anndata.AnnData) -> anndata.AnnData:
        adata.obs["broad"] = adata.obs["cell_type"].astype(str)
        return adata

    path = h5ad_factory("plain", broad, seed=3, n_cells=50, n_genes=30, prefix="p", cell_types=("B lymph", "T lymph"))
    ingest([path], atlas, progress=False)
    table = tmp_path / "terms.csv"
    table.write_text(f"label,ontology_term_id\nB lymph,{B_CELL}\n")
    before = _rows(atlas, "SELECT soma_joinid, cell_type FROM cells ORDER BY 1")
    res = _run("relabel", "--atlas", str(atlas), "--dataset", "plain", "--ontology-map", str(table))
    assert res.exit_code == 0, res.output
    assert "obs revision 1" in res.output and "mapped by the map" in res.output
    got = dict(_rows(atlas, "SELECT cell_type, any_value(coalesce(cell_type_ontology_term_id, '')) FROM cells "
                            "GROUP BY cell_type"))
    assert got == {"B lymph": B_CELL, "T lymph": ""}
    assert _rows(atlas, "SELECT soma_joinid, cell_type FROM cells ORDER BY 1") == before
    state = (atlas / "store.json").read_bytes()
    again = _run("relabel", "--atlas", str(atlas), "--dataset", "plain", "--ontology-map", str(table))
    assert again.exit_code == 0 and "obs revision 1" in again.output, again.output  # nothing left to fill
    assert "2 labels: 1 had terms in the data, 0 mapped by the map, 0 partly, 1 not mapped; 0 cells filled" in (
        again.output)
    assert (atlas / "store.json").read_bytes() == state
    more = tmp_path / "more.csv"
    more.write_text(f"label,ontology_term_id\nB lymph,{B_CELL}\nT lymph,{T_CELL}\n")
    n_t = _rows(atlas, "SELECT count(*) FROM cells WHERE cell_type = 'T lymph'")[0][0]
    filled = _run("relabel", "--atlas", str(atlas), "--dataset", "plain", "--ontology-map", str(more))
    assert filled.exit_code == 0, filled.output  # the counts say what this run filled, not every term there is
    assert f"2 labels: 1 had terms in the data, 1 mapped by the map, 0 partly, 0 not mapped; {n_t} cells filled" in (
        filled.output)
    odd = tmp_path / "odd.csv"  # another term for B lymph (kept: the data's own), and a label the dataset lacks
    odd.write_text(f"label,ontology_term_id\nB lymph,{MONOCYTE}\nZ lymph,{T_CELL}\n")
    res = _run("relabel", "--atlas", str(atlas), "--dataset", "plain", "--ontology-map", str(odd))
    assert res.exit_code == 0, res.output
    assert "conflicts (the data's own term kept): 'B lymph'" in res.output
    assert "1 label(s) of the map name no cell_type value of plain: unused" in res.output
    refused = _run("relabel", "--atlas", str(atlas), "--dataset", "plain")
    assert refused.exit_code != 0 and "--ontology-map FILE.csv to give" in refused.output
    # another label column, which has no term column yet: it is made and filled, as ingest would
    res = _run("relabel", "--atlas", str(atlas), "--dataset", "plain", "--ontology-map", str(table),
               "--ontology-label-key", "broad")
    assert res.exit_code == 0, res.output
    got = dict(_rows(atlas, "SELECT broad, any_value(coalesce(broad_ontology_term_id, '')) FROM cells GROUP BY broad"))
    assert got == {"B lymph": B_CELL, "T lymph": ""}
    missing = _run("relabel", "--atlas", str(atlas), "--dataset", "plain", "--ontology-map", str(table),
                   "--ontology-label-key", "nope")
    assert missing.exit_code != 0 and "has no column 'nope'" in missing.output
    assert verify_store(atlas, progress=False).ok


def test_relabel_fills_blank_terms(tmp_path: Path, h5ad_factory: Callable[..., Path]) -> None:
    """A term of only spaces is missing (the report counts it so): the fill writes it."""
    def blank(adata: anndata.AnnData) -> anndata.AnnData:
        adata.obs["cell_type_ontology_term_id"] = " "
        return adata

    atlas = tmp_path / "atlas"
    ingest([h5ad_factory("blank", blank, seed=3, n_cells=40, n_genes=30, cell_types=("B lymph", "T lymph"))], atlas,
           progress=False)
    table = tmp_path / "terms.csv"
    table.write_text(f"label,ontology_term_id\nB lymph,{B_CELL}\n")
    res = _run("relabel", "--atlas", str(atlas), "--dataset", "blank", "--ontology-map", str(table))
    assert res.exit_code == 0, res.output
    n_b = _rows(atlas, "SELECT count(*) FROM cells WHERE cell_type = 'B lymph'")[0][0]
    assert f"1 mapped by the map, 0 partly, 1 not mapped; {n_b} cells filled" in res.output
    got = dict(_rows(atlas, "SELECT cell_type, any_value(cell_type_ontology_term_id) FROM cells GROUP BY cell_type"))
    assert got == {"B lymph": B_CELL, "T lymph": " "}


def test_relabel_keeps_the_values_it_replaces_and_puts_them_back(forgot: Path, tmp_path: Path) -> None:
    """A relabel over labels (or a typo: --obs-map sample=cell_type) lost them; they are kept, and one more relabel
    puts them back."""
    before = _rows(forgot, "SELECT cell_type, cell_type_ontology_term_id FROM cells WHERE dataset_id = 'ok' "
                           "ORDER BY soma_joinid")
    assert {t for _, t in before} != {None}
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "ok", "--obs-map", "donor_id=cell_type")
    assert res.exit_code == 0, res.output
    assert ("the values cell_type held are kept in cell_type_rev0 (their terms: cell_type_rev0_ontology_term_id); "
            "to put them back: --obs-map cell_type_rev0=cell_type --obs-map "
            "cell_type_rev0_ontology_term_id=cell_type_ontology_term_id") in res.output
    assert _rows(forgot, "SELECT cell_type_rev0, cell_type_rev0_ontology_term_id FROM cells WHERE dataset_id = 'ok' "
                         "ORDER BY soma_joinid") == before
    back = _run("relabel", "--atlas", str(forgot), "--dataset", "ok", "--obs-map", "cell_type_rev0=cell_type",
                "--obs-map", "cell_type_rev0_ontology_term_id=cell_type_ontology_term_id")
    assert back.exit_code == 0, back.output
    assert "kept in cell_type_rev1" in back.output  # the donor ids it replaced, kept in turn
    assert _rows(forgot, "SELECT cell_type, cell_type_ontology_term_id FROM cells WHERE dataset_id = 'ok' "
                         "ORDER BY soma_joinid") == before
    assert verify_store(forgot, progress=False).ok
    # another dataset's relabel at its revision 0 keeps its values in the same column (it holds none of them)
    fx = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--obs-map", "celltype=cell_type")
    assert fx.exit_code == 0 and "kept in cell_type_rev0_ontology_term_id" in fx.output, fx.output
    fx = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--obs-map", "donor_id=cell_type")
    assert fx.exit_code == 0 and "kept in cell_type_rev1;" in fx.output, fx.output
    columns = [c for (c,) in _rows(forgot, "SELECT column_name FROM (DESCRIBE cells)")]
    assert [c for c in columns if "_rev" in c] == ["cell_type_rev0", "cell_type_rev0_ontology_term_id",
                                                   "cell_type_rev1"], columns
    # archives, not annotations: a build's own choice of label columns leaves them out
    from scatlas.index.heads_training import label_column_classes

    with duckdb.connect(str(forgot / "cells.duckdb"), read_only=True) as con:
        assert not [c for c in label_column_classes(con) if "_rev" in c]


def test_a_store_given_as_the_index_is_named(three: Path) -> None:
    res = _run("info", str(three))
    assert res.exit_code == 1 and "it is an atlas store, not an index: give it as --atlas" in res.output, res.output
    res = _run("datasets", "--atlas", str(three))
    assert res.exit_code == 0 and "cell ids below" in res.output


def test_relabel_takes_several_datasets_and_says_which_went_before_a_failure(forgot: Path) -> None:
    """A tryout relabelled three datasets with three commands; each in turn now, each its own revision."""
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--dataset", "ok", "--obs-map",
               "donor_id=tissue")
    assert res.exit_code == 0, res.output
    assert "fx: 60 cells, obs revision 1" in res.output and "ok: 40 cells, obs revision 1" in res.output
    assert _rows(forgot, "SELECT count(*) FROM cells WHERE tissue IS DISTINCT FROM donor_id") == [(0,)]
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--dataset", "nope", "--obs-map",
               "tissue=cell_type")
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "no dataset 'nope'" in res.output
    assert _rows(forgot, "SELECT count(cell_type) FROM cells WHERE dataset_id = 'fx'") == [(0,)]  # nothing changed
    res = _run("relabel", "--atlas", str(forgot), "--dataset", "fx", "--dataset", "ok", "--obs-map",
               "celltype=cell_type")  # ok has no celltype column: fx is relabelled, then the refusal says so
    assert res.exit_code == 1 and "\nError: " in res.output and "relabelled before it: 'fx'" in res.output
