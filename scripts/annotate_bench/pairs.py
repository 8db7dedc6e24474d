"""The benchmark pairs (reference -> query splits of the real labelled datasets, and a synthetic atlas) and
the h5ad files each is prepared into."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ontology_maps as cl
from .common import LABEL


@dataclass(frozen=True)
class Pair:
    """Reference cells = ``ref`` values of ``split`` (one atlas dataset per value), query = ``query``
    values."""

    name: str
    file: str
    label: str
    split: str
    ref: tuple[str, ...]
    query: tuple[str, ...]
    query_file: str | None = None  # the query comes from another file (``split``/``query`` filter it there)
    query_split: str | None = None  # "__all__": every cell of the query file
    query_label: str = "cell_type"  # the query file's label column (with ``query_file``)
    annotate_kw: dict[str, Any] = field(default_factory=dict)  # scatlas arguments this pair needs (in its note)
    ref_map: dict[str, str | None] = field(default_factory=dict)  # label harmonisation (None: unlabelled)
    query_map: dict[str, str | None] = field(default_factory=dict)
    note: str = ""
    # CL terms of the harmonised labels (annotate_bench.ontology_maps): reference -> ingest(ontology_map=...),
    # query -> annotate(ontology_map=...); empty: labels without CL terms (cell lines, culture conditions)
    ref_terms: dict[str, str] = field(default_factory=dict)
    query_terms: dict[str, str] = field(default_factory=dict)


ZHENG_BROAD = {
    "bcells": "B",
    "nk": "NK",
    "monocytes": "Monocyte",
    "memoryt": "CD4 T",
    "regulatoryt": "CD4 T",
    "thelper": "CD4 T",
    "naivet": "CD4 T",
    "cytotoxict": "CD8 T",
    "naivecytotoxic": "CD8 T",
}
KANG_BROAD: dict[str, str | None] = {
    "B": "B",
    "B Activated": "B",
    "NK": "NK",
    "CD14 Mono": "Monocyte",
    "CD16 Mono": "Monocyte",
    "CD4 Naive T": "CD4 T",
    "CD4 Memory T": "CD4 T",
    "CD8 T": "CD8 T",
    "T activated": None,  # activated T cells of either lineage: not scored
    "DC": "DC",
    "pDC": "DC",
    "Mk": "Megakaryocyte",
    "Eryth": "Erythrocyte",  # absent from the sorted reference
}

PBMC3K_TO_KANG: dict[str, str | None] = {
    "Naive CD4 T": "CD4 Naive T",
    "Memory CD4 T": "CD4 Memory T",
    "CD14+ Mono": "CD14 Mono",
    "FCGR3A+ Mono": "CD16 Mono",
    "B": "B",
    "CD8 T": "CD8 T",
    "NK": "NK",
    "DC": "DC",
    "Platelet": "Mk",
}

# Two pairs whose query comes from another file; each is also run with the stimulated kang cells.
_ZHENG_TO_KANG_CTRL = Pair(
    "zheng_sorted_to_kang_ctrl",
    "zheng2017_pbmc_sorted_reference_mudan.h5ad",
    "cell_type",
    "__all__",
    ("all",),
    ("CTRL",),
    query_file="kang2018_ifnb_ctrl_stim_2800.h5ad",
    query_split="sample",
    ref_map=ZHENG_BROAD,
    query_map=KANG_BROAD,
    ref_terms=cl.BROAD,
    query_terms=cl.BROAD,
    note="FACS-sorted reference, broad harmonised labels; DC/Mk/Eryth absent from the reference, "
    "T activated not scored",
)
_KANG_CTRL_TO_PBMC3K = Pair(
    "kang_ctrl_to_pbmc3k",
    "kang2018_ifnb_ctrl_stim_2800.h5ad",
    "cell_type",
    "sample",
    ("CTRL",),
    ("all",),
    query_file="pbmc3k_seurat_labels_clustifyr.h5ad",
    query_split="__all__",
    query_label="classified",
    query_map=PBMC3K_TO_KANG,
    ref_terms=cl.KANG,
    query_terms=cl.KANG,
    note="another lab's PBMCs as a partial query: log-normalised values of its own 2,000 HVGs only, which "
    "hold 406 (20%) of the reference's 2,000 HVGs (accepted by annotate's default floor of 15% with refitted "
    "label heads; the 50% floor before session 5 refused it) and the peers use those 406 genes; "
    "Seurat-tutorial labels mapped onto kang's",
)

PAIRS: tuple[Pair, ...] = (
    Pair(
        "kang2018_ctrl_to_stim",
        "kang2018_ifnb_ctrl_stim_2800.h5ad",
        "cell_type",
        "sample",
        ("CTRL",),
        ("STIM",),
        ref_terms=cl.KANG,
        query_terms=cl.KANG,
        note="IFN-beta stimulation shifts every type; 13 Seurat-tutorial labels",
    ),
    Pair(
        "symphony_3p_to_5p",
        "symphony_pbmc_10x_3chemistries.h5ad",
        "cell_type",
        "donor",
        ("3pv1", "3pv2"),
        ("5p",),
        ref_terms=cl.SYMPHONY,
        query_terms=cl.SYMPHONY,
        note="10x 3' v1 + v2 reference, 5' query; log-normalised input",
    ),
    Pair(
        "tian_celseq2_to_dropseq",
        "tian2019_3celllines_celseq2_dropseq.h5ad",
        "cell_line",
        "tech",
        ("CELseq2",),
        ("Dropseq",),
        note="3 lung adenocarcinoma cell lines, CEL-seq2 -> Drop-seq",
    ),
    Pair(
        "pancreas_b1b4_to_b5",
        "pancreas_3studies_beta_ductal_cepo.h5ad",
        "cellTypes",
        "batch",
        ("batch 1", "batch 4"),
        ("batch 5",),
        ref_terms=cl.PANCREAS,
        query_terms=cl.PANCREAS,
        note="beta/ductal; counts (inDrop, Smart-seq2) -> non-integer study",
    ),
    Pair(
        "mesc_batch2_to_batch3",
        "mesc_2batches_scmerge.h5ad",
        "cellTypes",
        "batch",
        ("batch2",),
        ("batch3",),
        note="mouse ES cells, culture condition (2i/a2i/lif), read counts",
    ),
    _ZHENG_TO_KANG_CTRL,
    _KANG_CTRL_TO_PBMC3K,
    # The same files split the other way round: more held-out pairs, so that a method is not tuned to one direction.
    Pair(
        "kang2018_stim_to_ctrl",
        "kang2018_ifnb_ctrl_stim_2800.h5ad",
        "cell_type",
        "sample",
        ("STIM",),
        ("CTRL",),
        ref_terms=cl.KANG,
        query_terms=cl.KANG,
        note="the reverse of kang2018_ctrl_to_stim: stimulated reference, control query",
    ),
    Pair(
        "symphony_5p_to_3p",
        "symphony_pbmc_10x_3chemistries.h5ad",
        "cell_type",
        "donor",
        ("5p",),
        ("3pv1", "3pv2"),
        ref_terms=cl.SYMPHONY,
        query_terms=cl.SYMPHONY,
        note="10x 5' reference, 3' v1 + v2 query; log-normalised input",
    ),
    Pair(
        "tian_dropseq_to_celseq2",
        "tian2019_3celllines_celseq2_dropseq.h5ad",
        "cell_line",
        "tech",
        ("Dropseq",),
        ("CELseq2",),
        note="the reverse of tian_celseq2_to_dropseq",
    ),
    Pair(
        "pancreas_b4b5_to_b1",
        "pancreas_3studies_beta_ductal_cepo.h5ad",
        "cellTypes",
        "batch",
        ("batch 4", "batch 5"),
        ("batch 1",),
        ref_terms=cl.PANCREAS,
        query_terms=cl.PANCREAS,
        note="beta/ductal; Smart-seq2-like + non-integer study -> inDrop-like counts",
    ),
    Pair(
        "mesc_batch3_to_batch2",
        "mesc_2batches_scmerge.h5ad",
        "cellTypes",
        "batch",
        ("batch3",),
        ("batch2",),
        note="the reverse of mesc_batch2_to_batch3",
    ),
    # Splits added after the method was designed on the pairs above (session 5), kept as a check that a change
    # chosen on those generalises: another chemistry pair, another pancreas study, the stimulated PBMCs as
    # queries of the sorted and the 2,000-HVG references.
    Pair(
        "symphony_3pv1_to_3pv2",
        "symphony_pbmc_10x_3chemistries.h5ad",
        "cell_type",
        "donor",
        ("3pv1",),
        ("3pv2",),
        ref_terms=cl.SYMPHONY,
        query_terms=cl.SYMPHONY,
        note="10x 3' v1 reference, 3' v2 query; log-normalised input",
    ),
    Pair(
        "pancreas_b1b5_to_b4",
        "pancreas_3studies_beta_ductal_cepo.h5ad",
        "cellTypes",
        "batch",
        ("batch 1", "batch 5"),
        ("batch 4",),
        ref_terms=cl.PANCREAS,
        query_terms=cl.PANCREAS,
        note="beta/ductal; inDrop-like counts + non-integer study -> Smart-seq2-like",
    ),
    dataclasses.replace(
        _ZHENG_TO_KANG_CTRL,
        name="zheng_sorted_to_kang_stim",
        query=("STIM",),
        note="as zheng_sorted_to_kang_ctrl with IFN-beta-stimulated query cells: a lab, a protocol and a "
        "stimulation apart; DC/Mk/Eryth absent from the reference",
    ),
    dataclasses.replace(
        _KANG_CTRL_TO_PBMC3K,
        name="kang_stim_to_pbmc3k",
        ref=("STIM",),
        note="as kang_ctrl_to_pbmc3k with the stimulated cells as reference: a partial query (pbmc3k's own "
        "2,000 HVGs, 390 of the reference's 2,000) of unstimulated PBMCs from another lab",
    ),
)
SKIPPED = {
    "mouse_cortex_interneurons_2studies_metaneighbor": "39 study-specific labels (Int1..Int16 vs "
    "Pvalb_/Sst_/Vip_...) "
    "with no published one-to-one mapping; harmonising them by hand would be guesswork",
    "scanpy_pbmc68k_reduced": "only 765 genes (an HVG subset, no counts): too few of a reference's HVGs to be a "
    "fair query (pbmc3k's 2,000 HVGs are the partial-overlap pair kang_ctrl_to_pbmc3k)",
    "tian2019_3celllines_10x_cepo": "symbols only, while the CEL-seq2/Drop-seq file has Ensembl ids only: no "
    "mapping table is available offline",
    "zheng2017_pbmc_donorA_unlabeled_mudan": "no labels",
}



def _read(path: Path) -> Any:
    import anndata

    adata = anndata.read_h5ad(path)
    adata.obs_names_make_unique()
    return adata


def _with_label(adata: Any, column: str, mapping: dict[str, str | None]) -> Any:
    values = adata.obs[column].astype(str)
    if mapping:
        unmapped = sorted(set(values) - set(mapping))
        if unmapped:
            raise SystemExit(f"label mapping misses {unmapped}")
        values = values.map(mapping)
    out = adata.copy()
    out.obs[LABEL] = values.to_numpy(dtype=object)
    return out


def prepare_pair(pair: Pair, raw: Path, work: Path) -> tuple[list[Path], Path]:
    """Write reference h5ad files (one per ``ref`` value) and the query h5ad into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    src = _read(raw / pair.file)
    refs = []
    for value in pair.ref:
        sub = src if pair.split == "__all__" else src[src.obs[pair.split].astype(str) == value]
        sub = _with_label(sub, pair.label, pair.ref_map)
        sub = sub[sub.obs[LABEL].notna()].copy()
        name = f"ref_{value.replace(' ', '_')}"
        path = work / f"{name}.h5ad"
        sub.write_h5ad(path)
        refs.append(path)
    qsrc = _read(raw / pair.query_file) if pair.query_file else src
    qsplit = pair.query_split or pair.split
    q = qsrc if qsplit == "__all__" else qsrc[qsrc.obs[qsplit].astype(str).isin(pair.query)]
    qlabel = pair.label if not pair.query_file else pair.query_label
    q = _with_label(q, qlabel, pair.query_map)
    qpath = work / "query.h5ad"
    q.write_h5ad(qpath)
    return refs, qpath


SYN_HELD_OUT = ("plasma cell", "endothelial cell")


def prepare_synthetic(work: Path, n_cells: int, seed: int = 0) -> tuple[list[Path], Path, dict[str, Any]]:
    """4 synthetic datasets; datasets 0-2 are the reference, 3 the query; SYN_HELD_OUT types only in 3."""
    import anndata

    from scatlas.atlas.synthetic import SyntheticAtlasConfig, write_h5ad_datasets

    config = SyntheticAtlasConfig(
        n_cells=n_cells,
        n_genes=3000,
        n_datasets=4,
        n_donors=3,
        seed=seed,
        absent_types={t: (0, 1, 2) for t in SYN_HELD_OUT},
        non_primary_fraction=0.0,
    )
    paths = write_h5ad_datasets(config, work / "synthetic", overwrite=True)
    fixed = []
    for p in paths:
        a = anndata.read_h5ad(p)
        a.obs[LABEL] = a.obs["cell_type"].astype(str).to_numpy(dtype=object)
        out = work / p.name
        a.write_h5ad(out)
        fixed.append(out)
    return (
        fixed[:3],
        fixed[3],
        {"n_cells": n_cells, "n_genes": 3000, "seed": seed, "held_out": list(SYN_HELD_OUT)},
    )
