"""Writing and checking one shard: ``shards/NNNN/{index.faiss, ids.npy, vectors.f16.npy, done.json}`` (and
``residuals.f16.npy`` for exact re-ranking).

A shard is written into a temporary directory and renamed into place when complete, so a shard directory exists
only when its files are whole; ``done.json`` records the count, id range and SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.index._faiss import faiss_module
from scatlas.index.factory import Assigner, add_vectors, clone, is_exact
from scatlas.index.manifest import (
    DONE_FILE,
    SHARD_FILES,
    SHARD_IDS_FILE,
    SHARD_INDEX_FILE,
    SHARD_RESIDUALS_FILE,
    SHARD_VECTORS_FILE,
    FileRecord,
    ShardRecord,
    shard_dirname,
    write_json_atomic,
)
from scatlas.index.source import ShardSpec, VectorSource
from scatlas.index.vectors import as_stored, rounding_residuals

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def sha256_file(path: Path, bufsize: int = 8 << 20, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex SHA-256 of a file; ``on_bytes(n)`` is called after each block read (progress bars)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(bufsize):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


_CHECKSUMMED: set[tuple[str, int, int, int, int, str]] = set()
"""Files whose SHA-256 matched in this process, by (real path, inode, size, mtime, ctime, digest): a file is hashed
once per process however often an index is reopened (a rewrite changes its mtime and ctime)."""


def _file_key(path: Path, sha256: str) -> tuple[str, int, int, int, int, str]:
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256


def checksum_matches(path: Path, rec: FileRecord, *, cached: bool = True) -> bool:
    """Whether ``path`` has the recorded SHA-256 (remembered for this process once it has; ``cached=False``
    hashes it again all the same)."""
    key = _file_key(path, rec.sha256)
    if cached and key in _CHECKSUMMED:
        return True
    if sha256_file(path) != rec.sha256:
        return False
    _CHECKSUMMED.add(key)
    return True


def damaged_hint(index_dir: Path | str) -> str:
    """What to do about a damaged index (the end of every integrity error)."""
    return (
        "the index is damaged or was modified: rebuild it (`scatlas build ... --overwrite`); "
        f"`scatlas verify --index {index_dir}` lists every damaged file"
    )


def file_record(path: Path) -> FileRecord:
    return FileRecord(bytes=path.stat().st_size, sha256=sha256_file(path))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(
    source: VectorSource,
    spec: ShardSpec,
    shards_dir: Path,
    trained: Any,
    assigner: Assigner,
    chunk_size: int,
    on_chunk: Callable[[int], None] | None = None,
    *,
    residuals: bool = True,
) -> ShardRecord:
    """Stream the shard's vectors, store them (float16, normalised) and add them to a clone of ``trained``.

    ``residuals``: also store each vector's float16 rounding error (``residuals.f16.npy``) for exact re-ranking;
    never for exact indexes, which re-rank nothing."""
    faiss = faiss_module()

    final = shards_dir / shard_dirname(spec.shard_no)
    tmp = shards_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dim = source.dim
    index = clone(trained)
    exact = is_exact(trained)
    ids_out = _NpyWriter(tmp / SHARD_IDS_FILE, np.int64, (spec.n,))
    vec_out = _NpyWriter(tmp / SHARD_VECTORS_FILE, np.float16, (spec.n, dim))
    writers = [ids_out, vec_out]
    res_out = None
    if residuals and not exact:
        res_out = _NpyWriter(tmp / SHARD_RESIDUALS_FILE, np.float16, (spec.n, dim))
        writers.append(res_out)
    pos, last_id, id_min = 0, spec.start - 1, None
    try:
        for ids, x in source.iter_vectors(spec, chunk_size):
            ids = np.asarray(ids, dtype=np.int64)
            b = len(ids)
            if b == 0:
                continue
            if x.shape != (b, dim):
                raise InputError(f"shard {spec.shard_no}: a chunk of {b} ids came with vectors of shape {x.shape}")
            if pos + b > spec.n or ids[0] <= last_id or ids[-1] >= spec.stop or (b > 1 and (np.diff(ids) <= 0).any()):
                raise InputError(
                    f"shard {spec.shard_no}: the source yielded ids outside [{spec.start}, {spec.stop}), unsorted, or "
                    f"more than the {spec.n} planned; a VectorSource must stream each shard's cells once, by id"
                )
            x16, x32 = as_stored(x, rounded=exact)
            ids_out.write(pos, ids)
            vec_out.write(pos, x16, fresh=True)
            if res_out is not None:
                res_out.write(pos, rounding_residuals(x32, x16), fresh=True)
            add_vectors(index, x32, ids, assigner)
            id_min = int(ids[0]) if id_min is None else id_min
            pos += b
            last_id = int(ids[-1])
            if on_chunk is not None:
                on_chunk(b)
    finally:
        for writer in writers:
            writer.close()
    if pos != spec.n or id_min is None:
        raise InputError(f"shard {spec.shard_no}: the source yielded {pos} cells where its plan said {spec.n}")
    faiss.write_index(index, str(tmp / SHARD_INDEX_FILE))
    streamed = {writer.path.name: writer.record() for writer in writers}
    names = (*SHARD_FILES, SHARD_RESIDUALS_FILE) if res_out is not None else SHARD_FILES
    files = {name: streamed.get(name) or file_record(tmp / name) for name in names}
    record = ShardRecord(no=spec.shard_no, n=spec.n, id_min=id_min, id_max=last_id, files=files)
    write_json_atomic(tmp / DONE_FILE, _done_payload(record))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(shards_dir)
    return record


class _NpyWriter:
    """A ``.npy`` file of known shape filled by positioned writes (the pages stay out of the process's RSS,
    unlike a writable memmap).

    While the rows arrive in file order (as the shard writer sends them) the SHA-256 of the file is computed from
    the bytes as they are written, so the file need not be read back to checksum it (:meth:`record`). The hashing
    runs in a background thread (hashlib releases the GIL), overlapping FAISS's encoding of the same chunk.
    """

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        mm = open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # writes the header and sizes the file
        self.offset = int(mm.offset)
        self.row_bytes = int(np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64)))
        self.dtype = np.dtype(dtype)
        del mm
        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as fh:
            header = fh.read(self.offset)
        self._sha: Any = hashlib.sha256(header) if len(header) == self.offset else None
        self._hashed_to = self.offset  # the hash covers the file's bytes [0, _hashed_to)
        self._hasher = ThreadPoolExecutor(max_workers=1) if self._sha is not None else None  # FIFO: in order
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, values: np.ndarray, *, fresh: bool = False) -> None:
        """Write rows from ``row`` on. ``fresh``: ``values`` is a new array nobody else will modify (it is hashed
        in the background); otherwise it is copied first."""
        data = np.ascontiguousarray(values, dtype=self.dtype) if fresh else np.array(values, self.dtype, order="C")
        off = self.offset + row * self.row_bytes
        view = data.data.cast("B")
        if self._sha is not None:
            if off == self._hashed_to:
                assert self._hasher is not None
                self._hasher.submit(self._sha.update, view)  # the task holds ``data`` until it has run
                self._hashed_to += len(view)
            else:  # out of order: checksum the file once it is complete
                self._sha = None
        while view:
            n = os.pwrite(self._fd, view, off)
            view, off = view[n:], off + n

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)  # also on errors: no thread outlives the writer
            self._hasher = None
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def record(self) -> FileRecord | None:
        """Size and SHA-256 of the closed file from the bytes written, or None unless they covered it in order."""
        if self._fd >= 0 or self._sha is None or self._hashed_to != self.size:
            return None
        return FileRecord(bytes=self.size, sha256=self._sha.hexdigest())


def _done_payload(record: ShardRecord) -> dict[str, Any]:
    return {
        "no": record.no,
        "n": record.n,
        "id_min": record.id_min,
        "id_max": record.id_max,
        "files": {k: {"bytes": v.bytes, "sha256": v.sha256} for k, v in record.files.items()},
    }


def read_done(shard_dir: Path) -> ShardRecord:
    path = shard_dir / DONE_FILE
    try:
        return ShardRecord.from_dict(json.loads(path.read_text()))
    except PermissionError:  # not damage: the CLI says "Permission denied while accessing ..."
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"shard {shard_dir} has no readable {DONE_FILE} ({exc}); rebuild the index") from exc


def verify_shard(shard_dir: Path, expected: ShardRecord, *, checksums: bool, cached: bool = True) -> None:
    """Raise IndexFormatError unless every file of the shard exists with the expected size (and checksum;
    ``cached=False``: hashed even when this process has checked the same file before)."""
    hint = damaged_hint(shard_dir.parent.parent)
    for name, rec in expected.files.items():
        path = shard_dir / name
        if not path.is_file():
            raise IndexFormatError(f"shard file {path} is missing; {hint}")
        size = path.stat().st_size
        if size != rec.bytes:
            raise IndexFormatError(f"shard file {path} has {size} bytes where the manifest records {rec.bytes}; {hint}")
        if checksums and not checksum_matches(path, rec, cached=cached):
            raise IndexFormatError(f"shard file {path} fails its SHA-256 check; {hint}")


def shard_ids_problem(shard_dir: Path, expected: ShardRecord) -> str | None:
    """What is wrong with the shard's ids file against the manifest's count and id range (its header, first and
    last id: a few bytes read), or None. Catches a shard directory copied or moved over another."""
    path = shard_dir / SHARD_IDS_FILE
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError:  # not damage: rebuilding would not help (the CLI names the path and the permission)
        raise
    except (OSError, ValueError, EOFError) as exc:
        return f"cannot read {path} ({exc})"
    try:
        if ids.ndim != 1 or ids.dtype != np.int64:
            return f"{path} holds {ids.dtype} ids of shape {ids.shape}, not {expected.n} int64 ids"
        n = len(ids)
        first, last = (int(ids[0]), int(ids[-1])) if n else (None, None)
    finally:
        del ids
    if (n, first, last) != (expected.n, expected.id_min, expected.id_max):
        return (
            f"{path} holds {n} ids from {first} to {last} where the manifest records shard {expected.no} as "
            f"{expected.n} ids from {expected.id_min} to {expected.id_max} (a shard directory copied or moved over "
            "another?)"
        )
    return None


def check_shard_ids(shard_dir: Path, expected: ShardRecord) -> None:
    """IndexFormatError when the shard's ids do not match the manifest's count and id range (:func:`shard_ids_problem`)."""
    problem = shard_ids_problem(shard_dir, expected)
    if problem is not None:
        raise IndexFormatError(f"{problem}; {damaged_hint(shard_dir.parent.parent)}")


def clean_tmp(shards_dir: Path) -> None:
    """Remove partial shard directories left by interrupted builds."""
    if not shards_dir.is_dir():
        return
    for path in shards_dir.iterdir():
        if path.name.startswith(TMP_PREFIX):
            logger.info("removing partial shard %s from an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)
