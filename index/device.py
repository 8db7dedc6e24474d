"""Device choice (CPU / CUDA) and FAISS thread counts. GPU FAISS is imported and used only on request."""

from __future__ import annotations

import logging
import os
from typing import Literal

from scatlas.atlas.errors import DependencyError, InputError
from scatlas.index._faiss import faiss_module

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
THREADS_ENV = "SCATLAS_THREADS"


def faiss_gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu or without a CUDA device)."""
    faiss = faiss_module()

    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # a faiss-gpu build without a working driver
        return 0


def resolve_device(device: str) -> Device:
    """``"auto"`` -> GPU when FAISS has one (logged), else CPU; ``"cuda"`` without one -> DependencyError."""
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    n_gpus = faiss_gpu_count()
    if device in ("cuda", "gpu"):
        if n_gpus == 0:
            raise DependencyError(
                "device='cuda' was asked for but FAISS sees no GPU (faiss-cpu is installed, or no CUDA device is "
                "visible). Install the GPU build (pip install 'scatlas[gpu]', i.e. faiss-gpu) on a CUDA machine, "
                "or use --device cpu / auto."
            )
        return "cuda"
    choice: Device = "cuda" if n_gpus > 0 else "cpu"
    logger.info("device auto: using %s (FAISS sees %d GPU%s)", choice, n_gpus, "" if n_gpus == 1 else "s")
    return choice


def resolve_threads(threads: int | None = None) -> int:
    """Threads for FAISS: the argument, else ``$SCATLAS_THREADS``, else all cores."""
    if threads is None:
        env = os.environ.get(THREADS_ENV)
        if env:
            try:
                threads = int(env)
            except ValueError as exc:
                raise InputError(f"{THREADS_ENV}={env!r} is not an integer number of threads") from exc
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads < 1:
        raise InputError(f"threads must be >= 1 (got {threads})")
    return int(threads)


def set_faiss_threads(threads: int | None = None) -> int:
    """Set FAISS's OpenMP thread count explicitly and return it."""
    faiss = faiss_module()

    n = resolve_threads(threads)
    faiss.omp_set_num_threads(n)
    return n
