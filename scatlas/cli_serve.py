"""``scatlas serve``: the web page and HTTP API over one index (:mod:`scatlas.server`, FastAPI + uvicorn).

:mod:`scatlas.cli` registers the command on its group.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

import click

from scatlas.atlas.errors import InputError
from scatlas.cli_common import PathArg, _echo, index_option


@click.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Anything but 127.0.0.1/localhost needs a token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--token", envvar="SCATLAS_TOKEN", default=None, metavar="TOKEN",
              help="Bearer token every API route but /api/health requires (at least 16 characters). Prefer the "
                   "environment variable SCATLAS_TOKEN: a command line is visible to other users of the machine. "
                   "Without one the server listens on 127.0.0.1 only.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=2048, show_default=True,
              help="Largest .h5ad accepted (larger uploads are refused with HTTP 413 while they stream in).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Jobs (annotate, search, hunt) run at once, as threads sharing the one loaded index; more wait "
                   "in a queue (at most 32 queued or running).")
@click.option("--work-dir", type=PathArg(file_okay=False, path_type=Path), default=None,
              help="Where jobs keep their uploads and results (a new or empty directory, or one a server used "
                   "before). Default: a temporary directory, removed at shutdown.")
@click.option("--retention-hours", type=click.FloatRange(min=0), default=24, show_default=True,
              help="A finished job's files are removed this many hours after it finished.")
def serve(index_dir: Path, host: str, port: int, token: str | None, max_upload_mb: float, workers: int,
          work_dir: Path | None, retention_hours: float) -> None:
    """Serve the index to a lab: a web page (atlas overview; upload a query to annotate, search or hunt) and the
    HTTP API behind it (docs/server.md). Stop with Ctrl-C."""
    import uvicorn

    from scatlas.server import check_bind, create_app

    token = token or None
    check_bind(host, token)
    check_port(host, port)
    app = create_app(index_dir, token=token, work_dir=work_dir, max_upload_mb=max_upload_mb, workers=workers,
                     retention_s=retention_hours * 3600)
    shown = f"[{host}]" if ":" in host else host
    _echo(f"scatlas serve: {index_dir} on http://{shown}:{port}/ ({workers} worker(s), uploads up to "
          f"{max_upload_mb:g} MiB, results kept {retention_hours:g} h)")
    if token is None:
        _echo("no token set: listening on 127.0.0.1 only (set --token or SCATLAS_TOKEN to serve other machines)")
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info", server_header=False)


def check_port(host: str, port: int) -> None:
    """Refuse, before the index is loaded, a ``host``/``port`` the server could not listen on (a port in use, an
    address not of this machine, a port reserved for the administrator): InputError saying what to change. The
    socket is bound as uvicorn binds it (``SO_REUSEADDR``) and closed again."""
    shown = f"[{host}]" if ":" in host else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"the host {host!r} cannot be resolved ({exc}); give an address of this machine with "
                         "--host") from None
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {shown} is in use; choose another with --port") from None
        if exc.errno == errno.EACCES:
            raise InputError(f"port {port} on {shown} needs administrator rights; choose one above 1023 with --port"
                             ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"{shown} is not an address of this machine; give one of its addresses with --host"
                             ) from None
        raise InputError(f"cannot listen on port {port} on {shown} ({exc.strerror}); choose another --host or "
                         "--port") from None
