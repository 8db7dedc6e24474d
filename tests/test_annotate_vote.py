"""Voting, abstention and evaluation math of label transfer, on plain arrays (no index needed)."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas.atlas.errors import InputError
from scatlas.query.vote import (
    balance_weights,
    cap_per_dataset,
    far_from_atlas,
    mean_top_similarity,
    vote,
    vote_weights,
)

NEG = -np.inf


def test_uniform_and_similarity_weights() -> None:
    s = np.array([[0.9, 0.5, -0.2, NEG]])
    np.testing.assert_array_equal(vote_weights(s, "uniform"), [[1, 1, 1, 0]])
    np.testing.assert_allclose(vote_weights(s, "similarity"), [[0.9, 0.5, 0.0, 0.0]])


def test_adaptive_weights_nearest_is_one_and_decreasing() -> None:
    s = np.array([[0.9, 0.8, 0.7, NEG], [0.5, 0.5, 0.5, 0.5]])
    w = vote_weights(s, "adaptive")
    assert w[0, 0] == pytest.approx(1.0)
    assert w[0, 0] > w[0, 1] > w[0, 2] > 0
    assert w[0, 3] == 0
    # gaps 0, .1, .2 -> mean gap .1: a neighbour one mean gap further weighs 1/e
    assert w[0, 1] == pytest.approx(np.exp(-1.0), rel=1e-6)
    np.testing.assert_allclose(w[1], 1.0)  # all equally near: equal weights, no division by zero


def test_unknown_weighting_is_refused() -> None:
    with pytest.raises(InputError, match="weighting"):
        vote_weights(np.zeros((1, 2)), "gaussian")  # type: ignore[arg-type]


def test_weighted_vote_and_confidence() -> None:
    v = vote(np.array([[0, 1, 1]]), np.array([[3.0, 1.0, 1.0]]), n_labels=2)
    assert v.winner.tolist() == [0]
    assert v.confidence[0] == pytest.approx(0.6)
    assert v.n_voters.tolist() == [3]
    # unweighted, the two label-1 neighbours win
    v = vote(np.array([[0, 1, 1]]), np.ones((1, 3)), n_labels=2)
    assert v.winner.tolist() == [1]
    assert v.confidence[0] == pytest.approx(2 / 3)


def test_null_labels_do_not_vote() -> None:
    v = vote(np.array([[-1, -1, 1], [-1, -1, -1]]), np.array([[5.0, 5.0, 1.0], [1.0, 1.0, 1.0]]), n_labels=2)
    assert v.winner.tolist() == [1, -1]
    assert v.confidence.tolist() == [1.0, 0.0]
    assert v.n_voters.tolist() == [1, 0]


def test_ties_go_to_the_nearest_neighbour_whatever_the_codes() -> None:
    w = np.ones((2, 4))
    v = vote(np.array([[1, 0, 0, 1], [0, 1, 1, 0]]), w, n_labels=2)
    assert v.winner.tolist() == [1, 0]
    assert v.confidence.tolist() == [0.5, 0.5]


def test_cap_per_dataset_mask() -> None:
    d = np.array([[0, 1, 0, 0, 2, 1, -1]])
    np.testing.assert_array_equal(cap_per_dataset(d, 1), [[1, 1, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(cap_per_dataset(d, 2), [[1, 1, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(cap_per_dataset(d, None), [[1, 1, 1, 1, 1, 1, 0]])
    with pytest.raises(InputError):
        cap_per_dataset(d, 0)


def test_cap_stops_one_dataset_outvoting_the_others() -> None:
    labels = np.array([[0, 0, 0, 1, 1]])
    datasets = np.array([[0, 0, 0, 1, 2]])
    w = np.ones((1, 5))
    assert vote(labels, w, n_labels=2).winner.tolist() == [0]
    v = vote(labels, w, n_labels=2, datasets=datasets, max_votes_per_dataset=1)
    assert v.winner.tolist() == [1]
    assert v.confidence[0] == pytest.approx(2 / 3)
    assert v.n_voters.tolist() == [3]
    with pytest.raises(InputError, match="dataset codes"):
        vote(labels, w, n_labels=2, max_votes_per_dataset=1)


def test_class_weights_and_balance() -> None:
    labels, w = np.array([[0, 0, 1]]), np.ones((1, 3))
    v = vote(labels, w, n_labels=2, class_weights=np.array([1.0, 3.0]))
    assert v.winner.tolist() == [1]
    assert v.confidence[0] == pytest.approx(0.6)
    np.testing.assert_allclose(balance_weights(np.array([100, 25, 1, 0]), 0.5), [1, 2, 10, 0])
    np.testing.assert_allclose(balance_weights(np.array([100, 25]), 0.0), [1, 1])
    with pytest.raises(InputError):
        vote(labels, w, n_labels=2, class_weights=np.array([1.0]))


def test_bad_vote_inputs() -> None:
    with pytest.raises(InputError):
        vote(np.zeros((2, 3), dtype=int), np.ones((2, 2)))
    with pytest.raises(InputError):
        vote(np.zeros((1, 2), dtype=int), -np.ones((1, 2)))
    with pytest.raises(InputError):
        vote(np.array([[3]]), np.ones((1, 1)), n_labels=2)


def test_empty_batch() -> None:
    v = vote(np.zeros((0, 5), dtype=int), np.zeros((0, 5)), n_labels=3)
    assert len(v.winner) == 0


def test_mean_top_similarity_ignores_missing() -> None:
    s = np.array([[0.9, 0.7, NEG], [NEG, NEG, NEG]])
    m = mean_top_similarity(s, 3)
    assert m[0] == pytest.approx(0.8)
    assert np.isnan(m[1])
    assert mean_top_similarity(s, 1)[0] == pytest.approx(0.9)


def test_far_from_atlas_needs_both_statistics_when_given_two_thresholds() -> None:
    mean_sim = np.array([0.1, 0.1, 0.8, np.nan])
    nearest = np.array([0.2, 0.9, 0.2, np.nan])
    assert far_from_atlas(mean_sim, 0.5).tolist() == [True, True, False, True]
    # a cell with one close atlas neighbour (a type with fewer than k atlas cells) is not far
    assert far_from_atlas(mean_sim, 0.5, nearest, 0.5).tolist() == [True, False, False, True]
    with pytest.raises(InputError):
        far_from_atlas(mean_sim, 0.5, None, 0.5)


def test_a_label_only_some_datasets_hold_gives_its_own_reason_and_a_warning(tmp_path, caplog):
    """Annotating by the vote a column that only one atlas dataset has: query cells whose neighbours all lack it are
    ``unknown`` with reason ``no_labelled_neighbours`` (not ``low_confidence``), and annotate warns with the
    ``--where`` that searches the labelled cells only; with that filter they get a label."""
    import logging

    from scatlas.atlas import ingest
    from scatlas.index import build_index
    from scatlas.query import annotate
    from tests.conftest import make_adata

    a = make_adata(300, 60, seed=1, prefix="a", cell_types=("T cell", "B cell", "monocyte"))
    a.obs["subtype"] = np.where(a.obs["cell_type"] == "T cell", "naive T", "other")
    b = make_adata(900, 60, seed=2, prefix="b", cell_types=("T cell", "B cell", "monocyte", "NK cell"))  # NK: b only
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    ingest([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "atlas", progress=False)
    build_index(tmp_path / "atlas", tmp_path / "index", embedder_options={"n_hvg": 50, "n_components": 8},
                label_keys=(), progress=False)
    query = make_adata(200, 60, seed=3, prefix="q", cell_types=("T cell", "B cell", "monocyte", "NK cell"))
    with caplog.at_level(logging.WARNING):
        res = annotate(query, tmp_path / "index", label_keys=["subtype"], progress=False, keep_neighbors=False)
    assert any("have a 'subtype' label" in r.getMessage() and 'subtype IS NOT NULL' in r.getMessage()
               for r in caplog.records)
    p = res.predictions
    none = p["subtype_unknown_reason"] == "no_labelled_neighbours"
    nk = (query.obs["cell_type"] == "NK cell").to_numpy()
    assert none.sum() >= 10 and none[nk].sum() >= 0.8 * none.sum()  # the cells of the type only b holds
    assert (p.loc[none, "subtype_confidence"] == 0).all()
    assert (p.loc[none, "subtype_pred"] == "unknown").all()
    assert not ((p["subtype_unknown_reason"] == "low_confidence") & (p["subtype_confidence"] == 0)).any()
    only = annotate(query, tmp_path / "index", label_keys=["subtype"], where="subtype IS NOT NULL", progress=False,
                    keep_neighbors=False).predictions
    assert (only["subtype_unknown_reason"] != "no_labelled_neighbours").all()
