"""Exact re-ranking and gathering of stored float16 vectors across shards, and the streamed shard checksums."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from scatlas.index import ArrayVectorSource, AtlasIndex, build_from_source
from scatlas.index.shard import _NpyWriter, file_record
from scatlas.index.vectors import l2_normalize, to_float16
from tests.test_index_helpers import clustered, config

IVF = "IVF16,PQ4"


@pytest.fixture(scope="module", params=[False, True], ids=["float16", "exact"])
def sharded(request, tmp_path_factory):
    """Three IVF shards over ids with holes (not starting at 0) and one shard of contiguous ids; without and with
    the rounding residuals (``exact_rerank``). ``stored``: what re-ranking's choice of the top k is exact for."""
    tmp = tmp_path_factory.mktemp("rerank")
    n, d = 3000, 32
    ids = np.concatenate([7 + np.arange(2000) * 3, 10_000 + np.arange(1000)]).astype(np.int64)
    x = clustered(n, d, seed=3)
    build_from_source(ArrayVectorSource(x, ids), tmp / "idx", config(factory=IVF, shard_size=800, nprobe=4, rerank=50,
                                                                     exact_rerank=request.param))
    idx = AtlasIndex.open(tmp / "idx")
    assert idx._searcher.exact_rerank is request.param
    stored = l2_normalize(x) if request.param else l2_normalize(x).astype(np.float16)
    return idx._searcher, ids, stored


def _reference(q: np.ndarray, cand: np.ndarray, k: int, ids: np.ndarray, stored: np.ndarray):
    """float64 dot products with ``stored``; best k per row, -1/-inf padded."""
    row = {int(i): r for r, i in enumerate(ids)}
    out_ids = np.full((len(q), k), -1, dtype=np.int64)
    out_sc = np.full((len(q), k), -np.inf)
    for i, (qi, ci) in enumerate(zip(q.astype(np.float64), cand, strict=True)):
        valid = ci[ci >= 0]
        s = stored[[row[int(c)] for c in valid]].astype(np.float64) @ qi if len(valid) else np.empty(0)
        order = np.argsort(-s, kind="stable")[:k]
        out_ids[i, : len(order)] = valid[order]
        out_sc[i, : len(order)] = s[order]
    return out_ids, out_sc


@pytest.mark.parametrize("k", [1, 10, 60])
def test_rerank_equals_float64_reference(sharded, monkeypatch, k):
    searcher, ids, stored = sharded
    assert len(searcher._shards) == 4
    rng = np.random.default_rng(k)
    n, c = 37, 40
    cand = np.stack([rng.choice(ids, size=c, replace=False) for _ in range(n)])  # spread over every shard
    cand[rng.random(cand.shape) < 0.2] = -1  # missing candidates anywhere in a row
    cand[3] = -1  # a row without any candidate
    cand[5, 2:] = -1  # a row with fewer candidates than k
    q = l2_normalize(rng.standard_normal((n, 32)))
    ref_ids, ref_sc = _reference(q, cand, k, ids, stored)
    for budget in (1, 4096, 1 << 30):  # one query per block, a few, all at once
        monkeypatch.setattr("scatlas.index.searcher.RERANK_BYTES", budget)
        got_ids, got_sc = searcher.rerank(q, cand, k)
        assert got_ids.shape == (n, k) and got_ids.dtype == np.int64 and got_sc.dtype == np.float32
        _check_against_reference(got_ids, got_sc, ref_ids, ref_sc, exact=searcher.exact_rerank)
        assert np.isneginf(got_sc[got_ids < 0]).all() and np.isfinite(got_sc[got_ids >= 0]).all()
    assert (got_ids[3] == -1).all() and (got_ids[5, 2:] == -1).all()


def _check_against_reference(got_ids, got_sc, ref_ids, ref_sc, *, exact: bool) -> None:
    """float16 re-ranking: the reference's ids and scores. Exact re-ranking: the reference's set of ids in each row,
    scores best first within float16's error of the float32 ones (those above the tie window keep their float16
    scores)."""
    if not exact:
        np.testing.assert_array_equal(got_ids, ref_ids)
        np.testing.assert_allclose(got_sc, ref_sc, rtol=0, atol=2e-6)
        return
    for row_ids, row_sc, want_ids, want_sc in zip(got_ids, got_sc, ref_ids, ref_sc, strict=True):
        assert sorted(row_ids.tolist()) == sorted(want_ids.tolist())
        want = dict(zip(want_ids.tolist(), want_sc.tolist(), strict=True))
        found = row_ids >= 0
        np.testing.assert_allclose(row_sc[found], [want[i] for i in row_ids[found]], rtol=0, atol=2**-11 * 1.01)
        assert (np.diff(row_sc[found]) <= 0).all()


def test_rerank_of_search_candidates_matches_reference(sharded):
    searcher, ids, stored = sharded
    q = l2_normalize(clustered(50, 32, seed=11))
    cand, _ = searcher.search(q, 120, nprobe=4, rerank=0)  # approximate candidates, -1 padded where too few
    ref_ids, ref_sc = _reference(q, cand, 30, ids, stored)
    got_ids, got_sc = searcher.search(q, 30, nprobe=4, rerank=120)
    _check_against_reference(got_ids, got_sc, ref_ids, ref_sc, exact=searcher.exact_rerank)


def test_gather_returns_stored_rows_in_the_given_order(sharded):
    searcher, ids, stored = sharded
    stored = stored.astype(np.float16)  # what the shards store, residuals or not
    rng = np.random.default_rng(0)
    pick = rng.choice(ids, size=500)  # unsorted, with repeats, over every shard
    row = np.searchsorted(ids, pick)
    np.testing.assert_array_equal(searcher.gather(pick, dtype=np.float16), stored[row])
    got = searcher.gather(pick)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, stored[row].astype(np.float32))
    np.testing.assert_array_equal(searcher.gather(np.sort(np.unique(pick))), stored[np.unique(row)].astype(np.float32))
    assert searcher.gather(np.empty(0, dtype=np.int64)).shape == (0, 32)


def test_to_float16_is_numpy_astype_bit_for_bit():
    rng = np.random.default_rng(0)
    edge = np.array(
        [0.0, -0.0, 1.0, -1.0, 6.1035156e-05, 6.097555e-05, 5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 1e-9,
         65504.0, 65520.0, 1e6, -1e6, np.inf, -np.inf, 1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5],
        dtype=np.float32,
    )  # fmt: skip
    bits = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([edge, bits[~np.isnan(bits)], rng.standard_normal(100_000).astype(np.float32) * 1e-5])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal(to_float16(x).view(np.uint16), want.view(np.uint16))
    two_d = rng.standard_normal((7, 5)).astype(np.float32)
    assert to_float16(two_d).shape == (7, 5)


def test_streamed_checksums_equal_the_files(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((100, 6)).astype(np.float16)
    w = _NpyWriter(tmp_path / "a.npy", np.float16, (100, 6))
    for a in range(0, 100, 30):
        w.write(a, values[a : a + 30])
    assert w.record() is None  # not before it is closed
    w.close()
    assert w.record() == file_record(tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), values)

    w = _NpyWriter(tmp_path / "b.npy", np.float16, (100, 6))  # out of order: no streamed checksum
    w.write(50, values[50:])
    w.write(0, values[:50])
    w.close()
    assert w.record() is None
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), values)

    w = _NpyWriter(tmp_path / "c.npy", np.int64, (10,))  # incomplete: no streamed checksum
    w.write(0, np.arange(5))
    w.close()
    assert w.record() is None


def test_built_shards_store_numpy_float16_and_record_their_checksums(tmp_path):
    x = clustered(2500, 32, seed=1)
    m = build_from_source(ArrayVectorSource(x), tmp_path / "idx", config(factory=IVF, shard_size=1000, chunk_size=300,
                                                                         nprobe=4, rerank=50))
    start = 0
    for shard in m.shards:
        sdir = tmp_path / "idx" / "shards" / shard.dirname
        for name, rec in shard.files.items():
            assert rec.sha256 == hashlib.sha256((sdir / name).read_bytes()).hexdigest()
            assert rec.bytes == (sdir / name).stat().st_size
        stored = np.load(sdir / "vectors.f16.npy")
        want = l2_normalize(x[start : start + shard.n]).astype(np.float16)
        np.testing.assert_array_equal(stored.view(np.uint16), want.view(np.uint16))
        start += shard.n
