"""Gene-space statistics that might tell another tissue from another lab of the atlas' tissue, measured on the
shared files (docs/benchmarks.md, *An atlas whose own datasets match weakly*).

    .venv/bin/python scripts/bench_expression_signals.py

Two atlases: the shared pancreas file's three batches (two types, 1,403 genes, three technologies) and a PBMC atlas
(zheng2017's sorted PBMCs and kang2018's CTRL cells). For each statistic, each atlas dataset is held out in turn and
scored against the other datasets' cell types (as `query.expression_match` calibrates); the cut is the lowest of
the held-out datasets' quantiles (1% for the correlations, 0.1% for the detection shares), and a query's share of
cells under it is printed, with the query's median. Queries: blood cells (kang2018, zheng's sorted PBMCs) against
the pancreas atlas; pancreas cells, Kang's STIM cells and symphony's PBMCs against the PBMC atlas. Log1p CP10k of
the genes atlas and query share, computed here with NumPy (no scatlas index): an exploration, not the shipped check.
Pseudobulk correlations are printed per type.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"
Stat = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(atlas log-expression, atlas types, query log-expression) -> one score per query cell."""


def lognorm(a: anndata.AnnData, genes: list[str]) -> np.ndarray:
    """Log1p CP10k of ``genes`` (totals over all of the cell's genes)."""
    X = sp.csr_matrix(a[:, genes].X, dtype=np.float32)
    total = np.asarray(sp.csr_matrix(a.X).sum(axis=1)).ravel()
    X = sp.diags(1e4 / np.maximum(total, 1)) @ X
    X.data = np.log1p(X.data)
    return np.asarray(X.todense())


def _types(types: np.ndarray) -> list[str]:
    return [t for t in np.unique(types) if (types == t).sum() >= 10]


def profiles(X: np.ndarray, types: np.ndarray) -> np.ndarray:
    return np.stack([X[types == t].mean(axis=0) for t in _types(types)])


def best_corr(A: np.ndarray, P: np.ndarray) -> np.ndarray:
    A = A - A.mean(axis=1, keepdims=True)
    A /= np.linalg.norm(A, axis=1, keepdims=True) + 1e-12
    P = P - P.mean(axis=1, keepdims=True)
    P /= np.linalg.norm(P, axis=1, keepdims=True) + 1e-12
    return (A @ P.T).max(axis=1)


def pearson(X: np.ndarray, types: np.ndarray, Q: np.ndarray) -> np.ndarray:
    return best_corr(Q, profiles(X, types))


def gene_centred(X: np.ndarray, types: np.ndarray, Q: np.ndarray) -> np.ndarray:
    mu = X.mean(axis=0)
    return best_corr(Q - mu, profiles(X, types) - mu)


def gene_standardised(X: np.ndarray, types: np.ndarray, Q: np.ndarray) -> np.ndarray:
    mu, sd = X.mean(axis=0), X.std(axis=0) + 0.1
    return best_corr((Q - mu) / sd, (profiles(X, types) - mu) / sd)


def core_detection(rate: float) -> Stat:
    """The largest share of a type's core genes (detected in ``rate`` of its cells) that a cell detects."""
    def stat(X: np.ndarray, types: np.ndarray, Q: np.ndarray) -> np.ndarray:
        cores = [(X[types == t] > 0).mean(axis=0) >= rate for t in _types(types)]
        return np.max(np.stack([(Q[:, c] > 0).mean(axis=1) for c in cores if c.any()], axis=1), axis=1)
    return stat


def marker_detection(n: int) -> Stat:
    """The largest share of a type's ``n`` top markers (most above the other types, detected in half its cells)
    that a cell detects."""
    def stat(X: np.ndarray, types: np.ndarray, Q: np.ndarray) -> np.ndarray:
        ts = _types(types)
        means = {t: X[types == t].mean(axis=0) for t in ts}
        shares = []
        for t in ts:
            lead = means[t] - np.max(np.stack([means[u] for u in ts if u != t]), axis=0)
            lead = np.where((X[types == t] > 0).mean(axis=0) >= 0.5, lead, -np.inf)
            top = np.argsort(-lead)[:n]
            shares.append((Q[:, top[np.isfinite(lead[top])]] > 0).mean(axis=1))
        return np.max(np.stack(shares, axis=1), axis=1)
    return stat


def top_overlap(k: int) -> Stat:
    """The largest overlap of a cell's ``k`` most expressed genes with a type profile's."""
    def top(M: np.ndarray) -> np.ndarray:
        out = np.zeros(M.shape, dtype=np.float32)
        np.put_along_axis(out, np.argpartition(-M, k, axis=1)[:, :k], 1.0, axis=1)
        return out

    def stat(X: np.ndarray, types: np.ndarray, Q: np.ndarray) -> np.ndarray:
        jitter = 1e-6 * np.random.default_rng(0).random(Q.shape)  # ties among zeros broken at random
        return (top(Q + jitter) @ top(profiles(X, types)).T).max(axis=1) / k
    return stat


STATS: dict[str, tuple[Stat, float]] = {
    "Pearson (shipped)": (pearson, 0.01),
    "gene-centred Pearson": (gene_centred, 0.01),
    "gene-standardised Pearson": (gene_standardised, 0.01),
    **{f"core detection {r}": (core_detection(r), 0.001) for r in (0.5, 0.7, 0.9)},
    **{f"marker detection top {n}": (marker_detection(n), 0.001) for n in (10, 20, 50)},
    **{f"top-{k} gene overlap": (top_overlap(k), 0.001) for k in (10, 20, 50)},
}
"""Each statistic and the held-out quantile its cut is."""


def pseudobulk(X: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
    return {t: np.log1p(np.expm1(X[types == t]).mean(axis=0)) for t in _types(types)}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(atlas: anndata.AnnData, key: str, batch: str, queries: dict[str, tuple[anndata.AnnData, str]]) -> None:
    """For each query (AnnData, its label column), on the genes it shares with the atlas: each statistic's cut from
    held-out batches and the query's share under it, then pseudobulk correlations (per type) of the held-out
    batches and of the query with the atlas' types."""
    batches = atlas.obs[batch].astype(str).to_numpy()
    types = atlas.obs[key].astype(str).to_numpy()
    for name, (q, q_key) in queries.items():
        shared = set(q.var_names)
        genes = list(dict.fromkeys(g for g in atlas.var_names if g in shared))
        X, Q = lognorm(atlas, genes), lognorm(q, genes)
        print(f"\n{name}: {len(genes):,} genes shared with the atlas")
        for stat_name, (stat, quantile) in STATS.items():
            held = [float(np.quantile(stat(X[batches != b], types[batches != b], X[batches == b]), quantile))
                    for b in np.unique(batches)]
            v = stat(X, types, Q)
            print(f"  {stat_name:26s} held-out {quantile:g} quantiles {np.round(held, 3).tolist()}: cut "
                  f"{min(held):.3f}; the query's median {np.median(v):.3f}, {np.mean(v < min(held)):.1%} under")
        held_pb = []
        for b in np.unique(batches):
            rest = pseudobulk(X[batches != b], types[batches != b])
            held_pb += [max(_corr(p, r) for r in rest.values())
                        for p in pseudobulk(X[batches == b], types[batches == b]).values()]
        whole = pseudobulk(X, types)
        mine = [max(_corr(p, r) for r in whole.values())
                for p in pseudobulk(Q, q.obs[q_key].astype(str).to_numpy()).values()]
        print(f"  pseudobulk correlation per type: held-out batches {min(held_pb):.2f}-{max(held_pb):.2f}, the query "
              f"{min(mine):.2f}-{max(mine):.2f}")


def main() -> int:
    pancreas = anndata.read_h5ad(RAW / "pancreas_3studies_beta_ductal_cepo.h5ad")
    kang = anndata.read_h5ad(RAW / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    zheng = anndata.read_h5ad(RAW / "zheng2017_pbmc_sorted_reference_mudan.h5ad")
    symphony = anndata.read_h5ad(RAW / "symphony_pbmc_10x_3chemistries.h5ad")
    print("== pancreas atlas (3 batches), blood queries")
    measure(pancreas, "cellTypes", "batch", {"kang2018": (kang, "cell_type"), "zheng sorted": (zheng, "cell_type")})
    ctrl = kang[kang.obs["sample"].astype(str) == "CTRL"].copy()
    stim = kang[kang.obs["sample"].astype(str) == "STIM"].copy()
    zheng.obs["atlas_batch"], ctrl.obs["atlas_batch"] = "zheng", "kang_ctrl"
    common = [g for g in zheng.var_names if g in set(ctrl.var_names)]
    pbmc = anndata.concat([zheng[:, common], ctrl[:, common]])
    pbmc.obs["cell_type"] = pbmc.obs["cell_type"].astype(str)
    print("\n== PBMC atlas (zheng sorted, kang CTRL), queries of the tissue and of pancreas")
    measure(pbmc, "cell_type", "atlas_batch", {"kang STIM": (stim, "cell_type"), "symphony": (symphony, "cell_type"),
                                               "pancreas": (pancreas, "cellTypes")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
