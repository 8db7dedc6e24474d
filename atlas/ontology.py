"""The Cell Ontology (CL), offline: term names, synonyms, ancestors, and mapping free-text labels to terms.

The ontology comes from the ``cellxgene-ontology-guide`` package (the CL release of a CELLxGENE schema version,
shipped with the package; no network). It is imported on first use, not when this module is imported.

Labels are mapped to terms, in this order of trust (:func:`map_label_values`): the data's own term ids, a user
table, the exact CL name, an exact CL synonym, then a normalised name (case, plurals, ``+``/``-`` markers,
hyphens, underscores and punctuation ignored). :meth:`CellOntology.suggest` lists close terms for a label that
did not map; suggestions are reported, never applied.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scatlas.atlas.errors import DependencyError, InputError
from scatlas.atlas.ontology_suggest import TermSuggester
from scatlas.atlas.validate import escaped

logger = logging.getLogger(__name__)

__all__ = [
    "CL_ID", "HOWS", "CellOntology", "LabelMapping", "cell_ontology", "describe_terms", "map_label_values",
    "normalise_label",
]

CL_ID = re.compile(r"CL:\d{7}")
"""What a Cell Ontology term id looks like (``CL:`` and seven digits)."""
HOWS = ("data", "user", "name", "synonym", "normalised", "unmapped")
"""How a label value got its term, most trusted first."""
MAX_LABEL_LENGTH = 256
"""Longer labels are never looked up (and never suggested for)."""
MAX_NOTES = 50
"""Notes (replaced or ignored term ids) kept in a mapping's JSON form; ``n_notes`` counts them all."""
MAX_SUGGESTED = 200
"""Unmapped values given suggestions per mapping (the most frequent first): a label's suggestions cost up to tens of
milliseconds (:mod:`atlas.ontology_suggest`)."""

_POSITIVE = re.compile(r"(?<=\w)\s*\+(?=\s|$|[,;/)])")
_NEGATIVE = re.compile(r"(?<=\w)\s*-(?=\s|$|[,;/)])")
_PUNCT = re.compile(r"[\s_\-,;:./()\[\]'\"]+")


ABBREVIATIONS = {
    "b": "b cell", "t": "t cell", "nk": "natural killer cell", "mono": "monocyte", "dc": "dendritic cell",
    "pdc": "plasmacytoid dendritic cell", "cdc": "conventional dendritic cell", "mk": "megakaryocyte",
    "eryth": "erythrocyte", "treg": "regulatory t cell", "mac": "macrophage", "neu": "neutrophil",
}
"""Short forms common in cell-type labels, expanded when suggesting terms (suggestions only: never applied)."""


def _expand(words: list[str]) -> str:
    """Normalised words with :data:`ABBREVIATIONS` expanded, a doubled ``cell`` once ("t cells" -> "t cell")."""
    out: list[str] = []
    for word in words:
        for part in ABBREVIATIONS.get(word, word).split():
            if not (part == "cell" and out and out[-1] == "cell"):
                out.append(part)
    return " ".join(out)


def normalise_label(label: str) -> str:
    """``label`` in the form normalised lookups compare: case-folded, ``X+`` / ``X-`` as ``X positive`` /
    ``X negative``, hyphens, underscores and punctuation as blanks, plural words singular (``cells`` -> ``cell``,
    ``monocytes`` -> ``monocyte``), blanks collapsed."""
    text = _NEGATIVE.sub(" negative", _POSITIVE.sub(" positive", str(label).strip()))
    words = [w for w in _PUNCT.split(text.casefold()) if w]
    return " ".join(_singular(w) for w in words)


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _ontology_data(schema_version: str | None) -> tuple[Any, str, str, dict[str, Any]]:
    """(parser, schema version, CL version, CL terms) from cellxgene-ontology-guide."""
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
    except ImportError as exc:  # a declared dependency: only a broken install lacks it
        raise DependencyError(
            "the Cell Ontology needs the cellxgene-ontology-guide package: pip install cellxgene-ontology-guide"
        ) from exc
    try:
        parser = OntologyParser(schema_version)
        terms = parser.cxg_schema.ontology("CL")
    except (ValueError, KeyError, OSError) as exc:
        raise DependencyError(
            f"cellxgene-ontology-guide cannot load the Cell Ontology ({type(exc).__name__}); reinstall it"
        ) from exc
    version = str(parser.cxg_schema.supported_ontologies.get("CL", {}).get("version", "unknown"))
    return parser, str(parser.cxg_schema.version), version, terms


_TAXON = re.compile(r"\([^()]*\)\s*$")
"""A CL name ending in a taxon, e.g. "striatal SST-CHODL GABAergic interneuron (Primate)": such a term is matched by
its exact name only, never through a synonym or a normalised name ("Sst_Chodl" of a mouse atlas is not the primate
type). In the CL release shipped every such parenthesis names a taxon (Mmus, Primate, Homo sapiens, sensu ...)."""


class CellOntology:
    """The Cell Ontology of one CELLxGENE schema version (``schema_version``; None: the newest the package
    ships). Lookups are cached; use :func:`cell_ontology` for the shared instance."""

    def __init__(self, schema_version: str | None = None) -> None:
        _parser, self.schema_version, self.version, terms = _ontology_data(schema_version)
        self._terms: dict[str, Any] = dict(terms)
        by_name: dict[str, str] = {}
        by_synonym: dict[str, set[str]] = {}
        by_normalised: dict[str, set[str]] = {}
        for term, meta in self._terms.items():
            if meta.get("deprecated"):
                continue
            name = str(meta.get("label", ""))
            by_name[name] = term
            if _TAXON.search(name):  # "... (Primate)", "(Mmus)", "(sensu Vertebrata)": by its exact name only
                continue
            by_normalised.setdefault(normalise_label(name), set()).add(term)
            for syn in meta.get("synonyms") or ():
                by_synonym.setdefault(str(syn), set()).add(term)
                by_normalised.setdefault(normalise_label(str(syn)), set()).add(term)
        self._by_name = by_name
        self._by_synonym = {s: next(iter(t)) for s, t in by_synonym.items() if len(t) == 1}  # ambiguous: left out
        self._by_normalised = {s: next(iter(t)) for s, t in by_normalised.items() if len(t) == 1}
        self._choices: TermSuggester | None = None

    @property
    def description(self) -> dict[str, str]:
        """Which ontology this is (recorded with anything mapped through it)."""
        return {"ontology": "CL", "version": self.version, "cellxgene_schema": self.schema_version}

    def is_term(self, term_id: str) -> bool:
        """Whether ``term_id`` is a CL term id present in this release (deprecated ones included)."""
        return isinstance(term_id, str) and CL_ID.fullmatch(term_id) is not None and term_id in self._terms

    def is_deprecated(self, term_id: str) -> bool:
        """Whether ``term_id`` is a CL term this release marks obsolete."""
        return self.is_term(term_id) and bool(self._terms[term_id].get("deprecated"))

    def name(self, term_id: str) -> str | None:
        """The CL name of ``term_id``, or None when it is not a CL term."""
        return str(self._terms[term_id].get("label")) if self.is_term(term_id) else None

    def synonyms(self, term_id: str) -> tuple[str, ...]:
        """The exact synonyms of ``term_id`` (empty when none or not a term)."""
        return tuple(str(s) for s in self._terms[term_id].get("synonyms") or ()) if self.is_term(term_id) else ()

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one shared instance per schema version, kept for the process
    def ancestors(self, term_id: str) -> frozenset[str]:
        """Every ancestor of ``term_id`` in CL (is-a and the relations CELLxGENE follows), not itself; empty when
        it is not a term."""
        if not self.is_term(term_id):
            return frozenset()
        return frozenset(str(a) for a in self._terms[term_id].get("ancestors") or {} if a != term_id)

    def resolve_term(self, term_id: str, what: str = "term id") -> tuple[str, str | None]:
        """``(usable term id, note)``: ``term_id`` when it is a current CL term; its replacement when it is
        deprecated and CL names one (``note`` says so). InputError when it is malformed, not in CL, or deprecated
        without a CL replacement (``what`` names it in the message)."""
        text = str(term_id).strip()
        if CL_ID.fullmatch(text) is None:
            raise InputError(f"{what} is not a Cell Ontology id (CL: and seven digits, e.g. CL:0000236)")
        if text not in self._terms:
            raise InputError(f"{what} {text} is not a term of the Cell Ontology {self.version}")
        meta = self._terms[text]
        if not meta.get("deprecated"):
            return text, None
        repl = meta.get("replaced_by")
        if isinstance(repl, str) and self.is_term(repl) and not self.is_deprecated(repl):
            return repl, f"{text} is obsolete in CL {self.version}; replaced by {repl} ({self.name(repl)})"
        consider = [c for c in meta.get("consider") or () if self.is_term(c) and not self.is_deprecated(c)]
        hint = f"; CL suggests considering {', '.join(consider[:5])}" if consider else ""
        raise InputError(f"{what} {text} is obsolete in the Cell Ontology {self.version} and has no single "
                         f"replacement{hint}: choose a current term")

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def lookup(self, label: str) -> tuple[str | None, str]:
        """``(term id or None, how)`` of a free-text label: ``"name"`` (exact CL name), ``"synonym"`` (exact
        synonym, unambiguous), ``"normalised"`` (see :func:`normalise_label`), else ``(None, "unmapped")``."""
        text = str(label).strip()
        if not text or len(text) > MAX_LABEL_LENGTH:
            return None, "unmapped"
        if text in self._by_name:
            return self._by_name[text], "name"
        if text in self._by_synonym:
            return self._by_synonym[text], "synonym"
        term = self._by_normalised.get(normalise_label(text))
        return (term, "normalised") if term is not None else (None, "unmapped")

    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def suggest(self, label: str, n: int = 3) -> tuple[tuple[str, str], ...]:
        """Up to ``n`` ``(term id, CL name)`` close to ``label`` (its words, abbreviations expanded, against the
        normalised CL names and synonyms: :mod:`atlas.ontology_suggest`), best first. For reports only: a suggestion
        is never applied."""
        text = str(label).strip()
        if not text or len(text) > MAX_LABEL_LENGTH or n < 1:
            return ()
        if self._choices is None:
            self._choices = TermSuggester(self._by_normalised)
        out: list[tuple[str, str]] = []
        expanded = _expand(normalise_label(text).split())
        if expanded in self._by_normalised:  # "CD14 Mono" -> "cd14 monocyte"
            term = self._by_normalised[expanded]
            out.append((term, str(self.name(term))))
        if len(expanded) < 4:  # too short for a fuzzy match to mean anything
            return tuple(out)
        for term in self._choices.suggest(expanded, n + 1):
            if all(term != t for t, _ in out):
                out.append((term, str(self.name(term))))
            if len(out) == n:
                break
        return tuple(out)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"CellOntology(CL {self.version}, schema {self.schema_version}, {len(self._terms)} terms)"


@functools.lru_cache(maxsize=4)
def cell_ontology(schema_version: str | None = None) -> CellOntology:
    """The shared :class:`CellOntology` of ``schema_version`` (None: the newest shipped), loaded once."""
    return CellOntology(schema_version)


@dataclass(frozen=True)
class LabelMapping:
    """Each label value's CL term (None: unmapped) and how it got it (:data:`HOWS`); close terms of the unmapped
    values (never applied); notes on term ids of the data or user table that were replaced or ignored."""

    terms: Mapping[str, str | None]
    how: Mapping[str, str]
    counts: Mapping[str, int]
    suggestions: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def by_how(self) -> dict[str, int]:
        """How many values were mapped each way (every key of :data:`HOWS`)."""
        out = dict.fromkeys(HOWS, 0)
        for how in self.how.values():
            out[how] += 1
        return out

    def unmapped(self) -> list[str]:
        """The values without a term, most cells first."""
        return sorted((v for v, t in self.terms.items() if t is None), key=lambda v: (-self.counts.get(v, 0), v))

    def to_json(self) -> dict[str, Any]:
        """The mapping as JSON-ready data: ``by_how``, ``mapped`` (value -> [term, how]), ``unmapped`` (value ->
        suggestions as [term, name] pairs), ``unmapped_by_cells`` (those values, most cells first), ``notes``."""
        return {
            "by_how": self.by_how(),
            "mapped": {v: [t, self.how[v]] for v, t in sorted(self.terms.items()) if t is not None},
            "unmapped": {v: [list(s) for s in self.suggestions.get(v, ())] for v in self.unmapped()},
            "unmapped_by_cells": self.unmapped(),  # most cells first (the JSON file sorts the mapping's keys)
            "notes": list(self.notes[:MAX_NOTES]),
            "n_notes": len(self.notes),
        }


def _data_term(
    value: str, found: Mapping[str, int] | str, ontology: CellOntology, notes: list[str]
) -> str | None:
    """The most frequent usable CL term among a value's cells (deprecated ones replaced, others ignored)."""
    ranked = {found: 1} if isinstance(found, str) else dict(found)
    for term, _n in sorted(ranked.items(), key=lambda kv: (-int(kv[1]), str(kv[0]))):
        try:
            usable, note = ontology.resolve_term(str(term), "term id")
        except InputError:
            notes.append(f"value {escaped(value, 60)}: its term id {escaped(term, 40)} is not a current CL term; "
                         "ignored")
            continue
        if note:
            notes.append(f"value {escaped(value, 60)}: {note}")
        return usable
    return None


def map_label_values(
    values: Sequence[str],
    counts: Sequence[int] | None = None,
    term_ids: Mapping[str, Mapping[str, int] | str] | None = None,
    user_map: Mapping[str, str] | None = None,
    *,
    ontology: CellOntology | None = None,
    suggest: int = 3,
) -> LabelMapping:
    """Map each distinct label value to a CL term.

    Parameters
    ----------
    values: the distinct label values.
    counts: cells per value (ranks values for reports and suggestions; default 1 each).
    term_ids: the data's own term ids: value -> ``{term id: cells}`` (or one term id); the most frequent usable
        term wins (deprecated ids are replaced by CL's replacement, malformed or unknown ones ignored, noted).
    user_map: a user table, label -> term id; its ids are checked (InputError when one is not a usable CL term).
    ontology: the ontology (default: :func:`cell_ontology`).
    suggest: close terms listed per unmapped value (0: none).

    Order: the data's term, the user table, the exact CL name or synonym, the normalised name; else unmapped.
    """
    onto = ontology or cell_ontology()
    vals = [str(v) for v in values]
    n_cells = {v: int(c) for v, c in zip(vals, counts if counts is not None else [1] * len(vals), strict=True)}
    notes: list[str] = []
    user: dict[str, str] = {}
    for n, (label, user_term) in enumerate(dict(user_map or {}).items(), 1):
        usable, note = onto.resolve_term(str(user_term), f"the term id of the ontology map's entry {n}")
        user[str(label)] = usable
        if note:
            notes.append(f"label {escaped(label, 60)}: {note}")
    data = dict(term_ids or {})
    terms: dict[str, str | None] = {}
    how: dict[str, str] = {}
    for v in vals:
        found = _data_term(v, data[v], onto, notes) if v in data else None
        if found is not None:
            terms[v], how[v] = found, "data"
        elif v in user:
            terms[v], how[v] = user[v], "user"
        else:
            terms[v], how[v] = onto.lookup(v)
    unmapped = sorted((v for v in vals if terms[v] is None), key=lambda v: (-n_cells[v], v))
    suggestions = {v: onto.suggest(v, suggest) for v in unmapped[:MAX_SUGGESTED]} if suggest > 0 else {}
    return LabelMapping(terms, how, n_cells, suggestions, tuple(notes))


def describe_terms(ontology: CellOntology, term_ids: Iterable[str]) -> dict[str, str]:
    """CL id -> CL name of ``term_ids`` (ids that are not terms left out)."""
    out = {}
    for t in term_ids:
        name = ontology.name(t)
        if name is not None:
            out[t] = name
    return out
