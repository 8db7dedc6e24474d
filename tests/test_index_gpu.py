"""GPU paths: ``device="cuda"`` trains and assigns on the GPU and writes CPU indexes; without a GPU it is refused."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from scatlas.atlas.errors import DependencyError
from scatlas.index import AtlasIndex, build_from_source
from scatlas.index.device import faiss_gpu_count, resolve_device
from scatlas.index.evaluate import recall_at_k
from tests.test_index_helpers import array_source, brute_force, clustered, config

HAS_GPU = faiss_gpu_count() > 0


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on machines without a GPU")
def test_cuda_without_gpu_is_a_dependency_error_not_a_fallback(tmp_path):
    with pytest.raises(DependencyError, match="faiss-gpu"):
        resolve_device("cuda")
    with pytest.raises(DependencyError):
        build_from_source(array_source(500, 8), tmp_path / "idx", config(device="cuda"))
    assert resolve_device("auto") == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and faiss-gpu")
def test_gpu_build_writes_cpu_indexes_with_the_same_recall(tmp_path):
    n, d = 20_000, 32
    src = array_source(n, d, seed=3)
    gpu = build_from_source(src, tmp_path / "gpu", config(factory="IVF64,PQ4", device="cuda"))
    assert gpu.build["device"] == "cuda"
    idx = AtlasIndex.open(tmp_path / "gpu")
    shard = faiss.read_index(str(tmp_path / "gpu" / "shards" / "0000" / "index.faiss"))
    assert "Gpu" not in type(faiss.downcast_index(shard)).__name__
    q = clustered(300, d, seed=11)
    truth, _ = brute_force(clustered(n, d, seed=3), np.arange(n), q, 30)
    assert gpu.recall.recall >= 0.95
    assert recall_at_k(idx.search(q, k=30).ids, truth) >= 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and faiss-gpu")
def test_shards_built_on_every_gpu_equal_a_one_gpu_build(tmp_path):
    from scatlas.index.executor import LocalExecutor
    from tests.test_index_helpers import digests

    src = array_source(20_000, 32, seed=3)
    cfg = config(factory="IVF64,PQ4", device="cuda", shard_size=5_000)
    one = build_from_source(src, tmp_path / "one", cfg, executor=LocalExecutor(["cuda:0"]))
    every = build_from_source(src, tmp_path / "every", cfg)  # default: one thread per GPU FAISS sees
    assert every.build["executor"]["devices"] == [f"cuda:{i}" for i in range(faiss_gpu_count())]
    assert one.build["task_device"] == every.build["task_device"] == "cuda"
    assert digests(tmp_path / "one") == digests(tmp_path / "every")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and faiss-gpu")
@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF64,PQ4"])
def test_search_on_the_gpus_equals_the_cpu_search(tmp_path, factory):
    src = array_source(20_000, 32, seed=3)
    build_from_source(src, tmp_path / "idx", config(factory=factory, shard_size=5_000))
    q = clustered(500, 32, seed=11)
    cpu = AtlasIndex.open(tmp_path / "idx").search(q, k=30)
    gpu = AtlasIndex.open(tmp_path / "idx", device="cuda").search(q, k=30)
    assert recall_at_k(gpu.ids, cpu.ids) >= 0.99  # GPU float arithmetic may order near-ties differently
    np.testing.assert_allclose(gpu.scores, cpu.scores, atol=1e-4)
    filtered = AtlasIndex.open(tmp_path / "idx", device="cuda").search(q, k=30, where="soma_joinid < 7000")
    assert (filtered.ids < 7000).all()


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on machines without a GPU")
def test_opening_an_index_on_cuda_without_gpu_is_refused(tmp_path):
    build_from_source(array_source(500, 8), tmp_path / "idx", config())
    with pytest.raises(DependencyError):
        AtlasIndex.open(tmp_path / "idx", device="cuda")
    assert AtlasIndex.open(tmp_path / "idx", device="auto").search(clustered(3, 8), k=5).ids.shape == (3, 5)
