"""A sweep's partial result files: ids and scores of one unit of work (a shard, a chunk of candidates), written
atomically and read back only when they are the unit the sweep planned (same size and id range)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.outputs import writing


def meta_of(ids: np.ndarray) -> dict[str, int]:
    """The identity of a unit of work over sorted ``ids``: its size and id range."""
    return {"n": len(ids), "id_min": int(ids[0]) if len(ids) else -1, "id_max": int(ids[-1]) if len(ids) else -1}


def write_npz_atomic(path: Path, **arrays: Any) -> None:
    """Write ``arrays`` as an ``.npz`` at ``path`` (temporary file, fsync, rename): readers see the old file or the
    whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path), open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        with writing(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_partial(path: Path, ids: np.ndarray, scores: np.ndarray, meta: dict[str, int]) -> None:
    """Write ``ids``/``scores`` and the unit's ``meta`` to ``path`` atomically (:func:`write_npz_atomic`)."""
    write_npz_atomic(path, ids=ids.astype(np.int64), scores=scores.astype(np.float32),
                     meta=np.array([meta["n"], meta["id_min"], meta["id_max"]], dtype=np.int64))


def read_partial(path: Path, expect: dict[str, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids, scores)`` of the partial at ``path`` when it is the unit ``expect``; None when absent or not."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = z["meta"].tolist()
            if meta != [expect["n"], expect["id_min"], expect["id_max"]]:
                return None
            return z["ids"].astype(np.int64), z["scores"].astype(np.float32)
    except (OSError, ValueError, KeyError):
        return None
