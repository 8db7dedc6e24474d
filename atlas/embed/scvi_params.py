"""The options of the scVI embedder (:mod:`atlas.embed.scvi`), checked, and the epoch heuristics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from scatlas.atlas.embed import scvi_batches as batching
from scatlas.atlas.errors import InputError

MODEL_DIR = "scvi_model"
GENES_FILE = "scvi_genes.npz"
AUTO = "auto"
FIT_STEPS = 8000
"""``max_epochs="auto"``: scvi-tools' heuristic (400 epochs up to 20,000 cells, fewer above), capped at about this
many training steps (minibatches), so that a 50,000-cell sample trains in minutes on two CPU cores."""
QUERY_STEPS = 1500
QUERY_EPOCHS = 200
"""``query_epochs="auto"``: the same heuristic for the query update with at most 200 epochs (as scvi-tools'
scArches tutorial trains a query), capped at about ``QUERY_STEPS`` steps."""
_NOT_IDENTITY = {"device", "threads", "model_dir"}  # how it runs, where the weights came from (in the digest)


def auto_epochs(n_cells: int, batch_size: int, max_steps: int, cap: int = 400) -> int:
    """scvi-tools' ``get_max_epochs_heuristic`` (``cap`` epochs up to 20,000 cells, fewer above) capped at
    ``max_steps`` minibatches (at least 1 epoch)."""
    heuristic = max(1, min(round(20_000 / max(n_cells, 1) * cap), cap))
    steps_per_epoch = max(1, -(-n_cells // batch_size))
    return int(max(1, min(heuristic, max_steps // steps_per_epoch)))


@dataclass(frozen=True)
class SCVIParams:
    """The parameters of an scVI embedder (all but ``device``, ``threads`` and ``model_dir`` are part of its
    fingerprint).

    Model: ``n_latent`` (the output dimension), ``n_layers``, ``n_hidden``, ``dropout_rate``, ``gene_likelihood``
    (zinb, nb, poisson), ``encode_covariates`` (the encoder reads the batch: needed for a query update to move the
    embedding). Fit: ``n_hvg`` genes, ``max_epochs`` (an int or ``auto``), ``batch_size``, ``seed``, ``batch_key``
    (``dataset_id``, ``none`` or an obs column). Unseen batches: ``query_update``, ``query_epochs``,
    ``query_max_cells``, ``unseen_batch``. ``model_dir``: a pretrained model instead of a fit; ``atlas_obsm``: with
    it, the obsm key holding that model's embedding of the atlas cells (read instead of embedding them).
    ``device``: auto, cpu, cuda, cuda:N. ``threads``: torch's CPU threads while training and embedding (0: torch's
    own setting; 1, the default, is fastest for scVI's small minibatches on a few shared cores: 20 epochs of 1,310
    cells took 7-10 s with 1 thread, 50-116 s with 2 on a busy 2-core machine).
    """

    n_hvg: int = 2000
    n_latent: int = 30
    n_layers: int = 1
    n_hidden: int = 128
    dropout_rate: float = 0.1
    gene_likelihood: str = "zinb"
    encode_covariates: bool = True
    max_epochs: int | str = AUTO
    batch_size: int = 128
    seed: int = 0
    batch_key: str = "dataset_id"
    query_update: bool = True
    query_epochs: int | str = AUTO
    query_max_cells: int = 20_000
    unseen_batch: str | None = None
    model_dir: str | None = None
    atlas_obsm: str | None = None
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("n_hvg", "n_latent", "n_layers", "n_hidden", "batch_size", "query_max_cells"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"scvi option {name} must be a positive integer (got {getattr(self, name)!r})")
        for name in ("max_epochs", "query_epochs"):
            value = getattr(self, name)
            if value != AUTO and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise InputError(f"scvi option {name} must be a positive integer or 'auto' (got {value!r})")
        if int(self.threads) < 0:
            raise InputError(f"scvi option threads must be >= 0 (got {self.threads}; 0: torch's own setting)")
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise InputError(f"scvi option dropout_rate must be in [0, 1) (got {self.dropout_rate})")
        if self.gene_likelihood not in ("zinb", "nb", "poisson"):
            raise InputError(f"scvi option gene_likelihood must be zinb, nb or poisson (got {self.gene_likelihood!r})")
        batching.check_batch_key(self.batch_key)
        if self.atlas_obsm is not None and (not isinstance(self.atlas_obsm, str) or not self.atlas_obsm):
            raise InputError(f"scvi option atlas_obsm must be an obsm key (got {self.atlas_obsm!r})")
        if self.atlas_obsm is not None and self.model_dir is None:
            raise InputError(
                "scvi option atlas_obsm needs model_dir: the atlas vectors in obsm must come from the model that "
                "embeds the queries (give model_dir=PATH of that model)"
            )
        for name in ("encode_covariates", "query_update"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"scvi option {name} must be true or false (got {getattr(self, name)!r})")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IDENTITY}
