"""The one way the bench scripts write their results into docs/benchmarks.md: a block between two markers."""

from __future__ import annotations

import os
from pathlib import Path


def write_block(path: Path, start: str, end: str, block: str, heading: str | None = None) -> None:
    """Put ``block`` (text from marker ``start`` to marker ``end``) into the Markdown file ``path``.

    It replaces the first ``start`` ... ``end`` block already there; otherwise it is appended, under ``## heading``
    when one is given. A missing file starts as ``# Benchmarks``; the file is replaced atomically.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head, found, rest = text.partition(start)
    if found and end in rest:
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"## {heading}\n\n" if heading else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
