"""Where index vectors come from: the :class:`VectorSource` protocol, shard plans, and in-memory sources.

A source exposes cells in ascending id order. Shards are contiguous in id space, so each shard's ids are sorted
and shards are ordered: ``ShardSpec(shard_no, start, stop, n)`` covers ids in ``[start, stop)``, ``n`` of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.index.sampling import sample_sorted


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``shard_no`` covers the ``n`` cells with ids in ``[start, stop)``."""

    shard_no: int
    start: int
    stop: int
    n: int


@runtime_checkable
class VectorSource(Protocol):
    """Streams ``(ids int64, vectors float32)`` for the cells of an atlas, in ascending id order."""

    @property
    def n_cells(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def shard_plan(self, shard_size: int) -> list[ShardSpec]: ...

    def iter_vectors(self, spec: ShardSpec, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of the data (recorded in build.json: a resume needs the same source)."""
        ...


def plan_over_ranges(ranges: Sequence[tuple[int, int]], shard_size: int) -> list[ShardSpec]:
    """Cut sorted, disjoint id ranges ``[(start, stop)]`` into shards of at most ``shard_size`` cells.

    Shard boundaries follow cell counts, not ranges: a shard may span several ranges (datasets) and holes.
    """
    if shard_size <= 0:
        raise InputError(f"shard_size must be positive (got {shard_size})")
    specs: list[ShardSpec] = []
    cur_start: int | None = None
    cur_n = 0
    last_stop = None
    for start, stop in ranges:
        if stop <= start:
            continue
        if last_stop is not None and start < last_stop:
            raise InputError(f"cell ranges overlap or are unsorted at [{start}, {stop})")
        last_stop = stop
        pos = start
        while pos < stop:
            if cur_start is None:
                cur_start = pos
            take = min(stop - pos, shard_size - cur_n)
            pos += take
            cur_n += take
            if cur_n == shard_size:
                specs.append(ShardSpec(len(specs), cur_start, pos, cur_n))
                cur_start, cur_n = None, 0
    if cur_start is not None and cur_n and last_stop is not None:
        specs.append(ShardSpec(len(specs), cur_start, last_stop, cur_n))
    return specs


class ArrayVectorSource:
    """An in-memory ``(n, d)`` array with sorted unique ids (default ``0..n-1``), for tests and small atlases."""

    def __init__(
        self, vectors: np.ndarray, ids: np.ndarray | None = None, identity: dict[str, Any] | None = None
    ) -> None:
        self._identity = identity
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise InputError(f"vectors must be a 2-D array (got shape {vectors.shape})")
        self._x = vectors
        self._ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if self._ids.shape != (len(vectors),):
            raise InputError(f"ids must have one entry per vector ({len(self._ids)} ids for {len(vectors)} vectors)")
        if len(self._ids) > 1 and not (np.diff(self._ids) > 0).all():
            raise InputError("ids must be strictly increasing (sort the vectors by id)")
        if len(self._ids) and self._ids[0] < 0:
            raise InputError("ids must be non-negative")

    @property
    def n_cells(self) -> int:
        return len(self._ids)

    @property
    def dim(self) -> int:
        return int(self._x.shape[1])

    def shard_plan(self, shard_size: int) -> list[ShardSpec]:
        if shard_size <= 0:
            raise InputError(f"shard_size must be positive (got {shard_size})")
        specs = []
        for no, lo in enumerate(range(0, self.n_cells, shard_size)):
            hi = min(lo + shard_size, self.n_cells)
            stop = int(self._ids[hi]) if hi < self.n_cells else int(self._ids[-1]) + 1
            specs.append(ShardSpec(no, int(self._ids[lo]), stop, hi - lo))
        return specs

    def iter_vectors(self, spec: ShardSpec, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        lo, hi = np.searchsorted(self._ids, [spec.start, spec.stop])
        for a in range(int(lo), int(hi), chunk_size):
            b = min(a + chunk_size, int(hi))
            yield self._ids[a:b], np.asarray(self._x[a:b], dtype=np.float32)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        pos = sample_sorted(self.n_cells, n, seed)
        return self._ids[pos], np.asarray(self._x[pos], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        if self._identity is not None:
            return {"kind": "array", "n_cells": self.n_cells, "dim": self.dim, **self._identity}
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self._ids).tobytes())
        h.update(np.ascontiguousarray(self._x, dtype=np.float32).tobytes())
        return {"kind": "array", "n_cells": self.n_cells, "dim": self.dim, "sha256": h.hexdigest()[:16]}


class RangeVectorSource:
    """Cells ``0..n_cells-1`` whose vectors a function computes for any id range ``[start, stop)``.

    ``fn(start, stop)`` must be deterministic and independent of how ranges are cut (e.g. synthetic data seeded
    per block of ids). ``identity`` describes the data for build.json.
    """

    def __init__(
        self, n_cells: int, dim: int, fn: Callable[[int, int], np.ndarray], identity: dict[str, Any]
    ) -> None:
        self._n, self._d, self._fn, self._identity = int(n_cells), int(dim), fn, dict(identity)

    @property
    def n_cells(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._d

    def shard_plan(self, shard_size: int) -> list[ShardSpec]:
        return plan_over_ranges([(0, self._n)], shard_size)

    def iter_vectors(self, spec: ShardSpec, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(spec.start, spec.stop, chunk_size):
            b = min(a + chunk_size, spec.stop)
            yield np.arange(a, b, dtype=np.int64), np.asarray(self._fn(a, b), dtype=np.float32)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        ids = sample_sorted(self._n, n, seed)
        # Read the sample in runs of consecutive ids so that the generator is called on ranges, not one by one.
        out = np.empty((len(ids), self._d), dtype=np.float32)
        block = 4096
        for b in np.unique(ids // block):
            a = int(b) * block
            lo, hi = np.searchsorted(ids, [a, a + block])
            vecs = np.asarray(self._fn(a, min(a + block, self._n)), dtype=np.float32)
            out[lo:hi] = vecs[ids[lo:hi] - a]
        return ids, out

    def describe(self) -> dict[str, Any]:
        return {"kind": "range", "n_cells": self._n, "dim": self._d, **self._identity}


class NpyVectorSource(RangeVectorSource):
    """Vectors ``0..n-1`` from a 2-D float ``.npy`` file, read chunk by chunk with plain file reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mm = np.load(self.path, mmap_mode="r")
        if mm.ndim != 2:
            raise InputError(f"{self.path} holds a {mm.ndim}-D array; expected (n_cells, dim) vectors")
        self._offset, self._dtype, shape = int(mm.offset), mm.dtype, mm.shape
        del mm
        st = self.path.stat()
        super().__init__(
            shape[0], shape[1], self._read, {"path": str(self.path.resolve()), "bytes": st.st_size,
                                             "mtime_ns": st.st_mtime_ns},
        )

    def _read(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset + start * self.dim * self._dtype.itemsize)
            data = np.fromfile(fh, dtype=self._dtype, count=(stop - start) * self.dim)
        return data.reshape(stop - start, self.dim).astype(np.float32, copy=False)


def synthetic_source(config: Any) -> RangeVectorSource:
    """Clustered synthetic vectors of an :class:`atlas.synthetic.SyntheticEmbeddingConfig`, streamed by range."""
    import dataclasses

    from scatlas.atlas.synthetic import vectors_for_range

    block = max(1024, 2**22 // config.d)  # atlas.synthetic draws blocks of this many rows: regenerate each once
    cache: dict[int, np.ndarray] = {}

    def fn(start: int, stop: int) -> np.ndarray:
        parts = []
        for b in range(start // block, (stop - 1) // block + 1):
            if b not in cache:
                cache.clear()
                cache[b] = vectors_for_range(config, b * block, min((b + 1) * block, config.n))[0]
            lo, hi = max(start, b * block) - b * block, min(stop, (b + 1) * block) - b * block
            parts.append(cache[b][lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    identity = {"synthetic": {k: v for k, v in dataclasses.asdict(config).items() if k != "chunk_size"}}
    return RangeVectorSource(config.n, config.d, fn, identity)
