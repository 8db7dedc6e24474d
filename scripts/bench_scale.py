"""Scale run: a 36M-cell index from synthetic embeddings on this machine, then annotation searches and a sweep.

    nice .venv/bin/python scripts/bench_scale.py --n 36000000 --d 128        # about an hour on 2 cores
    .venv/bin/python scripts/bench_scale.py --n 300000 --d 128 --out /tmp/s   # a quick smoke run

Stages, each in its own spawned process so that its peak memory is its own (VmHWM, and the largest anonymous
RSS seen by a 0.5 s sampler: VmHWM also counts file pages mapped into the process, which are page cache):

1. ``cells``: a DuckDB cell table (soma_joinid, cell_type = the mixture cluster, dataset_id = one per million cells),
   written block by block.
2. ``build``: ``index.build_from_source`` over the synthetic vectors, streamed (never materialised), local executor.
   Rerunning the command resumes an interrupted build.
3. ``annotate``: 10,000 fresh query cells from the same mixture: k=30 search at the build's defaults, a
   similarity-weighted majority vote over the neighbours' cell_type (accuracy against the query's cluster), the
   same with a ``dataset_id`` filter, and recall@30 against exact search on a sample of the queries.
4. ``sweep``: a linear classifier for one small cluster swept over every cell (twice: first and second read),
   GB/s, and precision/recall of the hits against the cluster labels.

Results go to ``OUT/n{N}-d{D}.scale.json`` and (for the default output directory) to the bench_scale section of
docs/benchmarks.md, with a projection for 36M x 1280-d on GPUs, labelled as such.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from docs_block import write_block

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_scale:start -->", "<!-- bench_scale:end -->"
K = 30
CHUNK = 50_000
DATASET_CELLS = 1_000_000


# -- memory ------------------------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class MemorySampler:
    """Largest RssAnon / VmRSS seen every ``interval`` seconds (a thread of the measured process)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.max_anon, self.max_rss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status()
            self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
            self.max_rss = max(self.max_rss, s.get("VmRSS", 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        s = _status()
        self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
        self.hwm = s.get("VmHWM", 0)

    def figures(self) -> dict[str, int]:
        return {"peak_rss_anon": self.max_anon, "peak_rss_sampled": self.max_rss, "vm_hwm": self.hwm}


def _config(n: int, d: int, clusters: int) -> Any:
    from scatlas.atlas.synthetic import SyntheticEmbeddingConfig

    return SyntheticEmbeddingConfig(n=n, d=d, n_clusters=clusters, seed=0, chunk_size=CHUNK)


def _embedder_info(cfg: Any) -> Any:
    import dataclasses
    import hashlib

    from scatlas.index import EmbedderInfo

    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "chunk_size"}
    fp = "synthetic-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return EmbedderInfo("synthetic", params, fp, cfg.d)


# -- stages (each runs in a spawned process) ---------------------------------------------------------------------
def stage_cells(path: str, n: int, d: int, clusters: int) -> dict[str, Any]:
    import duckdb
    import pyarrow as pa

    from scatlas.atlas.synthetic import vectors_for_range

    cfg = _config(n, d, clusters)
    target = Path(path)
    if target.is_file():
        with duckdb.connect(str(target), read_only=True) as con:
            if con.execute("SELECT count(*) FROM cells").fetchone()[0] == n:
                return {"reused": True}
        target.unlink()
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with MemorySampler() as mem, duckdb.connect(str(tmp)) as con:
        con.execute("CREATE TABLE cells (soma_joinid BIGINT, cell_type VARCHAR, dataset_id VARCHAR)")
        block = 1_000_000
        for a in range(0, n, block):
            b = min(a + block, n)
            labels = np.concatenate([vectors_for_range(cfg, s, min(s + CHUNK, b))[1] for s in range(a, b, CHUNK)])
            ids = np.arange(a, b, dtype=np.int64)
            table = pa.table({"soma_joinid": ids,
                              "cell_type": pa.array([f"c{x:03d}" for x in labels.tolist()]),
                              "dataset_id": pa.array([f"ds{x:02d}" for x in (ids // DATASET_CELLS).tolist()])})
            con.register("_block", table)
            con.execute("INSERT INTO cells SELECT * FROM _block")
            con.unregister("_block")
    os.replace(tmp, target)
    return {"seconds": round(time.perf_counter() - t0, 1), **mem.figures()}


def stage_build(out: str, cells: str, n: int, d: int, clusters: int, shard_size: int, factory: str) -> dict[str, Any]:
    from scatlas.index import BuildConfig, build_from_source, index_info, synthetic_source

    cfg = _config(n, d, clusters)
    t0 = time.perf_counter()
    with MemorySampler() as mem:
        m = build_from_source(synthetic_source(cfg), out, BuildConfig(factory=factory, shard_size=shard_size,
                                                                      chunk_size=CHUNK),
                              cells=cells, embedder_info=_embedder_info(cfg))
    return {"wall_s_this_run": round(time.perf_counter() - t0, 1), "build": m.build, "factory": m.factory,
            "manifest_recall": m.recall.recall, "nprobe": m.search.nprobe, "rerank": m.search.rerank,
            "info": index_info(out), **mem.figures()}


def stage_eval(out: str) -> dict[str, Any]:
    """The build's last step alone (recall tuning + calibration, as ``build_from_source`` runs them) on the built
    index, in a fresh process: its memory figures are those of that step."""
    from scatlas.index import AtlasIndex
    from scatlas.index.evaluate import calibrate, tune_and_measure

    idx = AtlasIndex.open(out)
    m = idx.manifest
    cfg = m.build["config"]
    t0 = time.perf_counter()
    with MemorySampler() as mem:
        searcher = idx._searcher
        rec = tune_and_measure(searcher, k=cfg["k"], n_queries=cfg["eval_queries"], seed=cfg["seed"] + 101,
                               target=cfg["target_recall"], nprobe=cfg["nprobe"], rerank=cfg["rerank"])
        calibrate(searcher, k=cfg["k"], n_cells=cfg["calibration_cells"], seed=cfg["seed"] + 202,
                  nprobe=rec.nprobe, rerank=rec.rerank)
    return {"seconds": round(time.perf_counter() - t0, 1), "recall": rec.recall, **mem.figures()}


def stage_annotate(out: str, n: int, d: int, clusters: int, queries: int, recall_queries: int) -> dict[str, Any]:
    from scatlas.atlas.synthetic import sample_queries
    from scatlas.index import AtlasIndex
    from scatlas.index.evaluate import recall_at_k

    cfg = _config(n, d, clusters)
    q, qlab = sample_queries(cfg, queries, seed=1)
    res: dict[str, Any] = {"queries": queries}
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        idx = AtlasIndex.open(out)
        res["open_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        hits = idx.search(q, k=K)
        res["search_s"] = round(time.perf_counter() - t0, 2)
        res["qps"] = round(queries / res["search_s"], 1)
        t0 = time.perf_counter()
        labels = idx.cells(hits.ids, ["cell_type"])["cell_type"].to_numpy().reshape(hits.ids.shape)
        pred = _weighted_majority(labels, hits.scores)
        res["vote_s"] = round(time.perf_counter() - t0, 2)
        res["accuracy"] = round(float(np.mean(pred == np.array([f"c{x:03d}" for x in qlab]))), 4)
        nf = min(1000, queries)
        t0 = time.perf_counter()
        filtered = idx.search(q[:nf], k=K, where="dataset_id = 'ds00'")
        res["filtered_qps"] = round(nf / (time.perf_counter() - t0), 1)
        got = idx.cells(filtered.ids[filtered.ids >= 0], ["dataset_id"])["dataset_id"]
        res["filtered_all_match"] = bool((got == "ds00").all())
        t0 = time.perf_counter()
        exact = idx.exact_search(q[:recall_queries], k=K)
        res["exact_s"] = round(time.perf_counter() - t0, 1)
        res["recall_queries"] = recall_queries
        res["recall_fresh_queries"] = round(recall_at_k(hits.ids[:recall_queries], exact.ids), 4)
    return {**res, **mem.figures()}


def _weighted_majority(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    out = np.empty(len(labels), dtype=object)
    for i, (lab, sc) in enumerate(zip(labels, scores, strict=True)):
        tally: dict[Any, float] = {}
        for a, s in zip(lab, sc, strict=True):
            if a is not None and np.isfinite(s):
                tally[a] = tally.get(a, 0.0) + max(float(s), 0.0)
        out[i] = max(tally, key=tally.__getitem__) if tally else None
    return out


def stage_sweep(out: str, sweep_dir: str, n: int, d: int, clusters: int) -> dict[str, Any]:
    import duckdb
    import pandas as pd

    from scatlas.atlas.synthetic import sample_queries
    from scatlas.query.hunt import HuntClassifier, sweep
    from scatlas.query.hunt.calibration import Calibration

    cfg = _config(n, d, clusters)
    q, qlab = sample_queries(cfg, 50_000, seed=7)
    counts = np.bincount(qlab, minlength=clusters)
    small = [int(c) for c in np.argsort(counts)[len(counts) // 50: len(counts) // 5] if counts[c] >= 20]
    best = None
    for c in small:  # a small cluster a linear classifier can separate (many overlap their neighbours)
        wc = q[qlab == c].mean(axis=0)
        wc = (wc / np.linalg.norm(wc)).astype(np.float32)
        cut_c, f1_c = _best_f1_cut(q @ wc, qlab == c)
        if best is None or f1_c > best[3]:
            best = (c, wc, cut_c, f1_c)
    assert best is not None
    target, w, cut, _ = best
    clf = HuntClassifier(w, 0.0, cut, Calibration("platt", a=1.0, b=0.0), _embedder_info(cfg).fingerprint, "scale")
    runs = []
    with MemorySampler() as mem:
        for i in range(2):
            t0 = time.perf_counter()
            s = sweep(out, clf, Path(sweep_dir) / f"run{i}", resume=False, progress=False)
            runs.append({"wall_s": round(time.perf_counter() - t0, 1), "scoring_s": round(s.scoring_seconds, 1),
                         "gb_per_s": round(s.gb_per_second, 2), "cells_per_s": round(s.cells_per_second),
                         "threads": s.threads, "kernel": s.kernel, "hits": s.n_hits, "bytes": s.bytes_scored})
    hits = pd.read_parquet(s.hits_path, columns=["cell_type"])
    label = f"c{target:03d}"
    with duckdb.connect(str(Path(out) / "cells.duckdb"), read_only=True) as con:
        truth = con.execute("SELECT count(*) FROM cells WHERE cell_type = ?", [label]).fetchone()[0]
    tp = int((hits["cell_type"] == label).sum())
    return {"cluster": label, "cluster_cells": int(truth), "runs": runs, "precision": round(tp / max(len(hits), 1), 4),
            "recall": round(tp / max(truth, 1), 4), **mem.figures()}


def _best_f1_cut(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The cut on labelled cells with the best F1 (what a trained classifier's threshold does), and that F1."""
    order = np.argsort(-scores)
    tp = np.cumsum(truth[order])
    f1 = 2 * tp / (np.arange(1, len(scores) + 1) + truth.sum())
    i = int(np.argmax(f1))
    return float(scores[order][i]), float(f1[i])


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# -- report ------------------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def render(r: dict[str, Any]) -> str:
    b, a, s, info = r["build"], r["annotate"], r["sweep"], r["build"]["info"]
    bb = b["build"]
    cold, warm = s["runs"][0], s["runs"][-1]
    # the build ran in this record's run (a run that finds the index complete records ~0 s of wall time)
    built_here = b["wall_s_this_run"] >= 0.5 * bb["seconds"] or bb["shards_reused"] > 0
    lines = [
        f"## Scale run: {r['n']:,} cells x {r['d']} dims (synthetic embeddings, CPU, local executor)",
        "",
        "Commands: " + "; ".join(f"`{v}`" for k, v in r.items() if k.startswith("command")) +
        f"; {r['date']}, {r['machine']}; load average at start {r['load_at_start']}.",
        "",
        "| stage | figure |",
        "|---|---|",
        f"| cell table (soma_joinid, cell_type, dataset_id) | {r['cells'].get('seconds', '(reused)')} s |",
        f"| build: factory | {b['factory']}, {info['shards']} shards of {r['shard_size']:,} cells |",
        f"| build: train / add / eval | {bb['train_seconds']:,.0f} s / {bb['add_seconds']:,.0f} s "
        f"({bb['add_cells_per_second'] or 0:,.0f} cells/s) / {bb['eval_seconds']:,.0f} s |",
        *([f"| build: total (manifest) / wall of this run | {bb['seconds']:,.0f} s / {b['wall_s_this_run']:,.0f} s "
           f"({bb['shards_reused']} shards reused from an earlier interrupted run) |",
           f"| build: peak anonymous RSS / VmHWM | {_gib(b['peak_rss_anon'])} / {_gib(b['vm_hwm'])} |"]
          if built_here else
          [f"| build: total (manifest) | {bb['seconds']:,.0f} s in one run ({bb['started']} to {bb['finished']}); "
           "this run found the index complete, so the build's memory was not sampled |"]),
        f"| disk | {info['size_bytes'] / 1e9:.1f} GB, {info['bytes_per_cell']} bytes/cell |",
        f"| recall@30 (build's held-out atlas cells) | {b['manifest_recall']} at nprobe={b['nprobe']}, "
        f"rerank={b['rerank']} |",
        *([f"| build's last step again, alone (recall tuning + calibration, fresh process, after the fix that unmaps "
            f"re-ranked candidates' pages per block; the build row above predates it): peak anonymous RSS / VmHWM | {_gib(r['eval']['peak_rss_anon'])}"
            f" / {_gib(r['eval']['vm_hwm'])} ({r['eval']['seconds']:,.0f} s) |"] if "eval" in r else []),
        f"| annotation: {a['queries']:,} fresh query cells, k=30 | {a['search_s']} s search ({a['qps']:,} QPS) + "
        f"{a['vote_s']} s vote; accuracy {a['accuracy']} vs the query clusters |",
        f"| annotation: recall@30 on {a['recall_queries']} of them vs exact | {a['recall_fresh_queries']} "
        f"(exact search {a['exact_s']} s) |",
        f"| annotation: `dataset_id = 'ds00'` filter | {a['filtered_qps']:,} QPS, all hits in ds00: "
        f"{a['filtered_all_match']} |",
        f"| annotation: peak anonymous RSS / VmHWM | {_gib(a['peak_rss_anon'])} / {_gib(a['vm_hwm'])} |",
        f"| sweep: first / second read | {cold['scoring_s']} s ({cold['gb_per_s']} GB/s) / {warm['scoring_s']} s "
        f"({warm['gb_per_s']} GB/s), {warm['bytes'] / 1e9:.1f} GB of float16 vectors |",
        f"| sweep: hits | {warm['hits']:,} for cluster {s['cluster']} ({s['cluster_cells']:,} cells): precision "
        f"{s['precision']}, recall {s['recall']} |",
        f"| sweep: peak anonymous RSS / VmHWM | {_gib(s['peak_rss_anon'])} / {_gib(s['vm_hwm'])} |",
        "",
        "Peak anonymous RSS is the largest `RssAnon` sampled every 0.5 s (memory the process allocated); VmHWM also",
        "counts pages of memory-mapped shard files, which are page cache the kernel can drop.",
        "",
        *projection(r),
    ]
    return "\n".join(lines) + "\n"


UCE_CELLS_PER_GPU_S = (100, 300)
"""Assumed UCE (33-layer) throughput per H100-class GPU: the issue's "tens to hundreds of cells/s per GPU". No GPU
session measured it (the projection says so)."""


def projection(r: dict[str, Any]) -> list[str]:
    """36M x 1280-d on 1 and 8 GPUs: what this run measured, scaled, with every assumption named."""
    n, d = 36_000_000, 1280
    vec_gb = n * d * 2 / 1e9
    lo, hi = UCE_CELLS_PER_GPU_S
    b = r["build"]["build"]
    add_rate_128 = b.get("add_cells_per_second") or 0
    sweep_gbs = max(run["gb_per_s"] for run in r["sweep"]["runs"])

    def hours(cells_per_s: float) -> str:
        return f"{n / cells_per_s / 3600:,.1f} h"

    return [
        f"**Projection for {n:,} cells x {d} dims (UCE embeddings) on H100-class GPUs. No GPU was lent to this "
        "session, so nothing below was measured on a GPU: it scales this run's CPU figures and assumes the UCE rate.**",
        "",
        "| stage | 1 GPU | 8 GPUs (8 shard tasks at a time, local executor or Ray) | basis |",
        "|---|---|---|---|",
        f"| embed with UCE | {hours(hi)} to {hours(lo)} | {hours(8 * hi)} to {hours(8 * lo)} | assumed "
        f"{lo}-{hi} cells/s per GPU; shards are independent, so linear in GPUs |",
        f"| add to IVF-PQ (CPU FAISS on the task's node) | about {hours(add_rate_128 * 128 / d)} at this machine's "
        f"d=128 rate scaled by d (2 cores) | the same per node, overlapped with embedding | {add_rate_128:,.0f} "
        "cells/s measured here at d=128 |",
        f"| float16 vectors on disk | {vec_gb:,.0f} GB, and as much again for their rounding residuals (exact top k; "
        f"`build --no-exact-rerank` leaves them out) | {vec_gb:,.0f} GB + {vec_gb:,.0f} GB (shared storage) | N x d x 2 "
        "bytes each |",
        f"| sweep | {vec_gb / sweep_gbs / 60:,.1f} min at this run's {sweep_gbs} GB/s if the vectors were in RAM; "
        f"disk-bound otherwise (92 GB does not fit this machine's page cache) | each GPU reads 1/8 | measured "
        "sweep rate here; a GPU's HBM is not the limit, the read from storage is |",
        "",
        "Embedding dominates: days on one GPU, hours on eight; everything after it is minutes to an hour.",
    ]


def write_docs(r: dict[str, Any]) -> None:
    block = f"{START}\n<!-- bench_scale:data {json.dumps(r, default=str)} -->\n{render(r)}{END}"
    write_block(DOCS, START, END, block)


@click.command()
@click.option("--n", "n", type=int, default=36_000_000, show_default=True)
@click.option("--d", "d", type=int, default=128, show_default=True)
@click.option("--clusters", type=int, default=500, show_default=True)
@click.option("--shard-size", type=int, default=1_000_000, show_default=True)
@click.option("--factory", default="auto", show_default=True)
@click.option("--queries", type=int, default=10_000, show_default=True)
@click.option("--recall-queries", type=int, default=200, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "bench_out" / "scale",
              show_default=True)
@click.option("--docs/--no-docs", default=None, help="Write docs/benchmarks.md (default: only for the default --out).")
@click.option("--stages", default="cells,build,annotate,sweep", show_default=True,
              help="Comma-separated stages to run (also: eval, the build's recall/calibration step alone on a built "
                   "index). Results merge into the saved .scale.json.")
@click.option("--render", "render_json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Only re-render docs/benchmarks.md from a saved .scale.json.")
def main(n: int, d: int, clusters: int, shard_size: int, factory: str, queries: int, recall_queries: int, out: Path,
         docs: bool | None, render_json: Path | None, stages: str) -> None:
    """Build a large index from synthetic embeddings, then search, annotate and sweep it; report each stage."""
    if render_json is not None:
        saved = json.loads(render_json.read_text())
        click.echo(render(saved))
        write_docs(saved)
        return
    out.mkdir(parents=True, exist_ok=True)
    name = f"n{n}-d{d}-c{clusters}"
    index_dir, cells = out / f"{name}.index", out / f"{name}.cells.duckdb"
    saved = out / f"{name}.scale.json"
    wanted = [x.strip() for x in stages.split(",") if x.strip()]
    record: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() and set(wanted) != set(
        ("cells", "build", "annotate", "sweep")) else {}
    record |= {
        "n": n, "d": d, "clusters": clusters, "shard_size": shard_size,
        f"command_{'_'.join(wanted)}": "nice .venv/bin/python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_at_start": round(os.getloadavg()[0], 2),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
    }
    t0 = time.perf_counter()
    for stage, fn, args in (
        ("cells", stage_cells, (str(cells), n, d, clusters)),
        ("build", stage_build, (str(index_dir), str(cells), n, d, clusters, shard_size, factory)),
        ("eval", stage_eval, (str(index_dir),)),
        ("annotate", stage_annotate, (str(index_dir), n, d, clusters, queries, recall_queries)),
        ("sweep", stage_sweep, (str(index_dir), str(out / f"{name}.sweep"), n, d, clusters)),
    ):
        if stage not in wanted:
            continue
        ts = time.perf_counter()
        record[stage] = _in_child(fn, *args)
        record[stage]["stage_wall_s"] = round(time.perf_counter() - ts, 1)
        click.echo(f"{stage}: {json.dumps(record[stage], default=str)[:600]}", err=True)
        (out / f"{name}.scale.json").write_text(json.dumps(record, indent=2, default=str))
    record["total_wall_s"] = round(time.perf_counter() - t0, 1)
    (out / f"{name}.scale.json").write_text(json.dumps(record, indent=2, default=str))
    click.echo(render(record))
    if docs if docs is not None else out == ROOT / "bench_out" / "scale":
        write_docs(record)


if __name__ == "__main__":
    main()
