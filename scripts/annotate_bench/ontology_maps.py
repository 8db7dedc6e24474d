"""Cell Ontology (CL) terms of the benchmark's label vocabularies: label value -> CL id.

Each table maps the label values a pair's reference or query holds (after the harmonisation of
:mod:`annotate_bench.pairs`) to the most specific CL term that is true of every cell the label names. They are
passed to ``atlas.ingest(ontology_map=...)`` for the reference (the index merges values by term and can answer
with ancestors) and to ``query.annotate(ontology_map=...)`` for the query's truth (ontology-aware scores).
Checked against the CL release that ``cellxgene-ontology-guide`` ships (:func:`check_tables`, run by
tests/test_annotate_real.py).

Choices a reader may question:

* ``B Activated`` (kang): CL has no "activated B cell"; an activated B cell is a ``mature B cell`` (CL:0000785),
  a descendant of ``B cell``, so it stays a class of its own under B cell.
* ``T activated`` (kang): activated T cells of either lineage (CD4 or CD8); the most specific term true of all of
  them is ``T cell`` (CL:0000084), an ancestor of kang's other T classes.
* ``Mk`` (kang), ``MK`` (symphony), ``Platelet`` (pbmc3k): the same PPBP/PF4+ cluster of PBMC data, which
  Seurat's tutorials name Mk or Platelet; all three are ``megakaryocyte`` (CL:0000556) so that the vocabularies
  agree (CL's ``platelet``, CL:0000233, is not under megakaryocyte).
* ``DC`` (kang, symphony, pbmc3k): ``dendritic cell`` (CL:0000451); kang's pDC is ``plasmacytoid dendritic
  cell`` (CL:0000784), a descendant.
* ``HSC`` (symphony, 3 cells): ``hematopoietic stem cell`` (CL:0000037).
* Cell lines (tian) and mESC culture conditions (2i/a2i/lif) have no CL term: those pairs stay flat.
"""

from __future__ import annotations

from collections.abc import Mapping

B_CELL = "CL:0000236"
MATURE_B_CELL = "CL:0000785"
NK_CELL = "CL:0000623"
MONOCYTE = "CL:0000576"
CD14_MONOCYTE = "CL:0001054"
CD16_MONOCYTE = "CL:0002396"  # CD14-low, CD16-positive monocyte
T_CELL = "CL:0000084"
CD4_T = "CL:0000624"  # CD4-positive, alpha-beta T cell
CD4_NAIVE_T = "CL:0000895"  # naive thymus-derived CD4-positive, alpha-beta T cell
CD4_MEMORY_T = "CL:0000897"  # CD4-positive, alpha-beta memory T cell
CD8_T = "CL:0000625"  # CD8-positive, alpha-beta T cell
DC = "CL:0000451"
PDC = "CL:0000784"
MEGAKARYOCYTE = "CL:0000556"
ERYTHROCYTE = "CL:0000232"
HSC = "CL:0000037"
BETA_CELL = "CL:0000169"  # type B pancreatic cell
DUCTAL_CELL = "CL:0002079"  # pancreatic ductal cell

KANG: dict[str, str] = {
    "B": B_CELL,
    "B Activated": MATURE_B_CELL,
    "NK": NK_CELL,
    "CD14 Mono": CD14_MONOCYTE,
    "CD16 Mono": CD16_MONOCYTE,
    "CD4 Naive T": CD4_NAIVE_T,
    "CD4 Memory T": CD4_MEMORY_T,
    "CD8 T": CD8_T,
    "T activated": T_CELL,
    "DC": DC,
    "pDC": PDC,
    "Mk": MEGAKARYOCYTE,
    "Eryth": ERYTHROCYTE,
}
"""kang2018 ``cell_type`` (Seurat ifnb tutorial labels); also the vocabulary pbmc3k is harmonised to."""

BROAD: dict[str, str] = {
    "B": B_CELL,
    "NK": NK_CELL,
    "Monocyte": MONOCYTE,
    "CD4 T": CD4_T,
    "CD8 T": CD8_T,
    "DC": DC,
    "Megakaryocyte": MEGAKARYOCYTE,
    "Erythrocyte": ERYTHROCYTE,
}
"""The broad labels zheng's sorted populations and kang's types are harmonised to (pairs.ZHENG_BROAD/KANG_BROAD)."""

SYMPHONY: dict[str, str] = {
    "B": B_CELL,
    "NK": NK_CELL,
    "Mono_CD14": CD14_MONOCYTE,
    "Mono_CD16": CD16_MONOCYTE,
    "T_CD4": CD4_T,
    "T_CD8": CD8_T,
    "DC": DC,
    "MK": MEGAKARYOCYTE,
    "HSC": HSC,
}
"""symphony ``cell_type``."""

PBMC3K: dict[str, str] = {
    "Naive CD4 T": CD4_NAIVE_T,
    "Memory CD4 T": CD4_MEMORY_T,
    "CD14+ Mono": CD14_MONOCYTE,
    "FCGR3A+ Mono": CD16_MONOCYTE,
    "B": B_CELL,
    "CD8 T": CD8_T,
    "NK": NK_CELL,
    "DC": DC,
    "Platelet": MEGAKARYOCYTE,
}
"""pbmc3k ``classified`` (Seurat pbmc3k tutorial labels), unharmonised."""

PANCREAS: dict[str, str] = {"beta": BETA_CELL, "ductal": DUCTAL_CELL}
"""pancreas ``cellTypes``."""

TABLES: dict[str, Mapping[str, str]] = {
    "kang": KANG, "broad": BROAD, "symphony": SYMPHONY, "pbmc3k": PBMC3K, "pancreas": PANCREAS,
}

EXPECTED_NAMES: dict[str, str] = {
    B_CELL: "B cell",
    MATURE_B_CELL: "mature B cell",
    NK_CELL: "natural killer cell",
    MONOCYTE: "monocyte",
    CD14_MONOCYTE: "CD14-positive monocyte",
    CD16_MONOCYTE: "CD14-low, CD16-positive monocyte",
    T_CELL: "T cell",
    CD4_T: "CD4-positive, alpha-beta T cell",
    CD4_NAIVE_T: "naive thymus-derived CD4-positive, alpha-beta T cell",
    CD4_MEMORY_T: "CD4-positive, alpha-beta memory T cell",
    CD8_T: "CD8-positive, alpha-beta T cell",
    DC: "dendritic cell",
    PDC: "plasmacytoid dendritic cell",
    MEGAKARYOCYTE: "megakaryocyte",
    ERYTHROCYTE: "erythrocyte",
    HSC: "hematopoietic stem cell",
    BETA_CELL: "type B pancreatic cell",
    DUCTAL_CELL: "pancreatic ductal cell",
}
"""The CL name each id above must have (a typo in an id would name another cell type)."""


def check_tables() -> list[str]:
    """Problems with the tables against the shipped CL release: ids that are not current terms or whose name is
    not the expected one (empty when all are right)."""
    from scatlas.atlas.ontology import cell_ontology

    onto = cell_ontology()
    problems = []
    for term, name in EXPECTED_NAMES.items():
        if onto.is_deprecated(term) or onto.name(term) != name:
            problems.append(f"{term}: CL names it {onto.name(term)!r}, expected {name!r}")
    for table, mapping in TABLES.items():
        problems += [f"{table}[{label!r}] = {t}: not checked" for label, t in mapping.items() if t not in EXPECTED_NAMES]
    return problems
