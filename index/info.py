"""A summary of an index directory for ``scatlas info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import IndexFormatError
from scatlas.atlas.sql import quote_ident
from scatlas.index.atlas_index import AtlasIndex
from scatlas.index.heads_training import DATASET_COLUMN, label_column_classes
from scatlas.index.label_classes import load_label_classes
from scatlas.index.label_heads import read_heads_record
from scatlas.index.manifest import IndexManifest, residuals_state
from scatlas.index.metadata import columns_of
from scatlas.index.verify import read_bytes_total, verify_on_read_limit


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def index_info(path: str | Path) -> dict[str, Any]:
    """A summary of the index at ``path`` (JSON-serialisable).

    Besides the manifest's figures (cells, shards, dim, embedder, factory, measured recall, build time): size on
    disk and bytes per cell; ``heads_seconds`` (training the label heads, None without heads) and
    ``total_seconds`` (index build + heads; after an update the heads are the update's, trained anew);
    ``updated`` and ``update_seconds`` (the last ``build --update``: when it finished, how long it took; None before
    any); ``datasets`` (``[{"dataset_id", "cells"}]``, from the cells table);
    ``version`` (1, one more per ``build --update``) and ``updates`` (how many); ``embedder_genes`` (the genes the
    embedder reads, fixed by the build: queries' gene overlap is measured against them); ``reference_map_cells``
    (atlas cells on the 2-D reference map, None without one);
    ``label_columns`` (``{column: classes}``, the columns that look like labels); ``label_heads`` (column ->
    classes, training cells, features; ``label_heads_error`` says why stored heads cannot be used, e.g. trained
    for another build); ``integrity`` (what the manifest's checksums cover).
    """
    path = Path(path)
    with AtlasIndex.open(path) as idx:
        m = idx.manifest
        size = directory_bytes(idx.path)
        heads, heads_seconds, heads_error = _heads(idx)
        classes = _classes(idx, heads_error)
        with idx.cursor() as con:
            datasets = _datasets(con)
            labels = label_column_classes(con)
    build_seconds = m.build.get("seconds")
    return {
        "path": str(path),
        "format_version": m.format_version,
        "version": m.version,
        "updates": len(m.updates),
        "embedder_genes": _embedder_genes(idx),
        "reference_map_cells": _map_cells(idx),
        "cells": m.n_cells,
        "shards": len(m.shards),
        "dim": m.dim,
        "embedder": m.embedder.name,
        "embedder_fingerprint": m.embedder.fingerprint,
        "factory": m.factory,
        "metric": m.metric,
        "exact": m.exact,
        "nprobe": m.search.nprobe,
        "rerank": m.search.rerank,
        "exact_rerank": _exact_rerank(m),
        "k": m.recall.k,
        "recall": m.recall.recall,
        "recall_queries": m.recall.n_queries,
        "size_bytes": size,
        "bytes_per_cell": round(size / m.n_cells, 1) if m.n_cells else None,
        "build_seconds": build_seconds,
        "heads_seconds": heads_seconds,
        "total_seconds": round(float(build_seconds or 0) + float(heads_seconds or 0), 2)
        if build_seconds is not None else None,
        "built": m.build.get("finished"),
        "updated": m.updates[-1].get("finished") if m.updates else None,
        "update_seconds": m.updates[-1].get("seconds") if m.updates else None,
        "device": m.build.get("device"),
        "datasets": datasets,
        "label_columns": labels,
        "label_heads": heads,
        "label_heads_error": heads_error,
        "label_classes": classes,
        "integrity": integrity(m),
    }


def _map_cells(idx: AtlasIndex) -> int | None:
    """Atlas cells on the reference map fitted at build (None: no map, or one that cannot be used)."""
    try:
        refmap = idx.reference_map()
    except IndexFormatError:
        return None
    return None if refmap is None else len(refmap.ids)


def _embedder_genes(idx: AtlasIndex) -> int | None:
    """How many genes the embedder reads: fixed when the index was built (updates keep it), and what a query's gene
    overlap is measured against. None for embedders that read no genes (precomputed vectors)."""
    if not idx.has_embedder:
        return None
    try:
        genes = getattr(idx.embedder, "genes", None)
    except IndexFormatError:
        return None
    keys = getattr(genes, "keys", None)
    return None if keys is None else int(sum(1 for k in keys if k))


MAX_LISTED = 8
"""Unmapped label values listed by name per column (the counts cover all)."""


def _most_cells_first(report: dict[str, Any], unmapped: Any) -> list[str]:
    """The unmapped label values, most cells first (alphabetical for label classes stored before that order was)."""
    if not isinstance(unmapped, dict):
        return []
    order = report.get("unmapped_by_cells")
    return [str(v) for v in order if v in unmapped] if isinstance(order, list) else sorted(unmapped)


def _classes(idx: AtlasIndex, heads_error: str | None) -> dict[str, Any]:
    """Column -> how its values were mapped to Cell Ontology terms and merged into classes (stored columns only)."""
    if heads_error is not None:
        return {}
    stored = load_label_classes(idx.path, recorded=idx.manifest.labels_files, digest=idx.build_id)
    out = {}
    for key, c in stored.items():
        report = dict(c.report)
        unmapped = report.get("unmapped") or {}
        out[key] = {
            "values": len(c.value_class),
            "classes": len(c.classes),
            "classes_with_term": sum(1 for k in c.classes if k in c.class_term),
            "by_how": report.get("by_how", {}),
            "unmapped": _most_cells_first(report, unmapped)[:MAX_LISTED],
            "n_unmapped": len(unmapped) if isinstance(unmapped, dict) else 0,
        }
        # the closest CL term of each listed value (a suggestion, never applied): [term id, CL name]
        out[key]["suggestions"] = {v: list(unmapped[v][0]) for v in out[key]["unmapped"]
                                   if isinstance(unmapped.get(v), list) and unmapped[v]
                                   and len(unmapped[v][0]) == 2}
    return out


def _heads(idx: AtlasIndex) -> tuple[dict[str, Any], float | None, str | None]:
    """(column -> summary of its label heads, seconds their training took, why they cannot be used or None)."""
    try:  # info describes the index even when its heads cannot be used (annotate refuses them)
        loaded = idx.label_heads()
        record = read_heads_record(idx.path) if loaded else None
    except IndexFormatError as exc:
        return {}, None, str(exc)
    heads = {
        key: {"classes": len(h.classes), "train_cells": h.record.get("n_train"), "features": sorted(h.models)}
        for key, h in loaded.items()
    }
    seconds = (record or {}).get("seconds")
    return heads, float(seconds) if isinstance(seconds, int | float) else None, None


def _datasets(con: Any) -> list[dict[str, Any]]:
    """``[{"dataset_id", "cells"}]`` in id order, from the cells table (empty without a ``dataset_id`` column)."""
    if DATASET_COLUMN not in columns_of(con):
        return []
    col = quote_ident(DATASET_COLUMN)
    rows = con.execute(
        f"SELECT CAST({col} AS VARCHAR), count(*) FROM cells GROUP BY {col} ORDER BY min(soma_joinid)"
    ).fetchall()
    return [{"dataset_id": ds, "cells": int(n)} for ds, n in rows]


def integrity(m: IndexManifest) -> dict[str, Any]:
    """What the manifest's checksums cover and when they are checked (see :mod:`index.verify`)."""
    limit = verify_on_read_limit()
    return {
        "small_files_recorded": m.files is not None,
        "heads_recorded": m.heads_files is not None,
        "checksum_on_read": bool(limit) and read_bytes_total(m) <= limit,
        "checksum_on_read_max_bytes": limit,
    }


def _exact_rerank(m: IndexManifest) -> str | None:
    """Whether re-ranking picks the float32 top k: ``"all"`` shards store their rounding residuals, ``"some"``,
    ``"none"``; None for exact indexes (which re-rank nothing)."""
    return None if m.exact or not m.shards else residuals_state(m.shards)
