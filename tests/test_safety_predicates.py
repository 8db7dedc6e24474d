"""User SQL predicates (``--where``, ``--positive-sql``) run checked and sandboxed; the index copies committed cells only.

Covers :mod:`index.predicate` (the one validator), :func:`index.metadata.where_ids` / :func:`connect` (errors that
never echo cell values, file access locked off), the ``--positive`` evaluator's limits, ``write_cells_db``'s id
ranges, and the CLI's clean ``Error:`` lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, build_from_source, build_index
from scatlas.index.metadata import CellsFile, connect, where_ids, write_cells_db
from scatlas.index.predicate import MAX_LENGTH, validate_predicate
from scatlas.index.store_source import committed_cells
from scatlas.query.hunt.predicate import evaluate_predicate
from tests.conftest import make_adata
from tests.test_index_helpers import array_source, config

SECRET = "SECRET-VALUE-7f3a"  # a cell value no error message may repeat
N = 600

PASSWD = Path("/etc/passwd")

ATTACKS = [
    "CAST((SELECT content FROM read_text('/etc/passwd')) AS INTEGER) = 1",
    "cell_type IN (SELECT file FROM glob('/etc/*'))",
    "EXISTS (SELECT * FROM read_csv('/etc/passwd'))",
    "cell_type = (SELECT column0 FROM read_csv_auto('/etc/passwd') LIMIT 1)",
    "EXISTS (SELECT * FROM read_parquet('/tmp/x.parquet'))",
    "EXISTS (SELECT * FROM read_csv('https://example.com/cells.csv'))",
    "1=1); COPY cells TO '/tmp/stolen.csv'; --",
    "1=1); ATTACH '/tmp/other.duckdb' AS other; --",
    "1=1); INSTALL httpfs; --",
    "1=1); LOAD httpfs; --",
    "read_blob('/etc/passwd') IS NOT NULL",
    "getenv('HOME') = 'x'",
    "current_setting('temp_directory') = 'x'",
    "cell_type = getvariable('x')",
    "count(*) OVER () > 1",
    "list_filter([1, 2], x -> x > 1) = [2]",
    "cell_type = ?",
    "cell_type[1] = 'x'",
    "main.lower(cell_type) = 'x'",
    "repeat('a', 1000000000) = cell_type",
    "1=1) ORDER BY (1",
]


def _cells(ids: np.ndarray) -> pa.Table:
    """Metadata with known values: cell_type cycles A/B/C (every 7th is the secret), tissue has NULLs."""
    n = len(ids)
    kinds = np.array(["A cell", "B cell", "C cell"])[np.arange(n) % 3].astype(object)
    kinds[::7] = SECRET
    tissue = np.array(["blood", "lung", None, "gut"], dtype=object)[np.arange(n) % 4]
    return pa.table({
        "soma_joinid": np.asarray(ids, dtype=np.int64),
        "cell_type": pa.array(kinds, pa.string()),
        "tissue": pa.array(tissue, pa.string()),
        "n_genes": np.arange(n, dtype=np.int64) * 10,
    })


@pytest.fixture(scope="module")
def vec_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A flat index of 600 vectors (ids 10..609) whose cells table is :func:`_cells`."""
    src = array_source(N, 16, seed=3, start_id=10)
    out = tmp_path_factory.mktemp("safety_pred") / "idx"
    table = _cells(src._ids)
    build_from_source(src, out, config(shard_size=400), cells=table)
    return {"path": out, "frame": table.to_pandas()}


@pytest.fixture(scope="module")
def store_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ingested 300-cell atlas and its index (with an embedder, for annotate through the CLI)."""
    root = tmp_path_factory.mktemp("safety_store")
    make_adata(300, 60, seed=1, prefix="a").write_h5ad(root / "a.h5ad")
    ingest([root / "a.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_hvg": 40, "n_components": 8},
                label_keys=(), progress=False)
    make_adata(20, 60, seed=5, prefix="q").write_h5ad(root / "q.h5ad")
    return {"root": root, "atlas": root / "atlas", "index": root / "index", "query": root / "q.h5ad"}


def _ids(frame: pd.DataFrame, mask: Any) -> np.ndarray:
    return np.sort(frame.loc[np.asarray(mask, dtype=bool), "soma_joinid"].to_numpy(dtype=np.int64))


# -- refused predicates ----------------------------------------------------------------------------------------


def test_reading_a_file_is_refused_and_its_content_never_shown(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx, pytest.raises(InputError) as err:
        idx.filter_ids(ATTACKS[0])
    message = str(err.value)
    assert "subquery is not allowed" in message and "cell_type = 'B cell'" in message  # what is allowed, an example
    if PASSWD.is_file():
        first = PASSWD.read_text().splitlines()[0]
        assert first not in message and "root:" not in message


@pytest.mark.parametrize("predicate", ATTACKS)
def test_attacks_are_refused_before_anything_runs(vec_index: dict[str, Any], predicate: str) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx:
        columns = {r[0]: r[1] for r in idx.connect().execute("DESCRIBE cells").fetchall()}
        with pytest.raises(InputError, match="not allowed|one SQL predicate|not a valid SQL predicate"):
            validate_predicate(predicate, columns)
        with pytest.raises(InputError):
            where_ids(idx.connect(), predicate)
    assert not Path("/tmp/stolen.csv").exists()


def test_union_escaping_the_parentheses_is_refused(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx, pytest.raises(InputError, match="UNION"):
        idx.filter_ids("1=1) UNION SELECT soma_joinid FROM cells --")


def test_several_statements_are_refused(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx:
        for predicate in ("1=1; DROP TABLE cells", "1=1); SELECT 1; --"):
            with pytest.raises(InputError, match="one SQL predicate"):
                idx.filter_ids(predicate)
        assert len(idx.filter_ids("soma_joinid >= 0")) == N  # nothing was dropped


def test_subqueries_are_refused(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx:
        for predicate in ("soma_joinid IN (SELECT soma_joinid FROM cells)", "EXISTS (SELECT 1)",
                          "soma_joinid = ANY (SELECT 1)", "n_genes > (SELECT avg(n_genes) FROM cells)"):
            with pytest.raises(InputError, match="subquery is not allowed"):
                idx.filter_ids(predicate)


@pytest.mark.parametrize("predicate", [
    "(" * 1000 + "cell_type = 'A cell'" + ")" * 1000,
    "NOT " * 1000 + "cell_type = 'A cell'",
    "lower(" * 150 + "cell_type" + ")" * 150 + " = 'a cell'",
])
def test_deep_nesting_is_refused_cleanly(vec_index: dict[str, Any], predicate: str) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx, pytest.raises(InputError, match="nested more than|nesting deeper"):
        idx.filter_ids(predicate)


def test_overlong_and_empty_predicates_are_refused(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx:
        with pytest.raises(InputError, match="characters long"):
            idx.filter_ids("cell_type = 'A cell' OR " * (MAX_LENGTH // 20) + "cell_type = 'B cell'")
        with pytest.raises(InputError, match="empty"):
            idx.filter_ids("   ")


def test_unknown_and_qualified_columns_name_the_columns(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx:
        with pytest.raises(InputError, match=r"unknown column 'celltype'.*cell_type \(VARCHAR\)"):
            idx.filter_ids("celltype = 'A cell'")
        with pytest.raises(InputError, match="bare column name"):
            idx.filter_ids("cells.cell_type = 'A cell'")


def test_errors_on_the_data_never_echo_cell_values(vec_index: dict[str, Any]) -> None:
    with AtlasIndex.open(vec_index["path"]) as idx:
        for predicate in ("CAST(cell_type AS INTEGER) = 1", "cell_type = 1", "n_genes = 'x' OR cell_type > 5"):
            with pytest.raises(InputError) as err:
                idx.filter_ids(predicate)
            message = str(err.value)
            assert SECRET not in message and "A cell" not in message, message
            assert "Exception" in message and "cell_type (VARCHAR)" in message  # the error class and the columns


# -- allowed predicates ----------------------------------------------------------------------------------------


def test_legit_predicates_select_the_right_cells(vec_index: dict[str, Any]) -> None:
    f = vec_index["frame"]
    cases = {
        "cell_type = 'B cell'": f.cell_type == "B cell",
        "cell_type IN ('A cell', 'C cell') AND tissue = 'lung'": f.cell_type.isin(["A cell", "C cell"]) & (f.tissue == "lung"),
        "cell_type LIKE 'B%' OR cell_type ILIKE 'c %'": f.cell_type.str.startswith("B") | f.cell_type.str.lower().str.startswith("c "),
        "tissue IS NULL": f.tissue.isna(),
        "tissue IS NOT NULL AND NOT (tissue = 'gut')": f.tissue.notna() & (f.tissue != "gut"),
        "n_genes BETWEEN 100 AND 500": f.n_genes.between(100, 500),
        "lower(cell_type) = 'a cell'": f.cell_type == "A cell",
        "Cell_Type = 'A cell' AND n_genes::DOUBLE / 2 >= 1000": (f.cell_type == "A cell") & (f.n_genes / 2 >= 1000),
        "cell_type NOT IN ('A cell') AND coalesce(tissue, 'none') = 'none'": (f.cell_type != "A cell") & f.tissue.isna(),
        "cell_type = 'a;b'": np.zeros(len(f), dtype=bool),
        "cell_type LIKE 'B!_%' ESCAPE '!' OR cell_type ILIKE 'a%cell' ESCAPE '#'": f.cell_type == "A cell",
        "cell_type NOT LIKE '%B%' ESCAPE '!'": ~f.cell_type.str.contains("B"),
    }
    with AtlasIndex.open(vec_index["path"]) as idx:
        for predicate, mask in cases.items():
            got = where_ids(idx.connect(), predicate, allow_empty=True)
            np.testing.assert_array_equal(got, _ids(f, mask), err_msg=predicate)
        with pytest.raises(InputError, match="matches no cell"):
            idx.filter_ids("cell_type = 'nobody'")


def test_search_with_where_uses_the_checked_predicate(vec_index: dict[str, Any]) -> None:
    f = vec_index["frame"]
    q = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with AtlasIndex.open(vec_index["path"]) as idx:
        res = idx.search(q, k=5, where="tissue = 'lung'")
        assert set(res.ids.ravel()) <= set(_ids(f, f.tissue == "lung"))
        with pytest.raises(InputError, match="subquery"):
            idx.search(q, k=5, where=ATTACKS[0])


# -- the index connection itself ----------------------------------------------------------------------------------


def test_index_connection_cannot_reach_files_and_opens_twice(vec_index: dict[str, Any]) -> None:
    path = vec_index["path"] / "cells.duckdb"
    first = connect(path)
    second = connect(path)  # the same file again in this process: the settings are shared, not re-applied
    try:
        for con in (first, second):
            with pytest.raises(duckdb.Error, match="disabled by configuration"):
                con.execute("SELECT * FROM read_text('/etc/passwd')").fetchall()
            with pytest.raises(duckdb.Error):
                con.execute("SET enable_external_access=true")
            assert con.execute("SELECT count(*) FROM cells").fetchall()[0][0] == N
        first.register("_some_ids", pa.table({"soma_joinid": np.array([10, 11], dtype=np.int64)}))
        joined = first.execute("SELECT count(*) FROM cells c JOIN _some_ids s USING (soma_joinid)").fetchall()[0][0]
        assert joined == 2  # registered Arrow tables still work
    finally:
        second.close()
        first.close()


# -- the --positive evaluator (pandas-like, over a query's obs) ------------------------------------------------


def test_positive_evaluator_refuses_deep_or_long_predicates_cleanly() -> None:
    frame = pd.DataFrame({"cell_type": ["a", "b"], "donor_id": ["d1", "d2"]})
    np.testing.assert_array_equal(evaluate_predicate(frame, "cell_type == 'a'"), [True, False])
    for predicate in ("not " * 1000 + "cell_type == 'a'", "(" * 1000 + "cell_type == 'a'" + ")" * 1000,
                      "-" * 5000 + "1 == cell_type", "~" * 3000 + "(cell_type == 'a')"):
        with pytest.raises(InputError, match="nested|not a valid expression"):
            evaluate_predicate(frame, predicate)
    with pytest.raises(InputError, match="characters long"):
        evaluate_predicate(frame, " or ".join(["cell_type == 'a'"] * 1000))


# -- write_cells_db: committed id ranges only ----------------------------------------------------------------------


def _source_db(path: Path, n: int = 100) -> Path:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE cells AS SELECT range::BIGINT AS soma_joinid, 'v' || range AS label FROM range(?)", [n])
    con.close()
    return path


def _ids_in(path: Path) -> list[int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT soma_joinid FROM cells ORDER BY soma_joinid").fetchall()]
    finally:
        con.close()


def test_write_cells_db_copies_only_the_given_ranges(tmp_path: Path) -> None:
    src = _source_db(tmp_path / "it's a store.duckdb")  # a quote in the path: passed as a parameter
    write_cells_db(tmp_path / "all.duckdb", src)
    assert _ids_in(tmp_path / "all.duckdb") == list(range(100))
    write_cells_db(tmp_path / "some.duckdb", src, ranges=[(50, 60), (0, 10)])
    assert _ids_in(tmp_path / "some.duckdb") == [*range(10), *range(50, 60)]
    write_cells_db(tmp_path / "overlap.duckdb", CellsFile(src, ((0, 10), (5, 15), (15, 20))))
    assert _ids_in(tmp_path / "overlap.duckdb") == list(range(20))  # overlapping ranges: each cell once
    table = pa.table({"soma_joinid": np.arange(30, dtype=np.int64), "x": np.arange(30)})
    write_cells_db(tmp_path / "arrow.duckdb", table, ranges=[(25, 40)])
    assert _ids_in(tmp_path / "arrow.duckdb") == list(range(25, 30))
    with pytest.raises(InputError, match="ends before it starts"):
        write_cells_db(tmp_path / "bad.duckdb", src, ranges=[(10, 5)])
    with pytest.raises(InputError, match="not both"):
        write_cells_db(tmp_path / "bad.duckdb", CellsFile(src, ((0, 1),)), ranges=[(0, 1)])


def test_rows_outside_committed_datasets_never_reach_the_index(tmp_path: Path) -> None:
    from scatlas.atlas.store import AtlasStore

    make_adata(80, 60, seed=2, prefix="c").write_h5ad(tmp_path / "c.h5ad")
    ingest([tmp_path / "c.h5ad"], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    (_, start, stop), = store.cell_ranges()
    db = store.cells_db_path
    store.close()
    con = duckdb.connect(str(db))  # rows an ingest in progress has written, not yet committed
    con.execute("INSERT INTO cells BY NAME SELECT ?::BIGINT AS soma_joinid", [stop + 5])
    con.close()
    store = AtlasStore.open(tmp_path / "atlas")
    cells = committed_cells(store)
    assert cells.ranges == ((start, stop),)
    write_cells_db(tmp_path / "index_cells.duckdb", cells)
    assert _ids_in(tmp_path / "index_cells.duckdb") == list(range(start, stop))
    store.close()


# -- through the command line ------------------------------------------------------------------------------------


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["-q", *args])  # -q: only warnings and the error line


def test_cli_annotate_where_attack_is_a_clean_error(store_index: dict[str, Path]) -> None:
    res = _invoke("annotate", str(store_index["query"]), "--index", str(store_index["index"]), "--out",
                  str(store_index["root"] / "o.h5ad"), "--label-key", "cell_type", "--no-progress",
                  "--where", ATTACKS[0])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and "Traceback" not in res.output
    assert "subquery is not allowed" in res.output and "root:" not in res.output
    deep = "(" * 1000 + "tissue = 'blood'" + ")" * 1000
    res = _invoke("annotate", str(store_index["query"]), "--index", str(store_index["index"]), "--out",
                  str(store_index["root"] / "o.h5ad"), "--label-key", "cell_type", "--no-progress", "--where", deep)
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "Traceback" not in res.output


def test_cli_annotate_where_still_works(store_index: dict[str, Path]) -> None:
    res = _invoke("annotate", str(store_index["query"]), "--index", str(store_index["index"]), "--out",
                  str(store_index["root"] / "ok.h5ad"), "--label-key", "cell_type", "--no-progress",
                  "--predictor", "knn", "--where", "cell_type IN ('T cell', 'B cell')")
    assert res.exit_code == 0, res.output
    import json

    report = json.loads((store_index["root"] / "ok.report.json").read_text())
    with AtlasIndex.open(store_index["index"]) as idx:
        expected = idx.connect().execute(
            "SELECT count(*) FROM cells WHERE cell_type IN ('T cell', 'B cell')").fetchall()[0][0]
    assert report["params"]["atlas_cells_matching_where"] == expected > 0


def test_cli_hunt_train_positive_sql_attacks_are_clean_errors(vec_index: dict[str, Any], tmp_path: Path) -> None:
    for predicate in (ATTACKS[0], "1=1) UNION SELECT soma_joinid FROM cells --", "CAST(cell_type AS INTEGER) = 1",
                      "NOT " * 1000 + "cell_type = 'A cell'"):
        res = _invoke("hunt", "train", "--index", str(vec_index["path"]), "--positive-sql", predicate,
                      "--out", str(tmp_path / "clf"), "--no-progress")
        assert res.exit_code == 1, res.output
        assert res.output.startswith("Error: ") and "Traceback" not in res.output, res.output
        assert "root:" not in res.output and SECRET not in res.output


def test_text_the_tree_drops_never_runs():
    """DuckDB drops an unused named WINDOW before building the tree: the statement that runs is written back from
    the checked tree, so its subquery and table function are not in it."""
    from scatlas.index.predicate import validate_predicate

    text = "1=1) WINDOW w AS (ORDER BY (SELECT content FROM read_text('/etc/passwd'))"
    checked = validate_predicate(text, {"cell_type": "VARCHAR"})
    assert "read_text" not in checked.sql and "WINDOW" not in checked.sql.upper()
