"""One writer at a time per index directory: a build (``--overwrite`` included) and an update hold an exclusive
``flock`` on the index's lock file for their whole run, so that neither deletes or rewrites what the other is
writing. Readers take no lock (they read a committed version)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scatlas.atlas.errors import InputError
from scatlas.atlas.locks import holding
from scatlas.atlas.outputs import INDEX_LOCK_FILE, writing

LOCK_FILE = INDEX_LOCK_FILE


@contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """Hold the index directory ``root``'s lock (created with the directory when missing); :class:`InputError`
    when another build or update holds it."""
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
        fh = open(root / LOCK_FILE, "a")  # noqa: SIM115 - held open for the block
    with holding(fh, InputError(f"another build or update of {root} is running; wait for it to finish (one writer "
                                "at a time)")):
        yield
