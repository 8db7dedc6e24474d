"""Label heads: supervised classifiers of an atlas label column, trained on the atlas and stored with its index.

A k-NN vote in an unsupervised embedding follows whatever dominates the embedding, labelled or not (stimulation,
chemistry, culture batch); a classifier trained on the labels weighs the features that separate the labels.
For each label column, two class-balanced L2 multinomial logistic models (:mod:`index.softmax`) are fitted:

* ``genes``: on the embedder's gene features (``Embedder.gene_features``: log1p(CP10k) of the PCA embedder's
  highly variable genes), when the embedder has them;
* ``embedding``: on the index's own L2-normalised vectors (any embedder, precomputed ones included).

:func:`query.annotate` averages their class probabilities (the embedding head reads the query after its MNN
shift onto the atlas). The training cells are a sample of the atlas, stratified by label and spread evenly over
datasets (at most ``max_cells_per_label`` per label, ``max_cells`` in all), so one large study cannot dominate a
label and memory is bounded by the sample, not the atlas.

Layout: ``INDEX/heads/heads.json`` (keys, classes, training record, the index manifest's digest and embedder
fingerprint they belong to) and one ``<n>.npz`` per label column. The directory is written under a temporary name
and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.atlas.sql import quote_ident
from scatlas.index.manifest import (
    MANIFEST_FILE,
    FileRecord,
    manifest_digest,
    read_manifest,
    record_heads_files,
)
from scatlas.index.metadata import columns_of
from scatlas.index.shard import file_record
from scatlas.index.softmax import SoftmaxModel, fit_softmax
from scatlas.index.vectors import as_stored
from scatlas.index.verify import check_files

logger = logging.getLogger(__name__)

HEADS_DIR = "heads"
HEADS_FILE = "heads.json"
HEADS_FORMAT = 1
SAMPLE_FILE = "training_sample.npz"
"""The gene features of the training sample (CSR, float16 values), kept so that heads can be refitted for a query
that lacks some of the embedder's genes (:func:`refit_for_genes`)."""

DEFAULT_MAX_CELLS_PER_LABEL = 2_000
DEFAULT_MAX_CELLS = 100_000
DEFAULT_C_GENES = 0.1
"""Inverse L2 strength of the gene head, as scikit-learn's C. Picked among 0.01, 0.1 and 1 on the real pairs of
scripts/bench_annotate.py (docs/benchmarks.md): fitted to convergence, C=1 over-fits the reference (FACS-sorted
zheng -> kang: 0.74 against 0.75 at 0.1 alone, 0.79 against 0.80 with the embedding head) and 0.01 under-fits mesc."""
DEFAULT_C_EMBEDDING = 10.0
"""Picked among 1, 10 and 100 on the same pairs (differences there were <= 0.01)."""
DATASET_COLUMN = "dataset_id"
AUTO_MAX_LABELS = 1_000
"""``label_keys="auto"`` trains heads for the text columns with 2 to this many distinct values."""
NOT_LABELS = frozenset({"soma_joinid", DATASET_COLUMN, "source_dataset_id"})
"""The cell id and provenance: the store's dataset and the input's own dataset_id (renamed at ingest)."""
NPZ_ERRORS = (KeyError, OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)
"""What reading a damaged ``.npz`` raises (a bad zip, a bad CRC, a truncated member, a bad array header)."""
RETRAIN_HINT = (
    "retrain the label heads with `scatlas build --atlas ATLAS --index {index} --label-key KEY` (the index's own "
    "build arguments: on a built index this only trains the heads) or rebuild the index; "
    "`scatlas verify --index {index}` lists every damaged file"
)


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


@dataclass
class LabelHead:
    """The heads of one label column: class names and one softmax model per feature kind."""

    key: str
    classes: list[str]
    models: dict[str, SoftmaxModel]
    record: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # heads.json's training config (C values, caps)
    directory: Path | None = None  # the heads directory it was loaded from (training sample, per-key rows)

    @property
    def needs_gene_features(self) -> bool:
        return "genes" in self.models

    @property
    def can_refit_for_genes(self) -> bool:
        """Whether :func:`refit_for_genes` can refit this head: it reads gene features and its training sample was
        kept next to it."""
        return self.needs_gene_features and self.directory is not None and (self.directory / SAMPLE_FILE).is_file()

    def predict_proba(self, vectors: np.ndarray, gene_features: np.ndarray | None) -> np.ndarray:
        """``(n, len(classes))`` float32: the mean of the heads' class probabilities."""
        parts = []
        if "embedding" in self.models:
            parts.append(self.models["embedding"].predict_proba(vectors))
        if "genes" in self.models:
            if gene_features is None:
                raise InputError(f"the {self.key!r} label head needs the embedder's gene features")
            parts.append(self.models["genes"].predict_proba(gene_features))
        return np.mean(parts, axis=0).astype(np.float32)


def label_columns(con: Any, max_labels: int = AUTO_MAX_LABELS) -> list[str]:
    """The columns of the cells table that look like annotations: text (VARCHAR or ENUM) columns with 2 to
    ``max_labels`` distinct values and at most one distinct value per two labelled cells (not names or ids), other
    than the cell id and ``dataset_id``; ``cell_type`` first when present, then in table order."""
    candidates = [
        str(row[0]) for row in con.execute("DESCRIBE cells").fetchall()
        if str(row[0]) not in NOT_LABELS and (str(row[1]) == "VARCHAR" or str(row[1]).startswith("ENUM"))
    ]
    if not candidates:
        return []
    counts = con.execute(  # one scan of the table for every candidate
        "SELECT " + ", ".join(f"count(DISTINCT {quote_ident(c)}), count({quote_ident(c)})" for c in candidates)
        + " FROM cells"
    ).fetchone()
    out = [
        col for col, n_distinct, n in zip(candidates, counts[0::2], counts[1::2], strict=True)
        if 2 <= n_distinct <= max_labels and 2 * n_distinct <= n
    ]
    return sorted(out, key=lambda c: c != "cell_type")


def sample_training_cells(con: Any, key: str, config: HeadsConfig) -> tuple[np.ndarray, np.ndarray]:
    """(sorted cell ids, their labels as str) of the training sample of one label column.

    Per label at most ``max_cells_per_label`` cells, taken round-robin over datasets (each dataset's cells in a
    seeded random order), then at most ``max_cells`` overall with every label keeping an equal share where it
    can. NULL labels are left out.
    """
    available = columns_of(con)
    if key not in available:
        raise InputError(f"label key {key!r} is not a column of the index's cell table; available: {available}")
    col = quote_ident(key)
    ds = quote_ident(DATASET_COLUMN) if DATASET_COLUMN in available else "NULL"
    seed = int(config.seed)
    n_labels = con.execute(f"SELECT count(DISTINCT {col}) FROM cells WHERE {col} IS NOT NULL").fetchone()[0]
    if not n_labels:
        raise InputError(f"no atlas cell has a {key!r} label: there is nothing to train a label head on")
    per_label = min(int(config.max_cells_per_label), max(1, int(config.max_cells) // int(n_labels)))
    sql = f"""
        WITH ranked AS (
            SELECT soma_joinid AS id, CAST({col} AS VARCHAR) AS label,
                   row_number() OVER (PARTITION BY {col}, {ds} ORDER BY hash(soma_joinid + {seed})) AS r_ds
            FROM cells WHERE {col} IS NOT NULL
        ), spread AS (
            SELECT id, label,
                   row_number() OVER (PARTITION BY label ORDER BY r_ds, hash(id * 7 + {seed})) AS r_label
            FROM ranked
        )
        SELECT id, label FROM spread WHERE r_label <= {per_label} ORDER BY id
    """
    res = con.execute(sql).fetchnumpy()
    return np.asarray(res["id"], dtype=np.int64), np.asarray(res["label"], dtype=object).astype(str)


def _features(
    store: Any, index: Any, ids: np.ndarray, want_genes: bool, progress: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored-precision index vectors, gene features or None) of atlas cells ``ids`` (sorted), in id order."""
    from tqdm.auto import tqdm

    emb = index.embedder
    key = emb.obsm_key
    obsm = (key,) if emb.needs == "obsm" and key else ()
    vecs = np.zeros((len(ids), index.dim), dtype=np.float32)
    genes = None
    got = np.zeros(len(ids), dtype=bool)
    bar = tqdm(total=len(ids), desc="label heads: read", unit="cell", disable=not progress)
    for chunk in store.read_cells(ids, with_X=emb.needs == "X", obsm_keys=obsm):
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
    store: Any, index_dir: Path, config: HeadsConfig, progress: bool
) -> tuple[np.ndarray, np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, str]:
    """(vectors, gene features or None, per-key (ids, labels) samples, all sampled ids, embedder fingerprint)."""
    from scatlas.index.atlas_index import AtlasIndex

    with AtlasIndex.open(index_dir) as index:
        built_from = index.manifest.atlas_snapshot.get("n_cells")
        if built_from not in (None, store.n_cells):
            raise InputError(
                f"the atlas store at {store.path} has {store.n_cells} cells but the index was built from "
                f"{built_from}: train heads from the store the index was built from"
            )
        want_genes = index.embedder.gene_feature_names is not None
        samples = {key: sample_training_cells(index.connect(), key, config) for key in config.label_keys}
        all_ids = np.unique(np.concatenate([ids for ids, _ in samples.values()]))
        logger.info("label heads: reading %d sampled atlas cells for %s", len(all_ids), ", ".join(config.label_keys))
        vecs, genes = _features(store, index, all_ids, want_genes, progress)
        return vecs, genes, samples, all_ids, index.manifest.embedder.fingerprint


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
    progress: bool = True,
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
    existing = index_dir / HEADS_DIR / HEADS_FILE
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())
        except ValueError:
            old = {}
        old = old if isinstance(old, dict) else {}
        complete = not old.get("gene_features") or "training_sample" in old  # heads from before the sample was kept
        if (
            old.get("manifest_sha256") == digest and old.get("config") == _config_json(config) and complete
            and _recorded_heads_intact(index_dir)
        ):
            logger.info("label heads for %s are already trained for this index", ", ".join(keys))
            _record_heads(index_dir)
            return dict(old)
    t0 = time.perf_counter()
    own_store = isinstance(atlas, (str, Path))
    store: Any = AtlasStore.open(atlas) if own_store else atlas
    try:
        vecs, genes, samples, all_ids, fingerprint = _read_training_data(store, index_dir, config, progress)
    finally:
        if own_store:
            store.close()
    tmp = index_dir / f".{HEADS_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        payload = _fit_and_write(tmp, keys, samples, all_ids, vecs, genes, config, device)
        if genes is not None:
            payload["training_sample"] = _write_training_sample(tmp / SAMPLE_FILE, genes)
        payload.update(
            {
                "manifest_sha256": digest,
                "embedder_fingerprint": fingerprint,
                "gene_features": genes is not None,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        (tmp / HEADS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = index_dir / HEADS_DIR
    old_dir = index_dir / f".{HEADS_DIR}.{os.getpid()}.old.tmp"
    if final.exists():
        os.replace(final, old_dir)
    os.replace(tmp, final)
    shutil.rmtree(old_dir, ignore_errors=True)
    _record_heads(index_dir)
    return payload


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


def _write_training_sample(path: Path, genes: np.ndarray) -> dict[str, Any]:
    """Store the sample's gene features as CSR (float16 values: log1p(CP10k) <= ~12 keeps 3 significant digits;
    uint16 gene indices where they fit) and return heads.json's record of it."""
    X = sp.csr_matrix(genes)
    idx_dtype = np.uint16 if X.shape[1] <= np.iinfo(np.uint16).max + 1 else np.int32
    with open(path, "wb") as fh:
        np.savez(
            fh,
            data=X.data.astype(np.float16),
            indices=X.indices.astype(idx_dtype),
            indptr=X.indptr.astype(np.int64),
            shape=np.asarray(X.shape, dtype=np.int64),
        )
    return {"file": SAMPLE_FILE, "cells": int(X.shape[0]), "genes": int(X.shape[1]), "nnz": int(X.nnz),
            "bytes": path.stat().st_size}


def load_training_sample(directory: str | Path) -> sp.csr_matrix | None:
    """The stored gene features of the heads' training sample (float32 CSR), or None when the heads have none
    (trained before it was kept, or the embedder has no gene features)."""
    path = Path(directory) / SAMPLE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            shape = tuple(int(v) for v in z["shape"])
            return sp.csr_matrix(
                (z["data"].astype(np.float32), z["indices"].astype(np.int32), z["indptr"]), shape=shape
            )
    except NPZ_ERRORS as exc:
        raise IndexFormatError(
            f"the label heads' training sample {path} is unreadable ({exc}); "
            + RETRAIN_HINT.format(index=path.parent.parent)
        ) from exc


def refit_for_genes(
    heads: dict[str, LabelHead],
    present: np.ndarray,
    embed: Callable[[np.ndarray], np.ndarray] | None,
    *,
    device: str = "cpu",
    block_rows: int = 10_000,
) -> dict[str, LabelHead]:
    """The heads refitted on their training sample as seen by a query that has only the embedder's genes marked in
    ``present`` (bool over ``Embedder.gene_feature_names``).

    A head trained on every gene reads a missing gene as its atlas mean; when many genes are missing, or
    informative ones, that drifts far from what the head learnt. Refitted: the ``genes`` head on the present genes
    only (the missing ones get weight 0, so it still reads full-width gene features), and the ``embedding`` head on
    the sample re-embedded the way the query is embedded (``embed``: gene features -> L2-normalised vectors with
    the missing genes treated as the embedder treats them; None keeps the stored embedding head). Same objective,
    C and training cells as at build time; cost grows with the sample (at most ``max_cells_per_label`` x labels),
    not with the atlas or the query. Heads without a stored training sample are returned unchanged (logged).
    """
    present = np.asarray(present, dtype=bool)
    out: dict[str, LabelHead] = {}
    samples: dict[Path, tuple[np.ndarray, np.ndarray | None] | None] = {}  # one read per heads directory
    for key, head in heads.items():
        sample = head.directory if head.needs_gene_features else None
        if sample is not None and sample not in samples:
            samples[sample] = _sample_as_query_sees(sample, present, embed, block_rows)
        seen = samples[sample] if sample is not None else None
        if sample is None or seen is None:
            out[key] = head
            continue
        Gp, V = seen
        with np.load(sample / head.record["file"], allow_pickle=False) as z:
            rows, y = z["train_rows"], z["train_y"]
        c_genes = float(head.config.get("c_genes", DEFAULT_C_GENES))
        c_emb = float(head.config.get("c_embedding", DEFAULT_C_EMBEDDING))
        k = len(head.classes)
        models = dict(head.models)
        fitted = fit_softmax(Gp[rows], y, k, C=c_genes, device=device)
        weights = np.zeros((len(present), k), dtype=np.float32)
        weights[present] = fitted.weights
        models["genes"] = SoftmaxModel(weights, fitted.bias, fitted.n_iter, fitted.loss)
        if V is not None and "embedding" in models:
            models["embedding"] = fit_softmax(V[rows], y, k, C=c_emb, device=device)
        out[key] = LabelHead(
            key=key, classes=head.classes, models=models,
            record={**head.record, "refit_for_genes": int(present.sum())}, config=head.config,
            directory=head.directory,
        )
    return out


def _sample_as_query_sees(
    directory: Path, present: np.ndarray, embed: Callable[[np.ndarray], np.ndarray] | None, block_rows: int
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(the training sample's features on the present genes, dense float32; its vectors re-embedded by ``embed``
    or None), or None when the heads have no stored sample (logged)."""
    G = load_training_sample(directory)
    if G is None:
        logger.warning(
            "the label heads were trained before their training sample was kept: they cannot be refitted for "
            "the query's genes (retrain them: `scatlas build ... --label-key KEY`)"
        )
        return None
    if G.shape[1] != len(present):
        raise IndexFormatError(
            f"the heads' training sample has {G.shape[1]} genes, the embedder {len(present)}; retrain them"
        )
    Gp = np.asarray(G[:, np.flatnonzero(present)].toarray(), dtype=np.float32)
    if embed is None:
        return Gp, None
    V = np.concatenate([embed(G[a : a + block_rows].toarray()) for a in range(0, G.shape[0], block_rows)])
    return Gp, V.astype(np.float32)


def _config_json(config: HeadsConfig) -> dict[str, Any]:
    d = asdict(config)
    d["label_keys"] = list(config.label_keys)
    return d


def load_label_heads(
    index_dir: str | Path, *, embedder_fingerprint: str, recorded: dict[str, FileRecord] | None = None
) -> dict[str, LabelHead]:
    """The label heads stored with an index (``{}`` when it has none).

    ``recorded``: the manifest's records of the heads' files (``IndexManifest.heads_files``); when given, every one
    must be present with its size and SHA-256 (a deleted or damaged ``heads/`` is an error, not "no heads").
    IndexFormatError when they are damaged, belong to another build of the index (its manifest changed), or were
    trained with another embedder.
    """
    index_dir = Path(index_dir)
    path = index_dir / HEADS_DIR / HEADS_FILE
    hint = RETRAIN_HINT.format(index=index_dir)
    if recorded:
        if not path.parent.is_dir():
            raise IndexFormatError(f"{path.parent} is missing but the index manifest records label heads there; {hint}")
        check_files(index_dir, recorded, fix=f"the manifest records label heads that cannot be used: {hint}")
    if not path.is_file():
        return {}
    meta = _read_heads_json(path, hint)
    if meta.get("format") != HEADS_FORMAT:
        raise IndexFormatError(f"{path} has format {meta.get('format')!r}; this scatlas reads {HEADS_FORMAT}")
    if meta.get("manifest_sha256") != manifest_digest(index_dir):
        raise IndexFormatError(
            f"the label heads in {path.parent} were trained for another build of this index; retrain them "
            "(`scatlas build --atlas ATLAS --index INDEX --label-key KEY` with the build's own arguments) or delete "
            "that directory"
        )
    if meta.get("embedder_fingerprint") != embedder_fingerprint:
        raise IndexFormatError(
            f"the label heads in {path.parent} were trained with embedder {meta.get('embedder_fingerprint')}, the "
            f"index uses {embedder_fingerprint}; retrain them"
        )
    heads: dict[str, LabelHead] = {}
    for key, entry in dict(meta.get("heads") or {}).items():
        try:
            heads[key] = _load_head(path.parent, key, entry, dict(meta.get("config") or {}))
        except (*NPZ_ERRORS, AttributeError) as exc:
            raise IndexFormatError(f"the label head {key!r} in {path.parent} is unreadable ({exc}); {hint}") from exc
    return heads


def _read_heads_json(path: Path, hint: str) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is unreadable ({exc}); {hint}") from exc
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{path} does not hold a JSON object; {hint}")
    return meta


def _load_head(directory: Path, key: str, entry: dict[str, Any], config: dict[str, Any]) -> LabelHead:
    """One label column's heads from its ``.npz`` (raises what a damaged file or entry raises)."""
    with np.load(directory / entry["file"], allow_pickle=False) as npz:
        models = {
            f: SoftmaxModel(npz[f"{f}_weights"], npz[f"{f}_bias"], int(entry["iterations"][f]), float("nan"))
            for f in entry["features"]
        }
    return LabelHead(
        key=key, classes=list(entry["classes"]), models=models, record=entry, config=config, directory=directory
    )
