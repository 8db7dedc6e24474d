"""Profile of one search, stage by stage, against raw FAISS (``scripts/bench_index.py profile``).

On the data of ``bench_index.py run`` (same synthetic vectors, queries and ground truth), it opens our index (built
once into the work directory and reused) and a raw FAISS index of the same factory (trained and added once, cached
as ``raw-<factory>.faiss``), then measures, in interleaved rounds (every variant once per round, each round starting at the next
variant; medians):

* the stages of ``AtlasIndex.search`` (``ShardSearcher.search`` with a :class:`index.stages.StageTimer`): query
  checks, pre-transform + coarse quantizer, FAISS scan (``search_preassigned``), shard merge, candidate gather,
  re-rank scan, id mapping, and the rest ("Python glue": the end-to-end time minus the stages);
* end to end: our search, our search as it was before (shards scanned one by one on one FAISS thread, merged,
  re-ranked query by query: kept here as the reference),
  raw FAISS (codes alone), raw FAISS + ``IndexRefineFlat`` (float32 vectors in RAM) and raw FAISS + ``IndexRefine``
  over a float16 ``IndexScalarQuantizer`` read with ``IO_FLAG_MMAP_IFC`` (its codes memory-mapped, as our vectors
  are), all at the same nprobe and number of re-ranked candidates.

Each is measured with one FAISS thread (CPU time of the calling thread, which other jobs on the machine barely
move) and with every thread (wall time). With several threads a batch is searched in slices by several threads
(``index.slices``), so the stage times are thread-seconds (summed over the threads) and "total" is the elapsed
time times the threads: "Python glue" then also holds the time threads waited for each other or for a core.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 30
SINGLE_QUERIES = 200
"""Queries searched one per call for the latency figures."""
STAGES = ["query checks", "pre-transform + coarse quantizer", "FAISS scan", "shard merge", "candidate gather",
          "re-rank scan", "exact ties", "id mapping"]


def search_before(searcher: Any, q: np.ndarray, k: int, nprobe: int, rerank: int) -> tuple[np.ndarray, np.ndarray]:
    """A search as it ran before this profile existed (kept as the A/B reference): the shared coarse assignment,
    then each shard scanned by ``search_preassigned`` with FAISS's default ``parallel_mode`` (0: one thread), the
    shards' top-k merged with a ``ResultHeap``, then :func:`rerank_per_query`."""
    import faiss

    from scatlas.index.factory import apply_chain

    xt = apply_chain(searcher.trained, q)
    probe = max(1, min(nprobe, searcher.nlist))
    dq, iq = searcher._coarse.search(xt, probe)
    kc = max(k, rerank)
    heap = faiss.ResultHeap(len(q), kc, keep_max=True)
    params = faiss.SearchParametersIVF(nprobe=probe)
    for shard in searcher._shards:
        searcher._index(shard)
        shard.ivf.parallel_mode = 0
        dist = np.empty((len(q), kc), dtype=np.float32)
        lab = np.empty((len(q), kc), dtype=np.int64)
        shard.ivf.search_preassigned_c(len(q), faiss.swig_ptr(xt), kc, faiss.swig_ptr(iq), faiss.swig_ptr(dq),
                                       faiss.swig_ptr(dist), faiss.swig_ptr(lab), False, params)
        heap.add_result(dist, lab)
    heap.finalize()
    return rerank_per_query(searcher, q, heap.I, k)


def rerank_per_query(searcher: Any, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The re-ranking before batching (kept as the A/B reference): each query's candidates gathered into its own
    inverted list of a scratch ``IndexIVFScalarQuantizer`` by a Python loop, then one ``search_preassigned``."""
    import faiss

    n, c = cand.shape
    kk = min(k, c)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    rows = max(1, min(n, (8 << 20) // max(1, c * searcher.dim * 2)))
    scratch = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(searcher.dim), searcher.dim, rows,
                                            faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False)
    scratch.is_trained = True
    invlists = faiss.downcast_InvertedLists(scratch.invlists)
    code_size = int(scratch.code_size)
    lists = np.arange(rows, dtype=np.int64)[:, None]
    zeros = np.zeros((rows, 1), dtype=np.float32)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        cb = np.sort(cand[a:b], axis=1)
        counts = (cb >= 0).sum(axis=1)
        flat = cb[cb >= 0]
        start = 0
        for i in range(b - a):
            m = int(counts[i])
            invlists.resize(i, m)
            if m:
                ids_i = flat[start : start + m]
                codes = faiss.rev_swig_ptr(invlists.get_codes(i), m * code_size)
                searcher._gather16(ids_i, codes.view(np.float16).reshape(m, searcher.dim))
                faiss.rev_swig_ptr(invlists.get_ids(i), m)[:] = ids_i
            start += m
        scratch.ntotal = len(flat)
        dist = np.empty((b - a, kk), dtype=np.float32)
        lab = np.empty((b - a, kk), dtype=np.int64)
        scratch.search_preassigned_c(b - a, faiss.swig_ptr(q[a:b]), kk, faiss.swig_ptr(lists[: b - a]),
                                     faiss.swig_ptr(zeros[: b - a]), faiss.swig_ptr(dist), faiss.swig_ptr(lab),
                                     False, None)
        out_ids[a:b, :kk] = lab
        out_scores[a:b, :kk] = np.where(lab >= 0, dist, -np.inf)
        searcher.release_pages()
    return out_ids, out_scores


def rerank_numpy(searcher: Any, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The re-ranking before torch/FAISS kernels (numpy fancy indexing, float16 -> float32 in numpy, einsum in
    blocks of 64 MiB of float32), kept as the A/B reference."""
    n, c = cand.shape
    kk = min(k, c)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    vecs = np.load(searcher._shards[0].directory / "vectors.f16.npy", mmap_mode="r")
    id_min = searcher._shards[0].record.id_min
    rows = max(1, (64 << 20) // max(1, c * searcher.dim * 4))
    for a in range(0, n, rows):
        b = min(a + rows, n)
        cb = cand[a:b]
        invalid = cb < 0
        v = np.asarray(vecs[np.where(invalid, id_min, cb).ravel() - id_min], dtype=np.float32)
        sc = np.einsum("rcd,rd->rc", v.reshape(b - a, c, searcher.dim), q[a:b], optimize=False)
        sc[invalid] = -np.inf
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        part_sc = np.take_along_axis(sc, part, axis=1)
        top = np.take_along_axis(part, np.argsort(-part_sc, axis=1, kind="stable"), axis=1)
        out_ids[a:b, :kk] = np.take_along_axis(cb, top, axis=1)
        out_scores[a:b, :kk] = np.take_along_axis(sc, top, axis=1)
    out_ids[~np.isfinite(out_scores)] = -1
    return out_ids, out_scores



def rerank_ab(index_dir: Path, queries_file: Path, n_queries: int, rounds: int, threads: int | None
              ) -> dict[str, Any]:
    """Interleaved A/B of exact re-ranking alone (``bench_index.py rerank-ab``): the numpy reference vs
    ``ShardSearcher.rerank``, on the candidates of the index's default search parameters, and the whole search."""
    from scatlas.index import AtlasIndex
    from scatlas.index.vectors import l2_normalize

    idx = AtlasIndex.open(index_dir, threads=threads)
    s = idx._searcher
    nprobe, rerank = idx.manifest.search.nprobe, idx.manifest.search.rerank
    q = l2_normalize(np.load(queries_file)[:n_queries])
    cand, _ = s.search(q, rerank, nprobe=nprobe, rerank=0)
    a_ids, a_sc = rerank_numpy(s, q, cand, K)
    b_ids, b_sc = s.rerank(q, cand, K)
    times: dict[str, list[float]] = {"numpy": [], "ours": [], "search": []}
    for _ in range(rounds):
        for name, fn in (("numpy", lambda: rerank_numpy(s, q, cand, K)), ("ours", lambda: s.rerank(q, cand, K)),
                         ("search", lambda: idx.search(q, k=K))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {
        "index": str(index_dir), "n_queries": len(q), "nprobe": nprobe, "rerank": rerank,
        "same_ids_fraction": float((a_ids == b_ids).mean()), "max_score_diff": float(np.nanmax(np.abs(
            np.where(np.isfinite(a_sc), a_sc - b_sc, 0)))),
        **{f"{k}_qps": round(len(q) / min(v), 1) for k, v in times.items()},
        "times_s": times, "load_at_start": round(os.getloadavg()[0], 2),
    }


def _raw_index(data: Path, factory: str) -> Any:
    """Raw FAISS with our factory, training sample and seed, every vector added with its row as id (cached); the
    vectors L2-normalised first, as our index normalises what it is given (``bench_index.py``'s ``phase_raw``)."""
    import faiss

    from scatlas.index.factory import default_train_sample, make_index
    from scatlas.index.source import NpyVectorSource
    from scatlas.index.vectors import l2_normalize

    path = data / f"raw-normalised-{factory.replace(',', '_')}.faiss"
    if path.exists():
        return faiss.read_index(str(path))
    src = NpyVectorSource(data / "vectors.npy")
    index = make_index(factory, src.dim, seed=0)
    if not index.is_trained:
        index.train(l2_normalize(src.sample(default_train_sample(factory, src.n_cells), 0)[1]))
    for a in range(0, src.n_cells, 50_000):
        b = min(a + 50_000, src.n_cells)
        index.add_with_ids(l2_normalize(src._read(a, b)), np.arange(a, b, dtype=np.int64))
    faiss.write_index(index, str(path))
    return index


def _sq_refine(data: Path) -> Any:
    """A float16 ``IndexScalarQuantizer`` of the vectors (written once), read with its codes memory-mapped."""
    import faiss

    path = data / "refine-sqfp16.faiss"
    if not path.exists():
        x = np.load(data / "vectors.npy", mmap_mode="r")
        sq = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        for a in range(0, len(x), 50_000):
            sq.add(np.ascontiguousarray(x[a : a + 50_000], dtype=np.float32))
        faiss.write_index(sq, str(path))
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)


def _our_index(data: Path, factory: str, shard_size: int, threads: int) -> Path:
    from scatlas.index import BuildConfig, NpyVectorSource, build_from_source

    out = data / f"profile-{factory.replace(',', '_')}-s{shard_size}"
    if not (out / "manifest.json").exists():
        build_from_source(NpyVectorSource(data / "vectors.npy"), out,
                          BuildConfig(factory=factory, shard_size=shard_size, threads=threads, chunk_size=50_000))
    return out


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    from scatlas.index.evaluate import recall_at_k

    return round(recall_at_k(ids[:, :K], truth[:, :K]), 4)


def profile(data: Path, factory: str, shard_size: int, threads: int, rounds: int, extra_reranks: list[int],
            points: list[tuple[int, int]] = ()) -> dict[str, Any]:
    """Run the profile on the data directory ``data`` (vectors.npy, queries.npy, truth.npy); the record.

    ``extra_reranks``: also time our search at these re-rank depths (the build's nprobe); ``points``: and at these
    ``(nprobe, rerank)`` pairs (to compare at equal recall: see :func:`matched_recall`)."""
    import faiss

    from scatlas.index import AtlasIndex
    from scatlas.index.device import set_faiss_threads
    from scatlas.index.stages import StageTimer
    from scatlas.index.vectors import check_queries, l2_normalize

    set_faiss_threads(threads)
    idx = AtlasIndex.open(_our_index(data, factory, shard_size, threads), threads=threads)
    s = idx._searcher
    m = idx.manifest.search
    nprobe, rerank = m.nprobe, m.rerank
    q_raw = np.load(data / "queries.npy")
    truth = np.load(data / "truth.npy")
    n = len(q_raw)
    raw = _raw_index(data, idx.manifest.factory)
    from scatlas.index.factory import ivf_of

    ivf_of(raw).nprobe = nprobe
    xb = l2_normalize(np.load(data / "vectors.npy"))
    rflat = faiss.IndexRefineFlat(raw, faiss.swig_ptr(xb))
    rflat.k_factor = rerank / K
    rsq = faiss.IndexRefine(raw, _sq_refine(data))
    rsq.k_factor = rerank / K

    def ours_before(qq: np.ndarray) -> np.ndarray:
        return search_before(s, check_queries(qq, idx.dim), K, nprobe, rerank)[0]

    variants: dict[str, tuple[str, Any]] = {
        "scatlas": (f"nprobe={nprobe}, rerank={rerank}", lambda qq: idx.search(qq, k=K).ids),
        "scatlas before (per-shard scans, per-query re-rank)": (f"nprobe={nprobe}, rerank={rerank}", ours_before),
        "raw FAISS": (f"nprobe={nprobe}", lambda qq: raw.search(qq, K)[1]),
        "raw FAISS + RFlat": (f"nprobe={nprobe}, k_factor={rerank / K:g}", lambda qq: rflat.search(qq, K)[1]),
        "raw FAISS + IndexRefine(SQfp16, mmap)": (f"nprobe={nprobe}, k_factor={rerank / K:g}",
                                                  lambda qq: rsq.search(qq, K)[1]),
    }
    variants["scatlas, 4 slices per thread"] = (f"nprobe={nprobe}, rerank={rerank}",
                                                lambda qq: _sliced(4, lambda: idx.search(qq, k=K).ids))
    variants["scatlas, pages released after every block"] = (f"nprobe={nprobe}, rerank={rerank}",
                                                             lambda qq: _releasing(lambda: idx.search(qq, k=K).ids))
    for r in extra_reranks:
        variants[f"scatlas, rerank={r}"] = (f"nprobe={nprobe}, rerank={r}",
                                            lambda qq, r=r: idx.search(qq, k=K, rerank=r).ids)
    for npb, r in points:
        variants[f"scatlas, nprobe={npb}, rerank={r}"] = (
            f"nprobe={npb}, rerank={r}", lambda qq, npb=npb, r=r: idx.search(qq, k=K, nprobe=npb, rerank=r).ids)
    recalls = {name: _recall(fn(q_raw), truth) for name, (_, fn) in variants.items()}
    load = [round(v, 2) for v in os.getloadavg()]
    modes = {"1 thread": 1, f"{threads} threads": threads}
    e2e: dict[str, dict[str, list[float]]] = {mode: {name: [] for name in variants} for mode in modes}
    stage_runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    names = list(variants)
    for r in range(rounds):
        for mode, nt in modes.items():
            faiss.omp_set_num_threads(nt)
            clock = time.thread_time if nt == 1 else time.perf_counter
            # each round starts at another variant: in a fixed order the variant timed first after switching threads
            # (ours at the build's parameters) ran up to 20% slower than the same search timed later in the round
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = variants[name][1]
                t0 = clock()
                fn(q_raw)
                e2e[mode][name].append(clock() - t0)
            timer = StageTimer()
            t0 = clock()
            with timer.stage("query checks"):
                qn = check_queries(q_raw, idx.dim)
            s.search(qn, K, nprobe=nprobe, rerank=rerank, timer=timer)
            total = (clock() - t0) * nt  # with nt threads: thread-seconds, as the stages add up over threads
            spent = timer.cpu if nt == 1 else timer.wall
            stage_runs[mode].append({**spent, "total": total})
    single = _single_queries(idx, raw, rflat, q_raw[:SINGLE_QUERIES], rounds)
    faiss.omp_set_num_threads(threads)
    us = 1e6 / n
    stages_out = {}
    for mode, runs in stage_runs.items():
        med = {st: statistics.median(r.get(st, 0.0) for r in runs) * us for st in [*STAGES, "total"]}
        med["Python glue"] = max(0.0, med["total"] - sum(med[st] for st in STAGES))
        stages_out[mode] = {k: round(v, 2) for k, v in med.items()}
    e2e_out = []
    for name, (params, _) in variants.items():
        row: dict[str, Any] = {"method": name, "params": params, "recall": recalls[name]}
        for mode in modes:
            row[f"qps_{mode.replace(' ', '_')}"] = round(n / statistics.median(e2e[mode][name]), 1)
        e2e_out.append(row)
    return {"n_queries": n, "nprobe": nprobe, "rerank": rerank, "shards": len(s._shards), "rounds": rounds,
            "threads": threads, "load_before": load, "load_after": [round(v, 2) for v in os.getloadavg()],
            "factory": idx.manifest.factory, "stages_us_per_query": stages_out, "end_to_end": e2e_out,
            "single_query_calls": single}


def _releasing(fn: Any) -> Any:
    """``fn()`` with the stored vectors' pages released after every re-ranking block (as before
    ``searcher.MAPPED_BYTES_MAX``)."""
    import scatlas.index.searcher as searcher_mod

    old = searcher_mod.MAPPED_BYTES_MAX
    searcher_mod.MAPPED_BYTES_MAX = 1
    try:
        return fn()
    finally:
        searcher_mod.MAPPED_BYTES_MAX = old


def _sliced(per_thread: int, fn: Any) -> Any:
    """``fn()`` with batches split into ``per_thread`` slices per thread (``index.slices.SLICES_PER_THREAD``)."""
    import scatlas.index.slices as slices_mod

    old = slices_mod.SLICES_PER_THREAD
    slices_mod.SLICES_PER_THREAD = per_thread
    try:
        return fn()
    finally:
        slices_mod.SLICES_PER_THREAD = old


def _single_queries(idx: Any, raw: Any, rflat: Any, q: np.ndarray, rounds: int) -> list[dict[str, Any]]:
    """Queries per second when each call searches one query (a server's load), every FAISS thread: ours, raw
    FAISS, raw + RFlat."""
    variants = {"scatlas": lambda: [idx.search(q[i : i + 1], k=K) for i in range(len(q))],
                "raw FAISS": lambda: [raw.search(q[i : i + 1], K) for i in range(len(q))],
                "raw FAISS + RFlat": lambda: [rflat.search(q[i : i + 1], K) for i in range(len(q))]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return [{"method": name, "qps": round(len(q) / statistics.median(v), 1)} for name, v in times.items()]


def render(runs: list[dict[str, Any]]) -> str:
    """Markdown tables of stored profile runs."""
    lines: list[str] = []
    for run in runs:
        p = run["profile"]
        modes = list(p["stages_us_per_query"])
        lines += [f"**{run['n']:,} x {run['d']} ({p['factory']}, {p['shards']} shard(s), nprobe={p['nprobe']}, "
                  f"rerank={p['rerank']}, {p['n_queries']} queries, {p['rounds']} interleaved rounds, medians; "
                  f"{run['date']}, load average {p['load_before'][0]} before, {p['load_after'][0]} after)**", "",
                  "`" + run["command"] + "`", "",
                  "| stage | " + " | ".join(f"µs/query, {m}" + (" (thread-µs)" if m != "1 thread" else " (CPU)")
                                           for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for st in [*STAGES, "Python glue", "total"]:
            vals = []
            for m in modes:
                d = p["stages_us_per_query"][m]
                us = d.get(st, 0.0)  # runs before a stage existed (exact ties: 2026-12-07) did not time it
                share = 100 * us / d["total"] if d["total"] else 0
                vals.append(f"{us:.1f} ({share:.0f}%)" if st != "total" else f"{us:.1f}")
            lines.append(f"| {st} | " + " | ".join(vals) + " |")
        keys = ["qps_" + m.replace(" ", "_") for m in modes]
        ref = next(r for r in p["end_to_end"] if r["method"] == "raw FAISS + RFlat")
        lines += ["", "| method | params | recall@30 | " + " | ".join(f"QPS, {m}" for m in modes)
                  + " | QPS / raw + RFlat |", "|---|---|---|" + "---|" * len(modes) + "---|"]
        for r in p["end_to_end"]:
            qps = [r[key] for key in keys]
            rel = " / ".join(f"{100 * v / ref[key]:.0f}%" for v, key in zip(qps, keys, strict=True))
            lines.append(f"| {r['method']} | {r['params']} | {r['recall']:.4f} | "
                         + " | ".join(f"{v:,.0f}" for v in qps) + f" | {rel} |")
        matched = matched_recall(p)
        if matched is not None:
            lines += ["", "At equal or higher recall than raw + RFlat: " + matched]
        if p.get("single_query_calls"):
            lines += ["", f"One query per call ({SINGLE_QUERIES} calls, {modes[-1]}): " + ", ".join(
                f"{r['method']} {r['qps']:,.0f} QPS" for r in p["single_query_calls"]) + "."]
        lines.append("")
    return "\n".join(lines)


def matched_recall(p: dict[str, Any]) -> str | None:
    """The fastest of our search variants (ours at the build's parameters and at ``--reranks``/``--points``) whose
    recall@30 is at least raw + RFlat's, with its QPS as a share of raw + RFlat's; None when the run has no such
    variant timed."""
    rows = p["end_to_end"]
    ref = next(r for r in rows if r["method"] == "raw FAISS + RFlat")
    keys = [k for k in ref if k.startswith("qps_")]
    ours = [r for r in rows if (r["method"] == "scatlas" or r["method"].startswith("scatlas, rerank=")
                                or r["method"].startswith("scatlas, nprobe="))]
    ok = [r for r in ours if r["recall"] >= ref["recall"]]
    if not ours:
        return None
    if not ok:
        best = max(ours, key=lambda r: r["recall"])
        return (f"none of our variants reaches raw + RFlat's recall@30 {ref['recall']:.4f} (best: "
                f"{best['params']}, {best['recall']:.4f}).")
    best = max(ok, key=lambda r: r[keys[-1]])
    rel = ", ".join(f"{100 * best[k] / ref[k]:.0f}% ({k[4:].replace('_', ' ')})" for k in keys)
    return (f"ours at {best['params']} (recall@30 {best['recall']:.4f} against {ref['recall']:.4f}) serves {rel} of "
            "raw + RFlat's QPS.")


START, END = "<!-- bench_index_profile:start -->", "<!-- bench_index_profile:end -->"
DATA_RE = re.compile(r"<!-- bench_index_profile:data (.*?) -->", re.S)


def write_docs(record: dict[str, Any], docs: Path) -> None:
    """Add ``record`` to the profile runs stored in ``docs`` (replacing the run of the same n, d, factory and shard
    size) and re-render their tables there."""
    from docs_block import write_block

    m = DATA_RE.search(docs.read_text() if docs.exists() else "")
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["d"], r["n"], r["factory"], r.get("shard_size", 1_000_000)

    runs = [r for r in (json.loads(m.group(1)) if m else []) if key(r) != key(record)]
    runs = sorted([*runs, record], key=key)
    block = f"{START}\n<!-- bench_index_profile:data {json.dumps(runs)} -->\n\n{render(runs)}\n{END}"
    write_block(docs, START, END, block, heading="Index: search profile")
