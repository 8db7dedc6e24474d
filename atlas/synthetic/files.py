"""Writing any synthetic config to files in its format."""

from __future__ import annotations

import os
from pathlib import Path

from scatlas.atlas.errors import InputError
from scatlas.atlas.synthetic.config import SyntheticAtlasConfig
from scatlas.atlas.synthetic.embeddings import SyntheticEmbeddingConfig, write_embedding_npy
from scatlas.atlas.synthetic.h5ad import write_h5ad_datasets


def synthesize(
    config: SyntheticAtlasConfig | SyntheticEmbeddingConfig,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "h5ad",
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthetic atlas (``fmt="h5ad"``: one file per dataset) or embedding set (``fmt="npy"``)."""
    if isinstance(config, SyntheticAtlasConfig):
        if fmt != "h5ad":
            raise InputError(f"fmt={fmt!r}: a counts-level atlas is written as 'h5ad'")
        return write_h5ad_datasets(config, out_dir, overwrite=overwrite)
    if isinstance(config, SyntheticEmbeddingConfig):
        if fmt != "npy":
            raise InputError(f"fmt={fmt!r}: embedding-level data is written as 'npy' (ids, vectors, labels)")
        return write_embedding_npy(config, out_dir, overwrite=overwrite)
    raise InputError(
        f"config must be a SyntheticAtlasConfig or SyntheticEmbeddingConfig, not {type(config).__name__}"
    )
