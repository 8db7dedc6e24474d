"""Opening a built index and using it: search (with SQL filters), metadata lookups, embedding, shard sweeps."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from scatlas.atlas.atomic import read_json_object
from scatlas.atlas.errors import EmbedderMismatchError, IndexFormatError, InputError, StoreError
from scatlas.index._faiss import faiss_module
from scatlas.index.device import faiss_gpu_count, resolve_device, set_faiss_threads
from scatlas.index.label_classes import LabelClasses, identity_classes, load_label_classes
from scatlas.index.label_heads import LabelHead, load_label_heads
from scatlas.index.manifest import (
    CELLS_DB_FILE,
    DEFAULT_K,
    EMBEDDER_DIR,
    MAPPING_FILE,
    SHARDS_DIR,
    TRAINED_FILE,
    IndexManifest,
    manifest_digest,
    mapping_fix,
    read_manifest,
)
from scatlas.index.metadata import cells_frame, columns_of, connect, value_counts, where_ids
from scatlas.index.refmap_model import ReferenceMap, load_reference_map
from scatlas.index.sampling import sample_sorted
from scatlas.index.searcher import QUERY_BATCH, ShardSearcher
from scatlas.index.shard import check_shard_ids, damaged_hint, verify_shard
from scatlas.index.unfinished import check_finished
from scatlas.index.vectors import check_queries, l2_normalize
from scatlas.index.verify import (
    check_big_file,
    check_files,
    check_small_files,
    note_once,
    read_bytes_total,
    verify_on_read_limit,
)
from scatlas.index.versions import current_version, enclosing_index, resolve_index_dir

if TYPE_CHECKING:
    from scatlas.atlas.chunks import CellChunk
    from scatlas.atlas.embed.base import Embedder

logger = logging.getLogger(__name__)

EXACT_FILTER_MAX = 20_000
"""A ``where`` filter matching at most this many cells is searched exactly over their stored vectors (an IVF
index probing ``nprobe`` lists could otherwise return fewer than ``k`` of them)."""


class SearchResult(NamedTuple):
    """Neighbours, best first: ``ids (n, k) int64`` (-1 where fewer than k) and cosine ``scores (n, k) float32``
    (-inf where the id is -1)."""

    ids: np.ndarray
    scores: np.ndarray


def id_bitmap_selector(ids: np.ndarray, id_max: int) -> tuple[Any, np.ndarray]:
    """An ``IDSelectorBitmap`` over ids ``0..id_max``; the bitmap is returned too and must outlive the selector."""
    faiss = faiss_module()

    ids = ids[(ids >= 0) & (ids <= id_max)]
    bitmap = np.zeros(id_max // 8 + 1, dtype=np.uint8)
    np.bitwise_or.at(bitmap, ids >> 3, (1 << (ids & 7)).astype(np.uint8))
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap


def _checksum_on_read(path: Path, manifest: IndexManifest) -> bool:
    """Whether the index is small enough to checksum its big files on first read (logged once when not)."""
    limit, total = verify_on_read_limit(), read_bytes_total(manifest)
    if limit and total <= limit:
        return True
    note_once(
        "no-checksum-on-read", path, logging.INFO,
        "index %s: its %.1f GiB of shards and databases are not checksummed when read (over the %.1f GiB of "
        "$SCATLAS_VERIFY_ON_READ_MAX_BYTES%s); run `scatlas verify --index %s` after copying or restoring it",
        path, total / 2**30, limit / 2**30, ", 0 = never" if not limit else "", path,
    )
    return False


def _check_files(path: Path, manifest: IndexManifest, *, verify: bool, on_read: bool) -> None:
    """Sizes of ``trained.faiss`` and ``cells.duckdb`` (their checksums too with ``verify``; ``trained.faiss``'s
    with ``on_read``), and the sizes and checksums of the small files."""
    big = {TRAINED_FILE: manifest.trained, CELLS_DB_FILE: manifest.cells_db}
    check_files(path, big, fix=damaged_hint(path), checksum=False)
    check_small_files(path, manifest)
    if on_read:
        check_big_file(path, TRAINED_FILE, manifest.trained, cached=not verify)
    if verify:
        check_big_file(path, CELLS_DB_FILE, manifest.cells_db, cached=False)


_EMBEDDER_LOAD_ERRORS = (StoreError, OSError, ValueError, KeyError, TypeError, EOFError)


def _load_embedder(edir: Path) -> Embedder:
    """The embedder saved in ``edir``, with any failure to read it as IndexFormatError."""
    import zipfile
    import zlib

    from scatlas.atlas.embed import load_embedder

    try:
        emb: Embedder = load_embedder(edir)
    except (*_EMBEDDER_LOAD_ERRORS, zipfile.BadZipFile, zlib.error) as exc:
        raise IndexFormatError(
            f"the index's embedder in {edir} cannot be loaded ({exc}); {damaged_hint(edir.parent)}"
        ) from exc
    return emb


class AtlasIndex:
    """A read-only view of an index directory (use :meth:`open`): search, the stored vectors, the cells table, the
    embedder and the label heads. Everything :mod:`query` uses of an index goes through this class."""

    def __init__(
        self, path: Path, manifest: IndexManifest, searcher: ShardSearcher, *, verify_on_read: bool = False,
        build_id: str | None = None,
    ) -> None:
        self.path = path
        self._manifest = manifest
        self._build_id = build_id
        self._searcher = searcher
        self._verify_on_read = verify_on_read
        self._embedder: Embedder | None = None
        self._con: Any = None
        self._heads: dict[str, LabelHead] | None = None
        self._classes: dict[str, LabelClasses] | None = None
        self._identity: dict[str, LabelClasses] = {}
        self._refmap: list[ReferenceMap | None] = []
        self._mapping: tuple[dict[str, Any] | None, IndexFormatError | None] = self._read_mapping()

    def _read_mapping(self) -> tuple[dict[str, Any] | None, IndexFormatError | None]:
        """The mapping calibration file of the version opened, read now (a later ``build --update`` moves the files
        of a superseded version away): its JSON object (None: no file), or the error reading it."""
        path = self.path / MAPPING_FILE
        if not path.is_file():
            return None, None
        try:
            return read_json_object(path, mapping_fix(self.path)), None
        except IndexFormatError as exc:
            return None, exc

    @property
    def mapping_data(self) -> dict[str, Any] | None:
        """The index's mapping calibration file (``mapping.json``) as read when the index was opened: a JSON object
        to parse with :func:`index.mapping.mapping_calibration` (untrusted), None when it has none. IndexFormatError
        when it was unreadable."""
        data, error = self._mapping
        if error is not None:
            raise error
        return data

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (e.g. into a Ray task) as "open the index at this path": handles and mappings do not travel."""
        return (AtlasIndex.open, (str(self.path),))

    @classmethod
    def open(
        cls, path: str | Path, *, verify: bool = False, threads: int | None = None, mmap: bool = False,
        device: str = "cpu", unfinished_ok: bool = False,
    ) -> AtlasIndex:
        """Open and validate an index directory.

        Checks the manifest (present, known format), that every listed file exists with its recorded size, the
        SHA-256 of the small files (``build.json``, ``embedder/*``) and each shard's id count and range. When the
        big files total at most :func:`index.verify.verify_on_read_limit` bytes (2 GiB), ``trained.faiss`` is
        checksummed here, each shard before its first use and ``cells.duckdb`` before the first metadata query.
        ``verify=True`` checks every checksum now (reads everything). Damage raises IndexFormatError.
        ``threads``: FAISS threads (default ``$SCATLAS_THREADS`` or all cores). ``mmap``: memory-map shard indexes
        instead of loading them. ``device``: ``cpu`` (default), ``cuda`` (every GPU FAISS sees: the coarse
        quantizer replicated on each, flat shards spread across them; DependencyError without one) or ``auto``.
        An index whose build has not finished is refused (:mod:`index.unfinished`) unless ``unfinished_ok`` (the
        build's own steps after the shards).
        """
        faiss = faiss_module()

        enclosing = enclosing_index(path) if not unfinished_ok else None  # an update's own steps open its version
        if enclosing is not None:
            root, version = enclosing
            current = current_version(root)[0]
            if version != current:  # (the current version's directory is what a pickled index reopens)
                logger.warning("%s is version %d of the index at %s, opened as it is: the index's current version is "
                               "%d (open %s for it)", path, version, root, current, root)
        path = resolve_index_dir(Path(path))  # the current version (index.versions)
        if not unfinished_ok:
            check_finished(path)
        manifest = read_manifest(path)
        build_id = manifest_digest(path)
        on_read = verify or _checksum_on_read(path, manifest)
        _check_files(path, manifest, verify=verify, on_read=on_read)
        shards = []
        for shard in manifest.shards:
            sdir = path / SHARDS_DIR / shard.dirname
            verify_shard(sdir, shard, checksums=verify, cached=False)
            check_shard_ids(sdir, shard)
            shards.append((shard, sdir))
        set_faiss_threads(threads)
        try:
            trained = faiss.read_index(str(path / TRAINED_FILE))
        except RuntimeError as exc:
            raise IndexFormatError(f"{path / TRAINED_FILE} is unreadable ({exc}); {damaged_hint(path)}") from exc
        if trained.d != manifest.dim:
            raise IndexFormatError(f"{path / TRAINED_FILE} is {trained.d}-d, the manifest says {manifest.dim}")
        gpus = faiss_gpu_count() if resolve_device(device) == "cuda" else 0
        searcher = ShardSearcher(trained, shards, mmap=mmap, gpus=gpus, verify_on_read=on_read)
        return cls(path, manifest, searcher, verify_on_read=on_read, build_id=build_id)

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def manifest(self) -> IndexManifest:
        return self._manifest

    @property
    def build_id(self) -> str:
        """A short id of this build of the index (:func:`index.manifest.manifest_digest`): what label heads and hunt
        classifiers record as the index they were trained against. Training label heads leaves it unchanged."""
        if self._build_id is None:
            self._build_id = manifest_digest(self.path)
        return self._build_id

    @property
    def embedder_fingerprint(self) -> str:
        """The fingerprint of the embedder that made the index's vectors (what queries and classifiers must match)."""
        return self._manifest.embedder.fingerprint or self.embedder.fingerprint()

    @property
    def atlas_path(self) -> Path | None:
        """Where the atlas store the index was built from was (per the manifest; it may have moved), or None."""
        path = self._manifest.atlas_snapshot.get("path")
        return Path(path) if path else None

    @property
    def atlas_store_id(self) -> str:
        """The id of the atlas store the index was built from ("" for an index built from vectors alone): its cells'
        ids (soma_joinid) are that store's."""
        return str(self._manifest.atlas_snapshot.get("store_id") or "")

    @property
    def n_cells(self) -> int:
        return self._manifest.n_cells

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def has_embedder(self) -> bool:
        """Whether the index holds the embedder that made its vectors (False: built from precomputed vectors)."""
        return (self.path / EMBEDDER_DIR / "embedder.json").is_file()

    @property
    def embedder(self) -> Embedder:
        """The index's own embedder (loaded on first use; its fingerprint must match the manifest). InputError for
        an index built from precomputed vectors (:attr:`has_embedder` is False)."""
        if self._embedder is None:
            info = self._manifest.embedder
            edir = self.path / EMBEDDER_DIR
            if not self.has_embedder:
                raise InputError(
                    f"the index at {self.path} was built from precomputed vectors without an embedder "
                    f"({info.name!r}); embed queries yourself and pass vectors to search()"
                )
            emb = _load_embedder(edir)
            if emb.fingerprint() != info.fingerprint:
                raise EmbedderMismatchError(
                    f"the embedder in {edir} has fingerprint {emb.fingerprint()} but the index was built with "
                    f"{info.fingerprint}; the directory was modified: rebuild the index"
                )
            self._embedder = emb
        return self._embedder

    def label_heads(self) -> dict[str, LabelHead]:
        """The supervised label heads trained for this index (``{label column: LabelHead}``; empty when none;
        see :mod:`index.label_heads`)."""
        if self._heads is None:
            self._heads = load_label_heads(
                self.path, embedder_fingerprint=self._manifest.embedder.fingerprint,
                recorded=self._manifest.heads_files,
            )
        return self._heads

    def label_classes(self, key: str) -> LabelClasses:
        """The classes of label column ``key`` (:mod:`index.label_classes`): its values merged by Cell Ontology
        term, as stored at build time. For an index built before label classes, or a column without stored
        classes: identity classes from the cells table (each value its own class, no terms). IndexFormatError when
        the manifest records label-class files that are missing or damaged; InputError when ``key`` is not a
        column of the cells table."""
        if self._classes is None:
            self._classes = load_label_classes(
                self.path, recorded=self._manifest.labels_files, digest=self.build_id
            )
        if key in self._classes:
            return self._classes[key]
        if key not in self._identity:
            values, _counts = self.value_counts(key)
            self._identity[key] = identity_classes(key, values.tolist())
        return self._identity[key]

    def reference_map(self) -> ReferenceMap | None:
        """The 2-D reference map of the atlas fitted at build (:mod:`index.refmap`): ``.transform(vectors) -> (n, 2)``
        places cells on it; ``.ids`` / ``.coords`` are the sampled atlas cells and their coordinates. None when the
        index has none (built with ``--no-map``, before maps existed, or from under 50 cells). IndexFormatError
        when its recorded files are missing or damaged (their SHA-256 is checked before they are read)."""
        if not self._refmap:
            self._refmap.append(load_reference_map(
                self.path, recorded=self._manifest.refmap_files, digest=self.build_id, dim=self.dim
            ))
        return self._refmap[0]

    def embed(self, chunk: CellChunk) -> np.ndarray:
        """``(n, dim)`` float32 L2-normalised vectors of a chunk of cells, with the index's embedder."""
        return l2_normalize(self.embedder.transform(chunk))

    # -- search ---------------------------------------------------------------------------------------------
    def search(
        self,
        vectors: np.ndarray,
        k: int | None = None,
        where: str | None = None,
        nprobe: int | None = None,
        rerank: int | None = None,
        batch_size: int = QUERY_BATCH,
    ) -> SearchResult:
        """The ``k`` (default: the manifest's, 30) most similar atlas cells of each query vector.

        ``where``: an SQL predicate over the cells table (e.g. ``"tissue = 'lung' AND disease = 'normal'"``),
        applied inside the FAISS search by an id selector. ``nprobe`` / ``rerank``: override the defaults the
        build chose to reach its recall target (``rerank=0`` turns exact re-ranking off).
        """
        k = self._manifest.search.k if k is None else int(k)
        if k < 1:
            raise InputError(f"k must be >= 1 (got {k})")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1 (got {batch_size})")
        q = check_queries(vectors, self.dim)
        nprobe = self._manifest.search.nprobe if nprobe is None else int(nprobe)
        rerank = self._manifest.search.rerank if rerank is None else int(rerank)
        if rerank < 0 or (nprobe is not None and nprobe < 1):
            raise InputError(f"nprobe must be >= 1 and rerank >= 0 (got nprobe={nprobe}, rerank={rerank})")
        if where is None:
            ids, scores = self._searcher.search(q, k, nprobe=nprobe, rerank=rerank, batch_size=batch_size)
            return SearchResult(ids, scores)
        subset = self.filter_ids(where)
        if not self._searcher.exact and len(subset) <= EXACT_FILTER_MAX:
            logger.debug("where filter matches %d cells: exact search over them", len(subset))
            ids, scores = self._searcher.exact_search(q, k, subset=subset)
            return SearchResult(ids, scores)
        selector, _bitmap = id_bitmap_selector(subset, self._searcher.id_max)
        ids, scores = self._searcher.search(
            q, k, nprobe=nprobe, rerank=rerank, selector=selector, batch_size=batch_size
        )
        del _bitmap  # the selector points into it: keep it alive until the search is done
        return SearchResult(ids, scores)

    def filter_ids(
        self, where: str, *, allow_empty: bool = False, what: str = "where filter", negate: bool = False,
        among: np.ndarray | None = None,
    ) -> np.ndarray:
        """Sorted ids of the cells matching an SQL predicate over the cells table, checked by
        :func:`index.predicate.validate_predicate` before it runs (InputError naming ``what`` when it is invalid,
        or, unless ``allow_empty``, when it matches no cell). ``negate``: the cells where it is false (not NULL);
        ``among``: only these ids are looked at."""
        with self.cursor() as con:
            return where_ids(con, where, allow_empty=allow_empty, what=what, negate=negate, among=among)

    def exact_search(self, vectors: np.ndarray, k: int = DEFAULT_K) -> SearchResult:
        """Brute force over the stored vectors (for evaluation; slow on large atlases)."""
        ids, scores = self._searcher.exact_search(check_queries(vectors, self.dim), k)
        return SearchResult(ids, scores)

    # -- metadata and vectors -------------------------------------------------------------------------------
    def connect(self) -> Any:
        """A read-only DuckDB connection to the index's ``cells.duckdb`` (shared by this object)."""
        if self._con is None:
            if self._verify_on_read:
                check_big_file(self.path, CELLS_DB_FILE, self._manifest.cells_db)
            self._con = connect(self.path / CELLS_DB_FILE)
        return self._con

    def thread_view(self) -> AtlasIndex:
        """A view of this index for another thread: it shares everything loaded (shards, embedder, heads, map) and
        has its own DuckDB cursor, DuckDB connections being unsafe to share across threads. Load what the threads
        read before making views (a lazy load in one view is not seen by the others); close the view's
        :meth:`connect` cursor when the thread is done, never the view itself (that closes the shared shards)."""
        view = object.__new__(AtlasIndex)
        view.__dict__.update(self.__dict__)
        view._con = self.connect().cursor()
        return view

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        """A private cursor on the index's shared DuckDB connection, closed afterwards (the connection stays open)."""
        cur = self.connect().cursor()
        try:
            yield cur
        finally:
            cur.close()

    def columns(self) -> list[str]:
        """The columns of the cells table."""
        return columns_of(self.connect())

    def value_counts(self, column: str, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(values, cell counts) of ``column`` among the cells ``ids`` (None: all), NULLs left out."""
        return value_counts(self.connect(), column, ids)

    def cells(self, ids: np.ndarray, columns: list[str] | None = None) -> pd.DataFrame:
        """Metadata rows for ``ids`` (flattened), in order; -1 and unknown ids give rows of NaN."""
        return cells_frame(self.connect(), ids, columns)

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(shard_no, ids int64 memmap, vectors float16 memmap (n, dim))`` for every shard, in id order."""
        yield from self._searcher.iter_shards()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors (float32 copies of the float16 values) of cells ``ids`` (1-D, any order), in that
        order; InputError when the index does not hold some of them."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        missing = ~self._searcher.contains(ids)
        if missing.any():
            raise InputError(
                f"{int(missing.sum())} cell ids are not in the index (e.g. {int(ids[missing][0])}); the index may be "
                "older than the atlas: rebuild it"
            )
        return self._searcher.gather(ids)

    def sample_ids(self, n: int, *, exclude: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        """Up to ``n`` cell ids drawn uniformly (seeded) from all indexed cells except ``exclude``, sorted."""
        excl = np.zeros(0, dtype=np.int64) if exclude is None else np.unique(np.asarray(exclude, dtype=np.int64))
        n = int(min(n, max(self.n_cells - len(excl), 0)))
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng(seed)
        # oversample by the excluded count, so that removing excluded ids still leaves n
        ids = self._searcher.ids_at(sample_sorted(self.n_cells, n + len(excl), rng))
        return sample_sorted(np.setdiff1d(ids, excl), n, rng).astype(np.int64)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> AtlasIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self._manifest
        return f"AtlasIndex({str(self.path)!r}, n_cells={m.n_cells}, dim={m.dim}, factory={m.factory!r})"
