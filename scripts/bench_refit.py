"""How much to regularise a gene head refitted for a query's genes: macro-F1 of the best class at each factor.

    nice .venv/bin/python scripts/bench_annotate.py --methods scatlas --work /tmp/bench    # builds the pairs
    nice .venv/bin/python scripts/bench_refit.py --work /tmp/bench --write-docs

For each pair (an index and a query left in ``--work`` by the bench) and each random draw of a share of the
embedder's genes (the pbmc3k pairs: their own partial gene set), the label head is refitted on the query's genes
with C = DEFAULT_C_GENES x factor (0: the library's rule, x all genes / genes present), and the flat macro-F1 of its best class is measured (heads averaged as annotate
does, the query MNN-aligned). Reports each factor's mean over pairs and draws.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from annotate_bench.pairs import PAIRS  # noqa: E402
from docs_block import write_bench_section  # noqa: E402

DROPOUT_PAIRS = ("kang2018_ctrl_to_stim", "zheng_sorted_to_kang_ctrl", "symphony_5p_to_3p")
PARTIAL_PAIRS = ("kang_ctrl_to_pbmc3k", "kang_stim_to_pbmc3k")


def macro_f1(work: Path, name: str, factor: float, fraction: float, draw: int) -> float:
    """Flat macro-F1 of the refitted heads' best class on one pair, with ``fraction`` of the query's genes."""
    import anndata

    from scatlas.index import (
        AtlasIndex,
        apply_shift,
        estimate_shift,
        l2_normalize,
        refit_for_genes,
        sample_sorted,
    )
    from scatlas.index.label_heads import DEFAULT_C_GENES, refit_c_genes
    from scatlas.query.annotate_report import read_truth
    from scatlas.query.atlas_labels import atlas_labels
    from scatlas.query.evaluate import evaluate_labels
    from scatlas.query.prepare import open_query
    from scatlas.query.transfer import head_probabilities

    pair = next(p for p in PAIRS if p.name == name)
    d = work / name
    query = anndata.read_h5ad(d / "query.h5ad")
    if fraction < 1:
        keep = np.random.default_rng(draw).random(query.n_vars) < fraction
        query = query[:, keep].copy()
    with AtlasIndex.open(d / "index") as idx:
        atlas = atlas_labels(idx, ["label"], None, None, 0.5, "auto", None)
        cells = open_query(query, idx)
        head = atlas.heads["label"]
        present = cells.match.target_present()
        # refit_for_genes applies refit_c_genes; undo it so that `factor` (0: the library's rule) is what is measured
        library = refit_c_genes(DEFAULT_C_GENES, present)
        c = DEFAULT_C_GENES if factor == 0 else DEFAULT_C_GENES * factor * DEFAULT_C_GENES / library
        head = dataclasses.replace(head, config={**head.config, "c_genes": c})
        emb = idx.embedder
        if not present.all():
            head = refit_for_genes({"label": head}, present,
                                   lambda g: l2_normalize(emb.transform_gene_features(g, present)))["label"]
        parts = [emb.transform_with_features(c) for c in cells.chunks(5000, np.arange(cells.n_cells))]
        V = l2_normalize(np.concatenate([p[0] for p in parts]))
        G = np.concatenate([p[1] for p in parts])
        shift = estimate_shift(idx, V[sample_sorted(len(V), 5000, 0)]).shift
        P = head.predict_proba(apply_shift(V, shift), G)
        cats = list(atlas.categories["label"])
        P = head_probabilities(P, atlas.head_columns["label"], len(cats))
        truth = read_truth(query.obs["label"].reset_index(drop=True), atlas.classes["label"],
                           user_map=pair.query_terms or None)
        cells.close()
    pred = np.asarray(cats, dtype=object)[P.argmax(axis=1)]
    return float(evaluate_labels(truth.classes, pred, set(cats))["macro_f1"] or 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--factors", default="1,10,0", help="C multipliers; 0 = the library's rule (refit_c_genes)")
    ap.add_argument("--fractions", default="0.5,0.3")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    factors = [float(f) for f in args.factors.split(",")]
    cases = [(n, f, d) for n in DROPOUT_PAIRS for f in map(float, args.fractions.split(",")) for d in range(args.draws)]
    cases += [(n, 1.0, 0) for n in PARTIAL_PAIRS]
    rows = []
    for name, fraction, draw in cases:
        scores = [macro_f1(args.work, name, factor, fraction, draw) for factor in factors]
        rows.append((name, fraction, draw, scores))
        sys.stdout.write(f"{name} genes {fraction} draw {draw}: " + ", ".join(f"{s:.4f}" for s in scores) + "\n")
    means = np.mean([r[3] for r in rows], axis=0)
    lines = ["| pair | genes kept | draw | " + " | ".join(f"C x {f:g}" if f else "C x genes/present" for f in factors)
             + " |",
             "|---|---|---|" + "---|" * len(factors)]
    lines += [f"| {n} | {'own set' if n in PARTIAL_PAIRS else f'{fr:.0%}'} | {d} | " + " | ".join(f"{s:.3f}" for s in sc)
              + " |" for n, fr, d, sc in rows]
    lines.append("| **mean** | | | " + " | ".join(f"**{m:.4f}**" for m in means) + " |")
    table = "\n".join(lines)
    sys.stdout.write(table + "\n")
    if args.write_docs:
        doc = (__doc__ or "").split("\n\n", 2)[2].strip().replace("\n", " ")
        write_bench_section("bench_refit", "bench_refit.py", argv if argv is not None else sys.argv[1:], doc, table,
                            "Label heads refitted for a query's genes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
