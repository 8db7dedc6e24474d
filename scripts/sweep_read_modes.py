"""How a freshly opened index can read its shards: the ways measured for the one-shot sweep
(``scripts/bench_sweep.py --read-modes``).

For each dimension, ``--read-gb`` of float16 shards are written twice, through a writable memory map (as
``bench_sweep.py`` wrote them before) and through the index's own shard writer (positioned writes of whole chunks,
as ``scatlas build`` writes them); then, in interleaved rounds (medians), every read mode scores all of them with
the sweep's compiled kernel (``query.hunt.fp16dot``, every thread):

* ``mmap, warm``: maps opened once and reused (a sweep repeated in one process);
* ``mmap, fresh``: new maps each time (a new process: every page is mapped again), plain, or after
  ``madvise`` ``MADV_POPULATE_READ`` / ``MADV_WILLNEED`` / ``MADV_SEQUENTIAL`` / ``MADV_HUGEPAGE`` on the whole map;
* ``pread``: ``os.preadv`` of 1 MiB chunks into reused page-aligned buffers (one per thread), no maps;
* ``O_DIRECT``: the same, bypassing the page cache (4 MiB chunks).

Where ``/proc/kpageflags`` is readable (root), the fraction of the files' cached pages that sit in large folios
is reported too: it is what decides how fast a fresh map reads.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MADV_POPULATE_READ = 22  # Linux >= 5.14; not in Python 3.11's mmap module
PREAD_CHUNK = 1 << 20
DIRECT_CHUNK = 4 << 20


def write_memmap(path: Path, block: np.ndarray, n: int) -> None:
    """A float16 .npy of ``n`` rows tiled from ``block``, written through a writable memory map."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, block.shape[1]))
    for a in range(0, n, len(block)):
        out[a : a + len(block)] = block[: n - a]
    out.flush()
    del out


def write_chunks(path: Path, block: np.ndarray, n: int) -> None:
    """The same file, written by the index's shard writer (``index.shard._NpyWriter``)."""
    from scatlas.index.shard import _NpyWriter

    out = _NpyWriter(path, np.float16, (n, block.shape[1]))
    try:
        for a in range(0, n, len(block)):
            out.write(a, block[: n - a])
    finally:
        out.close()


def large_folio_fraction(path: Path, samples: int = 2000) -> float | None:
    """Fraction of sampled cached pages of ``path`` that belong to a large folio (None where the kernel does not
    show page frames: no /proc/kpageflags, or not root)."""
    try:
        kflags = open("/proc/kpageflags", "rb")  # noqa: SIM115 - closed below
    except OSError:
        return None
    try:
        data = np.load(path, mmap_mode="r")
        raw = np.asarray(data).reshape(-1).view(np.uint8)
        pages = np.unique(np.linspace(0, raw.size - 1, samples).astype(np.int64) // mmap.PAGESIZE)
        base = raw.ctypes.data // mmap.PAGESIZE
        with open("/proc/self/pagemap", "rb") as pagemap:
            large = seen = 0
            for pg in pages:
                _ = int(raw[pg * mmap.PAGESIZE])  # map the page
                pagemap.seek((base + int(pg)) * 8)
                pfn = struct.unpack("Q", pagemap.read(8))[0] & ((1 << 55) - 1)
                if pfn == 0:  # not mapped (any more), or PFNs hidden (not root)
                    continue
                kflags.seek(pfn * 8)
                flags = struct.unpack("Q", kflags.read(8))[0]
                large += bool(flags & ((1 << 15) | (1 << 16)))  # compound head or tail
                seen += 1
        return large / seen if seen else None
    finally:
        kflags.close()


def _score_maps(maps: list[np.ndarray], w: np.ndarray, threads: int) -> None:
    from scatlas.query.hunt import fp16dot

    for v in maps:
        out = np.empty(len(v), dtype=np.float32)
        rows = max(1, (256 << 20) // (2 * v.shape[1]))
        for a in range(0, len(v), rows):
            fp16dot.matvec(np.asarray(v[a : a + rows]), w, out[a : a + rows], threads=threads)


def _fresh(files: list[Path], advice: int | None) -> list[np.ndarray]:
    maps = [np.load(f, mmap_mode="r") for f in files]
    if advice is not None:
        for v in maps:
            v._mmap.madvise(advice)
    return maps


def _read_files(files: list[Path], w: np.ndarray, threads: int, chunk: int, direct: bool, pool: Any) -> None:
    """Score the files read with ``preadv`` into reused page-aligned buffers, ``threads`` chunks at a time."""
    from scatlas.query.hunt import fp16dot

    d = len(w)
    for f in files:
        header = int(np.load(f, mmap_mode="r").offset)
        fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            size = os.fstat(fd).st_size
            starts = list(range(0, size, chunk))

            def work(tid: int, fd: int = fd, starts: list[int] = starts, header: int = header) -> None:
                buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
                try:
                    arr = np.frombuffer(buf, dtype=np.uint8)
                    out = np.empty(chunk // (2 * d) + 1, dtype=np.float32)
                    for i in range(tid, len(starts), threads):
                        got = os.preadv(fd, [buf], starts[i])
                        lo = max(header - starts[i], 0)  # rows straddling chunks are cut: a speed test only
                        rows = (got - lo) // (2 * d)
                        if rows > 0:
                            fp16dot.matvec(arr[lo : lo + rows * 2 * d].view(np.float16).reshape(rows, d), w,
                                           out[:rows])
                    del arr
                finally:
                    buf.close()

            list(pool.map(work, range(threads)))
        finally:
            os.close(fd)


def _modes(files: list[Path], w: np.ndarray, threads: int, pool: Any) -> dict[str, Callable[[], None]]:
    """Each read mode of ``files`` as a function that scores them all."""
    warm = _fresh(files, None)
    _score_maps(warm, w, threads)

    def fresh(advice: int | None) -> Callable[[], None]:
        return lambda: _score_maps(_fresh(files, advice), w, threads)

    return {
        "mmap, warm": lambda: _score_maps(warm, w, threads),
        "mmap, fresh": fresh(None),
        "mmap, fresh + MADV_POPULATE_READ": fresh(MADV_POPULATE_READ),
        "mmap, fresh + MADV_WILLNEED": fresh(mmap.MADV_WILLNEED),
        "mmap, fresh + MADV_SEQUENTIAL": fresh(mmap.MADV_SEQUENTIAL),
        "mmap, fresh + MADV_HUGEPAGE": fresh(mmap.MADV_HUGEPAGE),
        "pread, 1 MiB reused buffers": lambda: _read_files(files, w, threads, PREAD_CHUNK, False, pool),
        "O_DIRECT, 4 MiB reused buffers": lambda: _read_files(files, w, threads, DIRECT_CHUNK, True, pool),
    }


def measure(root: Path, dims: list[int], gb: float, rounds: int, threads: int) -> list[dict[str, Any]]:
    """The read modes over both file sets per dimension; one result dict per (dimension, file set, mode)."""
    rng = np.random.default_rng(0)
    results = []
    with ThreadPoolExecutor(threads) as pool:
        for d in dims:
            n_file = int(gb * 1e9) // (2 * d) // 2
            block = rng.standard_normal((max(1, (64 << 20) // (2 * d)), d)).astype(np.float16)
            w = rng.standard_normal(d).astype(np.float32)
            sets = {}
            for name, writer in (("writable memory map", write_memmap), ("index shard writer", write_chunks)):
                files = [root / f"d{d}-{writer.__name__}-{i}.npy" for i in range(2)]
                for f in files:
                    writer(f, block, n_file)
                sets[name] = files
            nbytes = 2 * n_file * d * 2
            for name, files in sets.items():
                modes = _modes(files, w, threads, pool)
                rates: dict[str, list[float]] = {m: [] for m in modes}
                for _ in range(rounds):
                    for mode, fn in modes.items():
                        t0 = time.perf_counter()
                        fn()
                        rates[mode].append(nbytes / 1e9 / (time.perf_counter() - t0))
                folios = large_folio_fraction(files[0])
                for mode, r in rates.items():
                    results.append({"d": d, "files": name, "mode": mode, "gbps": float(np.median(r)),
                                    "gbps_rounds": r, "large_folio_fraction": folios})
            for files in sets.values():
                for f in files:
                    f.unlink()
    return results


def markdown(results: list[dict[str, Any]], command: str, load: tuple[str, str], rounds: int) -> str:
    """A table of :func:`measure`'s results, rows by mode, a column per (d, file set)."""
    cols = list(dict.fromkeys((r["d"], r["files"]) for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    by = {(r["d"], r["files"], r["mode"]): r for r in results}
    lines = [f"`{command}` ({rounds} interleaved rounds, medians; load average {load[0]} before, {load[1]} after)",
             "", "| read mode | " + " | ".join(f"d={d}, {f}" for d, f in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in modes:
        lines.append(f"| {m} | " + " | ".join(f"{by[(d, f, m)]['gbps']:.1f} GB/s" for d, f in cols) + " |")
    folios = [by[(d, f, modes[0])]["large_folio_fraction"] for d, f in cols]
    if any(x is not None for x in folios):
        lines.append("| cached pages in large folios | " + " | ".join(
            "n/a" if x is None else f"{100 * x:.0f}%" for x in folios) + " |")
    return "\n".join(lines)
