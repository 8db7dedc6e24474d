"""PCA vs scVI on the real pairs of the annotation bench, and ``scatlas evaluate`` on a three-dataset real atlas.

    nice .venv/bin/python scripts/bench_embedders.py --json-out bench_out/embedders.json --write-docs

Part 1, pairs (``--pairs``; default: those of ``annotate_bench.pairs`` whose reference holds counts, where the batch
effect is large): the reference files are ingested (one atlas dataset each, the harmonised ``label`` column, flat:
no ontology map), each embedder builds an index with the defaults otherwise (``index.build_index``: label heads,
mapping calibration), and the query is annotated (``query.annotate``, defaults: MNN alignment, abstention) by the
neighbours' vote (``predictor="knn"``: what the embedding itself carries) and by the label heads (``"auto"``; PCA's
also read genes, scVI's the embedding only). scVI's query is annotated twice: as annotate runs it (the scArches
query update of the query's batch, which annotate makes for a batch the model has not seen) and with the encoder
alone (``query_update=false``). Figures: macro-F1 over the reference's classes of the best class (no abstention),
accuracy, the unknown rate, build and annotate seconds.

Part 2 (``--evaluate``, on by default): ``query.evaluate_embedders`` (what ``scatlas evaluate`` runs) on an atlas of
kang CTRL, kang STIM and zheng's sorted PBMCs (three datasets: two labs, a stimulation; labels harmonised to the
broad types both label sets share), holding each dataset out in turn.

``--embedder NAME[:k=v,k=v]`` (repeatable) picks the embedders; the default is ``pca`` and ``scvi``. With
``--write-docs`` the tables replace the block between ``<!-- bench_embedders:start -->`` and ``:end -->`` in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from annotate_bench.pairs import KANG_BROAD, PAIRS, ZHENG_BROAD, prepare_pair
from docs_block import write_block

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- bench_embedders:start -->", "<!-- bench_embedders:end -->"
LABEL = "label"
DEFAULT_PAIRS = ("kang2018_ctrl_to_stim", "kang2018_stim_to_ctrl", "tian_celseq2_to_dropseq",
                 "tian_dropseq_to_celseq2", "zheng_sorted_to_kang_ctrl", "zheng_sorted_to_kang_stim")
log = logging.getLogger("bench_embedders")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``scvi:max_epochs=100,n_latent=10`` -> (embedder, options)."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for pair in filter(None, rest.split(",")):
        k, _, v = pair.partition("=")
        options[k] = int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v.lower(), v)
    return name, options


def macro_f1_best(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> float:
    """Macro-F1 over ``classes`` of the best class (no abstention), on cells whose truth is one of them."""
    keep = np.isin(truth, classes)
    t, p = truth[keep], pred[keep]
    f1 = []
    for c in classes:
        tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return round(float(np.mean(f1)), 4)


def annotate_once(index, query: Path, predictor: str, classes: list[str], truth: np.ndarray) -> dict:
    from scatlas.query import annotate

    t0 = time.perf_counter()
    res = annotate(query, index, label_keys=[LABEL], truth_key=LABEL, predictor=predictor, progress=False,
                   keep_neighbors=False)
    seconds = time.perf_counter() - t0
    ev = res.report["evaluation"][LABEL]
    fine = res.predictions[f"{LABEL}_pred_fine"].astype(str).to_numpy()
    scored = np.isin(truth, classes)
    return {"macro_f1": macro_f1_best(fine, truth, classes),
            "accuracy": round(float(np.mean(fine[scored] == truth[scored])), 4),
            "unknown": ev["unknown_rate"], "annotate_s": round(seconds, 1),
            "query_update": (res.report.get("query_update") or {}).get("seconds")}


def run_pair(name: str, work: Path, specs: list[str]) -> dict:
    """Every embedder on one pair (module docstring, part 1)."""
    import anndata

    from scatlas.atlas import ingest
    from scatlas.index import AtlasIndex, build_index

    pair = next(p for p in PAIRS if p.name == name)
    refs, query = prepare_pair(pair, RAW, work)
    ingest(refs, work / "atlas", progress=False)
    classes = sorted({str(v) for r in refs for v in anndata.read_h5ad(r, backed="r").obs[LABEL].dropna()})
    truth = anndata.read_h5ad(query, backed="r").obs[LABEL].astype(str).to_numpy()
    rows = []
    for spec in specs:
        embedder, options = parse_spec(spec)
        out = work / f"index_{len(rows)}"
        t0 = time.perf_counter()
        build_index(work / "atlas", out, embedder=embedder, embedder_options=options, label_keys=[LABEL],
                    progress=False)
        row = {"embedder": spec, "build_s": round(time.perf_counter() - t0, 1)}
        with AtlasIndex.open(out) as idx:
            for predictor in ("knn", "auto"):
                row[predictor] = annotate_once(idx, query, predictor, classes, truth)
            if embedder == "scvi":  # the same index, the query embedded by the encoder alone
                emb = idx.embedder
                emb.config = dataclasses.replace(emb.config, query_update=False)  # type: ignore[attr-defined]
                for predictor in ("knn", "auto"):
                    row[f"{predictor}_encoder_only"] = annotate_once(idx, query, predictor, classes, truth)
        log.info("%s / %s: %s", name, spec, json.dumps(row))
        rows.append(row)
    return {"pair": name, "note": pair.note, "atlas_cells": int(sum(anndata.read_h5ad(r, backed="r").n_obs for r in refs)),
            "query_cells": int(len(truth)), "rows": rows}


def run_evaluate(work: Path, specs: list[str]) -> dict:
    """``evaluate_embedders`` on kang CTRL + kang STIM + zheng sorted, broad labels (module docstring, part 2)."""
    import anndata

    from scatlas.atlas import ingest
    from scatlas.query.evaluate_embedders import EvaluationSettings, evaluate_embedders

    work.mkdir(parents=True, exist_ok=True)
    kang = anndata.read_h5ad(RAW / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    zheng = anndata.read_h5ad(RAW / "zheng2017_pbmc_sorted_reference_mudan.h5ad")
    files = []
    for name, adata, mapping in (("kang_CTRL", kang[kang.obs["sample"] == "CTRL"], KANG_BROAD),
                                 ("kang_STIM", kang[kang.obs["sample"] == "STIM"], KANG_BROAD),
                                 ("zheng_sorted", zheng, ZHENG_BROAD)):
        sub = adata.copy()
        sub.obs["cell_type"] = sub.obs["cell_type"].astype(str).map(mapping).to_numpy(dtype=object)
        sub = sub[sub.obs["cell_type"].notna()].copy()
        files.append(work / f"{name}.h5ad")
        sub.write_h5ad(files[-1])
    ingest(files, work / "eval_atlas", progress=False)
    options = dict(parse_spec(spec) for spec in specs)  # evaluate takes one spec per embedder name
    payload = evaluate_embedders(work / "eval_atlas", work / "eval", list(options),
                                 settings=EvaluationSettings(max_holdouts=3), progress=False,
                                 embedder_options={name: o for name, o in options.items() if o} or None)
    return payload


def pairs_table(pairs: list[dict]) -> str:
    lines = ["| pair (atlas -> query cells) | embedder | build s | kNN vote: macro-F1 (accuracy) | "
             "heads: macro-F1 (accuracy) | query update s |", "|---|---|---|---|---|---|"]
    for p in pairs:
        for r in p["rows"]:
            for tag, label in (("", r["embedder"]), ("_encoder_only", f"{r['embedder']}, encoder only")):
                if f"knn{tag}" not in r:
                    continue
                k, h = r[f"knn{tag}"], r[f"auto{tag}"]
                lines.append(f"| {p['pair']} ({p['atlas_cells']:,} -> {p['query_cells']:,}) | {label} | "
                             f"{r['build_s'] if not tag else ''} | {k['macro_f1']:.3f} ({k['accuracy']:.3f}) | "
                             f"{h['macro_f1']:.3f} ({h['accuracy']:.3f}) | {k.get('query_update') or ''} |")
    return "\n".join(lines)


def evaluate_table(payload: dict) -> str:
    figures = ("knn_macro_f1", "knn_unaligned_macro_f1", "heads_macro_f1", "batch_mixing", "label_conservation",
               "hunt_recall", "build_seconds_per_1k", "embed_seconds_per_1k")
    lines = ["| embedder | " + " | ".join(figures) + " |", "|---" * (len(figures) + 1) + "|"]
    for e in payload["embedders"]:
        vals = [e.get(f) for f in figures]
        lines.append(f"| {e['embedder']} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", action="append", help="NAME[:k=v,...] (repeatable; default: pca and scvi)")
    ap.add_argument("--pairs", nargs="*", default=list(DEFAULT_PAIRS), help="annotation-bench pair names")
    ap.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip part 2 (scatlas evaluate)")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--resume", action="store_true", help="keep what --json-out already holds, run the rest")
    ap.add_argument("--from-json", type=Path, help="render the tables of an earlier --json-out, run nothing")
    ap.add_argument("--write-docs", action="store_true", help="write the tables into docs/benchmarks.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    specs = args.embedder or ["pca", "scvi"]
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        command = "nice .venv/bin/python scripts/bench_embedders.py " + " ".join(sys.argv[1:])
        result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "pairs": [], "evaluate": None}
        if args.resume and args.json_out and args.json_out.is_file():  # what an interrupted run with it finished
            result = json.loads(args.json_out.read_text())
        with tempfile.TemporaryDirectory(prefix="bench_embedders-") as tmp:
            work = args.work or Path(tmp)
            for name in args.pairs:
                if any(p["pair"] == name for p in result["pairs"]):
                    continue
                result["pairs"].append(run_pair(name, work / name, specs))
                if args.json_out:
                    args.json_out.write_text(json.dumps(result, indent=2))
            if args.evaluate and not result.get("evaluate"):
                result["evaluate"] = run_evaluate(work / "evaluate", specs)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))
    text = ("Reference -> query pairs of the annotation bench (one reference dataset each), annotated with the "
            "defaults by the neighbours' vote and by the label heads (PCA's also read genes, scVI's the embedding "
            "only); scVI's query as annotate runs it (the scArches query update of the query's batch: its seconds in "
            "the last column) and with the encoder alone. Macro-F1 of the best class over the reference's classes, "
            "accuracy in brackets.\n\n" + pairs_table(result["pairs"]))
    if result.get("evaluate"):
        text += "\n\n`scatlas evaluate` (kang CTRL + kang STIM + zheng sorted, each held out in turn):\n\n"
        text += evaluate_table(result["evaluate"])
    text += f"\n\n({result.get('command', '')}; {result.get('date', '')})"
    print(text)
    if args.write_docs:
        write_block(DOCS, START, END, f"{START}\n{text}\n{END}", heading="Embedders: PCA vs scVI")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
