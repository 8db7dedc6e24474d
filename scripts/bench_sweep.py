#!/usr/bin/env python
"""Benchmark of the hunt sweep: memory-read bandwidth of this machine vs the sweep's GB/s on the same data.

What it measures, in one run, per dimension ``d``:

1. memory-read bandwidth over an in-RAM float16 array (``--ram-gb``): ``numpy`` sum of a uint64 view (1 thread)
   and ``torch`` sum of the float16 tensor (all torch threads), best of ``--repeats``;
2. the scoring kernel alone (:class:`query.hunt.kernels.BlockScorer` over the in-RAM array);
3. :func:`query.hunt.sweep` end to end over index shards written in the index's format, by the index's own
   shard writer (``shards/NNNN/ids.npy`` + ``vectors.f16.npy``, float16 L2-normalised, ``cells.duckdb``) of
   ``--gb`` of vectors: warm (page cache, repeated in one process, best of ``--repeats``) at 1 and n torch
   threads and with the default thread tuning, on a freshly opened index object, and cold-ish (the shard files
   dropped from the page cache with ``posix_fadvise(DONTNEED)`` first); then ``--pairs`` rounds of (reference
   read, warm sweep, one-shot sweep of a freshly opened index) back to back (:func:`paired`);
4. the page-cache read bandwidth of the same shard files (numpy sum over the memory maps);
5. the GPU path, when torch sees CUDA.

It then extrapolates to 36M cells at d=128 and d=1280 and writes JSON (``--json``) and a Markdown table into
``docs/benchmarks.md`` between ``<!-- bench_sweep:start -->`` and ``<!-- bench_sweep:end -->`` (``--docs``; the
raw JSON is also embedded there as a comment).

    nice .venv/bin/python scripts/bench_sweep.py --gb 2 --ram-gb 1 --dims 128 1280
    nice .venv/bin/python scripts/bench_sweep.py --read-modes     # how a fresh index can read its shards
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from docs_block import write_block

from scatlas.index import AtlasIndex

START, END = "<!-- bench_sweep:start -->", "<!-- bench_sweep:end -->"
ATLAS_CELLS = 36_000_000
DEFAULT_BLOCK_BYTES = 256 << 20  # as query.hunt.sweep
HIT_QUANTILE = 0.999


class ShardDirIndex(AtlasIndex):
    """The part of an AtlasIndex a sweep uses, over shard files written in the index's format (the sweep takes
    ``AtlasIndex`` objects only). It reads them without the SHA-256 check an ``AtlasIndex`` makes on first read
    of an index under 2 GiB (index.verify): the figures are the sweep's own read rate, as for an index above
    that size or with the check set to 0."""

    def __init__(self, root: Path, dim: int, fingerprint: str = "bench") -> None:  # no manifest to read
        self.path = self.root = root
        self._manifest = SimpleNamespace(
            embedder=SimpleNamespace(fingerprint=fingerprint), dim=dim, atlas_snapshot={}, n_cells=0,
            factory="bench", to_json=lambda: json.dumps({"bench": str(root), "dim": dim}),
        )
        self._build_id = fingerprint
        self._verify_on_read = False
        self._con: Any = None
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._shards = sorted((root / "shards").iterdir())

    @property
    def embedder(self) -> Any:
        raise RuntimeError("benchmark index: no embedder")

    def embed(self, chunk: Any) -> np.ndarray:
        raise RuntimeError("benchmark index: no embedder")

    def iter_shards(self) -> Any:
        """Memory maps opened once and kept (as AtlasIndex does), so repeated sweeps reuse the mappings."""
        if self._maps is None:
            self._maps = [
                (np.load(s / "ids.npy", mmap_mode="r"), np.load(s / "vectors.f16.npy", mmap_mode="r"))
                for s in self._shards
            ]
        for no, (ids, vecs) in enumerate(self._maps):
            yield no, ids, vecs

    def connect(self) -> Any:
        import duckdb

        if self._con is None:
            self._con = duckdb.connect(str(self.root / "cells.duckdb"), read_only=True)
        return self._con

    def shard_files(self) -> list[Path]:
        return [s / "vectors.f16.npy" for s in self._shards]


def random_unit_f16(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def write_index(root: Path, n: int, d: int, shard_rows: int, seed: int = 0) -> ShardDirIndex:
    """Shards of random unit vectors (a 64 MiB random block tiled), ids 0..n-1, and a cells table.

    The ids and vectors are written by the index's own shard writer (``index.shard._NpyWriter``: positioned
    writes of whole chunks), as ``scatlas build`` writes them: how a file entered the page cache decides the size
    of its cached pages (a file written through a writable memory map was cached in 4 KiB pages here, one written
    in large chunks in large folios), and that decides how fast a freshly opened index reads it
    (docs/benchmarks.md#sweep-one-shot)."""
    import duckdb

    from scatlas.index.shard import _NpyWriter

    block = random_unit_f16(max(1, (64 << 20) // (2 * d)), d, seed)
    for no, start in enumerate(range(0, n, shard_rows)):
        stop = min(start + shard_rows, n)
        sdir = root / "shards" / f"{no:04d}"
        sdir.mkdir(parents=True)
        ids = _NpyWriter(sdir / "ids.npy", np.int64, (stop - start,))
        vec = _NpyWriter(sdir / "vectors.f16.npy", np.float16, (stop - start, d))
        try:
            ids.write(0, np.arange(start, stop, dtype=np.int64), fresh=True)
            for a in range(0, stop - start, len(block)):
                b = min(a + len(block), stop - start)
                vec.write(a, block[: b - a])
        finally:
            ids.close()
            vec.close()
    con = duckdb.connect(str(root / "cells.duckdb"))
    con.execute(f"CREATE TABLE cells AS SELECT range AS soma_joinid, 'ds' || (range % 100)::VARCHAR AS dataset_id, "
                f"'tissue' || (range % 7)::VARCHAR AS tissue FROM range({n})")
    con.close()
    return ShardDirIndex(root, d)


def out_bytes(n: int, d: int) -> int:
    return n * d * 2


def fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def best_of(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(ram_gb: float, repeats: int) -> dict[str, float]:
    import torch

    n = int(ram_gb * 1e9) // 8 * 4  # float16 elements, a multiple of 4 (uint64 view)
    x = np.ones(n, dtype=np.float16)
    gb = x.nbytes / 1e9
    u = x.view(np.uint64)
    t = torch.from_numpy(x)
    return {
        "bytes": float(x.nbytes),
        "numpy_sum_gbps": gb / best_of(lambda: np.add.reduce(u), repeats),
        "torch_sum_gbps": gb / best_of(lambda: t.sum(), repeats),
    }


def paired(idx: Any, clf: Any, out_dir: Path, maps: list[np.ndarray], threads: int, args: argparse.Namespace
           ) -> dict[str, Any]:
    """``--pairs`` rounds of (reference read, sweep, one-shot sweep) back to back, so that all see the same machine
    state.

    The reference of a round is the best of three reads of memory: torch's sum (with every thread of the run) of a
    1 GB float16 array in RAM and over the very shard files the sweep reads (page cache, memory maps), and numpy's
    1-thread sum of the RAM array. The sweep runs with its best thread count (``threads``). The one-shot sweep is
    what one ``scatlas hunt sweep`` command does: a sweep of a freshly opened index (new memory maps, thread count
    chosen from scratch), each run on a new index object, best of 3 like the other two. The fraction of a round = sweep GB/s / that reference; the median and the
    lowest over rounds are reported (the bandwidth of this VM moves between runs, by up to 1.6x, so a reference
    measured minutes apart from the sweep can mislead either way).
    """
    import torch

    from scatlas.query.hunt import sweep

    x = np.ones(int(args.ram_gb * 1e9) // 8 * 4, dtype=np.float16)
    u, t = x.view(np.uint64), torch.from_numpy(x)
    tmaps = [torch.from_numpy(np.asarray(v).reshape(-1)) for v in maps]
    n_bytes = sum(int(np.asarray(v).nbytes) for v in maps)
    rounds = []
    for _ in range(args.pairs):
        torch.set_num_threads(max(args.thread_counts))
        ram_torch = x.nbytes / 1e9 / best_of(lambda: t.sum(), 3)
        ram_numpy = x.nbytes / 1e9 / best_of(lambda: np.add.reduce(u), 3)
        cache_torch = n_bytes / 1e9 / best_of(lambda: [m.sum() for m in tmaps], 3)
        ref = max(ram_torch, ram_numpy, cache_torch)
        s = max((sweep(idx, clf, out_dir, device="cpu", resume=False, progress=False, threads=threads)
                 for _ in range(3)), key=lambda r: r.gb_per_second)
        one = max((sweep(ShardDirIndex(idx.root, idx.dim), clf, out_dir, device="cpu", resume=False, progress=False)
                   for _ in range(3)), key=lambda r: r.gb_per_second)  # each on a new index object
        torch.set_num_threads(max(args.thread_counts))
        rounds.append({"ram_torch_gbps": ram_torch, "ram_numpy_gbps": ram_numpy, "page_cache_torch_gbps": cache_torch,
                       "reference_gbps": ref, "sweep_gbps": s.gb_per_second, "fraction": s.gb_per_second / ref,
                       "one_shot_gbps": one.gb_per_second, "one_shot_fraction": one.gb_per_second / ref,
                       "one_shot_threads": one.threads})
    torch.set_num_threads(max(args.thread_counts))
    fr = np.array([r["fraction"] for r in rounds])
    fo = np.array([r["one_shot_fraction"] for r in rounds])
    return {"paired_rounds": rounds, "paired_threads": threads, "paired_fraction_median": float(np.median(fr)),
            "paired_fraction_min": float(fr.min()), "paired_fraction_max": float(fr.max()),
            "one_shot_fraction_median": float(np.median(fo)), "one_shot_fraction_min": float(fo.min()),
            "one_shot_fraction_max": float(fo.max())}


def drop_cache(paths: list[Path]) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def bench_dim(d: int, args: argparse.Namespace, tmp: Path, bw: dict[str, float]) -> dict[str, Any]:
    import torch

    from scatlas.query.hunt import HuntClassifier, sweep
    from scatlas.query.hunt.calibration import Calibration
    from scatlas.query.hunt.classifier import exact_scores
    from scatlas.query.hunt.kernels import BlockScorer

    rng = np.random.default_rng(d)
    w = (rng.standard_normal(d) * 3).astype(np.float32)
    probe = random_unit_f16(20_000, d, 1)
    cut = float(np.quantile(exact_scores(probe, w, 0.0), HIT_QUANTILE))
    clf = HuntClassifier(w, 0.0, cut, Calibration("platt"), "bench", "bench")
    out: dict[str, Any] = {"d": d}

    # kernel alone, in RAM
    n_ram = int(args.ram_gb * 1e9) // (2 * d)
    ram = np.empty((n_ram, d), dtype=np.float16)
    block = random_unit_f16(max(1, (64 << 20) // (2 * d)), d, 0)
    for a in range(0, n_ram, len(block)):
        ram[a : a + len(block)] = block[: n_ram - a]
    bs = max(1, DEFAULT_BLOCK_BYTES // (2 * d))
    scorer = BlockScorer(w, 0.0, cut)

    def kernel(arr: np.ndarray) -> None:
        for a in range(0, len(arr), bs):
            scorer.hits(arr[a : a + bs])

    for th in args.thread_counts:
        torch.set_num_threads(th)
        out[f"kernel_ram_gbps_t{th}"] = ram.nbytes / 1e9 / best_of(lambda: kernel(ram), args.repeats)
    torch.set_num_threads(max(args.thread_counts))
    ram = np.empty((0, d), dtype=np.float16)  # free the in-RAM copy before writing the shards

    # sweep end to end over shard files
    n = int(args.gb * 1e9) // (2 * d)
    root = tmp / f"d{d}"
    t = time.perf_counter()
    idx = write_index(root, n, d, shard_rows=max(1, int(args.shard_gb * 1e9) // (2 * d)))
    out["write_seconds"] = time.perf_counter() - t
    out["n_cells"], out["bytes"] = n, n * d * 2

    maps = [v for _, _, v in idx.iter_shards()]

    def mmap_sum() -> None:
        for v in maps:
            np.add.reduce(np.asarray(v).reshape(-1).view(np.uint64))

    mmap_sum()  # map the pages once (as a warm sweep finds them)
    out["page_cache_sum_gbps"] = out_bytes(n, d) / 1e9 / best_of(mmap_sum, args.repeats)
    first = sweep(ShardDirIndex(root, d), clf, tmp / f"s{d}-first", device="cpu", resume=False, progress=False)
    out["sweep_first_touch_gbps"] = first.gb_per_second
    best = None
    for th in args.thread_counts:
        warm = [sweep(idx, clf, tmp / f"s{d}", device="cpu", resume=False, progress=False, threads=th)
                for _ in range(args.repeats)]
        top = max(warm, key=lambda s: s.gb_per_second)
        out[f"sweep_warm_gbps_t{th}"] = top.gb_per_second
        if best is None or top.gb_per_second > best.gb_per_second:
            best = top
    auto = [sweep(idx, clf, tmp / f"s{d}", device="cpu", resume=False, progress=False) for _ in range(args.repeats)]
    top = max(auto, key=lambda s: s.gb_per_second)
    out["sweep_warm_gbps_auto"] = top.gb_per_second
    out["sweep_auto_threads"] = top.threads
    assert best is not None
    out["sweep_warm_gbps"] = best.gb_per_second
    out["sweep_warm_cells_per_s"] = best.cells_per_second
    out["sweep_warm_scoring_s"] = best.scoring_seconds
    out["sweep_total_s"] = best.seconds
    out["n_hits"] = best.n_hits
    out["kernel"] = best.kernel
    out["threads"] = best.threads
    out.update(paired(idx, clf, tmp / f"s{d}-paired", maps, best.threads, args))
    if args.cold and drop_cache(idx.shard_files()):
        cold = sweep(ShardDirIndex(root, d), clf, tmp / f"s{d}-cold", device="cpu", resume=False, progress=False)
        out["sweep_cold_gbps"] = cold.gb_per_second
    if torch.cuda.is_available():
        g = sweep(idx, clf, tmp / f"s{d}-gpu", device="cuda", resume=False, progress=False)
        out["sweep_gpu_gbps"] = g.gb_per_second
        assert g.n_hits == best.n_hits
    ref = max(bw["numpy_sum_gbps"], bw["torch_sum_gbps"])
    out["fraction_of_ram_bandwidth"] = out["sweep_warm_gbps"] / ref
    out["fraction_of_page_cache_bandwidth"] = out["sweep_warm_gbps"] / out["page_cache_sum_gbps"]
    # the ceiling the kernel itself sets (in RAM, no files): above it, only a faster kernel helps the sweep
    out["kernel_fraction_of_ram_bandwidth"] = max(out[f"kernel_ram_gbps_t{t}"] for t in args.thread_counts) / ref
    atlas_bytes = ATLAS_CELLS * d * 2
    out["atlas_36M_bytes"] = atlas_bytes
    out["atlas_36M_warm_seconds"] = atlas_bytes / (out["sweep_warm_gbps"] * 1e9)
    if "sweep_cold_gbps" in out:
        out["atlas_36M_cold_seconds"] = atlas_bytes / (out["sweep_cold_gbps"] * 1e9)
    return out


def _headline(result: dict[str, Any]) -> list[str]:
    """The one-shot figure (a sweep of a freshly opened index, as one CLI command) against the paired reference."""
    parts = [
        f"d={r['d']}: {100 * r['one_shot_fraction_median']:.0f}% of the paired read reference (median of "
        f"{len(r['paired_rounds'])} rounds, lowest {100 * r['one_shot_fraction_min']:.0f}%; the run's first "
        f"one-shot sweep read {r['sweep_first_touch_gbps']:.1f} GB/s)"
        for r in result["dims"] if "one_shot_fraction_median" in r
    ]
    return [f"**One-shot sweep (fresh index, as one `scatlas hunt sweep`)**: {'; '.join(parts)}.", ""] if parts else []


def markdown(result: dict[str, Any], command: str) -> str:
    bw = result["bandwidth"]
    lines = [
        "## Sweep",
        "",
        f"<!-- bench_sweep:data {json.dumps(result)} -->",
        "",
        f"Measured {result['date']} on {result['machine']} (torch {result['torch']}, torch threads "
        f"{result['threads']}; load average {result['loadavg_before']} before, {result['loadavg_after']} after; the machine is "
        "shared, so numbers vary between runs). Command:",
        "",
        f"    {command}",
        "",
        *_headline(result),
        f"Memory-read bandwidth ({bw['bytes'] / 1e9:.1f} GB float16 array in RAM, best of {result['repeats']}): "
        f"numpy sum {bw['numpy_sum_gbps']:.1f} GB/s (1 thread), torch sum {bw['torch_sum_gbps']:.1f} GB/s.",
        "",
        "| d | data | kernel in RAM (1 / n threads) | page-cache read (numpy sum, mmap) "
        "| sweep, page cache (1 / n threads) | sweep, default (threads tuned) | fresh index object | cold-ish | GPU "
        "| best sweep / RAM bandwidth | best kernel in RAM / RAM bandwidth | best sweep / page-cache read "
        "| 36M cells, warm | 36M cells, cold-ish |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ths = result["threads"]
    for r in result["dims"]:
        def f(key: str, fmt: str = "{:.1f} GB/s", r: dict[str, Any] = r) -> str:
            return fmt.format(r[key]) if key in r else "n/a"

        kern = " / ".join(f(f"kernel_ram_gbps_t{t}", "{:.1f}") for t in ths) + " GB/s"
        warm = " / ".join(f(f"sweep_warm_gbps_t{t}", "{:.1f}") for t in ths) + " GB/s"
        lines.append(
            f"| {r['d']} | {r['bytes'] / 1e9:.1f} GB ({r['n_cells'] / 1e6:.2f}M cells) | {kern} "
            f"| {f('page_cache_sum_gbps')} | {warm} | {f('sweep_warm_gbps_auto')} | {f('sweep_first_touch_gbps')} | {f('sweep_cold_gbps')} "
            f"| {f('sweep_gpu_gbps')} | {100 * r['fraction_of_ram_bandwidth']:.0f}% "
            f"| {100 * r['kernel_fraction_of_ram_bandwidth']:.0f}% "
            f"| {100 * r['fraction_of_page_cache_bandwidth']:.0f}% "
            f"| {fmt_time(r['atlas_36M_warm_seconds'])} "
            f"| {fmt_time(r['atlas_36M_cold_seconds']) if 'atlas_36M_cold_seconds' in r else 'n/a'} |"
        )
    lines += [
        "",
        f"Kernel: `{result['dims'][0].get('kernel', '?')}` (`c16`: the compiled float16 kernel of "
        "`query/hunt/_fp16dot.c`, float16 rows converted in registers with F16C, float32 accumulation, rows split "
        "over threads; `fp16`: torch's `torch.mv(torch.from_numpy(block), w16)`, used where the extension is not "
        "built), rows within a safety margin of the cut re-scored exactly in float64; hits are exact. "
        "\"best kernel in RAM / RAM bandwidth\" is the ceiling the kernel sets. \"sweep\" is "
        "`query.hunt.sweep` end to end (scoring rate; the hits join is excluded from GB/s, included in total time). "
        "\"fresh index object\" is the default sweep on a newly opened index (as one CLI run: new mappings, thread "
        "tuning from scratch); \"cold-ish\" first drops the shard files from the page cache "
        "(`posix_fadvise(DONTNEED)`; a VM disk whose host may cache). 36M extrapolation = 36M x d x 2 bytes / measured "
        "rate; the warm figure assumes the vectors fit in the page cache (92 GB at d=1280 does not on a 24 GB "
        "machine: there the cold rate applies).",
        "",
    ]
    if all("paired_rounds" in r for r in result["dims"]):
        lines += [
            "Paired rounds (the target's measure): in each round the reference read, the sweep and a one-shot "
            "sweep run back to back; reference = the best of torch's sum with every thread over a 1 GB float16 "
            "array in RAM and over the same shard files in the page cache, and numpy's 1-thread sum (each best of "
            "3); sweep = best of 3 with its best thread count (the threads column) on an index object already used; "
            "one-shot = a sweep of a freshly opened index object with default settings (new memory maps, thread "
            "count chosen from scratch), which is what one `scatlas hunt sweep` command does: best of 3 such "
            "sweeps, each on a new index object (the single first one-shot sweep of the run is the \"fresh index "
            "object\" column above).",
            "",
            "| d | rounds | threads | reference GB/s (min-max) | one-shot GB/s (min-max) "
            "| **one-shot / reference: median** | lowest | sweep GB/s (min-max) | sweep / reference: median "
            "| lowest | highest |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["dims"]:
            refs = [x["reference_gbps"] for x in r["paired_rounds"]]
            sws = [x["sweep_gbps"] for x in r["paired_rounds"]]
            one = [x.get("one_shot_gbps", float("nan")) for x in r["paired_rounds"]]
            lines.append(
                f"| {r['d']} | {len(refs)} | {r['paired_threads']} | {min(refs):.1f}-{max(refs):.1f} "
                f"| {min(one):.1f}-{max(one):.1f} | **{100 * r.get('one_shot_fraction_median', float('nan')):.0f}%** "
                f"| {100 * r.get('one_shot_fraction_min', float('nan')):.0f}% "
                f"| {min(sws):.1f}-{max(sws):.1f} | {100 * r['paired_fraction_median']:.0f}% "
                f"| {100 * r['paired_fraction_min']:.0f}% | {100 * r['paired_fraction_max']:.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def write_docs(path: Path, section: str) -> None:
    write_block(path, START, END, f"{START}\n{section}\n{END}")


def read_modes(args: argparse.Namespace, command: str) -> int:
    """``--read-modes``: the read modes of :mod:`sweep_read_modes`, as JSON and a docs block."""
    import torch
    from sweep_read_modes import markdown as read_markdown
    from sweep_read_modes import measure

    before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_sweep_read_") as tmp:
        results = measure(Path(tmp), args.dims, args.read_gb, args.read_rounds, torch.get_num_threads())
    after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = args.json.with_name(args.json.stem + "_read_modes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": before,
                               "load_after": after, "results": results}, indent=2))
    table = read_markdown(results, command, (before, after), args.read_rounds)
    print(table)
    if args.write_docs:
        start, end = "<!-- bench_sweep_read:start -->", "<!-- bench_sweep_read:end -->"
        write_block(args.docs, start, end, f"{start}\n{table}\n{end}", heading="Sweep: one-shot")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="GB of float16 vectors per dimension for the sweep")
    parser.add_argument("--ram-gb", type=float, default=1.0, help="GB of the in-RAM array for bandwidth/kernel")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="GB per shard")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 1280])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=7, help="rounds of (reference read, sweep) back to back")
    parser.add_argument("--threads", dest="thread_counts", type=int, nargs="+", default=None,
                        help="torch thread counts to measure (default: 1 and torch's default)")
    parser.add_argument("--no-cold", dest="cold", action="store_false")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the shards (default: system tmp)")
    parser.add_argument("--json", type=Path, default=Path("bench_out/bench_sweep.json"))
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-docs", dest="write_docs", action="store_false")
    parser.add_argument("--read-modes", action="store_true",
                        help="instead: how a fresh index can read its shards (scripts/sweep_read_modes.py)")
    parser.add_argument("--read-gb", type=float, default=1.0, help="GB of shards per dimension and file set")
    parser.add_argument("--read-rounds", type=int, default=5)
    args = parser.parse_args(argv)
    command = "nice .venv/bin/python scripts/bench_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.read_modes:
        return read_modes(args, command)

    import torch

    if not args.thread_counts:
        args.thread_counts = sorted({1, torch.get_num_threads()})
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.thread_counts,
        "cuda": torch.cuda.is_available(),
        "repeats": args.repeats,
        "loadavg_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "command": command,
    }
    result["bandwidth"] = bandwidth(args.ram_gb, args.repeats)
    print(f"bandwidth: {result['bandwidth']}", flush=True)
    result["dims"] = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_sweep_") as tmp:
        for d in args.dims:
            r = bench_dim(d, args, Path(tmp), result["bandwidth"])
            print(json.dumps(r), flush=True)
            result["dims"].append(r)
    result["loadavg_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_name(f".{args.json.name}.tmp")
    tmp_json.write_text(json.dumps(result, indent=2))
    os.replace(tmp_json, args.json)
    section = markdown(result, command)
    print(section)
    if args.write_docs:
        write_docs(args.docs, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
