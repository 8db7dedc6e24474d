"""scVI (Lopez et al. 2018) on scvi-tools: a variational autoencoder of raw counts whose latent mean is the
embedding, trained on the atlas sample or loaded from a pretrained scvi-tools model directory.

* ``fit`` (no ``model_dir``): the build's stratified sample, read once and held in memory as counts (refused for
  log-normalised or scaled data); the ``n_hvg`` highly variable genes of the sample (scanpy's ``seurat_v3`` flavour
  on counts, per batch when there are several; a variance rule on log1p(CP10k) when scanpy or scikit-misc is
  missing); then an SCVI model with one batch per dataset (``batch_key="dataset_id"``; ``"none"``: one batch)
  trained for ``max_epochs`` on every sampled cell, set up as scvi-tools advises for a reference that queries are
  mapped onto later (``encode_covariates=True``, layer norm, no batch norm). Seeded; the global random states are
  restored afterwards. ``batch_key=COLUMN``: the batch is that obs column (:mod:`atlas.embed.scvi_batches`).
* ``model_dir=PATH``: a model saved by scvi-tools (``model.save``; e.g. a CELLxGENE Census scVI model): its var
  names (Ensembl ids or symbols) are the genes; no fit. With ``atlas_obsm=KEY`` the atlas cells' vectors are read
  from the store's ``obsm[KEY]`` (that model's embedding, e.g. the Census'; no X read, the dimension checked by
  ``fit``) while queries are embedded by the model (:meth:`SCVIEmbedder.reads`).
* ``transform``: the chunk's counts on the model's genes (genes it lacks are zero) and each cell's batch (its
  dataset id, or its value of the ``batch_key`` column; a cell without one: its source's name) when the model
  knows it. A batch the model has not seen (a query, or a dataset that ``build --update`` added)
  is embedded with the encoder alone as the reference batch ``unseen_batch`` (default: the largest batch of the
  fit sample), unless :meth:`SCVIEmbedder.prepare_query` trained a query update for it. ``transform`` never
  trains: every atlas cell embeds the same way at build, update, heads training and search.
* :meth:`SCVIEmbedder.prepare_query`: the scArches query update scvi-tools provides (``prepare_query_anndata``,
  ``load_query_data``, a short training of the new batches' parameters with weight decay off), once per query,
  on the query's cells of unseen batches (at most ``query_max_cells``); its cost is logged and returned.
* The embedder directory holds the model in scvi-tools' format (``scvi_model/model.pt``) and the gene list
  (``scvi_genes.npz``); the fingerprint hashes the weights, the genes, the batches and the parameters.

Training and embedding run on ``device`` (auto: CUDA when torch sees a GPU; cuda without one is an error) with
``threads`` torch CPU threads (1 by default). Progress is logged (about ten lines per training), never printed.

The batch column is read from ``CellChunk.obs`` (the embedder asks for it: :attr:`SCVIEmbedder.obs_columns`).
``gene_features`` is None: label heads use the embedding only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed import scvi_backend as backend
from scatlas.atlas.embed import scvi_batches as batching
from scatlas.atlas.embed.base import NPZ_LOAD_ERRORS, CellReads, Embedder
from scatlas.atlas.embed.pca import SampleSource, sample_pass
from scatlas.atlas.embed.scvi_params import (
    AUTO,
    FIT_STEPS,
    GENES_FILE,
    MODEL_DIR,
    QUERY_EPOCHS,
    QUERY_STEPS,
    SCVIParams,
    auto_epochs,
)
from scatlas.atlas.errors import InputError, StoreError
from scatlas.atlas.genes import GeneMatch, GeneVocabulary, match_genes

logger = logging.getLogger(__name__)

_MAX_MATCH_CACHE = 64


@dataclass
class _Query:
    """A query update: the model, its setup, and the gene spaces of the chunks it was trained on."""

    model: Any
    info: backend.ModelInfo
    genes: set[str] = field(default_factory=set)


class SCVIEmbedder(Embedder):
    """scVI latent means of raw counts (scvi-tools), trained on the atlas sample or loaded from model_dir.

    See the module docstring: genes, batches, unseen batches and the query update (:meth:`prepare_query`)."""

    name = "scvi"
    needs = "X"
    accelerated = True

    def __init__(
        self,
        n_hvg: int = 2000,
        n_latent: int = 30,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        gene_likelihood: str = "zinb",
        encode_covariates: bool = True,
        max_epochs: int | str = AUTO,
        batch_size: int = 128,
        seed: int = 0,
        batch_key: str = "dataset_id",
        query_update: bool = True,
        query_epochs: int | str = AUTO,
        query_max_cells: int = 20_000,
        unseen_batch: str | None = None,
        model_dir: str | Path | None = None,
        atlas_obsm: str | None = None,
        device: str = "auto",
        threads: int = 1,
    ) -> None:
        self.config = SCVIParams(
            n_hvg=int(n_hvg), n_latent=int(n_latent), n_layers=int(n_layers), n_hidden=int(n_hidden),
            dropout_rate=float(dropout_rate), gene_likelihood=str(gene_likelihood),
            encode_covariates=encode_covariates, max_epochs=max_epochs, batch_size=int(batch_size), seed=int(seed),
            batch_key=str(batch_key), query_update=query_update, query_epochs=query_epochs,
            query_max_cells=int(query_max_cells), unseen_batch=None if unseen_batch is None else str(unseen_batch),
            model_dir=None if model_dir is None else str(Path(model_dir).expanduser().resolve()),
            atlas_obsm=None if atlas_obsm is None else str(atlas_obsm), device=str(device), threads=int(threads),
        )
        backend.import_scvi()  # fail early when scvi-tools is missing
        self._device = backend.resolve_device(self.config.device)
        self._init_state()
        if self.config.model_dir is not None:
            self._set_model(backend.load_model(Path(self.config.model_dir), self._device), self.config.model_dir)

    def _init_state(self) -> None:
        self.model: Any = None
        self.info: backend.ModelInfo | None = None
        self.vocab: GeneVocabulary | None = None
        self.batch_counts: dict[str, int] = {}
        self.fit_record: dict[str, Any] = {}
        self._queries: dict[str, _Query] = {}
        self._matches: dict[str, GeneMatch] = {}
        self._digest: str | None = None
        self._warned: set[str] = set()
        self._atlas_checked = False  # atlas_obsm: the dimension of the atlas vectors was checked (fit)

    def _set_model(self, model: Any, where: str, vocab: GeneVocabulary | None = None) -> None:
        info = backend.ModelInfo.of(model, where)
        self.model, self.info = model, info
        self.vocab = vocab if vocab is not None else GeneVocabulary.from_identifiers(info.var_names)
        if len(self.vocab) != len(info.var_names):
            raise StoreError(f"the scVI model at {where} has {len(info.var_names)} genes, its gene list {len(self.vocab)}")
        if self.config.unseen_batch is not None and info.batch_col is not None and (
            self.config.unseen_batch not in info.batches
        ):
            raise InputError(
                f"unseen_batch {self.config.unseen_batch!r} is not a batch of the model (it has {len(info.batches)}: "
                f"{', '.join(info.batches[:5])}{', ...' if len(info.batches) > 5 else ''})"
            )
        self._matches, self._digest, self._queries = {}, None, {}

    # -- interface ------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.info.n_latent if self.info is not None else self.config.n_latent

    @property
    def device(self) -> str:
        return self._device

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    @property
    def requires_fit(self) -> bool:
        """Trained on the atlas (no ``model_dir``), or, with ``atlas_obsm``, the atlas vectors' dimension not yet
        checked against the model (a fit that reads one chunk)."""
        return self.config.model_dir is None or (self.config.atlas_obsm is not None and not self._atlas_checked)

    @property
    def obs_columns(self) -> tuple[str, ...]:
        """The ``batch_key`` column, when the batch is an obs column."""
        column = batching.batch_column(self.config.batch_key)
        return () if column is None else (column,)

    def reads(self, cells: Literal["atlas", "query"]) -> CellReads:
        """Counts and the batch column of every cell, except atlas cells with ``atlas_obsm``: their vectors only."""
        if cells == "atlas" and self.config.atlas_obsm is not None:
            return CellReads(x=False, obsm=(self.config.atlas_obsm,))
        return CellReads(x=True, obs=self.obs_columns)

    @property
    def genes(self) -> GeneVocabulary:
        """The genes the model reads (its var names: the highly variable genes of the fit, or the pretrained
        model's)."""
        self._fitted()
        assert self.vocab is not None
        return self.vocab

    @property
    def batches(self) -> list[str]:
        """The batches the model knows (empty when it has no batch covariate)."""
        return list(self._fitted_info().batches)

    def params(self) -> dict[str, Any]:
        return asdict(self.config)

    def artefact_digest(self) -> str:
        if self.model is None:
            return ""
        if self._digest is None:
            info, vocab = self._fitted_info(), self.genes
            h = hashlib.sha256(backend.state_digest(self.model).encode())
            h.update("\0".join(map(str, vocab.keys)).encode())
            h.update(b"\1" + "\0".join(info.batches).encode())
            self._digest = h.hexdigest()
        return self._digest

    def fingerprint(self) -> str:
        """Parameters that change the vectors + the weights, genes and batches (not the device or the path the
        pretrained weights came from)."""
        payload = json.dumps({"name": self.name, "params": self.config.identity()}, sort_keys=True, default=str)
        return hashlib.sha256((payload + self.artefact_digest()).encode()).hexdigest()[:16]

    def gene_match(self, genes: GeneVocabulary) -> GeneMatch:
        fp = genes.fingerprint()
        match = self._matches.get(fp)
        if match is None:
            match = match_genes(genes, self.genes)
            if len(self._matches) >= _MAX_MATCH_CACHE:
                self._matches.clear()
            self._matches[fp] = match
        return match

    def on_device(self, device: str) -> SCVIEmbedder:
        """A copy running on ``device`` (a build's shard task on GPU N); the same vectors."""
        device = backend.resolve_device(device)
        if device == self._device or self.model is None:
            return self
        other = copy.copy(self)
        other._device = device
        other.model = backend.model_from_bytes(backend.model_bytes(self.model), device)
        other._queries = {}
        return other

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a Ray worker) with the model as its saved files; query updates are not carried."""
        state = dict(self.__dict__)
        state["model"] = None if self.model is None else backend.model_bytes(self.model)
        state["_queries"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.model, bytes):
            self._device = backend.resolve_device("auto") if self._device.startswith("cuda") else self._device
            self.model = backend.model_from_bytes(self.model, self._device)

    # -- transform ------------------------------------------------------------------------------------------------

    def transform(self, chunk: CellChunk) -> np.ndarray:
        """Latent means of the chunk's counts, each cell with its batch (see the module docstring); a chunk
        carrying ``obsm[atlas_obsm]`` (atlas cells, read so by :meth:`reads`): those vectors, checked."""
        self._fitted()
        n = len(chunk)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        key = self.config.atlas_obsm
        if key is not None and key in chunk.obsm:
            return batching.atlas_vectors(chunk, key, self.dim)
        X = self._model_counts(chunk, "embed")
        routes = self._routes(chunk)
        if len(routes) == 1 and len(routes[0][2]) == n:  # one model for the whole chunk: no copy of X
            model, info, _rows, batches = routes[0]
            return backend.latent_mean(model, X, batches, info, self.config.batch_size, self.config.threads)
        out = np.empty((n, self.dim), dtype=np.float32)
        for model, info, rows, batches in routes:
            out[rows] = backend.latent_mean(model, X[rows], batches, info, self.config.batch_size, self.config.threads)
        return out

    def _routes(self, chunk: CellChunk) -> list[tuple[Any, backend.ModelInfo, np.ndarray, list[str] | None]]:
        """``(model, its setup, rows, their batches)`` for the chunk's cells, one entry per model: cells of a
        batch the model knows with that batch; of a batch a query update was prepared for, with the updated
        model; others as :attr:`reference_batch` (see the module docstring)."""
        info = self._fitted_info()
        n = len(chunk)
        if info.batch_col is None:
            return [(self.model, info, np.arange(n), None)]
        names = batching.cell_batches(chunk, self.config.batch_key)
        if names is None:  # batch_key=none with a model that has batches (a pretrained one)
            return [(self.model, info, np.arange(n), [self.reference_batch] * n)]
        import pandas as pd

        codes, uniques = pd.factorize(names, use_na_sentinel=True)
        batch = np.empty(n, dtype=object)  # each cell's batch and model (by position in `models`), in row order
        which = np.zeros(n, dtype=np.int64)
        models: dict[int, tuple[int, Any, backend.ModelInfo]] = {}
        for code in range(-1, len(uniques)):
            rows = codes == code
            if not rows.any():
                continue
            model, minfo, batch[rows] = self._route(None if code < 0 else str(uniques[code]), chunk)
            which[rows] = models.setdefault(id(model), (len(models), model, minfo))[0]
        return [(model, minfo, rows, list(batch[rows]))
                for no, model, minfo in models.values() if len(rows := np.flatnonzero(which == no))]

    def _route(self, name: str | None, chunk: CellChunk) -> tuple[Any, backend.ModelInfo, str]:
        """The model, its setup and the batch cells of batch ``name`` (None: no name) are embedded with."""
        info = self._fitted_info()
        if name is not None and name in info.batches:
            return self.model, info, name
        query = self._queries.get(name) if name is not None else None
        if query is not None and chunk.genes.fingerprint() in query.genes:
            return query.model, query.info, str(name)
        ref = self.reference_batch
        column = batching.batch_column(self.config.batch_key)
        said = f"a value of obs column {column!r}" if column is not None and name != chunk.dataset_id else repr(name)
        if said not in self._warned:
            self._warned.add(said)
            why = (
                "no query update was prepared for it" if self.config.query_update and info.encode_covariates
                else "query_update=false" if not self.config.query_update
                else "the model's encoder does not read the batch"
            )
            logger.info(
                "scvi: batch %s is not one the model was trained on: embedded with the encoder as its reference "
                "batch (%s)", said, why,
            )
        return self.model, info, ref

    @property
    def reference_batch(self) -> str:
        """The known batch unseen batches are embedded as without a query update: ``unseen_batch``, else the
        largest batch of the fit sample (a pretrained model: its first batch)."""
        info = self._fitted_info()
        if self.config.unseen_batch is not None:
            return self.config.unseen_batch
        if self.batch_counts:
            return max(sorted(self.batch_counts), key=lambda b: self.batch_counts[b])
        return info.batches[0]

    def _model_counts(self, chunk: CellChunk, what: str) -> sp.csr_matrix:
        """The chunk's counts on the model's genes (CSR float32; genes it lacks are zero)."""
        X = backend.counts_of(chunk, what)
        return self.gene_match(chunk.genes).project(X)

    # -- query update ---------------------------------------------------------------------------------------------

    def prepare_query(self, cells: SampleSource, *, what: str = "query") -> dict[str, Any]:
        """Train the scArches query update for the cells of ``cells`` (a :data:`~atlas.embed.pca.SampleSource`
        of CellChunk: the whole query, read once) whose batch (dataset id, or value of the batch column) the
        model has not seen; later :meth:`transform` calls embed those batches with it. Replaces any earlier
        update of the same batch. Returns a record of what was done and what it cost (``{"query_update": False,
        "reason": ...}`` when there is nothing to do)."""
        info = self._fitted_info()
        if not self.config.query_update:
            return {"query_update": False, "reason": "query_update=false"}
        if info.batch_col is None or self.config.batch_key == batching.NO_BATCH:
            return {"query_update": False, "reason": "the model has no batch covariate"}
        if not info.encode_covariates:
            return {"query_update": False, "reason": "the model's encoder does not read the batch"}
        t0 = time.perf_counter()
        known = set(info.batches)
        parts: list[sp.csr_matrix] = []
        names: list[str] = []
        genes: dict[str, set[str]] = {}
        for chunk in sample_pass(cells):
            cell_names = batching.cell_batches(chunk, self.config.batch_key) if len(chunk) else None
            if cell_names is None:
                continue
            rows = np.flatnonzero([b is not None and b not in known for b in cell_names])
            if not len(rows):
                continue
            X = self._model_counts(chunk, what)
            parts.append(X if len(rows) == len(chunk) else X[rows])
            names += [str(b) for b in cell_names[rows]]
            for name in set(names[-len(rows):]):
                genes.setdefault(name, set()).add(chunk.genes.fingerprint())
        if not parts:
            return {"query_update": False, "reason": "every cell is of a batch the model knows"}
        X = sp.vstack(parts, format="csr")
        batches = np.array(names, dtype=object)
        if X.shape[0] > self.config.query_max_cells:
            keep = np.sort(np.random.default_rng(self.config.seed).choice(X.shape[0], self.config.query_max_cells,
                                                                         replace=False))
            X, batches = X[keep], batches[keep]
        n = X.shape[0]
        epochs = self.config.query_epochs
        if epochs == AUTO:
            epochs = auto_epochs(n, self.config.batch_size, QUERY_STEPS, QUERY_EPOCHS)
        adata = backend.counts_anndata(X, list(batches), info, info.var_names)
        query_model = backend.train_query(
            adata, self.model, max_epochs=int(epochs), batch_size=self.config.batch_size, seed=self.config.seed,
            device=self._device, threads=self.config.threads,
        )
        qinfo = backend.ModelInfo.of(query_model, what)
        for name, fps in genes.items():
            self._queries[name] = _Query(query_model, qinfo, fps)
            self._warned.discard(repr(name))
        seconds = time.perf_counter() - t0
        record = {
            "query_update": True, "batches": sorted(genes), "cells": int(n), "epochs": int(epochs),
            "seconds": round(seconds, 2),
        }
        logger.info(
            "scvi query update for %s: %d cells of %d unseen batch(es), %d epochs, %.1f s",
            what, n, len(genes), int(epochs), seconds,
        )
        return record

    def reset_query(self) -> None:
        """Forget the query updates (later transforms embed unseen batches with the encoder alone)."""
        self._queries = {}

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(self, sample: SampleSource) -> None:
        """Train on a sample of atlas chunks (read once, held in memory as counts); see the module docstring. With
        ``model_dir`` and ``atlas_obsm``: check the atlas vectors of the sample's first chunk against the model."""
        cfg = self.config
        if cfg.model_dir is not None and cfg.atlas_obsm is not None:
            batching.check_atlas_sample(sample, cfg.atlas_obsm, self.dim)
            self._atlas_checked = True
            return
        if cfg.model_dir is not None:
            raise InputError("the scvi embedder was given a pretrained model (model_dir=): it is not fitted")
        t0 = time.perf_counter()
        X, vocab, batches = backend.gather_sample(sample, lambda chunk: batching.fit_batches(chunk, cfg.batch_key))
        n = X.shape[0]
        if n < 2:
            raise InputError(f"cannot fit the scvi embedder on {n} cell(s): ingest more cells")
        batching.check_fit_batches(batches, cfg.batch_key)
        names, counts = np.unique(batches.astype(str), return_counts=True)
        cols, flavor = backend.select_hvg(X, batches if len(names) > 1 else None, cfg.n_hvg)
        hvg = GeneVocabulary(keys=vocab.keys[cols], feature_id=vocab.feature_id[cols],
                             feature_name=vocab.feature_name[cols])
        Xh = X[:, cols].tocsr()
        del X
        epochs = cfg.max_epochs if cfg.max_epochs != AUTO else auto_epochs(n, cfg.batch_size, FIT_STEPS)
        logger.info(
            "scvi fit: %d cells of %d batch(es), %d genes (%s), %d epochs on %s", n, len(names), len(cols), flavor,
            int(epochs), self._device,
        )
        batch_col = None if cfg.batch_key == batching.NO_BATCH else "batch"
        info = backend.ModelInfo([str(k) for k in hvg.keys], batch_col, [], None, None, cfg.n_latent, True)
        adata = backend.counts_anndata(Xh, list(batches) if batch_col else None, info, info.var_names)
        model = backend.train_reference(
            adata, batch_col=batch_col, n_latent=cfg.n_latent, n_layers=cfg.n_layers, n_hidden=cfg.n_hidden,
            dropout_rate=cfg.dropout_rate, gene_likelihood=cfg.gene_likelihood,
            encode_covariates=cfg.encode_covariates, max_epochs=int(epochs), batch_size=cfg.batch_size,
            seed=cfg.seed, device=self._device, threads=cfg.threads,
        )
        # reloaded from its saved form: the model embeds exactly as the one the index loads later does
        model = backend.model_from_bytes(backend.model_bytes(model), self._device)
        self._set_model(model, "the fitted model", vocab=hvg)
        self.batch_counts = {str(b): int(c) for b, c in zip(names, counts, strict=True)} if batch_col else {}
        self.fit_record = {"cells": int(n), "genes": len(cols), "hvg": flavor, "epochs": int(epochs),
                           "seconds": round(time.perf_counter() - t0, 1)}
        logger.info("scvi fit: done in %.0f s", time.perf_counter() - t0)

    # -- helpers --------------------------------------------------------------------------------------------------

    def _fitted(self) -> Any:
        if self.model is None:
            raise InputError("the scvi embedder is not fitted: call fit(sample) first, or load a saved embedder")
        return self.model

    def _fitted_info(self) -> backend.ModelInfo:
        self._fitted()
        assert self.info is not None
        return self.info

    # -- persistence ----------------------------------------------------------------------------------------------

    def _save_artefact(self, directory: Path) -> None:
        backend.save_model(self._fitted(), directory / MODEL_DIR)
        vocab = self.genes
        names = sorted(self.batch_counts)
        with open(directory / GENES_FILE, "wb") as fh:
            np.savez(
                fh, gene_key=vocab.keys.astype(str), feature_id=vocab.feature_id.astype(str),
                feature_name=vocab.feature_name.astype(str), batch_names=np.array(names, dtype=str),
                batch_counts=np.array([self.batch_counts[b] for b in names], dtype=np.int64),
                fit_record=np.array(json.dumps(self.fit_record)),
            )

    @classmethod
    def _load(cls, directory: Path, params: dict[str, Any]) -> SCVIEmbedder:
        directory = Path(directory)
        path = directory / GENES_FILE
        if not path.is_file() or not (directory / MODEL_DIR).is_dir():
            raise StoreError(f"the scvi embedder at {directory} lacks {GENES_FILE} or {MODEL_DIR}/; rebuild the index")
        emb = cls.__new__(cls)
        try:
            emb.config = SCVIParams(**params)
        except TypeError as exc:
            raise StoreError(f"the scvi embedder at {directory} has unknown parameters ({exc}); rebuild the index") from exc
        backend.import_scvi()
        try:
            emb._device = backend.resolve_device(emb.config.device)
        except InputError:  # built on a GPU, used where there is none: the index still works on the CPU
            logger.info("scvi: the embedder was built for %s; running on the CPU here", emb.config.device)
            emb._device = "cpu"
        emb._init_state()
        try:
            with np.load(path, allow_pickle=False) as npz:
                vocab = GeneVocabulary(keys=npz["gene_key"].astype(object), feature_id=npz["feature_id"].astype(object),
                                       feature_name=npz["feature_name"].astype(object))
                counts = dict(zip(npz["batch_names"].tolist(), npz["batch_counts"].tolist(), strict=True))
                record = json.loads(str(npz["fit_record"]))
        except NPZ_LOAD_ERRORS as exc:
            raise StoreError(f"cannot read {path} ({type(exc).__name__}: {exc}): it is damaged; rebuild the index") from exc
        emb._set_model(backend.load_model(directory / MODEL_DIR, emb._device), str(directory), vocab=vocab)
        emb.batch_counts = {str(k): int(v) for k, v in counts.items()}
        emb.fit_record = record
        emb._atlas_checked = True  # an index's embedder: its atlas vectors were checked when it was built
        return emb
