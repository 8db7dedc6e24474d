"""Refresh the ``--help`` blocks of docs/cli.md from the CLI itself (``--check``: exit 1 when one is stale).

Each section headed ``## `scatlas CMD` `` (or ``### `scatlas hunt CMD` ``) holds one fenced block starting with
``Usage: scatlas``; it is replaced by the command's current ``--help`` text.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from click.testing import CliRunner

from scatlas.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
_SECTION = re.compile(r"^#{2,3} `scatlas ([a-z -]+)`\s*$", re.MULTILINE)
_BLOCK = re.compile(r"```\n(Usage: scatlas .*?)```\n", re.DOTALL)


def help_text(command: str) -> str:
    """The ``--help`` output of ``scatlas COMMAND`` as the docs show it (78 columns, as click wraps in an 80-column terminal)."""
    result = CliRunner().invoke(cli, [*command.split(), "--help"], prog_name="scatlas", terminal_width=78)
    if result.exit_code != 0:
        raise SystemExit(f"scatlas {command} --help failed: {result.output}")
    return result.output


def refreshed(text: str) -> str:
    """``text`` with every section's help block replaced by the current help."""
    out, pos = [], 0
    for m in _SECTION.finditer(text):
        block = _BLOCK.search(text, m.end())
        nxt = _SECTION.search(text, m.end())
        if block is None or (nxt is not None and block.start() > nxt.start()):
            continue
        out.append(text[pos : block.start(1)])
        out.append(help_text(m.group(1).strip()))
        pos = block.end(1)
    out.append(text[pos:])
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when docs/cli.md is stale")
    args = parser.parse_args()
    text = DOC.read_text()
    new = refreshed(text)
    if args.check:
        sys.exit(0 if new == text else 1)
    if new != text:
        DOC.write_text(new)


if __name__ == "__main__":
    main()
