"""``ingest --ontology-map``: a user table of label -> Cell Ontology term, applied to cells that lack a term.

The table is a CSV file with the columns ``label,ontology_term_id``, read as untrusted input: size and row caps,
every term id checked against CL (an obsolete id is replaced by CL's replacement, or refused), errors naming the
row and never quoting long content. While ingesting, :class:`OntologyFill` fills ``{label_key}_ontology_term_id``
of the cells whose label is in the table and whose term is empty; a term the data already has is never
overwritten (a different one is reported as a conflict).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.ontology import CellOntology, cell_ontology
from scatlas.atlas.validate import MAX_NAME_LENGTH

logger = logging.getLogger(__name__)

__all__ = ["MAP_COLUMNS", "MAX_MAP_BYTES", "MAX_MAP_ROWS", "OntologyFill", "read_ontology_map", "term_column"]

MAP_COLUMNS = ("label", "ontology_term_id")
MAX_MAP_BYTES = 4 << 20
"""Largest ontology map file read (4 MiB: far more than every CL term with a few labels each)."""
MAX_MAP_ROWS = 100_000
MAX_REPORTED = 50
"""Labels listed by name per dataset in a fill report (the counts cover all)."""


def term_column(label_key: str) -> str:
    """The column holding the CL term ids of label column ``label_key`` (``cell_type`` ->
    ``cell_type_ontology_term_id``)."""
    return f"{label_key}_ontology_term_id"


def read_ontology_map(path: str | Path, ontology: CellOntology | None = None) -> dict[str, str]:
    """``{label: CL term id}`` from a CSV file with the columns ``label,ontology_term_id`` (a UTF-8 header row,
    then one row per label; blank rows skipped). InputError, naming the row, for a file over
    :data:`MAX_MAP_BYTES`, other columns, an empty or over-long label, a term id that is not a current CL term
    (an obsolete one with a CL replacement is replaced, logged), or one label given two terms."""
    path = Path(path)
    onto = ontology or cell_ontology()
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(f"--ontology-map {path}: not a file")
        if size > MAX_MAP_BYTES:
            raise InputError(f"--ontology-map {path}: {size} bytes, more than the {MAX_MAP_BYTES} read; split it")
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--ontology-map {path}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"--ontology-map {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from exc
    if "\x00" in text:
        raise InputError(f"--ontology-map {path}: holds NUL bytes; it is not a CSV text file")
    return _parse(text, str(path), onto)


def ontology_table(ontology_map: str | Path | Mapping[str, str]) -> dict[str, str]:
    """The checked ``{label: CL term}`` of an ontology map: a ``label,ontology_term_id`` CSV file
    (:func:`read_ontology_map`) or a mapping, each term resolved (:meth:`CellOntology.resolve_term`)."""
    if not isinstance(ontology_map, Mapping):
        return read_ontology_map(ontology_map)
    onto = cell_ontology()
    return {str(label): onto.resolve_term(str(term), f"ontology map: the term id of entry {n}")[0]
            for n, (label, term) in enumerate(ontology_map.items(), 1)}


def _parse(text: str, name: str, onto: CellOntology) -> dict[str, str]:
    what = f"--ontology-map {name}"
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    out: dict[str, str] = {}
    done = 0  # the last line of the last row read whole: a row that fails to parse starts on the next one
    try:
        header = next(reader, None)
        done = reader.line_num
        cols = tuple(c.strip().lower() for c in header or ())
        if cols != MAP_COLUMNS:
            found = f"{len(header)} field(s) of other names" if header else "nothing"
            raise InputError(f"{what}: row 1 must be the header {','.join(MAP_COLUMNS)} (found {found}); is it the "
                             "label -> Cell Ontology term table (docs/examples/kang2018_cell_types.csv shows one)?")
        for row in reader:
            n = done = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(out) >= MAX_MAP_ROWS:
                raise InputError(f"{what}: more than {MAX_MAP_ROWS} rows; split it")
            if len(row) != 2:
                raise InputError(f"{what}: row {n} has {len(row)} fields, expected 2 (label,ontology_term_id); quote "
                                 "labels that hold commas")
            label, term = row[0].strip(), row[1].strip()
            if not label or len(label) > MAX_NAME_LENGTH or not label.isprintable():
                raise InputError(f"{what}: row {n}: the label is empty, longer than {MAX_NAME_LENGTH} characters or "
                                 "holds control characters")
            usable, note = onto.resolve_term(term, f"{what}: row {n}: the term id")
            if note:
                logger.warning("%s: row %d: %s", what, n, note)
            if out.get(label, usable) != usable:
                raise InputError(f"{what}: row {n}: its label was given another term in an earlier row "
                                 f"({out[label]}, here {usable}); keep one")
            out[label] = usable
    except csv.Error as exc:
        raise InputError(f"{what}: row {done + 1}: {_csv_problem(exc, text, done)}") from None
    if not out:
        raise InputError(f"{what}: no label rows after the header")
    return out


def _csv_problem(exc: csv.Error, text: str, line: int) -> str:
    """What a CSV parse error of the row starting after line ``line`` of ``text`` means and how to mend it
    (Python's csv messages never hold the file's text, but are terse)."""
    problem = str(exc)
    if "field larger than field limit" in problem:
        lines = text.splitlines()
        first = lines[line].split(",", 1)[0] if line < len(lines) else ""
        if len(first) > MAX_NAME_LENGTH:  # the first field, the label (unquoted, or quoted without commas)
            return f"the label is longer than {MAX_NAME_LENGTH} characters; shorten it"
        return (f"a field is longer than {csv.field_size_limit()} characters; a label is at most {MAX_NAME_LENGTH} "
                "characters and a term id is a CL id (e.g. CL:0000236): shorten it")
    if "unexpected end of data" in problem:
        return ('a quoted field is never closed (a " without its closing "); close the quote, or write a " inside '
                'a quoted field as ""')
    if "expected after" in problem:
        return ('a quoted field has more text after its closing "; quote the whole field, and write a " inside it '
                'as ""')
    return "not valid CSV; check its quoting (a field holding commas or quotes goes in \"...\", a \" inside as \"\")"


@dataclass
class OntologyFill:
    """Fills ``term_column(label_key)`` from ``table`` chunk by chunk, counting per label value what happened:
    ``had`` (cells with their own term), ``filled`` (from the table), ``missing`` (neither), ``conflicts``
    (cells whose own term differs from the table's: kept)."""

    table: Mapping[str, str]
    label_key: str = "cell_type"
    had: Counter[str] = field(default_factory=Counter)
    filled: Counter[str] = field(default_factory=Counter)
    missing: Counter[str] = field(default_factory=Counter)
    conflicts: Counter[str] = field(default_factory=Counter)
    label_present: bool = True

    @property
    def term_key(self) -> str:
        return term_column(self.label_key)

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (standardised obs) with empty terms filled where the label is in the table."""
        if self.label_key not in frame.columns:
            self.label_present = False
            return frame
        labels = frame[self.label_key].astype(object).where(frame[self.label_key].notna(), None).map(
            lambda v: None if v is None else str(v)
        )
        col = self.term_key
        terms = (frame[col] if col in frame.columns else pd.Series([None] * len(frame), index=frame.index)).astype(object)
        terms = terms.where(terms.notna(), None).map(lambda t: None if t is None or not str(t).strip() else str(t))
        has_label, empty = labels.notna(), terms.isna()
        mapped = labels.map(lambda v: self.table.get(v) if v is not None else None)
        fill = has_label & empty & mapped.notna()
        self.had.update(labels[has_label & ~empty].value_counts().to_dict())
        self.filled.update(labels[fill].value_counts().to_dict())
        self.missing.update(labels[has_label & empty & mapped.isna()].value_counts().to_dict())
        clash = has_label & ~empty & mapped.notna() & (terms.map(lambda t: None if t is None else t.strip()) != mapped)
        self.conflicts.update(labels[clash].value_counts().to_dict())
        frame = frame.copy()
        frame[col] = terms.where(~fill, mapped).to_numpy(dtype=object)
        return frame

    def report(self) -> dict[str, Any]:
        """Per label value of this dataset: how it got its term. ``labels``: distinct values; ``from_data`` /
        ``from_map`` / ``partly`` / ``unmapped``: how many values had every cell's term from the data, from the
        table, a mix, or some cells with no term; the first :data:`MAX_REPORTED` unmapped and conflicting
        labels."""
        if not self.label_present:
            return {"label_key": self.label_key, "term_column": self.term_key, "label_column_present": False}
        labels = set(self.had) | set(self.filled) | set(self.missing)
        unmapped = sorted((v for v in labels if self.missing[v]), key=lambda v: (-self.missing[v], v))
        from_data = [v for v in labels if self.had[v] and not self.filled[v] and not self.missing[v]]
        from_map = [v for v in labels if self.filled[v] and not self.had[v] and not self.missing[v]]
        partly = [v for v in labels if self.filled[v] and self.had[v] and not self.missing[v]]
        conflicts = sorted(self.conflicts, key=lambda v: (-self.conflicts[v], v))
        return {
            "label_key": self.label_key,
            "term_column": self.term_key,
            "label_column_present": True,
            "labels": len(labels),
            "from_data": len(from_data),
            "from_map": len(from_map),
            "partly_from_map": len(partly),
            "unmapped": len(unmapped),
            "cells_filled": int(sum(self.filled.values())),
            "cells_without_term": int(sum(self.missing.values())),
            "unmapped_labels": unmapped[:MAX_REPORTED],
            "unmapped_resolvable": _resolvable(unmapped[:MAX_REPORTED]),
            "conflicts": {v: int(self.conflicts[v]) for v in conflicts[:MAX_REPORTED]},
            "n_conflicting_labels": len(conflicts),
        }


def _resolvable(labels: list[str]) -> dict[str, list[str]]:
    """Unmapped labels a CL name, synonym or normalised name matches: ``{label: [term, how, CL name]}`` (the
    index build maps them that way; nothing is written at ingest)."""
    onto = cell_ontology()
    out = {}
    for label in labels:
        term, how = onto.lookup(label)
        if term is not None:
            out[label] = [term, how, str(onto.name(term))]
    return out
