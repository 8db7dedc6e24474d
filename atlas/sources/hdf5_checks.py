"""Checks that an untrusted HDF5 file (an ``.h5ad``) holds its own data, made before anything is read from it.

HDF5 lets a file name other files as the source of its contents: an external link (``obs`` -> ``/other.h5ad:/obs``),
a dataset whose raw bytes live in an external file (``/etc/passwd``), a virtual dataset mapping other files'
datasets. Reading such a file reads the other files, with the reader's rights: an uploaded ``.h5ad`` could copy any
file the server can read into its results. A dataset may also declare far more data than the file stores (chunks
never written read back as the fill value): a 2 MB file declaring 2e9 values makes a reader allocate gigabytes.
:func:`check_self_contained` refuses all of these; every ``.h5ad`` reader calls it through
:func:`atlas.sources.h5ad.check_anndata_hdf5`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import h5py

from scatlas.atlas.errors import InputError
from scatlas.atlas.validate import escaped

MAX_OBJECTS = 500_000
"""At most this many groups and datasets are walked; a file with more is refused (an AnnData file holds a few per
obs/var column and per layer; hundreds of thousands mean a file built to make the walk slow)."""
MAX_EXPANSION = 1100
"""A dataset may declare at most this many times the bytes it stores (plus :data:`SLACK_BYTES`): DEFLATE, the
filter AnnData writes with, expands at most ~1032-fold, while chunks that were never written store nothing."""
SLACK_BYTES = 1 << 20


def check_self_contained(f: h5py.File, what: str) -> None:
    """InputError when the open file ``f`` (``what``, for messages) names another file as the source of any of its
    contents (external links, external raw storage, virtual datasets) or declares far more data than it stores.
    Soft links are not followed (their targets are in this file and are walked where they are)."""
    for ds in _datasets(f, what):
        _check_dataset(ds, what)


PY_TEXT_BYTES = 56
"""What a text value costs once read besides its characters: a Python ``str`` object (49 bytes and up) and the
pointer to it. A fixed-width ``S1`` column stores one byte a value, but reading it makes a ``str`` of each."""


def declared_size(group: h5py.Group, what: str) -> tuple[int, int]:
    """``(bytes, rows)`` of the datasets under ``group``, links not followed, in one walk: the bytes reading them
    whole allocates (their declared size, and :data:`PY_TEXT_BYTES` more per text value: text is read into Python
    strings) and their longest first dimension (an obs table's rows: its cells)."""
    total = rows = 0
    for ds in _datasets(group, what):
        if ds.shape is None:
            continue
        total += int(ds.size) * (int(ds.dtype.itemsize) + (PY_TEXT_BYTES if ds.dtype.kind in "SUO" else 0))
        if ds.shape:
            rows = max(rows, int(ds.shape[0]))
    return total, rows


def _datasets(group: h5py.Group, what: str) -> Iterator[h5py.Dataset]:
    """Every dataset under ``group``, each once (hard links to one object, cycles), soft links not followed;
    InputError at an external link or past :data:`MAX_OBJECTS` objects."""
    seen: set[Any] = set()
    stack: list[h5py.Group] = [group]
    walked = 0
    while stack:
        g = stack.pop()
        for name in g:
            walked += 1
            if walked > MAX_OBJECTS:
                raise InputError(f"{what} holds over {MAX_OBJECTS:,} HDF5 objects; an AnnData file holds far fewer: "
                                 "write it again with anndata (adata.write_h5ad)")
            link = g.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise _refused(what, f"an external link to another file (at {escaped(g.name + '/' + name)})")
            if isinstance(link, h5py.SoftLink):
                continue
            obj = g.get(name)
            if obj is None:  # a dangling hard link cannot exist; be safe anyway
                continue
            key = obj.id.fileno, h5py.h5o.get_info(obj.id).addr
            if key in seen:
                continue
            seen.add(key)
            if isinstance(obj, h5py.Group):
                stack.append(obj)
            elif isinstance(obj, h5py.Dataset):
                yield obj


def _check_dataset(ds: h5py.Dataset, what: str) -> None:
    if ds.is_virtual:
        raise _refused(what, f"a virtual dataset, whose data lives in other files (at {escaped(ds.name)})")
    if ds.id.get_create_plist().get_external_count() > 0:
        raise _refused(what, f"a dataset stored in an external file (at {escaped(ds.name)})")
    if ds.shape is None:  # an empty (null) dataspace
        return
    declared = int(ds.size) * int(ds.dtype.itemsize)
    stored = int(ds.id.get_storage_size())
    if declared > MAX_EXPANSION * stored + SLACK_BYTES:
        raise InputError(
            f"{what} is damaged or crafted: the dataset at {escaped(ds.name)} declares {declared:,} bytes but the file "
            f"stores {stored:,} for it (chunks never written); write the file again with anndata (adata.write_h5ad)"
        )


def _refused(what: str, construct: str) -> InputError:
    return InputError(
        f"{what} holds {construct}: scatlas reads only .h5ad files that hold their own data. Write a self-contained "
        "copy with anndata (anndata.read_h5ad(path).write_h5ad(new_path)) on a machine where the linked files are"
    )
