"""Timing the stages of a search (for profiling: ``scripts/bench_index.py profile``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

_NULL: AbstractContextManager[None] = nullcontext()


class StageTimer:
    """Seconds spent in each named stage, summed over every entry: ``wall`` (elapsed) and ``cpu`` (CPU time of the
    calling thread: with one FAISS thread, all of a search's work, unaffected by other jobs on the machine). Stages
    timed in several threads at once add up (thread-seconds)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            dw, dc = time.perf_counter() - w, time.thread_time() - c
            with self._lock:
                self.wall[name] = self.wall.get(name, 0.0) + dw
                self.cpu[name] = self.cpu.get(name, 0.0) + dc


def stage(timer: StageTimer | None, name: str) -> AbstractContextManager[None]:
    """``timer.stage(name)``, or a context that does nothing when ``timer`` is None (the normal, unprofiled case)."""
    return _NULL if timer is None else timer.stage(name)
