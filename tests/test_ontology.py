"""The Cell Ontology (atlas/ontology.py), label -> term mapping, and `ingest --ontology-map` (atlas/ontology_map.py)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError
from scatlas.atlas.ontology import CellOntology, cell_ontology, map_label_values, normalise_label
from scatlas.atlas.ontology_map import read_ontology_map
from scatlas.cli import cli
from tests.conftest import make_adata

B_CELL, LYMPHOCYTE, CLASSICAL_MONO, CD14_MONO = "CL:0000236", "CL:0000542", "CL:0000860", "CL:0001054"


@pytest.fixture(scope="module")
def onto() -> CellOntology:
    return cell_ontology()


def test_terms_names_and_ancestors(onto: CellOntology) -> None:
    assert onto.is_term(B_CELL) and not onto.is_term("CL:9999999") and not onto.is_term("B cell")
    assert onto.name(B_CELL) == "B cell" and onto.name("nope") is None
    anc = onto.ancestors(B_CELL)
    assert isinstance(anc, frozenset) and LYMPHOCYTE in anc and "CL:0000000" in anc and B_CELL not in anc
    assert onto.ancestors("CL:9999999") == frozenset()
    assert cell_ontology() is onto  # shared and cached
    assert onto.description["ontology"] == "CL" and onto.description["version"]


@pytest.mark.parametrize(
    ("label", "term", "how"),
    [
        ("B cell", B_CELL, "name"),
        ("B lymphocyte", B_CELL, "synonym"),
        ("B cells", B_CELL, "normalised"),
        ("b-cells", B_CELL, "normalised"),
        ("B_cell", B_CELL, "normalised"),
        ("classical monocytes", CLASSICAL_MONO, "normalised"),
        ("CD14+ Monocytes", CD14_MONO, "normalised"),
        ("CD14 + monocyte", CD14_MONO, "normalised"),
        ("  Fibroblasts ", "CL:0000057", "normalised"),
        ("norn cell", None, "unmapped"),
        # a taxon's own term (the primate SST-CHODL interneuron; its synonym "Sst Chodl") only by its exact name
        ("Sst_Chodl", None, "unmapped"),
        ("Sst Chodl", None, "unmapped"),
        ("striatal SST-CHODL GABAergic interneuron (Primate)", "CL:4310123", "name"),
        ("", None, "unmapped"),
        ("x" * 1000, None, "unmapped"),
    ],
)
def test_lookup(onto: CellOntology, label: str, term: str | None, how: str) -> None:
    assert onto.lookup(label) == (term, how)


def test_normalise_label() -> None:
    assert normalise_label("CD4+ T-cells") == "cd4 positive t cell"
    assert normalise_label("CD27- memory B cells") == "cd27 negative memory b cell"
    assert normalise_label("CD4-positive, alpha-beta T cell") == "cd4 positive alpha beta t cell"


@pytest.mark.parametrize(
    ("label", "term"),
    [
        ("CD4 T cells", "CL:0000624"),  # CD4-positive, alpha-beta T cell (letter by letter: "endothelial cell")
        ("CD8 T", "CL:0000625"),
        ("CD8+ T cells", "CL:0000625"),  # "+" reads as "positive": still not the regulatory or helper T cell
        ("CD4+ T cells", "CL:0000624"),
        ("CD4-positive T cells", "CL:0000624"),
        ("Memory CD4 T", "CL:0000897"),  # CD4-positive, alpha-beta memory T cell
        ("B Activated", "CL:0000236"),  # B cell (letter by letter: "mature astrocyte", a synonym "activated astrocyte")
        ("CD14+ Mono", "CL:0001054"),
        ("B cells naive", "CL:0000788"),
        ("Erythrocte", "CL:0000232"),  # a misspelling: the letter fallback
        ("alpha", "CL:0000171"),  # pancreatic A cell, not alpha-beta T cell
    ],
)
def test_first_suggestion_shares_the_labels_words(onto: CellOntology, label: str, term: str) -> None:
    assert onto.suggest(label)[0][0] == term


def test_suggestions_are_reported_never_applied(onto: CellOntology) -> None:
    sugg = onto.suggest("Tregulatory cels")
    assert sugg and all(onto.is_term(t) for t, _ in sugg) and len(sugg) <= 3
    m = map_label_values(["B cell", "Tregulatory cels", "zzzz"], [5, 3, 1])
    assert m.terms["Tregulatory cels"] is None and m.how["Tregulatory cels"] == "unmapped"
    assert m.suggestions["Tregulatory cels"] and m.unmapped() == ["Tregulatory cels", "zzzz"]
    out = m.to_json()
    assert out["by_how"]["unmapped"] == 2 and out["by_how"]["name"] == 1
    assert out["unmapped"]["Tregulatory cels"][0][0].startswith("CL:")


def test_map_label_values_order_of_trust(onto: CellOntology) -> None:
    values = ["CD14+ monocyte", "B cells", "mystery", "odd", "B cell"]
    m = map_label_values(
        values, [4, 3, 2, 1, 5],
        term_ids={"CD14+ monocyte": {CLASSICAL_MONO: 9, CD14_MONO: 1}, "odd": "unknown", "B cell": "CL:0000003"},
        user_map={"mystery": "CL:0000057", "CD14+ monocyte": "CL:0000057", "B cells": "CL:0000057"},
    )
    assert (m.terms["CD14+ monocyte"], m.how["CD14+ monocyte"]) == (CLASSICAL_MONO, "data")  # the most frequent
    assert (m.terms["B cells"], m.how["B cells"]) == ("CL:0000057", "user")  # the user table beats a name match
    assert (m.terms["mystery"], m.how["mystery"]) == ("CL:0000057", "user")
    assert (m.terms["odd"], m.how["odd"]) == (None, "unmapped")  # "unknown" is no term: ignored, noted
    assert m.terms["B cell"] == "CL:0000000" and m.how["B cell"] == "data"  # an obsolete id: CL's replacement
    assert any("unknown" in n for n in m.notes) and any("obsolete" in n for n in m.notes)
    with pytest.raises(InputError, match="not a Cell Ontology id"):
        map_label_values(["a"], user_map={"a": "UBERON:0002048"})


def test_resolve_term(onto: CellOntology) -> None:
    assert onto.resolve_term(B_CELL) == (B_CELL, None)
    term, note = onto.resolve_term("CL:0000003")
    assert term == "CL:0000000" and note and "obsolete" in note
    with pytest.raises(InputError, match="not a term"):
        onto.resolve_term("CL:9999999")
    with pytest.raises(InputError, match="no single replacement"):
        onto.resolve_term("CL:0000004")  # obsolete, CL only suggests terms to consider
    with pytest.raises(InputError) as err:
        onto.resolve_term("CL:" + "9" * 5000)
    assert len(str(err.value)) < 300  # long content is never echoed


# -- the user table ------------------------------------------------------------------------------------------------


def _csv(tmp_path: Path, text: str | bytes, name: str = "map.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_read_ontology_map(tmp_path: Path) -> None:
    path = _csv(tmp_path, '\ufefflabel,ontology_term_id\nB cells,CL:0000236\n\n"Mono, CD14+",CL:0000003\n')
    assert read_ontology_map(path) == {"B cells": B_CELL, "Mono, CD14+": "CL:0000000"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,term\nB,CL:0000236\n", "row 1 must be the header"),
        ("label,ontology_term_id\nB cells,CL:0000236\nT,CL:12\n", "row 3: the term id is not a Cell Ontology"),
        ("label,ontology_term_id\nB cells,CL:9999999\n", "row 2: the term id CL:9999999 is not a term"),
        ("label,ontology_term_id\nB,CL:0000236,x\n", "row 2 has 3 fields"),
        ("label,ontology_term_id\n,CL:0000236\n", "row 2: the label is empty"),
        ("label,ontology_term_id\nB,CL:0000236\nB,CL:0000084\n", "row 3: its label was given another term"),
        ("label,ontology_term_id\n", "no label rows"),
        (b"label,ontology_term_id\nB \xff,CL:0000236\n", "not UTF-8"),
        ("label,ontology_term_id\n" + "x" * 5000 + ",CL:0000236\n", "row 2: the label"),
        ("label,ontology_term_id\n" + "x" * 200_000 + ",CL:0000236\n", "row 2: the label is longer than 256"),
        ("label,ontology_term_id\nB,CL:" + "9" * 200_000 + "\n", "row 2: a field is longer than"),
        ('label,ontology_term_id\nB,CL:0000236\n"T cell,CL:0000084\n', "row 3: a quoted field is never closed"),
        ('label,ontology_term_id\n"T" cell,CL:0000084\n', "row 2: a quoted field has more text after"),
    ],
)
def test_malformed_ontology_map_is_refused_naming_the_row(tmp_path: Path, text: str | bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        read_ontology_map(_csv(tmp_path, text))
    assert len(str(err.value)) < 400 and "(Error)" not in str(err.value)


def test_a_file_that_is_not_an_ontology_map_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="row 1 must be the header") as err:
        read_ontology_map(_csv(tmp_path, "root:x:0:0:root:/root:/bin/bash\nSECRET-CONTENT,x\n"))
    assert "root" not in str(err.value).replace(str(tmp_path), "") and "SECRET" not in str(err.value)


def test_oversized_ontology_map_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scatlas.atlas.ontology_map as om

    monkeypatch.setattr(om, "MAX_MAP_BYTES", 100)
    with pytest.raises(InputError, match="more than the 100"):
        read_ontology_map(_csv(tmp_path, "label,ontology_term_id\n" + "B,CL:0000236\n" * 20))


def _h5ad(tmp_path: Path, name: str, cell_types: tuple[str, ...], terms: dict[str, str] | None = None,
          **kwargs: object) -> Path:
    a = make_adata(90, 40, prefix=name, cell_types=cell_types, **kwargs)  # type: ignore[arg-type]
    if terms is not None:
        a.obs["cell_type_ontology_term_id"] = a.obs["cell_type"].astype(str).map(terms).astype(object)
    path = tmp_path / f"{name}.h5ad"
    a.write_h5ad(path)
    return path


def _terms(atlas: Path, column: str = "cell_type") -> dict[str, set]:
    with duckdb.connect(str(atlas / "cells.duckdb"), read_only=True) as con:
        rows = con.execute(
            f'SELECT dataset_id, "{column}", "{column}_ontology_term_id" FROM cells GROUP BY ALL'
        ).fetchall()
    out: dict[str, set] = {}
    for ds, label, term in rows:
        out.setdefault(ds, set()).add((label, term))
    return out


def test_ingest_ontology_map_fills_empty_terms_and_never_overwrites(tmp_path: Path) -> None:
    own = _h5ad(tmp_path, "own", ("B cells", "mono"), terms={"B cells": B_CELL, "mono": CD14_MONO}, seed=1)
    bare = _h5ad(tmp_path, "bare", ("B cells", "mono", "blob"), seed=2)
    table = _csv(tmp_path, f"label,ontology_term_id\nmono,{CLASSICAL_MONO}\nB cells,{B_CELL}\n")
    res = CliRunner().invoke(cli, ["ingest", str(own), str(bare), "--atlas", str(tmp_path / "atlas"),
                                   "--ontology-map", str(table), "--no-progress", "--report",
                                   str(tmp_path / "report.json")])
    assert res.exit_code == 0, res.output
    terms = _terms(tmp_path / "atlas")
    assert terms["own"] == {("B cells", B_CELL), ("mono", CD14_MONO)}  # the data's own terms are kept
    assert terms["bare"] == {("B cells", B_CELL), ("mono", CLASSICAL_MONO), ("blob", None)}
    assert "own: 90 cells" in res.output
    assert "2 labels: 2 had terms in the data, 0 mapped by the map" in res.output
    assert "conflicts (the data's own term kept): 'mono'" in res.output
    assert "3 labels: 0 had terms in the data, 2 mapped by the map, 0 partly, 1 not mapped" in res.output
    assert "not mapped: 'blob'" in res.output
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    by_ds = {d["dataset_id"]: d["ontology"] for d in report["datasets"]}
    assert by_ds["own"]["conflicts"] == {"mono": by_ds["own"]["conflicts"]["mono"]} and by_ds["own"]["cells_filled"] == 0
    assert by_ds["bare"]["unmapped_labels"] == ["blob"] and by_ds["bare"]["from_map"] == 2


def test_ingest_ontology_map_of_another_label_column(tmp_path: Path) -> None:
    def author(a):  # noqa: ANN001, ANN202
        a.obs["author_label"] = a.obs["cell_type"].astype(str).str.upper()
        return a

    a = make_adata(60, 40, cell_types=("b", "t"))
    a = author(a)
    a.write_h5ad(tmp_path / "a.h5ad")
    report = ingest([tmp_path / "a.h5ad"], tmp_path / "atlas", progress=False,
                    ontology_map={"B": B_CELL}, ontology_label_key="author_label")
    assert report.datasets[0].ontology["from_map"] == 1 and report.datasets[0].ontology["unmapped"] == 1
    assert _terms(tmp_path / "atlas", "author_label")["a"] == {("B", B_CELL), ("T", None)}


def test_ingest_ontology_label_key_of_no_column_is_refused_naming_the_columns(tmp_path: Path) -> None:
    a = make_adata(60, 40, cell_types=("b", "t"))
    a.obs["author_label"] = a.obs["cell_type"].astype(str).str.upper()
    a.write_h5ad(tmp_path / "a.h5ad")
    table = _csv(tmp_path, f"label,ontology_term_id\nB,{B_CELL}\n")
    common = ["ingest", str(tmp_path / "a.h5ad"), "--atlas", str(tmp_path / "atlas"), "--no-progress"]
    res = CliRunner().invoke(cli, [*common, "--ontology-map", str(table), "--ontology-label-key", "nope"])
    assert res.exit_code == 1 and "Error: " in res.output, res.output
    assert "--ontology-label-key 'nope': no such obs column" in res.output
    assert "'author_label'" in res.output and "'cell_type'" in res.output
    assert "'B'" not in res.output and "Traceback" not in res.output  # columns named, values never
    assert not (tmp_path / "atlas").exists()
    res = CliRunner().invoke(cli, [*common, "--ontology-label-key", "author_label"])
    assert res.exit_code == 2 and "--ontology-label-key" in res.output and "--ontology-map" in res.output
    assert not (tmp_path / "atlas").exists()


def test_ingest_with_a_malformed_ontology_map_fails_cleanly_before_any_work(tmp_path: Path) -> None:
    src = _h5ad(tmp_path, "x", ("B cells",), seed=3)
    bad = _csv(tmp_path, "label,ontology_term_id\nB cells,CL:0000236\nT cells,not-an-id-" + "z" * 3000 + "\n")
    res = CliRunner().invoke(cli, ["ingest", str(src), "--atlas", str(tmp_path / "atlas"), "--ontology-map",
                                   str(bad), "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "row 3" in res.output
    assert "Traceback" not in res.output and "z" * 100 not in res.output
    assert not (tmp_path / "atlas").exists()
    res = CliRunner().invoke(cli, ["ingest", str(src), "--atlas", str(tmp_path / "atlas"), "--ontology-map",
                                   str(tmp_path / "missing.csv"), "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "cannot be read" in res.output
