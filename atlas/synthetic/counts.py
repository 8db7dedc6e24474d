"""A synthetic counts-level atlas as AnnData: streamed chunks (:func:`generate_chunks`) or one dataset in memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anndata as ad
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.normalize import to_lognorm
from scatlas.atlas.synthetic.cells import Cells, iter_cells, make_obs
from scatlas.atlas.synthetic.config import H5AD_LAYOUTS, H5adLayout, SyntheticAtlasConfig
from scatlas.atlas.synthetic.plan import AtlasPlan, DatasetPlan, plan_atlas, select_datasets


def layout_matrices(counts: sp.csr_matrix, layout: str) -> tuple[sp.csr_matrix, dict[str, sp.csr_matrix]]:
    """(X, extra matrices) for a layout; extras are keyed ``layers/counts`` or ``raw/X``."""
    if layout == "counts":
        return counts, {}
    lognorm = to_lognorm(counts, "counts")
    if layout == "lognorm+counts":
        return lognorm, {"layers/counts": counts}
    if layout == "lognorm+raw":
        return lognorm, {"raw/X": counts}
    return lognorm, {}


def _to_anndata(plan: AtlasPlan, ds: DatasetPlan, cells: Cells, layout: str) -> ad.AnnData:
    """A chunk of cells as AnnData in ``layout``."""
    return _assemble(make_obs(plan, ds, cells), plan.var, cells.counts, layout)


def _assemble(obs: pd.DataFrame, var: pd.DataFrame, counts: sp.csr_matrix, layout: str) -> ad.AnnData:
    """AnnData of raw ``counts`` in ``layout`` (X, and ``layers["counts"]`` or ``.raw`` where it keeps counts)."""
    X, extra = layout_matrices(counts, layout)
    layers = {"counts": extra["layers/counts"]} if "layers/counts" in extra else None
    adata = ad.AnnData(X=X, obs=obs, var=var.copy(), layers=layers)
    if "raw/X" in extra:
        adata.raw = ad.AnnData(X=extra["raw/X"], obs=obs, var=var.copy())
    return adata


def resolve_layout(layout: str | None, config: SyntheticAtlasConfig) -> str:
    """``layout``, or the config's when None; refused when unknown."""
    layout = layout or config.layout
    if layout not in H5AD_LAYOUTS:
        raise InputError(f"layout={layout!r} is not known: choose one of {H5AD_LAYOUTS}")
    return layout


def generate_chunks(
    config: SyntheticAtlasConfig,
    *,
    datasets: Sequence[int] | None = None,
    layout: H5adLayout | None = None,
) -> Iterator[ad.AnnData]:
    """Yield the atlas as AnnData chunks of up to ``config.chunk_size`` cells, each from exactly one dataset.

    ``X`` (and ``layers["counts"]`` / ``.raw``) follow ``layout`` (default ``config.layout``); ``var`` is the
    gene table (index = Ensembl ids, or symbols with ``gene_ids="symbol"``). ``datasets`` restricts to some
    dataset indices (the cells drawn for a dataset do not depend on which others are generated).
    """
    chosen = resolve_layout(layout, config)
    plan = plan_atlas(config)
    for ds in select_datasets(plan, datasets):
        for cells in iter_cells(plan, ds, config.chunk_size):
            yield _to_anndata(plan, ds, cells, chosen)


def dataset_anndata(
    config: SyntheticAtlasConfig, index: int, *, layout: H5adLayout | None = None
) -> ad.AnnData:
    """One whole dataset in memory, for small tests and query examples (at scale, use the chunked API)."""
    chosen = resolve_layout(layout, config)
    chunks = list(generate_chunks(config, datasets=[index], layout="counts"))
    obs = pd.concat([c.obs for c in chunks]) if len(chunks) > 1 else chunks[0].obs
    counts = sp.csr_matrix(sp.vstack([c.X for c in chunks], format="csr"))
    return _assemble(obs, chunks[0].var, counts, chosen)

