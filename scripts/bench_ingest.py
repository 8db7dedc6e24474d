"""Ingest throughput and peak memory: scatlas ingest beside ``tiledbsoma.io.from_anndata`` on the same .h5ad.

    python scripts/bench_ingest.py --cells 20000 --cells 200000 [--old-ingestion /tmp/old_ingestion.py]
        [--repeats 3] [--json-out bench_out/ingest.json] [--no-doc]

Each size: one synthetic .h5ad (``--genes`` genes, raw counts) is written, then ingested by each method in a fresh
subprocess whose wall time, CPU time (all threads) and peak RSS (ru_maxrss) are recorded:

* ``scatlas``: ``atlas.ingest`` as the CLI runs it (chunks read ahead in a thread, writes in TileDB's global order);
* ``scatlas, read-ahead 0``: the same, reading and writing in turn in one thread;
* ``scatlas, old``: ``ingest`` of another copy of ``atlas/ingestion.py`` (``--old-ingestion FILE``, e.g. the file
  before a change: ``git show REV:atlas/ingestion.py > /tmp/old_ingestion.py``), imported from that file against
  this checkout's other modules, so old and new are timed in the same run on the same machine load;
* ``tiledbsoma from_anndata``: ``anndata.read_h5ad`` + ``tiledbsoma.io.from_anndata`` (the whole AnnData in memory;
  the matrix's index arrays given one dtype first, without which from_anndata is quadratic in the cells here).

Methods take turns within each repeat (the order rotates), and the table shows the median of ``--repeats``. The
table, the command and a 36M-cell extrapolation go into docs/benchmarks.md between the bench_ingest markers.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from docs_block import write_block

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_ingest:start -->", "<!-- bench_ingest:end -->"
CENSUS_CELLS = 36_000_000

_REPORT = """
import json, resource
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": dt, "cpu_s": u.ru_utime + u.ru_stime, "peak_rss_mb": u.ru_maxrss / 1024}))
"""

SCATLAS = """
import sys, time
from scatlas.atlas.ingestion import ingest
t = time.perf_counter()
ingest([sys.argv[1]], sys.argv[2], chunk_size=int(sys.argv[3]), progress=False, read_ahead=int(sys.argv[4]))
dt = time.perf_counter() - t
""" + _REPORT

OLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("old_ingestion", sys.argv[4])
mod = importlib.util.module_from_spec(spec)
sys.modules["old_ingestion"] = mod
spec.loader.exec_module(mod)
t = time.perf_counter()
mod.ingest([sys.argv[1]], sys.argv[2], chunk_size=int(sys.argv[3]), progress=False)
dt = time.perf_counter() - t
""" + _REPORT

FROM_ANNDATA = """
import sys, time
t = time.perf_counter()
import anndata, tiledbsoma.io
ad = anndata.read_h5ad(sys.argv[1])
X = ad.X
if hasattr(X, "indptr") and X.indptr.dtype != X.indices.dtype:
    # int64 row pointers with int32 indices (as anndata reads this file) make each one-row slice of scipy 1.17
    # copy the whole index array, and from_anndata sizes its chunks row by row: quadratic (20k cells took 160 s)
    if int(X.indptr[-1]) < 2**31 - 1:
        X.indptr = X.indptr.astype(X.indices.dtype)
    else:
        X.indices = X.indices.astype(X.indptr.dtype)
tiledbsoma.io.from_anndata(sys.argv[2], ad, measurement_name="RNA")
dt = time.perf_counter() - t
""" + _REPORT


def _methods(old: Path | None, read_ahead_0: bool) -> list[tuple[str, str, list[str]]]:
    """(name, child program, extra arguments) of each method timed."""
    from scatlas.atlas.ingestion import DEFAULT_READ_AHEAD

    out = [("scatlas", SCATLAS, [str(DEFAULT_READ_AHEAD)])]
    if read_ahead_0:
        out.append(("scatlas, read-ahead 0", SCATLAS, ["0"]))
    if old is not None:
        out.append(("scatlas, old", OLD, [str(old.resolve())]))
    out.append(("tiledbsoma from_anndata", FROM_ANNDATA, []))
    return out


def _run(program: str, h5ad: Path, out: Path, chunk_size: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-c", program, str(h5ad), str(out), str(chunk_size), *extra],
        capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise click.ClickException(f"a benchmark child failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def write_table(rows: list[dict], command: str, meta: dict) -> None:
    lines = [
        START,
        f"Command: `{command}` ({meta['date']}; {meta['machine']}; load average at start {meta['load']:.2f}; "
        f"median of {meta['repeats']} run(s) per method, methods taking turns). Synthetic raw counts, "
        f"{meta['genes']} genes; each method in a fresh process; *CPU s*: user + system time of all its threads.",
        "",
        "| cells | nnz/cell | h5ad MB | method | wall s | cells/s | CPU s | peak RSS MB |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_cells']:,} | {r['nnz_per_cell']:.0f} | {r['h5ad_mb']:.0f} | {r['method']} | {r['seconds']:.1f} "
            f"| {r['cells_per_s']:,.0f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:,.0f} |"
        )
    lines.append("")
    largest = max(r["n_cells"] for r in rows)
    at = {r["method"]: r for r in rows if r["n_cells"] == largest}
    for n in sorted({r["n_cells"] for r in rows}):
        by = {r["method"]: r for r in rows if r["n_cells"] == n}
        parts = []
        if "scatlas, old" in by:
            parts.append(f"{by['scatlas']['cells_per_s'] / by['scatlas, old']['cells_per_s']:.1f}x the old ingest "
                         f"(with {by['scatlas, old']['cpu_s'] / by['scatlas']['cpu_s']:.1f}x less CPU time)")
        if "scatlas, read-ahead 0" in by:
            parts.append(f"{by['scatlas']['cells_per_s'] / by['scatlas, read-ahead 0']['cells_per_s']:.2f}x read-ahead 0")
        if "tiledbsoma from_anndata" in by:
            parts.append(f"{by['scatlas']['cells_per_s'] / by['tiledbsoma from_anndata']['cells_per_s']:.1f}x "
                         "from_anndata")
        if parts:
            lines.append(f"At {n:,} cells scatlas ingests at {', '.join(parts)}.")
    new = at["scatlas"]
    text = (f"Extrapolated from the {largest:,}-cell rows to a {CENSUS_CELLS // 1_000_000}M-cell atlas of such cells on "
            f"this machine: scatlas {_hours(CENSUS_CELLS / new['cells_per_s'])}")
    if "scatlas, old" in at:
        text += f" (the old ingest: {_hours(CENSUS_CELLS / at['scatlas, old']['cells_per_s'])})"
    if "tiledbsoma from_anndata" in at:
        fa = at["tiledbsoma from_anndata"]
        text += (f"; from_anndata {_hours(CENSUS_CELLS / fa['cells_per_s'])} of compute, but it holds a whole "
                 f"AnnData in memory ({fa['peak_rss_mb']:,.0f} MB at {largest:,} cells), so it can only take the "
                 "atlas file by file")
    text += (". Time grows with the stored values (nnz): cells with more values each (FACTS.md's Census-like test "
             "data: about 1,000, 2.5x these) take proportionally longer.")
    lines.append("")
    lines.append(text)
    lines.append(END)
    write_block(DOC, START, END, "\n".join(lines), heading="Ingest")


@click.command()
@click.option("--cells", "sizes", type=int, multiple=True, default=(20_000, 200_000), show_default=True)
@click.option("--genes", type=int, default=2000, show_default=True)
@click.option("--chunk-size", type=int, default=10_000, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of each method per size (the table shows the median).")
@click.option("--old-ingestion", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Also time `ingest` of this copy of atlas/ingestion.py (e.g. the file before a change).")
@click.option("--read-ahead-0", "read_ahead_0", is_flag=True, help="Also time scatlas with read-ahead 0.")
@click.option("--no-from-anndata", is_flag=True, help="Skip tiledbsoma.io.from_anndata.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-doc", is_flag=True, help="Do not update docs/benchmarks.md.")
@click.option("--from-json", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Measure nothing: write the docs block from an earlier --json-out file (and its command).")
def main(sizes: tuple[int, ...], genes: int, chunk_size: int, repeats: int, old_ingestion: Path | None,
         read_ahead_0: bool, no_from_anndata: bool, json_out: Path | None, no_doc: bool, from_json: Path | None) -> None:
    import h5py

    from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets

    if from_json is not None:
        saved = json.loads(from_json.read_text())
        write_table(saved["rows"], saved["meta"]["command"], saved["meta"])
        return

    methods = _methods(old_ingestion, read_ahead_0)
    if no_from_anndata:
        methods = [m for m in methods if m[0] != "tiledbsoma from_anndata"]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0], "repeats": repeats, "genes": genes,
            "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"}
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        try:
            cfg = SyntheticAtlasConfig(n_cells=n, n_genes=genes, n_datasets=1, non_primary_fraction=0.0, seed=1)
            (path,) = write_h5ad_datasets(cfg, work / "h5ad")
            with h5py.File(path) as f:
                nnz = f["X/data"].shape[0]
                n_obs = f["X/indptr"].shape[0] - 1
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in methods}
            for rep in range(repeats):
                turn = methods[rep % len(methods):] + methods[: rep % len(methods)]
                for name, program, extra in turn:
                    res = _run(program, path, work / "out", chunk_size, extra)
                    runs[name].append(res)
                    print(json.dumps({"n_cells": n_obs, "method": name, "repeat": rep, **res}), flush=True)
            for name, _, _ in methods:
                res = runs[name]
                seconds = statistics.median(r["seconds"] for r in res)
                rows.append({
                    "n_cells": n_obs, "n_genes": genes, "nnz_per_cell": nnz / n_obs, "chunk_size": chunk_size,
                    "h5ad_mb": path.stat().st_size / 2**20, "method": name, "seconds": seconds,
                    "cells_per_s": n_obs / seconds, "cpu_s": statistics.median(r["cpu_s"] for r in res),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in res), "runs": res,
                })
        finally:
            shutil.rmtree(work, ignore_errors=True)
    args = [f"--cells {n}" for n in sizes]
    if genes != 2000:
        args.append(f"--genes {genes}")
    if repeats != 1:
        args.append(f"--repeats {repeats}")
    if old_ingestion is not None:
        args.append(f"--old-ingestion {old_ingestion}")
    if read_ahead_0:
        args.append("--read-ahead-0")
    if no_from_anndata:
        args.append("--no-from-anndata")
    meta["command"] = "nice python scripts/bench_ingest.py " + " ".join(args)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if not no_doc:
        write_table(rows, meta["command"], meta)


if __name__ == "__main__":
    main()
