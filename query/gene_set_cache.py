"""What an annotation prepares for a query's gene set, kept for the next query with the same genes in this process.

A query that lacks some of the embedder's genes gets label heads refitted for the genes it has, and every query gets
the expression match calibrated on them (:mod:`query.expression_match`): seconds each, computed from the heads'
training sample, and the same for every query of one panel or one lab's files. ``scatlas serve`` keeps one index
open and annotates upload after upload; a one-shot CLI call gains nothing and loses nothing.

An entry's key is the index (its directory and manifest digest), the label heads (their directory and the
identity of ``heads.json`` and the training sample on disk: retraining replaces the files, so a stale entry is
never found), the label keys and a digest of the genes present. At most :data:`MAX_ENTRIES` entries are kept,
least recently used first out; they hold small arrays (profiles, head weights), not the training sample.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from scatlas.index import AtlasIndex, LabelHead, heads_files_identity

logger = logging.getLogger(__name__)

MAX_ENTRIES = 8
"""Entries kept per process (each a few MB at most: one profile per atlas cell type, the refitted heads' weights)."""

T = TypeVar("T")

_entries: OrderedDict[Hashable, Any] = OrderedDict()
_lock = threading.Lock()


def key_of(kind: str, idx: AtlasIndex, heads: dict[str, LabelHead], present: np.ndarray | None) -> Hashable | None:
    """The cache key of ``kind`` (what is cached) for these heads and genes present; None when the heads' files
    cannot be identified (then nothing is cached)."""
    files = []
    for key in heads:  # in order: the expression match reads the first head with gene features
        directory, loaded = heads[key].directory, heads[key].files_identity
        if directory is None or loaded is None:
            return None
        if heads_files_identity(directory) != loaded:  # retrained since they were loaded: nothing to key them by
            logger.warning("the %r label heads were retrained since the index was opened: reopen it to use them", key)
            return None
        files.append((key, str(Path(directory).resolve()), loaded))
    genes = None
    if present is not None:
        mask = np.asarray(present, dtype=bool)
        genes = (len(mask), hashlib.sha256(np.packbits(mask).tobytes()).hexdigest())
    return kind, str(Path(idx.path).resolve()), idx.build_id, tuple(files), genes


def cached(key: Hashable | None, compute: Callable[[], T]) -> tuple[T, bool]:
    """``(value, reused)``: the entry under ``key``, else ``compute()`` stored under it. The value is copied on the
    way out (its records end up in reports that callers may edit)."""
    if key is None:
        return compute(), False
    with _lock:
        if key in _entries:
            _entries.move_to_end(key)
            return _copy(_entries[key]), True
    value = compute()  # outside the lock: another thread may compute the same entry meanwhile, harmlessly
    with _lock:
        _entries[key] = value
        _entries.move_to_end(key)
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)
    return _copy(value), False


def clear() -> None:
    """Forget every entry."""
    with _lock:
        _entries.clear()


def _copy(value: Any) -> Any:
    """A copy whose dicts (records) can be edited; arrays and fitted models are shared (never modified)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, LabelHead):
        return dataclasses.replace(value, record=copy.deepcopy(value.record), models=dict(value.models))
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and hasattr(value, "record"):
        return dataclasses.replace(value, record=copy.deepcopy(value.record))
    return value
