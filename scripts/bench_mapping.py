"""Mapping check on real data: a PBMC index, its mapping calibration, and queries that should map (other PBMC
data), should not (pancreas islets, lung cancer cell lines) or are refused (mouse).

    .venv/bin/python scripts/bench_mapping.py --json-out /tmp/bench_mapping.json

The atlas is kang2018 split by ``sample`` (CTRL, STIM: two datasets) plus zheng2017's sorted PBMCs; ``--atlas``
picks other files (``file`` or ``file:column=value``). Most query files here hold a few hundred to 2,000 selected
genes, so each query gets its own index of the same atlas cells restricted to the genes the query has (its gene
overlap is then ~1: what is measured is the biology, not missing genes); the species-refused queries use the
index on all genes. Each query is annotated with the defaults (``query.annotate``: species check, gene overlap,
MNN alignment, the mapping verdict of ``query.mapping`` against the calibration made at build). Prints a table;
``--write-docs`` puts it into docs/benchmarks.md.
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
MIXES = [  # (name, file of another tissue, PBMC file, PBMC cells drawn): one sample holding both, on their shared genes
    ("pancreas+pbmc150", "pancreas_3studies_beta_ductal_cepo.h5ad", "zheng2017_pbmc_donorA_unlabeled_mudan.h5ad", 150),
    ("pancreas+pbmc1500", "pancreas_3studies_beta_ductal_cepo.h5ad", "zheng2017_pbmc_donorA_unlabeled_mudan.h5ad", 1500),
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


def build(raw: Path, work: Path, atlas: list[str], genes: set[str] | None = None) -> tuple[Path, dict]:
    """Ingest the atlas files (on ``genes``) and build an index with the defaults (cell_type heads, mapping
    calibration)."""
    from scatlas.atlas import ingest
    from scatlas.index import build_index, read_mapping_calibration

    work.mkdir(parents=True, exist_ok=True)
    files = [_prepare(spec, raw, work, genes) for spec in atlas]
    ingest(files, work / "atlas", progress=False)
    t0 = time.perf_counter()
    build_index(work / "atlas", work / "index", embedder="pca", progress=False)
    cal = read_mapping_calibration(work / "index")
    assert cal is not None
    info = {"atlas": atlas, "n_genes": "all" if genes is None else len(genes),
            "build_s": round(time.perf_counter() - t0, 1),
            "calibration": {k: v for k, v in cal.to_dict().items() if k != "reference"}}
    return work / "index", info


def _mix(raw: Path, work: Path, name: str, other: str, pbmc: str, n: int) -> Path:
    """One query file: every cell of ``other`` and ``n`` random cells of ``pbmc`` (seed 0) on the genes both have;
    ``obs["part"]`` says which is which."""
    import numpy as np

    a, b = anndata.read_h5ad(raw / other), anndata.read_h5ad(raw / pbmc)
    genes = a.var_names.intersection(b.var_names)
    b = b[np.random.default_rng(0).choice(b.n_obs, n, replace=False)]
    mixed = anndata.concat([a[:, genes].copy(), b[:, genes].copy()], label="part", keys=["other", "pbmc"],
                           index_unique="-")
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{name}.h5ad"
    mixed.write_h5ad(out)
    return out


def run_query(index_dir: Path, path: Path) -> dict:
    """Annotate ``path`` against the index with the defaults: the outcome (refused for species or genes, or the
    mapping verdict) and the share of cells called unknown, out_of_atlas in particular (per ``obs["part"]`` when
    the file has one)."""
    from scatlas.atlas.errors import GeneOverlapError, SpeciesMismatchError
    from scatlas.query import annotate

    try:
        res = annotate(path, index_dir, label_keys=["cell_type"], progress=False, keep_neighbors=False)
    except SpeciesMismatchError as exc:
        return {"outcome": "refused", "message": str(exc)[:200]}
    except GeneOverlapError as exc:
        return {"outcome": "genes", "message": str(exc)[:200]}
    rep, p = res.report, res.predictions
    mapping = rep["mapping"]
    return {
        "outcome": mapping["verdict"],
        "n_cells": len(p),
        "gene_overlap": rep["gene_overlap"]["fraction_of_target"],
        "shift_norm": rep["alignment"]["shift_norm"] if rep["alignment"] else None,
        "score": mapping["score"],
        "reasons": mapping["reasons"],
        "unknown": round(float((p["cell_type_pred"] == "unknown").mean()), 4),
        "out_of_atlas": round(float((p["cell_type_unknown_reason"] == "out_of_atlas").mean()), 4),
        "evidence": mapping["evidence"],
        "expression": mapping.get("expression"),
        **_parts(path, p),
    }


def _parts(path: Path, p) -> dict:
    obs = anndata.read_h5ad(path, backed="r").obs
    if "part" not in obs.columns:
        return {}
    part = obs["part"].astype(str).to_numpy()
    unknown = (p["cell_type_pred"] == "unknown").to_numpy()
    return {f"unknown_{name}": round(float(unknown[part == name].mean()), 4) for name in ("other", "pbmc")}


def _log_calibration(name: str, info: dict) -> None:
    cal = info["calibration"]
    groups = ", ".join(f"{g['name'][:14]} shift {g['shift_norm']:.3f} low {g['below']['aligned']['0.05']:.3f}"
                       for g in cal["groups"])
    log.info("%s index (%s genes): %s; thresholds %s", name, info["n_genes"], groups, cal["thresholds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--atlas", nargs="+", default=ATLAS)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--work", type=Path, help="keep the atlas and index here (default: a temporary directory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        full_dir, full_info = build(args.raw, work / "all_genes", args.atlas)
        indexes = {"all_genes": full_info}
        rows = {}
        for name, file, expected in QUERIES:
            if not (args.raw / file).is_file():
                continue
            index_dir = full_dir
            if expected in ("well", "poorly"):
                genes = set(map(str, anndata.read_h5ad(args.raw / file, backed="r").var_names))
                index_dir, indexes[name] = build(args.raw, work / name, args.atlas, genes)
                _log_calibration(name, indexes[name])
            rows[name] = {"expected": expected, **run_query(index_dir, args.raw / file)}
        for name, other, pbmc, n in MIXES:
            if not ((args.raw / other).is_file() and (args.raw / pbmc).is_file()):
                continue
            path = _mix(args.raw, work / "mixes", name, other, pbmc, n)
            genes = set(map(str, anndata.read_h5ad(path, backed="r").var_names))
            index_dir, indexes[name] = build(args.raw, work / name, args.atlas, genes)
            rows[name] = {"expected": "mixed", **run_query(index_dir, path)}
    table = render(rows)
    sys.stdout.write(table + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps({"indexes": indexes, "queries": rows}, indent=2, default=str))
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_block import write_bench_section

        write_bench_section("bench_mapping", "bench_mapping.py", argv if argv is not None else sys.argv[1:], DOC_TEXT,
                            table, "Query mapping check")
    return 0


DOC_TEXT = (
    "A PBMC atlas (kang2018 CTRL and STIM as two datasets, zheng2017's sorted PBMCs), built with the defaults, and "
    "queries annotated with the defaults. Each query file holds a few hundred to 2,000 selected genes, so each gets "
    "its own index of the same atlas cells on the genes it has (gene overlap ~1: what is measured is the biology, "
    "not missing genes). *verdict*: the query-level mapping check (or `refused`: species mismatch; `genes`: too few "
    "shared genes); *shift*: the norm of the query's MNN shift; *score*: share of its cells that map as the atlas' "
    "own held-out datasets do; *expression below*: share of its cells whose expression matches no atlas cell type "
    "as well as held-out atlas datasets' cells do (`query.expression_match`); *unknown*, *out_of_atlas*: shares of "
    "its cells. The mixed queries hold every pancreas cell and 150 or 1,500 of zheng's donor A PBMCs in one file "
    "(on the genes both have); *unknown (pancreas / PBMC part)* is the share of each part called `unknown`."
)


def render(rows: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| query | expected | verdict | gene overlap | shift | score | expression below | unknown | out_of_atlas "
             "| unknown (pancreas / PBMC part) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def f(r: dict, key: str, spec: str = ".3f") -> str:
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for name, r in rows.items():
        expr = r.get("expression") or {}
        below = format(expr["fraction_below"], ".3f") if "fraction_below" in expr else "-"
        parts = f"{f(r, 'unknown_other')} / {f(r, 'unknown_pbmc')}" if "unknown_other" in r else "-"
        lines.append(f"| {name} | {r['expected']} | {r['outcome']} | {f(r, 'gene_overlap', '.2f')} "
                     f"| {f(r, 'shift_norm')} | {f(r, 'score')} | {below} | {f(r, 'unknown')} | {f(r, 'out_of_atlas')} "
                     f"| {parts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
