"""Answers from class probabilities (fine class, Cell Ontology ancestor, unknown), the vote's class shares, and the
ontology-aware metrics."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas.query.evaluate import expected_calibration_error, ontology_metrics
from scatlas.query.fallback import Ontology, answer
from scatlas.query.vote import vote, vote_shares

T_CELL, LYMPHOCYTE, LEUKOCYTE = "CL:0000084", "CL:0000542", "CL:0000738"
CD4, CD8, B, NK, MONO = "CL:0000624", "CL:0000625", "CL:0000236", "CL:0000623", "CL:0000576"
CLASSES = ["CD4 T", "CD8 T", "B", "NK", "Mono"]
CLASS_TERM = {"CD4 T": CD4, "CD8 T": CD8, "B": B, "NK": NK, "Mono": MONO}
ANCESTORS = {
    CD4: (T_CELL, LYMPHOCYTE, LEUKOCYTE), CD8: (T_CELL, LYMPHOCYTE, LEUKOCYTE), B: (LYMPHOCYTE, LEUKOCYTE),
    NK: (LYMPHOCYTE, LEUKOCYTE), MONO: (LEUKOCYTE,), T_CELL: (LYMPHOCYTE, LEUKOCYTE), LYMPHOCYTE: (LEUKOCYTE,),
    LEUKOCYTE: (),
}
NAMES = {T_CELL: "T cell", LYMPHOCYTE: "lymphocyte", LEUKOCYTE: "leukocyte"}


@pytest.fixture
def onto() -> Ontology:
    return Ontology.from_terms(CLASSES, CLASS_TERM, ANCESTORS, NAMES)


def test_terms_most_specific_first_and_never_one_covering_every_class(onto: Ontology) -> None:
    assert onto.terms == (T_CELL, LYMPHOCYTE)  # leukocyte covers all five classes: it says nothing
    assert onto.names == ("T cell", "lymphocyte")
    assert onto.members[:, 0].tolist() == [True, True, False, False, False]


def test_a_term_covering_all_but_a_few_cells_is_no_answer() -> None:
    """Lymphocytes, when the atlas' only other class (monocytes) holds 3% of its cells: as uninformative as a term
    covering every class; with 30% monocytes it is an answer again."""
    few = Ontology.from_terms(CLASSES, CLASS_TERM, ANCESTORS, NAMES, class_cells=[400, 300, 150, 120, 30])
    assert few.terms == (T_CELL,)
    many = Ontology.from_terms(CLASSES, CLASS_TERM, ANCESTORS, NAMES, class_cells=[300, 200, 100, 100, 300])
    assert many.terms == (T_CELL, LYMPHOCYTE)


def test_sure_class_is_fine_coin_toss_goes_to_the_ancestor(onto: Ontology) -> None:
    p = np.array([
        [0.9, 0.05, 0.05, 0, 0],  # sure: fine
        [0.45, 0.40, 0.05, 0.05, 0.05],  # CD4 vs CD8: T cell (0.85)
        [0.2, 0.2, 0.2, 0.2, 0.2],  # only "lymphocyte" (0.8) holds
        [0.1, 0.1, 0.1, 0.1, 0.6],  # monocyte, sure
        [0.0, 0.0, 0.3, 0.3, 0.4],  # under the cut, and no grouping term reaches it with Mono
        [0.0, 0.0, 0.0, 0.0, 0.0],  # nothing allowed
    ])
    a = answer(p, onto, 0.5)
    assert a.level.tolist() == [0, 1, 1, 0, 1, 2]
    assert a.fine.tolist() == [0, 0, 0, 4, 4, -1]
    assert a.term.tolist() == [-1, 0, 1, -1, 1, -1]
    np.testing.assert_allclose(a.confidence, [0.9, 0.85, 0.8, 0.6, 0.6, 0.0], atol=1e-6)
    assert a.runner_up.tolist()[:2] == [1, 1]
    np.testing.assert_allclose(a.runner_up_proba[:2], [0.05, 0.40], atol=1e-6)


def test_an_even_split_is_no_fine_answer(onto: Ontology) -> None:
    """CD4 and CD8 tied at the cut (a vote split 15/15): T cell, not whichever class came first; a lead of any size
    at the cut is a fine answer."""
    p = np.array([[0.5, 0.5, 0, 0, 0], [0.51, 0.49, 0, 0, 0]])
    a = answer(p, onto, 0.5)
    assert a.level.tolist() == [1, 0] and a.term.tolist() == [0, -1]
    np.testing.assert_allclose(a.confidence, [1.0, 0.51], atol=1e-6)


def test_no_terms_means_flat_answers() -> None:
    flat = Ontology.flat(CLASSES)
    a = answer(np.array([[0.45, 0.40, 0.05, 0.05, 0.05]]), flat, 0.5)
    assert a.level.tolist() == [2] and a.fine.tolist() == [0]


def test_a_class_whose_term_is_an_ancestor_of_another_is_still_a_fine_answer() -> None:
    classes = ["T cell", "CD4 T", "B"]
    o = Ontology.from_terms(classes, {"T cell": T_CELL, "CD4 T": CD4, "B": B}, ANCESTORS, NAMES)
    a = answer(np.array([[0.7, 0.2, 0.1], [0.3, 0.35, 0.35]]), o, 0.5)
    assert a.level.tolist() == [0, 1]
    assert o.terms[a.term[1]] == T_CELL  # 0.3 + 0.35 under "T cell"


def test_preferred_class_wins_a_tie(onto: Ontology) -> None:
    p = np.array([[0.5, 0.5, 0, 0, 0]])
    assert answer(p, onto, 0.3).fine.tolist() == [0]
    a = answer(p, onto, 0.3, preferred=np.array([1]))
    assert a.fine.tolist() == [1] and a.runner_up.tolist() == [0]


def test_vote_shares_agree_with_the_vote() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 4, size=(200, 15))
    weights = rng.random((200, 15))
    cw = np.array([1.0, 0.5, 2.0, 1.0])
    shares = vote_shares(labels, weights, n_labels=4, class_weights=cw)
    v = vote(labels, weights, n_labels=4, class_weights=cw)
    voted = v.winner >= 0
    np.testing.assert_allclose(shares.sum(axis=1)[voted], 1.0)
    np.testing.assert_allclose(shares[np.flatnonzero(voted), v.winner[voted]], v.confidence[voted], rtol=1e-5)
    assert (shares[~voted] == 0).all()


def test_vote_shares_count_heads_when_every_weight_is_zero() -> None:
    shares = vote_shares(np.array([[0, 0, 1]]), np.zeros((1, 3)), n_labels=2)
    np.testing.assert_allclose(shares, [[2 / 3, 1 / 3]])


def test_expected_calibration_error() -> None:
    assert expected_calibration_error(np.array([0.95] * 10), np.ones(10, bool)) == pytest.approx(0.05)
    assert expected_calibration_error(np.array([0.95] * 10), np.zeros(10, bool)) == pytest.approx(0.95)
    assert expected_calibration_error(np.array([]), np.array([], bool)) is None


def test_ontology_metrics_count_ancestors_of_the_truth_as_right() -> None:
    def ancestors_of(t: str) -> frozenset[str]:
        return frozenset(ANCESTORS.get(t, ()))

    truth = [CD4, CD4, CD8, B, B, None]
    level = ["fine", "ancestor", "ancestor", "fine", "unknown", "fine"]
    answers = [CD4, T_CELL, B, CD8, "", CD4]
    m = ontology_metrics(truth, level, answers, np.array([0.9, 0.8, 0.6, 0.7, 0.2, 0.9]), ancestors_of)
    assert m["n_cells_with_truth_term"] == 5
    assert m["ontology_accuracy"] == pytest.approx(2 / 4)  # CD4 fine, T cell ancestor of CD4; B not above CD8
    assert m["fine_rate"] == pytest.approx(2 / 5) and m["unknown_rate"] == pytest.approx(1 / 5)
    assert m["ece"] is not None and m["fine_coarser_rate"] == 0
    # a fine answer with a class coarser than the truth (a T cell class for a CD4 cell) is right, and counted apart
    m = ontology_metrics([CD4, CD4], ["fine", "fine"], [T_CELL, CD4], np.array([0.9, 0.9]), ancestors_of)
    assert m["ontology_accuracy"] == 1 and m["fine_coarser_rate"] == pytest.approx(1 / 2)


def test_only_allowed_ancestors_or_class_terms_are_answers() -> None:
    o = Ontology.from_terms(CLASSES, CLASS_TERM, ANCESTORS, NAMES, allowed={LYMPHOCYTE})
    assert o.terms == (LYMPHOCYTE,)
    a = answer(np.array([[0.45, 0.40, 0.05, 0.05, 0.05]]), o, 0.5)
    assert o.terms[a.term[0]] == LYMPHOCYTE


def test_curated_subclasses_hold_the_usual_groupings() -> None:
    from scatlas.atlas.ontology_levels import curated_subclasses

    terms = curated_subclasses()
    assert {T_CELL, LYMPHOCYTE, "CL:0000576"} <= terms  # T cell, lymphocyte, monocyte
    assert "CL:0000219" not in terms  # motile cell


def test_a_fine_class_coarser_than_the_truth_is_right() -> None:
    """An atlas that does not split CD4 T cells answers "CD4 T" for a naive CD4 T cell: right at its resolution."""
    naive_cd4 = "CL:0000895"

    def ancestors_of(t: str) -> frozenset[str]:
        return frozenset({CD4, T_CELL, LYMPHOCYTE, LEUKOCYTE} if t == naive_cd4 else ANCESTORS.get(t, ()))

    m = ontology_metrics([naive_cd4, naive_cd4], ["fine", "ancestor"], [CD4, CD4], np.array([0.9, 0.9]), ancestors_of)
    assert m["ontology_accuracy"] == 1.0
    wrong = ontology_metrics([CD4], ["fine"], [naive_cd4], np.array([0.9]), lambda t: frozenset(ANCESTORS.get(t, ())))
    assert wrong["ontology_accuracy"] == 0.0  # finer than the truth is not implied by it


def test_a_placeholder_in_the_querys_term_column_is_no_term():
    """CELLxGENE writes ``unknown`` where a cell has no CL term: the truth's term then comes from the other sources
    (here the CL name), never the placeholder, which no answer could match."""
    from scatlas.index.label_classes import identity_classes
    from scatlas.query.annotate_report import truth_terms

    labels = np.array(["B cell", "B cell", "T cell"], dtype=object)
    classes = identity_classes("cell_type", ["B cell", "T cell"])
    terms, how = truth_terms(labels, classes, term_column=np.array(["unknown", "unknown", "CL:0000084"], dtype=object))
    assert list(terms) == ["CL:0000236", "CL:0000236", "CL:0000084"]
    assert how["B cell"] != "query" and how["T cell"] == "query"
