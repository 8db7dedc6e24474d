"""Universal Cell Embeddings (UCE; Rosen et al. 2023) from local model files, batched, on CUDA when present.

What comes from the ``uce-model==0.1.4`` package and what is reimplemented here:

* The network is the package's own ``uce.model.TransformerModel`` and its ``forward``. Only the file
  ``uce/model.py`` is loaded (by path): importing the ``uce`` package itself would import scanpy, gdown and
  requests, and would switch off all Python warnings process-wide (``warnings.filterwarnings("ignore")``).
* Weights and token embeddings are loaded as ``uce.evaluate.get_eval_model`` does: the ``.torch`` state dict
  (strict), then the token file with the 1895 chromosome tokens appended (``torch.manual_seed(23)``, N(0, 1)) when
  it lacks them; it replaces the state dict's token table only when the row counts differ. Nothing is downloaded:
  every file must be given (or found in ``model_dir``, laid out as the package's ``model_files/``).
* The gene -> token and gene -> chromosome/start mapping is reimplemented from ``uce.data_proc.data_utils``
  (``get_species_to_pe``, ``adata_path_to_prot_chrom_starts``, ``get_spec_chrom_csv``), because the package only
  offers it through files written next to an ``.h5ad``. Genes are matched by symbol, case-insensitively
  (UCE has no Ensembl ids); genes without a protein embedding or a chromosome position are not read.
* The cell sentence is reimplemented from ``uce.eval_data.sample_cell_sentences``: ``sample_size`` genes drawn with
  replacement with probability proportional to ``log1p(counts)``, grouped by chromosome in shuffled chromosome
  order, each group opened by its chromosome token and closed by the right-bracket token, sorted by genomic start
  within a group, after a CLS token; the embedding is the (L2-normalised) CLS output. The package draws from
  numpy's global random state; here each cell has its own generator seeded from the parameters and the cell's own
  values, so a cell's vector is deterministic and does not depend on its chunk mates.
* Padding is really masked. The package passes ``1 - mask`` as a float key-padding mask, which PyTorch *adds* to
  the attention logits, so its padding tokens are attended (with a +1 bias) and a cell's vector depends on the
  longest sentence of its batch. Here padding gets ``-inf``, which equals the package's output for a cell that
  is the longest of its batch (no padding).
* Not reproduced: the package's dataset-level filtering (``filter_genes(min_cells=10)``,
  ``filter_cells(min_genes=25)``), which would make a cell's vector depend on the other cells. A cell with no
  counts on the model's genes gets the embedding of the bare CLS sentence (a warning is logged).

UCE was trained on raw counts. With ``weighting="counts"`` (the default, as in the package) count chunks are
weighted by ``log1p(counts)``; chunks holding normalised values can only be weighted by ``log1p(CP10k)`` (from
:func:`atlas.normalize.to_lognorm`), and a warning says so. ``weighting="lognorm"`` weights every chunk by
``log1p(CP10k)``, so that counts and normalised versions of the same cells give the same vectors.

The saved artefact holds the gene mapping (``uce_genes.npz``) and references the weight files by path and
sha256 (``uce_files.json``): they are large and are not copied. The fingerprint covers the parameters that change
the output (not paths, device or batch size), the file digests and the mapping.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from scatlas.atlas.chunks import CellChunk
from scatlas.atlas.embed.base import Embedder
from scatlas.atlas.embed.safe_load import load_plain_pickle
from scatlas.atlas.errors import DependencyError, InputError, StoreError
from scatlas.atlas.genes import GeneMatch, GeneVocabulary, is_ensembl, match_genes
from scatlas.atlas.normalize import to_lognorm

logger = logging.getLogger(__name__)

UCE_VERSION = "0.1.4"
GENES_FILE = "uce_genes.npz"
FILES_FILE = "uce_files.json"
_MAX_MATCH_CACHE = 64
_CHROM_SEED = 23  # uce.evaluate.get_ESM2_embeddings: torch.manual_seed(23) before drawing the chromosome tokens

# uce.data_proc.data_utils.get_species_to_pe
SPECIES_FILES: dict[str, str] = {
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}

# the package's model_files/ layout, used with model_dir=
MODEL_DIR_FILES = {
    "token_file": "all_tokens.torch",
    "protein_embeddings": "protein_embeddings",
    "spec_chrom_csv_path": "species_chrom.csv",
    "offset_pkl_path": "species_offsets.pkl",
}
MODEL_DIR_WEIGHTS = {4: "4layer_model.torch", 33: "33l_8ep_1024t_1280.torch"}

# parameters that do not change the vectors (up to floating-point noise): left out of the fingerprint
_NOT_IDENTITY = {
    "model_path",
    "token_file",
    "protein_embeddings",
    "spec_chrom_csv_path",
    "offset_pkl_path",
    "species_offset",  # the gene mapping (tokens) is in the artefact digest
    "batch_size",
    "device",
}

_uce_model_module: ModuleType | None = None
_file_digests: dict[tuple[str, int, int], str] = {}


# -- optional dependencies ------------------------------------------------------------------------------------------


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise DependencyError("the uce embedder needs PyTorch: pip install torch") from exc
    return torch


def _uce_model() -> ModuleType:
    """``uce/model.py`` of the installed uce-model package, loaded without the package's ``__init__``."""
    global _uce_model_module
    try:
        spec = importlib.util.find_spec("uce")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(p) / "model.py" for p in locations if (Path(p) / "model.py").is_file()), None)
    if path is None:
        raise DependencyError(
            f"the uce embedder needs the uce-model package: pip install 'scatlas[uce]' (uce-model=={UCE_VERSION})"
        )
    if _uce_model_module is not None and Path(str(_uce_model_module.__file__)) == path:
        return _uce_model_module
    try:
        from importlib.metadata import version

        found = version("uce-model")
        if found != UCE_VERSION:
            logger.warning("uce-model %s is installed; scatlas was written against %s", found, UCE_VERSION)
    except Exception:  # noqa: BLE001 - metadata is informative only
        pass
    module_spec = importlib.util.spec_from_file_location("scatlas_uce_model", path)
    if module_spec is None or module_spec.loader is None:
        raise DependencyError(f"cannot load {path} from the uce-model package: reinstall uce-model=={UCE_VERSION}")
    module = importlib.util.module_from_spec(module_spec)
    saved_path = list(sys.path)
    try:
        with warnings.catch_warnings():  # model.py calls warnings.filterwarnings("ignore") and sys.path.append
            module_spec.loader.exec_module(module)
    except ImportError as exc:
        raise DependencyError(f"cannot import {path} ({exc}): reinstall uce-model=={UCE_VERSION}") from exc
    finally:
        sys.path[:] = saved_path
    if not hasattr(module, "TransformerModel"):
        raise DependencyError(f"{path} has no TransformerModel: install uce-model=={UCE_VERSION}")
    _uce_model_module = module
    return module


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA -> :class:`DependencyError`."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda' (got {device!r})")
    torch = _import_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DependencyError(
            f"device={device!r} was asked for but CUDA is not available (torch {torch.__version__}; no CUDA build "
            "or no visible GPU): use device='cpu' or 'auto', or install a CUDA build of torch"
        )
    return device


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _file_digests[key] = h.hexdigest()
    return _file_digests[key]


def _torch_load(path: Path) -> Any:
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - files in the legacy (non-zip) format cannot be memory-mapped: retry
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise InputError(f"cannot read {path} with torch.load ({exc}): is it a UCE model file?") from exc


# -- configuration and gene mapping ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UCEConfig:
    """The parameters of a UCE embedder: model files, network shape, sentence layout and how it runs.

    Files: ``model_path`` (weights), ``token_file``, ``protein_embeddings``, ``spec_chrom_csv_path``,
    ``offset_pkl_path`` (or ``species_offset``) for ``species``. Network and tokens: as the package's model
    (``nlayers`` ... ``n_chrom_tokens``). ``sample_size`` genes per cell sentence, padded to ``pad_length``;
    ``weighting``: what gene draws are weighted by (see the module docstring); ``batch_size``, ``device`` and
    ``seed`` (of each cell's generator) set how it runs.
    """

    model_path: str
    token_file: str
    protein_embeddings: str | None = None
    spec_chrom_csv_path: str | None = None
    offset_pkl_path: str | None = None
    species: str = "human"
    species_offset: int | None = None
    nlayers: int = 4
    output_dim: int = 1280
    d_hid: int = 5120
    token_dim: int = 5120
    d_model: int = 1280
    nhead: int = 20
    pad_length: int = 1536
    sample_size: int = 1024
    pad_token_idx: int = 0
    chrom_token_right_idx: int = 2
    cls_token_idx: int = 3
    chrom_token_offset: int = 143574
    n_chrom_tokens: int = 1895
    weighting: Literal["counts", "lognorm"] = "counts"
    batch_size: int = 25
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nlayers", "output_dim", "d_hid", "token_dim", "d_model", "nhead", "pad_length",
                     "sample_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"UCE parameter {name} must be positive (got {getattr(self, name)})")
        if self.d_model % self.nhead:
            raise InputError(f"d_model ({self.d_model}) must be a multiple of nhead ({self.nhead})")
        if self.sample_size + 1 > self.pad_length:
            raise InputError(
                f"sample_size ({self.sample_size}) does not fit in pad_length ({self.pad_length}) with the CLS "
                "and chromosome tokens: lower sample_size or raise pad_length"
            )
        if self.weighting not in ("counts", "lognorm"):
            raise InputError(f"weighting must be 'counts' or 'lognorm' (got {self.weighting!r})")

    def identity(self) -> dict[str, Any]:
        """The parameters that determine the vectors."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IDENTITY}


@dataclass(frozen=True)
class UCEGenes:
    """The genes UCE reads, with their token, chromosome code and genomic start."""

    symbols: np.ndarray  # (n,) str, upper case as in the package
    tokens: np.ndarray  # (n,) int64 row of the token table
    chroms: np.ndarray  # (n,) int64 species_chromosome category code (chromosome token = code + offset)
    starts: np.ndarray  # (n,) float64 genomic start
    vocab: GeneVocabulary = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        symbols = [str(v) for v in self.symbols]
        vocab = GeneVocabulary.from_arrays([v if is_ensembl(v) else "" for v in symbols], symbols)
        object.__setattr__(self, "vocab", vocab)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "symbols": np.asarray(self.symbols, dtype=str),
            "tokens": np.asarray(self.tokens, dtype=np.int64),
            "chroms": np.asarray(self.chroms, dtype=np.int64),
            "starts": np.asarray(self.starts, dtype=np.float64),
        }

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, arr in sorted(self.arrays().items()):
            h.update(name.encode())
            h.update("\0".join(arr.tolist()).encode() if arr.dtype.kind == "U" else arr.tobytes())
        return h.hexdigest()

    @classmethod
    def build(cls, cfg: UCEConfig) -> UCEGenes:
        """The mapping of ``uce.data_proc.data_utils`` from the protein-embedding, chromosome and offset files."""
        import pandas as pd

        if cfg.protein_embeddings is None or cfg.spec_chrom_csv_path is None:
            raise InputError(
                "the uce embedder needs protein_embeddings (the directory of *_ESM2.pt files, or the species' .pt "
                "file) and spec_chrom_csv_path (species_chrom.csv), or model_dir= with the package's model_files"
            )
        pe_path = Path(cfg.protein_embeddings)
        if pe_path.is_dir():
            if cfg.species not in SPECIES_FILES:
                raise InputError(
                    f"no protein-embedding file is known for species {cfg.species!r} (known: "
                    f"{', '.join(sorted(SPECIES_FILES))}): pass the species' .pt file as protein_embeddings"
                )
            pe_path = pe_path / SPECIES_FILES[cfg.species]
        if not pe_path.is_file():
            raise InputError(f"protein-embedding file {pe_path} does not exist")
        table = _torch_load(pe_path)
        if not isinstance(table, dict) or not table:
            raise InputError(f"{pe_path} is not a dict of gene symbol -> protein embedding")
        # the package upper-cases the keys ({k.upper(): v}); a gene's token is its position among them + offset
        upper = list(dict.fromkeys(str(k).upper() for k in table))
        if cfg.species_offset is not None:
            offset = int(cfg.species_offset)
        else:
            if cfg.offset_pkl_path is None or not Path(cfg.offset_pkl_path).is_file():
                raise InputError(
                    "the uce embedder needs offset_pkl_path (species_offsets.pkl) or species_offset: "
                    f"{cfg.offset_pkl_path} not found"
                )
            offsets = load_plain_pickle(Path(cfg.offset_pkl_path), f"the species offsets file {cfg.offset_pkl_path}")
            if not isinstance(offsets, dict) or not all(isinstance(v, int) for v in offsets.values()):
                raise InputError(f"{cfg.offset_pkl_path} is not a dict of species -> token offset")
            if cfg.species not in offsets:
                raise InputError(f"species {cfg.species!r} is not in {cfg.offset_pkl_path} ({sorted(offsets)})")
            offset = int(offsets[cfg.species])
        csv_path = Path(cfg.spec_chrom_csv_path)
        if not csv_path.is_file():
            raise InputError(f"chromosome position file {csv_path} does not exist")
        pos = pd.read_csv(csv_path)
        missing_cols = {"species", "gene_symbol", "chromosome", "start"} - set(pos.columns)
        if missing_cols:
            raise InputError(f"{csv_path} lacks column(s) {sorted(missing_cols)}")
        spec_chrom = pd.Categorical(pos["species"].astype(str) + "_" + pos["chromosome"].astype(str))
        pos = pos.assign(code=spec_chrom.codes, key=pos["gene_symbol"].astype(str).str.upper())
        pos = pos[pos["species"] == cfg.species].drop_duplicates("key").set_index("key")
        known = np.array([s in pos.index for s in upper])
        if not known.any():
            raise InputError(f"none of the genes of {pe_path} have a position for {cfg.species!r} in {csv_path}")
        if not known.all():
            logger.info("uce: %d genes of %s have no chromosome position and are not used", (~known).sum(), pe_path)
        symbols = np.array(upper, dtype=object)[known]
        rows = pos.loc[list(symbols)]
        genes = cls(
            symbols=symbols.astype(str),
            tokens=np.flatnonzero(known).astype(np.int64) + offset,
            chroms=rows["code"].to_numpy(np.int64),
            starts=rows["start"].to_numpy(np.float64),
        )
        logger.info("uce: %d genes for %s (token offset %d)", len(symbols), cfg.species, offset)
        return genes


# -- the embedder ---------------------------------------------------------------------------------------------------


class UCEEmbedder(Embedder):
    """UCE cell embeddings (``output_dim`` floats, L2-normalised) from local model files.

    Give the files one by one, or ``model_dir`` laid out as the package's ``model_files/`` (``4layer_model.torch``,
    ``all_tokens.torch``, ``species_chrom.csv``, ``species_offsets.pkl``, ``protein_embeddings/``); explicit
    paths win. ``protein_embeddings`` is the directory of ``*_ESM2.pt`` files or the species' file itself;
    ``species_offset`` replaces ``offset_pkl_path``. Defaults are those of the package's 4-layer model.
    """

    accelerated = True

    name = "uce"
    needs = "X"

    def __init__(
        self,
        model_path: str | Path | None = None,
        token_file: str | Path | None = None,
        protein_embeddings: str | Path | None = None,
        spec_chrom_csv_path: str | Path | None = None,
        offset_pkl_path: str | Path | None = None,
        *,
        model_dir: str | Path | None = None,
        species: str = "human",
        species_offset: int | None = None,
        nlayers: int = 4,
        output_dim: int = 1280,
        d_hid: int = 5120,
        token_dim: int = 5120,
        d_model: int = 1280,
        nhead: int = 20,
        pad_length: int = 1536,
        sample_size: int = 1024,
        pad_token_idx: int = 0,
        chrom_token_right_idx: int = 2,
        cls_token_idx: int = 3,
        chrom_token_offset: int = 143574,
        n_chrom_tokens: int = 1895,
        weighting: Literal["counts", "lognorm"] = "counts",
        batch_size: int = 25,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        paths: dict[str, str | Path | None] = {
            "token_file": token_file,
            "protein_embeddings": protein_embeddings,
            "spec_chrom_csv_path": spec_chrom_csv_path,
            "offset_pkl_path": offset_pkl_path,
        }
        if model_dir is not None:
            base = Path(model_dir)
            if not base.is_dir():
                raise InputError(f"UCE model_dir {base} is not a directory")
            for name, default in MODEL_DIR_FILES.items():
                if paths[name] is None:
                    paths[name] = base / default
            if model_path is None and nlayers in MODEL_DIR_WEIGHTS:
                model_path = base / MODEL_DIR_WEIGHTS[nlayers]
        if model_path is None or paths["token_file"] is None:
            raise InputError(
                "the uce embedder needs local model files: model_path (the .torch state dict) and token_file "
                "(all_tokens.torch), or model_dir= with the package's model_files layout; nothing is downloaded"
            )

        def _abs(p: str | Path | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        self.config = UCEConfig(
            model_path=str(_abs(model_path)),
            token_file=str(_abs(paths["token_file"])),
            protein_embeddings=_abs(paths["protein_embeddings"]),
            spec_chrom_csv_path=_abs(paths["spec_chrom_csv_path"]),
            offset_pkl_path=_abs(paths["offset_pkl_path"]),
            species=species,
            species_offset=None if species_offset is None else int(species_offset),
            nlayers=int(nlayers),
            output_dim=int(output_dim),
            d_hid=int(d_hid),
            token_dim=int(token_dim),
            d_model=int(d_model),
            nhead=int(nhead),
            pad_length=int(pad_length),
            sample_size=int(sample_size),
            pad_token_idx=int(pad_token_idx),
            chrom_token_right_idx=int(chrom_token_right_idx),
            cls_token_idx=int(cls_token_idx),
            chrom_token_offset=int(chrom_token_offset),
            n_chrom_tokens=int(n_chrom_tokens),
            weighting=weighting,
            batch_size=int(batch_size),
            device=str(device),
            seed=int(seed),
        )
        _uce_model()  # fail early when uce-model is missing
        self._device = resolve_device(self.config.device)
        for what in ("model_path", "token_file"):
            if not Path(getattr(self.config, what)).is_file():
                raise InputError(f"UCE {what} {getattr(self.config, what)} does not exist (nothing is downloaded)")
        self._genes: UCEGenes | None = None
        self._net: Any = None
        self._matches: dict[str, GeneMatch] = {}
        self._digest: str | None = None
        self._seed_prefix = hashlib.sha256(
            json.dumps(self.config.identity(), sort_keys=True).encode()
        ).digest()
        self._warned_kind = False

    # -- interface ------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.output_dim

    @property
    def device(self) -> str:
        return self._device

    def on_device(self, device: str) -> UCEEmbedder:
        """A copy that loads the model onto ``device`` (a shard task on GPU N of a multi-GPU machine); same vectors."""
        device = resolve_device(device)
        if device == self._device:
            return self
        other = copy.copy(self)
        other._device = device
        other._net = None
        return other

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a Ray worker) without the loaded model: the worker loads it from the model files."""
        state = dict(self.__dict__)
        state["_net"] = None
        return state

    @property
    def genes(self) -> GeneVocabulary:
        """The genes UCE reads (symbols with a protein embedding and a chromosome position)."""
        return self._gene_map().vocab

    def params(self) -> dict[str, Any]:
        return asdict(self.config)

    def artefact_digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            h.update(file_digest(self.config.model_path).encode())
            h.update(file_digest(self.config.token_file).encode())
            h.update(self._gene_map().digest().encode())
            self._digest = h.hexdigest()
        return self._digest

    def fingerprint(self) -> str:
        """Parameters that change the vectors + weight-file digests + gene mapping (not paths, device, batch size)."""
        payload = json.dumps({"name": self.name, "params": self.config.identity()}, sort_keys=True, default=str)
        return hashlib.sha256((payload + self.artefact_digest()).encode()).hexdigest()[:16]

    def gene_match(self, genes: GeneVocabulary) -> GeneMatch:
        fp = genes.fingerprint()
        match = self._matches.get(fp)
        if match is None:
            match = match_genes(genes, self._gene_map().vocab)
            if len(self._matches) >= _MAX_MATCH_CACHE:
                self._matches.clear()
            self._matches[fp] = match
        return match

    def transform(self, chunk: CellChunk) -> np.ndarray:
        n = len(chunk)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        W = self._weights(chunk)
        sentences = [
            self._sentence(W.indices[W.indptr[i] : W.indptr[i + 1]], W.data[W.indptr[i] : W.indptr[i + 1]])
            for i in range(n)
        ]
        empty = sum(len(s) == 1 for s in sentences)
        if empty:
            logger.warning(
                "uce: %d of %d cells have no counts on the model's genes; they get the embedding of an empty "
                "sentence",
                empty,
                n,
            )
        bs = self.config.batch_size
        for start in range(0, n, bs):
            out[start : start + bs] = self._embed(sentences[start : start + bs])
        return out

    # -- cell sentences -------------------------------------------------------------------------------------------

    def _weights(self, chunk: CellChunk) -> sp.csr_matrix:
        """Sampling weights of each cell over the model's genes (CSR, sorted indices, no explicit zeros)."""
        if chunk.X is None:
            raise InputError("the uce embedder needs expression values but the chunk has none (X is None)")
        if chunk.X.shape != (len(chunk), len(chunk.genes)):
            raise InputError(
                f"chunk X has shape {chunk.X.shape} but the chunk has {len(chunk)} cells and {len(chunk.genes)} genes"
            )
        match = self.gene_match(chunk.genes)
        raw_counts = self.config.weighting == "counts" and chunk.x_kind == "counts"
        if self.config.weighting == "counts" and not raw_counts and not self._warned_kind:
            logger.warning(
                "uce was trained on raw counts but this chunk holds %r values: weighting genes by log1p(CP10k)",
                chunk.x_kind,
            )
            self._warned_kind = True
        X = sp.csr_matrix(chunk.X, dtype=np.float32)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        if not raw_counts:
            X = to_lognorm(X, chunk.x_kind)
        if raw_counts and X.nnz and X.data.min() < 0:
            raise InputError("counts must be non-negative: check the chunk's x_kind")
        W = match.project(X)
        if raw_counts:
            np.log1p(W.data, out=W.data)
        W.eliminate_zeros()
        W.sort_indices()
        return W

    def _cell_rng(self, cols: np.ndarray, weights: np.ndarray) -> np.random.Generator:
        """The random generator of one cell: seeded from the parameters and the cell's own values."""
        h = hashlib.sha256(self._seed_prefix)
        h.update(np.ascontiguousarray(cols, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
        return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))

    def _sentence(self, cols: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Token ids of one cell's sentence (``uce.eval_data.sample_cell_sentences``), without padding."""
        cfg = self.config
        g = self._gene_map()
        w = np.asarray(weights, dtype=np.float64)
        total = w.sum()
        if len(cols) == 0 or not total > 0:
            return np.array([cfg.cls_token_idx], dtype=np.int64)
        rng = self._cell_rng(cols, weights)
        choice = rng.choice(np.asarray(cols, dtype=np.int64), size=cfg.sample_size, p=w / total, replace=True)
        choice = choice[np.argsort(g.chroms[choice], kind="stable")]
        chrom = g.chroms[choice]
        order = np.unique(chrom)
        rng.shuffle(order)
        pieces: list[np.ndarray] = [np.array([cfg.cls_token_idx], dtype=np.int64)]
        for c in order:
            genes = choice[chrom == c]
            genes = genes[np.argsort(g.starts[genes], kind="stable")]
            pieces.append(np.array([c + cfg.chrom_token_offset], dtype=np.int64))
            pieces.append(g.tokens[genes])
            pieces.append(np.array([cfg.chrom_token_right_idx], dtype=np.int64))
        sentence = np.concatenate(pieces)
        if len(sentence) > cfg.pad_length:
            raise InputError(
                f"a cell sentence has {len(sentence)} tokens (sample_size {cfg.sample_size} + CLS + 2 per "
                f"chromosome), more than pad_length={cfg.pad_length}: lower sample_size or raise pad_length"
            )
        return sentence

    # -- the network ----------------------------------------------------------------------------------------------

    def _embed(self, sentences: list[np.ndarray]) -> np.ndarray:
        torch = _import_torch()
        net = self._model()
        cfg = self.config
        length = max(len(s) for s in sentences)
        tokens = np.full((len(sentences), length), cfg.pad_token_idx, dtype=np.int64)
        # forward() passes (1 - mask) as the key-padding mask, which is added to the attention logits:
        # 1 -> 0 for real tokens, inf -> -inf for padding (really masked)
        mask = np.full((len(sentences), length), np.inf, dtype=np.float32)
        for i, s in enumerate(sentences):
            tokens[i, : len(s)] = s
            mask[i, : len(s)] = 1.0
        with torch.inference_mode():
            t = torch.from_numpy(tokens).to(self._device).t()
            src = torch.nn.functional.normalize(net.pe_embedding(t), dim=2)
            _, embedding = net(src, mask=torch.from_numpy(mask).to(self._device))
        return embedding.float().cpu().numpy()

    def _model(self) -> Any:
        if self._net is not None:
            return self._net
        torch = _import_torch()
        cfg = self.config
        module = _uce_model()
        state = _torch_load(Path(cfg.model_path))
        if not isinstance(state, dict) or "pe_embedding.weight" not in state:
            raise InputError(f"{cfg.model_path} is not a UCE state dict (no pe_embedding.weight)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # nested tensors are off with batch_first=False
            net = module.TransformerModel(
                token_dim=cfg.token_dim,
                d_model=cfg.d_model,
                nhead=cfg.nhead,
                d_hid=cfg.d_hid,
                nlayers=cfg.nlayers,
                output_dim=cfg.output_dim,
                dropout=0.05,
            )
        pe_rows = int(state["pe_embedding.weight"].shape[0])
        net.pe_embedding = torch.nn.Embedding.from_pretrained(torch.zeros(pe_rows, cfg.token_dim))
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(
                f"{cfg.model_path} does not fit nlayers={cfg.nlayers}, d_model={cfg.d_model}, d_hid={cfg.d_hid}, "
                f"token_dim={cfg.token_dim}, output_dim={cfg.output_dim}: give the parameters of that model "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        del state
        # uce.evaluate.get_ESM2_embeddings: append the chromosome tokens to a token file that lacks them
        all_pe = _torch_load(Path(cfg.token_file))
        if not hasattr(all_pe, "shape") or all_pe.ndim != 2 or all_pe.shape[1] != cfg.token_dim:
            raise InputError(
                f"token file {cfg.token_file} must hold a (tokens, {cfg.token_dim}) tensor "
                f"(got {getattr(all_pe, 'shape', type(all_pe).__name__)})"
            )
        if all_pe.shape[0] == cfg.chrom_token_offset:
            gen = torch.Generator().manual_seed(_CHROM_SEED)
            chrom = torch.normal(mean=0.0, std=1.0, size=(cfg.n_chrom_tokens, cfg.token_dim), generator=gen)
            all_pe = torch.vstack((all_pe.float(), chrom))
        if all_pe.shape[0] != pe_rows:  # as the package: keep the trained table unless the token file differs
            net.pe_embedding = torch.nn.Embedding.from_pretrained(all_pe.float().clone())
        del all_pe
        n_tokens = int(net.pe_embedding.weight.shape[0])
        g = self._gene_map()
        highest = max(
            int(g.tokens.max()),
            cfg.chrom_token_offset + int(g.chroms.max()),
            cfg.pad_token_idx,
            cfg.cls_token_idx,
            cfg.chrom_token_right_idx,
        )
        if highest >= n_tokens:
            raise InputError(
                f"token id {highest} is beyond the {n_tokens} token embeddings of the model: the protein-embedding, "
                "offset and chromosome files do not belong to this model (or chrom_token_offset is wrong)"
            )
        max_len = int(net.pos_encoder.pe.shape[0])
        if cfg.pad_length > max_len:
            raise InputError(f"pad_length {cfg.pad_length} exceeds the model's {max_len} positions")
        self._net = net.eval().to(self._device)
        logger.info(
            "uce: loaded %s (%d layers, %d tokens) on %s", cfg.model_path, cfg.nlayers, n_tokens, self._device
        )
        return self._net

    def _gene_map(self) -> UCEGenes:
        if self._genes is None:
            self._genes = UCEGenes.build(self.config)
        return self._genes

    # -- persistence ----------------------------------------------------------------------------------------------

    def _save_artefact(self, directory: Path) -> None:
        arrays: dict[str, Any] = self._gene_map().arrays()
        with open(directory / GENES_FILE, "wb") as fh:
            np.savez(fh, **arrays)
        files = {
            what: {"path": getattr(self.config, what), "sha256": file_digest(getattr(self.config, what))}
            for what in ("model_path", "token_file")
        }
        (directory / FILES_FILE).write_text(json.dumps(files, indent=2, sort_keys=True))

    @classmethod
    def _load(cls, directory: Path, params: dict[str, Any]) -> UCEEmbedder:
        path = Path(directory) / GENES_FILE
        if not path.is_file():
            raise StoreError(f"the UCE embedder at {directory} has no {GENES_FILE}; rebuild the index")
        emb = cls(**params)
        try:
            with np.load(path, allow_pickle=False) as npz:
                emb._genes = UCEGenes(
                    symbols=npz["symbols"], tokens=npz["tokens"], chroms=npz["chroms"], starts=npz["starts"]
                )
        except (KeyError, ValueError, OSError) as exc:
            raise StoreError(f"cannot read the UCE gene mapping {path} ({exc}); rebuild the index") from exc
        return emb

