"""What an embedder reads from cells: the expression matrix X, an embedding stored in ``obsm``, cell metadata
(``obs`` columns); of atlas cells (the store's: :func:`reads_x`, :func:`obsm_keys`, :func:`obs_columns`) and of
query cells (:func:`cell_reads` with ``"query"``, :func:`check_obsm`). The one place a read is decided."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from scatlas.atlas.embed.base import CellReads
from scatlas.atlas.errors import InputError


def cell_reads(embedder: Any, cells: Literal["atlas", "query"] = "atlas") -> CellReads:
    """What ``embedder`` reads of atlas or query cells (:meth:`Embedder.reads`; for an object without that method,
    from its ``needs`` and ``obsm_key``)."""
    reads = getattr(embedder, "reads", None)
    if callable(reads):
        return reads(cells)  # type: ignore[no-any-return]
    key = embedder.obsm_key
    return CellReads(x=embedder.needs == "X", obsm=(key,) if embedder.needs == "obsm" and key else ())


def reads_x(embedder: Any) -> bool:
    """Whether ``embedder`` reads the expression matrix X of atlas cells."""
    return bool(cell_reads(embedder).x)


def obsm_keys(embedder: Any) -> tuple[str, ...]:
    """The ``obsm`` keys ``embedder`` reads of atlas cells (none unless it embeds a stored embedding)."""
    return tuple(cell_reads(embedder).obsm)


def obs_columns(embedder: Any) -> tuple[str, ...]:
    """The cell metadata columns ``embedder`` reads of atlas cells (none unless it asks for some, e.g. scVI's
    ``batch_key``)."""
    return tuple(cell_reads(embedder).obs)


def check_obsm(embedder: Any, available: Sequence[str], what: str) -> tuple[str, ...]:
    """The ``obsm`` keys ``embedder`` reads of query cells, once checked among the keys ``what`` (e.g.
    ``"the query"``) has; InputError naming the missing key otherwise."""
    keys = tuple(cell_reads(embedder, "query").obsm)
    for key in keys:
        if key not in available:
            raise InputError(
                f"the index's embedder reads obsm[{key!r}], which {what} lacks (obsm keys: "
                f"{list(available) or 'none'}); compute that embedding for {what} first, with the model the index "
                "was built with"
            )
    return keys
