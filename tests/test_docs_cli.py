"""docs/cli.md shows each command's current --help (refresh with `python scripts/docs_cli.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _docs_cli():
    spec = importlib.util.spec_from_file_location("docs_cli", ROOT / "scripts" / "docs_cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_help_block_in_docs_is_current() -> None:
    docs_cli = _docs_cli()
    text = docs_cli.DOC.read_text()
    assert docs_cli.refreshed(text) == text, "docs/cli.md is stale: run `python scripts/docs_cli.py`"


def test_a_stale_block_is_detected() -> None:
    docs_cli = _docs_cli()
    text = docs_cli.DOC.read_text()
    stale = text.replace("Show progress bars.", "Show bars.", 1)
    assert stale != text
    assert docs_cli.refreshed(stale) == text
