"""How the hunt gets at an index: an :class:`index.AtlasIndex`, opened here when given as a path.

Everything else the hunt reads of an index (build id, embedder fingerprint, shards, stored vectors, sampled ids,
SQL predicates, the cells table) is a method or property of :class:`~index.AtlasIndex`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scatlas.atlas.errors import InputError
from scatlas.index import AtlasIndex

IndexLike = AtlasIndex | str | Path


def open_index(index: IndexLike) -> AtlasIndex:
    """An opened index as is, or ``AtlasIndex.open(path)`` for a path."""
    if isinstance(index, AtlasIndex):
        return index
    if isinstance(index, str | Path):
        return AtlasIndex.open(index)
    raise InputError(f"expected an index (AtlasIndex or a path to one), got {type(index).__name__}")


def input_paths(index: Any, *others: Any) -> tuple[Path, ...]:
    """The files and directories a hunt step reads: the index's directory and those of ``others`` given as paths
    (a step refuses to write into any of them)."""
    found = [index, getattr(index, "path", None), *others]
    return tuple(Path(p) for p in found if isinstance(p, str | Path))
