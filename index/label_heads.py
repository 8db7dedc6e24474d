"""Label heads: supervised classifiers of an atlas label column, stored with the index; loading and using them.

A k-NN vote in an unsupervised embedding follows whatever dominates the embedding, labelled or not (stimulation,
chemistry, culture batch); a classifier trained on the labels weighs the features that separate the labels.
Each label column has two class-balanced multinomial logistic models (:mod:`index.softmax`): ``genes``, on the
embedder's gene features when it has them, and ``embedding``, on the index's own L2-normalised vectors.
:func:`query.annotate` averages their class probabilities. Training is in :mod:`index.heads_training`.

Layout: ``INDEX/heads/heads.json`` (keys, classes, training record, the index build id and embedder fingerprint
they belong to), one ``<n>.npz`` per label column, and the training sample's gene features
(:data:`~index.manifest.HEADS_SAMPLE_FILE`), kept for :func:`refit_for_genes`.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.atomic import read_json_object
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.index.manifest import (
    HEADS_DIR,
    HEADS_FILE,
    HEADS_SAMPLE_FILE,
    FileRecord,
    manifest_digest,
)
from scatlas.index.softmax import SoftmaxModel, fit_softmax
from scatlas.index.verify import check_files

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_C_EMBEDDING", "DEFAULT_C_GENES", "HEADS_DIR", "HEADS_FILE", "HEADS_FORMAT", "SAMPLE_FILE", "LabelHead",
    "heads_files_identity", "load_label_heads", "load_training_sample", "load_training_sample_ids", "read_heads_record",
    "refit_for_genes",
]

HEADS_FORMAT = 1
SAMPLE_FILE = HEADS_SAMPLE_FILE
DEFAULT_C_GENES = 0.1
"""Inverse L2 strength of the gene head, as scikit-learn's C (see docs/benchmarks.md#label-heads-c)."""
DEFAULT_C_EMBEDDING = 10.0
"""Inverse L2 strength of the embedding head (see docs/benchmarks.md#label-heads-c)."""
NPZ_ERRORS = (KeyError, OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)
"""What reading a damaged ``.npz`` raises (a bad zip, a bad CRC, a truncated member, a bad array header)."""
RETRAIN_HINT = (
    "retrain the label heads with `scatlas build --atlas ATLAS --index {index} --label-key KEY` (the index's own "
    "build arguments: on a built index this only trains the heads) or rebuild the index; "
    "`scatlas verify --index {index}` lists every damaged file"
)


@dataclass
class LabelHead:
    """The heads of one label column: class names and one softmax model per feature kind."""

    key: str
    classes: list[str]
    models: dict[str, SoftmaxModel]
    record: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # heads.json's training config (C values, caps)
    directory: Path | None = None  # the heads directory it was loaded from (training sample, per-key rows)
    files_identity: tuple[Any, ...] | None = None  # heads_files_identity(directory) when it was loaded

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


def heads_files_identity(directory: str | Path) -> tuple[Any, ...]:
    """What identifies the heads stored in ``directory`` on disk: device, inode, modification time and size of
    ``heads.json`` and of the training sample (None for a missing one). Training writes new files and renames
    them into place, so a retrained head never has the identity of the one it replaced (a key for caches of what
    is derived from them)."""
    out: list[Any] = []
    for name in (HEADS_FILE, SAMPLE_FILE):
        try:
            st = (Path(directory) / name).stat()
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_training_sample_ids(directory: str | Path) -> np.ndarray | None:
    """The atlas ids (``soma_joinid``) of the heads' training sample rows, or None when the sample has none (kept
    before its ids were) or there is no sample."""
    path = Path(directory) / SAMPLE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["ids"], dtype=np.int64) if "ids" in z.files else None
    except NPZ_ERRORS as exc:
        raise IndexFormatError(
            f"the label heads' training sample {path} is unreadable ({exc}); "
            + RETRAIN_HINT.format(index=path.parent.parent)
        ) from exc


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


def refit_c_genes(c_genes: float, present: np.ndarray) -> float:
    """C of a gene head refitted on the ``present`` genes: the trained head's C times (all genes / present genes),
    so the L2 penalty shrinks with the number of features it spreads over; measured with scripts/bench_refit.py
    (docs/benchmarks.md)."""
    n_present = int(np.count_nonzero(present))
    return float(c_genes) * len(present) / max(n_present, 1)


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
        c_genes = refit_c_genes(float(head.config.get("c_genes", DEFAULT_C_GENES)), present)
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
            directory=head.directory, files_identity=head.files_identity,
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
    identity = heads_files_identity(path.parent)
    for key, entry in dict(meta.get("heads") or {}).items():
        try:
            heads[key] = _load_head(path.parent, key, entry, dict(meta.get("config") or {}), identity)
        except (*NPZ_ERRORS, AttributeError) as exc:
            raise IndexFormatError(f"the label head {key!r} in {path.parent} is unreadable ({exc}); {hint}") from exc
    return heads


def read_heads_record(index_dir: str | Path) -> dict[str, Any] | None:
    """``heads.json`` of the index at ``index_dir`` (what was trained, how, in how many seconds), or None when the
    index has no heads; IndexFormatError when it is unreadable."""
    path = Path(index_dir) / HEADS_DIR / HEADS_FILE
    if not path.is_file():
        return None
    return _read_heads_json(path, RETRAIN_HINT.format(index=index_dir))


def _read_heads_json(path: Path, hint: str) -> dict[str, Any]:
    return read_json_object(path, hint)


def _load_head(
    directory: Path, key: str, entry: dict[str, Any], config: dict[str, Any], identity: tuple[Any, ...]
) -> LabelHead:
    """One label column's heads from its ``.npz`` (raises what a damaged file or entry raises)."""
    with np.load(directory / entry["file"], allow_pickle=False) as npz:
        models = {
            f: SoftmaxModel(npz[f"{f}_weights"], npz[f"{f}_bias"], int(entry["iterations"][f]), float("nan"))
            for f in entry["features"]
        }
    return LabelHead(
        key=key, classes=list(entry["classes"]), models=models, record=entry, config=config, directory=directory,
        files_identity=identity,
    )
