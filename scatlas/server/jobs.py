"""Jobs: a bounded pool of worker threads, one directory per job under the server's work directory, and their
removal after a retention time.

Why threads (not processes): the index is loaded once and shared read-only (:mod:`scatlas.server.shared`, each
thread with its own DuckDB cursor); the work of a job is NumPy, FAISS, PyTorch and HDF5 calls that release the GIL,
so jobs overlap on the cores; and a process pool would hold one copy of the index per worker. What a thread cannot
have: a job cannot be killed while it runs. Cancelling one (:meth:`JobManager.cancel`) drops it when queued; a
running one stops at its next step (a stage, or a step of the library's progress bars, every chunk of cells:
:mod:`scatlas.atlas.interrupt`), and its directory is removed. Shutting the server down waits for
the running jobs and drops the queued ones.

A job's progress is an estimate: each job moves through stages (e.g. annotate 0.02-0.9, writing 0.9-0.99), and
inside a stage it follows ``1 - exp(-t / expected)``, where ``expected`` is the stage's duration predicted from the
query's cell count and the seconds per cell that earlier jobs of the same kind took (a running mean); 1.0 when done.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import Interrupted, OutputError, ScatlasError
from scatlas.atlas.interrupt import set_interrupt_check
from scatlas.atlas.locks import holding
from scatlas.atlas.outputs import refuse_inside_protected, safe_text

logger = logging.getLogger(__name__)

JOBS_DIR = "jobs"
WORK_MARKER = ".scatlas-serve.json"
"""Marks a server work directory (its content is the server's to remove)."""
WORK_LOCK = ".scatlas-serve.lock"
"""Locked (``flock``) by the server that uses a work directory, for as long as it runs."""
JOB_MARKER = ".scatlas-job"
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
"""What a job id looks like (:func:`secrets.token_urlsafe` of 18 bytes gives 24 characters)."""
STATES = ("queued", "running", "done", "failed", "cancelled")
_SERVER_MATRIX = ("(this server reads counts wherever the file has them, else X: upload a file whose X holds the "
                  "matrix, or run the scatlas command with --x-layer)")
API_HINTS = (
    ("pass --allow-species-mismatch (allow_species_mismatch=True in Python) to go on anyway",
     "this server does not go on with a species mismatch (the scatlas command does, with "
     "--allow-species-mismatch)"),
    ("or lower the threshold with --min-gene-overlap.",
     "or run the scatlas command with a lower --min-gene-overlap (this server keeps the default threshold)."),
    *((hint, _SERVER_MATRIX) for hint in ("(choose one with --x-layer: X, raw or a layer's name)",
                                          "(choose another with --x-layer)")),
)
"""Hints of library messages that name command-line options, and what they say in the server's answers (its forms
have no such fields)."""
INTERNAL_ERROR = "internal error while running the job (the server's log has the details)"

DEFAULT_SECONDS_PER_CELL = {"annotate": 0.004, "search": 0.002, "hunt": 0.004}
"""Seconds per query cell before any job of the kind has finished (measured on a shared 2-core machine)."""
DEFAULT_BASE_SECONDS = {"annotate": 3.0, "search": 2.0, "hunt": 10.0}


class QueueFull(ScatlasError):
    """Too many jobs are queued or running: retry later."""


@dataclass
class Job:
    """A job's state; ``files`` maps the names clients may download to the files in ``directory`` (both fixed by
    the server, never taken from a client)."""

    id: str
    kind: str
    directory: Path
    cells: int = 0
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    upload_name: str = "the uploaded file"
    _stage: tuple[str, float, float, float, float] = ("queued", 0.0, 0.0, 0.0, 1.0)
    _final: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _future: Future[None] | None = None

    def stage(self, name: str, start: float, end: float, expected_s: float) -> None:
        """Enter stage ``name``, which runs the progress from ``start`` to ``end`` in about ``expected_s`` seconds
        (raises :class:`Interrupted` instead once the job is cancelled)."""
        self.check_cancelled()
        self._stage = (name, float(start), float(end), time.monotonic(), max(float(expected_s), 0.1))

    def check_cancelled(self) -> None:
        """Raise :class:`Interrupted` when the job has been cancelled (its work stops at the next step)."""
        if self._cancel.is_set():
            raise Interrupted("the job was cancelled")

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set() and self.status == "running"

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        if self._final is not None:
            return self._final  # where a failed job stopped
        _, start, end, t0, expected = self._stage
        if self.status != "running":
            return start
        elapsed = time.monotonic() - t0
        return round(start + (end - start) * (1.0 - math.exp(-elapsed / expected)), 4)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.id, "kind": self.kind, "status": self.status, "progress": self.progress,
            "stage": "cancelling" if self.cancelling else self._stage[0], "error": self.error, "result": self.result,
            "files": sorted(self.files) if self.status == "done" else [],
            "created": self.created, "started": self.started, "finished": self.finished,
        }


def share_cores(workers: int) -> None:
    """Give this job thread's OpenMP parallel regions (FAISS) its share of the cores: ``cores // workers``.

    OpenMP's thread count is per calling thread, so this leaves other threads as they are. Without it two job
    threads each start a FAISS team as wide as the machine, and the spinning teams oversubscribe the cores (measured
    with scripts/bench_serve.py: two workers then finished fewer small searches per second than one).
    """
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        return
    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def prepare_work_dir(path: Path) -> contextlib.ExitStack:
    """Create the work directory, or take over one a server used before (its job directories are removed: their
    jobs are gone with that server); refuse a directory that holds anything else, or one a running server holds.
    Returns what holds its lock (:data:`WORK_LOCK`): close it when the server stops."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"the work directory {path} is a file; give a directory")
    refuse_inside_protected(path, "a server's work directory")
    if path.is_dir() and any(p.name != WORK_LOCK for p in path.iterdir()) and not (path / WORK_MARKER).is_file():
        raise OutputError(
            f"the work directory {path} holds files the server did not write; give a new or empty directory (the "
            "server removes what it writes there)"
        )
    path.mkdir(parents=True, exist_ok=True)
    lock = contextlib.ExitStack()  # held for the server's life
    lock.enter_context(holding(open(path / WORK_LOCK, "a"), OutputError(  # noqa: SIM115 - closed by holding()
        f"the work directory {path} is in use by another running server; give another --work-dir (or stop that "
        "server)")))
    try:
        jobs = path / JOBS_DIR
        if jobs.is_dir():
            for child in jobs.iterdir():
                if child.is_dir() and (child / JOB_MARKER).is_file():
                    shutil.rmtree(child, ignore_errors=True)
        jobs.mkdir(exist_ok=True, mode=0o700)
        write_json_atomic(path / WORK_MARKER, {"kind": "scatlas serve work directory"})
    except BaseException:
        lock.close()
        raise
    return lock


def hide_paths(value: Any, paths: Mapping[str, str]) -> Any:
    """``value`` (text, or JSON-like lists and dicts of it) with every path of ``paths``, as written or
    HTML-escaped, replaced by what it maps to where it stands as a path: not preceded by a character of a path or
    URL, and followed by the end, ``/`` or a character no path name ends with here (``/data`` in ``/X/data`` or in
    ``https://x.org/data/help`` is left alone); longest paths first."""
    if isinstance(value, str):
        forms = {form: name for path, name in paths.items() for form in {path, html.escape(path)}}
        for path in sorted(forms, key=len, reverse=True):
            value = re.sub(rf"(?<![\w./:~-]){re.escape(path)}(?=$|[/\s'\"),;:&<]|\.(?:\s|$))", forms[path], value)
        return value
    if isinstance(value, dict):
        return {k: hide_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [hide_paths(v, paths) for v in value]
    return value


@functools.lru_cache(maxsize=16)  # it resolves each path: a server asks for the same ones at every report
def server_paths(*paths: Path | None) -> Mapping[str, str]:
    """``paths`` (a served index's directory as given and as opened, its atlas store's) as written and resolved,
    and the root of an index version directory among them, each mapped to its directory's name: what clients are
    told instead."""
    out: dict[str, str] = {}
    for path in paths:
        if path is None:
            continue
        for p in {Path(path), Path(path).resolve()}:
            out[str(p)] = p.name
            if p.parent.name == "versions":  # ROOT/versions/NNNN: the root's path too
                out[str(p.parent.parent)] = p.parent.parent.name
    return MappingProxyType({k: v for k, v in out.items() if len(k) > 1})  # never "/"; read-only: it is shared


MAX_WARNINGS = 20
"""A job's result lists at most this many warnings."""


class _ThreadWarnings(logging.Handler):
    """The WARNING (and worse) records scatlas logs from the thread that made this handler: a job's own warnings,
    the lines the CLI prints, none of another job's running beside it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and len(self.messages) < MAX_WARNINGS:
            message = record.getMessage()[:1000]
            if message not in self.messages:
                self.messages.append(message)


class JobManager:
    """Runs jobs on ``workers`` threads; at most ``max_pending`` queued or running at once (:class:`QueueFull`
    beyond); removes a finished job (its directory and its record) ``retention_s`` seconds after it finished."""

    def __init__(self, work_dir: Path, *, workers: int = 2, retention_s: float = 3600.0, max_pending: int = 32,
                 sweep_every_s: float | None = None, hidden_paths: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.hidden_paths = dict(hidden_paths or {})
        """The server's paths clients are not told (the index's, its atlas store's) -> what messages say instead."""
        self.jobs_dir = self.work_dir / JOBS_DIR
        self.retention_s = float(retention_s)
        self.max_pending = int(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="scatlas-job",
                                        initializer=share_cores, initargs=(int(workers),))
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._rates: dict[str, float] = dict(DEFAULT_SECONDS_PER_CELL)
        self._stop = threading.Event()
        every = sweep_every_s if sweep_every_s is not None else min(60.0, max(self.retention_s / 4, 0.5))
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(every,), name="scatlas-job-cleanup",
                                         daemon=True)
        self._sweeper.start()

    # -- jobs ----------------------------------------------------------------------------------------------------
    def new_job(self, kind: str) -> Job:
        """A new job with its directory (not yet queued: :meth:`submit` queues it, :meth:`discard` drops it)."""
        with self._lock:
            if self._pending() >= self.max_pending:
                raise QueueFull(f"{self.max_pending} jobs are queued or running; retry in a minute")
            job_id = secrets.token_urlsafe(18)
            directory = self.jobs_dir / job_id
            directory.mkdir(mode=0o700)
            (directory / JOB_MARKER).touch()
            job = Job(job_id, kind, directory)
            job.status = "uploading"
            self._jobs[job_id] = job
        return job

    def _pending(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status in ("uploading", "queued", "running"))

    def discard(self, job: Job) -> None:
        """Drop a job that was never queued (its upload was refused)."""
        with self._lock:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.directory, ignore_errors=True)

    def submit(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        """Queue ``work(job) -> result summary``; its ScatlasError fails the job with the error's message."""
        job.status = "queued"
        job.stage("queued", 0.0, 0.0, 1.0)
        job._future = self._pool.submit(self._run, job, work)

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        with self._lock:  # a cancel between the queue and here has dropped the job already
            if self._stop.is_set() or job.status != "queued":
                return
            job.status, job.started = "running", time.time()
        t0 = time.perf_counter()
        result: dict[str, Any] | None = None
        error: str | None = None
        collected = _ThreadWarnings()
        scatlas_logger = logging.getLogger("scatlas")
        scatlas_logger.addHandler(collected)
        set_interrupt_check(job.check_cancelled)
        try:
            job.stage("starting", 0.01, 0.02, 1.0)
            result = work(job)
        except Interrupted:
            self._cancelled(job)
            return
        except ScatlasError as exc:
            error = self.public_text(job, str(exc))
            logger.info("job %s (%s) failed: %s", job.id, job.kind, error)
        except Exception:
            logger.exception("job %s (%s) failed with an internal error", job.id, job.kind)
            error = INTERNAL_ERROR
        finally:
            set_interrupt_check(None)
            scatlas_logger.removeHandler(collected)
        if result is not None and collected.messages:  # what the CLI prints as WARNING lines, for the client too
            said = list(result.get("warnings") or [])
            said += [m for m in (self.public_text(job, m) for m in collected.messages) if m not in said]
            result["warnings"] = said[:MAX_WARNINGS]
        with contextlib.suppress(OSError):
            (job.directory / "query.h5ad").unlink(missing_ok=True)  # the outputs hold what is needed of it
        if error is None and job.cells:
            rate = (time.perf_counter() - t0 - DEFAULT_BASE_SECONDS.get(job.kind, 0.0)) / job.cells
            self._rates[job.kind] = 0.7 * self._rates.get(job.kind, rate) + 0.3 * max(rate, 1e-5)
        job.finished = time.time()
        job._final = job.progress
        job.result, job.error = result, error
        job.status = "failed" if error is not None else "done"  # last: a client seeing it sees everything else

    def public_text(self, job: Job, text: str) -> str:
        """A message for the client: the job directory's paths replaced by the names the client knows, the query's
        stored name by the upload's, the server's index and atlas paths by their names (:attr:`hidden_paths`), and
        the command line's hints by what they mean for the API."""
        text = safe_text(text).replace(str(job.directory / "query.h5ad"), job.upload_name)
        text = text.replace("the query 'query'", f"the query {job.upload_name!r}")
        for cli_hint, api_hint in API_HINTS:
            text = text.replace(cli_hint, api_hint)
        text = text.replace(str(job.directory) + "/", "").replace(str(job.directory), "the job directory")
        return hide_paths(text, self.hidden_paths)

    def cancel(self, job: Job) -> str:
        """Cancel or delete a job: a queued job is dropped, a running one stops at its next step (``"cancelling"``
        until it has), a finished one is removed with its files (``"deleted"``). The job's new state."""
        with self._lock:
            if job.status == "queued":
                if job._future is not None:
                    job._future.cancel()  # or _run finds the job cancelled and returns
                job._cancel.set()
                self._mark_cancelled(job)
                outcome = "cancelled"
            elif job.status == "running":
                job._cancel.set()
                return "cancelling"
            else:  # done, failed or cancelled before: removed with whatever it left
                self._jobs.pop(job.id, None)
                outcome = "deleted"
        shutil.rmtree(job.directory, ignore_errors=True)
        logger.info("job %s %s on request", job.id, outcome)
        return outcome

    @staticmethod
    def _mark_cancelled(job: Job) -> None:
        job.finished = time.time()
        job._final = job.progress
        job.result, job.error, job.files = None, None, {}
        job.status = "cancelled"

    def _cancelled(self, job: Job) -> None:
        """A running job stopped by :meth:`cancel`: its outputs removed, its record kept as cancelled until the
        retention time."""
        shutil.rmtree(job.directory, ignore_errors=True)
        with self._lock:
            self._mark_cancelled(job)
        logger.info("job %s (%s) cancelled while running", job.id, job.kind)

    def expected_seconds(self, kind: str, cells: int) -> float:
        return DEFAULT_BASE_SECONDS.get(kind, 2.0) + self._rates.get(kind, 0.003) * max(cells, 1)

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.match(job_id or ""):
            return None
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.status != "uploading" else None

    def file(self, job: Job, name: str) -> Path | None:
        """The file ``name`` of a done job, when the job has one of that name (None otherwise)."""
        fixed = job.files.get(name)
        if job.status != "done" or fixed is None:
            return None
        path = job.directory / fixed
        return path if path.is_file() else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = [j.status for j in self._jobs.values()]
        return {s: states.count(s) for s in STATES}

    # -- retention -----------------------------------------------------------------------------------------------
    def remove_expired(self, now: float | None = None) -> list[str]:
        """Remove the finished jobs older than the retention time (directory and record); their ids."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [j for j in self._jobs.values()
                       if j.finished is not None and now - j.finished >= self.retention_s]
            for job in expired:
                del self._jobs[job.id]
        for job in expired:
            shutil.rmtree(job.directory, ignore_errors=True)
            logger.info("job %s removed after the retention time", job.id)
        return [j.id for j in expired]

    def _sweep_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.remove_expired()
            except Exception:  # keep sweeping; a failed removal is retried next time
                logger.exception("removing expired jobs failed")

    def shutdown(self) -> None:
        """Stop the cleanup, drop queued jobs (their uploads deleted: they will never run) and wait for the running
        ones."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sweeper.join(timeout=5)
        with self._lock:
            never_ran = [job for job in self._jobs.values() if job.status == "queued"]
        for job in never_ran:
            shutil.rmtree(job.directory, ignore_errors=True)
        if never_ran:
            logger.info("%d queued job(s) dropped at shutdown, their uploads deleted", len(never_ran))
