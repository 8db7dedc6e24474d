"""Carrying shards into a new version of an index: hard-linked when unchanged, rewritten without removed cells.

Removal is FAISS id removal (``remove_ids``) on the shard's index, with the same rows dropped from its ids and
stored vectors; the kept vectors are not re-encoded, so an exact index answers exactly as a fresh build would.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import IndexFormatError
from scatlas.index._faiss import faiss_module
from scatlas.index.manifest import (
    DONE_FILE,
    SHARD_IDS_FILE,
    SHARD_INDEX_FILE,
    SHARD_RESIDUALS_FILE,
    SHARD_VECTORS_FILE,
    ShardRecord,
)
from scatlas.index.shard import TMP_PREFIX, _done_payload, file_record, read_done, verify_shard
from scatlas.index.versions import link_file


def in_ranges(ids: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Whether each id lies in one of the ``[start, stop)`` ranges."""
    hit = np.zeros(len(ids), dtype=bool)
    for start, stop in ranges:
        hit |= (ids >= start) & (ids < stop)
    return hit


def overlaps(rec: ShardRecord, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether shard ``rec``'s id span meets one of the ranges."""
    return any(start <= rec.id_max and stop > rec.id_min for start, stop in ranges)


def carried_shard(dst: Path, rec: ShardRecord) -> ShardRecord | None:
    """The record of a shard an interrupted update already carried into ``dst`` (intact), else None."""
    if not (dst / DONE_FILE).is_file():
        return None
    try:
        done = read_done(dst)
        verify_shard(dst, done, checksums=False)
        return done
    except IndexFormatError:
        return None


def link_shard(src: Path, dst: Path, rec: ShardRecord) -> ShardRecord:
    """Shard ``src`` (unchanged) hard-linked as ``dst``."""
    for name in (*rec.files, DONE_FILE):
        link_file(src / name, dst / name)
    return rec


def strip_shard(src: Path, dst: Path, rec: ShardRecord, removed: Sequence[tuple[int, int]]) -> ShardRecord | None:
    """Shard ``src`` written as ``dst`` without the cells whose ids lie in ``removed``; None when none is left."""
    faiss = faiss_module()

    ids = np.load(src / SHARD_IDS_FILE, allow_pickle=False)
    drop = in_ranges(ids, removed)
    if not drop.any():
        return link_shard(src, dst, rec)
    if drop.all():
        return None
    keep = ~drop
    index = faiss.read_index(str(src / SHARD_INDEX_FILE))
    try:
        n_removed = index.remove_ids(faiss.IDSelectorBatch(ids[drop]))
    except RuntimeError as exc:
        raise IndexFormatError(
            f"this index type cannot remove cells ({str(exc).splitlines()[0][:200]}); rebuild the index with "
            "--overwrite instead of updating it"
        ) from exc
    if int(n_removed) != int(drop.sum()):
        raise IndexFormatError(f"shard {src.name}: removed {n_removed} vectors where {int(drop.sum())} were asked")
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    kept_ids = ids[keep]
    np.save(tmp / SHARD_IDS_FILE, kept_ids)
    rows = [name for name in (SHARD_VECTORS_FILE, SHARD_RESIDUALS_FILE) if name in rec.files]
    for name in rows:  # the stored vectors and, where the shard has them, their rounding residuals
        stored = np.load(src / name, mmap_mode="r", allow_pickle=False)
        np.save(tmp / name, np.ascontiguousarray(stored[keep]))
        del stored
    faiss.write_index(index, str(tmp / SHARD_INDEX_FILE))
    files = {name: file_record(tmp / name) for name in (SHARD_INDEX_FILE, SHARD_IDS_FILE, *rows)}
    out = ShardRecord(no=rec.no, n=len(kept_ids), id_min=int(kept_ids[0]), id_max=int(kept_ids[-1]), files=files)
    write_json_atomic(tmp / DONE_FILE, _done_payload(out))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return out
