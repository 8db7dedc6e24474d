"""Writing annotation and search results: a new annotated ``.h5ad``, tables as Parquet (or CSV), the report as
JSON, a confusion-matrix PNG and the query on the atlas' reference map (PNG). Every file is written to a temporary name in the target directory and renamed into
place, so a reader never sees a partial file and an interrupted write leaves no file behind. The query is
never modified.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd

from scatlas.atlas.atomic import default_file_mode, json_text
from scatlas.atlas.errors import InputError
from scatlas.atlas.outputs import (
    H5AD_MARK,
    OUTPUT_MARK,
    PNG_SOFTWARE,
    OutputError,
    OutputWriteError,
    check_output_file,
    csv_safe,
    looks_like,
    marked,
    os_error_message,
    show,
    writing,
    written_by_scatlas,
)

logger = logging.getLogger(__name__)

ANNOTATED_MARK = "annotate"
"""The value of :data:`~atlas.outputs.H5AD_MARK` in an annotated ``.h5ad``: annotate replaces only such files."""


_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("_PENDING", default=None)


@contextlib.contextmanager
def published_together() -> Iterator[None]:
    """Files written through :func:`atomic_path` within the block are renamed into place only when the block ends
    without an error, one after the other in the order written; on an error or an interrupt none is, and their
    temporary files are removed. One run's outputs (an annotated ``.h5ad`` and its neighbours, report and figures)
    thus replace an earlier run's together or not at all, instead of leaving a mixed or partial set that looks
    complete."""
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
        while pending:
            tmp, target = pending[0]
            with writing(target):
                os.replace(tmp, target)
            pending.pop(0)
    finally:
        _PENDING.reset(token)
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(
    target: str | Path, *, inputs: Iterable[str | Path | None] = (), file_kind: str | None = None,
    csv_header: Sequence[str] = (), mark: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary path next to ``target``: renamed onto ``target`` on success (at the end of an enclosing
    :func:`published_together` block, if any), removed on error.

    ``target`` is refused (:class:`~atlas.outputs.OutputError`) when it is a directory, one of ``inputs``, or an
    existing file scatlas did not write (:func:`~atlas.outputs.check_output_file`); an OSError while writing (disk full, read-only) becomes an
    OutputError that says what to do.
    """
    target = Path(target)
    check_output_file(target, inputs=inputs, file_kind=file_kind, csv_header=csv_header, mark=mark)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(name)
    pending = _PENDING.get()
    handed_over = False
    try:
        try:
            yield tmp
            if tmp.exists():
                tmp.chmod(default_file_mode())
            if pending is not None:
                pending.append((tmp, target))
                handed_over = True
            else:
                os.replace(tmp, target)
        except OutputError:
            raise
        except OSError as exc:
            action = "writing" if exc.filename in (None, str(tmp), str(target), tmp, target) else "accessing"
            raise OutputWriteError(os_error_message(exc, action, target)) from exc
    finally:
        if not handed_over:
            tmp.unlink(missing_ok=True)


def remove_stale(path: str | Path, file_kind: str) -> bool:
    """Delete ``path`` when it is a file of ``file_kind`` left by an earlier run that this run does not rewrite."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    with writing(path):
        if not looks_like(path, file_kind) or path.stat().st_size == 0 or not written_by_scatlas(path, file_kind):
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
    with atomic_path(out, inputs=inputs, file_kind="h5ad", mark=ANNOTATED_MARK) as tmp:
        if isinstance(query, anndata.AnnData):
            query.write_h5ad(tmp, convert_strings_to_categoricals=False)
            _patch(tmp, columns, obsm, uns)
        elif _is_modern_h5ad(Path(query)):
            _copy_query(Path(query), tmp, out)
            _patch(tmp, columns, obsm, uns)
        else:  # pre-0.7 layout: such files are small, load it whole
            adata = anndata.read_h5ad(query)
            adata.obs = _merged_obs(adata.obs, columns)
            adata.obsm.update(obsm)
            adata.uns.update(uns)
            adata.write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            f.attrs[H5AD_MARK] = ANNOTATED_MARK  # a later run may replace this file, and no other
    logger.info("wrote %s (%d obs columns added)", out, columns.shape[1])
    return out


def _copy_query(query: Path, tmp: Path, out: Path) -> None:
    """Copy the query file to ``tmp`` (beside ``out``); a write that fails for lack of room names ``out``, not the
    query (``shutil.copyfile``'s error carries the source's name)."""
    try:
        shutil.copyfile(query, tmp)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise OutputWriteError(os_error_message(OSError(exc.errno, exc.strerror), "writing", out)) from exc
        raise


def write_parquet(frame: pd.DataFrame, out: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``frame`` as a Parquet file (zstd), atomically; an existing non-Parquet file at ``out`` is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    with atomic_path(out, inputs=inputs, file_kind="parquet") as tmp, open(tmp, "wb") as fh:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), OUTPUT_MARK.encode(): b"table"})
        pq.write_table(table, fh, compression="zstd")
    logger.info("wrote %s (%d rows)", out, len(frame))
    return out


def write_json(payload: dict[str, Any], out: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``payload`` as JSON (scatlas' mark first: :func:`atlas.outputs.marked`), atomically; an existing file at
    ``out`` that scatlas did not write is refused."""
    out = Path(out)
    with atomic_path(out, inputs=inputs, file_kind="json") as tmp, open(tmp, "w") as fh:
        fh.write(json_text(marked(payload, "report")))
        fh.flush()
        os.fsync(fh.fileno())
    logger.info("wrote %s", out)
    return out


MAX_CONFUSION_LABELS = 100
"""A confusion plot of more truth or predicted labels is not drawn (its size grows with them: a numeric column given
as the truth drew a 17,000 x 15,000-pixel image in 11 GB)."""


def plot_confusion(
    table: pd.DataFrame, out: str | Path, *, title: str = "", inputs: Iterable[str | Path | None] = ()
) -> Path | None:
    """A row-normalised confusion matrix (truth rows, predicted columns) with counts, as PNG (Agg canvas); None
    (nothing written, a warning logged) over :data:`MAX_CONFUSION_LABELS` labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = table.to_numpy(dtype=np.float64)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    nr, nc = counts.shape
    if max(nr, nc) > MAX_CONFUSION_LABELS:
        logger.warning("no confusion plot: %d truth and %d predicted labels, over the %d a plot can show (is the "
                       "truth column a label?); the report has the metrics", nr, nc, MAX_CONFUSION_LABELS)
        return None
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
    return _save_png(fig, out, inputs)


# -- tables as Parquet or CSV ------------------------------------------------------------------------------------

TABLE_SUFFIXES = (".parquet", ".csv")


def table_format(path: str | Path) -> str:
    """``parquet`` or ``csv`` from the file name's suffix; InputError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"{show(Path(path))}: give a file name ending in .parquet or .csv (got {suffix or 'none'!r})")
    return suffix[1:]


def check_table_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (), header: Sequence[str] = ()
                       ) -> Path:
    """Refuse ``out`` as a Parquet/CSV output before any work: an input, inside a store or index, a directory, another
    suffix, or an existing file scatlas did not write (for a CSV: one whose header does not begin with ``header``,
    the first columns of the table to be written, or a binary file: an ``.h5ad``, Parquet, PNG)."""
    out = Path(out)
    kind = table_format(out)
    if kind == "csv" and out.is_file():
        with writing(out), open(out, "rb") as fh:
            head = fh.read(512)
        if b"\x00" in head or any(head.startswith(m) for m in (b"PAR1", b"\x89HDF", b"\x89PNG")):
            raise OutputError(f"{show(out)} exists and is not a CSV file; refusing to replace it: give another path "
                              "(or delete that file first)")
    check_output_file(out, inputs=inputs, file_kind=kind, csv_header=header)
    return out


def write_table(frame: pd.DataFrame, out: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``frame`` as Parquet or CSV (by ``out``'s suffix), atomically; see :func:`check_table_output`."""
    header = tuple(str(c) for c in frame.columns[:2])
    out = check_table_output(out, inputs=inputs, header=header)
    if table_format(out) == "parquet":
        return write_parquet(frame, out, inputs=inputs)
    with atomic_path(out, inputs=inputs, file_kind="csv", csv_header=header) as tmp:
        csv_safe(frame).to_csv(tmp, index=False)
    logger.info("wrote %s (%d rows)", out, len(frame))
    return out


# -- the query on the atlas' reference map -------------------------------------------------------------------------

MAP_COLOURS = 12
"""Predicted labels drawn in their own colour (the most frequent); the others are drawn as "other"."""
ATLAS_GREY = "#d4d4d4"


@dataclass(frozen=True)
class MapPlacement:
    """The query on the index's reference map: ``query_xy`` ``(n_query, 2)`` (NaN for cells not placed),
    ``atlas_xy`` ``(n_sample, 2)`` the sampled atlas cells, ``atlas_labels`` their values of ``label_key`` (for
    the labels written on the map; None without)."""

    query_xy: np.ndarray
    atlas_xy: np.ndarray
    atlas_labels: np.ndarray | None = None
    label_key: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"available": True, "atlas_sample_cells": len(self.atlas_xy),
                "query_cells_placed": int(np.isfinite(self.query_xy[:, 0]).sum()), "label_key": self.label_key}


def _point_size(n: int) -> float:
    return float(np.clip(4000.0 / max(n, 1), 0.3, 12.0))


LABEL_GAP = np.array([0.12, 0.035])
"""Atlas labels closer than this share of the map's width and height to one already written are left out (the
text of two would overlap)."""


def _atlas_layer(ax: Any, atlas_xy: np.ndarray, labels: np.ndarray | None) -> None:
    """The atlas sample in light grey, with its most common labels written at their medians."""
    from matplotlib import patheffects

    ax.scatter(atlas_xy[:, 0], atlas_xy[:, 1], s=_point_size(len(atlas_xy)), c=ATLAS_GREY, linewidths=0,
               rasterized=True, zorder=1)
    if labels is not None and len(labels) == len(atlas_xy):
        values = pd.Series(labels).astype(object).where(pd.notna(labels), None)
        counts = values.value_counts()
        span = np.ptp(atlas_xy, axis=0) if len(atlas_xy) else np.ones(2)
        placed: list[np.ndarray] = []  # most common labels first; one that would sit on another is left out
        for label in counts.index[:20]:
            if counts[label] < max(5, 0.01 * len(values)):
                continue
            at = np.median(atlas_xy[(values == label).to_numpy()], axis=0)
            if any(np.all(np.abs(at - p) < LABEL_GAP * np.maximum(span, 1e-9)) for p in placed):
                continue
            placed.append(at)
            ax.text(at[0], at[1], str(label)[:30], fontsize=6, color="#404040", ha="center", va="center", zorder=6,
                    path_effects=[patheffects.withStroke(linewidth=2, foreground="white")])  # readable over points
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("atlas UMAP 1", fontsize=7)
    ax.set_ylabel("atlas UMAP 2", fontsize=7)


def _save_png(fig: Any, out: str | Path, inputs: Iterable[str | Path | None]) -> Path:
    """Write ``fig`` to ``out`` as a 120-dpi PNG, atomically (``inputs``: files it must not replace); returns it."""
    out = Path(out)
    with atomic_path(out, inputs=inputs, file_kind="png") as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, metadata={"Software": PNG_SOFTWARE})
    logger.info("wrote %s", out)
    return out


def _figure(panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * panels, 5.2))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_annotation_map(
    placement: MapPlacement, predicted: pd.Series | np.ndarray, confidence: np.ndarray | None, out: str | Path, *,
    key: str = "cell_type", unknown: str = "unknown", inputs: Iterable[str | Path | None] = (),
) -> Path:
    """A PNG of the query on the atlas' reference map: the atlas sample in light grey (its labels written on it),
    the query coloured by its predicted ``key`` (the :data:`MAP_COLOURS` most frequent labels, ``unknown`` in dark
    grey, the rest as "other") and, in a second panel, by confidence."""
    import matplotlib

    xy = np.asarray(placement.query_xy, dtype=np.float64)
    ok = np.isfinite(xy).all(axis=1)
    labels = pd.Series(np.asarray(predicted, dtype=object)).astype(str).to_numpy()
    fig, axes = _figure(2 if confidence is not None else 1)
    size = _point_size(int(ok.sum())) * 1.5
    ax = axes[0]
    _atlas_layer(ax, placement.atlas_xy, placement.atlas_labels)
    known = pd.Series(labels[ok & (labels != unknown)]).value_counts()
    shown = list(known.index[:MAP_COLOURS])
    tab10, tab20 = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    palette = [tab10(i) for i in range(10)] + [tab20(2 * i + 1) for i in range(10)]
    groups: list[tuple[str, Any]] = [(name, palette[i % len(palette)]) for i, name in enumerate(shown)]
    groups.append(("other", "#000000"))
    groups.append((unknown, "#5a5a5a"))
    for name, colour in groups:
        if name == "other":
            mask = ok & ~np.isin(labels, [*shown, unknown])
        else:
            mask = ok & (labels == name)
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colour, linewidths=0, label=f"{name[:30]} ({mask.sum()})",
                       rasterized=True, zorder=2 if name != unknown else 3)
    ax.set_title(f"query by predicted {key} ({int(ok.sum())} cells)", fontsize=9)
    ax.legend(fontsize=6, markerscale=max(1.0, 6 / size), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if confidence is not None:
        ax2 = axes[1]
        _atlas_layer(ax2, placement.atlas_xy, None)
        conf = np.asarray(confidence, dtype=np.float64)
        order = np.flatnonzero(ok)[np.argsort(conf[ok], kind="stable")]  # confident cells drawn last
        im = ax2.scatter(xy[order, 0], xy[order, 1], s=size, c=conf[order], cmap="viridis", vmin=0, vmax=1,
                         linewidths=0, rasterized=True, zorder=2)
        fig.colorbar(im, ax=ax2, fraction=0.04, label=f"{key} confidence")
        ax2.set_title(f"query by {key} confidence", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, out, inputs)


def plot_search_map(
    atlas_xy: np.ndarray, query_xy: np.ndarray, hits_xy: np.ndarray, out: str | Path, *,
    atlas_labels: np.ndarray | None = None, centroid_xy: Sequence[float] | None = None, title: str = "",
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """A PNG of a search on the atlas' reference map: the atlas sample in light grey, the atlas cells hit in red,
    the query cells in blue, the centroid (centroid mode) as a star."""
    fig, (ax,) = _figure(1)
    _atlas_layer(ax, np.asarray(atlas_xy), atlas_labels)
    hits_xy, query_xy = np.asarray(hits_xy).reshape(-1, 2), np.asarray(query_xy).reshape(-1, 2)
    if len(hits_xy):
        ax.scatter(hits_xy[:, 0], hits_xy[:, 1], s=_point_size(len(hits_xy)) * 2, c="#d62728", linewidths=0,
                   label=f"atlas cells hit ({len(hits_xy)} drawn)", rasterized=True, zorder=2)
    if len(query_xy):
        ax.scatter(query_xy[:, 0], query_xy[:, 1], s=_point_size(len(query_xy)) * 2, c="#1f77b4", linewidths=0,
                   alpha=0.7, label=f"query cells ({len(query_xy)} drawn)", rasterized=True, zorder=3)
    if centroid_xy is not None:
        ax.scatter([centroid_xy[0]], [centroid_xy[1]], s=160, marker="*", c="#ffbf00", edgecolors="black",
                   linewidths=0.6, label="query centroid", zorder=5)
    ax.legend(fontsize=7, loc="best", markerscale=2, frameon=False)
    ax.set_title(title or "query and hits on the atlas map", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, out, inputs)
