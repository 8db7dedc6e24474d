"""``--positive``: SQL over the labelled cells' obs (the language of --positive-sql and --where), legacy ``==`` too."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scatlas.atlas.errors import InputError
from scatlas.query.hunt.predicate import evaluate_predicate
from scatlas.query.hunt.sql_predicate import PredicateFailed, sql_table


@pytest.fixture
def obs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(["Norn cell", "T cell", "Norn cell", None, "B cell"]),
            "donor_id": ["d1", "d1", "d2", "d3", "d2"],
            "n_genes": [900, 1200, 300, 2000, 50],
            "cell type": ["a", "b", "a", "b", "a"],
            "mixed": ["x", 1, None, "y", 2.5],
        },
        index=[f"c{i}" for i in range(5)],
    )


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ("cell_type = 'Norn cell'", [1, 0, 1, 0, 0]),
        ("cell_type <> 'Norn cell'", [0, 1, 0, 0, 1]),  # NULL never matches
        ("donor_id IN ('d2', 'd3')", [0, 0, 1, 1, 1]),
        ("donor_id NOT IN ('d2')", [1, 1, 0, 1, 0]),
        ("cell_type = 'Norn cell' AND donor_id = 'd2'", [0, 0, 1, 0, 0]),
        ("cell_type = 'T cell' OR n_genes < 100", [0, 1, 0, 0, 1]),
        ("NOT n_genes >= 900", [0, 0, 1, 0, 1]),
        ("cell_type IS NULL", [0, 0, 0, 1, 0]),
        ("n_genes BETWEEN 100 AND 1200", [1, 1, 1, 0, 0]),
        ("\"cell type\" = 'a' AND lower(cell_type) LIKE 'norn%'", [1, 0, 1, 0, 0]),
        ("mixed = 'y'", [0, 0, 0, 1, 0]),  # mixed object columns are read as text
        # the older pandas-like form keeps working
        ("cell_type == 'Norn cell'", [1, 0, 1, 0, 0]),
        ("donor_id in ['d2', 'd3']", [0, 0, 1, 1, 1]),
        ("cell_type == \"Norn cell\" and donor_id == 'd2'", [0, 0, 1, 0, 0]),
        ("~(donor_id == 'd1') & (n_genes > 100)", [0, 0, 1, 1, 0]),
        ("`cell type` == 'a' or cell_type == 'T cell'", [1, 1, 1, 0, 1]),
        ("cell_type != 'Norn cell'", [0, 1, 0, 0, 1]),  # missing values never match
        ("donor_id not in ('d2',)", [1, 1, 0, 1, 0]),
        ("cell_type == 'Norn cell' and donor_id == 'd2'", [0, 0, 1, 0, 0]),
        ("(cell_type == 'T cell') | (n_genes < 100)", [0, 1, 0, 0, 1]),
        ("not n_genes >= 900", [0, 0, 1, 0, 1]),
        ("100 < n_genes <= 1200", [1, 1, 1, 0, 0]),
    ],
)
def test_sql_and_legacy_predicates_select_the_same_cells(obs, predicate, expected):
    np.testing.assert_array_equal(evaluate_predicate(obs, predicate), np.array(expected, dtype=bool))


@pytest.mark.parametrize(
    ("predicate", "message"),
    [
        ("1=1; DROP TABLE cells", "not several statements"),
        ("cell_type = 'x'; SELECT 1", "not several statements"),
        ("read_csv('/etc/passwd') IS NOT NULL", "read_csv"),
        ("EXISTS (SELECT * FROM read_text('/etc/passwd'))", "not allowed"),
        ("n_genes IN (SELECT 1)", "subquery"),
        ("1=1) UNION SELECT soma_joinid FROM cells --", "expected an SQL predicate"),
        ("getenv('HOME') = 'x'", "not allowed"),
        ("__import__('os').system('true')", "not allowed"),
        ("celltype = 'x'", "unknown column 'celltype'"),
        ("cell_type.str.contains('x')", "not allowed"),
        ("celltype == 'x'", "unknown column 'celltype'"),
        ("cell_type = = 'x'", "expected an SQL predicate such as"),
        ("cell_type", "failed on the cells"),  # a bare text column is no condition
        ("donor_id in 'd1' and nope == 1", "list of values"),  # neither SQL (no column nope) nor pandas-like
        ("", "empty"),
    ],
)
def test_injection_attempts_and_wrong_predicates_are_refused(obs, predicate, message):
    with pytest.raises(InputError, match=message):
        evaluate_predicate(obs, predicate)


def test_a_bad_predicate_says_which_syntax_is_expected_without_echoing_long_input(obs):
    with pytest.raises(InputError, match=r"expected an SQL predicate such as \"cell_type = 'pDC'\"") as err:
        evaluate_predicate(obs, "cell_type = = " + "'x' " * 2000)
    assert len(str(err.value)) < 2000 and "'x' " * 100 not in str(err.value)
    with pytest.raises(InputError, match="single quotes"):
        evaluate_predicate(obs, 'cell_type = "pDC" AND n_genes > 1')  # "pDC" names a column in SQL
    with pytest.raises(InputError, match="characters long"):
        evaluate_predicate(obs, " OR ".join(["cell_type = 'a'"] * 1000))
    with pytest.raises(InputError, match="empty"):
        evaluate_predicate(obs, "  ")


def test_a_predicate_failing_on_the_data_names_the_error_class_not_the_data(obs):
    with pytest.raises(PredicateFailed, match="ConversionException") as err:
        evaluate_predicate(obs, "n_genes = 'secret-value-xyz' OR cell_type = 'a'")
    assert str(err.value).count("secret-value-xyz") == 1  # quoted once in the predicate, never from the data


def test_the_predicate_table_keeps_row_order_and_leaves_out_a_clashing_id_column():
    frame = pd.DataFrame({"soma_joinid": [7, 8], "Cell_Type": ["a", "b"], "cell_type": ["c", "d"]}, index=[5, 3])
    table = sql_table(frame)
    assert list(table.columns) == ["soma_joinid", "Cell_Type"]
    assert table["soma_joinid"].tolist() == [0, 1]
    with pytest.raises(InputError, match="differing only in case"):  # which of the two? refused, not guessed
        evaluate_predicate(frame, "cell_type = 'b'")


def test_evaluate_classes_leaves_cells_without_a_value_out_of_both_classes():
    """SQL's NULL: a cell whose label is missing is neither a positive nor a negative."""
    import numpy as np
    import pandas as pd

    from scatlas.query.hunt.predicate import evaluate_classes

    obs = pd.DataFrame({"cell_type": pd.Categorical(["pDC", None, "B", "pDC", None]), "n": [1, 2, 3, 4, 5]})
    pos, neg = evaluate_classes(obs, "cell_type = 'pDC'")
    np.testing.assert_array_equal(pos, [True, False, False, True, False])
    np.testing.assert_array_equal(neg, [False, False, True, False, False])
    pos, neg = evaluate_classes(obs, "cell_type = 'pDC' OR n > 4")  # true OR NULL is true
    np.testing.assert_array_equal(pos, [True, False, False, True, True])
    np.testing.assert_array_equal(neg, [False, False, True, False, False])
    pos, neg = evaluate_classes(obs, "cell_type in ['pDC']")  # the older pandas-like form: no NULL
    np.testing.assert_array_equal(neg, ~pos)


def test_evaluate_classes_takes_a_predicate_of_the_longest_length_accepted():
    """The negation is built after the check: a predicate at the length limit is not refused (and so not read in
    the pandas-like form) for the few characters NOT (...) adds."""
    import numpy as np
    import pandas as pd

    from scatlas.index.predicate import MAX_LENGTH
    from scatlas.query.hunt.predicate import evaluate_classes

    obs = pd.DataFrame({"cell_type": pd.Categorical(["pDC", None, "B"])})
    clause = "cell_type = 'pDC'"
    text = clause + " " * (MAX_LENGTH - 2 * len(clause) - 4) + " OR " + clause
    assert len(text) == MAX_LENGTH
    pos, neg = evaluate_classes(obs, text)
    np.testing.assert_array_equal(pos, [True, False, False])
    np.testing.assert_array_equal(neg, [False, False, True])


@pytest.mark.parametrize(
    ("predicate", "positives", "negatives"),
    [
        # one expression once parsed, though its text closes and reopens parentheses: negated as a whole
        # (a T cell of unknown tissue may be from the lung: neither)
        ("cell_type = 'DC') OR (tissue = 'lung'", [0, 2, 5], [4]),
        # false whatever the missing value holds (a T cell of unknown tissue, a blood cell of unknown type): a
        # negative; a lung cell of unknown type: neither
        ("cell_type = 'DC' AND tissue = 'lung'", [0], [1, 2, 3, 4]),
        ("cell_type = 'DC'", [0, 2], [1, 4]),
        # explicit NULL handling is the predicate's own: an unlabelled cell's coalesced value decides
        ("coalesce(author_type, cell_type) IN ('DC', 'pDC')", [0, 2, 4], [1, 3, 5]),
    ],
)
def test_negated_predicates_select_the_cells_it_is_false_for(predicate, positives, negatives):
    from scatlas.query.hunt.sql_predicate import evaluate_sql_predicate

    frame = pd.DataFrame({
        "cell_type": ["DC", "T cell", "DC", None, "B cell", None],
        "tissue": ["lung", None, "blood", "blood", "blood", "lung"],
        "author_type": [None, None, None, "Mono", "pDC", "T cell"],
    })
    assert np.flatnonzero(evaluate_sql_predicate(frame, predicate)).tolist() == positives
    assert np.flatnonzero(evaluate_sql_predicate(frame, predicate, negate=True)).tolist() == negatives


def test_a_predicate_on_a_column_with_a_case_twin_is_refused():
    """SQL names are case-insensitive: ``Cell_Type`` would silently read ``cell_type``."""
    from scatlas.query.hunt.sql_predicate import evaluate_sql_predicate

    frame = pd.DataFrame({"cell_type": ["a", "b"], "Cell_Type": ["dup", "dup"], "donor": ["d1", "d2"]})
    with pytest.raises(InputError, match=r"under 2 names differing only in case \('cell_type', 'Cell_Type'\)"):
        evaluate_sql_predicate(frame, "Cell_Type = 'dup'")
    assert evaluate_sql_predicate(frame, "donor = 'd1'").tolist() == [True, False]  # other columns: fine


def test_unknown_column_messages_escape_the_cells_column_names():
    frame = pd.DataFrame({"cell_type": ["a"], "FAKE\nError: forged \x1b[31m": ["x"], "Z" * 5000: ["z"]})
    with pytest.raises(InputError) as info:
        evaluate_predicate(frame, "nosuch == 'x'")
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "Z" * 100 not in message
