"""The one way the bench scripts write their results into docs/benchmarks.md: a block between two markers."""

from __future__ import annotations

import os
import time
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


def write_bench_section(name: str, script: str, args: list[str], text: str, table: str, heading: str) -> None:
    """Write a benchmark's section of docs/benchmarks.md: the command that produced it (``script`` with ``args``)
    and the time, ``text``, then ``table``, between the markers ``<!-- {name}:start -->`` / ``end``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    command = f"nice .venv/bin/python scripts/{script} " + " ".join(args)
    block = f"{start}\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}).\n\n{text}\n\n{table}\n{end}"
    write_block(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", start, end, block, heading=heading)
