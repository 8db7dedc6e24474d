"""Writing any synthetic config to files in its format, only where synth may write.

``synthesize`` writes into a new or empty directory, or one holding earlier synth output (its marker file says so,
or it holds only ``.h5ad`` files synth wrote); never into or under an atlas store, index, classifier, sweep, report
or demo directory, and never over a file synth did not write.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from scatlas.atlas.errors import InputError, OutputError
from scatlas.atlas.outputs import (
    MARKER_FILE,
    PROTECTED_KINDS,
    REPORT,
    OutputKind,
    check_output_dir,
    kind_of,
    marker_kind,
    scatlas_h5ad,
    show,
    writing,
)
from scatlas.atlas.synthetic.config import SyntheticAtlasConfig
from scatlas.atlas.synthetic.embeddings import SyntheticEmbeddingConfig, write_embedding_npy
from scatlas.atlas.synthetic.h5ad import SYNTH_MARK, write_h5ad_datasets
from scatlas.atlas.synthetic.plan import plan_atlas

logger = logging.getLogger(__name__)

SYNTH = OutputKind("synth", "synthetic data files")
"""A directory ``synthesize`` created or found empty: its marker file names this kind."""

_NO_PARENT = (*PROTECTED_KINDS, REPORT)
"""Kinds of directory that synth output may not lie anywhere inside (a report only when its marker says so: a
folder that merely holds a ``report.md`` is not one)."""

_NPY_MAGIC = b"\x93NUMPY"
_USE = "give a new or empty directory (or one holding only earlier `scatlas synth` output)"


def synthesize(
    config: SyntheticAtlasConfig | SyntheticEmbeddingConfig,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "h5ad",
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthetic atlas (``fmt="h5ad"``: one file per dataset) or embedding set (``fmt="npy"``).

    ``out_dir`` must be new, empty, or hold earlier synth output, and lie outside every atlas store, index,
    classifier, sweep and report; ``overwrite`` replaces only files synth wrote. Raises :class:`OutputError`
    (nothing written) otherwise.
    """
    if isinstance(config, SyntheticAtlasConfig):
        if fmt != "h5ad":
            raise InputError(f"fmt={fmt!r}: a counts-level atlas is written as 'h5ad'")
        names = [f"{ds.dataset_id}.h5ad" for ds in plan_atlas(config).datasets]
        out = claim_synth_dir(out_dir, names, overwrite=overwrite)
        written = write_h5ad_datasets(config, out, overwrite=overwrite)
        if overwrite:
            _remove_stale_h5ad(out, names)
        return written
    if isinstance(config, SyntheticEmbeddingConfig):
        if fmt != "npy":
            raise InputError(f"fmt={fmt!r}: embedding-level data is written as 'npy' (ids, vectors, labels)")
        out = claim_synth_dir(out_dir, ["ids.npy", "vectors.npy", "labels.npy"], overwrite=overwrite)
        return write_embedding_npy(config, out, overwrite=overwrite)
    raise InputError(
        f"config must be a SyntheticAtlasConfig or SyntheticEmbeddingConfig, not {type(config).__name__}"
    )


def claim_synth_dir(out_dir: str | os.PathLike[str], names: Sequence[str], *, overwrite: bool = False) -> Path:
    """Check that synth may write ``names`` into ``out_dir``, then create it (with its marker); returns its path.

    Refused (:class:`OutputError`, nothing created): a directory that is any scatlas output of another kind, or
    lies inside an atlas store, index, classifier, sweep or report; a non-empty directory holding anything but
    earlier synth output; and, with ``overwrite``, an existing file of ``names`` that synth did not write.
    Without ``overwrite`` an existing file of ``names`` is refused (:class:`InputError`).
    """
    out = Path(out_dir)
    _check_not_protected(out)
    marked = _check_synth_dir(out)
    existing = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    if existing and not overwrite:
        raise InputError(
            f"{len(existing)} output file(s) already exist in {show(out)} (e.g. {show(existing[0])}); "
            "choose another directory or pass overwrite=True (--overwrite)"
        )
    for name in existing:
        _check_replaceable(out / name, marked)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        if marker_kind(out) is None:  # new, empty, or holding only our own .h5ad files
            (out / MARKER_FILE).write_text(json.dumps({"kind": SYNTH.name}) + "\n", encoding="utf-8")
    return out


def _remove_stale_h5ad(out: Path, names: Sequence[str]) -> None:
    """Remove the ``.h5ad`` files an earlier synth run wrote into ``out`` that this run did not (an earlier run with
    more datasets): ``ingest out/*.h5ad`` would take them for part of this atlas. Files synth did not write stay."""
    keep = set(names)
    with writing(out, "reading"):
        stale = sorted(p for p in out.iterdir() if p.name not in keep and _synth_h5ad(p))
    for path in stale:
        with writing(path, "removing"):
            path.unlink()
    if stale:
        logger.warning(
            "removed %d synthetic dataset file(s) of an earlier run from %s (e.g. %s): this run wrote %d",
            len(stale), show(out), show(stale[0].name), len(keep),
        )


def _check_not_protected(out: Path) -> None:
    """Refuse ``out`` when it is a scatlas output directory of another kind, or lies inside a protected one."""
    resolved = Path(os.path.realpath(os.path.abspath(out)))
    own = kind_of(resolved)
    if own is not None:
        raise OutputError(
            f"{show(out)} is {own.what}; refusing to write synthetic data files into it: {_USE} outside it"
        )
    for parent in resolved.parents:
        kind = kind_of(parent)
        if kind == REPORT and marker_kind(parent) != REPORT.name:
            continue
        if kind is not None and kind in _NO_PARENT:
            raise OutputError(
                f"{show(out)} lies inside {kind.what} ({show(parent)}); refusing to write synthetic data files "
                f"there: {_USE} outside it"
            )


def _check_synth_dir(out: Path) -> bool:
    """Refuse an existing ``out`` that is not a directory, or that holds anything but earlier synth output;
    returns whether its marker file says synth made it."""
    try:
        check_output_dir(out, SYNTH)
    except OutputError:
        if not (out.is_dir() and _only_synth_h5ad(out)):
            raise
    return marker_kind(out) == SYNTH.name if out.is_dir() else False


def _only_synth_h5ad(out: Path) -> bool:
    """Whether directory ``out`` (with no marker of ours) holds nothing but ``.h5ad`` files synth wrote (and
    hidden temporary files of an interrupted run)."""
    if marker_kind(out) is not None:
        return False
    with writing(out, "reading"):
        entries = [p for p in out.iterdir() if p.name != MARKER_FILE]
        return bool(entries) and all(
            (p.name.startswith(".") and p.name.endswith(".partial")) or _synth_h5ad(p) for p in entries
        )


def _synth_h5ad(path: Path) -> bool:
    """Whether ``path`` is a regular ``.h5ad`` file that synth wrote (root attribute ``H5AD_MARK == "synth"``)."""
    if path.suffix != ".h5ad" or path.is_symlink() or not path.is_file():
        return False
    return scatlas_h5ad(path, SYNTH_MARK)


def _check_replaceable(path: Path, marked: bool) -> None:
    """Refuse to replace ``path`` unless synth wrote it: a marked ``.h5ad``, or a ``.npy`` file in a directory
    synth made (its marker)."""
    if path.suffix == ".h5ad":
        ours = _synth_h5ad(path)
    else:
        ours = marked and not path.is_symlink() and path.is_file() and _starts_with(path, _NPY_MAGIC)
    if not ours:
        raise OutputError(
            f"{show(path)} exists and was not written by `scatlas synth`; refusing to replace it: give another "
            "output directory (or move that file away first, if it is yours to replace)"
        )


def _starts_with(path: Path, magic: bytes) -> bool:
    with writing(path, "reading"), open(path, "rb") as fh:
        return fh.read(len(magic)) == magic
