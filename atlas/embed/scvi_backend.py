"""The helpers of the scVI embedder (:mod:`atlas.embed.scvi`): the fit sample's counts and highly variable genes,
and the scvi-tools side (imports, devices, seeds, quiet logging, AnnData of counts, training, the latent mean,
saving and loading). scvi-tools, Lightning and scanpy are imported inside the functions, never at module import.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.pca import SampleSource, sample_pass
from scatlas.atlas.embed.safe_load import check_pickled_names
from scatlas.atlas.errors import DependencyError, InputError, StoreError
from scatlas.atlas.genes import GeneVocabulary, match_genes
from scatlas.atlas.interrupt import check_interrupt
from scatlas.atlas.normalize import to_lognorm

logger = logging.getLogger("scatlas.atlas.embed.scvi")

SCVI_TOOLS_REQUIREMENT = "scvi-tools>=1.4,<1.5"
_NOISY_LOGGERS = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_SUPPORTED_SETUP = {"layer", "batch_key", "labels_key"}
"""setup_anndata arguments scatlas can supply per cell (the rest must be None: size factors, covariates)."""


def import_scvi() -> ModuleType:
    """The scvi package; DependencyError saying how to install it when absent."""
    try:
        with quiet():
            import scvi
    except ImportError as exc:
        raise DependencyError(
            f"the scvi embedder needs scvi-tools: pip install 'scatlas[scvi]' ({SCVI_TOOLS_REQUIREMENT}; "
            f"import failed: {exc})"
        ) from exc
    return scvi


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda``/``cuda:N`` without CUDA ->
    :class:`DependencyError` (never a silent CPU fallback)."""
    import torch

    device = str(device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {device!r})")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DependencyError(
            f"device={device!r} was asked for but CUDA is not available (torch {torch.__version__}; no CUDA build "
            "or no visible GPU): use device=cpu or auto, or install a CUDA build of torch"
        )
    return device


def lightning_devices(device: str) -> tuple[str, Any]:
    """``(accelerator, devices)`` for ``train`` and ``(accelerator, device)`` for ``load`` of a resolved device."""
    if device == "cpu":
        return "cpu", "auto"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return "gpu", index


@contextmanager
def quiet() -> Iterator[None]:
    """scvi-tools' and Lightning's INFO chatter (device summary, tips, "transfer AnnData setup", seeds) and their
    known warnings off for the duration; WARNING and above still pass through their loggers."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _NOISY_LOGGERS)]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(lightning|pytorch_lightning|lightning_fabric)(\.|$)")
            warnings.filterwarnings("ignore", module=r"scvi(\.|$)", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """scvi-tools' seed (``scvi.settings.seed``: Lightning's ``seed_everything`` and the data split) for the
    duration; the global random states of torch, numpy and ``random`` are restored afterwards."""
    import torch

    scvi = import_scvi()
    np_state, py_state = np.random.get_state(), random.getstate()
    env = os.environ.get("PL_GLOBAL_SEED")
    old_seed = scvi.settings.seed
    with torch.random.fork_rng(devices=[]):
        try:
            with quiet():
                scvi.settings.seed = int(seed)
            yield
        finally:
            with quiet():
                scvi.settings.seed = old_seed  # None (the default) reseeds nothing
            np.random.set_state(np_state)
            random.setstate(py_state)
            if env is None:
                os.environ.pop("PL_GLOBAL_SEED", None)
            else:
                os.environ["PL_GLOBAL_SEED"] = env


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to ``n`` for the duration (0: left as they are), then restored."""
    import torch

    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _epoch_logger(what: str, total: int) -> Any:
    """A Lightning callback logging the training's progress (about ten lines) through :data:`logger`."""
    from lightning.pytorch.callbacks import Callback

    class EpochLog(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.every = max(1, total // 10)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            check_interrupt()  # a cancelled server job stops here, not after the whole training
            epoch = int(trainer.current_epoch) + 1
            if epoch % self.every and epoch != total:
                return
            metric = trainer.callback_metrics.get("elbo_train", trainer.callback_metrics.get("train_loss_epoch"))
            loss = f", ELBO {float(metric):.1f}" if metric is not None else ""
            logger.info("%s: epoch %d/%d%s (%.0f s)", what, epoch, total, loss, time.perf_counter() - self.t0)

    return EpochLog()


@dataclass(frozen=True)
class ModelInfo:
    """What transform needs to know of a model's setup: its genes, batch column and categories, label column."""

    var_names: list[str]
    batch_col: str | None  # None: set up without batch_key (one batch)
    batches: list[str]
    labels_col: str | None
    label_value: str | None
    n_latent: int
    encode_covariates: bool

    @classmethod
    def of(cls, model: Any, where: str) -> ModelInfo:
        registry = model.registry_
        setup = dict(registry.get("setup_args", {}))
        extra = sorted(k for k, v in setup.items() if v is not None and k not in _SUPPORTED_SETUP)
        if extra:
            raise InputError(
                f"the scVI model at {where} was set up with {', '.join(f'{k}={setup[k]!r}' for k in extra)}: scatlas "
                "gives a model counts, a batch and nothing else per cell; use a model set up with batch_key (and "
                "labels_key) only"
            )
        fields = registry.get("field_registries", {})
        batch_col = setup.get("batch_key")
        batches = [str(b) for b in fields.get("batch", {}).get("state_registry", {}).get("categorical_mapping", [])]
        labels_col = setup.get("labels_key")
        label_value = None
        if labels_col is not None:
            state = fields.get("labels", {}).get("state_registry", {})
            label_value = str(state.get("unlabeled_category") or list(state.get("categorical_mapping", ["?"]))[0])
        module = model.module
        return cls(
            var_names=[str(v) for v in model.get_var_names()],
            batch_col=None if batch_col is None else str(batch_col),
            batches=batches,
            labels_col=None if labels_col is None else str(labels_col),
            label_value=label_value,
            n_latent=int(module.n_latent),
            encode_covariates=bool(getattr(module, "encode_covariates", False)),
        )


def counts_anndata(X: sp.csr_matrix, batches: Sequence[str] | None, info: ModelInfo, var_names: Sequence[str]) -> Any:
    """An AnnData of counts on the model's genes with the obs columns its setup reads."""
    import anndata
    import pandas as pd

    n = X.shape[0]
    obs = pd.DataFrame(index=pd.Index([str(i) for i in range(n)]))
    if info.batch_col is not None:
        assert batches is not None
        obs[info.batch_col] = pd.Categorical([str(b) for b in batches])
    if info.labels_col is not None:
        obs[info.labels_col] = pd.Categorical([info.label_value] * n)
    var = pd.DataFrame(index=pd.Index([str(v) for v in var_names]))
    return anndata.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs, var=var)


def latent_mean(
    model: Any, X: sp.csr_matrix, batches: Sequence[str] | None, info: ModelInfo, batch_size: int, threads: int
) -> np.ndarray:
    """``get_latent_representation`` (the posterior mean) of cells given as counts on the model's genes."""
    adata = counts_anndata(X, batches, info, info.var_names)
    with quiet(), torch_threads(threads):
        try:
            z = model.get_latent_representation(adata, give_mean=True, batch_size=int(batch_size))
        finally:
            _forget(model, adata)
    return np.asarray(z, dtype=np.float32)


def _forget(model: Any, adata: Any) -> None:
    """Drop the manager scvi-tools registered for ``adata`` (it keeps one, holding the AnnData, per AnnData it
    sees: one per chunk otherwise). ``deregister_manager`` only finds managers of the class-level store, and
    the setup transferred onto a new AnnData lands in the per-instance one alone, so both are cleared here."""
    uuid = getattr(adata, "uns", {}).get("_scvi_uuid")
    if uuid is None:
        return
    for store in (getattr(model, "_setup_adata_manager_store", {}),
                  getattr(model, "_per_instance_manager_store", {}).get(getattr(model, "id", None), {})):
        store.pop(uuid, None)


def train_reference(
    adata: Any, *, batch_col: str | None, n_latent: int, n_layers: int, n_hidden: int, dropout_rate: float,
    gene_likelihood: str, encode_covariates: bool, max_epochs: int, batch_size: int, seed: int, device: str,
    threads: int,
) -> Any:
    """Set up ``adata`` and train an SCVI model on all of its cells (no validation split); in eval mode."""
    scvi = import_scvi()
    accelerator, devices = lightning_devices(device)
    with seeded(seed), quiet(), torch_threads(threads), tempfile.TemporaryDirectory(prefix="scatlas-scvi-") as tmp:
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_col)
        model = scvi.model.SCVI(
            adata, n_latent=n_latent, n_layers=n_layers, n_hidden=n_hidden, dropout_rate=dropout_rate,
            gene_likelihood=gene_likelihood, encode_covariates=encode_covariates,
            # scvi-tools' scArches recommendation for a reference that queries are mapped onto later
            use_layer_norm="both", use_batch_norm="none",
        )
        model.train(
            max_epochs=max_epochs, accelerator=accelerator, devices=devices, train_size=1.0, batch_size=batch_size,
            enable_progress_bar=False, default_root_dir=tmp, callbacks=[_epoch_logger("scvi fit", max_epochs)],
        )
    model.module.eval()
    return model


def train_query(
    adata: Any, reference: Any, *, max_epochs: int, batch_size: int, seed: int, device: str, threads: int
) -> Any:
    """scArches query update (``prepare_query_anndata`` + ``load_query_data`` + a short training of the new
    batches' parameters, weight decay off as scvi-tools advises); in eval mode."""
    scvi = import_scvi()
    accelerator, index = lightning_devices(device)
    with seeded(seed), quiet(), torch_threads(threads), tempfile.TemporaryDirectory(prefix="scatlas-scvi-") as tmp:
        scvi.model.SCVI.prepare_query_anndata(adata, reference)
        query = scvi.model.SCVI.load_query_data(adata, reference, accelerator=accelerator, device=index)
        query.train(
            max_epochs=max_epochs, accelerator=accelerator, devices=index if accelerator == "gpu" else "auto",
            train_size=1.0, batch_size=batch_size, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False,
            default_root_dir=tmp, callbacks=[_epoch_logger("scvi query update", max_epochs)],
        )
    query.module.eval()
    return query


def save_model(model: Any, directory: Path) -> None:
    """scvi-tools' own format (``model.save``: ``model.pt``), without the AnnData."""
    with quiet():
        model.save(str(directory), overwrite=True, save_anndata=False)


def load_model(directory: Path, device: str) -> Any:
    """A model saved with ``model.save`` (ours, or a pretrained one such as a CELLxGENE Census scVI model), loaded
    without AnnData, in eval mode. StoreError/InputError when it cannot be read."""
    scvi = import_scvi()
    accelerator, index = lightning_devices(device)
    if not (Path(directory) / "model.pt").is_file():
        raise InputError(f"{directory} holds no scvi-tools model (model.pt missing)")
    check_pickled_names(Path(directory) / "model.pt", f"the scVI model file {Path(directory) / 'model.pt'}")
    try:
        with quiet():
            model = scvi.model.SCVI.load(str(directory), adata=False, accelerator=accelerator, device=index)
    except (ValueError, KeyError, RuntimeError, OSError, EOFError, AttributeError, TypeError) as exc:
        raise StoreError(f"cannot load the scVI model in {directory} ({type(exc).__name__}: {exc})") from exc
    model.module.eval()
    return model


def model_bytes(model: Any) -> bytes:
    """The model's saved files as one tar archive (for pickling, copies on another device)."""
    with tempfile.TemporaryDirectory(prefix="scatlas-scvi-") as tmp:
        save_model(model, Path(tmp) / "m")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(Path(tmp) / "m", arcname="m")
        return buf.getvalue()


def model_from_bytes(data: bytes, device: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="scatlas-scvi-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")
        return load_model(Path(tmp) / "m", device)


def state_digest(model: Any) -> str:
    """sha256 of the module's weights (names, dtypes, shapes, values): equal before saving and after loading."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.module.state_dict().items()):
        arr = np.ascontiguousarray(tensor.detach().cpu().numpy())
        h.update(f"{name}\0{arr.dtype.str}{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# -- the fit sample ------------------------------------------------------------------------------------------------


def counts_of(chunk: CellChunk, what: str) -> sp.csr_matrix:
    """The chunk's X as CSR float32 counts; InputError when it holds anything else."""
    if chunk.X is None:
        raise InputError("the scvi embedder needs expression values but the chunk has none (X is None)")
    if chunk.X.shape != (len(chunk), len(chunk.genes)):
        raise InputError(
            f"chunk X has shape {chunk.X.shape} but the chunk has {len(chunk)} cells and {len(chunk.genes)} genes"
        )
    if chunk.x_kind != "counts":
        raise InputError(
            f"scVI models raw counts, but the {what} cells of {chunk.dataset_id or 'this chunk'!r} hold "
            f"{chunk.x_kind!r} values: give their counts (X, layers['counts'] or .raw), or use another embedder "
            "(--embedder pca reads log-normalised data)"
        )
    X = sp.csr_matrix(chunk.X, dtype=np.float32)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    if X.nnz and X.data.min() < 0:
        raise InputError(f"the {what} cells of {chunk.dataset_id or 'this chunk'!r} have negative counts")
    return X


def gather_sample(
    sample: SampleSource, batch_of: Callable[[CellChunk], np.ndarray] | None = None
) -> tuple[sp.csr_matrix, GeneVocabulary, np.ndarray]:
    """The sample in memory: counts (cells x the union of the chunks' genes), the union, and each cell's batch
    (``batch_of(chunk)``: one value per cell; default: the chunk's dataset id)."""
    blocks: list[tuple[sp.csr_matrix, GeneVocabulary]] = []
    batches: list[object] = []
    for chunk in sample_pass(sample):
        if len(chunk) == 0:
            continue
        blocks.append((counts_of(chunk, "atlas"), chunk.genes))
        batches += list(batch_of(chunk)) if batch_of is not None else [str(chunk.dataset_id)] * len(chunk)
    if not blocks:
        raise InputError("cannot fit the scvi embedder on an empty sample: the atlas (or the sample) has no cells")
    vocabs = {g.fingerprint(): g for _, g in blocks}
    if len(vocabs) == 1:
        union = blocks[0][1]
        X = sp.vstack([b for b, _ in blocks], format="csr")
    else:
        keys, fid, fname, seen = [], [], [], set()
        for g in vocabs.values():
            for k, i, s in zip(g.keys, g.feature_id, g.feature_name, strict=True):
                if str(k) not in seen:
                    seen.add(str(k))
                    keys.append(str(k))
                    fid.append(str(i))
                    fname.append(str(s))
        union = GeneVocabulary(keys=np.array(keys, dtype=object), feature_id=np.array(fid, dtype=object),
                               feature_name=np.array(fname, dtype=object))
        matches = {fp: match_genes(g, union) for fp, g in vocabs.items()}
        X = sp.vstack([matches[g.fingerprint()].project(b) for b, g in blocks], format="csr")
    return X, union, np.array(batches, dtype=object)


def select_hvg(X: sp.csr_matrix, batches: np.ndarray | None, n_hvg: int) -> tuple[np.ndarray, str]:
    """Columns of the ``n_hvg`` highly variable genes of counts ``X`` (sorted), and the rule that chose them:
    scanpy's ``seurat_v3`` (per batch when ``batches`` is given), else the variance of log1p(CP10k). Genes
    without counts in the sample are never chosen."""
    detected = np.flatnonzero(np.asarray((X > 0).sum(axis=0)).ravel() > 0)
    if len(detected) == 0:
        raise InputError("the sample has no counts on any gene: check that the atlas holds expression values")
    if len(detected) <= n_hvg:
        logger.warning("only %d genes are detected in the sample; using all of them (n_hvg=%d)", len(detected), n_hvg)
        return detected, "all detected genes"
    Xd = X[:, detected].tocsr()
    try:
        import anndata
        import pandas as pd
        import scanpy as sc

        obs = pd.DataFrame(index=pd.Index([str(i) for i in range(Xd.shape[0])]))
        if batches is not None:
            obs["batch"] = pd.Categorical(batches.astype(str))
        adata = anndata.AnnData(X=Xd, obs=obs)
        try:
            table = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=int(n_hvg), inplace=False,
                                                batch_key="batch" if batches is not None else None)
            flavor = "seurat_v3" + (" per batch" if batches is not None else "")
        except ValueError as exc:  # loess fails on a tiny batch: pool the batches
            if batches is None:
                raise
            logger.info("scvi: seurat_v3 per batch failed (%s); selecting genes over the pooled sample", exc)
            adata.obs = obs.drop(columns="batch")
            table = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=int(n_hvg), inplace=False)
            flavor = "seurat_v3"
        chosen = np.flatnonzero(table["highly_variable"].to_numpy())
    except ImportError as exc:
        logger.info("scvi: scanpy's seurat_v3 is unavailable (%s); choosing genes by variance of log1p(CP10k)", exc)
        L = to_lognorm(Xd, "counts")
        mean = np.asarray(L.mean(axis=0)).ravel()
        var = np.asarray(L.multiply(L).mean(axis=0)).ravel() - mean**2
        chosen = np.sort(np.lexsort((np.arange(len(var)), -var))[:n_hvg])
        flavor = "variance of log1p(CP10k)"
    return detected[np.sort(chosen)], flavor
