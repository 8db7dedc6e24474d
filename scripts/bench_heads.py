#!/usr/bin/env python
"""Benchmark of label-head training (index.softmax.fit_softmax) at the sizes an atlas build meets.

A build trains each label column's heads on at most ``max_cells`` sampled cells (100,000 by default), so the cost
does not grow with the atlas; it grows with the sample, the features (2,000 genes; the embedding's d) and the
number of labels. This times one fit per configuration on synthetic data shaped like the gene features (log1p of
Poisson counts from label-specific programs, so classes are distinct but overlap), with the library's defaults
(float32 L-BFGS, 200 iterations), and reports seconds, iterations and peak RSS.

    nice .venv/bin/python scripts/bench_heads.py --cells 20000 100000 --genes 2000 --labels 50
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.5, 0.4, size=d)
    programs = np.tile(base, (k, 1))
    for c in range(k):
        genes = rng.choice(d, size=20, replace=False)
        programs[c, genes] += rng.gamma(2.0, 1.0, size=20)
    y = rng.integers(0, k, size=n)
    X = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 10_000):
        b = min(n, a + 10_000)
        X[a:b] = np.log1p(rng.poisson(programs[y[a:b]]))
    return X, y


def main(argv: list[str] | None = None) -> int:
    from scatlas.index.label_heads import DEFAULT_C_GENES
    from scatlas.index.softmax import fit_softmax

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--labels", type=int, nargs="+", default=[50])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for n in args.cells:
        for k in args.labels:
            X, y = make(n, args.genes, k)
            t = time.perf_counter()
            m = fit_softmax(X, y, k, C=DEFAULT_C_GENES)
            secs = time.perf_counter() - t
            acc = float((m.predict_proba(X[:5000]).argmax(1) == y[:5000]).mean())
            row = {"cells": n, "genes": args.genes, "labels": k, "seconds": round(secs, 1), "iterations": m.n_iter,
                   "train_accuracy": round(acc, 3),
                   "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del X
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
