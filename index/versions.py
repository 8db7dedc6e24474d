"""Versions of an index directory: the first build lives at its root, each ``build --update`` in ``versions/NNNN``.

Layout after updates::

    INDEX/                 version 1 (the first build): manifest.json, shards/, cells.duckdb, ...
    INDEX/versions/0002/   version 2: a complete index directory (unchanged shards, trained.faiss and embedder/
                           are hard links to the previous version's files, so they cost no space)
    INDEX/current.json     {"version": 2, "dir": "versions/0002"}: the commit point of an update

Readers open ``resolve_index_dir(INDEX)``: the root while there is no ``current.json``, else the version it names.
An update writes its version directory completely, then replaces ``current.json`` atomically, so a reader gets the
old version or the new one, never half an update. Superseded versions are removed by the next update, one version
after they stopped being current (a reader that opened one just before an update keeps working).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from scatlas.atlas.atomic import read_json_object, write_json_atomic
from scatlas.atlas.errors import IndexFormatError

logger = logging.getLogger(__name__)

CURRENT_FILE = "current.json"
VERSIONS_DIR = "versions"
_VERSION_DIR = re.compile(r"^versions/(\d{4,9})$")
ROOT_VERSION_FILES = ("shards", "cells.duckdb", "heads", "labels", "mapping.json", "progress.json")
"""What of version 1 (the root) is removed once it is superseded twice; build.json, embedder/, trained.faiss and
manifest.json stay (small, or shared by hard links), so the root still says what was built first."""


def version_dirname(version: int) -> str:
    """The directory of ``version`` (2 or later) relative to the index root."""
    return f"{VERSIONS_DIR}/{version:04d}"


def current_version(root: str | Path) -> tuple[int, Path]:
    """``(version, directory)`` of the index at ``root``: ``(1, root)`` until an update committed another."""
    root = Path(root)
    pointer = root / CURRENT_FILE
    if not pointer.is_file():
        return 1, root
    fix = "restore it from a backup or rebuild the index with --overwrite"
    payload = read_json_object(pointer, fix)
    rel, version = payload.get("dir"), payload.get("version")
    match = _VERSION_DIR.match(rel) if isinstance(rel, str) else None
    if match is None or not isinstance(version, int) or int(match.group(1)) != version:
        raise IndexFormatError(f"{pointer} does not name a version directory of this index; {fix}")
    target = root / str(rel)
    if not target.is_dir():
        raise IndexFormatError(f"{pointer} names version {version}, whose directory is missing; {fix}")
    return version, target


def enclosing_index(path: str | Path) -> tuple[Path, int] | None:
    """``(root, version)`` of the index whose version directory ``path`` is (``ROOT/versions/NNNN``), or None."""
    p = Path(path).resolve()
    root = p.parent.parent
    if p.parent.name == VERSIONS_DIR and re.fullmatch(r"\d{4,9}", p.name) and (root / "build.json").is_file():
        return root, int(p.name)
    return None


def refuse_version_dir(path: str | Path) -> None:
    """IndexFormatError when ``path`` is a version directory of an index: a build or an update there would nest
    versions inside a version that the index's next update deletes."""
    enclosing = enclosing_index(path)
    if enclosing is not None:
        root, version = enclosing
        raise IndexFormatError(
            f"{path} is version {version} of the index at {root}, kept by it for its readers, not an index of its "
            f"own: pass --index {root} (its current version is used), or build into a new directory"
        )


def resolve_index_dir(root: str | Path) -> Path:
    """The directory holding the current version of the index at ``root`` (``root`` itself before any update)."""
    return current_version(root)[1]


def commit_version(root: Path, version: int) -> None:
    """Make ``version`` (whose directory is complete) the current one: the atomic replace of ``current.json``."""
    write_json_atomic(root / CURRENT_FILE, {"version": version, "dir": version_dirname(version)})


def link_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where the file system has none); an existing ``dst`` is kept."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def link_tree(src: Path, dst: Path) -> None:
    """Every file under ``src`` hard-linked at the same place under ``dst`` (temporary files left out)."""
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            link_file(path, dst / path.relative_to(src))


def remove_superseded(root: Path, current: int) -> list[str]:
    """Remove versions older than ``current - 1`` (the previous one stays for readers that opened it just before
    the update); returns what was removed, relative to ``root``."""
    removed: list[str] = []
    vdir = root / VERSIONS_DIR
    if vdir.is_dir():
        for path in sorted(vdir.iterdir()):
            m = re.fullmatch(r"(\d{4,9})", path.name)
            if m is None or not path.is_dir():
                if path.name.startswith(".") and path.is_dir():  # a staging directory of an abandoned update
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if int(m.group(1)) < current - 1:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"{VERSIONS_DIR}/{path.name}")
    if current - 1 > 1:  # version 1, the root's own files
        for name in ROOT_VERSION_FILES:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            elif path.exists():
                path.unlink()
                removed.append(name)
    if removed:
        logger.info("removed superseded index files: %s", ", ".join(removed))
    return removed
