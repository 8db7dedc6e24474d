"""The compiled float16 matrix-vector kernel of the sweep (``query/hunt/_fp16dot.c``), through ctypes.

``matvec(block, w, out, threads)`` computes ``block @ w`` for a row-major float16 block and float32 weights,
accumulating in float32, with no float32 copy of the block: on x86-64 with AVX2/FMA/F16C the rows are converted
8 values at a time in registers. Rows are split over ``threads`` Python threads (ctypes releases the GIL).
``available()`` is False where the extension was not built (it is optional: no compiler, another platform); the
sweep then uses torch's float16 kernel and says so in its summary.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MIN_ROWS_PER_THREAD = 4096


@lru_cache(maxsize=1)
def _lib() -> Any:
    spec = importlib.util.find_spec("scatlas.query.hunt._fp16dot")
    if spec is None or spec.origin is None:
        logger.debug("the compiled float16 kernel is not built; the sweep uses torch")
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:  # pragma: no cover - a broken build
        logger.warning("cannot load the compiled float16 kernel %s (%s); the sweep uses torch", spec.origin, exc)
        return None
    lib.scatlas_fp16_matvec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int]
    lib.scatlas_fp16_matvec.restype = None
    lib.scatlas_fp16_simd.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _lib() is not None


def simd() -> bool:
    """Whether the vectorised (AVX2/F16C) path runs on this CPU."""
    lib = _lib()
    return bool(lib is not None and lib.scatlas_fp16_simd())


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scatlas-fp16")
    return _POOLS[threads]


def matvec(block: np.ndarray, w: np.ndarray, out: np.ndarray | None = None, threads: int = 1,
           use_simd: bool | None = None) -> np.ndarray:
    """``block @ w`` as float32 (``block``: C-contiguous float16 (n, d); ``w``: float32 (d,))."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the compiled float16 kernel is not available")
    if block.dtype != np.float16 or block.ndim != 2 or not block.flags.c_contiguous:
        raise ValueError("block must be a C-contiguous 2-D float16 array")
    n, d = block.shape
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape != (d,):
        raise ValueError(f"weights of shape {w.shape} for rows of {d} values")
    if out is None:
        out = np.empty(n, dtype=np.float32)
    if out.dtype != np.float32 or out.shape != (n,) or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous float32 array with one value per row")
    mode = -1 if use_simd is None else int(bool(use_simd))
    base, wp, op = block.ctypes.data, w.ctypes.data, out.ctypes.data
    parts = max(1, min(int(threads), n // MIN_ROWS_PER_THREAD))
    if parts == 1:
        lib.scatlas_fp16_matvec(base, wp, op, n, d, mode)
        return out
    cuts = np.linspace(0, n, parts + 1).astype(np.int64)

    def run(a: int, b: int) -> None:
        lib.scatlas_fp16_matvec(base + a * d * 2, wp, op + a * 4, b - a, d, mode)

    list(_pool(parts).map(run, cuts[:-1].tolist(), cuts[1:].tolist()))
    return out
