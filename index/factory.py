"""Choosing, creating and training the FAISS index that every shard is cloned from.

``auto``: an exact ``IDMap2,Flat`` (inner product) for small atlases, else ``[PCAR{p},]IVF{nlist},PQ{m}`` whose
candidates are re-ranked exactly from the stored float16 vectors at search time. Training is deterministic
(fixed seeds, no polysemous training), so the trained index is reproducible.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.index._faiss import faiss_module
from scatlas.index.device import Device

logger = logging.getLogger(__name__)

FLAT_MAX_WORK = 12_800_000
"""``auto`` builds an exact flat index while cells x dims <= this (100k cells at d=128, 256k at d=50, 10k at
d=1280), IVF-PQ above (see docs/benchmarks.md#index-flat-or-ivf)."""

PCA_ABOVE_DIM = 256
"""``auto`` reduces vectors of more dimensions than this to ``PCA_DIM`` before IVF-PQ (re-ranking stays exact)."""
PCA_DIM = 256
NLIST_MIN, NLIST_MAX = 16, 16384
"""Bounds on the inverted lists of ``auto`` IVF; with a flat coarse quantizer, assigning a vector costs nlist x d,
so more lists would want an HNSW quantizer (see docs/benchmarks.md#index-flat-or-ivf)."""
TRAIN_POINTS_PER_LIST = 50
"""Training sample for ``auto`` IVF: this many points per inverted list (FAISS warns below 39)."""
TRAIN_SAMPLE_MIN, TRAIN_SAMPLE_MAX = 20_000, 1_000_000


def choose_nlist(n_cells: int) -> int:
    """About ``4 * sqrt(N)`` inverted lists, rounded to a power of two, capped, and trainable from ``N`` points."""
    target = 4.0 * math.sqrt(max(n_cells, 1))
    nlist = 2 ** round(math.log2(max(target, 1.0)))
    nlist = min(nlist, NLIST_MAX, max(NLIST_MIN, n_cells // 39))
    return max(NLIST_MIN, int(nlist))


def choose_pq_m(dim: int) -> int | None:
    """Sub-quantizers for ``PQ{m}`` (8 bits each): the largest divisor of ``dim`` <= 64; ``None`` if under 16."""
    if dim <= 16:
        return dim
    best = max(m for m in range(1, min(dim, 64) + 1) if dim % m == 0)
    return best if best >= 16 else None


def auto_factory(n_cells: int, dim: int) -> str:
    """The factory string ``auto`` stands for, given the atlas size and vector dimension."""
    if n_cells * dim <= FLAT_MAX_WORK:
        return "IDMap2,Flat"
    pre, d = "", dim
    if dim > PCA_ABOVE_DIM:
        pre, d = f"PCAR{PCA_DIM},", PCA_DIM
    m = choose_pq_m(d)
    if m is None:  # e.g. a prime dimension: rotate into the largest multiple of 16 below it
        d = (d // 16) * 16
        pre, m = f"PCAR{d},", choose_pq_m(d)
    return f"{pre}IVF{choose_nlist(n_cells)},PQ{m}"


def resolve_factory(factory: str, n_cells: int, dim: int) -> str:
    """``auto`` -> :func:`auto_factory`; other strings are used as given, wrapped in ``IDMap2`` where needed."""
    factory = (factory or "auto").strip()
    if factory.lower() == "auto":
        return auto_factory(n_cells, dim)
    if "IVF" not in factory and not factory.startswith("IDMap"):
        factory = "IDMap2," + factory
    return factory


def default_train_sample(factory: str, n_cells: int) -> int:
    """How many vectors to train on: enough for the coarse quantizer (and PQ), bounded."""
    nlist = ivf_nlist(factory)
    if nlist is None:
        return min(n_cells, 65_536) if any(t in factory for t in ("PQ", "PCA", "OPQ", "SQ")) else 0
    return int(min(n_cells, max(TRAIN_SAMPLE_MIN, min(TRAIN_SAMPLE_MAX, TRAIN_POINTS_PER_LIST * nlist))))


def ivf_nlist(factory: str) -> int | None:
    for token in factory.split(","):
        token = token.strip()
        if token.startswith("IVF"):
            digits = "".join(ch for ch in token[3:] if ch.isdigit())
            return int(digits) if digits else None
    return None


def make_index(factory: str, dim: int, seed: int = 0) -> Any:
    """Create an untrained index (inner product) with deterministic training settings."""
    faiss = faiss_module()

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(
            f"FAISS cannot build factory {factory!r} for {dim}-d vectors ({str(exc).strip().splitlines()[-1]}); "
            "use --factory auto or a valid index_factory string such as 'IVF4096,PQ64'"
        ) from exc
    configure_training(index, seed)
    return index


def configure_training(index: Any, seed: int) -> None:
    """Fix k-means seeds and turn off polysemous training (slow and unused: see FACTS.md)."""
    faiss = faiss_module()

    ivf = ivf_of(index)
    if ivf is not None:
        ivf.cp.seed = seed
    inner = faiss.downcast_index(ivf if ivf is not None else unwrap(index))
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    pq = getattr(inner, "pq", None)
    if pq is not None:
        pq.cp.seed = seed + 1


def unwrap(index: Any) -> Any:
    """The innermost index under IDMap / PreTransform wrappers."""
    faiss = faiss_module()

    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def ivf_of(index: Any) -> Any | None:
    faiss = faiss_module()

    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def is_exact(index: Any) -> bool:
    """True for flat (brute-force) indexes, whose scores are exact and need no re-ranking."""
    faiss = faiss_module()

    return isinstance(unwrap(index), faiss.IndexFlat)


def apply_chain(index: Any, x: np.ndarray) -> np.ndarray:
    """Apply the pre-transforms (PCA, OPQ, ...) of an ``IndexPreTransform``; identity otherwise."""
    faiss = faiss_module()

    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexPreTransform):
        return x
    for i in range(index.chain.size()):
        x = index.chain.at(i).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def train_index(factory: str, dim: int, sample: np.ndarray, *, seed: int, device: Device) -> Any:
    """Create and train the shared empty index on ``sample`` (normalised float32), on GPU when ``device="cuda"``."""

    index = make_index(factory, dim, seed)
    if index.is_trained:
        return index
    if len(sample) == 0:
        raise InputError(f"factory {factory!r} needs training but the training sample is empty")
    ivf = ivf_of(index)
    if ivf is not None and len(sample) < ivf.nlist:
        raise InputError(
            f"{len(sample)} training vectors for {ivf.nlist} inverted lists: use a smaller IVF (--factory) or a "
            "larger training sample"
        )
    gpu_clustering = None
    if device == "cuda" and ivf is not None:
        gpu_clustering = _gpu_flat(ivf.d)
        ivf.clustering_index = gpu_clustering
    t0 = time.perf_counter()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if gpu_clustering is not None and ivf is not None:
        ivf.clustering_index = None
    logger.info("trained %s on %d vectors (%s) in %.1f s", factory, len(sample), device, time.perf_counter() - t0)
    return index


_GPU_RESOURCES: dict[int, Any] = {}


def _gpu_resources(gpu: int = 0) -> Any:
    """One ``StandardGpuResources`` per GPU, kept for the process (they own scratch memory and streams)."""
    faiss = faiss_module()

    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[gpu]


def _gpu_flat(dim: int) -> Any:
    """A GPU inner-product flat index (k-means assignment on the GPU); needs faiss-gpu."""
    faiss = faiss_module()

    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = 0
    return faiss.GpuIndexFlatIP(_gpu_resources(), dim, cfg)


def to_gpu(index: Any, gpu: int) -> Any:
    """A copy of a CPU index on GPU ``gpu`` (wrappers such as IndexIDMap2 stay on the CPU around it)."""
    faiss = faiss_module()

    return faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, index)


def gpu_replicas(index: Any, gpus: int) -> Any:
    """``index`` copied onto GPUs ``0..gpus-1``; with several, an IndexReplicas that splits each batch of queries."""
    faiss = faiss_module()

    if gpus == 1:
        return to_gpu(index, 0)
    replicas = faiss.IndexReplicas()
    copies = [to_gpu(index, g) for g in range(gpus)]
    for copy in copies:
        replicas.addIndex(copy)
    replicas.own_copies = copies  # keep the Python wrappers (and so the GPU indexes) alive with the replicas
    return replicas


class Assigner:
    """Coarse assignment of vectors to inverted lists: the trained quantizer, or a copy of it on GPU ``gpu``."""

    def __init__(self, trained: Any, device: Device, gpu: int = 0) -> None:
        faiss = faiss_module()

        self._ivf = ivf_of(trained)
        self._quantizer = None
        self.device = device
        if self._ivf is not None:
            q = faiss.downcast_index(self._ivf.quantizer)
            self._quantizer = faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, q) if device == "cuda" else q

    @property
    def is_ivf(self) -> bool:
        return self._ivf is not None

    def assign(self, xt: np.ndarray) -> np.ndarray:
        assert self._quantizer is not None
        _, labels = self._quantizer.search(xt, 1)
        return np.ascontiguousarray(labels[:, 0], dtype=np.int64)


def add_vectors(index: Any, x: np.ndarray, ids: np.ndarray, assigner: Assigner) -> None:
    """Add normalised float32 vectors with their global ids; IVF coarse assignment goes through ``assigner``."""
    faiss = faiss_module()

    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if not assigner.is_ivf:
        index.add_with_ids(x, ids)
        return
    ivf = ivf_of(index)
    assert ivf is not None, "an IVF assigner was given a non-IVF index"
    xt = apply_chain(index, x)
    assign = assigner.assign(xt)
    ivf.add_core(len(xt), faiss.swig_ptr(xt), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    outer = faiss.downcast_index(index)
    while isinstance(outer, faiss.IndexPreTransform):  # add_core bypasses the wrapper's bookkeeping
        outer.ntotal = ivf.ntotal
        outer = faiss.downcast_index(outer.index)


def serialize(index: Any) -> bytes:
    faiss = faiss_module()

    return bytes(faiss.serialize_index(index).tobytes())


def clone(index: Any) -> Any:
    faiss = faiss_module()

    return faiss.clone_index(index)
