"""Device choice (CPU / CUDA, for FAISS or torch) and FAISS thread counts. GPU FAISS is used only on request."""

from __future__ import annotations

import logging
import os
from typing import Literal

from scatlas.atlas.errors import DependencyError, InputError
from scatlas.index._faiss import faiss_module

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
Backend = Literal["faiss", "torch"]
THREADS_ENV = "SCATLAS_THREADS"


def faiss_gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu or without a CUDA device)."""
    faiss = faiss_module()

    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # a faiss-gpu build without a working driver
        return 0


def torch_gpu_count() -> int:
    """Number of CUDA devices torch can use (0 with a CPU-only build or without a visible GPU)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


_NO_GPU = {
    "faiss": "FAISS sees no GPU (faiss-cpu is installed, or no CUDA device is visible). Install the GPU build (pip "
    "install 'scatlas[gpu]', i.e. faiss-gpu) on a CUDA machine, or use --device cpu / auto.",
    "torch": "torch sees no CUDA device (CPU-only torch build, or no GPU visible). Install a CUDA build of torch on "
    "a GPU machine, or use device='cpu' / 'auto'.",
}


def resolve_device(device: str | None, *, backend: Backend = "faiss") -> Device:
    """The device to run on: ``"cpu"``; ``"cuda"`` (or ``"gpu"``), DependencyError when ``backend`` (FAISS or torch)
    sees no GPU; ``"auto"`` (or None), a GPU when ``backend`` sees one (logged), else the CPU."""
    choice = (device or "auto").lower()
    if choice == "gpu":
        choice = "cuda"
    if choice not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    if choice == "cpu":
        return "cpu"
    n_gpus = faiss_gpu_count() if backend == "faiss" else torch_gpu_count()
    if choice == "cuda":
        if n_gpus == 0:
            raise DependencyError(f"device='cuda' was asked for but {_NO_GPU[backend]}")
        return "cuda"
    resolved: Device = "cuda" if n_gpus > 0 else "cpu"
    logger.info("device auto: using %s (%s sees %d GPU%s)", resolved, backend, n_gpus, "" if n_gpus == 1 else "s")
    return resolved


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
