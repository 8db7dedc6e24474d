"""Embedders chosen by name: ``pca``, ``precomputed:KEY``, ``uce``. Backends import heavy packages lazily."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from scatlas.atlas.embed.base import EMBEDDER_FILE, Embedder
from scatlas.atlas.errors import InputError, StoreError

# name -> "module:Class"; modules are imported only when the embedder is used.
_BACKENDS: dict[str, str] = {
    "pca": "scatlas.atlas.embed.pca:PCAEmbedder",
    "precomputed": "scatlas.atlas.embed.precomputed:PrecomputedEmbedder",
    "uce": "scatlas.atlas.embed.uce:UCEEmbedder",
}


def available_embedders() -> list[str]:
    """Names of the embedder backends (``precomputed`` is asked for as ``precomputed:KEY``)."""
    return sorted(_BACKENDS)


def _backend(name: str) -> type[Embedder]:
    if name not in _BACKENDS:
        raise InputError(
            f"unknown embedder {name!r}; choose one of: pca, precomputed:KEY (e.g. precomputed:uce), uce"
        )
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def make_embedder(spec: str, **options: Any) -> Embedder:
    """Create an (unfitted) embedder from a spec such as ``"pca"`` or ``"precomputed:X_uce"``."""
    name, _, arg = spec.partition(":")
    cls = _backend(name)
    if name == "precomputed":
        if not arg:
            raise InputError("the precomputed embedder needs a key: --embedder precomputed:KEY (an obsm key)")
        options = {"key": arg, **options}
    elif arg:
        raise InputError(f"embedder {name!r} takes no ':' argument (got {spec!r})")
    return cls(**options)


def load_embedder(directory: str | Path) -> Embedder:
    """Load an embedder saved with :meth:`Embedder.save` and check its fingerprint."""
    directory = Path(directory)
    meta_path = directory / EMBEDDER_FILE
    if not meta_path.is_file():
        raise StoreError(f"no embedder at {directory} ({EMBEDDER_FILE} missing); rebuild the index")
    meta = json.loads(meta_path.read_text())
    embedder = _backend(meta["name"])._load(directory, meta["params"])
    if embedder.fingerprint() != meta["fingerprint"]:
        raise StoreError(
            f"embedder at {directory} does not match its recorded fingerprint "
            f"({embedder.fingerprint()} != {meta['fingerprint']}): the artefact was modified; rebuild the index"
        )
    return embedder
