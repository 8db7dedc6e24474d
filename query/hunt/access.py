"""What the hunt needs from an index, and the small helpers built on it.

The hunt works against the public surface of :class:`index.AtlasIndex` (see ``docs/architecture.md``): ``embedder``,
``manifest`` (``embedder.fingerprint``, ``atlas_snapshot``, ``n_cells``, ``dim``), ``embed(chunk)``,
``iter_shards()`` -> ``(shard_no, ids, float16 vectors)``, ``connect()`` (the cells table) and
``cells(ids, columns)``. :class:`HuntIndex` spells that out, so anything with the same surface (an index opened
from a directory, or a stand-in in tests) can be hunted in.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.index.metadata import where_ids

logger = logging.getLogger(__name__)


@runtime_checkable
class HuntIndex(Protocol):
    """The part of :class:`index.AtlasIndex` the hunt uses."""

    @property
    def manifest(self) -> Any: ...

    @property
    def embedder(self) -> Any: ...

    def embed(self, chunk: CellChunk) -> np.ndarray: ...

    def iter_shards(self) -> Iterable[tuple[int, np.ndarray, np.ndarray]]: ...

    def connect(self) -> Any:
        """A read-only DuckDB connection with the ``cells`` table, owned by the index (callers do not close it)."""
        ...


IndexLike = HuntIndex | str | Path


def open_index(index: IndexLike) -> HuntIndex:
    """An opened index as is, or ``AtlasIndex.open(path)`` for a path."""
    if isinstance(index, str | Path):
        try:
            atlas_index = importlib.import_module("scatlas.index").AtlasIndex
        except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the index package
            raise IndexFormatError(f"cannot open the index at {index}: index.AtlasIndex is not available ({exc})") from exc
        opened: HuntIndex = atlas_index.open(index)
        return opened
    for name in ("manifest", "embedder", "embed", "iter_shards", "connect"):
        # look the name up without evaluating properties (an index without an embedder raises on .embedder)
        if not hasattr(type(index), name) and name not in getattr(index, "__dict__", {}):
            raise InputError(f"expected an index (AtlasIndex or a path to one), got {type(index).__name__} without .{name}")
    return index


def embedder_fingerprint(index: HuntIndex) -> str:
    """The fingerprint of the embedder that made the index's vectors (what classifiers are checked against)."""
    info = getattr(index.manifest, "embedder", None)
    fp = getattr(info, "fingerprint", None)
    if fp is None and isinstance(info, dict):
        fp = info.get("fingerprint")
    if not fp:
        fp = index.embedder.fingerprint()
    return str(fp)


def index_dim(index: HuntIndex) -> int:
    dim = getattr(index.manifest, "dim", None)
    return int(dim) if dim is not None else int(index.embedder.dim)


def _manifest_payload(manifest: Any) -> str:
    for attr in ("to_json",):
        fn = getattr(manifest, attr, None)
        if callable(fn):
            return str(fn())
    fn = getattr(manifest, "to_dict", None)
    if callable(fn):
        return json.dumps(fn(), sort_keys=True, default=str)
    return json.dumps(manifest, sort_keys=True, default=str)


def manifest_id(index: HuntIndex) -> str:
    """A short, stable id of the index build: SHA-256 of its manifest (shards, checksums, embedder, snapshot)."""
    explicit = getattr(index.manifest, "id", None) or getattr(index.manifest, "manifest_id", None)
    if explicit:
        return str(explicit)
    return hashlib.sha256(_manifest_payload(index.manifest).encode()).hexdigest()[:16]


def atlas_path(index: HuntIndex) -> Path | None:
    """Where the atlas store the index was built from lives, per the manifest's atlas snapshot (may be gone)."""
    snap = getattr(index.manifest, "atlas_snapshot", None) or {}
    path = snap.get("path") if isinstance(snap, dict) else None
    return Path(path) if path else None


def shard_sizes(index: HuntIndex) -> list[tuple[int, int]]:
    """``[(shard_no, n_cells)]`` in shard order."""
    return [(int(no), len(ids)) for no, ids, _ in index.iter_shards()]


def iter_shards(index: HuntIndex) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The index's shards, checked: 1-D int64-like ids, 2-D float16 vectors of the index dimension."""
    dim = index_dim(index)
    for no, ids, vecs in index.iter_shards():
        if vecs.ndim != 2 or vecs.shape[0] != len(ids) or vecs.shape[1] != dim:
            raise IndexFormatError(
                f"shard {no}: {len(ids)} ids with vectors of shape {vecs.shape}, expected ({len(ids)}, {dim}); "
                "the index is damaged: rebuild it"
            )
        yield int(no), ids, vecs


def gather_vectors(index: HuntIndex, ids: np.ndarray) -> np.ndarray:
    """Stored vectors (float32 copies of the float16 values) of sorted, unique cell ids; InputError for unknown ids."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > 1 and np.any(np.diff(ids) <= 0):
        raise InputError("cell ids must be sorted and unique")
    out = np.empty((len(ids), index_dim(index)), dtype=np.float32)
    found = np.zeros(len(ids), dtype=bool)
    for _, sid, vecs in iter_shards(index):
        if len(sid) == 0 or len(ids) == 0:
            continue
        lo, hi = np.searchsorted(ids, [sid[0], sid[-1] + 1])
        if hi <= lo:
            continue
        want = ids[lo:hi]
        pos = np.searchsorted(sid, want)
        pos = np.minimum(pos, len(sid) - 1)
        hit = np.asarray(sid[pos]) == want
        rows = np.arange(lo, hi)[hit]
        out[rows] = np.asarray(vecs[pos[hit]], dtype=np.float32)
        found[rows] = True
    if not found.all():
        missing = ids[~found]
        raise InputError(
            f"{len(missing)} cell ids are not in the index (e.g. {int(missing[0])}); the index may be older than the "
            "atlas: rebuild it"
        )
    return out


@contextmanager
def cursor(index: HuntIndex) -> Iterator[Any]:
    """A private cursor on the index's (shared) DuckDB connection, closed afterwards; the connection stays open."""
    cur = index.connect().cursor()
    try:
        yield cur
    finally:
        cur.close()


def sql_ids(index: HuntIndex, predicate: str) -> np.ndarray:
    """Sorted ids of the index's cells matching an SQL predicate over its ``cells`` table (possibly none).

    The predicate is checked by :func:`index.predicate.validate_predicate` (inside :func:`where_ids`) before it runs;
    InputError when it is invalid, uses anything but columns, literals, operators and plain scalar functions, or
    fails on the data (the message names the error class, never cell values).
    """
    with cursor(index) as con:
        return where_ids(con, predicate, allow_empty=True, what="SQL predicate")


def sample_ids(index: HuntIndex, n: int, *, exclude: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Up to ``n`` cell ids drawn uniformly from all indexed cells except ``exclude`` (sorted)."""
    sizes = shard_sizes(index)
    total = sum(s for _, s in sizes)
    excl = np.zeros(0, dtype=np.int64) if exclude is None else np.unique(np.asarray(exclude, dtype=np.int64))
    n = int(min(n, max(total - len(excl), 0)))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    # Oversample by the excluded count so that removing excluded ids still leaves n.
    draw = min(total, n + len(excl))
    positions = np.sort(rng.choice(total, size=draw, replace=False))
    chosen: list[np.ndarray] = []
    offset = 0
    for _, sid, _ in iter_shards(index):
        lo, hi = np.searchsorted(positions, [offset, offset + len(sid)])
        if hi > lo:
            chosen.append(np.asarray(sid[positions[lo:hi] - offset], dtype=np.int64))
        offset += len(sid)
    ids = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    ids = np.setdiff1d(ids, excl, assume_unique=False)
    if len(ids) > n:
        ids = np.sort(rng.choice(ids, size=n, replace=False))
    return ids.astype(np.int64)
