"""A summary of an index directory for ``scatlas info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import IndexFormatError
from scatlas.index.atlas_index import AtlasIndex
from scatlas.index.manifest import IndexManifest
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
    """Cells, shards, dim, embedder, factory, measured recall, size on disk, bytes per cell, build seconds, and
    the label heads (column -> classes, training cells, features; ``label_heads_error`` says why stored heads
    cannot be used, e.g. trained for another build), and what the manifest's checksums cover (``integrity``)."""
    path = Path(path)
    idx = AtlasIndex.open(path)
    m = idx.manifest
    size = directory_bytes(path)
    heads_error = None
    try:  # info describes the index even when its heads cannot be used (annotate refuses them)
        loaded = idx.label_heads()
    except IndexFormatError as exc:
        loaded, heads_error = {}, str(exc)
    heads = {
        key: {"classes": len(h.classes), "train_cells": h.record.get("n_train"), "features": sorted(h.models)}
        for key, h in loaded.items()
    }
    return {
        "path": str(path),
        "format_version": m.format_version,
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
        "k": m.recall.k,
        "recall": m.recall.recall,
        "recall_queries": m.recall.n_queries,
        "size_bytes": size,
        "bytes_per_cell": round(size / m.n_cells, 1) if m.n_cells else None,
        "build_seconds": m.build.get("seconds"),
        "built": m.build.get("finished"),
        "device": m.build.get("device"),
        "label_heads": heads,
        "label_heads_error": heads_error,
        "integrity": integrity(m),
    }


def integrity(m: IndexManifest) -> dict[str, Any]:
    """What the manifest's checksums cover and when they are checked (see :mod:`index.verify`)."""
    limit = verify_on_read_limit()
    return {
        "small_files_recorded": m.files is not None,
        "heads_recorded": m.heads_files is not None,
        "checksum_on_read": bool(limit) and read_bytes_total(m) <= limit,
        "checksum_on_read_max_bytes": limit,
    }
