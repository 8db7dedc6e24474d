"""The Cell Ontology terms an annotation may fall back to: CELLxGENE's curated cell subclasses.

CL's is_a graph gives every type many ancestors, and some are poor answers ("motile cell" for a monocyte). The
CELLxGENE curators keep a list of the terms their portal groups cell types by (``cell_subclass``: T cell, B cell,
monocyte, dendritic cell, lymphocyte, myeloid cell, fibroblast, endothelial cell, neuron, ...); shipped with
``cellxgene-ontology-guide``, so no network is needed.
"""

from __future__ import annotations

import functools

from scatlas.atlas.errors import DependencyError


@functools.cache
def curated_subclasses() -> frozenset[str]:
    """CL ids of CELLxGENE's curated cell subclasses (the coarser answers an annotation may give)."""
    try:
        from cellxgene_ontology_guide.curated_ontology_term_lists import get_curated_ontology_term_list
        from cellxgene_ontology_guide.entities import CuratedOntologyTermList
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DependencyError(
            "the Cell Ontology fallback needs the cellxgene-ontology-guide package: pip install cellxgene-ontology-guide"
        ) from exc
    return frozenset(str(t) for t in get_curated_ontology_term_list(CuratedOntologyTermList.CELL_SUBCLASS))
