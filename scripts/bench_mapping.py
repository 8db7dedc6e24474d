"""Mapping check on real data: a PBMC index, its mapping calibration, and queries that should map (other PBMC
data), should not (pancreas islets, lung cancer cell lines) or are refused (mouse).

    .venv/bin/python scripts/bench_mapping.py --json-out /tmp/bench_mapping.json

The atlas is kang2018 split by ``sample`` (CTRL, STIM: two datasets) plus zheng2017's sorted PBMCs; ``--atlas``
picks other files (``file`` or ``file:column=value``). Most query files here hold a few hundred to 2,000 selected
genes, so each query gets its own index of the same atlas cells restricted to the genes the query has (its gene
overlap is then ~1: what is measured is the biology, not missing genes); the species-refused queries use the
index on all genes. Each index is calibrated (``calibrate_mapping``), each query embedded with its embedder,
aligned by MNN, searched, and its cells scored against the calibration (``query.mapping``). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import anndata
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"
log = logging.getLogger("bench_mapping")

ATLAS = [
    "kang2018_ifnb_ctrl_stim_2800.h5ad:sample=CTRL",
    "kang2018_ifnb_ctrl_stim_2800.h5ad:sample=STIM",
    "zheng2017_pbmc_sorted_reference_mudan.h5ad",
]
QUERIES = [  # (name, file, expected: well | poorly | refused (species) | genes (gene-overlap check))
    ("zheng_donorA_pbmc", "zheng2017_pbmc_donorA_unlabeled_mudan.h5ad", "well"),
    ("pbmc3k", "pbmc3k_seurat_labels_clustifyr.h5ad", "well"),
    ("symphony_pbmc", "symphony_pbmc_10x_3chemistries.h5ad", "well"),
    ("pancreas", "pancreas_3studies_beta_ductal_cepo.h5ad", "poorly"),
    ("tian_celllines_celseq2_dropseq", "tian2019_3celllines_celseq2_dropseq.h5ad", "genes"),  # Ensembl ids only
    ("tian_celllines_10x", "tian2019_3celllines_10x_cepo.h5ad", "poorly"),
    ("mouse_cortex", "mouse_cortex_interneurons_2studies_metaneighbor.h5ad", "refused"),
    ("mesc", "mesc_2batches_scmerge.h5ad", "refused"),
]


def _prepare(spec: str, raw: Path, work: Path, genes: set[str] | None) -> Path:
    """``file`` or ``file:column=value`` -> an h5ad holding those cells (named after the value), on ``genes``."""
    name, _, sel = spec.partition(":")
    if not sel and genes is None:
        return raw / name
    adata = anndata.read_h5ad(raw / name)
    stem = Path(name).stem
    if sel:
        column, _, value = sel.partition("=")
        adata = adata[adata.obs[column].astype(str) == value]
        stem = f"{stem.split('_')[0]}_{value}"
    if genes is not None:
        adata = adata[:, adata.var_names.isin(sorted(genes))]
    out = work / f"{stem}.h5ad"
    adata.copy().write_h5ad(out)
    return out


def build(raw: Path, work: Path, atlas: list[str], cells_per_group: int, genes: set[str] | None = None
          ) -> tuple[Path, dict]:
    from scatlas.atlas import ingest
    from scatlas.index import build_index, calibrate_mapping

    work.mkdir(parents=True, exist_ok=True)
    files = [_prepare(spec, raw, work, genes) for spec in atlas]
    ingest(files, work / "atlas", progress=False)
    t0 = time.perf_counter()
    build_index(work / "atlas", work / "index", embedder="pca", label_keys=(), progress=False)
    t1 = time.perf_counter()
    cal = calibrate_mapping(work / "index", cells_per_group=cells_per_group)
    t2 = time.perf_counter()
    info = {"atlas": atlas, "n_genes": "all" if genes is None else len(genes), "build_s": round(t1 - t0, 1), "calibrate_s": round(t2 - t1, 1),
            "calibration": {k: v for k, v in cal.to_dict().items() if k != "reference"}}
    return work / "index", info


def run_query(index_dir: Path, path: Path) -> dict:
    from scatlas.atlas.errors import GeneOverlapError, SpeciesMismatchError
    from scatlas.index import AtlasIndex, apply_shift, estimate_shift, read_mapping_calibration, sample_sorted
    from scatlas.query.mapping import assess_mapping
    from scatlas.query.prepare import open_query
    from scatlas.query.vote import mean_top_similarity

    cal = read_mapping_calibration(index_dir)
    assert cal is not None
    with AtlasIndex.open(index_dir) as idx:
        try:
            cells = open_query(path, idx)
        except SpeciesMismatchError as exc:
            return {"outcome": "refused", "message": str(exc).split(":")[0] + ": " + str(exc).split(": ", 1)[1][:160]}
        try:
            overlap = cells.match.fraction_of_target if cells.match is not None else None
            try:
                cells.check(0.5)
            except GeneOverlapError as exc:
                return {"outcome": "genes", "gene_overlap": round(overlap or 0.0, 3), "message": str(exc)[:160]}
            vectors = cells.embed(np.arange(cells.n_cells), 5000)
        finally:
            cells.close()
        alignment = estimate_shift(idx, vectors[sample_sorted(len(vectors), 5000, 0)])
        shift_norm = float(np.linalg.norm(alignment.shift))
        k = cal.k
        s_a = mean_top_similarity(idx.search(apply_shift(vectors, alignment.shift), k).scores, k)
        s_u = mean_top_similarity(idx.search(vectors, k).scores, k)
    out: dict = {"n_cells": len(vectors), "gene_overlap": round(overlap, 3) if overlap is not None else None,
                 "shift_norm": round(shift_norm, 4), "species": cells.species.get("query", {}).get("species")}
    for key, s, shift in (("aligned", s_a, shift_norm), ("unaligned", s_u, None)):
        scores = cal.cell_scores(s, aligned=key == "aligned")
        verdict = assess_mapping(scores, shift, cal)
        out[key] = {
            "verdict": verdict.verdict, "score": round(verdict.score or 0.0, 4),
            "out_of_atlas": round(float(verdict.out_of_atlas(scores).mean()), 4),
            "median_s": round(float(np.nanmedian(s)), 4), "median_cell_score": round(float(np.median(scores)), 4),
            "low_fraction": verdict.evidence["low_fraction"], "reasons": list(verdict.reasons),
            "under_0.25": round(float(np.mean(scores < 0.25)), 4), "under_0.5": round(float(np.mean(scores < 0.5)), 4),
        }
    out["outcome"] = out["aligned"]["verdict"]
    return out


def _log_calibration(name: str, info: dict) -> None:
    cal = info["calibration"]
    groups = ", ".join(f"{g['name'][:14]} shift {g['shift_norm']:.3f} low {g['below']['aligned']['0.05']:.3f}"
                       for g in cal["groups"])
    log.info("%s index (%s genes): %s; thresholds %s", name, info["n_genes"], groups, cal["thresholds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--atlas", nargs="+", default=ATLAS)
    p.add_argument("--cells-per-group", type=int, default=1000)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--work", type=Path, help="keep the atlas and index here (default: a temporary directory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        full_dir, full_info = build(args.raw, work / "all_genes", args.atlas, args.cells_per_group)
        indexes = {"all_genes": full_info}
        rows = {}
        for name, file, expected in QUERIES:
            if not (args.raw / file).is_file():
                continue
            index_dir = full_dir
            if expected in ("well", "poorly"):
                genes = set(map(str, anndata.read_h5ad(args.raw / file, backed="r").var_names))
                index_dir, indexes[name] = build(args.raw, work / name, args.atlas, args.cells_per_group, genes)
                _log_calibration(name, indexes[name])
            rows[name] = {"expected": expected, **run_query(index_dir, args.raw / file)}
    header = f"{'query':32} {'expect':8} {'outcome':12} {'genes':>6} {'shift':>6} {'score':>6} {'out':>6} {'out(u)':>6}"
    lines = [header]
    for name, r in rows.items():
        a, u = r.get("aligned", {}), r.get("unaligned", {})
        lines.append(
            f"{name:32} {r['expected']:8} {r['outcome']:12} {r.get('gene_overlap') or 0:6.2f} "
            f"{r.get('shift_norm', float('nan')):6.3f} {a.get('score', float('nan')):6.3f} "
            f"{a.get('out_of_atlas', float('nan')):6.3f} {u.get('out_of_atlas', float('nan')):6.3f}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps({"indexes": indexes, "queries": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
