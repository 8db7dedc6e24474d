"""``--scale-cells``: annotate many synthetic cells in a fresh process and record its peak RSS."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any


def prepare_scale(work: Path, n_cells: int) -> Path:
    """A 20,000-cell synthetic atlas index and an ``n_cells``-cell synthetic query (another dataset)."""
    from scatlas.atlas import ingest
    from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets
    from scatlas.index import build_index

    ref_cfg = SyntheticAtlasConfig(
        n_cells=20_000, n_genes=3000, n_datasets=2, seed=1, non_primary_fraction=0.0
    )
    refs = write_h5ad_datasets(ref_cfg, work / "scale_ref", overwrite=True)
    shutil.rmtree(work / "scale_atlas", ignore_errors=True)
    ingest(refs, work / "scale_atlas", progress=False)
    build_index(work / "scale_atlas", work / "scale_index", overwrite=True)
    q_cfg = SyntheticAtlasConfig(
        n_cells=n_cells, n_genes=3000, n_datasets=1, seed=1, non_primary_fraction=0.0, dataset_prefix="scaleq"
    )
    (qpath,) = write_h5ad_datasets(q_cfg, work / "scale_query", overwrite=True)
    return qpath


def _rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def scale_worker(index_dir: Path, query: Path, batch_size: int) -> dict[str, Any]:
    """Annotate ``query`` with the defaults in this (fresh) process and measure annotate's own peak RSS."""
    from scatlas.index import AtlasIndex
    from scatlas.query.annotate import annotate

    idx = AtlasIndex.open(index_dir)
    rss0 = _rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    res = annotate(query, idx, label_keys=["cell_type"], batch_size=batch_size, progress=False)
    t = time.perf_counter() - t0
    n = res.report["query"]["n_cells"]
    return {
        "n_cells": n,
        "annotate_s": round(t, 2),
        "cells_per_second": round(n / t, 1),
        "rss_before_annotate_mb": rss0,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "peak_is_annotate_only": reset,
        "batch_size": batch_size,
        "atlas_cells": idx.n_cells,
        "unknown_rate": res.report["labels"]["cell_type"]["unknown_rate"],
        "neighbors_rows": len(res.neighbors),
        "timings": res.report["timings"],
    }
