"""``build --update`` against a fresh build of the same data, in the same run, on a synthetic atlas.

    nice .venv/bin/python scripts/bench_update.py --cells 120000 [--factory auto] [--no-doc] [--json-out FILE]

A synthetic atlas of four datasets (``--cells`` in all, 2,000 genes) is written; the first three are ingested and
indexed with the defaults (PCA embedder, cell_type label heads, mapping calibration). Then, each timed:

1. *add*: the fourth dataset is ingested; ``update_index`` (new shards for it) vs ``build_index`` into a new
   directory over the same four datasets (what a user had to do before: refits the embedder, re-embeds all).
2. *remove*: the first dataset is removed from the store; ``update_index`` (id removal from its shards) vs a
   fresh build over the remaining three.
3. *relabel*: ``cell_type`` of one dataset is re-mapped from another column; ``update_index`` (metadata, heads,
   calibration; nothing re-embedded) vs a fresh build.

Both sides train label heads and the mapping calibration, as the defaults do. Writes a table into
docs/benchmarks.md between the ``bench_update`` markers unless ``--no-doc``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_bench_section  # noqa: E402


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t0, 2)


@click.command()
@click.option("--cells", type=int, default=120_000, show_default=True, help="Cells in the four datasets together.")
@click.option("--factory", default="auto", show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Working directory (default: a temporary one, removed at the end).")
@click.option("--doc/--no-doc", default=True, show_default=True, help="Write the table into docs/benchmarks.md.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--from-json", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Only write the docs table from an earlier run's --json-out.")
def main(cells: int, factory: str, work: Path | None, doc: bool, json_out: Path | None, from_json: Path | None) -> None:
    from scatlas.atlas import ingest
    from scatlas.atlas.lifecycle import relabel_dataset, remove_datasets
    from scatlas.atlas.synthetic import SyntheticAtlasConfig, synthesize
    from scatlas.index import build_index, update_index

    if from_json is not None:
        write_docs(json.loads(from_json.read_text()))
        return
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="bench_update_")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        files = synthesize(SyntheticAtlasConfig(n_cells=cells, n_genes=2000, n_datasets=4, seed=0), work / "h5ad",
                           overwrite=True)
        atlas, index = work / "atlas", work / "index"
        for path in (atlas, index):
            shutil.rmtree(path, ignore_errors=True)
        ingest(files[:3], atlas, progress=False)
        _, first_s = _timed(build_index, atlas, index, factory=factory, progress=False)
        ids = [Path(f).stem for f in files]

        def fresh(name: str) -> float:
            out = work / f"fresh_{name}"
            shutil.rmtree(out, ignore_errors=True)
            _, seconds = _timed(build_index, atlas, out, factory=factory, progress=False)
            shutil.rmtree(out, ignore_errors=True)
            return seconds

        ingest(files[3:], atlas, progress=False)
        rep, up_s = _timed(update_index, atlas, index, progress=False)
        rows.append({"change": f"add 1 dataset ({rep.changes.to_json()['cells_added']:,} cells)",
                     "update_s": up_s, "fresh_s": fresh("add"), "cells_after": rep.n_cells,
                     "drift": rep.drift.sentence() if rep.drift else None, "recall": rep.recall})
        gone = remove_datasets(atlas, [ids[0]])
        rep, up_s = _timed(update_index, atlas, index, progress=False)
        rows.append({"change": f"remove 1 dataset ({rep.changes.to_json()['cells_removed']:,} cells)",
                     "update_s": up_s, "fresh_s": fresh("remove"), "cells_after": rep.n_cells, "recall": rep.recall,
                     "removed": gone.to_json()})
        relabel_dataset(atlas, ids[1], {"donor_id": "cell_type"})  # changes values: only to time the update
        rep, up_s = _timed(update_index, atlas, index, progress=False)
        rows.append({"change": "relabel 1 dataset", "update_s": up_s, "fresh_s": fresh("relabel"),
                     "cells_after": rep.n_cells, "recall": rep.recall})
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    result = {"cells": cells, "factory": factory, "first_build_s": first_s, "cpus": os.cpu_count(), "rows": rows}
    text = json.dumps(result, indent=2)
    click.echo(text)
    if json_out:
        json_out.write_text(text)
    if doc:
        write_docs(result)


def write_docs(result: dict) -> None:
    """The table of ``result`` (this script's JSON) into docs/benchmarks.md."""
    rows, cells, factory, first_s = result["rows"], result["cells"], result["factory"], result["first_build_s"]
    table = "\n".join(
        ["| change | cells after | `build --update` s | fresh build s | update / fresh | recall@30 after |",
         "|---|---|---|---|---|---|"]
        + [f"| {r['change']} | {r['cells_after']:,} | {r['update_s']} | {r['fresh_s']} | "
           f"{r['update_s'] / r['fresh_s']:.2f} | {r['recall']:.4f} |" for r in rows]
    )
    args = [f"--cells {cells}"] + ([f"--factory {factory}"] if factory != "auto" else [])
    write_bench_section(
        "bench_update", "bench_update.py", args,
        f"A synthetic atlas of 4 datasets, {cells:,} cells, 2,000 genes ({result['cpus']} CPUs); the first 3 "
        f"indexed with the defaults ({first_s} s). Each change is applied with `build --update`, then a fresh "
        "build over the same datasets runs in a new directory in the same run (it refits the embedder and "
        "re-embeds every cell). Both train the cell_type label heads, the mapping calibration and the reference "
        "map. The first row's drift: " + str(rows[0].get("drift")), table, "Updating an index",
    )


if __name__ == "__main__":
    main()
