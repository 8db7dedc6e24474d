"""Species guessed from gene identifiers, and the species check of a query against an index's embedder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata
import pytest

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError, SpeciesMismatchError
from scatlas.atlas.species import MIN_MOUSE_ONLY, guess_species, symbol_casing
from scatlas.index import AtlasIndex, build_index
from scatlas.query.prepare import open_query
from tests.conftest import make_adata

HUMAN = ["CD3E", "CD19", "MS4A1", "LYZ", "C1orf159", "HLA-DRA", "RP11-206L10.2", "NKG7", "GNLY", "IL7R"] * 10
MOUSE = ["Cd3e", "Cd19", "Ms4a1", "Lyz2", "1110017D15Rik", "Gm12345", "mt-Co1", "Nkg7", "Gzma", "Il7r"] * 10


def test_symbol_casing() -> None:
    assert [symbol_casing(s) for s in ("CD3E", "Cd3e", "cd3e", "C1orf159", "1110017D15Rik", "F3", "mt-Co1")] == [
        "upper", "title", "lower", "upper", "title", None, "title"]


@pytest.mark.parametrize(
    ("ids", "species", "candidates", "basis"),
    [
        (HUMAN, "human", ("human",), "upper-case"),
        (MOUSE, "mouse", ("mouse", "rat"), "mouse or rat"),
        ([f"ENSG{i:011d}.3" for i in range(200)], "human", ("human",), "100% of 200 Ensembl ids are ENSG"),
        ([f"ENSMUSG{i:011d}" for i in range(190)] + [f"ENSG{i:011d}" for i in range(10)], "mouse", ("mouse",),
         "95% of 200 Ensembl ids are ENSMUSG"),
        ([f"ENSRNOG{i:011d}" for i in range(60)], "rat", ("rat",), "ENSRNOG"),
        ([f"ENSDARG{i:011d}" for i in range(60)], "zebrafish", ("zebrafish",), "ENSDARG"),
        (["cd3e", "sox2", "pax6a"] * 30, "zebrafish", ("zebrafish",), "lower-case"),
    ],
)
def test_guess_species(ids: list[str], species: str, candidates: tuple[str, ...], basis: str) -> None:
    g = guess_species(ids)
    assert g.species == species and g.candidates == candidates
    assert basis in g.basis


def test_upper_cased_mouse_symbols_are_mouse() -> None:
    """Mouse symbols upper-cased (CD3E, 1110017D15RIK, GM12345) are told apart from human ones by the genes only
    mouse has; a human list with fewer such names than MIN_MOUSE_ONLY stays human."""
    upper_mouse = [s.upper() for s in MOUSE]
    g = guess_species(upper_mouse)
    assert g.species == "mouse" and g.candidates == ("mouse",)
    assert "mouse symbols upper-cased" in g.basis and g.counts["mouse_only"] == 20
    assert not g.compatible(guess_species(HUMAN))
    assert guess_species(HUMAN + ["1110017D15RIK", "GM12345", "GM2A", "GRIK4"]).species == "human"
    assert guess_species(HUMAN + [f"GM{1000 + i}" for i in range(MIN_MOUSE_ONLY)]).species == "mouse"


def test_mhc_genes_tell_recased_lists_apart() -> None:
    """Mouse names its MHC genes H2-, human HLA-: an upper-cased mouse list without RIKEN or Gm genes is still mouse,
    a title-cased human list is human (it looked like mouse)."""
    plain = [g for g in HUMAN if not g.startswith("HLA-")]
    h2 = ["H2-AA", "H2-AB1", "H2-EB1", "H2-D1", "H2-K1"]
    assert guess_species(plain + h2).species == "mouse"
    assert guess_species(plain + h2[:4]).species == "human"
    hla = ["HLA-A", "HLA-B", "HLA-C", "HLA-DRA", "HLA-DRB1"]
    title = guess_species([s.capitalize() for s in plain + hla])
    assert title.species == "human" and "human symbols title-cased" in title.basis
    assert guess_species([s.capitalize() for s in plain + hla[:4]]).species == "mouse"
    assert guess_species(plain + hla).species == "human" and guess_species(MOUSE).species == "mouse"


def test_undecided_on_too_few_or_mixed_genes() -> None:
    few = guess_species(["CD3E", "CD19", "Cd4"])
    assert few.species is None and "at least 50" in few.basis
    mixed = guess_species(HUMAN[:60] + MOUSE[:60])
    assert mixed.species is None and "no clear majority" in mixed.basis
    assert guess_species([]).species is None
    # Ensembl ids decide over symbols when there are enough of them
    assert guess_species([f"ENSMUSG{i:011d}" for i in range(60)] + HUMAN).species == "mouse"


def test_compatible() -> None:
    mouse_or_rat = guess_species(MOUSE)
    assert mouse_or_rat.compatible(guess_species([f"ENSRNOG{i:011d}" for i in range(60)]))
    assert not mouse_or_rat.compatible(guess_species(HUMAN))
    assert guess_species(["CD3E"]).compatible(mouse_or_rat)  # undecided: no objection


@pytest.fixture(scope="module")
def human_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 300-cell atlas whose genes are human Ensembl ids (ENSG) with upper-case symbols."""
    root = tmp_path_factory.mktemp("species")
    make_adata(300, 80, seed=1, prefix="a").write_h5ad(root / "atlas_a.h5ad")
    ingest([root / "atlas_a.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 60, "n_components": 8}, label_keys=(),
                progress=False)
    return {"index": root / "index", "root": root}


def _mouse_query(root: Path) -> Path:
    """The atlas genes as title-case symbols only (``Gene0``): matched case-insensitively, all of them."""
    adata = make_adata(50, 80, seed=2, ensembl=False)
    adata.var_names = [f"Gene{i}" for i in range(adata.n_vars)]
    path = root / "mouse.h5ad"
    adata.write_h5ad(path)
    return path


def test_open_query_refuses_a_mouse_query_against_a_human_index(human_index: dict[str, Any]) -> None:
    path = _mouse_query(human_index["root"])
    with AtlasIndex.open(human_index["index"]) as idx:
        with pytest.raises(SpeciesMismatchError) as err:
            open_query(path, idx)
        first = str(err.value).splitlines()[0]
        assert first.startswith("species mismatch: the query's genes look mouse")
        assert "reads human genes" in first and "--allow-species-mismatch" in first
        assert isinstance(err.value, InputError)


def test_open_query_allows_the_mismatch_when_asked(human_index: dict[str, Any], caplog: pytest.LogCaptureFixture
                                                   ) -> None:
    path = _mouse_query(human_index["root"])
    with AtlasIndex.open(human_index["index"]) as idx:
        cells = open_query(path, idx, allow_species_mismatch=True)
        try:
            assert cells.species["query"]["species"] == "mouse"
            assert cells.species["index"]["species"] == "human"
            assert cells.species["compatible"] is False
            assert cells.match is not None and cells.match.fraction_of_target == 1.0  # what the check is for
        finally:
            cells.close()
    assert any("species mismatch" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_open_query_records_matching_species(human_index: dict[str, Any]) -> None:
    query = make_adata(40, 80, seed=3, ensembl=False)  # upper-case symbols GENE0...
    with AtlasIndex.open(human_index["index"]) as idx:
        cells = open_query(anndata.AnnData(query.X, obs=query.obs, var=query.var), idx)
        try:
            assert cells.species["compatible"] is True
            assert cells.species["query"]["species"] == cells.species["index"]["species"] == "human"
        finally:
            cells.close()


@pytest.mark.slow
def test_real_files_and_a_mouse_query_against_a_human_pbmc_index(shared_raw: Path, tmp_path: Path) -> None:
    """The var names of ../shared/data/raw: symbols and Ensembl ids of human and mouse files."""
    from scatlas.atlas.sources import open_h5ad
    from scatlas.atlas.species import guess_species_of_genes

    expected = {"kang2018_ifnb_ctrl_stim_2800.h5ad": "human", "tian2019_3celllines_celseq2_dropseq.h5ad": "human",
                "pancreas_3studies_beta_ductal_cepo.h5ad": "human", "mesc_2batches_scmerge.h5ad": "mouse",
                "mouse_cortex_interneurons_2studies_metaneighbor.h5ad": "mouse"}
    for name, species in expected.items():
        src = open_h5ad(shared_raw / name)
        try:
            assert guess_species_of_genes(src.genes).species == species, name
        finally:
            src.close()
    ingest([shared_raw / "kang2018_ifnb_ctrl_stim_2800.h5ad"], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", label_keys=(), progress=False)
    with AtlasIndex.open(tmp_path / "index") as idx, pytest.raises(SpeciesMismatchError, match="look mouse"):
        open_query(shared_raw / "mouse_cortex_interneurons_2studies_metaneighbor.h5ad", idx)
    # the same mouse cells with their symbols upper-cased, as some pipelines write them to match human genes
    upper = anndata.read_h5ad(shared_raw / "mouse_cortex_interneurons_2studies_metaneighbor.h5ad")
    upper.var_names = [str(v).upper() for v in upper.var_names]
    upper.var_names_make_unique()
    with AtlasIndex.open(tmp_path / "index") as idx, pytest.raises(SpeciesMismatchError, match="upper-cased"):
        open_query(upper, idx)


@pytest.mark.parametrize("command", ["search", "hunt"])
def test_search_and_hunt_train_refuse_the_mismatch_and_take_the_override(
    human_index: dict[str, Any], tmp_path: Path, command: str
) -> None:
    """The refusal names an option the command has (``--allow-species-mismatch``), and that option works."""
    from click.testing import CliRunner

    from scatlas.cli import cli

    path = _mouse_query(human_index["root"])
    index = str(human_index["index"])
    if command == "search":
        args = ["search", str(path), "--index", index, "--no-progress"]
        outs = [["--out", str(tmp_path / "refused.parquet")], ["--out", str(tmp_path / "hits.parquet")]]
    else:
        args = ["hunt", "train", "--index", index, "--cells", str(path), "--positive", "cell_type = 'B cell'",
                "--stages", "1", "--background", "100", "--no-progress"]
        outs = [["--out", str(tmp_path / "refused.clf")], ["--out", str(tmp_path / "clf")]]
    refused = CliRunner().invoke(cli, [*args, *outs[0]])
    assert refused.exit_code == 1 and "Error: species mismatch" in refused.output, refused.output
    assert "--allow-species-mismatch" in refused.output and "annotate" not in refused.output
    allowed = CliRunner().invoke(cli, [*args, *outs[1], "--allow-species-mismatch"])
    assert "species mismatch" not in allowed.output or allowed.exit_code == 0, allowed.output
    assert allowed.exit_code == 0, allowed.output


def _mouse_file(root: Path, name: str, n_genes: int = 80) -> Path:
    """A dataset whose genes are mouse Ensembl ids (ENSMUSG) with title-case symbols."""
    adata = make_adata(60, n_genes, seed=4, prefix=name)
    adata.var_names = [f"ENSMUSG{2000000 + i:011d}" for i in range(n_genes)]
    adata.var["feature_id"] = list(adata.var_names)
    adata.var["feature_name"] = [f"Gene{i}" for i in range(n_genes)]
    path = root / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


def test_ingest_refuses_another_species_than_the_store_and_takes_the_override(tmp_path: Path) -> None:
    """A mouse dataset into a human store, and a human and a mouse file in one ingest, are refused through the CLI
    (``Error:`` naming both species); nothing is written; --allow-species-mismatch ingests with a warning."""
    from click.testing import CliRunner

    from scatlas.atlas.store import AtlasStore
    from scatlas.cli import cli

    make_adata(60, 80, seed=1, prefix="h").write_h5ad(tmp_path / "human.h5ad")
    mouse = _mouse_file(tmp_path, "mouse")
    store = tmp_path / "atlas"
    ingest([tmp_path / "human.h5ad"], store, progress=False)
    res = CliRunner().invoke(cli, ["ingest", str(mouse), "--atlas", str(store), "--no-progress"])
    error = next(line for line in res.output.splitlines() if line.startswith("Error:"))
    assert res.exit_code != 0 and error.startswith("Error: species mismatch: the genes of the atlas store look human")
    assert "those of dataset 'mouse' mouse (100% of 80 Ensembl ids are ENSMUSG)" in error
    assert "--allow-species-mismatch" in error and "Traceback" not in res.output
    assert [d.dataset_id for d in AtlasStore.open(store).datasets] == ["human"]
    both = CliRunner().invoke(cli, ["ingest", str(tmp_path / "human.h5ad"), str(mouse), "--atlas",
                                    str(tmp_path / "fresh"), "--no-progress"])
    assert both.exit_code != 0 and "species mismatch" in both.output and not (tmp_path / "fresh").exists()
    ok = CliRunner().invoke(cli, ["ingest", str(mouse), "--atlas", str(store), "--no-progress",
                                  "--allow-species-mismatch"])
    assert ok.exit_code == 0, ok.output
    assert [d.dataset_id for d in AtlasStore.open(store).datasets] == ["human", "mouse"]


def test_ingest_of_one_species_is_not_checked_against_itself(tmp_path: Path) -> None:
    """Two mouse files into a new store, then a third into it: one species, no objection."""
    a, b, c = (_mouse_file(tmp_path, n) for n in ("m1", "m2", "m3"))
    ingest([a, b], tmp_path / "atlas", progress=False)
    report = ingest([c], tmp_path / "atlas", progress=False)
    assert report.n_cells_in_store == 180
