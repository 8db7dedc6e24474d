"""The cell metadata schema of the atlas store (the CELLxGENE Census obs columns scatlas relies on)."""

from __future__ import annotations

import pyarrow as pa

STANDARD_OBS_COLUMNS: tuple[str, ...] = (
    "obs_id",
    "dataset_id",
    "donor_id",
    "assay",
    "cell_type",
    "cell_type_ontology_term_id",
    "tissue",
    "tissue_general",
    "disease",
    "sex",
    "development_stage",
    "is_primary_data",
)
"""Stored in the SOMA ``obs`` dataframe and the DuckDB ``cells`` table; missing ones are NULL."""

RESERVED_COLUMNS = ("soma_joinid",)


def obs_arrow_schema() -> pa.Schema:
    """Arrow schema of the SOMA ``obs`` dataframe: ``soma_joinid`` and the standard columns."""
    fields = [pa.field("soma_joinid", pa.int64(), nullable=False)]
    for name in STANDARD_OBS_COLUMNS:
        fields.append(pa.field(name, pa.bool_() if name == "is_primary_data" else pa.large_string()))
    return pa.schema(fields)


def var_arrow_schema() -> pa.Schema:
    """Arrow schema of the SOMA ``var`` dataframe: ``soma_joinid`` and the gene identifiers."""
    return pa.schema(
        [
            pa.field("soma_joinid", pa.int64(), nullable=False),
            pa.field("gene_key", pa.large_string()),
            pa.field("feature_id", pa.large_string()),
            pa.field("feature_name", pa.large_string()),
        ]
    )
