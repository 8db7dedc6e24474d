"""The HTTP API and the page of ``scatlas serve`` (FastAPI, run by uvicorn): :func:`create_app`.

Routes (docs/server.md has the details): ``GET /api/health`` (open); with a token set, every other ``/api`` route
needs ``Authorization: Bearer <token>``. ``GET /api/index`` (``scatlas info --json``), ``GET /api/overview``
(labels by dataset, for the page), ``GET /api/map.png``; ``POST /api/annotate``, ``/api/search``, ``/api/hunt``
(multipart, ``file`` = .h5ad) -> 202 ``{"job": ID}``; ``GET /api/jobs/{ID}`` and ``GET /api/jobs/{ID}/{file}``;
``DELETE /api/jobs/{ID}`` cancels a queued or running job, or deletes a finished one with its files.
``GET /`` is the page, ``GET /static/...`` its script and style sheet (no data; open).

Every error is JSON ``{"error": "..."}``: 400 for bad input (checked before a job is queued), 401 without the
token, 404, 409 (a job's file before the job is done), 413 (upload over the cap), 503 (too many jobs), 500 (logged,
no traceback sent).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import shutil
import string
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from scatlas import __version__
from scatlas.atlas.errors import InputError, ScatlasError
from scatlas.atlas.outputs import safe_text
from scatlas.server.jobs import Job, JobManager, QueueFull, prepare_work_dir, server_paths
from scatlas.server.maps import atlas_map_png
from scatlas.server.shared import SharedIndex
from scatlas.server.tasks import (
    FILES,
    QUERY_FILE,
    SearchParams,
    parse_annotate,
    parse_hunt,
    parse_search,
    run_annotate,
    run_hunt,
    run_search,
)
from scatlas.server.uploads import DRAIN_BYTES, UploadTooLarge, check_h5ad, display_name, receive_upload

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 2048.0
DEFAULT_WORKERS = 2
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_MAX_PENDING = 32
MAX_HIT_ROWS = 2_000_000
"""A search job may make at most this many hit rows (uploaded cells x k; about 200 MB of CSV): the hits are held in
memory and written whole, and the upload cap does not bound them."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 16
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
MEDIA = {".csv": "text/csv; charset=utf-8", ".png": "image/png", ".json": "application/json",
         ".html": "text/html; charset=utf-8", ".h5ad": "application/x-hdf5"}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
INTERNAL = "internal server error (the server's log has the details)"
FILE_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def is_local_host(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve anything but the loopback interface without a token, and a token too short to guess."""
    if token is None:
        if not is_local_host(host):
            raise InputError(
                f"without a token the server listens on 127.0.0.1 only (asked for {host!r}): set a token with "
                "--token or the SCATLAS_TOKEN environment variable to serve other machines"
            )
        return
    if len(token) < MIN_TOKEN_CHARS:
        raise InputError(
            f"the token is {len(token)} characters long; use at least {MIN_TOKEN_CHARS} (e.g. the output of "
            "`python -c \"import secrets; print(secrets.token_urlsafe())\"`)"
        )


@dataclass
class ServerState:
    shared: SharedIndex
    jobs: JobManager
    token: str | None
    max_bytes: int
    work_dir: Path
    own_work_dir: bool
    workers: int
    retention_s: float
    info: dict[str, Any] = field(default_factory=dict)
    work_lock: contextlib.ExitStack | None = None  # holds the work directory's lock (jobs.prepare_work_dir)
    _map: list[bytes | None] = field(default_factory=list)
    _map_lock: threading.Lock = field(default_factory=threading.Lock)

    def atlas_map(self) -> bytes | None:
        with self._map_lock:
            if not self._map:
                view = self.shared.view()
                self._map.append(atlas_map_png(view, self.shared.label_column()) if self.shared.has_map() else None)
            return self._map[0]

    def close(self) -> None:
        self.jobs.shutdown()
        self.shared.close()
        if self.work_lock is not None:
            self.work_lock.close()  # another server may use the work directory now
        if self.own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": safe_text(message)}, status_code=status, headers=headers)


JOB_MODULES = ("scatlas.query", "scatlas.query.search", "scatlas.query.hunt", "scatlas.query.hunt.train",
               "scatlas.query.hunt.sweep", "scatlas.query.hunt.report", "scatlas.query.hunt.predicate",
               "scatlas.query.hunt.sql_predicate")
"""The modules the jobs import, loaded when the app is made: two jobs' threads importing the same package at once
(an annotate and a hunt right after start) could each see it half initialised (ImportError, KeyError)."""


def _load_job_modules() -> None:
    import importlib

    for name in JOB_MODULES:
        importlib.import_module(name)


def create_app(
    index_dir: str | Path,
    *,
    token: str | None = None,
    work_dir: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    workers: int = DEFAULT_WORKERS,
    retention_s: float = DEFAULT_RETENTION_S,
    max_pending: int = DEFAULT_MAX_PENDING,
    cleanup_every_s: float | None = None,
) -> FastAPI:
    """The server's ASGI app over the index at ``index_dir``, opened and loaded now (errors are raised here).

    token: the bearer token every route but ``/api/health``, the page and its static files needs (None: none; then
        serve on the loopback interface only, :func:`check_bind`, and requests must name a loopback host).
    work_dir: where jobs keep their files (a new or empty directory, or one a server used before); None: a new
        temporary directory, removed at shutdown.
    max_upload_mb: the cap on an uploaded .h5ad (413 beyond). workers: jobs run at once (threads).
    retention_s: a finished job's files and record are removed this long after it finished.
    max_pending: jobs queued or running at once (503 beyond).
    """
    if workers < 1 or max_pending < 1 or max_upload_mb <= 0 or retention_s < 0:
        raise InputError("workers and max_pending must be >= 1, max_upload_mb > 0 and retention_s >= 0")
    if token is not None and not token:
        token = None
    _load_job_modules()
    shared = SharedIndex(index_dir)
    own = work_dir is None
    try:
        wdir = Path(tempfile.mkdtemp(prefix="scatlas-serve-")) if work_dir is None else Path(work_dir)
    except BaseException:
        shared.close()
        raise
    lock = None
    try:
        lock = prepare_work_dir(wdir)
        jobs = JobManager(wdir, workers=workers, retention_s=retention_s, max_pending=max_pending,
                          sweep_every_s=cleanup_every_s,
                          hidden_paths=server_paths(Path(index_dir), shared.index.path, shared.index.atlas_path))
    except BaseException:
        shared.close()
        if lock is not None:
            lock.close()
        if own:
            shutil.rmtree(wdir, ignore_errors=True)
        raise
    state = ServerState(shared, jobs, token, int(max_upload_mb * 2**20), wdir, own, workers, retention_s)
    state.work_lock = lock
    state.info = json.loads(json.dumps(shared.info, default=str))
    state.info["path"] = Path(state.info.get("path") or index_dir).name  # clients see the name, not the server's path

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="scatlas", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.scatlas = state
    _handlers(app)
    _middleware(app, state)
    _routes(app, state)
    return app


# -- errors, headers, access ------------------------------------------------------------------------------------


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.method} {request.url.path[:200]}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:200]}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "invalid request: " + "; ".join(str(e.get("msg", e)) for e in exc.errors())[:500])

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "60"})

    @app.exception_handler(ScatlasError)
    async def scatlas_error(request: Request, exc: ScatlasError) -> JSONResponse:
        if isinstance(exc, InputError):
            return _error(400, str(exc))
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # the last resort (the guard middleware answers errors of the routes); the ASGI server logs the traceback
        return _error(500, INTERNAL)


def _middleware(app: FastAPI, state: ServerState) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if state.token is None and not is_local_host(_host_name(request.headers.get("host") or "")):
            # without a token only a loopback name may reach the server (a page of another site that renamed its
            # host to 127.0.0.1, "DNS rebinding", may not)
            return _error(421, "this server answers requests to 127.0.0.1 or localhost only")
        origin = request.headers.get("origin")
        if origin is not None and request.url.path.startswith("/api/") and request.url.path != "/api/health":
            parts = urlsplit(origin)
            if parts.netloc.lower() != (request.headers.get("host") or "").lower():
                return _error(403, "cross-origin requests are not accepted")
        try:
            response: Response = await call_next(request)
        except Exception:  # a bug: logged with its traceback here, answered without it
            logger.exception("%s %s failed", request.method, request.url.path)
            response = _error(500, INTERNAL)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _host_name(header: str) -> str:
    """The host of a Host header (without the port; an IPv6 address keeps its brackets)."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def _authorise(state: ServerState) -> Callable[[Request], None]:
    expected = None if state.token is None else state.token.encode("utf-8")

    def authorise(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise ApiError(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})

    return authorise


# -- routes ------------------------------------------------------------------------------------------------------


def _page(state: ServerState) -> str:
    template = string.Template(resources.files("scatlas.server").joinpath("static/index.html").read_text("utf-8"))
    return template.substitute(
        version=__version__, token_required="true" if state.token else "false",
        max_upload_mb=f"{state.max_bytes / 2**20:g}",
    )


def _routes(app: FastAPI, state: ServerState) -> None:
    auth = Depends(_authorise(state))
    page = _page(state)

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise ApiError(404, "no such file")
        body = resources.files("scatlas.server").joinpath(f"static/{name}").read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/api/index", dependencies=[auth])
    def index_summary() -> dict[str, Any]:
        newer = state.shared.newer_on_disk()
        return {**state.info, **({"newer_on_disk": newer} if newer else {})}

    @app.get("/api/overview", dependencies=[auth])
    def overview() -> dict[str, Any]:
        return {**state.shared.overview, "has_map": state.shared.has_map(),
                "label_heads": sorted(state.info.get("label_heads") or {}),
                "label_columns": list(state.info.get("label_columns") or {}),
                "max_upload_mb": state.max_bytes / 2**20, "workers": state.workers,
                "retention_s": state.retention_s, "jobs": state.jobs.counts(),
                "warnings": state.shared.warnings + [n for n in [state.shared.newer_on_disk()] if n]}

    @app.get("/api/map.png", dependencies=[auth])
    def atlas_map() -> Response:
        png = state.atlas_map()
        if png is None:
            raise ApiError(404, "the index has no reference map (built with --no-map, or before maps existed)")
        return Response(png, media_type="image/png")

    @app.post("/api/annotate", status_code=202, dependencies=[auth])
    async def post_annotate(request: Request) -> JSONResponse:
        return await _submit(state, request, "annotate", parse_annotate, run_annotate)

    @app.post("/api/search", status_code=202, dependencies=[auth])
    async def post_search(request: Request) -> JSONResponse:
        return await _submit(state, request, "search", parse_search, run_search)

    @app.post("/api/hunt", status_code=202, dependencies=[auth])
    async def post_hunt(request: Request) -> JSONResponse:
        return await _submit(state, request, "hunt", parse_hunt, run_hunt)

    @app.get("/api/jobs/{job_id}", dependencies=[auth])
    def job_status(job_id: str) -> dict[str, Any]:
        return _job(state, job_id).to_json()

    @app.delete("/api/jobs/{job_id}", dependencies=[auth])
    def job_cancel(job_id: str) -> dict[str, Any]:
        job = _job(state, job_id)
        return {"job": job.id, "status": state.jobs.cancel(job)}

    @app.get("/api/jobs/{job_id}/{name}", dependencies=[auth])
    def job_file(job_id: str, name: str) -> Response:
        job = _job(state, job_id)
        if name not in FILES[job.kind]:
            raise ApiError(404, f"{'an' if job.kind[0] in 'aeiou' else 'a'} {job.kind} job has no file {name[:80]!r}; "
                           f"its files: {', '.join(FILES[job.kind])}")
        if job.status == "failed":
            raise ApiError(409, f"the job failed, so it has no files: {job.error or 'no reason recorded'}")
        if job.status != "done":
            raise ApiError(409, f"the job is {job.status}; its files are there once it is done")
        path = state.jobs.file(job, name)
        if path is None:
            raise ApiError(404, f"this job wrote no {name}" + (" (the index has no reference map)"
                                                                 if name == "umap.png" else ""))
        return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"), filename=name,
                            headers={"Content-Security-Policy": FILE_CSP})


def _job(state: ServerState, job_id: str) -> Job:
    job = state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "no such job (unknown id, deleted, removed after the retention time, or the server was "
                       "restarted: jobs live as long as the server)")
    return job


async def _submit(state: ServerState, request: Request, kind: str, parse: Callable[..., Any],
                  run: Callable[..., dict[str, Any]]) -> JSONResponse:
    """Stream the upload into a new job's directory, check it and the fields, queue the job: 202 ``{"job": ID}``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_bytes + DRAIN_BYTES:
        raise UploadTooLarge(f"the upload is larger than this server's limit of {state.max_bytes / 2**20:,.1f} MiB")
    job = state.jobs.new_job(kind)
    try:
        dest = job.directory / QUERY_FILE
        fields, filename, size = await receive_upload(request.headers.get("content-type", ""), request.stream(),
                                                      dest, state.max_bytes)
        job.upload_name = display_name(filename)

        def check() -> tuple[int, Any]:
            cells = check_h5ad(dest, size, name=job.upload_name if filename else None)
            params = parse(fields, state.shared.view(), dest)
            searched = params.selected if isinstance(params, SearchParams) and params.selected else cells
            if isinstance(params, SearchParams) and params.mode == "cells" and searched * params.k > MAX_HIT_ROWS:
                raise InputError(
                    f"{searched:,} cells x k={params.k} would make {searched * params.k:,} hit rows, over the "
                    f"{MAX_HIT_ROWS:,} this server writes for one search: lower k, send fewer cells (or select them "
                    "with cells_where), or search on the command line (scatlas search)"
                )
            return cells, params

        cells, params = await run_in_threadpool(check)
    except InputError as exc:
        state.jobs.discard(job)
        raise type(exc)(state.jobs.public_text(job, str(exc))) from None
    except ClientDisconnect:
        state.jobs.discard(job)
        raise ApiError(400, "the upload was interrupted") from None
    except BaseException:
        state.jobs.discard(job)
        raise
    job.cells = cells
    expected = state.jobs.expected_seconds(kind, cells)
    state.jobs.submit(job, lambda j: run(j, state.shared.view(), params, expected))
    logger.info("%s job %s queued: %d cells from %s", kind, job.id, cells, job.upload_name)
    return JSONResponse({"job": job.id}, status_code=202, headers={"Location": f"/api/jobs/{job.id}"})
