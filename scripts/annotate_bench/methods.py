"""scatlas (ingest + index build + annotate) and the logistic-regression baseline on a prepared pair."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import LABEL

FINE_PRED = "_pred_fine"
"""The key of scatlas' ``{label}_pred_fine`` array in a runner's info (taken out before the info is saved)."""


@dataclass
class Prepared:
    name: str
    refs: list[Path]
    query: Path
    note: str
    work: Path
    index_dir: Path | None = None
    hvg: Any = None  # GeneVocabulary of the embedder's genes
    annotate_kw: dict[str, Any] = field(default_factory=dict)  # ontology_map: the query labels' CL terms
    build_s: float = 0.0
    ref_terms: dict[str, str] = field(default_factory=dict)  # reference label -> CL term, given to ingest


def lognorm_matrix(path: Path, genes: Any | None) -> tuple[Any, np.ndarray, Any]:
    """(log1p(CP10k) CSR over ``genes`` (or the file's own genes), labels, the file's GeneVocabulary)."""
    import scipy.sparse as sp

    from scatlas.atlas.genes import match_genes
    from scatlas.atlas.normalize import to_lognorm
    from scatlas.atlas.sources import open_h5ad

    src = open_h5ad(path)
    try:
        blocks = [X for _, X in src.iter_rows(np.arange(src.n_obs), 20_000)]
        X = to_lognorm(sp.vstack(blocks).tocsr(), src.expression.x_kind)
        file_genes = src.genes
        labels = src.obs[LABEL].to_numpy(dtype=object)
    finally:
        src.close()
    if genes is not None:
        X = match_genes(file_genes, genes).project(X)
    return sp.csr_matrix(X, dtype=np.float32), labels, file_genes


def ref_query(p: Prepared, genes: Any | None) -> tuple[Any, np.ndarray, Any, np.ndarray, Any]:
    import scipy.sparse as sp

    parts = [lognorm_matrix(r, genes) for r in p.refs]
    if genes is None:  # all genes: align every reference file and the query on the first file's genes
        from scatlas.atlas.genes import match_genes

        base = parts[0][2]
        X = sp.vstack(
            [match_genes(g, base).project(x) if i else x for i, (x, _, g) in enumerate(parts)]
        ).tocsr()
        Xq, yq, gq = lognorm_matrix(p.query, None)
        Xq = match_genes(gq, base).project(Xq)
        vocab = base
    else:
        from scatlas.atlas.genes import GeneVocabulary, match_genes

        X = sp.vstack([x for x, _, _ in parts]).tocsr()
        Xq, yq, gq = lognorm_matrix(p.query, genes)
        # only the genes the query has: a gene it lacks would read as zero expression in every query cell
        present = np.sort(match_genes(gq, genes).target_cols)
        if len(present) < len(genes):
            X, Xq = X[:, present], Xq[:, present]
            genes = GeneVocabulary(
                keys=genes.keys[present], feature_id=genes.feature_id[present], feature_name=genes.feature_name[present]
            )
        vocab = genes
    y = np.concatenate([yy for _, yy, _ in parts])
    keep = np.array([v is not None and v == v for v in y])
    return X[keep], y[keep].astype(str), Xq, yq, vocab


def run_scatlas(p: Prepared, **annotate_kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from scatlas.query.annotate import annotate

    t0 = time.perf_counter()
    kw = {**p.annotate_kw, **annotate_kw}
    res = annotate(p.query, p.index_dir, label_keys=[LABEL], truth_key=LABEL, progress=False, **kw)
    t = time.perf_counter() - t0
    ev = res.report["evaluation"][LABEL]
    extra = {
        "annotate_s": round(t, 3),
        "build_s": round(p.build_s, 3),
        "wall_s": round(t + p.build_s, 3),
        "gene_overlap": res.report["gene_overlap"],
        "unknown_reasons": res.report["labels"][LABEL]["unknown_reasons"],
        "levels": res.report["labels"][LABEL]["levels"],
        "mapping": {k: res.report["mapping"].get(k) for k in ("verdict", "cells_out_of_atlas")},
        # annotate's own evaluation: flat (K_pred_fine), with abstention (K_pred) and ontology-aware
        "annotate_eval": {
            "macro_f1": ev.get("macro_f1"),
            "accuracy": ev.get("accuracy"),
            "with_abstention_macro_f1": ev.get("with_abstention", {}).get("macro_f1"),
            "ontology": ev.get("ontology"),
            "truth_labels_absent_from_atlas": ev.get("truth_labels_absent_from_atlas"),
        },
        # popped by run.run_method and scored like the other methods (the best class, no abstention)
        FINE_PRED: res.predictions[f"{LABEL}_pred_fine"].astype(str).to_numpy(),
    }
    return res.predictions[f"{LABEL}_pred"].astype(str).to_numpy(), extra


def build_scatlas(p: Prepared) -> None:
    from scatlas.atlas import ingest
    from scatlas.index import AtlasIndex, build_index

    t0 = time.perf_counter()
    store = p.work / "atlas"
    shutil.rmtree(store, ignore_errors=True)
    ingest(p.refs, store, progress=False, ontology_map=p.ref_terms or None, ontology_label_key=LABEL)
    p.index_dir = p.work / "index"
    build_index(store, p.index_dir, overwrite=True, label_keys=[LABEL], progress=False)
    p.build_s = time.perf_counter() - t0
    with AtlasIndex.open(p.index_dir) as idx:
        p.hvg = idx.embedder.genes  # type: ignore[attr-defined]


def run_logreg(p: Prepared) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    X, y, Xq, _, genes = ref_query(p, p.hvg)
    clf = LogisticRegression(class_weight="balanced", max_iter=2000)
    clf.fit(X, y)
    pred = clf.predict(Xq)
    return np.asarray(pred, dtype=object), {
        "wall_s": round(time.perf_counter() - t0, 3),
        "n_genes": len(genes),
    }
