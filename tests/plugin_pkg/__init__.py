"""The toy embedder plug-in of the tests (``scatlas_toy_embedder/``, packaged by ``pyproject.toml`` here).

:func:`install` makes it an installed distribution for one test, the way pip would leave it: a
``scatlas_toy_embedder-0.1.dist-info`` directory (METADATA, entry_points.txt) beside the module, on ``sys.path``
through ``monkeypatch`` (undone after the test), so that ``importlib.metadata.entry_points`` finds it. Nothing is
written into the virtual environment.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent / "scatlas_toy_embedder"
DIST = "scatlas-toy-embedder"


def install(monkeypatch, root: Path, *, entry_points: dict[str, str] | None = None, dist: str = DIST,
            modules: dict[str, str] | None = None) -> Path:
    """Install the toy package (or ``modules``: name -> source) as ``dist`` 0.1 under ``root``, registering
    ``entry_points`` (name -> "module:Class"; default ``toy``) in ``scatlas.embedders``; return the site dir."""
    from scatlas.atlas.embed.registry import clear_registry_cache

    site = root / "site"
    site.mkdir(parents=True, exist_ok=True)
    if modules is None:
        shutil.copytree(PACKAGE, site / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in (modules or {}).items():
        (site / f"{name}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    points = entry_points or {"toy": "scatlas_toy_embedder:ToyEmbedder"}
    (info / "entry_points.txt").write_text(
        "[scatlas.embedders]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    monkeypatch.syspath_prepend(str(site))
    clear_registry_cache()
    return site


def uninstall(*modules: str) -> None:
    """Forget what :func:`install` registered (the ``sys.path`` entry goes with monkeypatch's undo)."""
    from scatlas.atlas.embed.registry import clear_registry_cache

    for name in ("scatlas_toy_embedder", *modules):
        sys.modules.pop(name, None)
    clear_registry_cache()
