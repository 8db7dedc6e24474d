"""Benchmark the sharded index against raw FAISS, hnswlib and exact search on clustered synthetic embeddings.

    .venv/bin/python scripts/bench_index.py run --n 1000000 --d 128
    .venv/bin/python scripts/bench_index.py table            # re-render docs/benchmarks.md from stored results
    .venv/bin/python scripts/bench_index.py profile --n 200000 --d 128 --factory IVF2048,PQ64   # stage by stage

Each method runs in its own (spawned) process so that its peak RSS (VmHWM) is its own. Vectors come from
atlas.synthetic (clustered mixture, overlapping clusters), are written once to a .npy file and read back in
chunks by every method; queries are fresh vectors from the same mixture; ground truth is exact search.
Results are printed as JSON, appended to the data block in docs/benchmarks.md and rendered as a table between
``<!-- bench_index:start -->`` and ``<!-- bench_index:end -->``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from docs_block import write_block

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_index:start -->", "<!-- bench_index:end -->"
DATA_RE = re.compile(r"<!-- bench_index:data (.*?) -->", re.S)
K = 30
CHUNK = 50_000


# -- measurement helpers ----------------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM = peak RSS, VmRSS = current); 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return 0


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    from scatlas.index.evaluate import recall_at_k

    return round(recall_at_k(got[:, :K], truth[:, :K]), 4)


def _timed_search(fn: Any, q: np.ndarray, repeats: int = 3) -> tuple[Any, float]:
    """Best-of-``repeats`` queries/second (after a warm-up on 100 queries) and the last result."""
    fn(q[:100])
    best, out = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(q)
        best = max(best, len(q) / (time.perf_counter() - t0))
    return out, round(best, 1)


def _chunks(path: Path):
    from scatlas.index.source import NpyVectorSource

    src = NpyVectorSource(path)
    for a in range(0, src.n_cells, CHUNK):
        b = min(a + CHUNK, src.n_cells)
        yield np.arange(a, b, dtype=np.int64), src._read(a, b)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- phases (each in a fresh process) ----------------------------------------------------------------------------
def phase_exact(work: str, threads: int) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(threads)
    work_p = Path(work)
    q = np.load(work_p / "queries.npy")
    t0 = time.perf_counter()
    index = None
    for _ids, x in _chunks(work_p / "vectors.npy"):
        if index is None:
            index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
    add_s = time.perf_counter() - t0
    (_, truth), qps = _timed_search(lambda qq: index.search(qq, K), q, repeats=1)
    np.save(work_p / "truth.npy", truth)
    n = index.ntotal
    return {"method": "exact IndexFlatIP", "params": "-", "add_cells_per_s": round(n / add_s, 1),
            "qps": qps, "recall": 1.0, "peak_rss": _status("VmHWM"), "ram_bytes_per_cell": 4 * q.shape[1]}


def phase_ours(work: str, threads: int, factory: str, shard_size: int) -> dict[str, Any]:
    from scatlas.index import AtlasIndex, BuildConfig, NpyVectorSource, build_from_source

    work_p = Path(work)
    out = work_p / f"ours-{factory.replace(',', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    q = np.load(work_p / "queries.npy")
    truth = np.load(work_p / "truth.npy")
    src = NpyVectorSource(work_p / "vectors.npy")
    t0 = time.perf_counter()
    m = build_from_source(src, out, BuildConfig(factory=factory, shard_size=shard_size, threads=threads,
                                                chunk_size=CHUNK))
    build_s = time.perf_counter() - t0
    build_rss = _status("VmHWM")
    idx = AtlasIndex.open(out, threads=threads)
    res, qps = _timed_search(lambda qq: idx.search(qq, k=K), q)
    size = _dir_bytes(out)
    stored = ("vectors.f16.npy", "residuals.f16.npy")  # the stored vectors and their rounding residuals
    vec_bytes = sum(s.files[name].bytes for s in m.shards for name in stored if name in s.files)
    return {
        "method": "scatlas index", "factory": m.factory,
        "params": f"nprobe={m.search.nprobe}, rerank={m.search.rerank}" if not m.exact else "exact",
        "build_s": round(build_s, 1), "build_cells_per_s": round(m.n_cells / build_s, 1),
        "train_s": m.build["train_seconds"], "add_cells_per_s": m.build["add_cells_per_second"],
        "eval_s": m.build["eval_seconds"], "qps": qps, "recall": _recall(res.ids, truth),
        "manifest_recall": m.recall.recall, "peak_rss": max(build_rss, _status("VmHWM")), "build_peak_rss": build_rss,
        "disk_bytes_per_cell": round(size / m.n_cells, 1),
        "disk_bytes_per_cell_without_vectors": round((size - vec_bytes) / m.n_cells, 1),
        "ram_bytes_per_cell": round(sum(s.files["index.faiss"].bytes for s in m.shards) / m.n_cells, 1),
        "nprobe": m.search.nprobe, "rerank": m.search.rerank, "shards": len(m.shards), "index_dir": str(out),
    }


def phase_raw(work: str, threads: int, factory: str, nprobe: int | None, rerank: int) -> dict[str, Any]:
    """The same factory in plain FAISS: same training sample and seeds, add from the same file. Its vectors are
    L2-normalised first, as our index normalises every vector it is given (the file's are unit vectors already,
    to about one float32 ulp: a k-means run on the bits as they are drifts to other centroids and codes)."""
    import faiss

    from scatlas.index.factory import default_train_sample, is_exact, ivf_of, make_index
    from scatlas.index.source import NpyVectorSource
    from scatlas.index.vectors import l2_normalize

    faiss.omp_set_num_threads(threads)
    work_p = Path(work)
    q = np.load(work_p / "queries.npy")
    truth = np.load(work_p / "truth.npy")
    src = NpyVectorSource(work_p / "vectors.npy")
    index = make_index(factory, src.dim, seed=0)
    t0 = time.perf_counter()
    n_train = default_train_sample(factory, src.n_cells)
    if not index.is_trained:
        index.train(l2_normalize(src.sample(n_train, 0)[1]))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ids, x in _chunks(work_p / "vectors.npy"):
        index.add_with_ids(l2_normalize(x), ids)
    add_s = time.perf_counter() - t0
    rss_index = _status("VmRSS")
    rows = []
    ivf = ivf_of(index)
    if ivf is not None and nprobe:
        ivf.nprobe = nprobe
    (_, labels), qps = _timed_search(lambda qq: index.search(qq, K), q)
    base = {"factory": factory, "train_s": round(train_s, 1), "add_cells_per_s": round(src.n_cells / add_s, 1)}
    rows.append({"method": "raw FAISS", **base, "params": f"nprobe={nprobe}" if nprobe else "exact",
                 "qps": qps, "recall": _recall(labels, truth)})
    if rerank and not is_exact(index):
        xb = l2_normalize(np.load(work_p / "vectors.npy"))
        refine = faiss.IndexRefineFlat(index, faiss.swig_ptr(xb))  # float32 copies in RAM: FAISS's exact re-rank
        del xb
        refine.k_factor = rerank / K
        (_, labels), qps = _timed_search(lambda qq: refine.search(qq, K), q)
        rows.append({"method": "raw FAISS + RFlat", **base, "params": f"nprobe={nprobe}, k_factor={rerank / K:g}",
                     "qps": qps, "recall": _recall(labels, truth)})
    for r in rows:
        r["peak_rss"] = _status("VmHWM")
    rows[0]["ram_index_rss"] = rss_index
    rows[0]["ram_bytes_per_cell"] = round(len(faiss.serialize_index(index)) / src.n_cells, 1)
    if len(rows) > 1:
        rows[1]["ram_bytes_per_cell"] = round(rows[0]["ram_bytes_per_cell"] + 4 * src.dim, 1)
    return {"rows": rows}


def phase_hnsw(work: str, threads: int, m: int, ef_construction: int) -> dict[str, Any]:
    import hnswlib

    work_p = Path(work)
    q = np.load(work_p / "queries.npy")
    truth = np.load(work_p / "truth.npy")
    n, d = np.load(work_p / "vectors.npy", mmap_mode="r").shape
    import scatlas.index.source  # noqa: F401 - imported by _chunks: keep its memory out of the index's
    rss0 = _status("VmRSS")
    index = hnswlib.Index(space="ip", dim=d)
    index.init_index(max_elements=n, M=m, ef_construction=ef_construction, random_seed=0)
    index.set_num_threads(threads)
    t0 = time.perf_counter()
    for ids, x in _chunks(work_p / "vectors.npy"):
        index.add_items(x, ids)
    add_s = time.perf_counter() - t0
    ram = _status("VmRSS") - rss0
    tried = []
    for ef in (32, 48, 64, 96, 128, 192, 256, 384, 512, 768):
        index.set_ef(ef)
        (labels, _), qps = _timed_search(lambda qq: index.knn_query(qq, k=K), q, repeats=1)
        rec = _recall(labels.astype(np.int64), truth)
        tried.append({"ef": ef, "recall": rec, "qps": qps})
        if rec >= 0.95:
            break
    best = tried[-1]
    return {"method": f"hnswlib M={m}", "params": f"ef={best['ef']} (efC={ef_construction})",
            "add_cells_per_s": round(n / add_s, 1), "qps": best["qps"], "recall": best["recall"],
            "ef_tried": tried, "peak_rss": _status("VmHWM"), "ram_bytes_per_cell": round(ram / n, 1)}


def _in_child(fn: Any, *args: Any) -> Any:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


# -- rendering ----------------------------------------------------------------------------------------------------
def _gib(b: float | None) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float | int):
        return f"{v:,.{nd}f}"
    return str(v)


def render(runs: list[dict[str, Any]]) -> str:
    head = ("| run: N x d (--factory) | method | factory | search params | build cells/s (total) | add cells/s | "
            "train s | QPS | recall@30 | peak RSS GiB | disk B/cell | RAM B/cell |")
    lines = [head, "|" + "---|" * 12]
    for run in runs:
        name = f"{run['n']:,} x {run['d']} ({run['factory']})"
        for r in run["results"]:
            lines.append("| " + " | ".join([
                name, r["method"], r.get("factory", "-"), r.get("params", "-"),
                _fmt(r.get("build_cells_per_s")), _fmt(r.get("add_cells_per_s")), _fmt(r.get("train_s"), 1),
                _fmt(r.get("qps")), _fmt(r.get("recall"), 3), _gib(r.get("peak_rss")),
                _fmt(r.get("disk_bytes_per_cell")), _fmt(r.get("ram_bytes_per_cell")),
            ]) + " |")
    cmds = [re.sub(r" --json-out \S+", "", run["command"]) for run in runs]
    lines += ["", "Commands (one per run; a rerun replaces the run with the same N, d and --factory):", "", "```"]
    lines += cmds + ["```", ""]
    lines += [f"* {run['n']:,} x {run['d']} ({run['factory']}): {run['date']}, {run['machine']}, {run['threads']} "
              f"threads, load average {run['load_at_start']} at start" for run in runs]
    return "\n".join(lines)


def _read_runs(text: str) -> list[dict[str, Any]]:
    m = DATA_RE.search(text)
    return json.loads(m.group(1)) if m else []


def write_docs(runs: list[dict[str, Any]], docs: Path) -> None:
    block = f"{START}\n<!-- bench_index:data {json.dumps(runs)} -->\n\n{render(runs)}\n{END}"
    write_block(docs, START, END, block, heading="Index")


def _prepare_data(work: Path, n: int, d: int, clusters: int, queries: int) -> Path:
    """The data directory of (n, d, clusters): the vectors (generated once) and fresh queries."""
    from scatlas.atlas.synthetic import SyntheticEmbeddingConfig, sample_queries, write_embedding_npy

    cfg = SyntheticEmbeddingConfig(n=n, d=d, n_clusters=clusters, seed=0, chunk_size=CHUNK)
    data = work / f"n{n}-d{d}-c{clusters}"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "vectors.npy").exists():
        t0 = time.perf_counter()
        write_embedding_npy(cfg, data, overwrite=True)
        print(f"generated {n} x {d} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    np.save(data / "queries.npy", sample_queries(cfg, queries, seed=1)[0])
    return data


def _argv_without_json() -> list[str]:
    """This command's arguments without ``--json-out`` (where its JSON went is not part of how to reproduce it)."""
    argv = sys.argv[2:]
    if "--json-out" in argv:
        i = argv.index("--json-out")
        argv = argv[:i] + argv[i + 2:]
    return argv


# -- CLI ------------------------------------------------------------------------------------------------------------
@click.group()
def cli() -> None:
    """Index benchmarks."""


def data_options(factory: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of ``run`` and ``profile`` that say what is measured: the data (N, d, clusters, queries), the
    factory (default ``factory``), shard size and threads."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed((
            click.option("--n", "n", type=int, default=200_000, show_default=True, help="atlas cells"),
            click.option("--d", "d", type=int, default=128, show_default=True, help="dimensions"),
            click.option("--factory", default=factory, show_default=True),
            click.option("--shard-size", type=int, default=1_000_000, show_default=True),
            click.option("--queries", type=int, default=2000, show_default=True),
            click.option("--clusters", type=int, default=500, show_default=True),
            click.option("--threads", type=int, default=None, help="default: all cores"),
        )):
            f = option(f)
        return f

    return wrap


@cli.command()
@data_options(factory="auto")
@click.option("--work", type=click.Path(path_type=Path), default=ROOT / "bench_out" / "index", show_default=True)
@click.option("--methods", default="exact,ours,raw,hnsw16,hnsw32", show_default=True)
@click.option("--ef-construction", type=int, default=100, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@click.option("--docs/--no-docs", "write_doc", default=True, show_default=True)
@click.option("--keep/--no-keep", default=False, help="keep the built index directories")
def run(n, d, factory, shard_size, queries, clusters, threads, work, methods, ef_construction, json_out, write_doc,
        keep) -> None:
    """Benchmark one (N, d)."""
    from scatlas.index.device import resolve_threads

    threads = resolve_threads(threads)
    wanted = methods.split(",")
    data = _prepare_data(work, n, d, clusters, queries)
    load = os.getloadavg()[0]
    results: list[dict[str, Any]] = []

    def note(r: dict[str, Any]) -> None:
        results.append(r)
        print(json.dumps(r), file=sys.stderr)

    note(_in_child(phase_exact, str(data), threads))
    ours = None
    if "ours" in wanted:
        ours = _in_child(phase_ours, str(data), threads, factory, shard_size)
        note(ours)
    if "raw" in wanted and ours is not None:
        for r in _in_child(phase_raw, str(data), threads, ours["factory"], ours["nprobe"], ours["rerank"])["rows"]:
            note(r)
    for m in (16, 32):
        if f"hnsw{m}" in wanted:
            note(_in_child(phase_hnsw, str(data), threads, m, ef_construction))
    if ours is not None and not keep:
        shutil.rmtree(ours["index_dir"], ignore_errors=True)
    cmd = "nice .venv/bin/python scripts/bench_index.py run " + " ".join(_argv_without_json())
    from scatlas.index.verify import verify_on_read_limit

    record = {"n": n, "d": d, "factory": factory, "queries": queries, "clusters": clusters, "threads": threads,
              "command": cmd.strip(), "load_at_start": round(load, 2),
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d %H:%M"), "results": results,
              # shards are SHA-256 checked once, on first read in a process, up to this many bytes (outside the
              # timed rounds, which follow warm-up searches)
              "verify_on_read_max_bytes": verify_on_read_limit()}
    payload = json.dumps(record, indent=2)
    print(payload)
    if json_out:
        json_out.write_text(payload)
    if write_doc:
        runs = [r for r in _read_runs(DOCS.read_text() if DOCS.exists() else "")
                if (r["n"], r["d"], r["factory"]) != (n, d, factory)]
        write_docs(sorted([*runs, record], key=lambda r: (r["d"], r["n"], r["factory"])), DOCS)


@cli.command()
@click.option("--n", "n", type=int, required=True, help="atlas cells")
@click.option("--d", "d", type=int, default=128, show_default=True)
@click.option("--factory", default="auto", show_default=True)
@click.option("--shard-size", type=int, default=1_000_000, show_default=True)
@click.option("--clusters", type=int, default=500, show_default=True)
@click.option("--queries", type=int, default=2000, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "bench_out" / "scale", show_default=True)
def scale(n, d, factory, shard_size, clusters, queries, threads, out) -> None:
    """Build our index only, streaming synthetic vectors (no vectors file): time, peak RSS, recall, QPS.

    Rerun the same command after an interruption to resume the build.
    """
    import logging

    from scatlas.atlas.synthetic import SyntheticEmbeddingConfig, sample_queries
    from scatlas.index import AtlasIndex, BuildConfig, build_from_source, index_info, synthetic_source

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = SyntheticEmbeddingConfig(n=n, d=d, n_clusters=clusters, seed=0, chunk_size=CHUNK)
    target = out / f"n{n}-d{d}"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    m = build_from_source(synthetic_source(cfg), target, BuildConfig(factory=factory, shard_size=shard_size,
                                                                    threads=threads, chunk_size=CHUNK))
    wall = time.perf_counter() - t0
    build_rss = _status("VmHWM")
    idx = AtlasIndex.open(target, threads=threads)
    q = sample_queries(cfg, queries, seed=1)[0]
    _, qps = _timed_search(lambda qq: idx.search(qq, k=K), q)
    record = {"n": n, "d": d, "factory": m.factory, "wall_s_this_run": round(wall, 1), "build": m.build,
              "recall": m.recall.recall, "nprobe": m.search.nprobe, "rerank": m.search.rerank, "qps": qps,
              "build_peak_rss": build_rss, "peak_rss": _status("VmHWM"), "info": index_info(target),
              "load_at_start": round(load, 2),
              "command": "nice .venv/bin/python scripts/bench_index.py scale " + " ".join(sys.argv[2:])}
    print(json.dumps(record, indent=2, default=str))
    (target.parent / f"n{n}-d{d}.json").write_text(json.dumps(record, indent=2, default=str))


@cli.command("add-ab")
@click.option("--n", "n", type=int, default=100_000, show_default=True)
@click.option("--d", "d", type=int, default=50, show_default=True)
@click.option("--factory", default=None, help="default: IVF1024,PQ{m} as auto would pick m")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=None)
def add_ab(n, d, factory, rounds, threads) -> None:
    """Interleaved A/B of the add phase: raw FAISS add_with_ids vs our shard writer, same trained index.

    Alternating the two in one process cancels most of the noise other jobs on the machine add to wall times.
    """
    import tempfile

    import faiss

    from scatlas.atlas.synthetic import SyntheticEmbeddingConfig, vectors_for_range
    from scatlas.index.device import set_faiss_threads
    from scatlas.index.factory import Assigner, choose_pq_m, make_index
    from scatlas.index.shard import write_shard
    from scatlas.index.source import ArrayVectorSource, ShardSpec

    threads = set_faiss_threads(threads)
    factory = factory or f"IVF1024,PQ{choose_pq_m(d)}"
    x = vectors_for_range(SyntheticEmbeddingConfig(n=n, d=d, n_clusters=500), 0, n)[0]
    trained = make_index(factory, d, 0)
    trained.train(x[: min(n, 65_536)])
    times: dict[str, list[tuple[float, float]]] = {"raw": [], "ours": []}
    for _ in range(rounds):
        raw = faiss.clone_index(trained)
        w, c = time.perf_counter(), time.process_time()
        for a in range(0, n, CHUNK):
            raw.add_with_ids(x[a:a + CHUNK], np.arange(a, min(a + CHUNK, n)))
        times["raw"].append((time.perf_counter() - w, time.process_time() - c))
        with tempfile.TemporaryDirectory() as tmp:
            w, c = time.perf_counter(), time.process_time()
            write_shard(ArrayVectorSource(x), ShardSpec(0, 0, n, n), Path(tmp), trained, Assigner(trained, "cpu"),
                        CHUNK)
            times["ours"].append((time.perf_counter() - w, time.process_time() - c))
    med = {k: (float(np.median([t[0] for t in v])), float(np.median([t[1] for t in v]))) for k, v in times.items()}
    print(json.dumps({
        "n": n, "d": d, "factory": factory, "threads": threads, "rounds": rounds,
        "raw_add_cells_per_s": round(n / med["raw"][0], 1), "ours_add_cells_per_s": round(n / med["ours"][0], 1),
        "ours_over_raw_wall": round(med["raw"][0] / med["ours"][0], 3),
        "ours_over_raw_cpu": round(med["raw"][1] / med["ours"][1], 3), "times_s_wall_cpu": times,
        "load_at_start": round(os.getloadavg()[0], 2),
    }, indent=2))


@cli.command("rerank-ab")
@click.option("--index", "index_dir", type=click.Path(path_type=Path, exists=True), required=True,
              help="a built single-shard index (e.g. from `run --keep`)")
@click.option("--queries", "queries_file", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--n-queries", type=int, default=2000, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=None)
def rerank_ab(index_dir, queries_file, n_queries, rounds, threads) -> None:
    """Interleaved A/B of exact re-ranking alone: the numpy reference vs ``ShardSearcher.rerank``, on the
    candidates the index's own default search parameters produce, and the whole ``AtlasIndex.search``."""
    from bench_search_profile import rerank_ab as run_rerank_ab

    print(json.dumps(run_rerank_ab(index_dir, queries_file, n_queries, rounds, threads), indent=2))


@cli.command()
@data_options(factory="IVF2048,PQ64")
@click.option("--rounds", type=int, default=5, show_default=True, help="interleaved rounds (medians)")
@click.option("--reranks", default="", help="also time our search at these re-rank depths (comma-separated)")
@click.option("--points", default="", help="also time our search at these NPROBE:RERANK pairs (comma-separated), "
              "to compare with raw + RFlat at equal recall")
@click.option("--work", type=click.Path(path_type=Path), default=ROOT / "bench_out" / "index", show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@click.option("--docs/--no-docs", "write_doc", default=True, show_default=True)
def profile(n, d, factory, shard_size, queries, clusters, threads, rounds, reranks, points, work, json_out,
            write_doc) -> None:
    """Stage-by-stage profile of our search against raw FAISS (see scripts/bench_search_profile.py); the data,
    our index and the raw index are made once in ``--work`` and reused."""
    from bench_search_profile import profile as run_profile
    from bench_search_profile import write_docs as write_profile_docs

    from scatlas.index.device import resolve_threads

    threads = resolve_threads(threads)
    data = _prepare_data(work, n, d, clusters, queries)
    truth = data / "truth.npy"
    if not truth.exists() or np.load(truth, mmap_mode="r").shape[0] != queries:
        _in_child(phase_exact, str(data), threads)  # writes the ground truth of these queries
    extra = [int(r) for r in reranks.split(",") if r]
    try:
        pairs = [(int(a), int(b)) for a, b in (p.split(":") for p in points.split(",") if p)]
    except ValueError as exc:
        raise click.BadParameter("expected NPROBE:RERANK pairs, e.g. 20:60,24:60", param_hint="--points") from exc
    record = {"n": n, "d": d, "factory": factory, "shard_size": shard_size, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
              "command": "nice .venv/bin/python scripts/bench_index.py profile " + " ".join(_argv_without_json()),
              "profile": run_profile(data, factory, shard_size, threads, rounds, extra, pairs)}
    print(json.dumps(record, indent=2))
    if json_out:
        json_out.write_text(json.dumps(record, indent=2))
    if write_doc:
        write_profile_docs(record, DOCS)


@cli.command()
def table() -> None:
    """Re-render the table in docs/benchmarks.md from its data block."""
    write_docs(_read_runs(DOCS.read_text()), DOCS)


if __name__ == "__main__":
    cli()
