"""Training the label heads of an index (see :mod:`index.label_heads` for what they are and how they are used).

For each label column, the training cells are a sample of the atlas, stratified by label and spread evenly over
datasets (at most ``max_cells_per_label`` per label, ``max_cells`` in all), so one large study cannot dominate a
label and memory is bounded by the sample, not the atlas. The heads directory is written under a temporary name
and renamed into place, so it is complete or absent; its files are then recorded in the index manifest.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.atomic import replaced_dir
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.atlas.lifecycle import KEPT_COLUMN
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import escaped, escaped_list
from scatlas.index.atlas_index import AtlasIndex
from scatlas.index.embedding import obs_columns, obsm_keys, reads_x
from scatlas.index.label_classes import ensure_label_classes
from scatlas.index.label_heads import (
    DEFAULT_C_EMBEDDING,
    DEFAULT_C_GENES,
    HEADS_DIR,
    HEADS_FILE,
    HEADS_FORMAT,
    SAMPLE_FILE,
)
from scatlas.index.manifest import MANIFEST_FILE, manifest_digest, read_manifest, record_heads_files
from scatlas.index.metadata import columns_of
from scatlas.index.progress import Progress, progress_bar
from scatlas.index.shard import file_record
from scatlas.index.softmax import SoftmaxModel, fit_softmax
from scatlas.index.vectors import as_stored, to_float16
from scatlas.index.verify import check_files

logger = logging.getLogger(__name__)

DEFAULT_MAX_CELLS_PER_LABEL = 2_000
DEFAULT_MAX_CELLS = 100_000
DATASET_COLUMN = "dataset_id"
AUTO_MAX_LABELS = 1_000
"""``label_keys="auto"`` trains heads for the text columns with 2 to this many distinct values."""
NOT_LABELS = frozenset({"soma_joinid", DATASET_COLUMN, "source_dataset_id"})
TERM_SUFFIX = "_ontology_term_id"
"""Columns of ontology term ids are the terms of a label column (its classes), not labels of their own."""
"""The cell id and provenance: the store's dataset and the input's own dataset_id (renamed at ingest)."""


@dataclass(frozen=True)
class HeadsConfig:
    """How label heads are trained (recorded in heads.json)."""

    label_keys: tuple[str, ...]
    max_cells_per_label: int = DEFAULT_MAX_CELLS_PER_LABEL
    max_cells: int = DEFAULT_MAX_CELLS
    c_genes: float = DEFAULT_C_GENES
    c_embedding: float = DEFAULT_C_EMBEDDING
    seed: int = 0

    def __post_init__(self) -> None:
        keys = self.label_keys
        if not keys or any(not isinstance(k, str) or not k for k in keys) or len(set(keys)) != len(keys):
            raise InputError(f"label keys must be one or more distinct column names (got {keys!r})")
        if int(self.max_cells_per_label) < 1 or int(self.max_cells) < 1:
            raise InputError(
                f"max_cells_per_label and max_cells must be >= 1 (got {self.max_cells_per_label}, {self.max_cells})"
            )
        if not (self.c_genes > 0 and self.c_embedding > 0):
            raise InputError(f"C must be > 0 (got genes {self.c_genes}, embedding {self.c_embedding})")


def label_columns(con: Any, max_labels: int = AUTO_MAX_LABELS) -> list[str]:
    """The columns of the cells table that look like annotations (see :func:`label_column_classes`)."""
    return list(label_column_classes(con, max_labels))


def label_column_classes(con: Any, max_labels: int = AUTO_MAX_LABELS) -> dict[str, int]:
    """``{column: distinct values}`` of the cells table's columns that look like annotations: text (VARCHAR or
    ENUM) columns with 2 to ``max_labels`` distinct values and at most one distinct value per two labelled cells
    (not names or ids), other than the cell id, ``dataset_id``, ontology term columns and the values a relabel
    replaced (``TARGET_revN`` beside ``TARGET``, :data:`atlas.lifecycle.KEPT_COLUMN`); ``cell_type`` first when
    present, then in table order."""
    described = [(str(row[0]), str(row[1])) for row in con.execute("DESCRIBE cells").fetchall()]
    names = {name for name, _ in described}
    candidates = [
        name for name, kind in described
        if name not in NOT_LABELS and not name.endswith(TERM_SUFFIX)
        and not (KEPT_COLUMN.search(name) and KEPT_COLUMN.sub("", name) in names)  # a relabel's kept values
        and (kind == "VARCHAR" or kind.startswith("ENUM"))
    ]
    if not candidates:
        return {}
    counts = con.execute(  # one scan of the table for every candidate
        "SELECT " + ", ".join(f"count(DISTINCT {quote_ident(c)}), count({quote_ident(c)})" for c in candidates)
        + " FROM cells"
    ).fetchone()
    out = {
        col: int(n_distinct) for col, n_distinct, n in zip(candidates, counts[0::2], counts[1::2], strict=True)
        if 2 <= n_distinct <= max_labels and 2 * n_distinct <= n
    }
    return {col: out[col] for col in sorted(out, key=lambda c: c != "cell_type")}


def sample_training_cells(
    con: Any, key: str, config: HeadsConfig, value_class: Mapping[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted cell ids, their labels as str) of the training sample of one label column.

    ``value_class``: value -> class (:class:`index.label_classes.LabelClasses`); the labels are then the classes
    (values not in it are their own class) and the caps below apply per class. Per label at most
    ``max_cells_per_label`` cells, taken round-robin over datasets (each dataset's cells in a seeded random
    order), then at most ``max_cells`` overall with every label keeping an equal share where it can. NULL labels
    are left out.
    """
    import pyarrow as pa

    available = columns_of(con)
    if key not in available:
        raise InputError(f"label key {escaped(key)} is not a column of the index's cell table; available: "
                         f"{escaped_list(available)}")
    col = f"c.{quote_ident(key)}"
    ds = f"c.{quote_ident(DATASET_COLUMN)}" if DATASET_COLUMN in available else "NULL"
    seed = int(config.seed)
    mapping = f"_classes_{uuid.uuid4().hex[:8]}"
    pairs = sorted(dict(value_class or {}).items())
    con.register(mapping, pa.table({"value": pa.array([v for v, _ in pairs], pa.string()),
                                    "cls": pa.array([c for _, c in pairs], pa.string())}))
    labelled = f"""
        SELECT c.soma_joinid AS id, coalesce(m.cls, CAST({col} AS VARCHAR)) AS label, {ds} AS ds
        FROM cells c LEFT JOIN {mapping} m ON CAST({col} AS VARCHAR) = m.value WHERE {col} IS NOT NULL
    """
    try:
        n_labels = con.execute(f"SELECT count(DISTINCT label) FROM ({labelled})").fetchall()[0][0]
        if not n_labels:
            raise NoLabelsError(f"no atlas cell has a {key!r} label: there is nothing to train a label head on")
        per_label = min(int(config.max_cells_per_label), max(1, int(config.max_cells) // int(n_labels)))
        sql = f"""
            WITH ranked AS (
                SELECT id, label, row_number() OVER (PARTITION BY label, ds ORDER BY hash(id + {seed})) AS r_ds
                FROM ({labelled})
            ), spread AS (
                SELECT id, label,
                       row_number() OVER (PARTITION BY label ORDER BY r_ds, hash(id * 7 + {seed})) AS r_label
                FROM ranked
            )
            SELECT id, label FROM spread WHERE r_label <= {per_label} ORDER BY id
        """
        res = con.execute(sql).fetchnumpy()
    finally:
        con.unregister(mapping)
    return np.asarray(res["id"], dtype=np.int64), np.asarray(res["label"], dtype=object).astype(str)


def _features(
    store: Any, index: AtlasIndex, ids: np.ndarray, want_genes: bool, progress: Progress
) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored-precision index vectors, gene features or None) of atlas cells ``ids`` (sorted), in id order."""
    emb = index.embedder
    vecs = np.zeros((len(ids), index.dim), dtype=np.float32)
    genes = None
    got = np.zeros(len(ids), dtype=bool)
    bar = progress_bar(progress, total=len(ids), desc="label heads: read", unit="cell")
    for chunk in store.read_cells(ids, with_X=reads_x(emb), obsm_keys=obsm_keys(emb),
                                  obs_columns=obs_columns(emb)):
        rows = np.searchsorted(ids, np.asarray(chunk.ids, dtype=np.int64))
        v, g = emb.transform_with_features(chunk) if want_genes else (emb.transform(chunk), None)
        vecs[rows] = as_stored(v)[1]
        if g is not None:
            if genes is None:
                genes = np.zeros((len(ids), g.shape[1]), dtype=np.float32)
            genes[rows] = g
        got[rows] = True
        bar.update(len(rows))
    bar.close()
    if not got.all():
        raise IndexFormatError(
            f"{int((~got).sum())} sampled cells of the index are not in the atlas store: the store changed after "
            "the index was built; rebuild the index from this store"
        )
    return vecs, genes


def _read_training_data(
    store: Any, index_dir: Path, config: HeadsConfig, progress: Progress
) -> tuple[np.ndarray, np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, str]:
    """(vectors, gene features or None, per-key (ids, class labels) samples, all sampled ids, embedder
    fingerprint)."""
    with AtlasIndex.open(index_dir, unfinished_ok=True) as index:
        built_from = index.manifest.atlas_snapshot.get("n_cells")
        if built_from not in (None, store.n_cells):
            raise InputError(
                f"the atlas store at {store.path} has {store.n_cells} cells but the index was built from "
                f"{built_from}: train heads from the store the index was built from"
            )
        want_genes = index.embedder.gene_feature_names is not None
        samples = {
            key: sample_training_cells(index.connect(), key, config, index.label_classes(key).value_class)
            for key in config.label_keys
        }
        all_ids = np.unique(np.concatenate([ids for ids, _ in samples.values()]))
        logger.info("label heads: reading %d sampled atlas cells for %s", len(all_ids), ", ".join(config.label_keys))
        vecs, genes = _features(store, index, all_ids, want_genes, progress)
        return vecs, genes, samples, all_ids, index.manifest.embedder.fingerprint


class NoLabelsError(InputError):
    """No atlas cell holds a value of a label column heads were asked for."""


def train_label_heads(
    atlas: str | Path | Any,
    index_dir: str | Path,
    label_keys: Sequence[str] | str,
    *,
    max_cells_per_label: int = DEFAULT_MAX_CELLS_PER_LABEL,
    max_cells: int = DEFAULT_MAX_CELLS,
    c_genes: float = DEFAULT_C_GENES,
    c_embedding: float = DEFAULT_C_EMBEDDING,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress = True,
) -> dict[str, Any]:
    """Train the label heads of ``label_keys`` for the built index at ``index_dir`` from the atlas store it was
    built from, and write them to ``index_dir/heads`` (replacing any heads there). Returns heads.json's payload.

    Reuses existing heads when they were trained with the same settings for this very build of the index.
    """
    from scatlas.atlas.store import AtlasStore

    keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
    config = HeadsConfig(
        label_keys=keys, max_cells_per_label=int(max_cells_per_label), max_cells=int(max_cells),
        c_genes=float(c_genes), c_embedding=float(c_embedding), seed=int(seed),
    )
    index_dir = Path(index_dir)
    digest = manifest_digest(index_dir) if (index_dir / MANIFEST_FILE).is_file() else None
    if digest is None:
        raise IndexFormatError(f"{index_dir} has no manifest: build the index before training label heads")
    classes = ensure_label_classes(index_dir, keys)  # the heads' classes: values merged by CL term
    class_ids = {key: classes[key].digest() for key in keys}
    old = _already_trained(index_dir, digest, config, class_ids)
    if old is not None:
        logger.info("label heads for %s are already trained for this index", ", ".join(keys))
        _record_heads(index_dir)
        return old
    t0 = time.perf_counter()
    own_store = isinstance(atlas, (str, Path))
    store: Any = AtlasStore.open(atlas) if own_store else atlas
    try:
        vecs, genes, samples, all_ids, fingerprint = _read_training_data(store, index_dir, config, progress)
    finally:
        if own_store:
            store.close()
    with replaced_dir(index_dir / HEADS_DIR) as tmp:
        payload = _fit_and_write(tmp, keys, samples, all_ids, vecs, genes, config, device)
        if genes is not None:
            payload["training_sample"] = _write_training_sample(tmp / SAMPLE_FILE, genes, all_ids)
        payload.update(
            {
                "manifest_sha256": digest,
                "embedder_fingerprint": fingerprint,
                "gene_features": genes is not None,
                "label_classes": class_ids,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        (tmp / HEADS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
    _record_heads(index_dir)
    return payload


def _already_trained(
    index_dir: Path, digest: str, config: HeadsConfig, class_ids: dict[str, str]
) -> dict[str, Any] | None:
    """heads.json's payload when the heads there were trained with ``config`` on the label classes ``class_ids``
    (key -> :meth:`LabelClasses.digest`) for this build (``digest``) and are intact, else None."""
    existing = index_dir / HEADS_DIR / HEADS_FILE
    if not existing.is_file():
        return None
    try:
        old = json.loads(existing.read_text())
    except ValueError:
        old = {}
    old = old if isinstance(old, dict) else {}
    complete = not old.get("gene_features") or "training_sample" in old  # heads from before the sample was kept
    if (
        old.get("manifest_sha256") == digest and old.get("config") == _config_json(config) and complete
        and old.get("label_classes") == class_ids and _recorded_heads_intact(index_dir)
    ):
        return dict(old)
    return None


def _record_heads(index_dir: Path) -> None:
    """Record the size and SHA-256 of every file in ``heads/`` in the index manifest."""
    heads = index_dir / HEADS_DIR
    records = {
        p.relative_to(index_dir).as_posix(): file_record(p) for p in sorted(heads.rglob("*")) if p.is_file()
    }
    record_heads_files(index_dir, records)


def _recorded_heads_intact(index_dir: Path) -> bool:
    """False (logged) when the manifest records heads files that are missing or damaged: they are retrained."""
    recorded = read_manifest(index_dir).heads_files
    try:
        check_files(index_dir, recorded or {}, fix="retraining them")
    except IndexFormatError as exc:
        logger.warning("%s", exc)
        return False
    return True


def _fit_and_write(
    tmp: Path,
    keys: tuple[str, ...],
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    all_ids: np.ndarray,
    vecs: np.ndarray,
    genes: np.ndarray | None,
    config: HeadsConfig,
    device: str,
) -> dict[str, Any]:
    """Fit each label column's heads and write their ``.npz`` files into ``tmp``; return heads.json's core."""
    entries: dict[str, Any] = {}
    for n, key in enumerate(keys):
        ids, labels = samples[key]
        rows = np.searchsorted(all_ids, ids)
        classes, y = np.unique(labels, return_inverse=True)
        models: dict[str, SoftmaxModel] = {}
        tk = time.perf_counter()
        models["embedding"] = fit_softmax(vecs[rows], y, len(classes), C=config.c_embedding, device=device)
        if genes is not None:
            models["genes"] = fit_softmax(genes[rows], y, len(classes), C=config.c_genes, device=device)
        fname = f"{n:03d}.npz"
        arrays: dict[str, Any] = {"train_rows": rows.astype(np.int64), "train_y": y.astype(np.int32)}
        for feat, m in models.items():
            arrays[f"{feat}_weights"], arrays[f"{feat}_bias"] = m.weights, m.bias
        with open(tmp / fname, "wb") as fh:
            np.savez(fh, **arrays)
        counts = np.bincount(y, minlength=len(classes))
        entries[key] = {
            "file": fname,
            "classes": [str(c) for c in classes],
            "features": list(models),
            "n_train": int(len(y)),
            "train_cells_per_label": {str(c): int(v) for c, v in zip(classes, counts, strict=True)},
            "iterations": {f: m.n_iter for f, m in models.items()},
            "seconds": round(time.perf_counter() - tk, 2),
        }
        logger.info(
            "label head %r: %d classes, %d training cells, features %s, %.1f s",
            key, len(classes), len(y), "+".join(models), time.perf_counter() - tk,
        )
    return {
        "format": HEADS_FORMAT,
        "config": _config_json(config),
        "heads": entries,
        "trained": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_training_sample(path: Path, genes: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    """Store the sample's gene features as CSR (float16 values: log1p(CP10k) <= ~12 keeps 3 significant digits;
    uint16 gene indices where they fit) with the cells' ids (``soma_joinid``, one per row: the datasets they come
    from, for annotate's expression match) and return heads.json's record of it."""
    X = sp.csr_matrix(genes)
    idx_dtype = np.uint16 if X.shape[1] <= np.iinfo(np.uint16).max + 1 else np.int32
    with open(path, "wb") as fh:
        np.savez(
            fh,
            data=to_float16(X.data),
            indices=X.indices.astype(idx_dtype),
            indptr=X.indptr.astype(np.int64),
            shape=np.asarray(X.shape, dtype=np.int64),
            ids=np.asarray(ids, dtype=np.int64),
        )
    return {"file": SAMPLE_FILE, "cells": int(X.shape[0]), "genes": int(X.shape[1]), "nnz": int(X.nnz),
            "bytes": path.stat().st_size}


def _config_json(config: HeadsConfig) -> dict[str, Any]:
    d = asdict(config)
    d["label_keys"] = list(config.label_keys)
    return d
