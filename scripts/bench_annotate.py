"""Benchmark label transfer: ``scatlas annotate`` against logistic regression, CellTypist and scanpy ingest.

Pairs (reference -> query) come from the real labelled datasets in ``../shared/data/raw`` (split by batch,
chemistry, technology or study) plus a synthetic atlas with cell types held out of the reference. For each
pair:

* **scatlas**: the reference datasets are ingested into a temporary atlas store (``atlas.ingest``), indexed
  (``index.build_index``, default PCA embedder) and the query is annotated (``query.annotate``) with the
  defaults; **scatlas_no_abstain** is the same with no abstention, **scatlas_abstain** with the settings for
  queries that may hold types the atlas lacks (min_confidence 0.5, far_quantile 0.001).
* **logreg**: scikit-learn ``LogisticRegression(class_weight="balanced")`` on log1p(CP10k) values of the
  highly variable genes scatlas' embedder selected on the same reference.
* **celltypist**: ``celltypist.train`` (defaults) on log1p(CP10k) values of all reference genes, then
  ``celltypist.annotate`` (no majority voting).
* **scanpy_ingest**: ``sc.pp.pca`` + ``sc.pp.neighbors`` on the reference (same HVGs as logreg,
  log1p(CP10k), dense), then ``sc.tl.ingest`` (kNN labels, PCA embedding) of the query.

celltypist 1.7.1 passes ``multi_class`` to scikit-learn, which scikit-learn >= 1.6 removed, and scanpy 1.11's
ingest breaks with pynndescent 0.7; each peer is tried in the project's environment first (the error is
recorded), then, with ``--peer-python`` or ``--make-peer-venv DIR``, in a venv that puts scikit-learn 1.5.2
and pynndescent 0.5.13 in front of the project's packages (the project's environment is not touched).

Metrics (``query.evaluate.evaluate_labels``): accuracy and macro-F1 on query cells whose label the reference
has (an "unknown" counts as a miss), the unknown rate on those cells, and the abstention rate on cells whose
label the reference lacks. Peers never abstain. Wall time covers fitting and predicting (for scatlas: ingest +
index build + annotate).

Cell Ontology: every pair whose labels have CL terms (``annotate_bench/ontology_maps.py``) passes them to
``ingest(ontology_map=...)`` and ``annotate(ontology_map=...)``; scatlas' metrics then also hold ``fine`` (the same
metrics on ``label_pred_fine``, its best class without abstention or ancestor fallback) and ``ontology``
(ontology-aware accuracy, fine / ancestor / unknown rates, ECE of the confidence), shown in the block
"Annotation: ontology-aware scores" of docs/benchmarks.md (``--docs-blocks``).

``--tune`` sweeps scatlas' parameters (predictor, k, weighting, class_balance, align, min_confidence,
far_quantile) on every pair run and records the grid; :func:`annotate_bench.tuning.pick` chooses by its declared rule (worst margin
against logreg over the real pairs, then mean open-set macro-F1) and the defaults in ``query.annotate`` come from
it.
``--scale-cells N`` times annotating N synthetic cells in a fresh process and records its peak RSS.

The code is the package ``scripts/annotate_bench/`` (pairs, methods, peers, evaluate, dropout, tuning, scale,
render, run, cli); this file is its command line.

Usage (the exact command of the published table is written above it in docs/benchmarks.md)::

    nice .venv/bin/python scripts/bench_annotate.py --tune --scale-cells 100000 \\
        --make-peer-venv /tmp/peer-venv --json-out bench_out/annotate.json --write-docs
"""

from __future__ import annotations

from annotate_bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__.split("\n")[0]))
