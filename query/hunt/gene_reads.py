"""Gene features of atlas cells for stage 2: the index's atlas store opened (or why not), cells read in id order."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.validate import escaped
from scatlas.index import AtlasIndex, other_store_id
from scatlas.query.hunt.stage2 import GeneStats

logger = logging.getLogger(__name__)


class StoreAccess(NamedTuple):
    """The atlas store an index's cells are read from (open; the caller closes it), or why there is none:
    ``reason`` says why in words, ``differences`` lists how a store that was reached holds other cells than the
    index was built from (:func:`store_differences`; empty when it was not reached)."""

    store: Any | None
    reason: str | None
    differences: tuple[str, ...] = ()


UPDATE_HINT = "`scatlas build --update --atlas ATLAS --index INDEX` brings the index up to date with the store"


def reach_index_store(index: AtlasIndex, atlas: str | Path | None = None, *, every_dataset: bool = False) -> StoreAccess:
    """The atlas store the index was built from (or ``atlas``), opened, when it can be reached and holds the
    datasets the index was built from as they were (:func:`store_differences`). ``every_dataset``: a dataset of
    the index the store no longer holds counts too (stage 2 must read every indexed cell it may be given; datasets
    the store gained since do not matter)."""
    from scatlas.atlas.store import AtlasStore

    path = Path(atlas) if atlas is not None else index.atlas_path
    if path is None:
        return StoreAccess(None, "the index manifest names no atlas store")
    if not AtlasStore.exists(path):
        return StoreAccess(None, f"the atlas store {path} is not reachable (no store.json there)")
    try:
        store = AtlasStore.open(path)
    except ScatlasError as exc:
        return StoreAccess(None, f"the atlas store {path} could not be opened: {exc}")
    differences = store_differences(index, store, every_dataset=every_dataset)
    if differences:
        store.close()
        return StoreAccess(
            None, f"the atlas store {path} does not hold the cells the index was built from: {'; '.join(differences)}"
                  f" ({UPDATE_HINT})",
            tuple(differences),
        )
    return StoreAccess(store, None)


def open_index_store(index: AtlasIndex, atlas: str | Path | None = None) -> tuple[Any, str | None]:
    """Stage 2's store: the atlas store the index was built from (or ``atlas``), or ``(None, reason)`` when it
    cannot be used: not reachable, or datasets the index was built from that the store no longer holds or holds
    otherwise (:func:`store_differences`). Datasets ingested after the build do not matter: stage 2 reads cells of
    the index only."""
    access = reach_index_store(index, atlas, every_dataset=True)
    return access.store, access.reason


def store_differences(index: AtlasIndex, store: Any, *, every_dataset: bool = False) -> list[str]:
    """How the atlas store ``store`` differs, in the datasets the index was built from, from the store the index
    was built from (its manifest's atlas snapshot), in words; empty when it holds those datasets as they were.
    A store created separately (another ``store_id``, where the snapshot records one) is another store outright.

    Each dataset of the snapshot must be in the store under its id, with the same cell id range and the same
    content: the same X digest (``x_sha256``) where both record one, else (a store written before X digests) the
    same ingest (``ingested_at``). A dataset of the snapshot that the store lacks counts only when other datasets
    of the store hold its cell ids (any lacking dataset with ``every_dataset``); datasets the store gained after the
    build do not count (their cells are no cells of the index). Dataset ids are escaped (they come from data); no cell value is read."""
    from scatlas.atlas.validate import escaped

    snapshot = index.manifest.atlas_snapshot
    own = getattr(getattr(store, "state", None), "store_id", None)
    out: list[str] = []
    if other_store_id(snapshot.get("store_id"), own):
        out.append("it is another store than the one the index was built from (another store id: a store created "
                   "separately, not a copy)")
    recorded = [d for d in snapshot.get("datasets") or []
                if isinstance(d, dict) and "dataset_id" in d and "start" in d and "stop" in d]
    records = list(store.cell_ranges_records())
    by_id = {str(r.dataset_id): r for r in records}
    for d in recorded:
        name, start, stop = escaped(str(d["dataset_id"]), 60), int(d["start"]), int(d["stop"])
        rec = by_id.get(str(d["dataset_id"]))
        if rec is None:
            if every_dataset:
                out.append(f"dataset {name} of the index is not in the store (removed after the build?)")
            elif any(r.start < stop and start < r.stop for r in records):
                out.append(f"dataset {name} is not in the store, and other datasets hold its cell ids "
                           f"{start}..{stop - 1}")
        elif (int(rec.start), int(rec.stop)) != (start, stop):
            out.append(f"dataset {name} holds cell ids {rec.start}..{rec.stop - 1} in the store, {start}..{stop - 1} "
                       "in the index")
        elif d.get("x_sha256") and getattr(rec, "x_sha256", ""):
            if d["x_sha256"] != rec.x_sha256:
                out.append(f"dataset {name} holds other expression values (its content fingerprint, x_sha256, "
                           "differs)")
        elif d.get("ingested_at") and getattr(rec, "ingested_at", "") and d["ingested_at"] != rec.ingested_at:
            out.append(f"dataset {name} was ingested at another time and has no content fingerprint (x_sha256) to "
                       "compare")
    return out


def iter_gene_features(
    store: Any, embedder: Any, ids: np.ndarray, chunk_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """``(ids, gene features, dataset id)`` of atlas cells ``ids`` (sorted, unique), chunk by chunk, in id order
    (a chunk never spans datasets)."""
    for chunk in store.read_cells(np.asarray(ids, dtype=np.int64), chunk_size=int(chunk_size), with_X=True):
        yield (np.asarray(chunk.ids, dtype=np.int64), np.asarray(embedder.gene_features(chunk), dtype=np.float32),
               str(chunk.dataset_id))


def dataset_sample(store: Any, dataset_id: str, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` cell ids of the atlas dataset ``dataset_id``, drawn uniformly with ``seed`` (sorted)."""
    rec = next((r for r in store.cell_ranges_records() if r.dataset_id == dataset_id), None)
    if rec is None:
        raise ScatlasError(f"the atlas store has no dataset {escaped(dataset_id, 60)}; rebuild the index from this store")
    rng = np.random.default_rng([int(seed), rec.start])
    take = min(int(n), rec.n_cells)
    return np.sort(rec.start + rng.choice(rec.n_cells, size=take, replace=False)).astype(np.int64)


def dataset_gene_stats(store: Any, embedder: Any, dataset_id: str, n: int, seed: int, chunk_size: int) -> GeneStats:
    """The gene statistics of the atlas dataset ``dataset_id`` on up to ``n`` of its cells (seeded uniform sample)."""
    ids = dataset_sample(store, dataset_id, n, seed)
    return GeneStats.of(np.concatenate([g for _, g, _ in iter_gene_features(store, embedder, ids, chunk_size)]))


def read_gene_features(store: Any, embedder: Any, ids: np.ndarray, chunk_size: int) -> np.ndarray:
    """``(len(ids), n_genes)`` gene features of atlas cells ``ids`` (any order, unique), in that order."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    out = np.zeros((len(ids), len(embedder.gene_feature_names)), dtype=np.float32)
    for got, g, _ in iter_gene_features(store, embedder, ids[order], chunk_size):
        out[order[np.searchsorted(ids[order], got)]] = g
    return out
