"""The ``scatlas`` command's entry point.

Loading the command's modules (AnnData, TileDB-SOMA, FAISS, ...) takes a second or two; a Ctrl-C in that time ends
the command as one during its work does (``Interrupted``, exit status 130), not with a traceback of the imports.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from scatlas.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted while starting; nothing was done.\n")
        sys.exit(130)
    run()
