"""Embeddings that come with the data: ``precomputed:KEY`` reads ``chunk.obsm[KEY]`` (e.g. UCE or scVI vectors).

Nothing is computed, so atlas and query cells must carry vectors made by the same model: the fingerprint holds the
key and the dimension only, and it is up to the user to use one model per key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.base import Embedder
from scatlas.atlas.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputedParams:
    """The obsm ``key`` the vectors are read from and their dimension ``dim`` (None: learned by ``fit``)."""

    key: str
    dim: int | None = None


class PrecomputedEmbedder(Embedder):
    """Pass ``chunk.obsm[key]`` through, as float32, after checking its shape and values.

    ``dim`` is given, or learned by :meth:`fit` from the first non-empty chunk of the sample (a list, a re-iterable,
    an iterator or a zero-argument callable returning one: one pass is enough).
    """

    name = "precomputed"
    needs = "obsm"

    def __init__(self, key: str, dim: int | None = None) -> None:
        if not isinstance(key, str) or not key:
            raise InputError("the precomputed embedder needs an obsm key: --embedder precomputed:KEY")
        if dim is not None and int(dim) < 1:
            raise InputError(f"the dimension of precomputed:{key} must be positive (got {dim})")
        self.config = PrecomputedParams(key=key, dim=None if dim is None else int(dim))

    @property
    def obsm_key(self) -> str:
        return self.config.key

    @property
    def dim(self) -> int:
        if self.config.dim is None:
            raise InputError(
                f"the dimension of precomputed:{self.config.key} is not known yet: fit the embedder on a sample of "
                "the atlas, or give dim"
            )
        return self.config.dim

    @property
    def is_fitted(self) -> bool:
        return self.config.dim is not None

    @property
    def requires_fit(self) -> bool:
        return self.config.dim is None

    def params(self) -> dict[str, Any]:
        return asdict(self.config)

    def fit(self, sample: Iterable[CellChunk] | Callable[[], Iterable[CellChunk]]) -> None:
        """Learn (or check) the dimension from the first non-empty chunk of ``sample``."""
        source: Iterator[CellChunk] = iter(sample() if callable(sample) and not isinstance(sample, Iterable)
                                           else sample)  # type: ignore[arg-type]
        for chunk in source:
            if len(chunk) == 0:
                continue
            values = self._values(chunk)
            dim = int(values.shape[1]) if values.ndim == 2 else -1
            if values.ndim != 2 or dim < 1:
                raise InputError(
                    f"obsm[{self.config.key!r}] must be a 2-d matrix (cells x dimensions), got shape {values.shape}"
                )
            if self.config.dim is not None and dim != self.config.dim:
                raise InputError(
                    f"obsm[{self.config.key!r}] has {dim} columns but the embedder was given dim={self.config.dim}"
                )
            self.config = PrecomputedParams(key=self.config.key, dim=dim)
            logger.info("precomputed:%s: %d dimensions", self.config.key, dim)
            return
        raise InputError(
            f"cannot fit precomputed:{self.config.key} on an empty sample: the atlas (or the sample) has no cells"
        )

    def transform(self, chunk: CellChunk) -> np.ndarray:
        dim = self.dim
        values = self._values(chunk)
        if values.ndim != 2 or values.shape != (len(chunk), dim):
            raise InputError(
                f"obsm[{self.config.key!r}] has shape {values.shape}, expected ({len(chunk)}, {dim}) (one row per "
                f"cell, {dim} dimensions): the vectors were made by another model, or the chunk is inconsistent"
            )
        out = np.array(values, dtype=np.float32, copy=True)
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise InputError(
                f"obsm[{self.config.key!r}] has non-finite values (NaN or inf) in {len(rows)} cell(s), e.g. rows "
                f"{rows[:5].tolist()}: recompute the embedding or remove those cells"
            )
        return out

    def _values(self, chunk: CellChunk) -> np.ndarray:
        key = self.config.key
        if key not in chunk.obsm:
            available = ", ".join(sorted(chunk.obsm)) or "none"
            raise InputError(
                f"obsm key {key!r} is missing (available obsm keys: {available}); choose one with "
                f"--embedder precomputed:KEY or add the vectors to the data"
            )
        return np.asarray(chunk.obsm[key])

    @classmethod
    def _load(cls, directory: Path, params: dict[str, Any]) -> PrecomputedEmbedder:
        return cls(key=params["key"], dim=params.get("dim"))
