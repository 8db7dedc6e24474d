"""One index for the whole server: opened and loaded once, shared read-only by every request and job thread.

What an :class:`~scatlas.index.AtlasIndex` holds splits in two:

* the heavy, read-only part (the FAISS shards and their stored vectors, the embedder, the label heads and classes,
  the reference map, the manifest): loaded once here, at start-up (:meth:`SharedIndex.warm`), and shared. FAISS
  searches on a CPU index, the embedder's ``transform``, the heads' forward pass and the map's ``transform`` only
  read it; the few lazy caches (the embedder's gene matches, identity label classes) are dictionaries whose entries
  are set whole (at worst computed twice);
* the DuckDB connection to ``cells.duckdb``: a DuckDB connection object is *not* safe to use from several threads
  at once (a second ``execute`` replaces the result the first is still fetching), and ``AtlasIndex.cells()``,
  ``columns()`` and ``value_counts()`` use the index's one connection directly.

So every thread gets its own *view* (:meth:`SharedIndex.view`): an ``AtlasIndex`` that shares the first part by
reference and has its own DuckDB cursor (a connection of its own to the same read-only, locked-down database
instance: external access, extension installs and configuration changes stay off). Views are made once per thread
and closed with the server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.errors import ScatlasError
from scatlas.atlas.sql import quote_ident
from scatlas.index import AtlasIndex, index_info

logger = logging.getLogger(__name__)

LABEL_TOP = 12
"""Labels per dataset shown in the overview (the rest summed as "other")."""


class SharedIndex:
    """The index at ``path``, opened once; :meth:`view` gives the calling thread its own view of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index = AtlasIndex.open(self.path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._views: list[AtlasIndex] = []
        self._closed = False
        try:
            self.warnings = self.warm()
            self.info: dict[str, Any] = index_info(self.path)
            with self.index.cursor() as con:
                self.column_types = {str(r[0]): str(r[1]) for r in con.execute("DESCRIBE cells").fetchall()}
            self.overview = self._overview()
        except BaseException:
            self.index.close()
            raise

    def newer_on_disk(self) -> str | None:
        """A note when the index on disk is no longer the build this process serves (it keeps serving the one it
        opened, whole): ``build --update`` committed a newer version, or ``build --overwrite`` replaced it; or
        None."""
        from scatlas.index.manifest import manifest_digest
        from scatlas.index.versions import current_version

        try:
            on_disk, directory = current_version(self.path)
            build_id = manifest_digest(directory)
        except (ScatlasError, OSError):
            return None
        served = self.info.get("version") or 1
        if build_id == self.index.build_id:
            return None
        if on_disk > served:
            return (f"the index on disk is at version {on_disk}, this server serves version {served} (it was updated "
                    "after the server started): restart the server to serve the update")
        return ("the index on disk was rebuilt after the server started (build --overwrite): this server still serves "
                "the build it opened; restart it to serve the new one")

    def warm(self) -> list[str]:
        """Load everything the jobs read (embedder, label heads and classes, reference map, every shard, the cells
        table's connection) now, in this one thread, so that no view loads it again. Returns what could not be
        loaded (the jobs that need it then fail with the same message)."""
        idx, problems = self.index, []
        idx.connect()
        for name, load in (("embedder", lambda: idx.embedder), ("label heads", idx.label_heads),
                           ("reference map", idx.reference_map)):
            try:
                load()
            except ScatlasError as exc:
                problems.append(f"{name}: {exc}")
                logger.warning("could not load the index's %s: %s", name, exc)
        try:
            for key in idx.label_heads():
                idx.label_classes(key)
        except ScatlasError as exc:
            problems.append(f"label classes: {exc}")
        if idx.n_cells:
            probe = np.zeros((1, idx.dim), dtype=np.float32)
            probe[0, 0] = 1.0
            idx.search(probe, k=1)  # reads every shard's FAISS index
            idx.vectors(idx.sample_ids(1))  # maps the stored vectors
        return problems

    def view(self) -> AtlasIndex:
        """This thread's view of the index (made on first use): shares everything loaded but has its own DuckDB
        cursor; see the module docstring."""
        view = getattr(self._local, "view", None)
        if view is None:
            with self._lock:
                if self._closed:
                    raise ScatlasError("the server is shutting down")
                view = self.index.thread_view()
                self._views.append(view)
            self._local.view = view
        return view

    def has_map(self) -> bool:
        try:
            return self.index.reference_map() is not None
        except ScatlasError:
            return False

    def label_column(self) -> str | None:
        """The label column the page shows by dataset: ``cell_type`` when the atlas has it, else the first."""
        labels = list(self.info.get("label_columns") or {})
        return labels[0] if labels else None

    def _overview(self) -> dict[str, Any]:
        """Cells per (dataset, label) of :meth:`label_column`, the top :data:`LABEL_TOP` labels of each dataset."""
        column = self.label_column()
        out: dict[str, Any] = {"label_column": column, "labels_by_dataset": {}}
        if column is None or "dataset_id" not in self.column_types:
            return out
        with self.index.cursor() as con:
            rows = con.execute(
                f"SELECT CAST(dataset_id AS VARCHAR), CAST({quote_ident(column)} AS VARCHAR), count(*) "
                "FROM cells GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
            ).fetchall()
        by: dict[str, list[list[Any]]] = {}
        for dataset, label, n in rows:
            by.setdefault(str(dataset), []).append(["(no label)" if label is None else str(label), int(n)])
        for dataset, labels in by.items():
            top = labels
            if len(labels) > LABEL_TOP + 1:  # one label past the top is shown by name, not as "other (1 labels)"
                rest = labels[LABEL_TOP:]
                top = [*labels[:LABEL_TOP], [f"other ({len(rest)} labels)", sum(n for _, n in rest)]]
            out["labels_by_dataset"][dataset] = top
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            views, self._views = self._views, []
        for view in views:
            with contextlib.suppress(Exception):  # a cursor of a connection closed already
                view.connect().close()
        self.index.close()
