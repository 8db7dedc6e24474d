"""Where a command may write: guards for output directories and files, and OS errors turned into clear messages.

The rule: a command writes only into paths it created or that hold its own kind of output (a classifier directory
may replace a classifier directory, a sweep directory a sweep directory, ...); anything else that is not empty is
refused. No output may be, contain, or sit inside one of the command's inputs.

A directory claimed new or empty gets a small marker file (:data:`MARKER_FILE`) naming its kind, unless the kind's
own files already identify it (an index has ``build.json``, a classifier ``classifier.json``, ...).

This module is the bottom layer: it knows the other layers' file names as plain strings, never by import.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import OutputError, OutputWriteError

logger = logging.getLogger(__name__)

MARKER_FILE = ".scatlas-output.json"
"""Written into an output directory scatlas created (or found empty): ``{"kind": NAME}``."""

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class OutputKind:
    """A kind of output directory: its marker name, how to describe it, and the files that identify it.

    ``layouts``: sets of entry names; a directory holding every name of one set is of this kind.
    ``marker``: write :data:`MARKER_FILE` into a directory claimed new or empty (off for kinds whose own files
    appear at once, or whose directory is replaced as a whole).
    ``entries``: every name such a directory may hold (besides the marker and hidden temporary files): a directory
    replaced as a whole, or one recognised by its layout alone (no marker), must hold nothing else, so that a user's
    own files are never deleted or replaced with it.
    """

    name: str
    what: str
    layouts: tuple[tuple[str, ...], ...] = ()
    marker: bool = True
    entries: frozenset[str] = frozenset()


ATLAS_STORE = OutputKind("atlas-store", "an atlas store", (("store.json",), (".creating-store",)), marker=False)
"""(``.creating-store``: a store whose first ingest was interrupted before ``store.json``, :data:`atlas.store.CREATING_FILE`.)"""
INDEX = OutputKind("index", "a scatlas index", (("manifest.json",), ("build.json",), ("building.json",)), marker=False,
                   entries=frozenset({
    "manifest.json", "build.json", "progress.json", "trained.faiss", "cells.duckdb", "embedder", "shards", "heads",
    "labels", "mapping.json", "refmap", "versions", "current.json", ".update.lock", "building.json"}))
CLASSIFIER = OutputKind("hunt-classifier", "a hunt classifier", (("classifier.json",),), marker=False,
                        entries=frozenset({"classifier.json", "weights.npy", "stage2_weights.npy", "training_ids.npy"}))
SWEEP = OutputKind("hunt-sweep", "a hunt sweep directory", (("sweep.json",), ("hits.parquet", "summary.json")),
                   entries=frozenset({"sweep.json", "summary.json", "hits.parquet", "partials", "stage2", ".sweep.lock"}))
REPORT = OutputKind("hunt-report", "a hunt report", (("enrichment.csv",), ("report.md",)), entries=frozenset({
    "enrichment.csv", "enrichment.png", "scores.png", "de.csv", "report.md", "report.html"}))
DEMO = OutputKind("demo", "a scatlas demo directory", (("h5ad", "atlas", "index"),), entries=frozenset({
    "h5ad", "atlas", "index", "hunt", "query.annotated.h5ad", "query.neighbors.parquet", "query.report.json",
    "query.confusion.png"}))
KINDS: tuple[OutputKind, ...] = (ATLAS_STORE, INDEX, CLASSIFIER, SWEEP, REPORT, DEMO)

MAGIC: dict[str, tuple[bytes, ...]] = {
    "parquet": (b"PAR1",),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "h5ad": (b"\x89HDF\r\n\x1a\n",),
    "json": (b"{", b"["),
}
"""How a file of each kind begins (JSON: after leading white space)."""


# -- display -----------------------------------------------------------------------------------------------------


def show(path: PathLike | bytes) -> str:
    """A path as printable text: bytes that are not UTF-8 (surrogate escapes) become U+FFFD."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        return safe_text(os.fspath(path))  # type: ignore[arg-type]
    return raw.decode("utf-8", "replace")


def safe_text(text: str) -> str:
    """``text`` with any lone surrogate (from a non-UTF-8 file name) replaced, so that it can be printed."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


# -- recognising directories -------------------------------------------------------------------------------------


def _resolve(path: PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(path))))


def _plain(path: PathLike) -> Path:
    """``path`` itself, or, when it holds ``..``, the path it names (resolved): ``x/../y`` is ``y``, and writing
    there must not create ``x`` on the way."""
    out = Path(path)
    return _resolve(out) if ".." in out.parts else out


def marker_kind(path: Path) -> str | None:
    """The kind named by the marker file of directory ``path``, or None (absent or unreadable)."""
    try:
        payload = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def kind_of(path: PathLike) -> OutputKind | None:
    """The kind of output directory ``path`` holds (by marker, else by layout), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    named = marker_kind(path)
    for kind in KINDS:
        if named == kind.name:
            return kind
    for kind in KINDS:
        if _has_layout(path, kind):
            return kind
    return None


def is_kind(path: PathLike, kind: OutputKind) -> bool:
    """Whether directory ``path`` holds ``kind`` (its marker, or one of its layouts)."""
    path = Path(path)
    named = marker_kind(path)
    if named is not None:
        return named == kind.name
    return _has_layout(path, kind)


def _foreign_entries(path: Path, kind: OutputKind) -> list[str]:
    """Names in ``path`` that ``kind`` never writes (hidden ``.*.tmp*`` files aside; :func:`_entries` skips the
    marker)."""
    if not kind.entries:
        return []
    return sorted(
        name for name in _entries(path)
        if name not in kind.entries and not (name.startswith(".") and ".tmp" in name)
    )


def _has_layout(path: Path, kind: OutputKind) -> bool:
    """Whether directory ``path`` holds every entry of one of ``kind``'s layouts."""
    return any(all((path / name).exists() for name in layout) for layout in kind.layouts)


def describe_dir(path: PathLike) -> str:
    """What a directory holds, for messages: its kind, or a count of its entries and one name (never contents)."""
    kind = kind_of(path)
    if kind is not None:
        return kind.what
    names = sorted(p.name for p in Path(path).iterdir() if p.name != MARKER_FILE)
    if not names:
        return "nothing"
    return f"{len(names)} other entr{'y' if len(names) == 1 else 'ies'} (e.g. {show(names[0])!r})"


INDEX_LOCK_FILE = ".update.lock"
"""The lock file a build or update of an index holds (:mod:`index.locking`); alone, it makes no directory non-empty."""


STORE_LOCK_FILE = ".lock"
"""The lock file a writer of an atlas store holds (:mod:`atlas.store_writer`); alone, it makes no directory non-empty
(a first ingest killed at once leaves only it)."""


def _entries(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name not in (MARKER_FILE, INDEX_LOCK_FILE, STORE_LOCK_FILE)]


# -- relations with inputs ---------------------------------------------------------------------------------------


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_inputs(out: Path, inputs: Iterable[PathLike | None], *, directory: bool) -> None:
    """Refuse an output equal to an input, inside an input directory, or (a directory) containing an input."""
    target = _resolve(out)
    for item in inputs:
        if item is None:
            continue
        src = _resolve(item)
        same = target == src or (out.exists() and Path(item).exists() and _samefile(out, Path(item)))
        if same:
            raise OutputError(
                f"{show(out)} is also an input of this command ({show(item)}); writing there would destroy it: "
                "give another output path"
            )
        if src != target and _is_within(target, src) and Path(item).is_dir():
            raise OutputError(
                f"{show(out)} lies inside the input {show(item)}; writing there would change that input: "
                "give an output path outside it"
            )
        if directory and src != target and _is_within(src, target):
            raise OutputError(
                f"{show(out)} contains the input {show(item)}; an output directory must not hold the command's "
                "inputs: give another output directory"
            )


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -- directories -------------------------------------------------------------------------------------------------


def check_output_dir(
    path: PathLike,
    kind: OutputKind,
    *,
    inputs: Iterable[PathLike | None] = (),
    replace: bool = False,
) -> Path:
    """Refuse ``path`` as an output directory of ``kind`` unless it is new, empty, or already holds ``kind``.

    ``replace``: the caller deletes or renames the directory as a whole, so the current directory (or one holding
    it) is refused too. Nothing is created; returns ``Path(path)`` (resolved when it holds ``..``). Raises
    :class:`OutputError`.
    """
    out = _plain(path)
    _check_inputs(out, inputs, directory=True)
    refuse_inside_protected(out, kind.what)
    resolved = _resolve(out)
    if resolved == _resolve(os.sep):
        raise OutputError(f"{show(out)} is the root directory; give a new subdirectory for {kind.what}")
    if replace and _is_within(_resolve(os.getcwd()), resolved):
        raise OutputError(
            f"{show(out)} is the current directory or holds it, and this command replaces its output directory: "
            f"give a new subdirectory (e.g. ./{kind.name}) for {kind.what}"
        )
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise OutputError(f"{show(out)} exists and is not a directory; give a new directory for {kind.what}")
    with _reading(out):
        if not _entries(out):
            return out
        if is_kind(out, kind):
            # unmarked, it is recognised by its files alone: a user's folder holding files of those names, or an
            # output written before the marks existed (move it away once)
            unmarked = kind.marker and marker_kind(out) is None
            foreign = _foreign_entries(out, kind) if replace or unmarked else []
            if foreign:
                raise OutputError(
                    f"{show(out)} looks like {kind.what} but also holds {len(foreign)} other entr"
                    f"{'y' if len(foreign) == 1 else 'ies'} (e.g. {show(foreign[0])}); refusing to replace it: move "
                    "them out or give a new directory"
                )
            if unmarked:
                raise OutputError(
                    f"{show(out)} holds files named like {kind.what}'s but not scatlas' mark of one; refusing to "
                    "write there: give a new or empty directory"
                )
            return out
        held = describe_dir(out)
    hint = " (the current directory)" if resolved == _resolve(os.getcwd()) else ""
    raise OutputError(
        f"{show(out)}{hint} is not empty and holds {held}, not {kind.what}; refusing to write {kind.what} there: "
        "give a new or empty directory"
    )


def missing_dirs(path: PathLike) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what writing there will create."""
    absolute = Path(os.path.abspath(path))
    return [p for p in (absolute, *absolute.parents) if not p.exists()]


def remove_created(path: PathLike, created: Sequence[Path]) -> None:
    """Remove the directory ``path`` and its parents, those of ``created`` (:func:`missing_dirs`, taken before a
    command created them), after the command failed with nothing in them worth keeping; a ``path`` that existed
    before is left alone."""
    if not created or created[0] != Path(os.path.abspath(path)):
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only while empty


def new_stage_dir(parent: PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """A new, uniquely named directory in ``parent`` to stage an output in, made as any directory the command makes
    (mode 0777 less the umask: readable by the lab once published, unlike ``tempfile.mkdtemp``'s 0700)."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free name for a staging directory", os.fspath(parent))


def claim_output_dir(
    path: PathLike,
    kind: OutputKind,
    *,
    inputs: Iterable[PathLike | None] = (),
    replace: bool = False,
) -> Path:
    """:func:`check_output_dir`, then create the directory (with its marker, for kinds that use one)."""
    out = check_output_dir(path, kind, inputs=inputs, replace=replace)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        if kind.marker and marker_kind(out) is None and not _entries(out):
            (out / MARKER_FILE).write_text(json.dumps({"kind": kind.name}) + "\n", encoding="utf-8")
    return out


# -- files -------------------------------------------------------------------------------------------------------


def looks_like(path: PathLike, file_kind: str) -> bool:
    """Whether the file at ``path`` begins like a ``file_kind`` file (see :data:`MAGIC`); an empty file does."""
    magics = MAGIC[file_kind]
    with open(path, "rb") as fh:
        head = fh.read(64)
    if file_kind == "json":
        head = head.lstrip()
    return not head or any(head.startswith(m) for m in magics)


H5AD_MARK = "scatlas_output"
"""Root attribute of the ``.h5ad`` files scatlas writes: only such a file may be replaced by a new output."""

PROTECTED_KINDS = (ATLAS_STORE, INDEX, CLASSIFIER, SWEEP)
"""Directories whose files other commands rely on: no output file of another command is written inside them."""


STRICT_LAYOUTS: dict[str, tuple[str, ...]] = {
    ATLAS_STORE.name: ("store.json", "experiment", "cells.duckdb"),
    INDEX.name: ("manifest.json", "shards", "cells.duckdb"),
    CLASSIFIER.name: ("classifier.json", "weights.npy"),
    SWEEP.name: ("sweep.json", "partials"),
}
"""What a directory of each protected kind holds beyond its one identifying file: an ancestor of a new output
directory is taken for one only with its marker or all of these (a web app's ``manifest.json`` is no index)."""


def refuse_inside_protected(out: PathLike, what: str) -> None:
    """OutputError when ``out`` lies inside an atlas store, index, classifier or sweep directory (``what``: what would
    be written there, for the message), recognised by its marker or :data:`STRICT_LAYOUTS`."""
    protected = _inside_protected(Path(out), strict=True)
    if protected is not None:
        raise OutputError(f"{show(out)} lies inside {protected.what}; refusing to write {what} there: give a path "
                          "outside it")


def _inside_protected(out: Path, *, strict: bool = False) -> OutputKind | None:
    """The kind of the scatlas store, index, classifier or sweep directory that ``out`` would be written into
    (``strict``: only a directory with its marker or all of its kind's :data:`STRICT_LAYOUTS`)."""
    for parent in _resolve(out).parents:
        kind = kind_of(parent)
        if kind in PROTECTED_KINDS and (not strict or marker_kind(parent) == kind.name
                                        or all((parent / name).exists() for name in STRICT_LAYOUTS[kind.name])):
            return kind
    return None


def scatlas_h5ad(path: Path, mark: str | None = None) -> bool:
    """Whether the ``.h5ad`` at ``path`` was written by scatlas (carries :data:`H5AD_MARK`; with the value ``mark``,
    the command that wrote it, when given)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(H5AD_MARK)
    except (OSError, RuntimeError, ValueError):
        return False
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value is not None and (mark is None or str(value) == mark)


def check_output_file(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    file_kind: str | None = None,
    csv_header: Sequence[str] = (),
    mark: str | None = None,
) -> Path:
    """Refuse ``path`` as an output file when it is a directory, an input, inside an input directory or inside an
    atlas store, index, classifier or sweep directory, or an existing file scatlas did not write (one of another
    kind than ``file_kind``, a key of :data:`MAGIC` or ``"csv"``, or of that kind without scatlas' mark:
    :func:`written_by_scatlas`; ``csv_header``: the first columns of the CSV to be written; ``mark``: the ``.h5ad``
    mark's value, the command whose output alone may be replaced). A file inside an output
    directory marked as scatlas' own (a report, an evaluation) is its own. Nothing is written; returns ``Path(path)``
    (resolved when it holds ``..``)."""
    out = _plain(path)
    if out.is_dir():
        raise OutputError(f"{show(out)} is a directory; give a file path")
    blocking = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputError(f"{show(blocking)} is a file, so {show(out)} cannot be written under it; give another path")
    _check_inputs(out, inputs, directory=False)
    protected = _inside_protected(out)
    if protected is not None:
        raise OutputError(f"{show(out)} lies inside {protected.what}; refusing to write there: give a path outside it")
    if file_kind is not None and out.is_file():
        with _reading(out):
            same_kind = file_kind == "csv" or looks_like(out, file_kind)
            ours = same_kind and (marker_kind(out.parent) in OWN_FILES_KINDS or written_by_scatlas(out, file_kind, csv_header, mark))
        if not same_kind:
            raise OutputError(
                f"{show(out)} exists and is not a {file_kind} file; refusing to replace it: give another path "
                "(or delete that file first)"
            )
        if not ours:  # a file of that kind, but not one of ours: likely the user's
            raise OutputError(
                f"{show(out)} exists and was not written by scatlas; refusing to replace it: give another path "
                "(or move that file away first, if it is yours to replace)"
            )
    return out


OWN_FILES_KINDS = frozenset({"hunt-report", "embedder-evaluation"})
"""Output directories (by their marker) whose files one command writes as a set: a file there is that command's."""

OUTPUT_MARK = H5AD_MARK
"""How scatlas marks the files it writes, so that only those are ever replaced: a root attribute of an ``.h5ad``, a
key of a Parquet file's schema metadata, a top-level key of a JSON object, the ``Software`` text of a PNG (its value
there: :data:`PNG_SOFTWARE`). A CSV has nowhere to carry it: its header is compared with the one to be written."""
PNG_SOFTWARE = "scatlas"


def marked(payload: dict[str, Any], what: str) -> dict[str, Any]:
    """``payload`` with scatlas' mark as a top-level key (``what``: the kind of output, e.g. "report")."""
    return {OUTPUT_MARK: what, **{k: v for k, v in payload.items() if k != OUTPUT_MARK}}


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(frame: Any) -> Any:
    """A copy of DataFrame ``frame`` whose text cells cannot run as spreadsheet formulas: a value from the data that
    begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (``=HYPERLINK(...)`` as a cell name or label)
    gets a leading ``'``, as OWASP advises for CSV files opened in a spreadsheet. Numbers are left as they are."""
    import pandas as pd

    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if not (pd.api.types.is_object_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype)
                or pd.api.types.is_string_dtype(values)):
            continue
        text = values.astype(object)
        risky = text.map(lambda v: isinstance(v, str) and v.startswith(_FORMULA_START))
        if risky.any():
            out[column] = text.where(~risky, "'" + text.astype(str))
    if any(isinstance(c, str) and c.startswith(_FORMULA_START) for c in out.columns):
        out.columns = ["'" + c if isinstance(c, str) and c.startswith(_FORMULA_START) else c for c in out.columns]
    return out


def written_by_scatlas(path: PathLike, file_kind: str, csv_header: Sequence[str] = (), mark: str | None = None
                       ) -> bool:
    """Whether the existing file at ``path`` carries scatlas' mark for ``file_kind`` (:data:`OUTPUT_MARK`); an empty
    file holds nothing to lose and counts as one; a CSV counts when its header begins with ``csv_header`` (never
    when that is empty)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return True
    if file_kind == "h5ad":
        return scatlas_h5ad(path, mark)
    if file_kind == "json":
        from scatlas.atlas.atomic import read_json_object
        from scatlas.atlas.errors import ScatlasError

        try:
            return OUTPUT_MARK in read_json_object(path, "")
        except ScatlasError:
            return False
    if file_kind == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_schema(path).metadata or {}
        except (OSError, ValueError):
            return False
        return OUTPUT_MARK.encode() in metadata
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if file_kind == "png":
        return b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head
    if file_kind == "csv" and csv_header:
        import csv

        first = head.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
        row = next(csv.reader([first]), [])
        return row[: len(csv_header)] == list(csv_header)
    return False


def check_distinct(paths: Iterable[PathLike | None]) -> None:
    """Refuse two outputs of one command that name the same file."""
    seen: dict[Path, PathLike] = {}
    for p in paths:
        if p is None:
            continue
        key = _resolve(p)
        if key in seen:
            raise OutputError(f"{show(p)} is given for two outputs of this command; give each its own path")
        seen[key] = p


# -- OS errors ---------------------------------------------------------------------------------------------------

_HINTS = {
    errno.ENOSPC: "free space on that file system, or write somewhere else",
    errno.EDQUOT: "free space within your quota, or write somewhere else",
    errno.EROFS: "that file system is read-only: write somewhere else",
    errno.EACCES: "check the permissions of that path, or write somewhere else",
    errno.EPERM: "check the permissions of that path, or write somewhere else",
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a part of that path is a file, not a directory: check the path",
    errno.EISDIR: "that path is a directory: give a file path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
    errno.EFBIG: "the file is too large for that file system: write somewhere else",
}


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def os_error_message(exc: OSError, action: str | None = None, path: PathLike | None = None) -> str:
    """``<strerror> while <action> <file>: <what to do>``, from an OSError (never the file's contents).

    ``action`` defaults to "writing" for errors only a write raises (disk full, read-only), else "accessing".
    """
    code = exc.errno
    if code is None:  # h5py and others put the errno in their text only
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if action is None:
        action = "writing" if code in _WRITE_ERRNOS else "accessing"
    reason = exc.strerror or (os.strerror(code) if code is not None else "") or _first_line(exc)
    name = exc.filename if exc.filename is not None else path
    where = f" {show(name)}" if name is not None else ""
    hint = _HINTS.get(code if code is not None else -1, "check the path, the free space and the permissions, then rerun")
    return f"{safe_text(reason)} while {action}{where}: {hint}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or type(exc).__name__


@contextlib.contextmanager
def writing(path: PathLike | None = None, action: str | None = "writing") -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an :class:`OutputError` saying what to do.

    ``action=None``: the message says "writing" or "accessing" after the error (for blocks that also read).
    """
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputWriteError(os_error_message(exc, action, path)) from exc


@contextlib.contextmanager
def _reading(path: PathLike) -> Iterator[None]:
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputWriteError(os_error_message(exc, "reading", path)) from exc
