"""Label classes: the values of an atlas label column merged by Cell Ontology term, stored with the index.

Atlases mix vocabularies ("B cell" in one dataset, "B cells" in another; "CD14+ monocyte" with the term of a
classical monocyte). For each label column ``K`` the index keeps one class per CL term: every value that maps to
the term (:func:`atlas.ontology.map_label_values`: the cells' own ``K_ontology_term_id`` when that column exists,
else an exact CL name or synonym, else a normalised name) joins it, and the class keeps the atlas's own most
frequent value as its name (an update keeps the name the previous version gave while that value is still in the
atlas, so that answers do not change names between versions). Values without a term stay classes of their own.
The label heads are trained on the classes, and annotation can sum class probabilities up the CL DAG from the stored ancestors.

Layout: ``INDEX/labels/label_classes.json`` (format, the build it belongs to, the ontology release, one entry per
label column), written atomically and recorded in the manifest (``labels_files``), checked before it is read.
Indexes built before label classes (no file, or a key without an entry) get identity classes: each value its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from scatlas.atlas.atomic import read_json_object, write_json_atomic
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import escaped, escaped_list
from scatlas.index.manifest import (
    CELLS_DB_FILE,
    LABELS_DIR,
    LABELS_FILE,
    FileRecord,
    manifest_digest,
    read_manifest,
    record_labels_files,
)
from scatlas.index.metadata import CELLS_TABLE, columns_of, connect
from scatlas.index.shard import file_record
from scatlas.index.verify import check_files

CELL_TYPE_KEY = "cell_type"
"""The schema's cell-type column: its values are cell types (given close CL terms when unmapped) even when none of
them maps to a term."""

logger = logging.getLogger(__name__)

__all__ = [
    "LABELS_FORMAT", "LabelClasses", "compute_label_classes", "ensure_label_classes", "identity_classes",
    "load_label_classes",
]

LABELS_FORMAT = 1
DATASET_COLUMN = "dataset_id"
REBUILD_HINT = ("rerun the build with its own arguments (`scatlas build --atlas ATLAS --index {index} ...`: on a "
                "built index this recomputes the label classes and heads) or rebuild the index")


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class LabelClasses:
    """The classes of one label column.

    ``classes``: sorted class names; ``class_term``: class -> CL id (classes without a term are absent);
    ``value_class``: every atlas value -> its class; ``term_names``: CL id -> CL name for every class term and
    ancestor; ``term_ancestors``: class term -> its ancestor CL ids (not itself); ``report``: how values were
    mapped, overall and per dataset (``{}`` for identity classes).
    """

    key: str
    classes: tuple[str, ...]
    class_term: Mapping[str, str] = field(default_factory=dict)
    value_class: Mapping[str, str] = field(default_factory=dict)
    term_names: Mapping[str, str] = field(default_factory=dict)
    term_ancestors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    report: Mapping[str, Any] = field(default_factory=dict)

    def class_of(self, values: Iterable[Any]) -> np.ndarray:
        """Object array of the classes of ``values``: a value not in ``value_class`` maps to itself (as str), None
        (or NaN) stays None."""
        vc = self.value_class
        out = [
            None if v is None or (isinstance(v, float) and v != v) else vc.get(str(v), str(v))
            for v in (values.tolist() if isinstance(values, np.ndarray) else values)
        ]
        return np.asarray(out + [None], dtype=object)[:-1]  # the sentinel keeps a 1-d object array

    @property
    def merged(self) -> dict[str, list[str]]:
        """Classes holding more than one value: class -> its values (sorted)."""
        groups: dict[str, list[str]] = {}
        for value, cls in self.value_class.items():
            groups.setdefault(cls, []).append(value)
        return {c: sorted(vs) for c, vs in sorted(groups.items()) if len(vs) > 1}

    def digest(self) -> str:
        """A short id of the value -> class mapping (what label heads record as the classes they were trained on)."""
        text = json.dumps(dict(self.value_class), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "classes": list(self.classes),
            "class_term": dict(self.class_term),
            "value_class": dict(self.value_class),
            "term_names": dict(self.term_names),
            "term_ancestors": {t: list(a) for t, a in self.term_ancestors.items()},
            "report": dict(self.report),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LabelClasses:
        """From :meth:`to_json`'s form; ValueError / TypeError / KeyError / AttributeError when it is malformed."""
        classes = tuple(str(c) for c in d["classes"])
        value_class = {str(v): str(c) for v, c in dict(d["value_class"]).items()}
        if set(value_class.values()) - set(classes):
            raise ValueError("value_class names classes that are not in classes")
        return cls(
            key=str(d["key"]),
            classes=classes,
            class_term=_frozen({str(c): str(t) for c, t in dict(d["class_term"]).items()}),
            value_class=_frozen(value_class),
            term_names=_frozen({str(t): str(n) for t, n in dict(d["term_names"]).items()}),
            term_ancestors=_frozen({str(t): tuple(str(a) for a in anc) for t, anc in dict(d["term_ancestors"]).items()}),
            report=_frozen(dict(d.get("report") or {})),
        )


def identity_classes(key: str, values: Iterable[Any]) -> LabelClasses:
    """Each distinct value its own class, no terms (an index built before label classes)."""
    vals = sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and v != v)})
    return LabelClasses(key=key, classes=tuple(vals), value_class=_frozen({v: v for v in vals}))


# -- computing ----------------------------------------------------------------------------------------------------


def _term_counts(con: Any, key: str, term_col: str, by_dataset: bool) -> dict[Any, dict[str, dict[str, int]]]:
    """``{dataset or None: {value: {term: cells}}}`` of the cells with both a value and a term."""
    ds = f"CAST({quote_ident(DATASET_COLUMN)} AS VARCHAR)" if by_dataset else "NULL"
    k, t = quote_ident(key), quote_ident(term_col)
    rows = con.execute(
        f"SELECT {ds}, CAST({k} AS VARCHAR), CAST({t} AS VARCHAR), count(*) FROM {CELLS_TABLE} "
        f"WHERE {k} IS NOT NULL AND {t} IS NOT NULL GROUP BY ALL"
    ).fetchall()
    out: dict[Any, dict[str, dict[str, int]]] = {}
    for d, v, term, n in rows:
        out.setdefault(d, {}).setdefault(v, {})[term] = int(n)
    return out


def _value_counts(con: Any, key: str, by_dataset: bool) -> dict[Any, dict[str, int]]:
    """``{dataset or None: {value: cells}}`` of the non-NULL values of ``key``."""
    ds = f"CAST({quote_ident(DATASET_COLUMN)} AS VARCHAR)" if by_dataset else "NULL"
    k = quote_ident(key)
    rows = con.execute(
        f"SELECT {ds}, CAST({k} AS VARCHAR), count(*) FROM {CELLS_TABLE} WHERE {k} IS NOT NULL GROUP BY ALL"
    ).fetchall()
    out: dict[Any, dict[str, int]] = {}
    for d, v, n in rows:
        out.setdefault(d, {})[v] = int(n)
    return out


def _merge(counts: Mapping[str, int], terms: Mapping[str, str | None], keep: Collection[str] = ()
           ) -> tuple[dict[str, str], dict[str, str]]:
    """(value -> class, class -> term): values of one term form one class named after its most frequent value, or
    after one of them in ``keep`` (the previous version's class names: answers keep their names across updates)."""
    by_term: dict[str, list[str]] = {}
    for v, t in terms.items():
        if t is not None:
            by_term.setdefault(t, []).append(v)
    value_class = {v: v for v in counts}
    class_term: dict[str, str] = {}
    for term, vals in by_term.items():
        name = min(vals, key=lambda v: (v not in keep, -counts[v], v))
        class_term[name] = term
        for v in vals:
            value_class[v] = name
    return value_class, class_term


def compute_label_classes(con: Any, key: str, ontology: Any = None, keep: Collection[str] = ()) -> LabelClasses:
    """The label classes of column ``key`` of the cells table on ``con`` (see the module's description). ``keep``:
    class names to keep where they are still among a class' values (an update's previous classes).

    Data terms come from ``{key}_ontology_term_id`` when the table has it (malformed, unknown or non-CL ids are
    ignored, obsolete ones replaced); values without one are looked up by CL name, synonym and normalised name. A
    column none of whose values maps to a CL term (not a cell-type column) keeps identity classes and gets no
    suggestions. InputError when ``key`` is not a column.
    """
    from scatlas.atlas.ontology import cell_ontology, map_label_values

    columns = columns_of(con)
    if key not in columns:
        raise InputError(f"label key {escaped(key)} is not a column of the index's cell table; available: "
                         f"{escaped_list(columns)}")
    onto = ontology or cell_ontology()
    term_col = f"{key}_ontology_term_id"
    has_terms = term_col in columns and term_col != key
    by_ds = DATASET_COLUMN in columns
    counts = _value_counts(con, key, False).get(None, {})
    data = _term_counts(con, key, term_col, False).get(None, {}) if has_terms else {}
    overall = map_label_values(list(counts), list(counts.values()), data, ontology=onto, suggest=0)
    # a column holds cell types when it is named so, or when any of its values maps to a CL term
    cell_types = key == CELL_TYPE_KEY or any(t is not None for t in overall.terms.values())
    if cell_types:  # suggestions only for a column that holds cell types
        overall = map_label_values(list(counts), list(counts.values()), data, ontology=onto)
    value_class, class_term = _merge(counts, overall.terms, frozenset(keep))
    ancestors = {t: tuple(sorted(onto.ancestors(t))) for t in sorted(set(class_term.values()))}
    names = {t: str(onto.name(t)) for t in sorted(set(ancestors) | {a for anc in ancestors.values() for a in anc})
             if onto.name(t) is not None}
    report: dict[str, Any] = {
        "ontology": onto.description,
        "term_column": term_col if has_terms else None,
        "cell_type_column": cell_types,
        "values": len(counts),
        "classes": len(set(value_class.values())),
        **overall.to_json(),
    }
    if by_ds and cell_types:
        ds_counts = _value_counts(con, key, True)
        ds_terms = _term_counts(con, key, term_col, True) if has_terms else {}
        report["datasets"] = {
            str(d): map_label_values(list(c), list(c.values()), ds_terms.get(d, {}), ontology=onto).to_json()
            for d, c in sorted(ds_counts.items(), key=lambda kv: str(kv[0]))
        }
    merged = {c: t for c, t in class_term.items() if sum(1 for v in value_class.values() if v == c) > 1}
    if merged:
        logger.info("label classes of %s: %d values in %d classes (%d classes merge values of one CL term)",
                    key, len(counts), report["classes"], len(merged))
    return LabelClasses(
        key=key, classes=tuple(sorted(set(value_class.values()))), class_term=_frozen(class_term),
        value_class=_frozen(value_class), term_names=_frozen(names), term_ancestors=_frozen(ancestors),
        report=_frozen(report),
    )


# -- storing and loading --------------------------------------------------------------------------------------------


def _path(index_dir: Path) -> Path:
    return index_dir / LABELS_DIR / LABELS_FILE


def _read(index_dir: Path, recorded: Mapping[str, FileRecord] | None) -> dict[str, Any] | None:
    """The stored payload (None when there is none); IndexFormatError when recorded files are missing or damaged
    or the file is unreadable."""
    path = _path(index_dir)
    hint = REBUILD_HINT.format(index=index_dir)
    if recorded:
        check_files(index_dir, dict(recorded), fix=f"the manifest records label classes that cannot be used: {hint}")
    if not path.is_file():
        return None
    return read_json_object(path, hint)


def _usable(payload: dict[str, Any] | None, digest: str, index_dir: Path, *, recomputing: bool = False) -> dict[str, Any]:
    """The stored entries when they belong to this build in a known format, else ``{}`` (logged: a warning for a
    reader, a note when the caller is ``recomputing`` them, e.g. a resumed build or update)."""
    if payload is None:
        return {}
    if payload.get("format") != LABELS_FORMAT:
        logger.warning("%s has format %r (this scatlas reads %d): label classes ignored; %s", _path(index_dir),
                       payload.get("format"), LABELS_FORMAT, REBUILD_HINT.format(index=index_dir))
        return {}
    if payload.get("manifest_sha256") != digest:
        if recomputing:
            logger.info("the label classes in %s were stored for an earlier state of this build: recomputing them",
                        _path(index_dir))
        else:
            logger.warning("the label classes in %s belong to another build of the index: ignored (each value is its "
                           "own class); %s", _path(index_dir), REBUILD_HINT.format(index=index_dir))
        return {}
    keys = payload.get("keys")
    return dict(keys) if isinstance(keys, dict) else {}


def load_label_classes(
    index_dir: str | Path, *, recorded: Mapping[str, FileRecord] | None = None, digest: str | None = None
) -> dict[str, LabelClasses]:
    """The label classes stored with an index (``{}`` when none, or when they belong to another build: logged).

    ``recorded``: the manifest's records of ``labels/*`` (every one must be present and intact: IndexFormatError
    otherwise); ``digest``: the index build id (default: read from the manifest).
    """
    index_dir = Path(index_dir)
    entries = _usable(_read(index_dir, recorded), digest or manifest_digest(index_dir), index_dir)
    out = {}
    for key, entry in entries.items():
        try:
            out[str(key)] = LabelClasses.from_json(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexFormatError(
                f"the label classes of {key!r} in {_path(index_dir)} are malformed ({type(exc).__name__}); "
                + REBUILD_HINT.format(index=index_dir)
            ) from exc
    return out


def ensure_label_classes(index_dir: str | Path, keys: Iterable[str], *, con: Any = None,
                         previous: Mapping[str, LabelClasses] | None = None) -> dict[str, LabelClasses]:
    """Compute and store the label classes of ``keys`` for the built index at ``index_dir`` (those stored for this
    build are kept and not recomputed); returns every stored key's classes. Written atomically, then recorded in
    the manifest. ``con``: a connection to the index's cells table (default: opened here). ``previous``: the
    classes of the version this one updates, whose names are kept where their values still are."""
    index_dir = Path(index_dir)
    wanted = list(dict.fromkeys(keys))
    manifest = read_manifest(index_dir)
    digest = manifest_digest(index_dir)
    try:
        stored = _usable(_read(index_dir, manifest.labels_files), digest, index_dir, recomputing=True)
    except IndexFormatError as exc:
        logger.warning("%s; recomputing them", exc)
        stored = {}
    missing = [k for k in wanted if k not in stored]
    if not missing and not stored:
        return {}
    if not missing and _path(index_dir).is_file():
        _record(index_dir)
        return load_label_classes(index_dir, digest=digest)
    own = con is None
    con = connect(index_dir / CELLS_DB_FILE) if own else con
    try:
        for key in missing:
            keep = previous[key].classes if previous and key in previous else ()
            stored[key] = compute_label_classes(con, key, keep=keep).to_json()
    finally:
        if own:
            con.close()
    from scatlas.atlas.ontology import cell_ontology

    payload = {"format": LABELS_FORMAT, "manifest_sha256": digest, "ontology": cell_ontology().description,
               "keys": dict(sorted(stored.items()))}
    write_json_atomic(_path(index_dir), payload)
    _record(index_dir)
    return {k: LabelClasses.from_json(v) for k, v in stored.items()}


def _record(index_dir: Path) -> None:
    """Record the size and SHA-256 of every file in ``labels/`` in the index manifest."""
    records = {
        p.relative_to(index_dir).as_posix(): file_record(p)
        for p in sorted((index_dir / LABELS_DIR).rglob("*")) if p.is_file() and not p.name.startswith(".")
    }
    record_labels_files(index_dir, records)
