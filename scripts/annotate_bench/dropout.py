"""Queries lacking genes: annotate with only a share of the embedder's genes kept, in seeded draws."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .common import log
from .evaluate import score
from .methods import Prepared, run_logreg, run_scatlas

DROPOUT_PAIRS = ("kang2018_ctrl_to_stim", "zheng_sorted_to_kang_ctrl", "symphony_5p_to_3p")


def gene_dropout(p: Prepared, keep_fractions: list[float], draws: int = 5) -> list[dict[str, Any]]:
    """The query without a random share of the embedder's genes, for each fraction kept and each of ``draws`` seeded
    draws of the genes: scatlas with its label heads refitted for the genes left (the default) and as trained
    (``missing_genes="impute"``), and logreg trained on the genes left. No abstention, so the rows compare
    predictions only. Which genes go matters (one draw of 10% cost the heads as trained 0.08 on kang, another
    nothing), hence several draws and their mean."""
    import anndata

    from scatlas.atlas.genes import match_genes
    from scatlas.atlas.sources import open_h5ad

    q = anndata.read_h5ad(p.query)
    src = open_h5ad(p.query)
    try:
        cols = np.sort(match_genes(src.genes, p.hvg).source_cols)  # query columns that are embedder genes
    finally:
        src.close()
    methods = ("scatlas_refit", "scatlas_impute", "logreg")
    no_abstain: dict[str, Any] = {"min_confidence": 0.0, "far_quantile": None}
    rows: list[dict[str, Any]] = []
    for frac in keep_fractions:
        n_drop = int(round((1 - frac) * len(cols)))
        row: dict[str, Any] = {"keep_fraction": frac, "genes_kept": len(cols) - n_drop, "genes": len(cols),
                               "draws": draws, **{m: [] for m in methods}, **{f"{m}_s": [] for m in methods}}
        for seed in range(draws):
            drop = set(cols[np.random.default_rng(seed).permutation(len(cols))[:n_drop]].tolist())
            path = p.work / f"query_genes_{frac:.2f}_{seed}.h5ad"
            q[:, [i for i in range(q.n_vars) if i not in drop]].copy().write_h5ad(path)
            pq = dataclasses.replace(p, query=path, annotate_kw=dict(p.annotate_kw))
            pq.annotate_kw.setdefault("min_gene_overlap", min(0.5, frac - 0.05))
            for meth in methods:
                if meth == "logreg":
                    pred, info = run_logreg(pq)
                else:
                    pred, info = run_scatlas(pq, **no_abstain, missing_genes=meth.removeprefix("scatlas_"))
                row[meth].append(score(pq, pred)["macro_f1"])
                row[f"{meth}_s"].append(info.get("annotate_s", info.get("wall_s")))
        log.info("%s genes kept %.2f: %s", p.name, frac, {m: row[m] for m in methods})
        rows.append(row)
    return rows
