"""An atlas of two label vocabularies for the same PBMC types: one class per Cell Ontology term.

Symphony's PBMCs (``T_CD8``, ``Mono_CD14``, ``MK``, ...) and Kang's control PBMCs (``CD8 T``, ``CD14 Mono``,
``Mk``, ...) are ingested into one store, each with its label -> CL table (``scripts/annotate_bench/
ontology_maps.py``), and indexed with the defaults; the script lists each class with the label values it merges
and its term, then annotates pbmc3k (another lab's PBMCs, its labels mapped to CL as the query's truth) against it.

    nice .venv/bin/python scripts/bench_vocabularies.py --work /tmp/vocab [--write-docs]
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata
import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"


def run(raw: Path, work: Path) -> tuple[list[tuple[str, list[str], str, str]], dict[str, float]]:
    """``(classes, metrics)``: each class (name, the values it merges, CL term, CL name) and pbmc3k's scores."""
    from annotate_bench import ontology_maps as cl

    from scatlas.atlas import ingest
    from scatlas.atlas.ontology import cell_ontology
    from scatlas.index import AtlasIndex, build_index
    from scatlas.query import annotate

    work.mkdir(parents=True, exist_ok=True)
    kang = anndata.read_h5ad(raw / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    kang[kang.obs["sample"].astype(str) == "CTRL"].copy().write_h5ad(work / "kang_ctrl.h5ad")
    atlas = work / "atlas"
    ingest([raw / "symphony_pbmc_10x_3chemistries.h5ad"], atlas, dataset_id="symphony", ontology_map=cl.SYMPHONY,
           progress=False)
    ingest([work / "kang_ctrl.h5ad"], atlas, dataset_id="kang", ontology_map=cl.KANG, progress=False)
    build_index(atlas, work / "index", progress=False)
    onto = cell_ontology()
    with AtlasIndex.open(work / "index") as idx:
        lc = idx.label_classes("cell_type")
    classes = []
    for c in lc.classes:
        values = sorted(v for v, k in lc.value_class.items() if k == c)
        term = lc.class_term.get(c, "")
        classes.append((c, values, term, str(onto.name(term)) if term else ""))
    res = annotate(raw / "pbmc3k_seurat_labels_clustifyr.h5ad", work / "index", truth_key="classified",
                   ontology_map=cl.PBMC3K, progress=False)
    ev = res.report["evaluation"]["cell_type"]
    o = ev["ontology"]
    metrics = {"macro_f1_fine": ev["macro_f1"], "ontology_accuracy": o["ontology_accuracy"],
               "fine": o["fine_rate"], "ancestor": o["ancestor_rate"], "unknown": o["unknown_rate"], "ece": o["ece"]}
    return classes, metrics


def render(classes: list[tuple[str, list[str], str, str]], metrics: dict[str, float]) -> tuple[str, str]:
    """(text, table) for docs/benchmarks.md."""
    rows = ["| class (the atlas' label) | label values merged | CL term | CL name |", "|---|---|---|---|"]
    rows += [f"| {c} | {', '.join(values)} | {term or '-'} | {name or '-'} |" for c, values, term, name in classes]
    text = (
        f"Symphony's PBMCs and Kang's control PBMCs in one atlas, each ingested with its label -> CL table "
        f"(`scripts/annotate_bench/ontology_maps.py`), the index built with the defaults: {len(classes)} classes, "
        f"{sum(1 for c in classes if c[2])} with a term, {len({c[2] for c in classes if c[2]})} distinct terms. "
        f"pbmc3k annotated against it (its labels mapped to CL as the truth): macro-F1 of the best class "
        f"{metrics['macro_f1_fine']:.3f}, ontology-aware accuracy {metrics['ontology_accuracy']:.3f} with "
        f"{metrics['fine']:.0%} fine, {metrics['ancestor']:.0%} ancestor, {metrics['unknown']:.1%} unknown, "
        f"ECE {metrics['ece']:.3f}."
    )
    return text, "\n".join(rows)


@click.command()
@click.option("--raw", type=click.Path(path_type=Path, file_okay=False), default=RAW, show_default=True)
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for the atlas, the index and the query (made when absent).")
@click.option("--write-docs", is_flag=True, help="Write the result into docs/benchmarks.md.")
def main(raw: Path, work: Path, write_docs: bool) -> None:
    """Build the two-vocabulary PBMC atlas, list its classes and annotate pbmc3k against it."""
    classes, metrics = run(raw, work)
    text, table = render(classes, metrics)
    click.echo(text + "\n\n" + table)
    if write_docs:
        from docs_block import write_bench_section

        write_bench_section("bench_vocabularies", "bench_vocabularies.py", ["--work", str(work), "--write-docs"],
                            text, table, heading="Annotation: two label vocabularies in one atlas")


if __name__ == "__main__":
    main()
