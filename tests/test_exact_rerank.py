"""Exact choice of the top k from the stored rounding residuals: float16 ties settled by the float32 vectors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import IndexFormatError
from scatlas.cli import cli
from scatlas.index import ArrayVectorSource, AtlasIndex, BuildConfig, build_from_source
from scatlas.index.changes import identity_changes
from scatlas.index.manifest import SHARD_RESIDUALS_FILE, SHARD_VECTORS_FILE, ShardRecord
from scatlas.index.rerank import RerankScratch
from scatlas.index.shard import read_done, verify_shard
from scatlas.index.shard_edit import strip_shard
from scatlas.index.vectors import RESIDUAL_SCALE, float16_to_float32_small, l2_normalize
from tests.conftest import run_cli
from tests.test_index_helpers import clustered, config

D = 32
K = 10


def test_small_float16_conversion_is_exact_for_every_finite_value():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    got = float16_to_float32_small(finite)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))  # -0.0 included
    np.testing.assert_array_equal(float16_to_float32_small(finite.reshape(-1, 4)), finite.astype(np.float32).reshape(-1, 4))


def _near_twins(n_twins: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Background cells plus ``n_twins`` cells that differ from one vector by less than float16 resolves: their
    float16 copies mostly coincide, so float16 scores tie where float32 ones do not. Returns (vectors, query)."""
    rng = np.random.default_rng(seed)
    background = clustered(1500, D, seed=seed)
    v = l2_normalize(rng.standard_normal((1, D)))[0]
    twins = v + rng.standard_normal((n_twins, D)).astype(np.float32) * 2e-5
    q = l2_normalize((v + rng.standard_normal(D).astype(np.float32) * 0.05)[None, :])
    return np.concatenate([background, twins]).astype(np.float32), q


def _float32_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = l2_normalize(x).astype(np.float64) @ q[0].astype(np.float64)
    return np.argsort(-s, kind="stable")[:k]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    x, q = _near_twins()
    tmp = tmp_path_factory.mktemp("twins")
    out = {}
    for exact in (True, False):
        path = tmp / f"idx-{exact}"
        build_from_source(ArrayVectorSource(x), path, config(factory="IVF8,Flat", shard_size=600, nprobe=8,
                                                             rerank=150, exact_rerank=exact))
        out[exact] = AtlasIndex.open(path)
    return x, q, out


def test_residuals_settle_float16_ties_as_float32_does(twins):
    x, q, idx = twins
    want = set(_float32_top(x, q, K).tolist())
    assert idx[True]._searcher.exact_rerank and not idx[False]._searcher.exact_rerank
    # every cell a candidate (all lists, 150 re-ranked: more float16 ties than the margin past the k-th)
    exact = idx[True].search(q, k=K, nprobe=8, rerank=150)
    assert set(exact.ids[0].tolist()) == want
    assert (np.diff(exact.scores[0]) <= 0).all()
    rounded = idx[False].search(q, k=K, nprobe=8, rerank=150)
    assert set(rounded.ids[0].tolist()) != want  # the float16 vectors alone cannot tell these cells apart
    # brute force settles them the same way (asking again past its margin), filtered or not
    assert set(idx[True].exact_search(q, K).ids[0].tolist()) == want
    ids = np.arange(len(x), dtype=np.int64)
    _, sub_scores = idx[True]._searcher.exact_search(q, K, subset=ids)
    sub_ids, _ = idx[True]._searcher.exact_search(q, K, subset=ids)
    assert set(sub_ids[0].tolist()) == want and (np.diff(sub_scores[0]) <= 0).all()


def test_queries_whose_ties_reach_past_the_margin_are_scanned_again(twins, monkeypatch):
    x, q, idx = twins
    others = l2_normalize(clustered(3, D, seed=7))  # background queries: few float16 ties, closed after one pass
    queries = np.concatenate([others[:1], q, others[1:2], q, others[2:]])
    wants = [set(_float32_top(x, row[None, :], K).tolist()) for row in queries]
    rescanned = []
    scan = RerankScratch.search

    def spy(self, qq, k, lists=None):
        if lists is not None:
            rescanned.append(np.asarray(lists).tolist())
        return scan(self, qq, k, lists)

    monkeypatch.setattr(RerankScratch, "search", spy)
    for margin in (0, 5):  # the first pass keeps too few columns for the twins' queries
        monkeypatch.setattr("scatlas.index.rerank.EXACT_MARGIN", margin)
        for budget in (1, 1 << 30):  # one query per block, all in one
            monkeypatch.setattr("scatlas.index.searcher.RERANK_BYTES", budget)
            got = idx[True]._searcher.search(queries, K, nprobe=8, rerank=150)
            assert [set(row.tolist()) for row in got[0]] == wants
            assert (np.diff(got[1], axis=1) <= 0).all()
    assert [1, 3] in rescanned  # the twins' rows of a block of five, not the block's first rows
    got = idx[True].search(q, k=K, nprobe=8, rerank=K)  # no more candidates than k: nothing to choose between
    assert set(got.ids[0].tolist()) == set(idx[False].search(q, k=K, nprobe=8, rerank=K).ids[0].tolist())


def test_a_zero_query_neither_loops_nor_fails(twins):
    x, _, idx = twins
    zero = np.zeros((2, D), dtype=np.float32)
    for index in idx.values():
        res = index.exact_search(zero, K)
        assert (res.ids >= 0).all() and (res.scores == 0).all()
        res = index.search(zero, k=K, nprobe=8, rerank=150)
        assert (res.ids >= 0).all() and (res.scores == 0).all()


def test_many_float16_ties_stop_at_the_cap(twins, monkeypatch):
    x, q, idx = twins
    monkeypatch.setattr("scatlas.index.searcher.EXACT_TIES_MAX", 4)  # fewer than the twins tie: float16 order stands
    res = idx[True].exact_search(q, K)
    assert len(set(res.ids[0].tolist())) == K and (np.diff(res.scores[0]) <= 0).all()


def test_shards_store_residuals_only_where_they_help(tmp_path, twins):
    x, _, idx = twins
    for exact, shards in ((True, idx[True].manifest.shards), (False, idx[False].manifest.shards)):
        assert all((SHARD_RESIDUALS_FILE in s.files) is exact for s in shards)
    shard_dir = idx[True].path / "shards" / idx[True].manifest.shards[0].dirname
    res = np.load(shard_dir / SHARD_RESIDUALS_FILE)
    stored = np.load(shard_dir / SHARD_VECTORS_FILE)
    assert np.isfinite(res).all() and (np.abs(res) <= 0.5).all()
    assert (np.abs(res[res != 0]) >= np.finfo(np.float16).tiny).mean() > 0.99  # scaled out of the subnormals
    rebuilt = stored.astype(np.float64) + res.astype(np.float64) / RESIDUAL_SCALE
    np.testing.assert_allclose(rebuilt, l2_normalize(x[: len(stored)]), rtol=0, atol=2**-21)
    flat = build_from_source(ArrayVectorSource(x[:300]), tmp_path / "flat", config(factory="Flat", exact_rerank=True))
    assert all(SHARD_RESIDUALS_FILE not in s.files for s in flat.shards)  # exact search re-ranks nothing


def test_damaged_residuals_read_unchecked_stop_the_search(tmp_path, monkeypatch):
    x, q = _near_twins(20, seed=2)
    m = build_from_source(ArrayVectorSource(x), tmp_path / "idx", config(factory="IVF8,Flat", nprobe=8, rerank=40))
    monkeypatch.setenv("SCATLAS_VERIFY_ON_READ_MAX_BYTES", "0")  # as for an index too large to hash on every open
    for bad in (np.nan, 100.0):
        res = np.load(tmp_path / "idx" / "shards" / m.shards[0].dirname / SHARD_RESIDUALS_FILE, mmap_mode="r+")
        res[:] = bad
        res.flush()
        del res
        with AtlasIndex.open(tmp_path / "idx") as idx, pytest.raises(IndexFormatError, match="residuals .* damaged"):
            idx.search(q, k=5)


def test_a_resume_with_the_other_flag_says_so_in_words():
    with_flag, without = BuildConfig(exact_rerank=False).identity(), BuildConfig().identity()
    assert identity_changes(without, with_flag) == ["the earlier build ran without --no-exact-rerank and this one with it"]
    assert identity_changes(with_flag, without) == ["the earlier build ran with --no-exact-rerank and this one without it"]


def test_a_damaged_residuals_file_fails_verification(tmp_path):
    x, _ = _near_twins(20, seed=1)
    m = build_from_source(ArrayVectorSource(x), tmp_path / "idx", config(factory="IVF8,Flat", nprobe=8, rerank=40))
    shard_dir = tmp_path / "idx" / "shards" / m.shards[0].dirname
    path = shard_dir / SHARD_RESIDUALS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="residuals.f16.npy fails its SHA-256 check"):
        verify_shard(shard_dir, m.shards[0], checksums=True, cached=False)


def test_removing_cells_keeps_the_residuals_in_step(tmp_path, twins):
    _, _, idx = twins
    rec = idx[True].manifest.shards[0]
    src = idx[True].path / "shards" / rec.dirname
    out = strip_shard(src, tmp_path / "0000", rec, [(100, 200), (300, 301)])  # [start, stop)
    assert out is not None and SHARD_RESIDUALS_FILE in out.files
    keep = np.setdiff1d(np.arange(rec.id_min, rec.id_max + 1), np.r_[100:200, 300])
    np.testing.assert_array_equal(np.load(tmp_path / "0000" / "ids.npy"), keep)
    for name in (SHARD_VECTORS_FILE, SHARD_RESIDUALS_FILE):
        np.testing.assert_array_equal(np.load(tmp_path / "0000" / name), np.load(src / name)[keep - rec.id_min])
    verify_shard(tmp_path / "0000", read_done(tmp_path / "0000"), checksums=True, cached=False)


def test_cli_build_without_residuals(tmp_path):
    run_cli("synth", "--out", str(tmp_path / "h5ad"), "--cells", "1200", "--genes", "120", "--datasets", "1",
            "--no-progress")
    run_cli("ingest", *map(str, sorted((tmp_path / "h5ad").glob("*.h5ad"))), "--atlas", str(tmp_path / "atlas"),
            "--no-progress")
    common = ["--atlas", str(tmp_path / "atlas"), "--factory", "IVF8,Flat", "--embedder-option", "n_components=10",
              "--no-label-heads", "--no-map", "--no-progress"]
    out = run_cli("build", *common, "--index", str(tmp_path / "exact"))
    assert ", exact top k)" in out
    out = run_cli("build", *common, "--index", str(tmp_path / "rounded"), "--no-exact-rerank")
    assert ", top k by the float16 vectors)" in out
    refused = CliRunner().invoke(cli, ["-q", "build", "--update", "--atlas", str(tmp_path / "atlas"), "--index",
                                       str(tmp_path / "exact"), "--no-exact-rerank"])
    assert refused.exit_code != 0 and "drop --no-exact-rerank" in refused.output  # fixed by the index's build
    sizes = {}
    for name, want in (("exact", "all"), ("rounded", "none")):
        info = json.loads(run_cli("info", str(tmp_path / name), "--json"))
        assert info["exact_rerank"] == want
        sizes[name] = info["size_bytes"]
    assert sizes["exact"] - sizes["rounded"] >= 1200 * 10 * 2  # 2 bytes a dimension a cell


def test_an_update_adds_shards_like_the_index_has(tmp_path):
    from scatlas.atlas import ingest
    from scatlas.index import build_index, update_index
    from scatlas.index.update import _stores_residuals
    from tests.conftest import make_adata

    files = []
    for name, seed, n in (("A", 1, 300), ("B", 2, 250)):
        files.append(tmp_path / f"{name}.h5ad")
        make_adata(n_cells=n, n_genes=80, seed=seed, prefix=f"{name}_").write_h5ad(files[-1])
    ingest(files[:1], tmp_path / "atlas", progress=False)
    build = dict(embedder="pca", shard_size=150, factory="IVF4,Flat", fit_sample=300, progress=False,
                 embedder_options={"n_components": 10, "n_hvg": 50}, label_keys=(), reference_map=False)
    build_index(tmp_path / "atlas", tmp_path / "rounded", exact_rerank=False, **build)
    build_index(tmp_path / "atlas", tmp_path / "exact", **build)
    ingest(files[1:], tmp_path / "atlas", progress=False)
    for name, want in (("rounded", False), ("exact", True)):
        update_index(tmp_path / "atlas", tmp_path / name, progress=False)
        with AtlasIndex.open(tmp_path / name) as idx:
            assert len(idx.manifest.shards) == 4
            assert all((SHARD_RESIDUALS_FILE in s.files) is want for s in idx.manifest.shards)
    # an index written before residuals existed records no such setting and has none: its new shards neither
    old = SimpleNamespace(shards=[ShardRecord(no=0, n=1, id_min=0, id_max=0, files={"index.faiss": None})])
    assert _stores_residuals(old, {}) is False  # type: ignore[arg-type]
    assert _stores_residuals(SimpleNamespace(shards=[]), {}) is True  # type: ignore[arg-type]
