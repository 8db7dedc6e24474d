"""Where shard tasks run: in this process (``local``) or on a Ray cluster (``ray``).

Offline work is a list of independent :class:`Task` s, one per shard: the build's "read a cell range -> embed ->
write float16 vectors -> add to the shard index" and the sweep's "score one shard's stored vectors". A task is a
module-level function called as ``fn(*args, ctx=TaskContext)``; it writes its own output atomically (a shard
directory renamed into place, a partial file renamed into place) and returns a small, picklable record. The driver
gets each record through ``on_done`` as tasks finish and records completion, so a cancelled or crashed run resumes
by skipping what is recorded. Either executor runs the same functions on the same arguments, so the files they
write are the same.

* :class:`LocalExecutor` runs tasks in this process, one after the other on one device, or with one thread per
  GPU when given several devices (``cuda:0``, ``cuda:1``, ...: shards spread across the GPUs of this machine).
* :class:`RayExecutor` submits them as Ray tasks (``ray`` is an optional extra, imported only here and only when
  chosen). Tasks ask Ray for ``cpus_per_task`` CPUs and for a GPU when the work needs one; Ray retries a task whose
  worker died (``max_retries``). The index directory (and the atlas store it reads) must be on storage that every
  node sees at the same path.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from scatlas.atlas.errors import DependencyError, InputError, ScatlasError, TaskError

logger = logging.getLogger(__name__)

ExecutorName = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")
DEFAULT_MAX_RETRIES = 3


@dataclass(frozen=True)
class TaskContext:
    """Where a task runs. ``device``: ``"cpu"`` or ``"cuda"``; ``gpu``: the CUDA ordinal to use (as this process
    sees the devices); ``threads``: CPU threads the task may use (None: the process default); ``progress``: called
    with a number of cells as work proceeds (only for tasks running in the driver's process)."""

    device: str = "cpu"
    gpu: int | None = None
    threads: int | None = None
    progress: Callable[[int], None] | None = None
    worker: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")

    @property
    def torch_device(self) -> str:
        return "cpu" if self.device == "cpu" else f"cuda:{self.gpu or 0}"


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args, ctx=...)``. ``key`` names it in logs and errors; ``gpus``: GPUs it needs
    (0 or 1); ``cells``: its size, for progress bars."""

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    gpus: float = 0.0
    cells: int = 0


OnDone = Callable[[Task, Any], None]


class Executor(Protocol):
    """Runs tasks and hands each result to ``on_done`` in the calling (driver) thread as it arrives."""

    name: str

    def run(self, tasks: Sequence[Task], on_done: OnDone, progress: Callable[[int], None] | None = None) -> None:
        """``progress`` may be called with cell counts by tasks that run in this process (as they go)."""
        ...

    def gpu_count(self) -> int:
        """GPUs the executor can give tasks (this machine's for local, the cluster's for ray)."""
        ...

    def describe(self) -> dict[str, Any]: ...


def _task_error(task: Task, exc: BaseException) -> ScatlasError:
    if isinstance(exc, ScatlasError):
        return exc
    return TaskError(f"task {task.key} failed: {type(exc).__name__}: {exc}. Rerun the same command to resume; "
                     "completed shards are kept.")


class LocalExecutor:
    """Tasks in this process: sequentially on ``devices[0]``, or one thread per device when there are several.

    ``devices``: ``["cpu"]`` (default), ``["cuda"]`` or ``["cuda:0", "cuda:1", ...]``; ``threads``: CPU threads per
    task (None: the process default).
    """

    name = "local"

    def __init__(self, devices: Sequence[str] = ("cpu",), *, threads: int | None = None) -> None:
        if not devices:
            raise InputError("LocalExecutor needs at least one device")
        self.contexts = [_context_for(d, threads) for d in devices]

    def gpu_count(self) -> int:
        return sum(1 for c in self.contexts if c.device == "cuda")

    def describe(self) -> dict[str, Any]:
        return {"executor": "local", "devices": [c.torch_device for c in self.contexts]}

    def run(self, tasks: Sequence[Task], on_done: OnDone, progress: Callable[[int], None] | None = None) -> None:
        if len(self.contexts) == 1:
            base = self.contexts[0]
            ctx = TaskContext(base.device, base.gpu, base.threads, progress)
            for task in tasks:
                try:
                    result = task.fn(*task.args, ctx=ctx)
                except ScatlasError:
                    raise
                except Exception as exc:
                    raise _task_error(task, exc) from exc
                on_done(task, result)
            return
        self._run_threads(tasks, on_done, progress)

    def _run_threads(self, tasks: Sequence[Task], on_done: OnDone, progress: Callable[[int], None] | None) -> None:
        """One worker thread per device; FAISS and torch release the GIL while they compute."""
        free: queue.SimpleQueue[TaskContext] = queue.SimpleQueue()
        lock = threading.Lock()

        def report(n: int) -> None:
            if progress is not None:
                with lock:
                    progress(n)

        for base in self.contexts:
            free.put(TaskContext(base.device, base.gpu, base.threads, report))
        lock = threading.Lock()

        def call(task: Task) -> Any:
            ctx = free.get()
            try:
                logger.debug("task %s on %s", task.key, ctx.torch_device)
                return task.fn(*task.args, ctx=ctx)
            finally:
                free.put(ctx)

        with ThreadPoolExecutor(max_workers=len(self.contexts), thread_name_prefix="scatlas-task") as pool:
            futures: dict[Future[Any], Task] = {pool.submit(call, t): t for t in tasks}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        task = futures[fut]
                        exc = fut.exception()
                        if exc is not None:
                            raise _task_error(task, exc) from exc
                        on_done(task, fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise


def _context_for(device: str, threads: int | None) -> TaskContext:
    device = device.lower()
    if device == "cpu":
        return TaskContext("cpu", None, threads)
    if device in ("cuda", "gpu"):
        return TaskContext("cuda", 0, threads)
    if device.startswith("cuda:"):
        try:
            return TaskContext("cuda", int(device.split(":", 1)[1]), threads)
        except ValueError:
            pass
    raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


class RayExecutor:
    """Tasks as Ray tasks on the cluster at ``address`` (None: the cluster this process is connected to, else a
    new local one; ``"auto"``: the cluster started on this node with ``ray start``).

    Each task asks for ``cpus_per_task`` CPUs and for ``task.gpus`` GPUs; a task whose worker process dies is
    retried up to ``max_retries`` times (Ray's own retry). Errors raised by the task itself (bad input, a damaged
    file) are not retried: they would fail again. At most ``max_in_flight`` tasks are submitted at a time (default:
    twice the cluster's CPUs divided by ``cpus_per_task``) so that a long task list does not flood the scheduler.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_task: float = 1.0, max_retries: int = DEFAULT_MAX_RETRIES,
                 max_in_flight: int | None = None, init_options: dict[str, Any] | None = None) -> None:
        if cpus_per_task <= 0:
            raise InputError(f"cpus_per_task must be positive (got {cpus_per_task})")
        if max_retries < 0:
            raise InputError(f"max_retries must be >= 0 (got {max_retries})")
        self.address = address
        self.cpus_per_task = float(cpus_per_task)
        self.max_retries = int(max_retries)
        self.max_in_flight = max_in_flight
        self.init_options = dict(init_options or {})
        self._ray: Any = None

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        try:
            import ray
        except ImportError as exc:
            raise DependencyError(
                "executor 'ray' needs Ray: pip install 'scatlas[ray]' (on the driver and on every node of the cluster)"
            ) from exc
        if not ray.is_initialized():
            logger.info("connecting to Ray%s", f" at {self.address}" if self.address else " (local cluster)")
            try:
                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False, **self.init_options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DependencyError(
                    f"cannot connect to a Ray cluster{f' at {self.address}' if self.address else ''}: {exc}. "
                    "Start one with `ray start --head` or pass --ray-address HOST:PORT."
                ) from exc
        self._ray = ray
        return ray

    def gpu_count(self) -> int:
        ray = self._connect()
        return int(ray.cluster_resources().get("GPU", 0))

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "address": self.address, "cpus_per_task": self.cpus_per_task,
                "max_retries": self.max_retries}

    def run(self, tasks: Sequence[Task], on_done: OnDone, progress: Callable[[int], None] | None = None) -> None:
        ray = self._connect()
        if not tasks:
            return
        remote = ray.remote(_run_on_worker)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        limit = self.max_in_flight or max(1, int(2 * cpus // self.cpus_per_task))
        todo = list(tasks)
        pending: dict[Any, Task] = {}
        threads = max(1, int(self.cpus_per_task))

        def submit() -> None:
            while todo and len(pending) < limit:
                task = todo.pop(0)
                ref = remote.options(
                    num_cpus=self.cpus_per_task, num_gpus=task.gpus, max_retries=self.max_retries,
                    retry_exceptions=False, name=f"scatlas:{task.key}",
                ).remote(task.fn, task.args, task.gpus, threads)
                pending[ref] = task

        submit()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # RayTaskError, WorkerCrashedError, TaskCancelledError, ...
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, ScatlasError):
                            raise cause from exc
                        what = (f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException)
                                else f"{type(exc).__name__}: {str(exc).strip()[:500]}")
                        raise TaskError(
                            f"task {task.key} failed on Ray: {what}. (Ray retries a task whose worker died up to "
                            f"{self.max_retries} times; an error raised by the task itself is not retried.) Rerun the "
                            "same command to resume; completed shards are kept."
                        ) from exc
                    on_done(task, result)
                    if progress is not None:
                        progress(task.cells)
                submit()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=False)
            raise


def _run_on_worker(fn: Callable[..., Any], args: tuple[Any, ...], gpus: float, threads: int) -> Any:
    """Body of every Ray task: Ray has set CUDA_VISIBLE_DEVICES to the task's GPU, so that is device 0."""
    ctx = TaskContext("cuda" if gpus > 0 else "cpu", 0 if gpus > 0 else None, threads)
    return fn(*args, ctx=ctx)


def make_executor(name: str = "local", *, ray_address: str | None = None, devices: Sequence[str] | None = None,
                  **options: Any) -> Executor:
    """An executor by name: ``local`` (``devices`` default ``["cpu"]``) or ``ray`` (``ray_address``)."""
    if name == "local":
        if ray_address is not None:
            raise InputError("--ray-address is only used with --executor ray")
        return LocalExecutor(devices or ("cpu",), **options)
    if name == "ray":
        return RayExecutor(ray_address, **options)
    raise InputError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def local_devices(device: str, gpu_count: int) -> list[str]:
    """The local executor's devices for a resolved ``device``: every GPU for ``cuda`` (shards spread across them)."""
    if device == "cuda":
        return [f"cuda:{i}" for i in range(max(1, gpu_count))]
    return ["cpu"]
