"""The batched search path: re-ranking in FAISS over views of a gather buffer, parallel shard scans, the page budget.

Results are compared with exact search tie-aware (``faiss.contrib.evaluation.check_ref_knn_with_draws``): equal
scores may come in any order, but the set of ids at each score must match.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws

from scatlas.index import ArrayVectorSource, AtlasIndex, build_from_source
from scatlas.index.rerank import RerankScratch, ScratchPool, rerank
from scatlas.index.stages import StageTimer
from scatlas.index.vectors import l2_normalize
from tests.test_index_helpers import clustered, config

IVF = "IVF16,PQ4"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Three IVF shards over ids with holes, where every stored vector appears 3 times (ties everywhere)."""
    tmp = tmp_path_factory.mktemp("tied")
    base = clustered(700, 32, seed=5)
    x = np.concatenate([base, base, base])[np.random.default_rng(0).permutation(2100)]
    ids = (5 + np.arange(2100) * 2).astype(np.int64)
    build_from_source(ArrayVectorSource(x, ids), tmp / "idx", config(factory=IVF, shard_size=800, nprobe=4, rerank=50))
    return AtlasIndex.open(tmp / "idx")


def _exhaustive(idx: AtlasIndex, q: np.ndarray, k: int):
    """Every cell a candidate (all lists probed, all re-ranked): must equal exact search over the stored vectors."""
    s = idx._searcher
    return s.search(q, k, nprobe=s.nlist, rerank=idx.n_cells)


@pytest.mark.parametrize("k", [1, 7, 30])
def test_exhaustive_rerank_equals_exact_search_with_ties(tied, k):
    q = l2_normalize(clustered(40, 32, seed=9))
    ids, scores = _exhaustive(tied, q, k)
    ref_ids, ref_scores = tied.exact_search(q, k)
    check_ref_knn_with_draws(ref_scores, ref_ids, scores, ids, rtol=1e-5)
    assert k == 1 or len(np.unique(scores[0])) < k  # the ties are really there (equal scores in the top k)


def test_rerank_blocks_and_threads_do_not_change_results(tied, monkeypatch):
    q = l2_normalize(clustered(300, 32, seed=4))
    want = tied.search(q, k=20, rerank=60)
    faiss.omp_set_num_threads(1)
    try:
        for budget in (1, 32 * 60 * 2 * 3, 1 << 30):  # one query per block, three, all at once
            monkeypatch.setattr("scatlas.index.searcher.RERANK_BYTES", budget)
            got = tied.search(q, k=20, rerank=60)
            check_ref_knn_with_draws(want.scores, want.ids, got.scores, got.ids, rtol=1e-6)
    finally:
        faiss.omp_set_num_threads(2)


def test_concurrent_searches_match_serial_ones(tied):
    rng = np.random.default_rng(1)
    batches = [l2_normalize(rng.standard_normal((int(m), 32))) for m in rng.integers(1, 200, 12)]
    serial = [tied.search(b, k=10, rerank=40) for b in batches]
    views = [tied.thread_view() for _ in batches]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda vb: vb[0].search(vb[1], k=10, rerank=40), zip(views, batches, strict=True)))
    for a, b in zip(serial, got, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_missing_candidates_score_nan_and_never_come_back():
    rng = np.random.default_rng(3)
    store = l2_normalize(rng.standard_normal((50, 8))).astype(np.float16)

    def gather(ids: np.ndarray, out: np.ndarray) -> None:
        assert (ids >= 0).all()  # -1 is never looked up
        out[:] = store[ids]

    q = l2_normalize(rng.standard_normal((6, 8)))
    cand = np.stack([rng.choice(50, 10, replace=False) for _ in range(6)])  # as FAISS gives them: no repeats
    cand[0] = -1  # nothing to rank
    cand[1, ::2] = -1  # holes in the middle
    cand[2, 3:] = -1  # fewer than k
    ids, scores = rerank(q, cand, 5, gather=gather, pool=ScratchPool(), block_bytes=1 << 20)
    assert (ids[0] == -1).all() and np.isneginf(scores[0]).all()
    assert (ids[2, 3:] == -1).all() and np.isneginf(scores[2, 3:]).all()
    for i in range(6):
        valid = cand[i][cand[i] >= 0]
        s = store[valid].astype(np.float64) @ q[i].astype(np.float64)
        want = np.sort(s)[::-1][:5]
        got = scores[i][ids[i] >= 0]
        np.testing.assert_allclose(got, want, atol=2e-6)
        assert set(ids[i][ids[i] >= 0]) <= set(valid.tolist())
        assert np.isfinite(got).all()


def test_scratch_lists_view_its_buffer_and_return_row_positions():
    rng = np.random.default_rng(0)
    sc = RerankScratch(dim=16, c=5, lists=3)
    sc.buffer[:] = l2_normalize(rng.standard_normal((15, 16))).astype(np.float16)
    q = l2_normalize(rng.standard_normal((3, 16)))
    scores, pos = sc.search(q, 2)
    for i in range(3):
        s = sc.buffer[i * 5 : (i + 1) * 5].astype(np.float64) @ q[i].astype(np.float64)
        order = np.argsort(-s)[:2]
        np.testing.assert_array_equal(pos[i], i * 5 + order)
        np.testing.assert_allclose(scores[i], s[order], atol=2e-6)
    sc.buffer[:5] = 0  # a change to the buffer is what FAISS scans next
    assert np.allclose(sc.search(q[:1], 1)[0], 0)


def test_pool_reuses_scratches_by_shape():
    pool = ScratchPool()
    a = pool.take(8, 4, 2)
    pool.give(a)
    assert pool.take(8, 4, 2) is a
    assert pool.take(8, 4, 2) is not a  # taken: a new one for a second user


def test_pages_are_released_only_past_the_budget(tied, monkeypatch):
    s = tied._searcher
    calls = []
    monkeypatch.setattr(s, "release_pages", lambda: calls.append(1))
    q = l2_normalize(clustered(100, 32, seed=2))
    s.search(q, 10, nprobe=4, rerank=50)
    assert calls == []  # the vectors (a few hundred KB) are below MAPPED_BYTES_MAX: nothing to release
    monkeypatch.setattr("scatlas.index.searcher.MAPPED_BYTES_MAX", 1)
    s.search(q, 10, nprobe=4, rerank=50)
    assert calls


def test_stage_timer_sees_every_stage(tied):
    t = StageTimer()
    tied._searcher.search(l2_normalize(clustered(50, 32, seed=1)), 10, nprobe=4, rerank=40, timer=t)
    assert {"pre-transform + coarse quantizer", "FAISS scan", "candidate gather", "re-rank scan",
            "id mapping"} <= set(t.wall)
    assert all(v >= 0 for v in t.cpu.values())


def test_one_scan_over_stacked_shards_equals_per_shard_scans_merged(tied):
    """The stacked scan against what it replaced: each shard's own scan, the top-k merged with a ResultHeap."""
    s = tied._searcher
    assert len(s._shards) == 3
    q = l2_normalize(clustered(200, 32, seed=6))
    from scatlas.index.factory import apply_chain

    xt = apply_chain(s.trained, q)
    dq, iq = s._coarse.search(xt, 4)
    heap = faiss.ResultHeap(len(q), 25, keep_max=True)
    for shard in s._shards:
        heap.add_result(*shard.index.search(xt, 25, params=faiss.SearchParametersIVF(nprobe=4)))
    heap.finalize()
    for n in (200, 3, 1):  # a batch (queries split over threads) and a few queries (probed lists split)
        got = s.search(q[:n], 25, nprobe=4, rerank=0)
        check_ref_knn_with_draws(heap.D[:n], heap.I[:n], got[1], got[0], rtol=1e-6)


def test_sliced_batches_equal_one_thread_searches(tied, monkeypatch):
    q = l2_normalize(clustered(500, 32, seed=8))
    monkeypatch.setattr("scatlas.index.slices.SLICES_PER_THREAD", 3)  # uneven slices over 2 threads
    faiss.omp_set_num_threads(2)
    sliced = tied.search(q, k=12, rerank=40)
    faiss.omp_set_num_threads(1)
    try:
        whole = tied.search(q, k=12, rerank=40)
    finally:
        faiss.omp_set_num_threads(2)
    np.testing.assert_array_equal(sliced.ids, whole.ids)
    np.testing.assert_array_equal(sliced.scores, whole.scores)
    assert tied._searcher._slicer._pool is not None  # the batch did go through the slice threads
