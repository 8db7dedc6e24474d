"""Drawing the cells of a planned dataset: fixed-size blocks, each with its own seed, re-cut into chunks.

A block draws cell types, donors, library sizes and primary flags, then negative-binomial (gamma-Poisson)
counts around the type profile plus the donor's effects; :func:`make_obs` gives the cells their CELLxGENE-style
obs columns and the ground truth ``truth_is_rare``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas.atlas.synthetic._common import S_BLOCK, cut_blocks, stream
from scatlas.atlas.synthetic.plan import AtlasPlan, DatasetPlan


@dataclass(frozen=True)
class Cells:
    """Cells ``[offset, offset + len)`` of one dataset: labels, donors, flags and raw counts (float32 CSR)."""

    offset: int
    types: np.ndarray
    donors: np.ndarray
    primary: np.ndarray
    counts: sp.csr_matrix

    def __len__(self) -> int:
        return len(self.types)

    def slice(self, lo: int, hi: int) -> Cells:
        """Cells ``lo:hi`` of these (offset moved along)."""
        return Cells(
            self.offset + lo, self.types[lo:hi], self.donors[lo:hi], self.primary[lo:hi], self.counts[lo:hi]
        )

    @staticmethod
    def concat(parts: Sequence[Cells]) -> Cells:
        """Consecutive parts as one (the first part's offset)."""
        if len(parts) == 1:
            return parts[0]
        return Cells(
            parts[0].offset,
            np.concatenate([p.types for p in parts]),
            np.concatenate([p.donors for p in parts]),
            np.concatenate([p.primary for p in parts]),
            sp.csr_matrix(sp.vstack([p.counts for p in parts], format="csr")),
        )


def draw_block(plan: AtlasPlan, ds: DatasetPlan, effects: np.ndarray, block: int) -> Cells:
    """Block ``block`` of dataset ``ds`` from its own seed; ``effects``: the dataset's donor effects."""
    c = plan.config
    size = plan.block_cells
    start = block * size
    m = min(start + size, ds.n_cells) - start
    rng = stream(c.seed, S_BLOCK, ds.index, block)
    donor_w = np.array([d.weight for d in ds.donors])
    types = rng.choice(len(plan.type_names), size=m, p=ds.type_probs).astype(np.int32)
    donors = rng.choice(len(ds.donors), size=m, p=donor_w / donor_w.sum()).astype(np.int32)
    library = np.exp(rng.normal(ds.library_log_mean, c.library_sigma, m))
    primary = rng.random(m) >= c.non_primary_fraction
    counts = _sample_counts(rng, plan.log_profiles[types] + effects[donors], library, plan.nb_shape)
    return Cells(start, types, donors, primary, counts)


def _sample_counts(
    rng: np.random.Generator, log_mu: np.ndarray, library: np.ndarray, shape: np.ndarray
) -> sp.csr_matrix:
    """Negative-binomial (gamma-Poisson) counts; rows of ``exp(log_mu)`` are scaled to ``library`` UMIs."""
    log_mu -= log_mu.max(axis=1, keepdims=True)
    mu = np.exp(log_mu, out=log_mu)
    mu *= (library / mu.sum(axis=1))[:, None]
    mu /= shape[None, :]
    lam = rng.standard_gamma(np.broadcast_to(shape, mu.shape))
    lam *= mu
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def iter_cells(plan: AtlasPlan, ds: DatasetPlan, chunk_size: int) -> Iterator[Cells]:
    """Cells of one dataset in chunks of ``chunk_size``; identical cells whatever the chunk size."""
    effects = plan.donor_effects(ds.index)
    cache: dict[int, Cells] = {}
    for start in range(0, ds.n_cells, chunk_size):
        stop = min(start + chunk_size, ds.n_cells)
        pieces = cut_blocks(start, stop, plan.block_cells, lambda b: draw_block(plan, ds, effects, b), cache)
        yield Cells.concat([block.slice(lo, hi) for block, lo, hi in pieces])


def _categorical(values: Sequence[str], codes: np.ndarray) -> pd.Categorical:
    """A categorical over the distinct ``values`` (sorted), indexed by ``codes`` into ``values``."""
    categories = sorted(set(values))
    lookup = np.array([categories.index(v) for v in values], dtype=np.int64)
    return pd.Categorical.from_codes(lookup[codes], categories=categories)


def _term_ids(plan: AtlasPlan, present: np.ndarray, type_codes: np.ndarray) -> pd.Categorical:
    """The cells' CL ids as a categorical over the present types' ids; missing (NaN) for a type whose name is no
    CL term."""
    ids = [plan.ontology_ids[t] for t in present]
    categories = sorted({i for i in ids if i is not None})
    lookup = np.array([categories.index(i) if i is not None else -1 for i in ids] + [-1], dtype=np.int64)
    return pd.Categorical.from_codes(lookup[type_codes], categories=categories)


def make_obs(plan: AtlasPlan, ds: DatasetPlan, cells: Cells) -> pd.DataFrame:
    """The obs table of ``cells`` (CELLxGENE Census columns + ``truth_is_rare``; names ``<dataset>_<row>``)."""
    n = len(cells)
    present = ds.present_types
    local = np.full(len(plan.type_names), -1, dtype=np.int64)
    local[present] = np.arange(len(present))
    type_codes = local[cells.types]
    one = np.zeros(n, dtype=np.int64)
    width = max(8, len(str(ds.n_cells - 1)))
    names = [f"{ds.dataset_id}_{k:0{width}d}" for k in range(cells.offset, cells.offset + n)]
    donors = ds.donors
    obs = pd.DataFrame(
        {
            "dataset_id": pd.Categorical.from_codes(one, categories=[ds.dataset_id]),
            "donor_id": pd.Categorical.from_codes(
                cells.donors.astype(np.int64), categories=[d.donor_id for d in donors]
            ),
            "assay": pd.Categorical.from_codes(one, categories=[ds.assay]),
            "cell_type": pd.Categorical.from_codes(
                type_codes, categories=[plan.type_names[t] for t in present]
            ),
            "cell_type_ontology_term_id": _term_ids(plan, present, type_codes),
            "tissue": pd.Categorical.from_codes(one, categories=[ds.tissue]),
            "tissue_general": pd.Categorical.from_codes(one, categories=[ds.tissue_general]),
            "disease": _categorical([d.disease for d in donors], cells.donors),
            "sex": _categorical([d.sex for d in donors], cells.donors),
            "development_stage": _categorical([d.development_stage for d in donors], cells.donors),
            "is_primary_data": np.asarray(cells.primary, dtype=bool),
            "truth_is_rare": plan.is_rare[cells.types].astype(bool),
        },
        index=pd.Index(names, dtype=object),
    )
    return obs


def empty_cells() -> Cells:
    """No cells (the template of an obs table)."""
    empty = np.zeros(0, dtype=np.int32)
    return Cells(0, empty, empty, np.zeros(0, dtype=bool), sp.csr_matrix((0, 0), dtype=np.float32))

