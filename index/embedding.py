"""What an embedder reads from cells: the expression matrix X, or an embedding stored in ``obsm``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scatlas.atlas.errors import InputError


def reads_x(embedder: Any) -> bool:
    """Whether ``embedder`` reads the expression matrix X."""
    return bool(embedder.needs == "X")


def obsm_keys(embedder: Any) -> tuple[str, ...]:
    """The ``obsm`` keys ``embedder`` reads (none unless it embeds a stored embedding)."""
    key = embedder.obsm_key
    return (key,) if embedder.needs == "obsm" and key else ()


def check_obsm(embedder: Any, available: Sequence[str], what: str) -> tuple[str, ...]:
    """The ``obsm`` keys ``embedder`` reads, once checked among the keys ``what`` (e.g. ``"the query"``) has;
    InputError naming the missing key otherwise."""
    if embedder.needs != "obsm":
        return ()
    key = embedder.obsm_key
    if key is None or key not in available:
        raise InputError(
            f"the index's embedder reads obsm[{key!r}], which {what} lacks (obsm keys: {list(available) or 'none'}); "
            f"compute that embedding for {what} first, with the model the index was built with"
        )
    return (key,)
