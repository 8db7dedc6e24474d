"""Glue between the atlas store and the index: embed the store's cells as a :class:`VectorSource`, and
:func:`build_index`, which fits the embedder on a sample, saves it with the index, and builds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scatlas.atlas.atomic import read_json_object
from scatlas.atlas.errors import InputError, TooFewCellsError
from scatlas.atlas.outputs import INDEX, check_output_dir, missing_dirs, remove_created, writing
from scatlas.atlas.sql import quote_ident
from scatlas.index.build import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SHARD_SIZE,
    BuildConfig,
    _prepare_dir,
    build_from_source,
    different_build_error,
)
from scatlas.index.changes import store_changes
from scatlas.index.embedding import obs_columns, obsm_keys, reads_x
from scatlas.index.heads_training import label_column_classes, label_columns, train_label_heads
from scatlas.index.label_classes import CELL_TYPE_KEY, ensure_label_classes
from scatlas.index.locking import index_lock
from scatlas.index.manifest import (
    BUILD_FILE,
    CELLS_DB_FILE,
    EMBEDDER_DIR,
    MANIFEST_FILE,
    IndexManifest,
    read_manifest,
)
from scatlas.index.mapping import MAPPING_FILE, calibrate_mapping
from scatlas.index.metadata import CellsFile, columns_of, connect
from scatlas.index.progress import Progress
from scatlas.index.refmap import ensure_reference_map
from scatlas.index.source import ShardSpec, plan_over_ranges
from scatlas.index.unfinished import mark_finished, mark_unfinished, unfinished_step
from scatlas.index.versions import current_version, refuse_version_dir

if TYPE_CHECKING:
    from scatlas.atlas.embed.base import Embedder
    from scatlas.index.executor import Executor

logger = logging.getLogger(__name__)

DEFAULT_FIT_SAMPLE = 50_000
DEFAULT_LABEL_KEY = CELL_TYPE_KEY
"""The label column that gets label heads (and label classes) by default, when the atlas has it."""
LABEL_KEYS_DEFAULT = "default"
"""``label_keys`` value (or entry of a sequence): :data:`DEFAULT_LABEL_KEY` when it looks like a label column."""
LABEL_KEYS_ALL = ("all", "auto")
"""``label_keys`` values: every column that looks like a label (``auto``: the former name of ``all``)."""


SNAPSHOT_NOT_IDENTITY = ("path", "store_id")
"""What of a store's snapshot is not part of a build's identity: the store may move (its path), and indexes built
before snapshots recorded ``store_id`` must still resume."""


class StoreVectorSource:
    """The cells of an :class:`atlas.store.AtlasStore` embedded by ``embedder``; ids are ``soma_joinid``."""

    def __init__(self, store: Any, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder
        self._with_x = reads_x(embedder)
        self._obsm = obsm_keys(embedder)
        self._obs = obs_columns(embedder)

    @property
    def n_cells(self) -> int:
        return int(self.store.n_cells)

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def shard_plan(self, shard_size: int) -> list[ShardSpec]:
        return plan_over_ranges([(int(s), int(e)) for _ds, s, e in self.store.cell_ranges()], shard_size)

    def iter_vectors(self, spec: ShardSpec, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        chunks = self.store.iter_chunks(
            start=spec.start, stop=spec.stop, chunk_size=chunk_size, with_X=self._with_x, obsm_keys=self._obsm,
            obs_columns=self._obs,
        )
        for chunk in chunks:
            yield np.asarray(chunk.ids, dtype=np.int64), self.embedder.transform(chunk)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return self.vectors_of(np.asarray(self.store.sample_ids(n, seed=seed), dtype=np.int64))

    def vectors_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of the given cells (sorted, unique, committed ids), embedded chunk by chunk."""
        parts_ids, parts_vecs = [], []
        for chunk in self.store.read_cells(ids, with_X=self._with_x, obsm_keys=self._obsm, obs_columns=self._obs):
            parts_ids.append(np.asarray(chunk.ids, dtype=np.int64))
            parts_vecs.append(self.embedder.transform(chunk))
        if not parts_ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts_ids), np.concatenate(parts_vecs).astype(np.float32, copy=False)

    @property
    def accelerated(self) -> bool:
        """The embedder runs a model that wants a GPU (and was not pinned to the CPU)."""
        return bool(self.embedder.accelerated) and getattr(self.embedder, "device", "auto") != "cpu"

    def on_device(self, device: str) -> StoreVectorSource:
        """This source with its embedder on ``device`` (each GPU of a multi-GPU build embeds its own shards)."""
        embedder = self.embedder.on_device(device)
        return self if embedder is self.embedder else StoreVectorSource(self.store, embedder)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a Ray worker) as "reopen the store at its path": open handles do not travel."""
        return (_reopen_store_source, (str(self.store.path), self.embedder))

    def describe(self) -> dict[str, Any]:
        snap = {k: v for k, v in self.store.snapshot().items() if k not in SNAPSHOT_NOT_IDENTITY}
        return {"kind": "atlas", "n_cells": self.n_cells, "dim": self.dim, "snapshot": snap}


def _reopen_store_source(path: str, embedder: Embedder) -> StoreVectorSource:
    from scatlas.atlas.store import AtlasStore

    return StoreVectorSource(AtlasStore.open(path), embedder)


def _fit_embedder(store: Any, spec: str, fit_sample: int, seed: int, options: dict[str, Any]) -> Embedder:
    from scatlas.atlas.embed import make_embedder

    embedder = make_embedder(spec, **options)
    if embedder.requires_fit:
        ids = store.sample_ids(fit_sample, seed=seed)
        with_x, obsm, obs = reads_x(embedder), obsm_keys(embedder), obs_columns(embedder)
        logger.info("fitting embedder %s on %d sampled cells", spec, len(ids))
        # A zero-argument callable: fitting may take several passes over the sample (PCA takes two).
        embedder.fit(lambda: store.read_cells(ids, with_X=with_x, obsm_keys=obsm, obs_columns=obs))  # type: ignore[arg-type]
    return embedder


def _resumable_embedder(out: Path, identity: dict[str, Any]) -> Embedder | None:
    """The embedder saved by an interrupted build with the same embedder arguments, if any."""
    from scatlas.atlas.embed import load_embedder

    build, saved = out / BUILD_FILE, out / EMBEDDER_DIR / "embedder.json"
    if not build.is_file():
        return None
    try:
        old = json.loads(build.read_text()).get("identity", {})
    except ValueError:
        return None  # build_from_source reports the unreadable record
    if any(old.get(k) != v for k, v in identity.items()):  # refused before fitting, which takes minutes
        raise different_build_error(out, {k: old.get(k) for k in identity}, identity)
    if not saved.is_file():
        return None
    logger.info("resume: reusing the embedder saved in %s", saved.parent)
    return load_embedder(saved.parent)


def committed_cells(store: Any) -> CellsFile:
    """The store's cell metadata restricted to its committed datasets' id ranges (what an index may copy).

    Rows an ingest is still writing, or one that was interrupted left behind, lie outside these ranges.
    """
    ranges = tuple((int(start), int(stop)) for _ds, start, stop in store.cell_ranges())
    return CellsFile(Path(store.cells_db_path), ranges)


def _resolve_label_keys(store: Any, label_keys: Sequence[str] | str) -> tuple[str, ...]:
    """The label columns to train heads for: ``"all"`` (or ``"auto"``): every column that looks like a label;
    ``"default"``: ``cell_type`` when it looks like one; a sequence: those columns, a ``"default"`` entry standing
    for ``cell_type`` when it looks like one."""
    wanted = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    if not any(k in LABEL_KEYS_ALL or k == LABEL_KEYS_DEFAULT for k in wanted):
        return tuple(dict.fromkeys(wanted))
    con = store.connect()
    try:
        labels = label_column_classes(con) if LABEL_KEYS_DEFAULT in wanted else {}
        every = label_columns(con) if any(k in LABEL_KEYS_ALL for k in wanted) else []
    finally:
        con.close()
    keys: list[str] = []
    for k in wanted:
        if k in LABEL_KEYS_ALL:
            keys += every
        elif k == LABEL_KEYS_DEFAULT:
            keys += [DEFAULT_LABEL_KEY] if DEFAULT_LABEL_KEY in labels else []
        else:
            keys.append(k)
    keys = list(dict.fromkeys(keys))
    logger.info("label heads for %s", ", ".join(keys) if keys else "no column (none looks like a label)")
    return tuple(keys)


def _class_keys(out: Path, head_keys: Sequence[str]) -> list[str]:
    """The columns to compute label classes for: those with heads, and ``cell_type`` when it has values."""
    con = connect(out / CELLS_DB_FILE)
    try:
        has_default = DEFAULT_LABEL_KEY in columns_of(con) and con.execute(
            f"SELECT count({quote_ident(DEFAULT_LABEL_KEY)}) FROM cells"
        ).fetchall()[0][0]
    finally:
        con.close()
    return list(dict.fromkeys([*([DEFAULT_LABEL_KEY] if has_default else []), *head_keys]))


def _updated_manifest(out: Path, current: Path, store: Any, identity: dict[str, Any]) -> IndexManifest:
    """The manifest of an index that ``build --update`` brought to a later version, when the build's arguments and
    the store still match it; InputError saying what changed and what to do otherwise."""
    old = read_json_object(current / BUILD_FILE, "rebuild the index with --overwrite").get("identity", {})
    if any(old.get(k) != v for k, v in identity.items()):
        raise different_build_error(out, {k: old.get(k) for k in identity}, identity)
    manifest = read_manifest(current)
    changes = store_changes(manifest.atlas_snapshot, store.snapshot())
    if not changes.empty:
        raise InputError(
            f"{out} (version {manifest.version}) is behind its atlas store: {'; '.join(changes.sentences())}. Run "
            "`scatlas build --update --atlas ATLAS --index DIR` to bring it up to date, or pass --overwrite to "
            "rebuild it from scratch."
        )
    logger.info("index at %s (version %d) is up to date with its atlas store", out, manifest.version)
    return manifest


def build_index(
    atlas: str | Path,
    out: str | Path,
    *,
    embedder: str = "pca",
    shard_size: int = DEFAULT_SHARD_SIZE,
    factory: str = "auto",
    device: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fit_sample: int = DEFAULT_FIT_SAMPLE,
    overwrite: bool = False,
    seed: int = 0,
    threads: int | None = None,
    embedder_options: dict[str, Any] | None = None,
    config: BuildConfig | None = None,
    executor: Executor | None = None,
    label_keys: Sequence[str] | str = LABEL_KEYS_DEFAULT,
    heads_options: dict[str, Any] | None = None,
    progress: Progress = True,
    reference_map: bool = True,
    exact_rerank: bool = True,
) -> IndexManifest:
    """Build (or resume) the index of an atlas store at ``out`` and return its manifest.

    The embedder (``pca``, ``precomputed:KEY``, ``uce``) is fitted on ``fit_sample`` cells sampled across
    datasets when it needs fitting, saved into ``out/embedder/``, and recorded in the manifest. ``config``
    overrides every build setting at once (shard_size, factory, ... are then ignored). ``executor``: where the shard
    tasks run (:mod:`index.executor`; default: this process). ``label_keys``: cell-table columns to train
    supervised label heads for once the index is complete (:func:`index.heads_training.train_label_heads`, with
    ``heads_options``); they are kept when already trained with the same settings for this build. ``"default"``:
    ``cell_type`` when the atlas has it as a label column; ``"all"`` (or ``"auto"``): every text column of the
    cell table that looks like an annotation (:func:`index.heads_training.label_columns`: 2 to 1,000 distinct
    values, e.g. cell_type, tissue, disease); a sequence: those columns (an entry ``"default"`` adds cell_type as
    ``"default"`` does); ``()``: none. Label classes (:mod:`index.label_classes`: values merged by Cell Ontology
    term; the heads are trained on them) are stored for every column with heads and for ``cell_type``.
    ``reference_map``: fit the 2-D reference map (:mod:`index.refmap`: a UMAP of 20,000 sampled cells; skipped for
    an atlas under 50 cells), unless one was fitted for this build already. ``exact_rerank``: store each vector's
    float16 rounding error next to it (2 bytes a dimension a cell, read by re-ranking alone) so that re-ranking
    picks the top k of the float32 vectors (:mod:`index.rerank`).
    """
    from scatlas.atlas.store import AtlasStore

    if fit_sample < 1:
        raise InputError(f"fit_sample must be >= 1 (got {fit_sample})")
    out = Path(out)
    store = AtlasStore.open(atlas)
    config = config or BuildConfig(
        factory=factory, shard_size=shard_size, chunk_size=chunk_size, device=device, threads=threads, seed=seed,
        exact_rerank=exact_rerank,
    )
    options = dict(embedder_options or {})
    identity = {"embedder": embedder, "fit_sample": fit_sample, "embedder_options": options}
    refuse_version_dir(out)
    _refuse_half_swapped(out)
    check_output_dir(out, INDEX, inputs=(atlas,), replace=overwrite)  # before anything is created
    created = missing_dirs(out)
    with index_lock(out):  # one writer at a time: an --overwrite must not delete an index being built or updated
        if overwrite and (out / MANIFEST_FILE).is_file() and not out.is_symlink():
            # a usable index is replaced only once its successor is complete: built beside it, then swapped in
            for old in _replaced(out):  # left by a swap killed before its last step: the index it replaced
                shutil.rmtree(old, ignore_errors=True)
            staging = out.with_name(f".{out.name}.rebuild")
            check_output_dir(staging, INDEX, inputs=(atlas,), replace=True)  # an interrupted one's: started anew
            staged = missing_dirs(staging)
            _prepare_dir(staging, True, inputs=(atlas,))
            try:
                manifest = _build_locked(store, staging, embedder, config, options, identity, staged, executor,
                                         label_keys, heads_options, progress, reference_map)
            except BaseException:  # a rebuild starts anew, so what it left is no use: its space back
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _swap_in(staging, out)
            return manifest
        _prepare_dir(out, overwrite, inputs=(atlas,))
        return _build_locked(store, out, embedder, config, options, identity, created, executor, label_keys,
                             heads_options, progress, reference_map)


def _replaced(out: Path) -> list[Path]:
    """The indexes a ``build --overwrite`` of ``out`` replaced and had not yet deleted (``.NAME.replaced-PID``)."""
    prefix = f".{out.name}.replaced-"
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir()
            if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and (p / MANIFEST_FILE).is_file()]


def _refuse_half_swapped(out: Path) -> None:
    """InputError when ``out`` is missing while the index it held waits beside it: a ``build --overwrite`` was
    killed between its two renames (an instant), and building anew would leave the old index there unseen."""
    left = _replaced(out) if not out.exists() else []
    if left:
        raise InputError(
            f"{out} is missing, and the index it held is at {left[0]}: a `build --overwrite` was stopped "
            f"while swapping the new index in. Rename that directory to {out.name} to keep the old index (then "
            "rerun the build with --overwrite), or delete it"
        )


def _swap_in(staging: Path, out: Path) -> None:
    """Put the complete index built at ``staging`` in the place of the one at ``out`` (two renames: ``out`` is
    missing for an instant, never half-written), then delete the old one."""
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    with writing(out):
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(old, out)  # the old index stays where it was; the new one stays at staging
            raise
    logger.info("overwrite: the index at %s was replaced by the one built at %s", out, staging)
    shutil.rmtree(old, ignore_errors=True)


def _build_locked(store: Any, out: Path, embedder: str, config: BuildConfig, options: dict[str, Any],
                  identity: dict[str, Any], created: list[Path], executor: Executor | None,
                  label_keys: Sequence[str] | str, heads_options: dict[str, Any] | None, progress: Progress,
                  reference_map: bool) -> IndexManifest:
    """:func:`build_index` once it holds the index's lock."""
    version, current = current_version(out)
    if version > 1:  # updated since it was built: the build's arguments and the store must match the current version
        return _updated_manifest(out, current, store, identity)
    try:
        emb = _resumable_embedder(out, identity) or _fit_embedder(store, embedder, identity["fit_sample"], config.seed, options)
    except BaseException:  # failed or interrupted before any work a rerun could resume from
        remove_created(out, created)
        raise
    # A finished index that is built again (resumed, or given new label keys) is not marked: a refused rerun must not
    # leave it unfinished, and each of its later steps replaces its files atomically.
    finished_before = (out / MANIFEST_FILE).is_file() and unfinished_step(out) is None

    def step(what: str) -> None:
        if not finished_before:
            mark_unfinished(out, what)

    if unfinished_step(out) is None:  # an unfinished build keeps its record until this one is known to resume it
        step("embedding the cells into shards")
    manifest = build_from_source(
        StoreVectorSource(store, emb),
        out,
        config,
        cells=committed_cells(store),
        embedder=emb,
        snapshot=store.snapshot(),
        gene_vocabulary_hash=store.genes.fingerprint(),
        extra_identity=identity,
        executor=executor,
    )
    keys = _resolve_label_keys(store, label_keys)
    step("storing label classes")
    ensure_label_classes(out, _class_keys(out, keys))
    if keys:
        step("training label heads")
        train_label_heads(
            store, out, keys, seed=config.seed, progress=progress, **dict(heads_options or {})
        )
    if not (out / MAPPING_FILE).exists():  # how atlas data maps when held out: judges queries (query.mapping)
        step("calibrating the mapping check")
        try:
            calibrate_mapping(out, seed=config.seed, progress=progress)
        except TooFewCellsError as exc:  # a tiny atlas is still an index; annotate reports "uncalibrated"
            logger.warning("%s: annotate will not judge how queries map onto it", exc)
    if reference_map:  # the atlas in 2-D (index.refmap), on which annotate and search place queries
        step("fitting the reference map")
        ensure_reference_map(out, seed=config.seed)
    mark_finished(out)
    return manifest
