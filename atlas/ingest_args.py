"""Checks of ``ingest``'s arguments and inputs, made before anything is written: ``--obs-map`` and ``--obs-set``
targets, the ontology map, and that the inputs are of the store's species."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import InputError, SpeciesMismatchError
from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.ontology_map import ontology_table, term_column
from scatlas.atlas.schema import STANDARD_OBS_COLUMNS
from scatlas.atlas.species import first_mismatch, guess_species_of_genes
from scatlas.atlas.validate import check_name, escaped

logger = logging.getLogger(__name__)

OBS_SET_RESERVED = {
    "obs_id": "it is each cell's name",
    "dataset_id": "it is set by the ingest; use --dataset-id",
    "is_primary_data": "it decides which cells are stored; use --keep-non-primary or --obs-map",
    "soma_joinid": "it is the cell id",
}
"""Columns --obs-set may not set, and why."""

OBS_MAP_RESERVED = {
    "obs_id": "it is each cell's name, taken from the obs index",
    "dataset_id": "it is set by the ingest; name the dataset with --dataset-id",
    "soma_joinid": "it is the cell id the store assigns",
}
"""--obs-map targets refused: the ingest sets these columns itself, so values mapped onto them would be lost."""


def normalised(name: str) -> str:
    """How DuckDB (case-insensitive) and people (blanks) tell column names apart."""
    return name.strip().casefold()


def check_obs_map(obs_map: Mapping[str, str] | None) -> dict[str, str]:
    """The ``--obs-map`` renames, with every target the ingest sets itself (:data:`OBS_MAP_RESERVED`, in any
    case) refused: the mapped values would be thrown away."""
    out = dict(obs_map or {})
    reserved = {c.casefold(): c for c in OBS_MAP_RESERVED}
    for source, target in out.items():
        hit = reserved.get(str(target).strip().casefold())
        if hit is not None:
            raise InputError(
                f"--obs-map {escaped(source, 40)}={escaped(target, 40)}: the column {hit} cannot be a target "
                f"({OBS_MAP_RESERVED[hit]}); map {escaped(source, 40)} onto another name (e.g. "
                f"--obs-map {escaped(source, 40)}=batch), or drop this --obs-map"
            )
    return out


def check_obs_set(obs_set: Mapping[str, str] | None) -> dict[str, str]:
    """The checked ``--obs-set`` columns: names usable as columns (check_name), not reserved, not a schema column
    in another case, not twice; values strings."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    standard = {normalised(c): c for c in STANDARD_OBS_COLUMNS}
    for col, value in (obs_set or {}).items():
        name = check_name(col, "--obs-set column")
        if name in OBS_SET_RESERVED:
            raise InputError(f"--obs-set {escaped(name)}: this column cannot be set ({OBS_SET_RESERVED[name]})")
        if normalised(name) in standard and name != standard[normalised(name)]:
            raise InputError(f"--obs-set {escaped(name)}: the schema column is {standard[normalised(name)]!r}; "
                             "use that name")
        if normalised(name) in seen:
            raise InputError(f"--obs-set names the column {escaped(name)} twice (as {escaped(seen[normalised(name)])})")
        if not isinstance(value, str):
            raise InputError(f"--obs-set {escaped(name)}: the value must be a string, got {type(value).__name__}")
        seen[normalised(name)] = name
        out[name] = value
    return out


def checked_ontology_map(ontology_map: str | Path | Mapping[str, str] | None, label_key: str) -> dict[str, str] | None:
    """The checked ``{label: CL term}`` of ``--ontology-map`` (read before anything else is opened), or None."""
    if ontology_map is None:
        return None
    check_name(label_key, "--ontology-label-key")
    check_name(term_column(label_key), "--ontology-label-key's term column")
    return ontology_table(ontology_map)


def check_species(plans: Sequence[Any], store_genes: GeneVocabulary | None, allow: bool) -> None:
    """Refuse the datasets planned for an ingest (``plans``: their ``dataset_id`` and ``source.genes``) whose genes look like another species than the store's or each other's (SpeciesMismatchError;
    a warning when ``allow``)."""
    named = [("the atlas store", guess_species_of_genes(store_genes))] if store_genes is not None and len(store_genes) else []
    named += [(f"dataset {escaped(p.dataset_id, 60)}", guess_species_of_genes(p.source.genes)) for p in plans]
    pair = first_mismatch(named)
    if pair is None:
        return
    (name_a, a), (name_b, b) = pair
    text = (f"species mismatch: the genes of {name_a} look {a.species} ({a.basis}), those of {name_b} "
            f"{b.species} ({b.basis})")
    if allow:
        logger.warning("%s; ingesting anyway as asked (allow_species_mismatch): genes are matched by name", text)
        return
    raise SpeciesMismatchError(
        f"{text}: an atlas store holds one species (genes are matched by name across datasets, so mouse Cd3e would "
        "be stored as human CD3E); ingest it into a store of its own, or pass --allow-species-mismatch "
        "(allow_species_mismatch=True in Python) to mix them anyway"
    )


