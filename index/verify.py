"""Integrity of an index directory: what is checked when, and :func:`verify_index` (``scatlas verify``).

* ``AtlasIndex.open``: the size of every recorded file, the SHA-256 of the small files (``build.json``,
  ``embedder/*``), each shard's id count and range (its ids file's header, first and last id).
* On first read in a process, when the index's big files (shards, ``trained.faiss``, ``cells.duckdb``) total at
  most :func:`verify_on_read_limit` bytes: the SHA-256 of a shard's files before its vectors, ids or FAISS index
  are used, of ``trained.faiss`` at open and of ``cells.duckdb`` at the first metadata query. Larger indexes are
  not hashed on read (logged once); run :func:`verify_index` on them after copying or restoring.
* ``label_heads()``: the SHA-256 of every recorded ``heads/*`` file before the heads are loaded;
  ``label_classes()`` the same for ``labels/*``, ``reference_map()`` for ``refmap/*``.
* :func:`verify_index`: every file, every checksum, and the shards' ids against the manifest; it reports damage
  rather than raising.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.index.manifest import (
    BUILD_FILE,
    CELLS_DB_FILE,
    EMBEDDER_DIR,
    HEADS_DIR,
    LABELS_DIR,
    MANIFEST_FILE,
    REFMAP_DIR,
    SHARD_IDS_FILE,
    SHARDS_DIR,
    TRAINED_FILE,
    FileRecord,
    IndexManifest,
    ShardRecord,
    read_manifest,
)
from scatlas.index.progress import Progress, progress_bar
from scatlas.index.shard import checksum_matches, damaged_hint, file_record, sha256_file, shard_ids_problem
from scatlas.index.unfinished import BUILDING_FILE, unfinished_message, unfinished_step
from scatlas.index.versions import resolve_index_dir

logger = logging.getLogger(__name__)

VERIFY_ON_READ_MAX_BYTES = 2 << 30
"""Indexes whose shards, ``trained.faiss`` and ``cells.duckdb`` total at most this many bytes have those files'
SHA-256 checked on first read in a process; 0 = never. Overridden by ``$SCATLAS_VERIFY_ON_READ_MAX_BYTES``."""
VERIFY_ON_READ_ENV = "SCATLAS_VERIFY_ON_READ_MAX_BYTES"
ID_BLOCK = 1 << 20
"""Ids read at a time when :func:`verify_index` checks that a shard's ids are sorted and in range."""

_NOTED: set[tuple[str, str]] = set()  # (what, index path) already logged in this process


def verify_on_read_limit() -> int:
    """Bytes up to which an index's big files are checksummed on first read (0: never)."""
    raw = os.environ.get(VERIFY_ON_READ_ENV, "").strip()
    if not raw:
        return int(VERIFY_ON_READ_MAX_BYTES)
    try:
        return max(0, int(raw))
    except ValueError as exc:
        raise InputError(
            f"${VERIFY_ON_READ_ENV} must be a whole number of bytes (0 = never checksum on read), got {raw!r}"
        ) from exc


def read_bytes_total(manifest: IndexManifest) -> int:
    """Bytes of the files checksummed on read: the shards, ``trained.faiss`` and ``cells.duckdb``."""
    return manifest.shard_bytes + manifest.trained.bytes + manifest.cells_db.bytes


def note_once(what: str, path: Path, level: int, message: str, *args: Any) -> None:
    """Log ``message`` once per process for this index and topic."""
    key = (what, str(path))
    if key not in _NOTED:
        _NOTED.add(key)
        logger.log(level, message, *args)


def small_file_records(index_dir: Path) -> dict[str, FileRecord]:
    """Records of the small files a build leaves besides shards, ``trained.faiss`` and ``cells.duckdb``:
    ``build.json`` and every file under ``embedder/`` (relative POSIX paths)."""
    out: dict[str, FileRecord] = {}
    build = index_dir / BUILD_FILE
    if build.is_file():
        out[BUILD_FILE] = file_record(build)
    edir = index_dir / EMBEDDER_DIR
    if edir.is_dir():
        for path in sorted(p for p in edir.rglob("*") if p.is_file()):
            out[path.relative_to(index_dir).as_posix()] = file_record(path)
    return out


def file_problem(index_dir: Path, rel: str, rec: FileRecord, *, checksum: bool = True) -> str | None:
    """What is wrong with one recorded file (missing, another size, another SHA-256), or None."""
    path = index_dir / rel
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != rec.bytes:
        return f"has {size} bytes where the manifest records {rec.bytes}"
    if checksum and not checksum_matches(path, rec):
        return "fails its SHA-256 check (same size, other content)"
    return None


def check_files(index_dir: Path, records: dict[str, FileRecord], *, fix: str, checksum: bool = True) -> None:
    """IndexFormatError naming the first recorded file that is missing or damaged; ``fix`` says what to do."""
    for rel, rec in records.items():
        problem = file_problem(index_dir, rel, rec, checksum=checksum)
        if problem is not None:
            raise IndexFormatError(f"{index_dir / rel} {problem}; {fix}")


def check_small_files(index_dir: Path, manifest: IndexManifest) -> None:
    """Sizes and SHA-256 of ``build.json`` and ``embedder/*`` (a note when the manifest predates their records)."""
    if manifest.files is None:
        note_once(
            "small-files", index_dir, logging.WARNING,
            "the manifest of %s predates integrity records: build.json, embedder/ and heads/ are not checksummed; "
            "rebuild the index to cover them", index_dir,
        )
        return
    check_files(index_dir, manifest.files, fix=damaged_hint(index_dir))


def check_big_file(index_dir: Path, name: str, rec: FileRecord, *, cached: bool = True) -> None:
    """IndexFormatError unless ``trained.faiss`` / ``cells.duckdb`` has the recorded SHA-256."""
    if not checksum_matches(index_dir / name, rec, cached=cached):
        raise IndexFormatError(f"{index_dir / name} fails its SHA-256 check; {damaged_hint(index_dir)}")


# -- verify_index --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an index: the file (relative to the index directory) and what is wrong with it."""

    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_index` found. ``ok``: no problem; ``notes``: what could not be checked and why."""

    path: str
    ok: bool
    files_checked: int
    bytes_checked: int
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _recorded_files(manifest: IndexManifest) -> list[tuple[str, FileRecord]]:
    """Every file the manifest records, relative to the index directory, shards last."""
    out = [(TRAINED_FILE, manifest.trained), (CELLS_DB_FILE, manifest.cells_db)]
    out += sorted((manifest.files or {}).items())
    out += sorted((manifest.heads_files or {}).items())
    out += sorted((manifest.labels_files or {}).items())
    out += sorted((manifest.refmap_files or {}).items())
    for shard in manifest.shards:
        out += [(f"{SHARDS_DIR}/{shard.dirname}/{name}", rec) for name, rec in sorted(shard.files.items())]
    return out


def _hash_problem(index_dir: Path, rel: str, rec: FileRecord, on_bytes: Callable[[int], None]) -> str | None:
    """Like :func:`file_problem`, always hashing the file (no per-process memory of earlier checks)."""
    problem = file_problem(index_dir, rel, rec, checksum=False)
    if problem is not None:
        on_bytes(rec.bytes)
        return problem
    try:
        digest = sha256_file(index_dir / rel, on_bytes=on_bytes)
    except OSError as exc:
        return f"cannot be read ({exc})"
    return None if digest == rec.sha256 else "fails its SHA-256 check (same size, other content)"


def _ids_problem(index_dir: Path, shard: ShardRecord) -> str | None:
    """The shard's ids against the manifest: count and range, then sorted, unique and within the range."""
    sdir = index_dir / SHARDS_DIR / shard.dirname
    problem = shard_ids_problem(sdir, shard)
    if problem is not None:
        return problem
    try:
        ids = np.load(sdir / SHARD_IDS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return f"cannot be read ({exc})"
    prev = shard.id_min - 1
    for a in range(0, len(ids), ID_BLOCK):
        block = np.asarray(ids[a : a + ID_BLOCK])
        if block[0] <= prev or (len(block) > 1 and bool((np.diff(block) <= 0).any())):
            return "its ids are not strictly increasing"
        prev = int(block[-1])
    return None


def _range_problems(manifest: IndexManifest) -> list[Problem]:
    """Shard records that overlap or do not add up to the manifest's cell count."""
    out = []
    shards = sorted(manifest.shards, key=lambda s: s.no)
    for a, b in zip(shards, shards[1:], strict=False):
        if b.id_min <= a.id_max:
            out.append(Problem(MANIFEST_FILE, f"shards {a.no} and {b.no} have overlapping id ranges"))
    total = sum(s.n for s in shards)
    if total != manifest.n_cells:
        out.append(Problem(MANIFEST_FILE, f"its shards hold {total} cells, its n_cells says {manifest.n_cells}"))
    return out


def _cell_table_problems(index_dir: Path, manifest: IndexManifest) -> list[Problem]:
    """The cell table must hold one row for each indexed cell and nothing else (a store changed while the index was
    built: a search would return cells without metadata). The shards' ids are compared with the table's, one shard at a
    time."""
    import duckdb
    import pyarrow as pa

    from scatlas.index.metadata import connect

    path = index_dir / CELLS_DB_FILE
    if not path.is_file():
        return []
    missing = 0
    try:
        with connect(path) as con:  # file access and extensions off: the file is the index's, not trusted
            row = con.execute("SELECT count(*), count(DISTINCT soma_joinid) FROM cells").fetchall()[0]
            for shard in manifest.shards:
                ids_path = index_dir / SHARDS_DIR / shard.dirname / SHARD_IDS_FILE
                if not ids_path.is_file():
                    continue  # reported with the shard's files
                ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
                con.register("_shard_ids", pa.table({"soma_joinid": pa.array(np.asarray(ids, dtype=np.int64))}))
                found = con.execute("SELECT count(*) FROM _shard_ids s ANTI JOIN cells c USING (soma_joinid)").fetchall()
                con.unregister("_shard_ids")
                missing += int(found[0][0])
    except (duckdb.Error, IndexFormatError, OSError, ValueError) as exc:
        return [Problem(CELLS_DB_FILE, f"its cells table cannot be read ({type(exc).__name__})")]
    n, distinct = int(row[0]), int(row[1])
    if n != manifest.n_cells or distinct != n or missing:
        return [Problem(CELLS_DB_FILE, f"its cells table holds {n} rows ({distinct} distinct ids) for the "
                        f"{manifest.n_cells} indexed cells, {missing} of which it lacks (the atlas store changed while "
                        "the index was built?): run `scatlas build --update` to bring the index up to date with the "
                        "store")]
    return []


def _notes(index_dir: Path, manifest: IndexManifest) -> list[str]:
    notes = []
    if manifest.files is None:
        notes.append("the manifest predates integrity records: build.json, embedder/ and heads/ were not checked; "
                     "rebuild the index to cover them")
    elif manifest.heads_files is None and (index_dir / HEADS_DIR).is_dir():
        notes.append("heads/ is not recorded in the manifest (its training was interrupted?): it was not checked; "
                     "retrain the heads (`scatlas build ... --label-key KEY`) to record them")
    if manifest.files is not None and manifest.labels_files is None and (index_dir / LABELS_DIR).is_dir():
        notes.append("labels/ is not recorded in the manifest (its writing was interrupted?): it was not checked; "
                     "rerun the build (`scatlas build ...` with its arguments) to record it")
    if manifest.files is not None and manifest.refmap_files is None and (index_dir / REFMAP_DIR).is_dir():
        notes.append("refmap/ is not recorded in the manifest (its writing was interrupted?): it was not checked "
                     "and is not used; rerun the build (`scatlas build ...` with its arguments) to fit it again")
    return notes


def _read_manifest_or_report(index_dir: Path) -> IndexManifest | VerifyReport:
    """The manifest; a failed report when it is unusable; IndexFormatError when this is not an index at all."""
    if not index_dir.is_dir() or not (index_dir / MANIFEST_FILE).is_file():
        read_manifest(index_dir)  # raises with what to do
    try:
        return read_manifest(index_dir)
    except IndexFormatError as exc:
        return VerifyReport(str(index_dir), False, 1, 0, [Problem(MANIFEST_FILE, str(exc))])


def verify_index(path: str | Path, *, progress: Progress = True) -> VerifyReport:
    """Read every file of the index at ``path`` and check it against the manifest: sizes, SHA-256 checksums
    (shards, ``trained.faiss``, ``cells.duckdb``, ``build.json``, ``embedder/*``, ``heads/*``, ``labels/*``,
    ``refmap/*``) and each shard's
    ids against its recorded count and range. Damage is reported, not raised; IndexFormatError only when ``path``
    is not an index directory (no such directory, or no ``manifest.json``). ``progress``: a bar of bytes
    (:data:`~index.progress.Progress`).
    """
    t0 = time.perf_counter()
    index_dir = resolve_index_dir(Path(path))
    step = unfinished_step(index_dir)
    if step is not None:  # its manifest may be complete: the steps after the shards are not
        return VerifyReport(str(index_dir), False, 0, 0, [Problem(BUILDING_FILE, unfinished_message(index_dir, step))])
    manifest = _read_manifest_or_report(index_dir)
    if isinstance(manifest, VerifyReport):
        return manifest
    files = _recorded_files(manifest)
    problems: list[Problem] = []
    with progress_bar(progress, total=sum(rec.bytes for _, rec in files), unit="B", unit_scale=True,
                      desc="verify") as bar:
        for rel, rec in files:
            what = _hash_problem(index_dir, rel, rec, bar.update)
            if what is not None:
                problems.append(Problem(rel, what))
    for shard in manifest.shards:
        rel = f"{SHARDS_DIR}/{shard.dirname}/{SHARD_IDS_FILE}"
        what = _ids_problem(index_dir, shard) if (index_dir / rel).is_file() else None
        if what is not None:
            problems.append(Problem(rel, what))
    problems += _range_problems(manifest)
    if not any(p.file == CELLS_DB_FILE for p in problems):
        problems += _cell_table_problems(index_dir, manifest)
    report = VerifyReport(
        str(index_dir), not problems, len(files) + 1, sum(rec.bytes for _, rec in files),
        problems, _notes(index_dir, manifest), round(time.perf_counter() - t0, 3),
    )
    for p in problems:
        logger.warning("index %s: %s", index_dir, p)
    return report
