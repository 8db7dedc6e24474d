"""Writing annotation results: a new annotated ``.h5ad``, the neighbours as Parquet, the report as JSON and a
confusion-matrix PNG. Every file is written to a temporary name in the target directory and renamed into
place, so a reader never sees a partial file and an interrupted write leaves no file behind. The query is
never modified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import InputError
from scatlas.atlas.outputs import (
    H5AD_MARK,
    OutputError,
    OutputWriteError,
    check_output_file,
    looks_like,
    os_error_message,
    show,
    writing,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(
    target: str | Path, *, inputs: Iterable[str | Path | None] = (), file_kind: str | None = None
) -> Iterator[Path]:
    """Yield a temporary path next to ``target``: renamed onto ``target`` on success, removed on error.

    ``target`` is refused (:class:`~atlas.outputs.OutputError`) when it is a directory, one of ``inputs``, or an
    existing file of another kind than ``file_kind``; an OSError while writing (disk full, read-only) becomes an
    OutputError that says what to do.
    """
    target = Path(target)
    check_output_file(target, inputs=inputs, file_kind=file_kind)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
            os.replace(tmp, target)
        except OutputError:
            raise
        except OSError as exc:
            action = "writing" if exc.filename in (None, str(tmp), str(target), tmp, target) else "accessing"
            raise OutputWriteError(os_error_message(exc, action, target)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(path: str | Path, file_kind: str) -> bool:
    """Delete ``path`` when it is a file of ``file_kind`` left by an earlier run that this run does not rewrite."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    with writing(path):
        if not looks_like(path, file_kind) or path.stat().st_size == 0:
            return False
        path.unlink()
    logger.info("removed %s: an output of an earlier run that this run does not write", path)
    return True


def _is_modern_h5ad(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "encoding-type" in f.attrs and isinstance(f.get("obs"), h5py.Group)
    except OSError:
        return False


def _merged_obs(obs: pd.DataFrame, columns: pd.DataFrame) -> pd.DataFrame:
    if len(obs) != len(columns):
        raise InputError(f"the query has {len(obs)} cells but there are {len(columns)} predictions")
    out = obs.copy()
    clash = [c for c in columns.columns if c in out.columns]
    if clash:
        logger.warning("overwriting existing obs columns %s in the annotated copy", clash)
    for c in columns.columns:
        out[c] = (
            columns[c].to_numpy()
            if not isinstance(columns[c].dtype, pd.CategoricalDtype)
            else columns[c].array
        )
    return out


def _put(f: h5py.File, group: str, name: str, value: Any) -> None:
    """Write ``value`` as ``group/name`` of an open h5ad (created, or replaced with a warning)."""
    if group not in f:
        anndata.io.write_elem(f, group, {})
    if name in f[group]:
        logger.warning("overwriting existing %s[%r] in the annotated copy", group, name)
        del f[group][name]
    anndata.io.write_elem(f[group], name, value)


def _patch(path: Path, columns: pd.DataFrame, obsm: dict[str, np.ndarray], uns: dict[str, Any]) -> None:
    """Replace ``obs`` of the (copied) file at ``path`` by obs + ``columns`` and add ``obsm``/``uns`` entries,
    in place."""
    with h5py.File(path, "r+") as f:
        obs = anndata.io.read_elem(f["obs"])
        merged = _merged_obs(obs, columns)
        del f["obs"]
        anndata.io.write_elem(f, "obs", merged)
        for name, matrix in obsm.items():
            if len(matrix) != len(merged):
                raise InputError(f"obsm {name!r} has {len(matrix)} rows for {len(merged)} cells")
            _put(f, "obsm", name, np.asarray(matrix))
        for name, value in uns.items():
            _put(f, "uns", name, np.asarray(value, dtype=object) if isinstance(value, list) else value)


def write_annotated_h5ad(
    query: str | Path | anndata.AnnData, columns: pd.DataFrame, out: str | Path, *,
    obsm: dict[str, np.ndarray] | None = None, uns: dict[str, Any] | None = None,
) -> Path:
    """Write a new ``.h5ad``: the query with ``columns`` added to ``obs`` (row order = the query's), and the
    ``obsm`` matrices and ``uns`` entries given.

    A file query is copied and only ``obs``, ``obsm`` and ``uns`` are rewritten (memory stays bounded); an
    in-memory AnnData is written without the string-to-categorical conversion anndata would otherwise apply to the
    caller's object.
    """
    obsm, uns = dict(obsm or {}), dict(uns or {})
    out = Path(out)
    inputs = () if isinstance(query, anndata.AnnData) else (Path(query),)
    if inputs and out.exists() and inputs[0].exists() and os.path.samefile(inputs[0], out):
        raise OutputError(f"{show(out)} is the query file itself; write the annotated copy to another path")
    with atomic_path(out, inputs=inputs, file_kind="h5ad") as tmp:
        if isinstance(query, anndata.AnnData):
            query.write_h5ad(tmp, convert_strings_to_categoricals=False)
            _patch(tmp, columns, obsm, uns)
        elif _is_modern_h5ad(Path(query)):
            shutil.copyfile(query, tmp)
            _patch(tmp, columns, obsm, uns)
        else:  # pre-0.7 layout: such files are small, load it whole
            adata = anndata.read_h5ad(query)
            adata.obs = _merged_obs(adata.obs, columns)
            adata.obsm.update(obsm)
            adata.uns.update(uns)
            adata.write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            f.attrs[H5AD_MARK] = "annotate"  # a later run may replace this file, and no other
    logger.info("wrote %s (%d obs columns added)", out, columns.shape[1])
    return out


def write_parquet(frame: pd.DataFrame, out: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``frame`` as a Parquet file (zstd), atomically; an existing non-Parquet file at ``out`` is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    with atomic_path(out, inputs=inputs, file_kind="parquet") as tmp, open(tmp, "wb") as fh:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), fh, compression="zstd")
    logger.info("wrote %s (%d rows)", out, len(frame))
    return out


def write_json(payload: dict[str, Any], out: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``payload`` as JSON, atomically; an existing file at ``out`` that is not JSON is refused."""
    out = Path(out)
    check_output_file(out, inputs=inputs, file_kind="json")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, payload)
    logger.info("wrote %s", out)
    return out


def plot_confusion(
    table: pd.DataFrame, out: str | Path, *, title: str = "", inputs: Iterable[str | Path | None] = ()
) -> Path:
    """A row-normalised confusion matrix (truth rows, predicted columns) with counts, as PNG (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = table.to_numpy(dtype=np.float64)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    nr, nc = counts.shape
    fig = Figure(figsize=(max(4.0, 0.45 * nc + 2.5), max(3.0, 0.4 * nr + 2.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(nc), [str(c) for c in table.columns], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(nr), [str(r) for r in table.index], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    if title:
        ax.set_title(title, fontsize=9)
    if nr * nc <= 900:
        for i in range(nr):
            for j in range(nc):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(counts[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of truth row")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, inputs=inputs, file_kind="png") as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    logger.info("wrote %s", out)
    return out
