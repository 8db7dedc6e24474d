"""The one exception hierarchy of scatlas.

Every error a user can cause or fix derives from :class:`ScatlasError`. Messages say what is wrong *and* what to
do about it; the CLI prints them as ``Error: ...`` without a traceback and exits non-zero.
"""

from __future__ import annotations


class ScatlasError(Exception):
    """Base class of every error scatlas raises on purpose."""


class InputError(ScatlasError):
    """Bad user input: a missing or unreadable file, an unknown column, an invalid parameter."""


class DatasetExistsError(InputError):
    """A dataset id is already in the atlas store."""


class OutputError(InputError):
    """An output path is refused (it holds something else, or it is an input), or writing to it failed."""


class OutputWriteError(OutputError, OSError):
    """Writing an output failed (disk full, read-only file system, permissions); an OSError too, for callers that
    catch those. Its text says what failed and what to do."""


class GeneOverlapError(InputError):
    """Too few of the query's genes are known to the index or embedder."""


class SpeciesMismatchError(InputError):
    """The query's genes look like another species' than those the index's embedder reads."""


class TooFewCellsError(InputError):
    """The atlas has too few cells for what was asked (e.g. holding groups out to calibrate the mapping check)."""


class StoreError(ScatlasError):
    """The atlas store is missing, corrupt, locked, or of an unknown format."""


class IndexFormatError(ScatlasError):
    """An index directory is missing, incomplete (no manifest), corrupt, or of an unknown format."""


class EmbedderMismatchError(ScatlasError):
    """Vectors, classifiers or indexes made with different embedders were about to be mixed."""


class DependencyError(ScatlasError):
    """An optional dependency or device (faiss-gpu, CUDA, uce-model, ray) was asked for but is not available."""


class Interrupted(ScatlasError):
    """Work stopped on request before it finished (a lab server's job cancelled): nothing it was writing is
    complete."""


class TaskError(ScatlasError):
    """A unit of offline work (a shard of a build or a sweep) failed, after any retries the executor allows."""


DUCKDB_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "different configuration")
"""What DuckDB's error says when another process holds the database file (it allows one writer, or many readers)."""
