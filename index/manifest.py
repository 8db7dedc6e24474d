"""The index manifest (``manifest.json``, written last) and the build record (``build.json``, written first).

An index directory is valid only when ``manifest.json`` exists, parses, has a known format version and lists
shards whose files are present with the recorded sizes. ``build.json`` records the arguments of a build so that a
rerun resumes only when it would produce the same index.

Integrity records: every file the index reads has a :class:`FileRecord` (size, SHA-256): the shards' files,
``trained.faiss`` and ``cells.duckdb``; ``files`` covers the small files (``build.json``, ``embedder/*``) and
``heads_files`` the label heads (``heads/*``), recorded when they are trained after the build, and ``labels_files``
the label classes (``labels/*``, :mod:`index.label_classes`), recorded when they are computed after the build, and
``refmap_files`` the reference map (``refmap/*``, :mod:`index.refmap`), recorded when it is fitted. Manifests written
before ``files`` existed have ``files = None``: their small files are not covered (see :mod:`index.verify`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import IndexFormatError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
PROGRESS_FILE = "progress.json"
TRAINED_FILE = "trained.faiss"
CELLS_DB_FILE = "cells.duckdb"
EMBEDDER_DIR = "embedder"
SHARDS_DIR = "shards"
DONE_FILE = "done.json"
SHARD_INDEX_FILE = "index.faiss"
SHARD_IDS_FILE = "ids.npy"
SHARD_VECTORS_FILE = "vectors.f16.npy"
SHARD_FILES = (SHARD_INDEX_FILE, SHARD_IDS_FILE, SHARD_VECTORS_FILE)
SHARD_RESIDUALS_FILE = "residuals.f16.npy"
"""Optional: float16 of each stored vector's rounding error (the normalised float32 vector minus its float16), read
by re-ranking alone to make its choice of the top k exact (:mod:`index.rerank`); absent in shards of exact indexes,
of builds with ``exact_rerank=False`` and of indexes written before it."""
HEADS_DIR = "heads"
HEADS_FILE = "heads.json"
HEADS_SAMPLE_FILE = "training_sample.npz"
"""The gene features of the label heads' training sample, kept so that heads can be refitted for a query that
lacks some of the embedder's genes (:func:`index.label_heads.refit_for_genes`)."""
LABELS_DIR = "labels"
LABELS_FILE = "label_classes.json"
"""The label classes of the index's label columns (values of one CL term merged; :mod:`index.label_classes`)."""
REFMAP_DIR = "refmap"
REFMAP_FILE = "refmap.json"
MAPPING_FILE = "mapping.json"
"""The mapping calibration (:mod:`index.mapping`), read when the index is opened."""


def mapping_fix(index_dir: Path) -> str:
    """What to do about an unusable mapping calibration of the index (version directory) at ``index_dir``."""
    return (f"recompute it with calibrate_mapping({str(index_dir)!r}) or delete it to annotate without the mapping "
            "check")
"""The reference map: a 2-D UMAP of a sample of atlas cells, and what places new cells on it (:mod:`index.refmap`)."""
FILES_KEY = "files"
HEADS_FILES_KEY = "heads_files"
LABELS_FILES_KEY = "labels_files"
REFMAP_FILES_KEY = "refmap_files"
AFTER_BUILD_KEYS = (HEADS_FILES_KEY, LABELS_FILES_KEY, REFMAP_FILES_KEY)
"""Records of files made after the build (heads, label classes, reference map): left out of :func:`manifest_digest`."""

METRIC = "inner_product"
DEFAULT_K = 30
"""Neighbours returned by a search, and voting in ``annotate``, unless told otherwise (recorded per index in
:class:`SearchDefaults`)."""
CALIBRATION_QUANTILES = (0.001, 0.002, 0.005, 0.01, 0.05, 0.10, 0.25, 0.50)


def shard_dirname(shard_no: int) -> str:
    return f"{shard_no:04d}"


@dataclass(frozen=True)
class FileRecord:
    """Size and SHA-256 of one file of the index."""

    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileRecord:
        return cls(bytes=int(d["bytes"]), sha256=str(d["sha256"]))


def _inside(name: Any) -> str:
    """A recorded file name, which must name a file inside the index: relative, without ``..`` (ValueError, which
    read_manifest reports as a malformed manifest, otherwise: a manifest must not point a reader elsewhere)."""
    text = str(name)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or text.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError("a recorded file lies outside the index")
    return text


def _file_records(d: Any) -> dict[str, FileRecord] | None:
    """``{relative path: FileRecord}`` from its JSON form; None when absent."""
    if d is None:
        return None
    return {_inside(name): FileRecord.from_dict(rec) for name, rec in dict(d).items()}


@dataclass(frozen=True)
class ShardRecord:
    """A completed shard: its number, cell count, id range (inclusive) and file checksums."""

    no: int
    n: int
    id_min: int
    id_max: int
    files: dict[str, FileRecord]

    @property
    def dirname(self) -> str:
        return shard_dirname(self.no)

    @property
    def has_residuals(self) -> bool:
        """Whether the shard stores its vectors' float16 rounding residuals (:data:`SHARD_RESIDUALS_FILE`)."""
        return SHARD_RESIDUALS_FILE in self.files

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        files = {_inside(name): FileRecord.from_dict(rec) for name, rec in d["files"].items()}
        return cls(no=int(d["no"]), n=int(d["n"]), id_min=int(d["id_min"]), id_max=int(d["id_max"]), files=files)


def residuals_state(shards: list[ShardRecord]) -> str:
    """How many of ``shards`` store their rounding residuals: ``"all"``, ``"some"`` or ``"none"`` (no shards:
    ``"none"``)."""
    have = sum(shard.has_residuals for shard in shards)
    return "all" if shards and have == len(shards) else "some" if have else "none"


@dataclass(frozen=True)
class EmbedderInfo:
    """Which embedder made the vectors; ``fingerprint`` is what queries and classifiers are checked against."""

    name: str
    params: dict[str, Any]
    fingerprint: str
    dim: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedderInfo:
        return cls(name=d["name"], params=dict(d["params"]), fingerprint=d["fingerprint"], dim=int(d["dim"]))


@dataclass(frozen=True)
class SearchDefaults:
    """Default search parameters. ``nprobe`` is ``None`` for exact (flat) indexes; ``rerank`` = 0 means none."""

    k: int
    nprobe: int | None
    rerank: int


@dataclass(frozen=True)
class RecallReport:
    """recall@k of the index at its default search parameters against exact search, on atlas cells."""

    k: int
    recall: float
    n_queries: int
    nprobe: int | None
    rerank: int
    exact: str  # how the ground truth was computed
    queries_per_second: float
    tuning: list[dict[str, Any]] = field(default_factory=list)  # every (nprobe, rerank, recall) tried


@dataclass(frozen=True)
class SimilarityCalibration:
    """Distribution of atlas-to-atlas neighbour similarities (self excluded), for "far from the atlas" calls.

    ``first_neighbor[q]`` / ``mean_topk[q]`` are quantiles at ``quantiles[q]`` of the cosine similarity of the
    nearest neighbour and of the mean similarity of the ``k`` nearest neighbours of ``n_cells`` sampled cells.
    """

    k: int
    n_cells: int
    quantiles: list[float]
    first_neighbor: list[float]
    mean_topk: list[float]

    def threshold(self, which: str = "first_neighbor", quantile: float = 0.01) -> float:
        values = {"first_neighbor": self.first_neighbor, "mean_topk": self.mean_topk}[which]
        for q, v in zip(self.quantiles, values, strict=True):
            if abs(q - quantile) < 1e-9:
                return v
        raise KeyError(f"quantile {quantile} not calibrated; available: {self.quantiles}")


@dataclass(frozen=True)
class IndexManifest:
    """Everything needed to use and to trust an index directory."""

    format_version: int
    embedder: EmbedderInfo
    gene_vocabulary_hash: str | None
    atlas_snapshot: dict[str, Any]
    factory: str
    metric: str
    exact: bool
    search: SearchDefaults
    dim: int
    n_cells: int
    shards: list[ShardRecord]
    trained: FileRecord
    cells_db: FileRecord
    versions: dict[str, str]
    build: dict[str, Any]
    recall: RecallReport
    calibration: SimilarityCalibration
    files: dict[str, FileRecord] | None = None  # build.json, embedder/*; None in manifests older than these records
    heads_files: dict[str, FileRecord] | None = field(default=None, compare=False)
    """heads/*, recorded after the heads are trained (None: none recorded). Not part of the build's identity: it is
    left out of equality and of :func:`manifest_digest`, like the heads themselves."""
    labels_files: dict[str, FileRecord] | None = field(default=None, compare=False)
    """labels/*, recorded after the label classes are computed (None: none recorded); like ``heads_files``."""
    refmap_files: dict[str, FileRecord] | None = field(default=None, compare=False)
    """refmap/*, recorded after the reference map is fitted (None: none recorded); like ``heads_files``."""
    version: int = 1
    """1 for a build, one more for each ``build --update`` (:mod:`index.update`; its files: :mod:`index.versions`)."""
    updates: list[dict[str, Any]] = field(default_factory=list)
    """What each update changed (datasets added, removed, relabelled), its drift measure, recall and time."""

    @property
    def shard_bytes(self) -> int:
        """Total size of the shards' files."""
        return sum(rec.bytes for shard in self.shards for rec in shard.files.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexManifest:
        return cls(
            format_version=int(d["format_version"]),
            embedder=EmbedderInfo.from_dict(d["embedder"]),
            gene_vocabulary_hash=d.get("gene_vocabulary_hash"),
            atlas_snapshot=dict(d.get("atlas_snapshot") or {}),
            factory=d["factory"],
            metric=d["metric"],
            exact=bool(d["exact"]),
            search=SearchDefaults(**d["search"]),
            dim=int(d["dim"]),
            n_cells=int(d["n_cells"]),
            shards=[ShardRecord.from_dict(s) for s in d["shards"]],
            trained=FileRecord.from_dict(d["trained"]),
            cells_db=FileRecord.from_dict(d["cells_db"]),
            versions=dict(d["versions"]),
            build=dict(d["build"]),
            recall=RecallReport(**d["recall"]),
            calibration=SimilarityCalibration(**d["calibration"]),
            files=_file_records(d.get(FILES_KEY)),
            heads_files=_file_records(d.get(HEADS_FILES_KEY)),
            labels_files=_file_records(d.get(LABELS_FILES_KEY)),
            refmap_files=_file_records(d.get(REFMAP_FILES_KEY)),
            version=int(d.get("version", 1)),
            updates=list(d.get("updates") or []),
        )

    def write(self, directory: str | Path) -> Path:
        return write_json_atomic(Path(directory) / MANIFEST_FILE, self.to_dict())


def manifest_digest(directory: str | Path) -> str:
    """A short id of one build of the index at ``directory`` (first 16 hex digits of a SHA-256).

    Manifests with integrity records (``files``): the SHA-256 of the manifest without ``heads_files`` and
    ``labels_files`` in canonical JSON, so that recording the label heads and classes (made after the build, and
    bound to this digest) leaves it unchanged.
    Older manifests: the SHA-256 of the file's bytes, as before.
    """
    data = (Path(directory) / MANIFEST_FILE).read_bytes()
    try:
        raw = json.loads(data)
    except ValueError:
        raw = None
    if isinstance(raw, dict) and raw.get(FILES_KEY) is not None:
        for key in AFTER_BUILD_KEYS:
            raw.pop(key, None)
        data = json.dumps(raw, indent=2, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def record_heads_files(directory: str | Path, records: dict[str, FileRecord]) -> bool:
    """Record the label heads' files in the manifest (``heads_files``); the build's digest is unchanged.

    Returns False (logged) for manifests from before integrity records, which are left as they are.
    """
    return _record_after_build(directory, HEADS_FILES_KEY, records, "label heads", "heads/")


def record_labels_files(directory: str | Path, records: dict[str, FileRecord]) -> bool:
    """Record the label classes' files in the manifest (``labels_files``); like :func:`record_heads_files`."""
    return _record_after_build(directory, LABELS_FILES_KEY, records, "label classes", "labels/")


def record_refmap_files(directory: str | Path, records: dict[str, FileRecord]) -> bool:
    """Record the reference map's files in the manifest (``refmap_files``); like :func:`record_heads_files`."""
    return _record_after_build(directory, REFMAP_FILES_KEY, records, "reference map", "refmap/")


def _record_after_build(
    directory: str | Path, key: str, records: dict[str, FileRecord], what: str, where: str
) -> bool:
    path = Path(directory) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is unreadable ({exc}); rebuild the index") from exc
    if not isinstance(raw, dict) or raw.get(FILES_KEY) is None:
        logger.warning(
            "the manifest of %s predates integrity records: the %s are not recorded in it and a damaged "
            "or deleted %s cannot be told from an index without them; rebuild the index to cover them",
            directory, what, where,
        )
        return False
    payload = {name: {"bytes": rec.bytes, "sha256": rec.sha256} for name, rec in sorted(records.items())}
    if raw.get(key) != payload:
        raw[key] = payload
        write_json_atomic(path, raw)
    return True


def read_manifest(directory: str | Path) -> IndexManifest:
    """Read and validate ``manifest.json``; raise :class:`IndexFormatError` with what to do when it is unusable."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise IndexFormatError(f"no index at {directory}: the directory does not exist; build one with `scatlas build --atlas ATLAS --index DIR`")
    if not path.is_file():
        hint = (
            "the build was interrupted before it finished; rerun the build with the same arguments to resume it"
            if (directory / BUILD_FILE).is_file()
            else "it is an atlas store, not an index: give it as --atlas, and an index built from it as --index "
            "(`scatlas build --atlas ATLAS --index DIR` makes one)"
            if (directory / "store.json").is_file()
            else "this is not a scatlas index directory (or its build never started); build one with `scatlas build --atlas ATLAS --index DIR`"
        )
        raise IndexFormatError(f"{directory} has no {MANIFEST_FILE}: {hint}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is unreadable ({exc}); rebuild the index") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise IndexFormatError(
            f"{path} has index format version {version!r}; this scatlas reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. Rebuild the index with this version or use a matching scatlas."
        )
    try:
        return IndexManifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{path} is incomplete or malformed ({exc!r}); rebuild the index") from exc


