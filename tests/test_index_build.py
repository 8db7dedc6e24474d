"""Index build: exactness, recall with re-ranking, shard merging, manifest, resume, refusals, corruption."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from scatlas.atlas.errors import IndexFormatError, InputError, TaskError
from scatlas.index import (
    ArrayVectorSource,
    AtlasIndex,
    IndexManifest,
    ShardSpec,
    build_from_source,
    read_manifest,
)
from scatlas.index.evaluate import recall_at_k
from tests.test_index_helpers import (
    array_source,
    assert_exact,
    brute_force,
    clustered,
    config,
    digests,
    fresh_queries,
)

IVF = "IVF64,PQ4"  # d=32: 8 dims per sub-quantizer (FAISS k-means below 8 dims is ~8x slower)


def test_flat_search_equals_brute_force(tmp_path):
    src = array_source(5000, 32, start_id=100, gap=2)  # ids with holes, not starting at 0
    m = build_from_source(src, tmp_path / "idx", config(shard_size=1800))
    assert m.factory == "IDMap2,Flat" and m.exact and len(m.shards) == 3
    assert m.recall.recall == 1.0
    q = clustered(300, 32, seed=9)
    res = AtlasIndex.open(tmp_path / "idx").search(q, k=30)
    base_ids = 100 + np.arange(5000) * 3
    assert_exact(res.ids, res.scores, clustered(5000, 32), base_ids, q)
    assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32
    assert (np.diff(res.scores, axis=1) <= 0).all()


def test_ivfpq_with_rerank_reaches_recall_target_and_without_does_not(tmp_path):
    n, d = 20_000, 32
    src = array_source(n, d, seed=3)
    m = build_from_source(src, tmp_path / "idx", config(factory=IVF, shard_size=7000, eval_queries=500))
    assert not m.exact and m.search.rerank > 0 and m.search.nprobe
    assert m.recall.recall >= 0.95 and m.recall.n_queries == 500
    idx = AtlasIndex.open(tmp_path / "idx")
    q = fresh_queries(400, d, seed=3)  # new cells from the atlas' distribution, not atlas cells
    truth, _ = brute_force(clustered(n, d, seed=3), np.arange(n), q, 30)
    got = idx.search(q, k=30)
    assert recall_at_k(got.ids, truth) >= 0.95
    assert (np.diff(got.scores, axis=1) <= 1e-7).all()
    # the measurement can fail: PQ codes alone, one probe, are far worse
    crippled = idx.search(q, k=30, nprobe=1, rerank=0)
    assert recall_at_k(crippled.ids, truth) < 0.85


def test_shard_merge_equals_single_shard(tmp_path):
    src = array_source(12_000, 32, seed=5)
    q = clustered(200, 32, seed=6)
    for factory in ("auto", IVF):
        fixed = {"factory": factory, "nprobe": 8, "rerank": 100}  # no tuning: not the point here
        one = build_from_source(src, tmp_path / f"one-{factory}", config(shard_size=20_000, **fixed))
        many = build_from_source(src, tmp_path / f"many-{factory}", config(shard_size=2500, **fixed))
        assert len(one.shards) == 1 and len(many.shards) == 5
        a = AtlasIndex.open(tmp_path / f"one-{factory}").search(q, k=30, nprobe=8, rerank=100)
        b = AtlasIndex.open(tmp_path / f"many-{factory}").search(q, k=30, nprobe=8, rerank=100)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        assert (a.ids == b.ids).mean() > 0.99  # only tied scores may swap


def test_manifest_records_what_was_built_and_measured(tmp_path):
    src = array_source(3000, 16)
    m = build_from_source(src, tmp_path / "idx", config(shard_size=1000))
    raw = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    for key in ("format_version", "embedder", "gene_vocabulary_hash", "atlas_snapshot", "factory", "metric",
                "search", "dim", "n_cells", "shards", "versions", "build", "recall", "calibration"):
        assert key in raw
    assert raw["metric"] == "inner_product" and raw["dim"] == 16 and raw["n_cells"] == 3000
    assert {"faiss", "numpy", "duckdb"} <= set(raw["versions"])
    assert raw["build"]["seconds"] >= 0 and raw["recall"]["k"] == 30  # >= : a fast machine may round to 0.0
    assert [s["n"] for s in raw["shards"]] == [1000, 1000, 1000]
    assert all(len(f["sha256"]) == 64 for s in raw["shards"] for f in s["files"].values())
    cal = m.calibration
    assert cal.quantiles == [0.001, 0.002, 0.005, 0.01, 0.05, 0.10, 0.25, 0.50] and cal.n_cells == 500
    assert np.all(np.diff(cal.first_neighbor) >= 0) and np.all(np.diff(cal.mean_topk) >= 0)
    assert all(f >= t for f, t in zip(cal.first_neighbor, cal.mean_topk, strict=True))
    assert 0 < cal.first_neighbor[0] <= 1.0
    assert read_manifest(tmp_path / "idx") == m == IndexManifest.from_dict(raw)


class FailingSource(ArrayVectorSource):
    """Raises after the first chunk of shard ``fail_at`` (an interrupted build)."""

    def __init__(self, base: ArrayVectorSource, fail_at: int) -> None:
        super().__init__(base._x, base._ids)
        self.fail_at = fail_at

    def iter_vectors(self, spec: ShardSpec, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, item in enumerate(super().iter_vectors(spec, chunk_size)):
            if spec.shard_no == self.fail_at and i == 1:
                raise RuntimeError("simulated crash")
            yield item


def test_info_of_an_index_built_from_precomputed_vectors(tmp_path):
    """An index without an embedder (built from vectors) is described, through the CLI too; its embedder reads no
    genes."""
    from tests.conftest import run_cli

    build_from_source(array_source(1500, 16), tmp_path / "idx", config(shard_size=1000))
    with AtlasIndex.open(tmp_path / "idx") as idx:
        assert not idx.has_embedder
        with pytest.raises(InputError, match="precomputed vectors without an embedder"):
            idx.embedder  # noqa: B018
    info = json.loads(run_cli("info", str(tmp_path / "idx"), "--json"))
    assert info["cells"] == 1500 and info["embedder_genes"] is None


def test_interrupted_build_resumes_to_identical_files(tmp_path):
    src = array_source(8000, 32, seed=2)
    cfg = config(factory=IVF, shard_size=2000, chunk_size=500, nprobe=8, rerank=100)
    with pytest.raises(TaskError, match="shard-0002 failed: RuntimeError: simulated crash.*resume"):
        build_from_source(FailingSource(src, fail_at=2), tmp_path / "resumed", cfg)
    with pytest.raises(IndexFormatError, match="interrupted.*rerun"):
        AtlasIndex.open(tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed" / "shards").iterdir() if not p.name.startswith(".")) == [
        "0000", "0001"]
    leftover = tmp_path / "resumed" / ".cells.duckdb.12345.tmp"  # as if killed while writing it
    leftover.write_text("partial")
    m = build_from_source(src, tmp_path / "resumed", cfg)
    assert m.build["shards_reused"] == 2 and m.build["cells_added"] == 4000
    assert not leftover.exists()
    build_from_source(src, tmp_path / "straight", cfg)
    got, want = digests(tmp_path / "resumed"), digests(tmp_path / "straight")
    assert "trained.faiss" in want and "shards/0003/vectors.f16.npy" in want
    assert got == want  # includes trained.faiss: training is deterministic


def test_rerun_with_other_arguments_is_refused_and_overwrite_rebuilds(tmp_path):
    src = array_source(2000, 16)
    first = build_from_source(src, tmp_path / "idx", config(shard_size=1000))
    again = build_from_source(src, tmp_path / "idx", config(shard_size=1000))  # complete: nothing to do
    assert again == first
    with pytest.raises(InputError, match=r"other arguments: the shard size was 1000 and is 700 now.*--overwrite"):
        build_from_source(src, tmp_path / "idx", config(shard_size=700))
    other = array_source(2000, 16, seed=1)
    with pytest.raises(InputError, match="source"):
        build_from_source(other, tmp_path / "idx", config(shard_size=1000))
    m = build_from_source(src, tmp_path / "idx", config(shard_size=700), overwrite=True)
    assert len(m.shards) == 3


def test_refuses_foreign_directories(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        build_from_source(array_source(500, 8), tmp_path / "foreign", config())
    with pytest.raises(InputError, match="not a scatlas index"):
        build_from_source(array_source(500, 8), tmp_path / "foreign", config(), overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").exists()


def test_missing_manifest_or_unknown_format_is_refused(tmp_path):
    with pytest.raises(IndexFormatError, match="does not exist"):
        AtlasIndex.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="not a scatlas index"):
        AtlasIndex.open(tmp_path / "empty")
    build_from_source(array_source(1000, 8), tmp_path / "idx", config())
    manifest = tmp_path / "idx" / "manifest.json"
    raw = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99"):
        AtlasIndex.open(tmp_path / "idx")
    manifest.unlink()
    with pytest.raises(IndexFormatError, match="interrupted"):
        AtlasIndex.open(tmp_path / "idx")


def test_corrupted_or_missing_shard_files_are_detected(tmp_path):
    build_from_source(array_source(3000, 16), tmp_path / "idx", config(shard_size=1000))
    vec = tmp_path / "idx" / "shards" / "0001" / "vectors.f16.npy"
    data = bytearray(vec.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    vec.write_bytes(bytes(data))
    AtlasIndex.open(tmp_path / "idx")  # the cheap check (sizes) passes
    with pytest.raises(IndexFormatError, match="SHA-256"):
        AtlasIndex.open(tmp_path / "idx", verify=True)
    vec.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(IndexFormatError, match="bytes where the manifest records"):
        AtlasIndex.open(tmp_path / "idx")
    shutil.rmtree(tmp_path / "idx" / "shards" / "0002")
    with pytest.raises(IndexFormatError, match="missing"):
        AtlasIndex.open(tmp_path / "idx")
