"""Stage 2's read rate of scattered candidates on a synthetic atlas store, extrapolated to a 36M-cell atlas.

    nice .venv/bin/python scripts/bench_stage2.py [--cells 2000000] [--datasets 32] [--repeat 8] [--genes 20000]
        [--umis 1000] [--fraction 0.005] [--hot-datasets 3] [--work bench_out/stage2] [--keep] [--reuse]
        [--profile] [--no-docs]

1. A synthetic atlas store of ``--cells`` cells in ``--datasets`` datasets of raw counts over ``--genes`` genes
   (``--umis`` median UMIs per cell: about 1,000 stored values per cell at 1,000 UMIs over 20,000 genes), written
   by ``atlas.synthetic`` to .h5ad files and ingested with ``scatlas.atlas.ingest``. The generator draws dense
   negative-binomial counts over every gene (about 500 cells/s on this machine at 20,000 genes), so it draws
   ``cells / repeat`` cells in ``datasets / repeat`` datasets and each file is ingested ``--repeat`` times under
   its own dataset ids: the store holds ``--cells`` rows written the normal way (its size, tiles and fragments
   are those of that many cells; only the values repeat). The disk is checked before (free space, and the store's
   estimated size against ``--max-store-gb``) and again after the first dataset (measured bytes per cell).
2. The index's embedder as stage 2 uses it: ``pca`` (2,000 HVGs) fitted on 20,000 sampled cells.
3. Candidate sets of ``--fraction`` of the cells: (a) ``uniform``: scattered uniformly over the atlas; (b)
   ``concentrated``: uniformly within ``--hot-datasets`` datasets (as real hits are). Each set is read the way
   stage 2 reads it (:mod:`query.hunt.sweep_stage2`): first the gene statistics of every dataset holding
   candidates (:func:`query.hunt.gene_reads.dataset_gene_stats`, 1,000 cells each), then chunks of 5,000 candidates,
   each read, turned into gene features and scored by :func:`query.hunt.stage2_tasks.chunk_scores` (the body of a
   stage-2 task; a random stage 2 of the embedder's genes). Each measurement runs in a fresh process (its peak
   RSS is its own): ``cold`` after dropping the store's files from the page cache (``posix_fadvise(DONTNEED)``;
   the host of this VM may still cache), then ``warm`` (the same reads again).
4. Extrapolation to 36M cells (180k candidates at 0.5%) with the assumptions written next to it, the two-stage
   sweep's total (stage 1's figure quoted from docs/benchmarks.md), and a block in docs/benchmarks.md between
   ``<!-- bench_stage2:start -->`` and ``<!-- bench_stage2:end -->`` (right after "## Hunt: two stages").

The store is deleted at the end unless ``--keep``; ``--reuse`` measures a store kept by an earlier run with the
same sizes. ``--profile`` adds a cProfile of the cold uniform read (where the time goes).
"""

from __future__ import annotations

import cProfile
import io
import json
import logging
import multiprocessing as mp
import os
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from docs_block import write_block

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_stage2:start -->", "<!-- bench_stage2:end -->"
AFTER_SECTION = "## Hunt: two stages"
ATLAS_36M = 36_000_000
FIT_SAMPLE = 20_000
BYTES_PER_VALUE_GUESS = 4.0
"""Store bytes per stored value assumed before the first dataset is measured (about twice the 1.9 measured on these
counts: X's coordinates and values compressed, plus obs)."""
STAGE1_36M = [
    ("d=128", 2.4, 'section "Scale run: 36,000,000 cells x 128 dims", row "sweep: first / second read": the first '
     "sweep's wall time, 0.7 s of it scoring"),
    ("d=1280", 6.0, 'section "Sweep", column "36M cells, cold-ish": 92 GB of float16 vectors at the cold-ish rate'),
]
"""Stage 1's 36M-cell figures in docs/benchmarks.md (seconds), quoted: (what, seconds, where)."""

logger = logging.getLogger("bench_stage2")


# -- the store ----------------------------------------------------------------------------------------------------
def _config(cells: int, datasets: int, repeat: int, genes: int, umis: float) -> Any:
    from scatlas.atlas.synthetic import SyntheticAtlasConfig

    return SyntheticAtlasConfig(n_cells=cells // repeat, n_genes=genes, n_datasets=datasets // repeat, seed=0,
                                median_umis=umis, non_primary_fraction=0.0)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_store(store: Path, cells: int, datasets: int, repeat: int, genes: int, umis: float,
                max_store_gb: float) -> dict[str, Any]:
    """Write the synthetic store (see the module docstring); its sizes and timings."""
    from scatlas.atlas import ingest
    from scatlas.atlas.synthetic import write_h5ad_datasets

    if cells % repeat or datasets % repeat:
        raise click.UsageError("--cells and --datasets must be multiples of --repeat")
    work = store.parent
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    guess = cells * umis * BYTES_PER_VALUE_GUESS
    h5ad_guess = cells // repeat * umis * 8
    logger.info("disk: %.1f GB free; store estimated at %.1f GB, .h5ad files %.1f GB", free / 1e9, guess / 1e9,
                h5ad_guess / 1e9)
    if guess > max_store_gb * 1e9 or guess + h5ad_guess > 0.8 * free:
        raise click.ClickException(f"the store would take about {guess / 1e9:.1f} GB (limit {max_store_gb} GB, "
                                   f"{free / 1e9:.1f} GB free): lower --cells or --umis")
    h5ad = work / "h5ad"
    shutil.rmtree(h5ad, ignore_errors=True)
    t0 = time.perf_counter()
    files = write_h5ad_datasets(_config(cells, datasets, repeat, genes, umis), h5ad)
    gen_s = time.perf_counter() - t0
    logger.info("generated %d .h5ad files (%d cells) in %.0f s", len(files), cells // repeat, gen_s)
    t1 = time.perf_counter()
    try:
        for r in range(repeat):
            for i, f in enumerate(files):
                ingest([f], store, dataset_id=f"{f.stem}-r{r}", progress=False)
                if r == 0 and i == 0:
                    per_cell = _du(store) / _n_cells(store)
                    logger.info("first dataset: %.0f bytes per cell in the store", per_cell)
                    if per_cell * cells > max_store_gb * 1e9 or per_cell * cells > 0.9 * (free - h5ad_guess):
                        raise click.ClickException(f"the store would take {per_cell * cells / 1e9:.1f} GB "
                                                   f"(limit {max_store_gb} GB): lower --cells or --umis")
            logger.info("ingested round %d of %d (%.0f s so far)", r + 1, repeat, time.perf_counter() - t1)
    finally:
        shutil.rmtree(h5ad, ignore_errors=True)
    return {"generate_s": gen_s, "generated_cells": cells // repeat, "ingest_s": time.perf_counter() - t1}


def _n_cells(store: Path) -> int:
    from scatlas.atlas.store import AtlasStore

    with AtlasStore.open(store) as s:
        return int(s.n_cells)


def store_facts(store: Path) -> dict[str, Any]:
    """Cells, datasets, stored values per cell, bytes on disk and X's tiling (TileDB schema) of the store."""
    import tiledbsoma

    from scatlas.atlas.store import MEASUREMENT, X_LAYER, AtlasStore

    with AtlasStore.open(store) as s:
        recs = s.cell_ranges_records()
        ids = s.sample_ids(2000, seed=1)
        nnz = sum(int(c.X.nnz) for c in s.read_cells(ids, with_X=True))
        with tiledbsoma.open(f"{s.experiment_uri}/ms/{MEASUREMENT}/X/{X_LAYER}") as X:
            cfg = X.schema_config_options()
            dims = json.loads(cfg.dims)
        return {"cells": int(s.n_cells), "datasets": len(recs), "values_per_cell": nnz / len(ids), "bytes": _du(store),
                "dataset_cells": [int(r.n_cells) for r in recs], "row_tile": int(dims["soma_dim_0"]["tile"]),
                "gene_tile": int(dims["soma_dim_1"]["tile"]), "tile_capacity": int(cfg.capacity)}


def fit_embedder(store: Path, out: Path) -> float:
    """Fit the pca embedder on a sample of the store and save it to ``out``; seconds."""
    from scatlas.atlas.embed import make_embedder
    from scatlas.atlas.store import AtlasStore

    t0 = time.perf_counter()
    with AtlasStore.open(store) as s:
        ids = s.sample_ids(FIT_SAMPLE, seed=0)
        emb = make_embedder("pca")
        emb.fit(lambda: s.read_cells(ids, with_X=True))
    shutil.rmtree(out, ignore_errors=True)
    emb.save(out)
    return time.perf_counter() - t0


# -- candidate sets -------------------------------------------------------------------------------------------------
def tiles_touched(ids: np.ndarray, row_tile: int, n_cells: int) -> float:
    """The share of X's row tiles (``row_tile`` rows each) holding at least one of ``ids``."""
    return len(np.unique(ids // row_tile)) / -(-n_cells // row_tile)


def candidate_sets(store: Path, fraction: float, hot: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``uniform`` and ``concentrated`` candidate ids (sorted), each ``fraction`` of the store's cells."""
    from scatlas.atlas.store import AtlasStore

    with AtlasStore.open(store) as s:
        recs, n = s.cell_ranges_records(), int(s.n_cells)
    k = max(1, round(fraction * n))
    rng = np.random.default_rng(seed)
    uniform = np.sort(rng.choice(n, size=k, replace=False))
    chosen = sorted(rng.choice(len(recs), size=min(hot, len(recs)), replace=False))
    pool = np.concatenate([np.arange(recs[i].start, recs[i].start + recs[i].n_cells) for i in chosen])
    concentrated = np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False))
    return {"uniform": uniform.astype(np.int64), "concentrated": concentrated.astype(np.int64)}


# -- one measurement, in a fresh process -------------------------------------------------------------------------
def _drop_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``: of this process image alone, unlike
    ``ru_maxrss``, which a spawned child inherits from its parent's size at the fork), MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(store: str, embedder_dir: str, ids: np.ndarray | None, mode: str, profile: bool, queue: Any) -> None:
    """Stage 2's reads of candidates ``ids``, as :mod:`query.hunt.sweep_stage2` does them (see the module
    docstring), or (``ids`` None) every cell of the store read in id order and turned into gene features (a full
    scan, for reference); puts a dict of timings, rates and memory on ``queue``."""
    from scatlas.atlas.embed import load_embedder
    from scatlas.atlas.store import AtlasStore
    from scatlas.query.hunt.calibration import Calibration
    from scatlas.query.hunt.gene_reads import dataset_gene_stats, iter_gene_features
    from scatlas.query.hunt.stage2 import BATCH_SAMPLE, GeneStage
    from scatlas.query.hunt.stage2_tasks import chunk_scores
    from scatlas.query.hunt.sweep_stage2 import DEFAULT_CHUNK, STATS_SEED, candidate_datasets

    if ids is None:
        embedder = load_embedder(embedder_dir)
        if mode == "cold":
            _drop_cache(Path(store))
        base_rss = _rss_mb()
        with AtlasStore.open(store) as s:
            t0 = time.perf_counter()
            n = sum(len(got) for got, _, _ in iter_gene_features(s, embedder, np.arange(s.n_cells), DEFAULT_CHUNK))
            read_s = time.perf_counter() - t0
        queue.put({"mode": mode, "candidates": n, "datasets": None, "stats_cells": 0, "stats_s": 0.0,
                   "stats_cells_per_s": float("nan"), "read_s": read_s, "cells_per_s": n / read_s, "total_s": read_s,
                   "peak_rss_mb": _rss_mb("VmHWM"), "base_rss_mb": base_rss,
                   "profile": ""})
        return

    embedder = load_embedder(embedder_dir)
    genes = embedder.gene_feature_names
    stage = GeneStage(weights=np.random.default_rng(0).normal(size=len(genes)), bias=0.0, threshold=0.0,
                      calibration=Calibration("platt"), gene_names=genes, stage1_cut=0.0, batch_standardized=True)
    if mode == "cold":
        _drop_cache(Path(store))
    base_rss = _rss_mb()
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    with AtlasStore.open(store) as s:
        t0 = time.perf_counter()
        datasets = candidate_datasets(s, ids)
        stats = {d: dataset_gene_stats(s, embedder, d, BATCH_SAMPLE, STATS_SEED, DEFAULT_CHUNK) for d in datasets}
        stats_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        n_scored = 0
        for a in range(0, len(ids), DEFAULT_CHUNK):
            chunk = ids[a : a + DEFAULT_CHUNK]
            n_scored += len(chunk_scores(s, embedder, stage, chunk, DEFAULT_CHUNK, stats))
        read_s = time.perf_counter() - t1
    if prof is not None:
        prof.disable()
    top, tiledb_share = "", float("nan")
    if prof is not None:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("tottime").print_stats(14)
        top = buf.getvalue()
        own = {f"{fn[0]}:{fn[2]}": row[2] for fn, row in st.stats.items()}  # type: ignore[attr-defined]
        tiledb_share = sum(v for k, v in own.items() if "pytiledbsoma" in k) / st.total_tt  # type: ignore[attr-defined]
    stats_cells = sum(int(v.n) for v in stats.values())
    queue.put({"mode": mode, "candidates": int(n_scored), "datasets": len(datasets), "stats_cells": stats_cells,
               "stats_s": stats_s, "stats_cells_per_s": stats_cells / stats_s, "read_s": read_s,
               "cells_per_s": n_scored / read_s, "total_s": stats_s + read_s,
               "peak_rss_mb": _rss_mb("VmHWM"), "base_rss_mb": base_rss,
               "profile": top, "tiledb_share": tiledb_share})


def run_measure(store: Path, embedder_dir: Path, ids: np.ndarray | None, mode: str, profile: bool) -> dict[str, Any]:
    """:func:`measure` in a fresh (spawned) process; its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=measure, args=(str(store), str(embedder_dir), ids, mode, profile, queue))
    p.start()
    got = queue.get()
    p.join()
    if p.exitcode:
        raise click.ClickException(f"the {mode} measurement failed (exit code {p.exitcode})")
    return got


# -- the report -----------------------------------------------------------------------------------------------------
def extrapolate(facts: dict[str, Any], results: dict[str, dict[str, Any]], fraction: float, hot: int) -> dict[str, Any]:
    """Stage 2 at 36M cells from the cold rates: candidates / read rate + datasets with candidates x 1,000 cells /
    statistics rate; datasets of the size measured here on average, the concentrated candidates in the same share
    of them as here."""
    mean_ds = facts["cells"] / facts["datasets"]
    n_ds = ATLAS_36M / mean_ds
    cand = fraction * ATLAS_36M
    out = {"candidates": cand, "datasets": n_ds, "mean_dataset_cells": mean_ds}
    scan = results.get("all cells/cold")
    if scan is not None:
        out["scan_s"] = ATLAS_36M / scan["cells_per_s"]
    for name, ds_with in (("uniform", n_ds), ("concentrated", n_ds * hot / facts["datasets"])):
        r = results[f"{name}/cold"]
        read = cand / r["cells_per_s"]
        stats = ds_with * 1000 / r["stats_cells_per_s"]
        out[name] = {"read_s": read, "stats_s": stats, "total_s": read + stats, "datasets_with_candidates": ds_with}
    return out


def _fmt_s(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:,.1f} min)" if s >= 60 else f"{s:.1f} s"


def doc_block(args: dict[str, Any], facts: dict[str, Any], built: dict[str, Any] | None, results: dict[str, Any],
              ext: dict[str, Any], load: dict[str, str], fit_s: float, flags: str = "", date: str = "") -> str:
    """The docs block: the command, the store, the measured table, the 36M extrapolation and the two-stage total
    (``args``: the sizes the run was given; ``flags``: its other options; ``date``: when it ran)."""
    cmd = "nice .venv/bin/python scripts/bench_stage2.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in args.items() if v is not None) + flags
    lines = [START, "## Hunt: stage 2 at scale (reading scattered candidates)", "",
             f"Command: `{cmd.strip()}` ({date or time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python "
             f"{sys.version.split()[0]}; the machine was shared with other jobs: load average {load['start']} at "
             f"the start, {load['measure']} before the measurements, {load['end']} at the end).", ""]
    sizes = facts["dataset_cells"]
    touched = facts["tiles_touched"]
    lines.append(
        f"Store: {facts['cells']:,} cells in {facts['datasets']} datasets ({min(sizes):,}-{max(sizes):,} cells), "
        f"{facts['values_per_cell']:,.0f} stored values per cell over {args['genes']:,} genes, "
        f"{facts['bytes'] / 1e9:.1f} GB on disk ({facts['bytes'] / facts['cells']:,.0f} bytes per cell), written by "
        "`atlas.synthetic` and `scatlas.atlas.ingest`" + (
            f" ({built['generated_cells']:,} cells generated in {built['generate_s']:,.0f} s, each dataset file "
            f"ingested {args['repeat']} times under its own dataset ids: {built['ingest_s']:,.0f} s of ingest)"
            if built else "") + f". Stage 2's embedder: `pca` (2,000 HVGs) fitted on {FIT_SAMPLE:,} cells "
        f"({fit_s:.0f} s). Candidates: {args['fraction']:.1%} of the cells, `uniform` over the atlas or "
        f"`concentrated` in {args['hot_datasets']} datasets. Each set is read as stage 2 reads it: the gene "
        "statistics of every dataset holding candidates (1,000 cells each), then chunks of 5,000 candidates read "
        "in id order, turned into gene features and scored (`query.hunt.stage2_tasks.chunk_scores`, one task's "
        "work); `all cells`: every cell read in id order and turned into gene features (`iter_gene_features`), "
        "for reference. Each row is a fresh process; `cold`: the store's files dropped from the page cache first "
        "(`posix_fadvise`; the VM's host may still cache them), `warm`: read again.")
    lines += ["", "| candidates | page cache | cells | datasets | statistics: cells, s, cells/s | candidates: s, "
              "cells/s | total s | peak RSS MB (at start) |", "|---|---|---:|---:|---|---|---:|---:|"]
    for key, r in results.items():
        name, mode = key.split("/")
        stats = (f"{r['stats_cells']:,}, {r['stats_s']:.1f}, {r['stats_cells_per_s']:,.0f}" if r["stats_cells"]
                 else "-")
        lines.append(f"| {name} | {mode} | {r['candidates']:,} | {r['datasets'] or 'all'} | {stats} | "
                     f"{r['read_s']:.1f}, {r['cells_per_s']:,.0f} | {r['total_s']:.1f} | {r['peak_rss_mb']:,.0f} "
                     f"({r['base_rss_mb']:,.0f}) |")
    u, c = ext["uniform"], ext["concentrated"]
    scan, uc = results.get("all cells/cold"), results["uniform/cold"]
    ratio = (f" (measured: the uniform candidates' reads took {uc['read_s'] / scan['read_s']:.0%} of the time of "
             f"reading every cell, their statistics {uc['stats_s'] / scan['read_s']:.0%})" if scan else "")
    lines += ["", (
        f"Why scattered reads cost what they do: X is a TileDB sparse array in {facts['row_tile']:,}-cell x "
        f"{facts['gene_tile']:,}-gene space tiles and data tiles of {facts['tile_capacity']:,} values (about "
        f"{facts['tile_capacity'] / (facts['values_per_cell'] / -(-args['genes'] // facts['gene_tile'])):,.0f} "
        "cells of one gene tile), and a read decompresses every data tile its cells fall in, whole. At "
        f"{args['fraction']:.1%}, {touched['uniform']:.0%} of the row tiles hold a uniform candidate "
        f"({touched['concentrated']:.0%} for the concentrated set), so reading uniform candidates decompresses "
        "about what reading every cell does, and so does the statistics' sample (1,000 of a dataset's cells touch "
        f"nearly all its tiles): stage 2 on uniform candidates reads the store twice{ratio}. The read path is not where "
        "the time goes (the cProfile below: TileDB-SOMA's reads hold "
        f"{results['uniform/cold'].get('tiledb_share', float('nan')):.0%} of it; reading in id order in larger "
        "batches cannot skip a tile a candidate is in)."), ""]
    lines += [f"**Extrapolated to {ATLAS_36M:,} cells** ({ext['candidates']:,.0f} candidates at "
              f"{args['fraction']:.1%}), from the cold rates, one process of this machine. Assumptions: at a fixed "
              "candidate share the tiles read grow with the store, so the candidates' time is their number over the "
              "cold rate measured here; the datasets average the "
              f"{ext['mean_dataset_cells']:,.0f} cells they have here ({ext['datasets']:,.0f} datasets at 36M), "
              "uniform candidates fall in all of them and concentrated ones in the same share of them as here "
              f"({c['datasets_with_candidates']:,.0f}), each costing its statistics at the rate measured here; the "
              "store's fragments (one per ingest chunk) grow with it and their count was not measured at 36M; a "
              f"36M-cell store (about {facts['bytes'] / facts['cells'] * ATLAS_36M / 1e9:,.0f} GB at these bytes "
              "per cell) does not fit the page cache, so the cold rate applies"
              + (f"; reading every cell would take {_fmt_s(ext['scan_s'])}" if "scan_s" in ext else "") + ".", "",
              "| candidates | statistics | candidates' reads | stage 2 |", "|---|---|---|---|",
              f"| uniform ({u['datasets_with_candidates']:,.0f} datasets hold candidates) | {_fmt_s(u['stats_s'])} | "
              f"{_fmt_s(u['read_s'])} | {_fmt_s(u['total_s'])} |",
              f"| concentrated ({c['datasets_with_candidates']:,.0f} datasets) | {_fmt_s(c['stats_s'])} | "
              f"{_fmt_s(c['read_s'])} | {_fmt_s(c['total_s'])} |", ""]
    lines += ["Two-stage sweep at 36M cells = stage 1 (quoted from this file) + stage 2 (above, uniform / "
              "concentrated candidates):", ""]
    for what, s1, where in STAGE1_36M:
        lines.append(f"* {what}: stage 1 {s1:.1f} s ({where}) + stage 2 {_fmt_s(u['total_s'])} / "
                     f"{_fmt_s(c['total_s'])} = **{_fmt_s(s1 + u['total_s'])} / {_fmt_s(s1 + c['total_s'])}**.")
    lines += ["", "Stage 2 is the two-stage sweep's time at this scale. On Ray its chunks run as tasks "
              "(`hunt sweep --executor ray`): N workers with their own cores, reading a store on shared storage, "
              "divide the candidates' reads by up to N; the driver still computes the statistics, in one process."]
    prof = results.get("uniform/cold", {}).get("profile")
    if prof:
        lines += ["", "cProfile of the cold uniform read (top functions by own time):", "", "```",
                  *[ln for ln in prof.strip().splitlines()[-18:] if ln.strip()], "```"]
    lines.append(END)
    return "\n".join(lines)


def write_docs(block: str) -> None:
    """Put the block into docs/benchmarks.md: where its markers are, else right after the two-stage section."""
    text = DOC.read_text()
    if START not in text:
        at = text.index(AFTER_SECTION)
        nxt = text.find("\n## ", at + len(AFTER_SECTION))
        nxt = len(text) if nxt < 0 else nxt + 1
        text = text[:nxt] + f"{START}\n{END}\n\n" + text[nxt:]
        tmp = DOC.with_name(f".{DOC.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, DOC)
    write_block(DOC, START, END, block)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@click.command()
@click.option("--cells", type=int, default=2_000_000, show_default=True)
@click.option("--datasets", type=int, default=32, show_default=True)
@click.option("--repeat", type=int, default=8, show_default=True, help="Ingests of each generated dataset file.")
@click.option("--genes", type=int, default=20_000, show_default=True)
@click.option("--umis", type=float, default=1_000, show_default=True, help="Median UMIs per cell.")
@click.option("--fraction", type=float, default=0.005, show_default=True, help="Candidates, as a share of the cells.")
@click.option("--hot-datasets", type=int, default=3, show_default=True)
@click.option("--max-store-gb", type=float, default=20.0, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "bench_out" / "stage2")
@click.option("--keep", is_flag=True, help="Keep the store (else deleted at the end).")
@click.option("--reuse", is_flag=True, help="Measure the store an earlier --keep run left (same sizes).")
@click.option("--profile", is_flag=True, help="cProfile the cold uniform read.")
@click.option("--docs/--no-docs", default=True, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--from-json", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Measure nothing: write the docs block of an earlier run's --json-out file.")
def main(cells: int, datasets: int, repeat: int, genes: int, umis: float, fraction: float, hot_datasets: int,
         max_store_gb: float, work: Path, keep: bool, reuse: bool, profile: bool, docs: bool,
         json_out: Path | None, from_json: Path | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if from_json is not None:
        run = json.loads(from_json.read_text())
        block = doc_block(run["args"], run["facts"], run["built"], run["results"],
                          extrapolate(run["facts"], run["results"], run["args"]["fraction"], run["args"]["hot_datasets"]),
                          run["load"], run["fit_s"], run.get("flags", ""), run["date"])
        print(block)
        if docs:
            write_docs(block)
        return
    load = {"start": _load()}
    store, emb_dir = work / "atlas", work / "embedder"
    built_file = work / "built.json"  # how the store was made, for a --reuse run's report
    if reuse:
        if not store.is_dir() or _n_cells(store) != cells:
            raise click.ClickException(f"--reuse: no store of {cells:,} cells at {store}")
        built = json.loads(built_file.read_text()) if built_file.is_file() else None
    else:
        if store.exists():
            shutil.rmtree(store)
        built = build_store(store, cells, datasets, repeat, genes, umis, max_store_gb)
        built_file.write_text(json.dumps(built))
    try:
        facts = store_facts(store)
        logger.info("store: %s", {k: v for k, v in facts.items() if k != "dataset_cells"})
        fit_s = fit_embedder(store, emb_dir)
        sets = candidate_sets(store, fraction, hot_datasets)
        load["measure"] = _load()
        results: dict[str, Any] = {"all cells/cold": run_measure(store, emb_dir, None, "cold", False)}
        logger.info("full scan: %s", results["all cells/cold"])
        facts["tiles_touched"] = {k: tiles_touched(v, facts["row_tile"], facts["cells"]) for k, v in sets.items()}
        for name, ids in sets.items():
            for mode in ("cold", "warm"):
                r = run_measure(store, emb_dir, ids, mode, profile and name == "uniform" and mode == "cold")
                results[f"{name}/{mode}"] = r
                logger.info("%s/%s: %s", name, mode, {k: round(v, 2) if isinstance(v, float) else v
                                                      for k, v in r.items() if k != "profile"})
                if r["profile"]:
                    print(r["profile"])
        load["end"] = _load()
        ext = extrapolate(facts, results, fraction, hot_datasets)
        args = {"cells": cells, "datasets": datasets, "repeat": repeat, "genes": genes, "umis": f"{umis:g}",
                "fraction": fraction, "hot_datasets": hot_datasets}
        cmd_flags = " --profile" if profile else ""
        date = time.strftime("%Y-%m-%d %H:%M")
        block = doc_block(args, facts, built, results, ext, load, fit_s, cmd_flags, date)
        print(block)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({"args": args, "flags": cmd_flags, "date": date, "fit_s": fit_s,
                                            "facts": facts, "built": built, "results": results,
                                            "extrapolation": ext, "load": load}, indent=1, default=float))
        if docs:
            write_docs(block)
    finally:
        if not keep:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(emb_dir, ignore_errors=True)
            built_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
