"""Ingest throughput and peak memory at growing sizes: memory must stay bounded by the chunk size.

    python scripts/bench_ingest.py --cells 20000 --cells 200000 [--json-out bench_out/ingest.json]

Each size: one synthetic .h5ad (2000 genes, raw counts) is written, then ingested in a fresh subprocess whose peak
RSS (ru_maxrss) is recorded. Writes a Markdown table into docs/benchmarks.md between the bench_ingest markers.
"""

from __future__ import annotations

import json
import shutil
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

CHILD = """
import sys, time, resource, json
from scatlas.atlas import ingest
t = time.perf_counter()
r = ingest([sys.argv[1]], sys.argv[2], chunk_size=int(sys.argv[3]), progress=False)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "n_cells": r.n_cells_in_store,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_table(rows: list[dict], command: str) -> None:
    lines = [
        START,
        f"Command: `{command}`",
        "",
        "| cells | genes | nnz/cell | chunk | h5ad MB | ingest s | cells/s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_cells']:,} | {r['n_genes']} | {r['nnz_per_cell']:.0f} | {r['chunk_size']:,} | {r['h5ad_mb']:.0f} "
            f"| {r['seconds']:.1f} | {r['cells_per_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    lines.append(END)
    write_block(DOC, START, END, "\n".join(lines), heading="Ingest")


@click.command()
@click.option("--cells", "sizes", type=int, multiple=True, default=(20_000, 200_000), show_default=True)
@click.option("--genes", type=int, default=2000, show_default=True)
@click.option("--chunk-size", type=int, default=10_000, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-doc", is_flag=True, help="Do not update docs/benchmarks.md.")
def main(sizes: tuple[int, ...], genes: int, chunk_size: int, json_out: Path | None, no_doc: bool) -> None:
    from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets

    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        try:
            cfg = SyntheticAtlasConfig(n_cells=n, n_genes=genes, n_datasets=1, non_primary_fraction=0.0, seed=1)
            t = time.perf_counter()
            (path,) = write_h5ad_datasets(cfg, work / "h5ad")
            gen_s = time.perf_counter() - t
            import h5py

            with h5py.File(path) as f:
                nnz = f["X/data"].shape[0]
                n_obs = f["X/indptr"].shape[0] - 1
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(work / "atlas"), str(chunk_size)],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            row = {
                "n_cells": n_obs, "n_genes": genes, "nnz_per_cell": nnz / n_obs, "chunk_size": chunk_size,
                "h5ad_mb": path.stat().st_size / 2**20, "generate_s": gen_s, "seconds": res["seconds"],
                "cells_per_s": n_obs / res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2))
    if not no_doc:
        write_table(rows, "python scripts/bench_ingest.py " + " ".join(f"--cells {n}" for n in sizes))


if __name__ == "__main__":
    main()
