"""The reference map of the atlas: a 2-D UMAP fitted at build on a sample of the index's stored vectors, stored in
the index (``refmap/``, :mod:`index.refmap_model`), on which annotate and search place query cells.

:func:`fit_reference_map` samples ``n_cells`` atlas cells uniformly (seeded), takes their stored vectors
(L2-normalised) and fits ``umap.UMAP(n_components=2, metric="cosine", random_state=seed)`` on them (umap-learn;
seeded, hence single-threaded); the sampled cells' coordinates, ids and vectors are written to ``refmap/`` and
recorded in the manifest. :func:`ensure_reference_map` is what ``build`` and ``build --update`` call: it keeps a
map already fitted for this build, and skips (logged) an atlas under :data:`MIN_CELLS` cells or an environment
without umap-learn. ``AtlasIndex.reference_map()`` loads the map; ``ReferenceMap.transform`` places new vectors.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.errors import DependencyError, IndexFormatError, TooFewCellsError
from scatlas.index._faiss import faiss_module
from scatlas.index.atlas_index import AtlasIndex
from scatlas.index.manifest import manifest_digest, read_manifest
from scatlas.index.refmap_model import ReferenceMap, read_refmap_params, write_reference_map
from scatlas.index.vectors import l2_normalize

logger = logging.getLogger(__name__)

DEFAULT_MAP_CELLS = 20_000
"""Atlas cells the map is fitted on (and drawn under the query)."""
MIN_CELLS = 50
"""Atlases with fewer cells get no map (logged)."""
N_NEIGHBORS = 15
MIN_DIST = 0.3
N_EPOCHS = 200
"""UMAP's layout epochs (its default for samples over 10,000 cells; it would run 500 on smaller ones)."""


def _umap() -> Any:
    try:
        import umap
    except ImportError as exc:
        raise DependencyError(
            "the reference map needs umap-learn (pip install umap-learn); or build with --no-map"
        ) from exc
    return umap


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Raise KeyboardInterrupt at the end of the block when Ctrl-C came during it, even where code inside swallowed
    it: numba's compiled callbacks (UMAP's layout) report an exception raised in them as "Exception ignored" and go
    on, so a Ctrl-C there would otherwise let the build finish as if nothing had happened. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []
    before = signal.getsignal(signal.SIGINT)

    if before is signal.SIG_IGN:  # Ctrl-C is ignored here: nothing to keep
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        if callable(before):
            before(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if seen:
        raise KeyboardInterrupt


def fit_reference_map(
    index_dir: str | Path, n_cells: int = DEFAULT_MAP_CELLS, seed: int = 0, *, n_neighbors: int = N_NEIGHBORS,
    min_dist: float = MIN_DIST,
) -> ReferenceMap:
    """Fit the reference map of the index at ``index_dir`` on ``n_cells`` sampled atlas cells (all of them in a
    smaller atlas), store it in ``refmap/`` (replacing an older map) and record it in the manifest.

    TooFewCellsError for an index of fewer than :data:`MIN_CELLS` cells; DependencyError without umap-learn.
    """
    if int(n_cells) < MIN_CELLS:
        raise TooFewCellsError(f"a reference map needs at least {MIN_CELLS} cells (n_cells={n_cells})")
    t0 = time.perf_counter()
    with AtlasIndex.open(index_dir, unfinished_ok=True) as idx:
        if idx.n_cells < MIN_CELLS:
            raise TooFewCellsError(f"the index holds {idx.n_cells} cells, under the {MIN_CELLS} a reference map needs")
        ids = idx.sample_ids(int(n_cells), seed=int(seed))
        vectors = l2_normalize(idx.vectors(ids))
        path, digest, dim, total = idx.path, idx.build_id, idx.dim, idx.n_cells
    umap = _umap()
    k = int(min(n_neighbors, len(ids) - 1))
    logger.info("fitting the reference map: UMAP of %d of %d atlas cells (%d-d vectors)", len(ids), total, dim)
    t1 = time.perf_counter()
    model = umap.UMAP(n_components=2, n_neighbors=k, min_dist=float(min_dist), metric="cosine", n_epochs=N_EPOCHS,
                      random_state=int(seed), n_jobs=1, precomputed_knn=(*_knn(vectors, k), None))
    with interrupts_kept(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap-learn's notes on seeds, threads and spectral initialisation
        coords = np.asarray(model.fit_transform(vectors), dtype=np.float32)
    fit_s = time.perf_counter() - t1
    if coords.shape != (len(ids), 2) or not np.isfinite(coords).all():
        raise IndexFormatError(f"UMAP returned an unusable map ({coords.shape}, finite: {np.isfinite(coords).all()})")
    params = {
        "manifest_sha256": digest, "n_cells": len(ids), "n_cells_requested": int(n_cells), "atlas_cells": total,
        "dim": dim, "metric": "cosine", "n_neighbors": k, "min_dist": float(min_dist), "n_epochs": N_EPOCHS,
        "seed": int(seed), "umap_version": getattr(umap, "__version__", None), "fit_seconds": round(fit_s, 2),
        "seconds": round(time.perf_counter() - t0, 2), "knn": "exact", "placement": "umap-transform-init",
    }
    refmap = ReferenceMap(ids=ids, coords=coords, vectors=vectors.astype(np.float16), params=params)
    write_reference_map(path, refmap)
    logger.info("reference map of %d cells fitted in %.1f s (UMAP %.1f s)", len(ids), params["seconds"], fit_s)
    return refmap


def _knn(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest neighbours of each vector among them (itself first) and their cosine distances, for
    UMAP's ``precomputed_knn``: exact, and it spares the fit pynndescent's search (and its compilation, about half
    of a small fit's time)."""
    index = faiss_module().IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    sims, pos = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    dist = np.maximum(1.0 - sims, 0.0).astype(np.float32)
    own = pos[:, 0] == np.arange(len(pos))
    dist[own, 0] = 0.0
    return pos.astype(np.int32), dist


def has_reference_map(index_dir: str | Path) -> bool:
    """Whether the index at ``index_dir`` records a reference map fitted for its current build (files not
    checksummed here)."""
    index_dir = Path(index_dir)
    params = read_refmap_params(index_dir)
    return bool(
        params is not None and read_manifest(index_dir).refmap_files
        and params.get("manifest_sha256") == manifest_digest(index_dir)
    )


def ensure_reference_map(
    index_dir: str | Path, n_cells: int = DEFAULT_MAP_CELLS, seed: int = 0, *, like: str | Path | None = None,
    same_cells: bool = False,
) -> bool:
    """The reference map for ``build``: fitted unless one was fitted for this build already (a resumed build);
    skipped, logged, for an atlas under :data:`MIN_CELLS` cells or without umap-learn. ``like``: another version
    of the index whose map's sample size and seed to reuse (``build --update``); ``same_cells``: that version holds
    the very cells and vectors of this one (an update that only relabelled), so its map is carried over as it is,
    not fitted again. Returns whether a map is there."""
    if has_reference_map(index_dir):
        return True
    if like is not None and same_cells and _carry_map(Path(like), Path(index_dir)):
        return True
    if like is not None:
        old = read_refmap_params(like) or {}
        n_cells, seed = int(old.get("n_cells_requested", n_cells)), int(old.get("seed", seed))
    n = read_manifest(index_dir).n_cells
    if n < MIN_CELLS:
        logger.info("no reference map: the atlas has %d cells, under the %d a map needs", n, MIN_CELLS)
        return False
    try:
        fit_reference_map(index_dir, n_cells=n_cells, seed=seed)
    except DependencyError as exc:
        logger.warning("no reference map: %s", exc)
        return False
    return True


def _carry_map(old_dir: Path, index_dir: Path) -> bool:
    """Copy the map of ``old_dir`` (another version of the index, with the same cells and vectors) into
    ``index_dir``, recorded for its build; False when the old version has no usable map."""
    with AtlasIndex.open(old_dir) as old:
        refmap = old.reference_map()
    if refmap is None:
        return False
    params = {**refmap.params, "manifest_sha256": manifest_digest(index_dir), "carried_from": str(old_dir.name)}
    write_reference_map(index_dir, ReferenceMap(ids=refmap.ids, coords=refmap.coords, vectors=refmap.vectors,
                                                params=params))
    logger.info("reference map carried over from %s: the cells and their vectors are unchanged", old_dir.name)
    return True


__all__ = ["DEFAULT_MAP_CELLS", "MIN_CELLS", "ReferenceMap", "ensure_reference_map", "fit_reference_map",
           "has_reference_map"]
