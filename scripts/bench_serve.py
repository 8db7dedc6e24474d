"""`scatlas serve` under concurrent clients: requests/s and latency of ``GET /api/index``, small ``search`` jobs
and ``annotate`` jobs per minute, and the server's peak memory.

    nice .venv/bin/python scripts/bench_serve.py --clients 1,8 --seconds 20 --write-docs

One server (``python -m scatlas serve``, a subprocess with a token, ``--workers`` job threads) on a free port of
127.0.0.1, and for each number of ``--clients``, that many client threads in this process (httpx, one keep-alive
connection each) that, for ``--seconds`` per phase and at most ``--max-requests`` requests per phase, do:

* ``index``: ``GET /api/index`` in a loop (latency of each request);
* ``search``: ``POST /api/search`` with a small query (``--search-cells`` cells, k=10), then poll the job (every
  100 ms) until it is done and fetch ``hits.csv`` (latency: upload to file in hand);
* ``annotate``: the same with ``POST /api/annotate`` of ``--annotate-cells`` cells and ``predictions.csv``.

The atlas is synthetic (``--cells`` cells in three datasets, the fourth dataset gives the queries), built once into
``--work`` with the defaults (label heads, reference map) and reused; ``--index``/``--query`` take others. Peak
RSS is the server process's VmHWM (its resident-memory high-water mark, /proc) at the end. Only 127.0.0.1 is
contacted; every loop stops at its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-" + "x" * 24
POLL_S = 0.1


def build(work: Path, cells: int) -> tuple[Path, Path]:
    """A synthetic atlas of ``cells`` cells (3 datasets) and its index in ``work``; the 4th dataset as query."""
    from scatlas.atlas import ingest
    from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
    from scatlas.index import build_index

    index = work / f"index-{cells}"
    files = sorted((work / f"h5ad-{cells}").glob("*.h5ad"))
    if (index / "manifest.json").is_file() and len(files) == 4:
        return index, files[3]
    cfg = SyntheticAtlasConfig(n_cells=int(cells * 4 / 3), n_genes=2000, n_datasets=4, n_donors=2, seed=11,
                               non_primary_fraction=0.0)
    files = write_h5ad_datasets(cfg, work / f"h5ad-{cells}", overwrite=True)
    shutil.rmtree(work / f"atlas-{cells}", ignore_errors=True)  # an earlier, interrupted run's
    ingest(files[:3], work / f"atlas-{cells}", progress=False, mode="write")
    build_index(work / f"atlas-{cells}", index, progress=False, overwrite=True)
    return index, files[3]


def subset(query: Path, n: int, out: Path) -> Path:
    import anndata

    adata = anndata.read_h5ad(query)
    rows = np.random.default_rng(0).choice(adata.n_obs, size=min(n, adata.n_obs), replace=False)
    adata[np.sort(rows)].copy().write_h5ad(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Phase:
    """One phase: ``clients`` threads call ``step(client) -> None`` until the deadline or the request cap."""

    def __init__(self, name: str, step: Callable[[Any], None], clients: int, seconds: float, max_requests: int,
                 url: str) -> None:
        self.name, self.step, self.clients = name, step, clients
        self.seconds, self.max_requests, self.url = seconds, max_requests, url
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _worker(self, deadline: float) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=300, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            while time.monotonic() < deadline:
                with self._lock:
                    if len(self.latencies) + len(self.errors) >= self.max_requests:
                        return
                t0 = time.perf_counter()
                try:
                    self.step(client)
                except Exception as exc:  # counted, shown in the table
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                with self._lock:
                    self.latencies.append(time.perf_counter() - t0)

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = t0 + self.seconds
        threads = [threading.Thread(target=self._worker, args=(deadline,)) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        lat = np.asarray(self.latencies) * 1000
        return {
            "phase": self.name, "clients": self.clients, "completed": len(lat), "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None, "wall_s": round(wall, 2),
            "per_s": round(len(lat) / wall, 2), "per_min": round(60 * len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        }


def job_step(route: str, query: Path, data: dict[str, str], result_file: str) -> Callable[[Any], None]:
    body = query.read_bytes()

    def step(client: Any) -> None:
        r = client.post(route, files={"file": (query.name, body)}, data=data)
        if r.status_code != 202:
            raise RuntimeError(f"{route}: {r.status_code} {r.text[:120]}")
        job = r.json()["job"]
        while True:
            state = client.get(f"/api/jobs/{job}").json()
            if state["status"] == "done":
                break
            if state["status"] == "failed":
                raise RuntimeError(f"job failed: {state['error']}")
            time.sleep(POLL_S)
        if client.get(f"/api/jobs/{job}/{result_file}").status_code != 200:
            raise RuntimeError(f"no {result_file}")

    return step


def index_step(client: Any) -> None:
    r = client.get("/api/index")
    if r.status_code != 200:
        raise RuntimeError(f"/api/index: {r.status_code}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8", help="concurrent client threads, one run per number (each <= 64)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase (at most 300)")
    ap.add_argument("--max-requests", type=int, default=100_000, help="cap on the requests of one phase")
    ap.add_argument("--workers", type=int, default=2, help="the server's job threads (--workers of serve)")
    ap.add_argument("--cells", type=int, default=10_000, help="atlas cells of the synthetic index")
    ap.add_argument("--search-cells", type=int, default=20, help="cells of each search query")
    ap.add_argument("--annotate-cells", type=int, default=500, help="cells of each annotate query")
    ap.add_argument("--index", type=Path, default=None, help="an index to serve instead of the synthetic one")
    ap.add_argument("--query", type=Path, default=None, help="with --index: the .h5ad the queries are drawn from")
    ap.add_argument("--work", type=Path, default=REPO / "bench_out" / "serve")
    ap.add_argument("--phases", default="index,search,annotate")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    clients = [int(c) for c in str(args.clients).split(",")]
    if not all(1 <= c <= 64 for c in clients) or len(clients) > 4 or not 0 < args.seconds <= 300:
        ap.error("--clients must be up to 4 numbers of 1-64 and --seconds 0-300")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.index is not None:
        if args.query is None:
            ap.error("--index needs --query")
        index, query = args.index, args.query
    else:
        index, query = build(args.work, args.cells)
    small = subset(query, args.search_cells, args.work / "search_query.h5ad")
    medium = subset(query, args.annotate_cells, args.work / "annotate_query.h5ad")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.work / "serve.log"
    env = {**os.environ, "SCATLAS_TOKEN": TOKEN}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scatlas", "-q", "serve", "--index", str(index), "--port",
                                 str(port), "--workers", str(args.workers)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    import httpx

    results: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 180:
                raise SystemExit("the server did not start in 180 s")
            time.sleep(0.2)
        startup_s = time.monotonic() - t0
        rss_ready = vm_kib(proc.pid, "VmRSS")
        steps = {
            "index": ("GET /api/index", index_step),
            "search": (f"search job ({args.search_cells} cells, k=10)",
                       job_step("/api/search", small, {"k": "10"}, "hits.csv")),
            "annotate": (f"annotate job ({args.annotate_cells} cells)",
                         job_step("/api/annotate", medium, {}, "predictions.csv")),
        }
        for n in clients:
            for name in args.phases.split(","):
                label, step = steps[name]
                res = Phase(label, step, n, args.seconds, args.max_requests, url).run()
                print(json.dumps(res), flush=True)
                results.append(res)
        peak = vm_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    from scatlas.index import index_info

    info = index_info(index)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}", "load_at_start": round(os.getloadavg()[0], 2), "atlas_cells": info["cells"],
        "factory": info["factory"], "clients": clients, "workers": args.workers, "seconds": args.seconds,
        "startup_s": round(startup_s, 1), "rss_ready_mib": round(rss_ready / 1024, 1) if rss_ready else None,
        "peak_rss_mib": round(peak / 1024, 1) if peak else None, "results": results,
    }
    table = ["| what | clients | completed | per s | per min | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r['phase']} | {r['clients']} | {r['completed']:,} | {r['per_s']:,} | {r['per_min']:,} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    table.append("")
    table.append(f"Server: {meta['atlas_cells']:,}-cell index ({meta['factory']}), {args.workers} job threads, "
                 f"ready in {meta['startup_s']} s; RSS {meta['rss_ready_mib']} MiB when ready, peak "
                 f"{meta['peak_rss_mib']} MiB. {meta['machine']}, load {meta['load_at_start']} at the start.")
    text = "\n".join(table)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(meta, indent=2))
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_block import write_bench_section

        write_bench_section("bench_serve", "bench_serve.py", argv if argv is not None else sys.argv[1:], DOC_TEXT,
                            text + f"\n<!-- bench_serve:data {json.dumps(meta)} -->", "Serving (scatlas serve)")
    return 0


DOC_TEXT = (
    "One `scatlas serve` process and N client threads on the same 2-core machine, over 127.0.0.1 with a token. "
    "*GET /api/index*: one request; *search job* and *annotate job*: upload, poll every 100 ms until done, download "
    "the result (hits.csv / predictions.csv), so their latency is a whole job's and *per min* is jobs finished per "
    "minute. Jobs run on the server's job threads (the rest wait in its queue): with 2 cores, job throughput is "
    "bound by the cores, and the latency of a job grows with the clients queued ahead of it."
)


if __name__ == "__main__":
    raise SystemExit(main())
