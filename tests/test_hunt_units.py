"""Hunt building blocks on arrays: metrics, calibration, logistic fit, kernels, enrichment, DE tests (predicates:
test_hunt_predicates.py)."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
from scipy import stats

from scatlas.atlas.errors import InputError
from scatlas.query.hunt.calibration import fit_isotonic, fit_platt
from scatlas.query.hunt.classifier import exact_scores
from scatlas.query.hunt.de import rank_sum, welch_t
from scatlas.query.hunt.enrichment import bh_qvalues, enrichment, enrichment_table, fisher_table
from scatlas.query.hunt.kernels import BlockScorer, ThreadTuner
from scatlas.query.hunt.logistic import cross_validate, fit_logistic, stratified_folds
from scatlas.query.hunt.metrics import average_precision, choose_threshold, roc_auc

# -- metrics, threshold, calibration ---------------------------------------------------------------------------


def test_ranking_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.1
    s = np.round(rng.standard_normal(500) + 1.5 * y, 1)  # rounding makes ties
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_threshold_max_f1_and_target_precision_by_hand():
    y = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    s = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    # cut after rank 2: P=1, R=.5, F1=.667; after 4: P=.75, R=.75, F1=.75 (best); after 8: P=.5, R=1, F1=.667
    best = choose_threshold(y, s)
    assert (best.tp, best.fp, best.rule) == (3, 1, "max_f1")
    assert best.threshold == pytest.approx(5.5)  # midway between the last kept (6) and the next score (5)
    strict = choose_threshold(y, s, target_precision=1.0)
    assert (strict.tp, strict.fp, strict.threshold) == (2, 0, 7.5)
    assert strict.false_positive_rate == 0.0


def test_platt_and_isotonic_calibration():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(1)
    s = rng.normal(0, 2, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-(1.5 * s - 1.0)))
    platt = fit_platt(s, y)
    assert platt.a == pytest.approx(1.5, rel=0.15) and platt.b == pytest.approx(-1.0, abs=0.2)
    assert platt.min_score_for(0.5) == pytest.approx(-platt.b / platt.a)
    iso = fit_isotonic(s, y)
    grid = np.linspace(-5, 5, 101)
    p = iso.apply(grid)
    assert (np.diff(p) >= -1e-12).all()
    ref = IsotonicRegression(out_of_bounds="clip").fit(s, y.astype(float)).predict(grid)
    np.testing.assert_allclose(p, ref, atol=1e-9)
    cut = iso.min_score_for(0.5)
    assert iso.apply(np.array([cut + 1e-6]))[0] >= 0.5 - 1e-9 and iso.apply(np.array([cut - 0.05]))[0] < 0.5 + 1e-9


# -- logistic ------------------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_stratified_folds_spread_each_class():
    y = np.r_[np.ones(7, bool), np.zeros(100, bool)]
    folds = stratified_folds(y, 3, seed=0)
    pos_per_fold = np.bincount(folds[y], minlength=3)
    assert sorted(pos_per_fold.tolist()) == [2, 2, 3]
    assert np.bincount(folds[~y], minlength=3).min() >= 33


def test_balanced_logistic_separates_and_is_invariant_to_feature_scales():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3000, 16))
    X[:30, 3] += 3.5  # 1% positives differ in one direction
    y = np.zeros(3000, bool)
    y[:30] = True
    fit = fit_logistic(X, y, 1e-2)
    s = exact_scores(X, fit.weights, fit.bias)
    assert roc_auc(y, s) > 0.97
    # balanced weighting: the positives are not swamped, most of them score above zero
    assert (s[y] > 0).mean() > 0.8 and (s[~y] > 0).mean() < 0.1
    # features are standardised inside: rescaling a column (e.g. a dominant embedding axis) changes nothing
    scales = np.exp(rng.uniform(-2, 3, 16))
    fit2 = fit_logistic(X * scales, y, 1e-2)
    np.testing.assert_allclose(exact_scores(X * scales, fit2.weights, fit2.bias), s, rtol=1e-4, atol=1e-4)
    unstd = fit_logistic(X * scales, y, 1e-2, standardize=False)
    assert np.abs(exact_scores(X * scales, unstd.weights, unstd.bias) - s).max() > 1e-2
    cv = cross_validate(X, y, l2_grid=(1e-3, 1e-1, 10.0), n_folds=3, seed=0)
    assert set(cv.ap_by_l2) == {1e-3, 1e-1, 10.0} and cv.l2 in cv.ap_by_l2
    assert average_precision(y, cv.oof_scores) > 0.5 and len(cv.ap_by_fold) == 3


# -- sweep kernel --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 1280])
@pytest.mark.parametrize("kernel", ["fp16", "fp32"])
def test_block_scorer_finds_exactly_the_rows_above_the_cut(d, kernel):
    rng = np.random.default_rng(d)
    x16 = _unit(rng.standard_normal((6000, d))).astype(np.float16)
    w = (rng.standard_normal(d) * 3).astype(np.float32)
    exact = exact_scores(x16, w, 0.25)
    for q in (0.5, 0.99, 0.9995):
        cut = float(np.quantile(exact, q))
        scorer = BlockScorer(w, 0.25, cut, kernel=kernel)
        res = scorer.hits(x16)
        want = np.flatnonzero(exact >= np.float32(cut))
        np.testing.assert_array_equal(res.rows, want)
        np.testing.assert_array_equal(res.scores, exact[want])
        assert scorer.max_error < scorer.margin / 4 and scorer.kernel == kernel
        assert res.n_candidates >= len(want)


@pytest.mark.parametrize("kernel", ["fp16", "auto"])
def test_block_scorer_falls_back_to_fp32_when_fp16_is_not_accurate_enough(monkeypatch, kernel):
    import scatlas.query.hunt.kernels as kernels

    monkeypatch.setattr(kernels, "MARGIN_FACTOR", 1e-9)  # no margin: float16 rounding must be caught
    rng = np.random.default_rng(5)
    x16 = _unit(rng.standard_normal((3000, 256))).astype(np.float16)
    w = (rng.standard_normal(256) * 10).astype(np.float32)
    exact = exact_scores(x16, w, 0.0)
    cut = float(np.quantile(exact, 0.9))
    scorer = BlockScorer(w, 0.0, cut, kernel=kernel)
    res = scorer.hits(x16)
    assert scorer.kernel == "fp32"
    np.testing.assert_array_equal(res.rows, np.flatnonzero(exact >= np.float32(cut)))


# -- enrichment ----------------------------------------------------------------------------------------------------


def _fisher_two_sided_by_hand(a: int, b: int, c: int, d: int) -> float:
    """Sum of hypergeometric probabilities of all tables with the same margins no more likely than the observed."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x: int) -> float:
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    p_obs = prob(a)
    lo, hi = max(0, row1 + col1 - n), min(row1, col1)
    return sum(prob(x) for x in range(lo, hi + 1) if prob(x) <= p_obs * (1 + 1e-7))


def test_enrichment_matches_a_hand_computed_fisher_test():
    # atlas of 1000 cells, 30 hits; group "kidney" has 100 cells, 12 of them hits
    counts = pd.DataFrame({"group": ["kidney", "lung"], "n_cells": [100, 900], "n_hits": [12, 18]})
    table = enrichment_table(counts, "tissue", total_cells=1000, total_hits=30)
    row = table.set_index("group").loc["kidney"]
    assert fisher_table(12, 100, 30, 1000) == [[12, 88], [18, 882]]
    assert row["fraction"] == pytest.approx(0.12)
    assert row["fold"] == pytest.approx(0.12 / 0.03)
    assert row["odds_ratio"] == pytest.approx((12 * 882) / (88 * 18))
    assert row["pvalue"] == pytest.approx(_fisher_two_sided_by_hand(12, 88, 18, 882), rel=1e-9)
    assert row["pvalue"] < 1e-4
    greater = enrichment_table(counts, "tissue", 1000, 30, alternative="greater").set_index("group").loc["kidney"]
    by_hand = sum(stats.hypergeom.pmf(x, 1000, 30, 100) for x in range(12, 31))
    assert greater["pvalue"] == pytest.approx(by_hand, rel=1e-9)


def test_bh_qvalues_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.20, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.20 (m=4): 0.04, 0.06, 0.0533, 0.20 -> monotone from the top: 0.04, .0533, .0533, .2
    np.testing.assert_allclose(bh_qvalues(p)[:4], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20])
    assert np.isnan(bh_qvalues(p)[4])


def test_enrichment_counts_groups_from_the_cells_table():
    con = duckdb.connect()
    con.register("c", pa.table({"soma_joinid": np.arange(10, dtype=np.int64),
                                "tissue": ["a"] * 4 + ["b"] * 5 + [None]}))
    con.execute("CREATE TABLE cells AS SELECT * FROM c")
    frame, n_cells, n_hits = enrichment(con, np.array([0, 1, 2, 5, 9]), ["tissue"])
    got = frame.set_index("group")[["n_cells", "n_hits"]].to_dict("index")
    assert got == {"a": {"n_cells": 4, "n_hits": 3}, "b": {"n_cells": 5, "n_hits": 1},
                   "(missing)": {"n_cells": 1, "n_hits": 1}}
    assert (n_cells, n_hits) == (10, 5)
    with pytest.raises(InputError, match="not columns of the cells table"):
        enrichment(con, np.array([0]), ["organ"])


# -- DE statistics -------------------------------------------------------------------------------------------------


def test_sparse_rank_sum_and_welch_match_scipy():
    rng = np.random.default_rng(3)
    A = rng.poisson(0.4, (60, 25)).astype(float)
    B = rng.poisson(0.4, (45, 25)).astype(float)
    A[:, :5] += rng.poisson(1.5, (60, 5))  # planted differences
    A[:, 24] = 0
    B[:, 24] = 0  # a gene expressed nowhere
    A, B = np.log1p(A), np.log1p(B)
    z, p, auc = rank_sum(sp.csr_matrix(A), sp.csr_matrix(B))
    t, pt = welch_t(sp.csr_matrix(A), sp.csr_matrix(B))
    for j in range(24):
        ref = stats.mannwhitneyu(A[:, j], B[:, j], method="asymptotic", use_continuity=True)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-12)
        assert auc[j] == pytest.approx(ref.statistic / (60 * 45))
        reft = stats.ttest_ind(A[:, j], B[:, j], equal_var=False)
        assert pt[j] == pytest.approx(reft.pvalue, rel=1e-6)
        assert t[j] == pytest.approx(reft.statistic, rel=1e-6)
    assert p[24] == 1.0 and pt[24] == 1.0
    assert (p[:5] < 1e-3).all() and (z[:5] > 0).all()


def test_thread_tuner_picks_the_faster_thread_count_and_rechecks_it():
    import torch

    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner([2, 1], retune_bytes=6000, rounds=1)
        tuner.after_block(tuner.before_block(), 1000, 9.0)  # warm-up block: not timed
        a = tuner.before_block()
        tuner.after_block(a, 1000, 1.0)
        b = tuner.before_block()
        tuner.after_block(b, 1000, 0.1)
        assert (a, b, tuner.before_block(), torch.get_num_threads()) == (1, 2, 2, 2)
        for _ in range(3):
            tuner.after_block(tuner.before_block(), 1000, 0.1)
        # 6000 bytes since the last comparison: compare again (the machine got busy: one thread is faster now)
        a = tuner.before_block()
        tuner.after_block(a, 1000, 0.1)
        b = tuner.before_block()
        tuner.after_block(b, 1000, 0.6)
        assert (a, b, tuner.before_block()) == (1, 2, 1) and tuner.history == [2, 1]
    finally:
        torch.set_num_threads(before)


def test_the_false_positive_bound_is_clopper_pearson_one_sided():
    from statsmodels.stats.proportion import proportion_confint

    from scatlas.query.hunt.train import _false_positive_bound

    assert _false_positive_bound(0.0, 5641) == pytest.approx(1 - 0.05 ** (1 / 5641), rel=1e-9)  # no false hit seen
    for fp, n in [(3, 1000), (40, 4155), (1, 13)]:
        upper = proportion_confint(fp, n, alpha=0.10, method="beta")[1]  # two-sided 90% = one-sided 95%
        assert _false_positive_bound(fp / n, n) == pytest.approx(upper, rel=1e-9)
    assert _false_positive_bound(1.0, 10) == 1.0 and _false_positive_bound(0.0, 0) == 1.0


def test_expected_hits_per_million_counts_known_and_likely_positives() -> None:
    from scatlas.query.hunt.calibration import expected_hits_per_million

    assert expected_hits_per_million(0.001, 0.9) == pytest.approx(1000.0)  # false hits only
    # 1% of the atlas known positives found at recall 0.9, false hits among the other 99%
    assert expected_hits_per_million(0.001, 0.9, known=0.01) == pytest.approx(1e6 * (0.009 + 0.99 * 0.001))
    # half the rest looked like positives (set aside): found at the recall too
    assert expected_hits_per_million(0.0, 0.8, known=0.0, likely=0.5) == pytest.approx(400_000.0)
