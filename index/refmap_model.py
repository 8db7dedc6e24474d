"""The stored reference map (``refmap/``): :class:`ReferenceMap`, which places new vectors on the atlas' 2-D map, and
its files: written by :func:`write_reference_map`, checked and read by :func:`load_reference_map`.

``refmap/`` holds plain arrays and JSON, no pickle (read with ``allow_pickle=False``, so loading a map runs no
code): ``ids.npy`` (the sampled atlas cells' soma_joinid, int64), ``coords.npy`` (their 2-D map coordinates,
float32), ``vectors.f16.npy`` (their stored vectors) and ``refmap.json`` (format, the build id it belongs to, the
UMAP parameters, the fit time). The files are recorded in the manifest (``refmap_files``: size and SHA-256) and
checked before every load. Fitting is :mod:`index.refmap`; this module does not import the index itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import read_json_object, replaced_dir, write_json_atomic
from scatlas.atlas.errors import IndexFormatError
from scatlas.index._faiss import faiss_module
from scatlas.index.manifest import REFMAP_DIR, REFMAP_FILE, FileRecord, record_refmap_files
from scatlas.index.shard import file_record
from scatlas.index.vectors import check_queries, l2_normalize
from scatlas.index.verify import check_files

logger = logging.getLogger(__name__)

REFMAP_FORMAT = 1
IDS_FILE = "ids.npy"
COORDS_FILE = "coords.npy"
VECTORS_FILE = "vectors.f16.npy"
ARRAY_FILES = (IDS_FILE, COORDS_FILE, VECTORS_FILE)
TRANSFORM_BATCH = 8192
"""New vectors placed at a time (bounds the neighbour search's memory)."""
_MIN_K_DIST_SCALE = 1e-3  # UMAP's floor on sigma, as a fraction of the mean neighbour distance
_REBUILD = "rebuild the index (`scatlas build --overwrite ...`) to fit a new map, or `--no-map` to build without one"


@dataclass(frozen=True)
class ReferenceMap:
    """A 2-D map of the atlas (UMAP of ``len(ids)`` sampled cells) and the means to place new cells on it.

    ``ids``: the sampled atlas cells (soma_joinid, sorted); ``coords``: their map coordinates ``(n, 2)``;
    ``vectors``: their stored vectors (L2-normalised, float16); ``params``: how the map was fitted (refmap.json).
    """

    ids: np.ndarray
    coords: np.ndarray
    vectors: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    _index: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def n_neighbors(self) -> int:
        return int(self.params.get("n_neighbors", 15))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def _faiss(self) -> Any:
        if not self._index:
            index = faiss_module().IndexFlatIP(self.dim)
            index.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            self._index.append(index)
        return self._index[0]

    def neighbors(self, vectors: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(positions (n, k) into ids, cosine distances (n, k))`` of each vector's nearest sampled atlas cells."""
        k = min(int(k or self.n_neighbors), len(self))
        q = l2_normalize(check_queries(vectors, self.dim))
        sims, pos = self._faiss().search(np.ascontiguousarray(q, dtype=np.float32), k)
        return pos.astype(np.int64), np.maximum(1.0 - sims.astype(np.float64), 0.0)

    def transform(self, vectors: np.ndarray, batch_size: int = TRANSFORM_BATCH) -> np.ndarray:
        """``(n, 2)`` float32 map coordinates of ``vectors`` (``(n, dim)``, embedded like the index's; normalised
        here).

        Each vector is placed as UMAP's ``transform`` starts it: at the mean of its ``n_neighbors`` nearest sampled
        atlas cells' coordinates, weighted by UMAP's fuzzy-set memberships ``exp(-d / sigma)`` (``d`` the cosine
        distance, ``sigma`` such that the memberships of neighbours 2..k sum to log2(k)); a vector equal to a
        sampled cell's lands on it. UMAP's further layout epochs are not run (they need numba and the fitted model,
        and only nudge the points): docs/architecture.md, "Reference map". Rows with non-finite values are NaN.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors = vectors[None, :] if vectors.ndim == 1 else vectors
        bad = ~np.isfinite(vectors).all(axis=1) if vectors.ndim == 2 else np.zeros(0, bool)
        if bad.any():
            vectors = np.where(bad[:, None], 0.0, vectors).astype(np.float32)
        out = np.empty((len(vectors), 2), dtype=np.float32)
        step = max(int(batch_size), 1)
        for a in range(0, len(vectors), step):
            pos, dist = self.neighbors(vectors[a : a + step])
            out[a : a + len(pos)] = _place(self.coords, pos, dist)
        out[bad] = np.nan
        return out


def _sigmas(dist: np.ndarray, k: int) -> np.ndarray:
    """Per row, the bandwidth ``sigma`` with ``sum_{j >= 1} exp(-d_j / sigma) = log2(k)``: UMAP's ``smooth_knn_dist``
    with ``local_connectivity`` 0, as its transform uses (no offset ``rho``), by bisection, vectorised."""
    d = dist[:, 1:]
    n = len(dist)
    target = np.log2(k)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    todo = np.ones(n, dtype=bool)
    for _ in range(64):
        if not todo.any() or d.shape[1] == 0:
            break
        psum = np.where(d > 0, np.exp(-d / mid[:, None]), 1.0).sum(axis=1)
        todo &= np.abs(psum - target) >= 1e-5
        high = todo & (psum > target)
        low = todo & ~high
        hi = np.where(high, mid, hi)
        lo = np.where(low, mid, lo)
        mid = np.where(high | (low & np.isfinite(hi)), (lo + hi) / 2, np.where(low, mid * 2, mid))
    floor = _MIN_K_DIST_SCALE * float(dist.mean()) if dist.size else 0.0
    return np.maximum(mid, floor)


def _place(coords: np.ndarray, pos: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """The membership-weighted mean of the neighbours' coordinates (UMAP's ``init_graph_transform``)."""
    k = pos.shape[1]
    sigma = _sigmas(dist, max(k, 2))
    w = np.where(dist > 0, np.exp(-dist / np.maximum(sigma[:, None], 1e-300)), 1.0)
    w = np.where(pos >= 0, w, 0.0)
    xy = coords[np.maximum(pos, 0)].astype(np.float64)
    total = w.sum(axis=1, keepdims=True)
    placed = (w[:, :, None] * xy).sum(axis=1) / np.where(total > 0, total, 1.0)
    exact = (w >= 1.0).any(axis=1)
    if exact.any():  # a neighbour at distance 0: the point is that cell (UMAP: weight 1 -> its position)
        first = np.argmax(w[exact] >= 1.0, axis=1)
        placed[exact] = xy[exact, first]
    placed[total[:, 0] <= 0] = np.nan  # no neighbour found
    return placed.astype(np.float32)


# -- storing and loading -----------------------------------------------------------------------------------------


def write_reference_map(index_dir: str | Path, refmap: ReferenceMap) -> dict[str, FileRecord]:
    """Write ``refmap/`` whole (a temporary directory renamed into place; an older map is replaced) and record its
    files in the manifest. Returns the records."""
    index_dir = Path(index_dir)
    final = index_dir / REFMAP_DIR
    with replaced_dir(final) as tmp:
        np.save(tmp / IDS_FILE, np.asarray(refmap.ids, dtype=np.int64), allow_pickle=False)
        np.save(tmp / COORDS_FILE, np.asarray(refmap.coords, dtype=np.float32), allow_pickle=False)
        np.save(tmp / VECTORS_FILE, np.asarray(refmap.vectors, dtype=np.float16), allow_pickle=False)
        write_json_atomic(tmp / REFMAP_FILE, {"format": REFMAP_FORMAT, **refmap.params})
    records = {
        f"{REFMAP_DIR}/{name}": file_record(final / name) for name in (*ARRAY_FILES, REFMAP_FILE)
    }
    record_refmap_files(index_dir, records)
    return records


def read_refmap_params(index_dir: str | Path) -> dict[str, Any] | None:
    """``refmap/refmap.json`` as stored (None when absent or unreadable); not checked against the manifest."""
    path = Path(index_dir) / REFMAP_DIR / REFMAP_FILE
    if not path.is_file():
        return None
    try:
        return read_json_object(path, _REBUILD)
    except IndexFormatError:
        return None


def load_reference_map(
    index_dir: str | Path, *, recorded: Mapping[str, FileRecord] | None, digest: str, dim: int
) -> ReferenceMap | None:
    """The reference map stored with the index at ``index_dir``; None when it has none (or the map belongs to
    another build of the index, or is not recorded in the manifest: logged).

    ``recorded``: the manifest's records of ``refmap/*``: every one must be present with its size and SHA-256, and
    every file of a map must be recorded (IndexFormatError otherwise, saying what to do); ``digest``: the index's
    build id; ``dim``: its vectors' dimension.
    """
    index_dir = Path(index_dir)
    where = index_dir / REFMAP_DIR
    if not recorded:
        if where.exists():
            logger.warning("%s is not recorded in the index manifest (its writing was interrupted?): no reference map "
                           "is used; %s", where, _REBUILD)
        return None
    fix = f"the manifest records a reference map that cannot be used: {_REBUILD}"
    check_files(index_dir, dict(recorded), fix=fix)
    unrecorded = [n for n in (*ARRAY_FILES, REFMAP_FILE) if f"{REFMAP_DIR}/{n}" not in recorded]
    if unrecorded:
        raise IndexFormatError(f"{where / unrecorded[0]} is not recorded in the index manifest; {fix}")
    params = read_json_object(where / REFMAP_FILE, fix)
    if params.get("format") != REFMAP_FORMAT:
        raise IndexFormatError(f"{where / REFMAP_FILE} has format {params.get('format')!r} (this scatlas reads "
                               f"{REFMAP_FORMAT}); {_REBUILD}")
    if params.get("manifest_sha256") != digest:
        logger.warning("the reference map in %s belongs to another build of the index: not used; %s", where, _REBUILD)
        return None
    try:
        ids, coords, vectors = (np.load(where / n, allow_pickle=False) for n in ARRAY_FILES)
    except (OSError, ValueError, EOFError) as exc:
        raise IndexFormatError(f"{where} holds an unreadable array ({type(exc).__name__}: {exc}); {fix}") from exc
    n = len(ids)
    shapes_ok = (
        ids.ndim == 1 and ids.dtype == np.int64 and coords.shape == (n, 2) and vectors.shape == (n, int(dim))
        and n > 0 and bool(np.isfinite(coords).all()) and bool(np.isfinite(vectors).all())
    )
    if not shapes_ok:
        raise IndexFormatError(
            f"{where} does not hold a usable map (ids {ids.shape} {ids.dtype}, coordinates {coords.shape}, vectors "
            f"{vectors.shape} for {dim}-d vectors, or non-finite values); {fix}"
        )
    return ReferenceMap(ids=ids, coords=coords.astype(np.float32), vectors=vectors, params=dict(params))


__all__ = ["ReferenceMap", "load_reference_map", "read_refmap_params", "write_reference_map"]
