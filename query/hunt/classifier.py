"""The trained hunt classifier: a linear score on L2-normalised embeddings, its calibration, threshold and record.

Saved as a directory (written to a temporary sibling and renamed into place)::

    CLASSIFIER_DIR/
      classifier.json   everything but the weights: bias, threshold, calibration, metrics, embedder fingerprint,
                        index manifest id, training counts, seed, versions, and the SHA-256 of weights.npy
      weights.npy       (d,) float32
      stage2_weights.npy  optional: (n_genes,) float32 weights of stage 2 (:mod:`query.hunt.stage2`), whose record
                        is classifier.json's ``stage2`` (absent: a one-stage classifier, as before)
      training_ids.npy  optional: (n,) int64 sorted atlas ids of the cells it learnt as positives (atlas cells
                        matching ``--positive-sql``, labelled cells found in the atlas); absent in older classifiers

A classifier is tied to the embedder that made its training vectors (``embedder_fingerprint``): a sweep refuses
an index whose embedder differs. ``index_manifest_id`` records which index build it was trained against.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import replaced_dir
from scatlas.atlas.errors import InputError
from scatlas.atlas.outputs import CLASSIFIER, check_output_dir, os_error_message, show, writing
from scatlas.query.hunt.calibration import Calibration
from scatlas.query.hunt.stage2 import GeneStage

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "classifier.json"
WEIGHTS_FILE = "weights.npy"
STAGE2_WEIGHTS_FILE = "stage2_weights.npy"
TRAINING_IDS_FILE = "training_ids.npy"


@dataclass
class HuntClassifier:
    """``score(x) = weights . x + bias`` on L2-normalised vectors; ``score >= threshold`` is a hit.

    ``metrics`` holds the cross-validated estimates (AUPRC, ROC AUC, precision / recall / F1 / false-positive
    rate at the threshold, per-fold AUPRC, the chosen L2 penalty, expected false hits per million atlas cells).
    ``counts`` holds the training-set sizes by origin. ``calibration`` maps scores to probabilities (training mix).
    ``stage2``: the gene-level second stage of a two-stage classifier (:class:`~query.hunt.stage2.GeneStage`, with
    stage 1's candidate cut), or None. ``training_ids``: the sorted atlas ids of the cells it learnt as positives
    (a sweep marks them among its hits), or None where not recorded (classifiers trained before it was).
    ``atlas_store_id``: the atlas store the index was built from ("" where unknown): atlas ids mean the same cells
    in every build of an index of that store, and nothing in another's.
    """

    weights: np.ndarray
    bias: float
    threshold: float
    calibration: Calibration
    embedder_fingerprint: str
    index_manifest_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    stage2: GeneStage | None = None
    training_ids: np.ndarray | None = None
    atlas_store_id: str = ""

    def same_atlas_ids(self, build_id: str, store_id: str) -> bool:
        """Whether an index (its ``build_id`` and atlas ``store_id``) numbers its cells as the one this classifier
        was trained against: the same build, or builds of the same atlas store."""
        return build_id == self.index_manifest_id or bool(store_id and store_id == self.atlas_store_id)

    def __post_init__(self) -> None:
        if self.training_ids is not None:
            self.training_ids = np.unique(np.asarray(self.training_ids, dtype=np.int64))
        self.weights = np.ascontiguousarray(np.asarray(self.weights, dtype=np.float32).ravel())
        self.bias = float(self.bias)
        self.threshold = float(self.threshold)
        if not np.isfinite(self.weights).all() or not np.isfinite(self.bias):
            raise InputError("classifier weights must be finite")
        if not self.created_at:
            self.created_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    def fingerprint(self) -> str:
        """Identity of what the classifier computes: weights, bias, threshold, calibration, embedder."""
        h = hashlib.sha256()
        h.update(self.weights.tobytes())
        payload = {
            "bias": self.bias,
            "threshold": self.threshold,
            "calibration": self.calibration.to_dict(),
            "embedder": self.embedder_fingerprint,
        }
        if self.stage2 is not None:  # one-stage classifiers keep their fingerprint
            payload["stage2"] = self.stage2.fingerprint()
        h.update(json.dumps(payload, sort_keys=True).encode())
        return h.hexdigest()[:16]

    # -- scoring ------------------------------------------------------------------------------------------------
    def decision_function(self, vectors: np.ndarray) -> np.ndarray:
        """Raw scores of L2-normalised vectors ``(n, d)``: computed in float64, returned as float32.

        This is the exact score the sweep reports for its hits (whatever kernel found them).
        """
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"vectors of shape {x.shape} do not match the classifier's dimension {self.dim}")
        return exact_scores(x, self.weights, self.bias)

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (training mix, see :mod:`query.hunt.calibration`)."""
        return self.calibration.apply(self.decision_function(vectors))

    def probability(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw scores."""
        return self.calibration.apply(scores)

    # -- persistence --------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            "dim": self.dim,
            "bias": self.bias,
            "threshold": self.threshold,
            "calibration": self.calibration.to_dict(),
            "embedder_fingerprint": self.embedder_fingerprint,
            "index_manifest_id": self.index_manifest_id,
            **({"atlas_store_id": self.atlas_store_id} if self.atlas_store_id else {}),
            "metrics": self.metrics,
            "counts": self.counts,
            "seed": self.seed,
            "params": self.params,
            "created_at": self.created_at,
            "versions": self.versions,
            "weights_sha256": _sha256(self.weights),
            **({"stage2": self.stage2.to_json()} if self.stage2 is not None else {}),
            **({"training_ids_sha256": _sha256(self.training_ids), "n_training_ids": len(self.training_ids)}
               if self.training_ids is not None else {}),
        }

    def save(self, path: str | Path, *, overwrite: bool = True, inputs: Iterable[str | Path | None] = ()) -> Path:
        """Write the classifier directory atomically (temporary sibling, then rename); returns its path.

        Only a new path, an empty directory or an earlier classifier directory is written (an earlier classifier
        is replaced unless ``overwrite=False``); anything else, or a path among ``inputs``, raises
        :class:`~atlas.outputs.OutputError`.
        """
        path = Path(path)
        check_output_dir(path, CLASSIFIER, inputs=inputs, replace=True)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise InputError(f"{show(path)} already exists; choose another path or allow overwriting")
        with writing(path):
            self._write_dir(path)
        logger.info("saved hunt classifier %s to %s", self.fingerprint(), path)
        return path

    def _write_dir(self, path: Path) -> None:
        with replaced_dir(path) as tmp:
            np.save(tmp / WEIGHTS_FILE, self.weights)
            if self.stage2 is not None:
                np.save(tmp / STAGE2_WEIGHTS_FILE, self.stage2.weights)
            if self.training_ids is not None:
                np.save(tmp / TRAINING_IDS_FILE, self.training_ids)
            with open(tmp / META_FILE, "w") as fh:
                json.dump(self.to_json(), fh, indent=2, sort_keys=True, default=_json_default)
                fh.flush()
                os.fsync(fh.fileno())

    @classmethod
    def load(cls, path: str | Path) -> HuntClassifier:
        """Read a classifier directory written by :meth:`save`, checking format and weight checksum."""
        path = Path(path)
        meta_path, w_path = path / META_FILE, path / WEIGHTS_FILE
        if not meta_path.is_file() or not w_path.is_file():
            raise InputError(f"{show(path)} is not a hunt classifier directory ({META_FILE} / {WEIGHTS_FILE} "
                             "missing); train one with `scatlas hunt train`")
        meta = _read_meta(path, meta_path)
        weights = _read_weights(path, w_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{show(path)}: classifier format {meta.get('format_version')!r}, this scatlas reads "
                             f"{FORMAT_VERSION}; retrain it")
        if _sha256(np.asarray(weights, dtype=np.float32)) != meta.get("weights_sha256"):
            raise InputError(_damaged(path, f"{WEIGHTS_FILE} does not match its recorded checksum"))
        if meta.get("dim") not in (None, int(weights.shape[0])):
            raise InputError(_damaged(path, f"{META_FILE} records another dimension than its weights have"))
        stage2 = _read_stage2(path, meta)
        training_ids = _read_training_ids(path, meta)
        try:
            clf = cls._from_meta(meta, weights)
            clf.stage2 = stage2
            clf.training_ids = training_ids
        except KeyError as exc:
            raise InputError(_damaged(path, f"{META_FILE} lacks the field {exc.args[0]!r}")) from exc
        except (TypeError, ValueError, AttributeError, InputError) as exc:  # e.g. an unknown calibration
            raise InputError(_damaged(path, f"{META_FILE} holds a value of the wrong type or an invalid value")) from exc
        if clf.fingerprint() != meta.get("fingerprint"):
            raise InputError(_damaged(path, f"{META_FILE} was modified (fingerprint mismatch)"))
        return clf

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], weights: np.ndarray) -> HuntClassifier:
        return cls(
            weights=weights,
            bias=meta["bias"],
            threshold=meta["threshold"],
            calibration=Calibration.from_dict(meta["calibration"]),
            embedder_fingerprint=str(meta["embedder_fingerprint"]),
            index_manifest_id=str(meta["index_manifest_id"]),
            atlas_store_id=str(meta.get("atlas_store_id") or ""),
            metrics=dict(meta.get("metrics", {})),
            counts=dict(meta.get("counts", {})),
            seed=int(meta.get("seed", 0)),
            params=dict(meta.get("params", {})),
            created_at=str(meta.get("created_at", "")),
            versions=dict(meta.get("versions", {})),
        )


def _damaged(path: Path, why: str) -> str:
    return (f"the classifier directory {show(path)} is damaged ({why}); retrain it with `scatlas hunt train` "
            "(a new classifier may be written over it)")


def _read_meta(path: Path, meta_path: Path) -> dict[str, Any]:
    """``classifier.json`` as a dict; InputError naming what is wrong (never echoing the file's text)."""
    try:
        text = meta_path.read_bytes().decode("utf-8")
        meta = json.loads(text)
    except OSError as exc:
        raise InputError(os_error_message(exc, "reading", meta_path)) from exc
    except UnicodeDecodeError as exc:
        raise InputError(_damaged(path, f"{META_FILE} is not UTF-8 text")) from exc
    except json.JSONDecodeError as exc:
        raise InputError(_damaged(path, f"{META_FILE} is not valid JSON: line {exc.lineno} column {exc.colno}")) from exc
    if not isinstance(meta, dict):
        raise InputError(_damaged(path, f"{META_FILE} does not hold a classifier record"))
    return meta


def _read_stage2(path: Path, meta: dict[str, Any]) -> GeneStage | None:
    """Stage 2 of a two-stage classifier (None when ``classifier.json`` records none), checksum checked."""
    record = meta.get("stage2")
    if record is None:
        return None
    w_path = path / STAGE2_WEIGHTS_FILE
    if not isinstance(record, dict) or not w_path.is_file():
        raise InputError(_damaged(path, f"its stage 2 record or {STAGE2_WEIGHTS_FILE} is missing"))
    weights = _read_weights(path, w_path)
    if _sha256(np.asarray(weights, dtype=np.float32)) != record.get("weights_sha256"):
        raise InputError(_damaged(path, f"{STAGE2_WEIGHTS_FILE} does not match its recorded checksum"))
    try:
        return GeneStage.from_json(record, weights)
    except (KeyError, TypeError, ValueError, AttributeError, InputError) as exc:
        raise InputError(_damaged(path, f"{META_FILE} holds an invalid stage 2 record")) from exc


def _read_training_ids(path: Path, meta: dict[str, Any]) -> np.ndarray | None:
    """The atlas ids of the training positives (None when ``classifier.json`` records none), checksum checked."""
    digest = meta.get("training_ids_sha256")
    if digest is None:
        return None
    ids_path = path / TRAINING_IDS_FILE
    if not ids_path.is_file():
        raise InputError(_damaged(path, f"{TRAINING_IDS_FILE} is missing"))
    ids = _load_array(path, ids_path)
    if ids.dtype != np.int64 or ids.ndim != 1 or _sha256(ids) != digest:
        raise InputError(_damaged(path, f"{TRAINING_IDS_FILE} does not match its recorded checksum"))
    return ids


def _sha256(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _read_weights(path: Path, w_path: Path) -> np.ndarray:
    weights = _load_array(path, w_path)
    if weights.dtype.kind not in "fiu":
        raise InputError(_damaged(path, f"{w_path.name} does not hold numeric weights"))
    return weights


def _load_array(path: Path, file: Path) -> np.ndarray:
    """The array in ``file`` of the classifier directory ``path``; InputError when it cannot be read."""
    try:
        array = np.load(file, allow_pickle=False)
    except OSError as exc:
        if exc.errno is not None:
            raise InputError(os_error_message(exc, "reading", file)) from exc
        raise InputError(_damaged(path, f"{file.name} is not a NumPy array file")) from exc
    except (ValueError, EOFError) as exc:
        raise InputError(_damaged(path, f"{file.name} is not a readable NumPy array")) from exc
    if not isinstance(array, np.ndarray):
        raise InputError(_damaged(path, f"{file.name} does not hold one array"))
    return array


def exact_scores(x: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """``x @ w + b`` in float64 (independent of how rows are batched), rounded to float32.

    Computed with ``einsum``, not BLAS: a multi-threaded BLAS call leaves its worker threads spinning afterwards,
    taking the cores from the sweep's kernel threads between blocks (see docs/benchmarks.md#sweep-exact-scores)."""
    w64 = np.asarray(weights, dtype=np.float64)
    return (np.einsum("ij,j->i", np.asarray(x, dtype=np.float64), w64) + float(bias)).astype(np.float32)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
