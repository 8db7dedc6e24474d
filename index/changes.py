"""What changed in an atlas store since an index was built from it, and build arguments that differ, in words.

An index records the store's snapshot (:meth:`atlas.store.AtlasStore.snapshot`: each dataset's id range, X digest
and metadata revision). Comparing it with the store's snapshot now says which datasets were added, removed or
relabelled, which is what ``build --update`` applies and what a refused rebuild explains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scatlas.atlas.validate import escaped


@dataclass(frozen=True)
class DatasetRange:
    """One dataset as a snapshot records it."""

    dataset_id: str
    start: int
    stop: int

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StoreChanges:
    """Datasets ``added`` to, ``removed`` from and ``relabelled`` in a store since a snapshot of it.

    A dataset removed and ingested again under the same id has a new id range: it is both removed and added.
    """

    added: list[DatasetRange] = field(default_factory=list)
    removed: list[DatasetRange] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.relabelled)

    def sentences(self) -> list[str]:
        """The changes in words (dataset ids escaped: they come from data)."""
        out = []
        for what, items in (("gained", self.added), ("lost", self.removed)):
            if items:
                n = sum(d.n_cells for d in items)
                names = ", ".join(escaped(d.dataset_id, 60) for d in items[:5]) + (" ..." if len(items) > 5 else "")
                out.append(f"the atlas {what} {len(items)} dataset(s) ({n:,} cells): {names}")
        if self.relabelled:
            names = ", ".join(escaped(d, 60) for d in self.relabelled[:5]) + (" ..." if len(self.relabelled) > 5 else "")
            out.append(f"{len(self.relabelled)} dataset(s) were relabelled: {names}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "added": [d.dataset_id for d in self.added],
            "removed": [d.dataset_id for d in self.removed],
            "relabelled": list(self.relabelled),
            "cells_added": sum(d.n_cells for d in self.added),
            "cells_removed": sum(d.n_cells for d in self.removed),
        }


def _datasets(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(d["dataset_id"]): d for d in snapshot.get("datasets", []) if isinstance(d, dict) and "dataset_id" in d}


def _range(d: dict[str, Any]) -> DatasetRange:
    return DatasetRange(str(d["dataset_id"]), int(d["start"]), int(d["stop"]))


def store_changes(old: dict[str, Any], new: dict[str, Any]) -> StoreChanges:
    """The changes from snapshot ``old`` (an index's) to ``new`` (the store's now)."""
    before, after = _datasets(old), _datasets(new)
    added, removed, relabelled = [], [], []
    for ds, d in after.items():
        prev = before.get(ds)
        if prev is None or (int(prev["start"]), int(prev["stop"])) != (int(d["start"]), int(d["stop"])) or (
            prev.get("x_sha256") and d.get("x_sha256") and prev["x_sha256"] != d["x_sha256"]
        ):
            added.append(_range(d))
            if prev is not None:
                removed.append(_range(prev))
        elif int(prev.get("obs_revision", 0)) != int(d.get("obs_revision", 0)):
            relabelled.append(ds)
    removed += [_range(d) for ds, d in before.items() if ds not in after]
    return StoreChanges(
        sorted(added, key=lambda d: d.start), sorted(removed, key=lambda d: d.start), sorted(relabelled)
    )


def other_store_id(recorded: object, own: object) -> bool:
    """Whether two store ids name other stores: both recorded and different (a store moved or copied elsewhere
    keeps its id; one ingested separately, even from the same files, has its own; stores written before ids carry
    none, and then this says nothing)."""
    return bool(recorded) and bool(own) and recorded != own


def another_store(old: dict[str, Any], new: dict[str, Any], changes: StoreChanges) -> bool:
    """Whether snapshot ``new`` is of another store than ``old`` (an index's): another ``store_id`` (a store moved or
    copied elsewhere keeps its id; one ingested separately, even from the same files, has its own), or, for
    snapshots that do not record one, another path with none of the index's datasets there unchanged. A store at
    the same path whose every dataset was removed and replaced is still the index's store, updated."""
    if old.get("store_id") and new.get("store_id"):
        return other_store_id(old["store_id"], new["store_id"])
    if not _datasets(old) or str(old.get("path", "")) == str(new.get("path", "")):
        return False
    kept = set(_datasets(old)) - {d.dataset_id for d in changes.removed}
    return not kept


_NAMES = {
    "factory": "the FAISS index factory",
    "shard_size": "the shard size",
    "train_sample": "the training sample size",
    "seed": "the seed",
    "embedder": "the embedder",
    "fit_sample": "the embedder's fit sample",
    "embedder_options": "the embedder options",
    "embedder_fingerprint": "the embedder (its fingerprint)",
}
_FLAGS = {
    "exact_rerank": ("--no-exact-rerank", False),
}
"""Identity entries recorded only when a flag is given: (the flag, the value it records)."""


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each build argument (``build.json``'s identity) that differs between ``old`` and ``new``, in words; a changed
    source is said in datasets added, removed or relabelled."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "source" and isinstance(a, dict) and isinstance(b, dict):
            out += _source_changes(a, b)
        elif key in _FLAGS:
            flag, value = _FLAGS[key]
            before, now = ("with" if a == value else "without"), ("with" if b == value else "without")
            out.append(f"the earlier build ran {before} {flag} and this one {now} it")
        elif key not in new:
            out.append(f"{_NAMES.get(key, key)} was set for the earlier build and is not now")
        else:
            out.append(f"{_NAMES.get(key, key)} was {_short(a)} and is {_short(b)} now")
    return out


def _source_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    snap_a, snap_b = a.get("snapshot"), b.get("snapshot")
    if isinstance(snap_a, dict) and isinstance(snap_b, dict):
        if snap_a.get("path") != snap_b.get("path"):
            return ["the index was built from another atlas store (path differs)"]
        changes = store_changes(snap_a, snap_b).sentences()
        if changes:
            return changes
        if snap_a.get("gene_vocabulary") != snap_b.get("gene_vocabulary"):
            return ["the atlas store's genes changed"]
    if a.get("dim") != b.get("dim"):
        return [f"the vectors were {_short(a.get('dim'))}-d and are {_short(b.get('dim'))}-d now"]
    return ["the data to index changed (another source)"]


def _short(value: Any) -> str:
    """A value for a message: strings escaped and quoted, other values as their (capped) repr."""
    if isinstance(value, str):
        return escaped(value)
    text = repr(value)
    return text if len(text) <= 80 and text.isprintable() else ascii(text[:77]) + "..."
