"""``build --update``: bring an index up to date with its atlas store without re-embedding what it holds.

Datasets added to the store since the index was built become new shards, embedded with the index's own embedder
and added to its trained quantizer (no refit, no retrain); removed datasets' cells are removed from their shards
(FAISS id removal); relabelled datasets only change the cells table. Every argument comes from the index's own
build record. The label heads, label classes and mapping calibration are made anew when the index had them, and
recall and the similarity calibration are re-measured. The new version is written completely in
``versions/NNNN`` (unchanged files hard-linked) and made current by one atomic rename (:mod:`index.versions`):
readers get the old version or the new one. An interrupted update resumes (completed shards are kept).

Before any shard is written the added cells are checked for drift (:mod:`index.drift`); too far: refused, rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.atomic import read_json_object, write_json_atomic
from scatlas.atlas.errors import IndexFormatError, InputError, TooFewCellsError
from scatlas.index.build import BuildConfig, _build_shards, _load_trained, _now, _versions
from scatlas.index.changes import StoreChanges, another_store, store_changes
from scatlas.index.device import resolve_device
from scatlas.index.drift import (
    DEFAULT_MAX_FAR_FRACTION,
    DEFAULT_MIN_GENE_RATIO,
    DRIFT_SAMPLE,
    Drift,
    detected_genes,
    measure_drift,
)
from scatlas.index.embedding import obs_columns, obsm_keys, reads_x
from scatlas.index.evaluate import calibrate, sample_cells, tune_and_measure
from scatlas.index.executor import Executor
from scatlas.index.heads_training import NoLabelsError, train_label_heads
from scatlas.index.label_classes import LabelClasses, ensure_label_classes, load_label_classes
from scatlas.index.locking import index_lock
from scatlas.index.manifest import (
    BUILD_FILE,
    CELLS_DB_FILE,
    EMBEDDER_DIR,
    HEADS_DIR,
    HEADS_FILE,
    SHARDS_DIR,
    TRAINED_FILE,
    IndexManifest,
    ShardRecord,
    manifest_digest,
    read_manifest,
    residuals_state,
)
from scatlas.index.mapping import MAPPING_FILE, calibrate_mapping
from scatlas.index.metadata import write_cells_db
from scatlas.index.progress import Progress
from scatlas.index.refmap import ensure_reference_map
from scatlas.index.searcher import ShardSearcher
from scatlas.index.shard import file_record
from scatlas.index.shard_edit import carried_shard, link_shard, overlaps, strip_shard
from scatlas.index.source import ShardSpec, plan_over_ranges
from scatlas.index.store_source import StoreVectorSource, _class_keys, committed_cells
from scatlas.index.unfinished import check_finished
from scatlas.index.verify import small_file_records
from scatlas.index.versions import (
    commit_version,
    current_version,
    link_file,
    link_tree,
    refuse_version_dir,
    remove_superseded,
    version_dirname,
)

logger = logging.getLogger(__name__)

UPDATE_FILE = "update.json"


@dataclass
class UpdateReport:
    """What ``build --update`` did: the version it made (or the current one when nothing changed)."""

    index: str
    version: int
    changes: StoreChanges
    drift: Drift | None = None
    n_cells: int = 0
    recall: float | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.changes.empty

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "version": self.version, "up_to_date": self.up_to_date,
            "changes": self.changes.to_json(), "drift": None if self.drift is None else self.drift.to_json(),
            "n_cells": self.n_cells, "recall": self.recall, "seconds": self.seconds, "warnings": self.warnings,
        }


def _check_index(root: Path) -> None:
    """Raise :class:`IndexFormatError` unless ``root`` is a directory (an index to update)."""
    if not root.is_dir():
        raise IndexFormatError(f"no index at {root}: build one with `scatlas build --atlas ATLAS --index DIR` first")
    refuse_version_dir(root)


def _snapshot_digest(snapshot: dict[str, Any]) -> str:
    body = {k: v for k, v in snapshot.items() if k != "path"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_target(root: Path, version: int, record: dict[str, Any]) -> Path:
    """``versions/NNNN`` for ``version``: kept when an interrupted update of the same change left it, else new."""
    import shutil

    target = root / version_dirname(version)
    if target.exists():
        try:
            same = read_json_object(target / UPDATE_FILE, "") == record
        except IndexFormatError:
            same = False
        if same:
            logger.info("resume: continuing the interrupted update in %s", target)
        else:
            logger.info("removing %s, left by an update of another change", target)
            shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / UPDATE_FILE, record)
    return target


def _sample_ids(ranges: list[tuple[int, int]], n: int, seed: int) -> np.ndarray:
    """Up to ``n`` sorted cell ids drawn from the ``[start, stop)`` ranges."""
    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges] or [np.zeros(0, dtype=np.int64)])
    if len(ids) > n:
        ids = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))
    return ids


def _drift_sample(source: StoreVectorSource, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Vectors of the cells ``ids`` and which of the embedder's genes they detect (None: it reads no genes)."""
    match = source.embedder.gene_match(source.store.genes) if reads_x(source.embedder) else None
    vecs, detected = [], None if match is None else np.zeros(match.n_target, dtype=bool)
    for chunk in source.store.read_cells(ids, with_X=reads_x(source.embedder), obsm_keys=obsm_keys(source.embedder),
                                         obs_columns=obs_columns(source.embedder)):
        vecs.append(source.embedder.transform(chunk))
        if detected is not None and chunk.X is not None:
            detected |= detected_genes(chunk.X, match)
    return (np.concatenate(vecs) if vecs else np.zeros((0, source.dim), np.float32)), detected


def _measure(source: StoreVectorSource, old: IndexManifest, searcher: ShardSearcher, changes: StoreChanges,
             seed: int, max_far_fraction: float, min_gene_ratio: float) -> Drift:
    """The drift of the added cells against the index before the update (:mod:`index.drift`)."""
    added_ids = {d.dataset_id for d in changes.added}
    kept = [(s, e) for ds, s, e in source.store.cell_ranges() if ds not in added_ids]
    per = max(DRIFT_SAMPLE // max(len(changes.added), 1), 1)
    samples = [(d.dataset_id, _drift_sample(source, _sample_ids([(d.start, d.stop)], per, seed + i)))
               for i, d in enumerate(changes.added)]
    vecs = np.concatenate([v for _, (v, _) in samples]) if samples else np.zeros((0, source.dim), np.float32)
    indexed: dict[int, np.ndarray | None] = {}  # genes detected by as many sampled indexed cells (more cells, more)
    ratios = []
    for name, (v, det) in samples:  # per added dataset: the lowest ratio decides, and is named
        if det is None:
            continue
        if len(v) not in indexed:
            indexed[len(v)] = _drift_sample(source, _sample_ids(kept, len(v), seed + 1001))[1]
        base = indexed[len(v)]
        if base is not None and base.any():
            ratios.append((float(det.mean() / base.mean()), name))
    ratio, worst = min(ratios) if ratios else (None, None)
    atlas = sample_cells(searcher, DRIFT_SAMPLE, seed + 2)[1]
    return measure_drift(searcher, old, vecs, atlas, max_far_fraction=max_far_fraction, gene_ratio=ratio,
                         min_gene_ratio=min_gene_ratio, gene_ratio_dataset=worst if len(samples) > 1 else None)


def _carry_shards(cur: Path, target: Path, old: IndexManifest, removed: list[tuple[int, int]]) -> list[ShardRecord]:
    """The old shards in ``target``: hard-linked, or rewritten without removed cells (dropped when emptied)."""
    out = []
    (target / SHARDS_DIR).mkdir(exist_ok=True)
    for rec in old.shards:
        src, dst = cur / SHARDS_DIR / rec.dirname, target / SHARDS_DIR / rec.dirname
        done = carried_shard(dst, rec)
        if done is None:
            done = strip_shard(src, dst, rec, removed) if overlaps(rec, removed) else link_shard(src, dst, rec)
        if done is not None:
            out.append(done)
    return out


def _heads_config(cur: Path) -> dict[str, Any] | None:
    path = cur / HEADS_DIR / HEADS_FILE
    if not path.is_file():
        return None
    config = read_json_object(path, "rebuild the index with --overwrite").get("config")
    return dict(config) if isinstance(config, dict) else None


def update_index(
    atlas: str | Path,
    index: str | Path,
    *,
    device: str | None = None,
    threads: int | None = None,
    chunk_size: int | None = None,
    max_far_fraction: float = DEFAULT_MAX_FAR_FRACTION,
    min_gene_ratio: float = DEFAULT_MIN_GENE_RATIO,
    executor: Executor | None = None,
    progress: Progress = True,
) -> UpdateReport:
    """Bring the index at ``index`` up to date with the atlas store at ``atlas`` (see the module docstring).

    ``device``, ``threads``, ``chunk_size``: where and how the new shards are made (default: as recorded by the
    build); every other setting comes from the build record. ``max_far_fraction``: the drift limit
    (:mod:`index.drift`). Returns what changed; an index already up to date is left as it is.
    """
    from scatlas.atlas.embed import load_embedder
    from scatlas.atlas.store import AtlasStore

    t0 = time.perf_counter()
    root = Path(index)
    if not 0 < max_far_fraction <= 1 or not 0 <= min_gene_ratio <= 1:
        raise InputError(f"max_far_fraction must be in (0, 1] and min_gene_ratio in [0, 1] (got {max_far_fraction}, "
                         f"{min_gene_ratio})")
    _check_index(root)
    with index_lock(root):
        version, cur = current_version(root)
        check_finished(cur)  # an update starts from a finished build
        old = read_manifest(cur)
        build = read_json_object(cur / BUILD_FILE, "rebuild the index with --overwrite")
        if (build.get("identity", {}).get("source") or {}).get("kind") != "atlas":
            raise InputError(f"{root} was built from vectors, not an atlas store: it cannot be updated; rebuild it")
        store = AtlasStore.open(atlas)
        snapshot = store.snapshot()
        changes = store_changes(old.atlas_snapshot, snapshot)
        if another_store(old.atlas_snapshot, snapshot, changes):
            raise InputError(
                f"the atlas store {atlas} is not the one the index at {root} was built from "
                f"({old.atlas_snapshot.get('path')}): it was created separately (a moved or copied store is "
                "accepted). Pass the store the index was built from, or build a new index from this store (`scatlas "
                "build --atlas ATLAS --index NEW_DIR`)"
            )
        report = UpdateReport(str(root), version, changes, n_cells=old.n_cells)
        if changes.empty:
            logger.info("index %s is up to date with %s (version %d)", root, atlas, version)
            return report
        settings = {k: v for k, v in dict(build.get("settings", {})).items() if k in BuildConfig.__dataclass_fields__}
        config = replace(
            BuildConfig(**settings), device=device or settings.get("device", "auto"),
            threads=threads if threads is not None else settings.get("threads"),
            chunk_size=chunk_size or settings.get("chunk_size", BuildConfig.chunk_size),
            exact_rerank=_stores_residuals(old, settings),
        )
        report.warnings += _fit_warnings(root, changes)
        embedder = load_embedder(cur / EMBEDDER_DIR)
        source = StoreVectorSource(store, embedder)
        old_searcher = ShardSearcher(_load_trained(cur / TRAINED_FILE),
                                     [(r, cur / SHARDS_DIR / r.dirname) for r in old.shards])
        if changes.added:
            drift = _measure(source, old, old_searcher, changes, config.seed + 303, max_far_fraction, min_gene_ratio)
            report.drift = drift
            logger.info("drift of the added cells: %s", drift.sentence())
            if drift.too_far:
                far = drift.far_fraction > drift.max_far_fraction
                if not far:  # its cells have (almost) none of the genes: where they fall says nothing
                    raise InputError(
                        "the added data lacks most of the genes the index's embedder reads (a gene panel, highly "
                        f"variable genes only, or gene names the store does not match): {drift.genes_sentence()}; "
                        "where its cells fall says nothing then. If its genes are named another way "
                        "(Ensembl ids against symbols), remove the dataset (`scatlas remove`) and ingest it again with "
                        "the names the store uses; to index it as it is, rebuild (`scatlas build --overwrite ...`, "
                        "fitted on the genes all datasets share) or relax --min-gene-ratio"
                    )
                raise InputError(
                    "the added data is too far from what the index's embedder and quantizer were fitted on: "
                    f"{drift.sentence()}. Rebuild the index (`scatlas build --overwrite ...`) to fit them anew, or "
                    "relax --max-far-fraction if these cells belong in this index as it is"
                )
        new_version = version + 1
        record = {"base_version": version, "base_build_id": manifest_digest(cur),
                  "store": _snapshot_digest(snapshot)}
        target = _prepare_target(root, new_version, record)
        for name in (TRAINED_FILE, BUILD_FILE):
            link_file(cur / name, target / name)
        link_tree(cur / EMBEDDER_DIR, target / EMBEDDER_DIR)
        removed = [(d.start, d.stop) for d in changes.removed]
        shards = _carry_shards(cur, target, old, removed)
        next_no = max([r.no for r in old.shards] + [-1]) + 1
        specs = [ShardSpec(next_no + s.shard_no, s.start, s.stop, s.n)
                 for s in plan_over_ranges([(d.start, d.stop) for d in changes.added], config.shard_size)]
        trained = old_searcher.trained
        added = _build_shards(source, target, trained, config, resolve_device(config.device), executor, plan=specs)
        shards = sorted(shards + added.records, key=lambda r: r.id_min)
        if not shards:
            raise InputError("the update would leave the index with no cells; remove the index instead")
        cells_path = target / CELLS_DB_FILE
        write_cells_db(cells_path, committed_cells(store), expect=sum(r.n for r in shards))
        searcher = ShardSearcher(trained, [(r, target / SHARDS_DIR / r.dirname) for r in shards])
        recall = tune_and_measure(searcher, k=old.recall.k, n_queries=config.eval_queries, seed=config.seed + 101,
                                  target=config.target_recall, nprobe=old.search.nprobe, rerank=old.search.rerank)
        if recall.recall < config.target_recall and not old.exact:
            logger.info("recall %.3f is below the target %.3f: re-tuning nprobe / rerank", recall.recall,
                        config.target_recall)
            recall = tune_and_measure(searcher, k=old.recall.k, n_queries=config.eval_queries,
                                      seed=config.seed + 101, target=config.target_recall)
        calibration = calibrate(searcher, k=old.calibration.k, n_cells=config.calibration_cells,
                                seed=config.seed + 202, nprobe=recall.nprobe, rerank=recall.rerank)
        entry = {"version": new_version, "finished": _now(), "seconds": round(time.perf_counter() - t0, 2),
                 **changes.to_json(), "drift": None if report.drift is None else report.drift.to_json(),
                 "recall": recall.recall, "shards_added": len(added.records), "cells_embedded": added.added,
                 "warnings": report.warnings}
        manifest = replace(
            old, version=new_version, updates=[*old.updates, entry], atlas_snapshot=snapshot,
            gene_vocabulary_hash=store.genes.fingerprint(), n_cells=sum(r.n for r in shards), shards=shards,
            cells_db=file_record(cells_path), versions=_versions(), recall=recall, calibration=calibration,
            search=replace(old.search, nprobe=recall.nprobe, rerank=recall.rerank),
            files=small_file_records(target), heads_files=None, labels_files=None, refmap_files=None,
        )
        manifest.write(target)
        same_cells = not changes.added and not changes.removed  # relabelled only: the same cells and vectors
        report.warnings += _refresh_after_build(cur, target, store, config.seed, progress, same_cells)
        commit_version(root, new_version)
        remove_superseded(root, new_version)
    report.version, report.n_cells, report.recall = new_version, manifest.n_cells, recall.recall
    report.seconds = round(time.perf_counter() - t0, 2)
    logger.info("updated %s to version %d in %.1f s", root, new_version, report.seconds)
    return report


def _fit_warnings(root: Path, changes: StoreChanges) -> list[str]:
    """A warning when datasets the embedder was fitted on (those of the first build) are removed."""
    try:
        first = read_manifest(root).atlas_snapshot
    except IndexFormatError:
        return []
    fitted = {str(d.get("dataset_id")) for d in first.get("datasets", [])}
    gone = [d.dataset_id for d in changes.removed if d.dataset_id in fitted]
    if not gone:
        return []
    text = (f"{len(gone)} removed dataset(s) were among those the embedder was fitted on; the embedder stays as "
            "it is (rebuild with --overwrite to fit it on the datasets the atlas holds now)")
    logger.warning(text)
    return [text]


def _refresh_after_build(cur: Path, target: Path, store: Any, seed: int, progress: Progress, same_cells: bool = False
                         ) -> list[str]:
    """Label classes, label heads (with the settings of the previous version's) and the mapping calibration of the
    new version, for each the previous version had; the warnings (classes renamed)."""
    config = _heads_config(cur)
    keys = list(config.get("label_keys", [])) if config else []
    try:
        before = load_label_classes(cur)
    except IndexFormatError:
        before = {}
    warnings = _renamed_classes(before, ensure_label_classes(target, _class_keys(target, keys), previous=before))
    if config and keys:
        options = {k: config[k] for k in ("max_cells_per_label", "max_cells", "c_genes", "c_embedding") if k in config}
        try:
            train_label_heads(store, target, keys, seed=int(config.get("seed", seed)), progress=progress, **options)
        except NoLabelsError as exc:
            raise NoLabelsError(
                f"{exc}. The index has label heads for {', '.join(map(repr, keys))}, which an update retrains, but "
                "the atlas no longer holds such labels (their datasets were removed?): re-ingest labelled data, or "
                "rebuild the index without heads (`scatlas build --atlas ATLAS --index INDEX --overwrite "
                "--no-label-heads`); annotate then votes by neighbours"
            ) from None
    if (cur / MAPPING_FILE).exists() and not (target / MAPPING_FILE).exists():
        try:
            calibrate_mapping(target, seed=seed, progress=progress)
        except TooFewCellsError as exc:
            logger.warning("%s: annotate will not judge how queries map onto it", exc)
    if read_manifest(cur).refmap_files:  # the previous version had a reference map: fit the new one like it
        ensure_reference_map(target, seed=seed, like=cur, same_cells=same_cells)
    return warnings


def _renamed_classes(before: dict[str, LabelClasses], after: dict[str, LabelClasses]) -> list[str]:
    """Warnings naming the classes whose name changed between versions (a class merging several values takes the
    name of its most frequent one, so added cells can rename it): per key, old -> new for the values of both."""
    from scatlas.atlas.validate import escaped

    out = []
    for key in sorted(set(before) & set(after)):
        old, new = before[key].value_class, after[key].value_class
        pairs = sorted({(old[v], new[v]) for v in set(old) & set(new) if old[v] != new[v]})
        if pairs:
            shown = ", ".join(f"{escaped(a, 40)} -> {escaped(b, 40)}" for a, b in pairs[:10])
            more = f" and {len(pairs) - 10} more" if len(pairs) > 10 else ""
            out.append(f"label classes of {escaped(key, 40)} renamed by this update (a class merging several values "
                       f"is named by its most frequent value): {shown}{more}; annotations now use the new names")
    for text in out:
        logger.warning("%s", text)
    return out


def _stores_residuals(old: IndexManifest, settings: dict[str, Any]) -> bool:
    """Whether the update's new shards store rounding residuals: as the index's shards do (an index built before
    residuals existed has none, whatever today's default), else as its build settings say."""
    if old.shards:
        return residuals_state(old.shards) != "none"
    return bool(settings.get("exact_rerank", True))


__all__ = ["UpdateReport", "update_index"]
