"""Atomic file output: readers see the old file or the complete new one, never a partial write."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import IndexFormatError


def default_file_mode() -> int:
    """The mode a plainly created file gets under the process' umask (0o644 under the usual 0o022).

    Temporary files (``tempfile.mkstemp``) are created 0o600; an output renamed into place from one is given this
    mode first, so that what a command writes is as readable as any file it would create directly."""
    try:  # Linux: read it without setting it (os.umask sets it, racing threads that create files meanwhile)
        with open("/proc/self/status", encoding="ascii") as fh:
            mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def replaced_dir(final: Path) -> Iterator[Path]:
    """A new temporary directory beside ``final`` to fill: when the block ends without an error it replaces
    ``final`` (an older one is moved aside, then deleted), when it raises it is removed, so that readers see the old
    directory or the complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def json_text(payload: Any) -> str:
    """``payload`` as the JSON text of our records and reports (indented, keys sorted, other types as ``str``)."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str)


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Write JSON to a temporary file in the same directory, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w") as fh:
            fh.write(json_text(payload))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MAX_JSON_BYTES = 64 << 20
"""Largest JSON file of our own read back (manifests, records, calibrations are far smaller)."""


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object stored at ``path`` (one of our records). IndexFormatError, saying ``fix``, when it is
    unreadable, too large, not JSON or not an object; the error names the problem, never the content."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"over {MAX_JSON_BYTES >> 20} MiB")
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IndexFormatError(f"{path} is unreadable ({type(exc).__name__}); {fix}") from None
    if not isinstance(payload, dict):
        raise IndexFormatError(f"{path} does not hold a JSON object; {fix}")
    return payload
