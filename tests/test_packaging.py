"""One import name: ``scatlas.atlas``, ``scatlas.index`` and ``scatlas.query``; nothing else at the top level."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata


def _python(code: str, cwd) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter outside the repository (so the checkout is not on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_packages_import_under_scatlas(tmp_path):
    done = _python("import scatlas.atlas, scatlas.index, scatlas.query, scatlas.query.hunt; print('ok')", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_other_top_level_names_are_installed(tmp_path):
    for name in ("atlas", "index", "query"):
        done = _python(f"import {name}", tmp_path)
        assert done.returncode != 0 and "No module named" in done.stderr, name
    top_level = metadata.distribution("scatlas").read_text("top_level.txt")
    assert top_level is None or top_level.split() == ["scatlas"]
