"""The embedder interface: fit on the atlas where needed, transform chunks of cells to float32 vectors.

An embedder is row-preserving and deterministic: a cell's vector depends only on that cell (and the fitted
artefact), never on which other cells share its chunk, and every input row yields one output row.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.genes import GeneMatch, GeneVocabulary

EMBEDDER_FILE = "embedder.json"
NPZ_LOAD_ERRORS = (KeyError, OSError, ValueError, TypeError, IndexError, EOFError, zipfile.BadZipFile, zlib.error)
"""What reading a damaged ``.npz`` artefact raises (a bad zip, a bad CRC, a truncated member, a bad array header,
a missing or malformed array); loaders turn these into :class:`~atlas.errors.StoreError`."""


@dataclass(frozen=True)
class CellReads:
    """What an embedder reads of each cell: ``x`` (whether the expression matrix X), ``obsm`` (keys of stored
    per-cell matrices) and ``obs`` (cell metadata columns, given to it in :attr:`CellChunk.obs`)."""

    x: bool
    obsm: tuple[str, ...] = ()
    obs: tuple[str, ...] = ()


class Embedder(ABC):
    """Base class of all embedders. Subclasses register themselves in :mod:`atlas.embed.registry`."""

    name: ClassVar[str]
    needs: ClassVar[Literal["X", "obsm"]] = "X"
    accelerated: ClassVar[bool] = False
    """Runs a model that wants a GPU (shard tasks then ask for one when the machine or cluster has GPUs)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of the output vectors."""
        ...

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`transform` can run (an embedder without a fit always can)."""
        return True

    @property
    def requires_fit(self) -> bool:
        """Whether the embedder must be fitted on an atlas sample before use."""
        return False

    @property
    def obsm_key(self) -> str | None:
        """The obsm key this embedder reads (``needs == "obsm"``)."""
        return None

    @property
    def obs_columns(self) -> tuple[str, ...]:
        """Cell metadata (obs) columns this embedder reads besides expression or vectors (e.g. scVI's batch
        column); readers put them in :attr:`CellChunk.obs`. None by default."""
        return ()

    def reads(self, cells: Literal["atlas", "query"]) -> CellReads:
        """What this embedder reads of ``cells``: ``"atlas"`` (the store's cells at build, ``build --update`` and
        label-head training) or ``"query"`` (annotate, search, a hunt's labelled cells). By default the same for
        both, from :attr:`needs`, :attr:`obsm_key` and :attr:`obs_columns`. An embedder that indexes vectors the
        atlas already holds but embeds queries from their expression (scVI with ``atlas_obsm``) overrides it."""
        key = self.obsm_key
        return CellReads(x=self.needs == "X", obsm=(key,) if self.needs == "obsm" and key else (),
                         obs=tuple(self.obs_columns))

    def fit(self, sample: Iterable[CellChunk]) -> None:  # noqa: B027 - a no-op default is intended
        """Fit on a sample of atlas chunks (stratified by dataset). Embedders that need no fit ignore it."""

    @abstractmethod
    def transform(self, chunk: CellChunk) -> np.ndarray:
        """Return ``(len(chunk), dim)`` float32 vectors, one per row of the chunk, in order."""

    def gene_match(self, genes: GeneVocabulary) -> GeneMatch | None:
        """How ``genes`` map onto the genes this embedder reads (``None`` when it reads no genes)."""
        return None

    def expressed(self, chunk: CellChunk) -> np.ndarray:
        """``(len(chunk),)`` bool: the cells with any positive expression on the genes this embedder reads.

        A cell without any carries nothing for the embedder to place: its vector is whatever an empty profile
        maps to, and a label read from it would be confident and meaningless (callers mark such cells rather than
        label them). Embedders that read no genes (``gene_match`` is None) report every cell."""
        n = len(chunk)
        if chunk.X is None:
            return np.ones(n, dtype=bool)
        match = self.gene_match(chunk.genes)
        if match is None:
            return np.ones(n, dtype=bool)
        X = sp.csr_matrix(chunk.X)[:, match.source_cols]  # a copy: the chunk is not modified
        X.data = (X.data > 0).astype(np.float32)
        return np.asarray(X.sum(axis=1)).ravel() > 0

    @property
    def gene_feature_names(self) -> list[str] | None:
        """Names of the columns of :meth:`gene_features` (``None``: this embedder has no gene features)."""
        return None

    def transform_with_features(self, chunk: CellChunk) -> tuple[np.ndarray, np.ndarray | None]:
        """``(transform(chunk), gene_features(chunk))``, computed together where the embedder can share the work
        (the PCA embedder normalises a chunk once for both)."""
        return self.transform(chunk), self.gene_features(chunk)

    def transform_gene_features(self, features: np.ndarray, present: np.ndarray) -> np.ndarray:
        """What :meth:`transform` returns for cells whose :meth:`gene_features` are ``features`` when only the genes
        marked in ``present`` (bool over :attr:`gene_feature_names`) are measured: the atlas side of a query that
        lacks the other genes, so that a model can be refitted on atlas cells embedded as that query is."""
        raise NotImplementedError(f"the {self.name} embedder cannot embed from gene features")

    def gene_features(self, chunk: CellChunk) -> np.ndarray | None:
        """Gene-level features of the cells, ``(len(chunk), n_features)`` float32, that a supervised label head
        can read besides the embedding (the expression the embedder itself starts from, before any projection);
        ``None`` when the embedder has none (precomputed vectors, models with their own tokenisation)."""
        return None

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters that, with the saved artefact, reproduce the embedder."""

    def on_device(self, device: str) -> Embedder:
        """This embedder running on ``device`` (``cpu``, ``cuda:N``): itself, unless it runs a model on a device."""
        return self

    def artefact_digest(self) -> str:
        """A digest of the fitted artefact (weights, gene list, ...); empty when there is none."""
        return ""

    def fingerprint(self) -> str:
        """16 hex digits identifying the vectors: name, params and the fitted artefact's digest."""
        payload = json.dumps({"name": self.name, "params": self.params()}, sort_keys=True, default=str)
        return hashlib.sha256((payload + self.artefact_digest()).encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        """Write ``embedder.json`` (name, params, fingerprint) and any artefact files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_artefact(directory)
        meta = {"name": self.name, "params": self.params(), "fingerprint": self.fingerprint(), "dim": self.dim}
        (directory / EMBEDDER_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))

    def _save_artefact(self, directory: Path) -> None:  # noqa: B027 - optional hook
        """Subclasses with artefacts write them here."""

    @classmethod
    @abstractmethod
    def _load(cls, directory: Path, params: dict[str, Any]) -> Embedder: ...
