"""``scatlas serve``: the atlas for a lab, as a web page and an HTTP API (FastAPI + uvicorn).

:func:`create_app` builds the ASGI app over one index (opened once, shared read-only by the request and job
threads: :mod:`~scatlas.server.shared`); jobs run in a bounded thread pool (:mod:`~scatlas.server.jobs`); uploads
stream to disk under a cap (:mod:`~scatlas.server.uploads`); what the jobs run is the CLI's code
(:mod:`~scatlas.server.tasks`). See docs/server.md.
"""

from scatlas.server.app import check_bind, create_app, is_local_host

__all__ = ["check_bind", "create_app", "is_local_host"]
