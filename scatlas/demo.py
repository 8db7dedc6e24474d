"""``scatlas demo``: the whole job on a small synthetic atlas, stage by stage, saying what each stage did."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import OutputError
from scatlas.atlas.outputs import (
    ATLAS_STORE,
    DEMO,
    INDEX,
    check_output_dir,
    claim_output_dir,
    is_kind,
    show,
    writing,
)

logger = logging.getLogger(__name__)

RARE_TYPE = "norn cell"
HELD_OUT_TYPE = "fibroblast"
RARE_FRACTION = 0.02
DEMO_HEAD_CELLS_PER_LABEL = 500
"""Training cells per label for the demo's cell_type head (the default, 2,000, would triple the demo's time)."""


@dataclass
class DemoResult:
    out_dir: Path
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, what it did)
    figures: dict[str, Any] = field(default_factory=dict)


def _fresh_demo_dir(out: Path) -> Path:
    """An empty demo directory at ``out``: created, or emptied when it holds an earlier demo (and only then)."""
    check_output_dir(out, DEMO, replace=True)
    if out.is_dir() and is_kind(out, DEMO):
        for sub, kind in (("atlas", ATLAS_STORE), ("index", INDEX)):  # what the demo made there, and nothing else
            check_output_dir(out / sub, kind, replace=True)
        h5ad = out / "h5ad"
        foreign = [p.name for p in h5ad.iterdir() if p.suffix != ".h5ad" or not p.is_file()] if h5ad.is_dir() else []
        if foreign:
            raise OutputError(f"{show(out / 'h5ad')} holds files the demo did not write (e.g. {show(foreign[0])}); "
                              "give a new directory")
        logger.info("removing the earlier demo in %s", out)
        with writing(out):
            shutil.rmtree(out)
    return claim_output_dir(out, DEMO)


def run_demo(
    out_dir: str | Path,
    *,
    n_cells: int = 12_000,
    n_datasets: int = 4,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = logger.info,
) -> DemoResult:
    """Synthetic atlas -> ingest -> build -> info -> annotate a held-out dataset -> hunt a rare population.

    The last dataset is kept out of the atlas and used as the query. It holds a cell type (``fibroblast``) that
    the atlas datasets lack, which annotation should call "unknown", and a rare population (``norn cell``, 2%
    of cells where present) that the hunt learns from the query's labelled cells and finds in the atlas.
    """
    from scatlas.atlas import ingest
    from scatlas.atlas.synthetic import (
        DEFAULT_CELL_TYPES,
        RareType,
        SyntheticAtlasConfig,
        write_h5ad_datasets,
    )
    from scatlas.index import build_index, index_info

    out = _fresh_demo_dir(Path(out_dir))
    result = DemoResult(out_dir=out)
    atlas_sets = tuple(range(n_datasets - 1))
    query_set = n_datasets - 1

    def stage(name: str, fn: Callable[[], str]) -> None:
        echo(f"== {name}")
        t = time.perf_counter()
        what = fn()
        dt = time.perf_counter() - t
        result.stages.append((name, dt, what))
        echo(f"   {what} [{dt:.1f} s]")

    config = SyntheticAtlasConfig(
        n_cells=n_cells, n_genes=2000, n_datasets=n_datasets, n_donors=3, cell_types=DEFAULT_CELL_TYPES,
        rare_types=(RareType(RARE_TYPE, RARE_FRACTION, datasets=(0, 1, query_set)),),
        absent_types={HELD_OUT_TYPE: atlas_sets}, seed=seed,
    )
    files: list[Path] = []

    def synth() -> str:
        files.extend(write_h5ad_datasets(config, out / "h5ad"))
        return f"wrote {len(files)} synthetic datasets ({n_cells} cells x 2000 genes) to {out / 'h5ad'}"

    stage("synthesise", synth)

    def do_ingest() -> str:
        rep = ingest(files[:-1], out / "atlas", mode="write", progress=progress)
        result.figures["atlas_cells"] = rep.n_cells_in_store
        return (f"ingested {len(rep.datasets)} datasets, {rep.n_cells_in_store} cells "
                f"({sum(d.n_skipped_non_primary for d in rep.datasets)} non-primary skipped) into {out / 'atlas'}")

    stage("ingest", do_ingest)

    def do_build() -> str:
        build_index(out / "atlas", out / "index", shard_size=max(1000, n_cells // 4),
                    heads_options={"max_cells_per_label": DEMO_HEAD_CELLS_PER_LABEL}, progress=progress)
        info = index_info(out / "index")
        result.figures["index"] = info
        return (f"index of {info['cells']} cells in {info['shards']} shards, {info['embedder']} {info['dim']}-d, "
                f"{info['factory']}, recall@30 {info['recall']:.3f}, {info['bytes_per_cell']:.0f} bytes/cell")

    stage("build", do_build)
    query_file = files[-1]

    def do_annotate() -> str:
        from scatlas.query import annotate

        res = annotate(query_file, out / "index", label_keys=["cell_type"], truth_key="cell_type", progress=progress)
        res.write(out / "query.annotated.h5ad", neighbors_parquet=out / "query.neighbors.parquet",
                  report_json=out / "query.report.json", confusion_png=out / "query.confusion.png")
        ev = res.report["evaluation"]["cell_type"]
        result.figures["annotate"] = ev
        onto, strict = ev["ontology"], ev["with_abstention"]
        absent = res.report["labels"]["cell_type"]
        levels = ", ".join(f"{n} {level}" for level, n in dict(absent["levels"]).items())
        return (f"annotated {ev['n_cells']} held-out cells ({levels}): best-class accuracy "
                f"{ev['accuracy']:.3f}, macro-F1 {ev['macro_f1']:.3f}; ontology-aware accuracy of the answers "
                f"{onto['ontology_accuracy']:.3f}, {onto['fine_rate']:.0%} answered at the fine level; "
                f"'{HELD_OUT_TYPE}' (absent from the atlas) called unknown in {strict['abstention_rate_absent']:.0%} "
                f"of {ev['n_absent']} cells -> {out / 'query.annotated.h5ad'}")

    stage("annotate", do_annotate)

    def do_hunt() -> str:
        from scatlas.query.hunt import report, sweep, train

        clf = train(out / "index", query_file, positive=f"cell_type = '{RARE_TYPE}'", background=5000,
                    out=out / "hunt" / "classifier", progress=progress)
        summary = sweep(out / "index", clf, out / "hunt" / "sweep", progress=progress)
        rep = report(summary.hits_path, out / "index", out / "hunt" / "report", by=("dataset_id", "tissue", "disease"))
        import duckdb

        with duckdb.connect(str(out / "index" / "cells.duckdb"), read_only=True) as con:  # the path is bound, not quoted
            truth = con.execute("SELECT count(*) FROM cells WHERE cell_type = ?", [RARE_TYPE]).fetchone()[0]  # type: ignore[index]
            found = con.execute(
                "SELECT count(*) FROM cells JOIN read_parquet(?) h USING (soma_joinid) WHERE cells.cell_type = ?",
                [str(summary.hits_path), RARE_TYPE],
            ).fetchone()[0]  # type: ignore[index]
        precision = found / summary.n_hits if summary.n_hits else float("nan")
        recall = found / truth if truth else float("nan")
        result.figures["hunt"] = {"n_hits": summary.n_hits, "true_in_atlas": truth, "true_hits": found,
                                  "precision": precision, "recall": recall, "gb_per_s": summary.gb_per_second}
        return (f"trained on {clf.counts.get('n_positive')} '{RARE_TYPE}' cells of the query "
                f"(CV AUPRC {clf.metrics.get('auprc', float('nan')):.2f}); swept {summary.n_cells} atlas cells: "
                f"{summary.n_hits} hits, {found} of the {truth} planted '{RARE_TYPE}' atlas cells found "
                f"(precision {precision:.2f}, recall {recall:.2f}); report in {rep.out_dir}")

    stage("hunt", do_hunt)
    return result
