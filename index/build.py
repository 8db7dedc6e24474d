"""Building an index directory from any :class:`~index.source.VectorSource`: train once, write shards, resume.

Order of work (each step is skipped when a previous run of the same build completed it):
``build.json`` (the arguments) -> ``trained.faiss`` -> ``embedder/`` -> ``shards/NNNN`` one by one ->
``cells.duckdb`` -> recall and calibration on atlas cells -> ``manifest.json`` (last, atomic).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scatlas.atlas.errors import DependencyError, IndexFormatError, InputError, TaskError
from scatlas.atlas.outputs import INDEX, check_output_dir, claim_output_dir, writing
from scatlas.index._faiss import faiss_module
from scatlas.index.changes import identity_changes
from scatlas.index.device import Device, faiss_gpu_count, resolve_device, set_faiss_threads, torch_gpu_count
from scatlas.index.evaluate import TARGET_RECALL, calibrate, tune_and_measure
from scatlas.index.executor import Executor, LocalExecutor, Task, TaskContext, local_devices
from scatlas.index.factory import Assigner, default_train_sample, is_exact, resolve_factory, train_index
from scatlas.index.locking import LOCK_FILE
from scatlas.index.manifest import (
    BUILD_FILE,
    CELLS_DB_FILE,
    DEFAULT_K,
    EMBEDDER_DIR,
    FORMAT_VERSION,
    MANIFEST_FILE,
    METRIC,
    PROGRESS_FILE,
    SHARD_IDS_FILE,
    SHARDS_DIR,
    TRAINED_FILE,
    EmbedderInfo,
    IndexManifest,
    SearchDefaults,
    ShardRecord,
    read_manifest,
    residuals_state,
    shard_dirname,
    write_json_atomic,
)
from scatlas.index.metadata import CellsInput, write_cells_db
from scatlas.index.progress import progress_bar
from scatlas.index.searcher import ShardSearcher
from scatlas.index.shard import clean_tmp, file_record, read_done, verify_shard, write_shard
from scatlas.index.source import ShardSpec, VectorSource
from scatlas.index.unfinished import BUILDING_FILE, unfinished_step
from scatlas.index.vectors import as_stored
from scatlas.index.verify import small_file_records
from scatlas.index.versions import refuse_version_dir

if TYPE_CHECKING:
    from scatlas.atlas.embed.base import Embedder

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1_000_000
DEFAULT_CHUNK_SIZE = 20_000


@dataclass(frozen=True)
class BuildConfig:
    """Arguments of a build. Those in :meth:`identity` must match for a rerun to resume a directory."""

    factory: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    train_sample: int | None = None  # None: enough for the factory (see factory.default_train_sample)
    device: str = "auto"
    threads: int | None = None  # FAISS threads; None: $SCATLAS_THREADS or all cores
    seed: int = 0
    k: int = DEFAULT_K
    eval_queries: int = 1000
    calibration_cells: int = 5000
    target_recall: float = TARGET_RECALL
    nprobe: int | None = None  # fixed default nprobe instead of tuning it
    rerank: int | None = None  # fixed default re-rank candidates instead of tuning it
    exact_rerank: bool = True  # store the vectors' float16 rounding errors: re-ranking picks the exact top k

    def __post_init__(self) -> None:
        for name in ("shard_size", "chunk_size", "k", "eval_queries", "calibration_cells"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1 (got {getattr(self, name)})")

    def identity(self) -> dict[str, Any]:
        """What determines the files: a rerun with other values here cannot resume."""
        identity = {"factory": self.factory, "shard_size": self.shard_size, "train_sample": self.train_sample,
                    "seed": self.seed}
        if not self.exact_rerank:  # only then: builds before the residuals existed resume as builds with them
            identity["exact_rerank"] = False
        return identity


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("faiss-cpu", "faiss-gpu", "numpy", "torch", "duckdb", "scatlas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    faiss = faiss_module()

    out["faiss"] = str(faiss.__version__)
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _prepare_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Create ``out``, or accept it empty or holding an index (its entries removed first with ``overwrite``, all but
    the lock file a build holds: :mod:`index.locking`); refuse anything else, and an ``out`` that is, holds or lies
    inside one of ``inputs`` (:class:`~atlas.outputs.OutputError`)."""
    refuse_version_dir(out)
    check_output_dir(out, INDEX, inputs=inputs, replace=overwrite)
    with writing(out):
        old = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
        if overwrite and old:
            logger.info("overwrite: removing the existing index at %s", out)
            for path in old:  # the lock file stays: the build holding it keeps out every other writer
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    claim_output_dir(out, INDEX)


def _clean_partials(out: Path) -> None:
    """Remove temporary files and directories left by an interrupted build (``.NAME.PID.tmp``)."""
    for path in out.glob(".*.tmp*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _check_build_record(out: Path, record: dict[str, Any]) -> bool:
    """Compare with an existing build.json; return True when resuming. Raises on mismatch."""
    path = out / BUILD_FILE
    if not path.exists():
        if any(p.name not in (SHARDS_DIR, BUILDING_FILE, LOCK_FILE) for p in out.iterdir()):
            raise InputError(
                f"{out} is not empty and holds no scatlas build; choose an empty or new directory "
                "(or pass overwrite=True / --overwrite to replace an index there)"
            )
        return False
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise IndexFormatError(f"{path} is unreadable ({exc}); rebuild with --overwrite") from exc
    old_identity = old.get("identity", {}) if isinstance(old, dict) else {}
    if old_identity != record["identity"]:
        raise different_build_error(out, old_identity, record["identity"])
    return True


def different_build_error(out: Path, old: dict[str, Any], new: dict[str, Any]) -> InputError:
    """The refusal of a build into ``out``, which holds a build of other arguments (``build.json`` identities
    ``old`` and ``new``): what changed, in words, and what to do."""
    changes = identity_changes(old, new)
    only_data = set(k for k in set(old) | set(new) if old.get(k) != new.get(k)) == {"source"}
    unfinished = not (out / MANIFEST_FILE).is_file() or unfinished_step(out) is not None
    if only_data and unfinished:  # an unfinished build (shards and all, or not): there is no index to update yet
        return InputError(
            f"{out} holds an unfinished build of the atlas as it was before it changed ({'; '.join(changes)}): it "
            "cannot be resumed or updated. Pass --overwrite to build it from scratch."
        )
    todo = (
        "Run `scatlas build --update --atlas ATLAS --index DIR` to bring the index up to date without re-embedding "
        "it, or pass --overwrite to rebuild it from scratch."
        if only_data else
        "Use a new index directory, rerun with the original arguments to resume (or to --update it), or pass "
        "--overwrite to rebuild from scratch."
    )
    what = "of the atlas as it was before it changed" if only_data else "with other arguments"
    return InputError(f"{out} holds an index built {what}: {'; '.join(changes)}. {todo}")


def _train(out: Path, source: VectorSource, factory: str, config: BuildConfig, device: Device) -> tuple[Any, float]:
    faiss = faiss_module()

    path = out / TRAINED_FILE
    if path.exists():
        logger.info("resume: reusing %s", path)
        try:
            return faiss.read_index(str(path)), 0.0
        except RuntimeError as exc:
            raise IndexFormatError(f"{path} is unreadable ({exc}); rebuild with --overwrite") from exc
    t0 = time.perf_counter()
    n_train = config.train_sample if config.train_sample is not None else default_train_sample(factory, source.n_cells)
    n_train = min(n_train, source.n_cells)
    sample = np.zeros((0, source.dim), dtype=np.float32)
    if n_train:
        _, raw = source.sample(n_train, config.seed)
        sample = as_stored(raw, rounded=False)[1]  # the normalised vectors FAISS encodes, not their float16
    trained = train_index(factory, source.dim, sample, seed=config.seed, device=device)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(trained, str(tmp))
    os.replace(tmp, path)
    return trained, time.perf_counter() - t0


def _save_embedder(out: Path, embedder: Embedder) -> None:
    target = out / EMBEDDER_DIR
    meta = target / "embedder.json"
    if meta.exists():
        saved = json.loads(meta.read_text()).get("fingerprint")
        if saved == embedder.fingerprint():
            return
        raise InputError(
            f"{target} holds embedder {saved}, not {embedder.fingerprint()}; use a new directory or --overwrite"
        )
    tmp = out / f".{EMBEDDER_DIR}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    embedder.save(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)



_TRAINED_CACHE: dict[tuple[str, int, int], Any] = {}
"""Trained indexes by (path, size, mtime): a worker process (Ray reuses them) reads ``trained.faiss`` once."""


def _trained_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _load_trained(path: Path) -> Any:
    key = _trained_key(path)
    if key not in _TRAINED_CACHE:
        try:
            _TRAINED_CACHE[key] = faiss_module().read_index(str(path))
        except RuntimeError as exc:
            raise IndexFormatError(f"{path} is unreadable ({exc}); rebuild with --overwrite") from exc
    return _TRAINED_CACHE[key]


def build_shard(
    source: VectorSource, spec: ShardSpec, shards_dir: Path, trained_path: Path, chunk_size: int, faiss_device: Device,
    residuals: bool = True, *, ctx: TaskContext,
) -> ShardRecord:
    """The build's unit of work: embed shard ``spec`` of ``source`` and write ``shards_dir/NNNN`` (atomically).

    Runs wherever the executor puts it: ``ctx`` says on which device and with how many threads. FAISS uses the
    task's GPU when ``faiss_device`` is ``cuda``; a model embedder uses it whenever the task has one.
    """
    t0 = time.perf_counter()
    if ctx.threads:
        set_faiss_threads(ctx.threads)
    trained = _load_trained(trained_path)
    on_device = getattr(source, "on_device", None)
    if ctx.device == "cuda" and on_device is not None:  # a model embedder uses the task's GPU (one per GPU locally)
        source = on_device(ctx.torch_device)
    if faiss_device == "cuda" and ctx.device != "cuda":
        raise TaskError(f"shard {spec.shard_no}: FAISS should run on a GPU but the task was given none")
    assigner = Assigner(trained, faiss_device, ctx.gpu or 0)
    rec = write_shard(source, spec, shards_dir, trained, assigner, chunk_size, on_chunk=ctx.progress, residuals=residuals)
    logger.debug("shard %s: %d cells in %.1f s on %s (%s)", rec.dirname, rec.n, time.perf_counter() - t0,
                 ctx.torch_device, ctx.worker)
    return rec


def _completed_shard(shards_dir: Path, spec: ShardSpec) -> ShardRecord | None:
    """The record of shard ``spec`` when an earlier run completed it intact (checksums verified), else None."""
    sdir = shards_dir / shard_dirname(spec.shard_no)
    if not sdir.exists():
        return None
    try:
        rec = read_done(sdir)
        if rec.n != spec.n:
            raise IndexFormatError(f"shard {sdir} holds {rec.n} cells, the plan says {spec.n}")
        verify_shard(sdir, rec, checksums=True)
        return rec
    except IndexFormatError as exc:
        logger.warning("rebuilding shard %s: %s", sdir.name, exc)
        return None


def _task_device(requested: str, driver_device: Device, executor: Executor) -> Device:
    """Device for shard tasks: the driver's choice locally; on Ray, ``auto`` means GPUs when the cluster has any."""
    if executor.name == "local":
        return driver_device
    req = (requested or "auto").lower()
    if req == "cpu":
        return "cpu"
    gpus = executor.gpu_count()
    if req in ("cuda", "gpu") and gpus == 0:
        raise DependencyError("device 'cuda' was asked for but the Ray cluster has no GPUs; use --device cpu or auto")
    return "cuda" if gpus > 0 else "cpu"


def _local_devices(faiss_device: Device, embed_gpu: bool) -> list[str]:
    """Local task slots: one per GPU when FAISS runs on GPUs, or when a model embedder can use torch's GPUs."""
    if faiss_device == "cuda":
        return local_devices("cuda", faiss_gpu_count())
    if embed_gpu and torch_gpu_count():
        return local_devices("cuda", torch_gpu_count())
    return ["cpu"]


class _Progress:
    """``progress.json``: the driver's record of completed shards (when, where, how long), written atomically."""

    def __init__(self, out: Path, executor: dict[str, Any]) -> None:
        self.path = out / PROGRESS_FILE
        self.state: dict[str, Any] = {"executor": executor, "shards": {}}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
                self.state["shards"] = dict(old.get("shards", {}))
            except ValueError:
                pass

    def record(self, rec: ShardRecord) -> None:
        self.state["shards"][rec.dirname] = {"n": rec.n, "finished": _now()}
        write_json_atomic(self.path, self.state)


def build_from_source(
    source: VectorSource,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    cells: CellsInput | None = None,
    embedder: Embedder | None = None,
    embedder_info: EmbedderInfo | None = None,
    snapshot: dict[str, Any] | None = None,
    gene_vocabulary_hash: str | None = None,
    extra_identity: dict[str, Any] | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> IndexManifest:
    """Build (or resume building) an index directory from ``source``; return its manifest.

    ``cells``: the metadata to copy (DuckDB file with a ``cells`` table, or a pyarrow Table / DataFrame with
    ``soma_joinid``); ``None`` stores only the ids. ``embedder``: saved into ``embedder/`` and recorded;
    ``embedder_info`` describes the vectors when there is no embedder object. ``extra_identity`` joins the
    arguments that must match on resume (e.g. the embedder spec of :func:`index.build_index`). ``executor``: where
    the shard tasks run (default: this process, on every GPU FAISS sees when ``device`` resolves to ``cuda``); the
    files are the same whichever runs them.
    """
    config = config or BuildConfig()
    out = Path(out)
    started, t_start = _now(), time.perf_counter()
    _prepare_dir(out, overwrite)
    if source.n_cells == 0:
        raise InputError("the source has no cells to index")
    embedder_info = _embedder_info(source, embedder, embedder_info)
    identity = {
        **config.identity(),
        "source": source.describe(),
        "embedder_fingerprint": embedder_info.fingerprint,
        **(extra_identity or {}),
    }
    record = {"format_version": FORMAT_VERSION, "identity": identity, "settings": asdict(config), "started": started}
    resuming = _check_build_record(out, record)
    if resuming:
        _clean_partials(out)
    if resuming and (out / MANIFEST_FILE).exists():
        logger.info("index at %s is already complete with these arguments", out)
        return read_manifest(out)
    if not resuming:
        write_json_atomic(out / BUILD_FILE, record)
    device = resolve_device(config.device)
    threads = set_faiss_threads(config.threads)
    factory = resolve_factory(config.factory, source.n_cells, source.dim)
    logger.info(
        "building %s: %d cells x %d dims, factory %s, device %s, %d threads%s",
        out, source.n_cells, source.dim, factory, device, threads, " (resuming)" if resuming else "",
    )
    trained, train_s = _train(out, source, factory, config, device)
    if embedder is not None:
        _save_embedder(out, embedder)
    shards = _build_shards(source, out, trained, config, device, executor)
    _warn_mixed_residuals(shards.records, trained)
    cells_path = out / CELLS_DB_FILE
    if not cells_path.exists():
        ids = None
        if cells is None:
            ids = np.concatenate([np.load(out / SHARDS_DIR / r.dirname / SHARD_IDS_FILE) for r in shards.records])
        write_cells_db(cells_path, cells, ids, expect=sum(r.n for r in shards.records))
    searcher = ShardSearcher(trained, [(r, out / SHARDS_DIR / r.dirname) for r in shards.records])
    t_eval = time.perf_counter()
    recall = tune_and_measure(
        searcher, k=config.k, n_queries=config.eval_queries, seed=config.seed + 101,
        target=config.target_recall, nprobe=config.nprobe, rerank=config.rerank,
    )
    calibration = calibrate(
        searcher, k=config.k, n_cells=config.calibration_cells, seed=config.seed + 202,
        nprobe=recall.nprobe, rerank=recall.rerank,
    )
    build = {
        "started": started,
        "finished": _now(),
        "seconds": round(time.perf_counter() - t_start, 2),
        "train_seconds": round(train_s, 2),
        **shards.record(),
        "eval_seconds": round(time.perf_counter() - t_eval, 2),
        "device": device,
        "threads": threads,
        "config": asdict(config),
    }
    manifest = IndexManifest(
        format_version=FORMAT_VERSION,
        embedder=embedder_info,
        gene_vocabulary_hash=gene_vocabulary_hash,
        atlas_snapshot=dict(snapshot or {}),
        factory=factory,
        metric=METRIC,
        exact=is_exact(trained),
        search=SearchDefaults(k=config.k, nprobe=recall.nprobe, rerank=recall.rerank),
        dim=source.dim,
        n_cells=sum(r.n for r in shards.records),
        shards=shards.records,
        trained=file_record(out / TRAINED_FILE),
        cells_db=file_record(cells_path),
        versions=_versions(),
        build=build,
        recall=recall,
        calibration=calibration,
        files=small_file_records(out),  # build.json, embedder/*: checked at every open
    )
    manifest.write(out)
    logger.info(
        "built index %s: %d cells in %d shards, %s, recall@%d %.3f (nprobe=%s, rerank=%d), %.1f s", out,
        manifest.n_cells, len(shards.records), factory, recall.k, recall.recall, recall.nprobe, recall.rerank,
        build["seconds"],
    )
    return manifest


def _embedder_info(source: VectorSource, embedder: Embedder | None, info: EmbedderInfo | None) -> EmbedderInfo:
    """What the manifest records about the embedder: from ``embedder``, else ``info``, else "none"."""
    if embedder is not None:
        info = EmbedderInfo(embedder.name, embedder.params(), embedder.fingerprint(), embedder.dim)
    if info is None:
        info = EmbedderInfo("none", {}, "", source.dim)
    if info.dim != source.dim:
        raise InputError(f"the embedder makes {info.dim}-d vectors but the source yields {source.dim}-d")
    return info


@dataclass
class _Shards:
    """The shards of a build and how they were made (recorded in the manifest's ``build``)."""

    records: list[ShardRecord]
    add_seconds: float
    added: int
    reused: int
    task_device: Device
    task_gpus: float
    executor: dict[str, Any]

    def record(self) -> dict[str, Any]:
        add_s = self.add_seconds
        return {
            "add_seconds": round(add_s, 2),
            "cells_added": self.added,
            "add_cells_per_second": round(self.added / add_s, 1) if self.added and add_s > 0 else None,
            "shards_reused": self.reused,
            "task_device": self.task_device,
            "task_gpus": self.task_gpus,
            "executor": self.executor,
        }


def _warn_mixed_residuals(records: list[ShardRecord], trained: Any) -> None:
    """Warn when some shards store rounding residuals and others not (a build resumed from one written before they
    existed): re-ranking then settles float16 ties exactly only among the shards that have them."""
    if not is_exact(trained) and residuals_state(records) == "some":
        have = sum(r.has_residuals for r in records)
        logger.warning(
            "%d of %d shards store no rounding residuals (written before they existed): re-ranking settles float16 "
            "ties exactly only among the other shards; rebuild with --overwrite to have them in every shard",
            len(records) - have, len(records),
        )


def _build_shards(
    source: VectorSource, out: Path, trained: Any, config: BuildConfig, device: Device, executor: Executor | None,
    plan: list[ShardSpec] | None = None,
) -> _Shards:
    """Write every shard of ``plan`` (default: all of ``source``, ``source.shard_plan``) not completed by an
    earlier run, as tasks on ``executor``."""
    shards_dir = out / SHARDS_DIR
    shards_dir.mkdir(exist_ok=True)
    clean_tmp(shards_dir)
    if plan is None:
        plan = source.shard_plan(config.shard_size)
    embed_gpu = bool(getattr(source, "accelerated", False))
    executor = executor or LocalExecutor(_local_devices(device, embed_gpu))
    task_device = _task_device(config.device, device, executor)
    task_gpus = 1.0 if task_device == "cuda" or (embed_gpu and executor.gpu_count() > 0) else 0.0
    trained_key = _trained_key(out / TRAINED_FILE)
    _TRAINED_CACHE[trained_key] = trained  # tasks in this process reuse it
    done: dict[int, ShardRecord] = {}
    todo: list[ShardSpec] = []
    for spec in plan:
        rec = _completed_shard(shards_dir, spec)
        if rec is not None:
            done[spec.shard_no] = rec
        else:
            todo.append(spec)
    reused = len(done)
    if reused:
        logger.info("resume: reusing %d of %d completed shards", reused, len(plan))
    progress = _Progress(out, executor.describe())
    tasks = [
        Task(f"shard-{shard_dirname(spec.shard_no)}", build_shard,
             (source, spec, shards_dir, out / TRAINED_FILE, config.chunk_size, task_device, config.exact_rerank),
             gpus=task_gpus,
             cells=spec.n)
        for spec in todo
    ]

    def on_done(task: Task, rec: ShardRecord) -> None:
        done[rec.no] = rec
        progress.record(rec)

    t_add = time.perf_counter()
    with progress_bar(total=sum(spec.n for spec in plan), initial=sum(r.n for r in done.values()), unit="cell",
                      desc="index shards") as bar:
        try:
            executor.run(tasks, on_done, progress=bar.update)
        finally:
            _TRAINED_CACHE.pop(trained_key, None)
    add_s = time.perf_counter() - t_add
    clean_tmp(shards_dir)  # partial shards of tasks that died and were retried elsewhere
    missing = [spec.shard_no for spec in plan if spec.shard_no not in done]
    if missing:
        raise IndexFormatError(f"shards {missing} were not built; rerun the same command to resume")
    return _Shards(
        [done[spec.shard_no] for spec in plan], add_s, sum(spec.n for spec in todo), reused, task_device, task_gpus,
        executor.describe(),
    )
