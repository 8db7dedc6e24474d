"""PCA vs scVI on real data: kang2018 CTRL is the atlas, STIM (interferon-stimulated, the same donors) the query.

    nice .venv/bin/python scripts/bench_embedders.py --json-out /tmp/bench_embedders.json

The control cells are ingested once (``cell_type`` labels, no ontology map: flat classes); each embedder builds an
index on them with the defaults otherwise (``index.build_index``: label heads, mapping calibration), and STIM is
annotated (``query.annotate``, defaults: MNN alignment, abstention) twice: with the neighbour vote
(``predictor="knn"``: what the embedding itself carries) and with the label heads (``"auto"``). For scVI the
query is annotated once more after :meth:`~atlas.embed.scvi.SCVIEmbedder.prepare_query` (the scArches query
update of STIM's batch, which annotate does not call yet); without it STIM is embedded by the encoder as the
atlas' batch. Figures: macro-F1 over the atlas' classes with an ``unknown`` counted as a miss (``macro_f1``), the
same for the best class without abstention (``macro_f1_best``), the unknown rate, build and annotate seconds.
``--embedder NAME[:k=v,k=v]`` (repeatable) picks the embedders; the default is ``pca`` and ``scvi``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"
KANG = "kang2018_ifnb_ctrl_stim_2800.h5ad"
log = logging.getLogger("bench_embedders")


def split_kang(raw: Path, work: Path) -> tuple[Path, Path]:
    """kang2018 split by ``sample`` into ``kang_CTRL.h5ad`` and ``kang_STIM.h5ad`` (the dataset ids)."""
    import anndata

    adata = anndata.read_h5ad(raw / KANG)
    out = []
    for s in ("CTRL", "STIM"):
        path = work / f"kang_{s}.h5ad"
        adata[adata.obs["sample"].astype(str) == s].copy().write_h5ad(path)
        out.append(path)
    return out[0], out[1]


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``scvi:max_epochs=100,n_latent=10`` -> (label, embedder, options)."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for pair in filter(None, rest.split(",")):
        k, _, v = pair.partition("=")
        options[k] = int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v.lower(), v)
    return spec, name, options


def macro_f1_best(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> float:
    """Macro-F1 over ``classes`` of the best class (no abstention), on cells whose truth is one of them."""
    keep = np.isin(truth, classes)
    t, p = truth[keep], pred[keep]
    f1 = []
    for c in classes:
        tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return round(float(np.mean(f1)), 4)


def annotate_once(index, stim: Path, predictor: str, classes: list[str]) -> dict:
    from scatlas.query import annotate

    t0 = time.perf_counter()
    res = annotate(stim, index, label_keys=["cell_type"], truth_key="cell_type", predictor=predictor,
                   progress=False, keep_neighbors=False)
    seconds = time.perf_counter() - t0
    ev = res.report["evaluation"]["cell_type"]
    p = res.predictions
    fine = next((c for c in ("cell_type_pred_fine", "cell_type_best") if c in p.columns), "cell_type_pred")
    import anndata

    truth = anndata.read_h5ad(stim, backed="r").obs["cell_type"].astype(str).to_numpy()
    return {"macro_f1": ev["macro_f1"], "macro_f1_best": macro_f1_best(p[fine].astype(str).to_numpy(), truth, classes),
            "accuracy": ev["accuracy"], "unknown": ev["unknown_rate"], "annotate_s": round(seconds, 1),
            "verdict": res.report.get("mapping", {}).get("verdict")}


def run(work: Path, specs: list[str]) -> dict:
    from scatlas.atlas import ingest
    from scatlas.atlas.sources import open_h5ad
    from scatlas.atlas.sources.base import iter_cell_chunks
    from scatlas.index import AtlasIndex, build_index

    ctrl, stim = split_kang(RAW, work)
    ingest([ctrl], work / "atlas", progress=False)
    import anndata

    classes = sorted(set(anndata.read_h5ad(ctrl, backed="r").obs["cell_type"].astype(str)))
    rows = []
    for spec in specs:
        label, name, options = parse_spec(spec)
        out = work / f"index_{len(rows)}"
        t0 = time.perf_counter()
        build_index(work / "atlas", out, embedder=name, embedder_options=options, progress=False)
        build_s = time.perf_counter() - t0
        row = {"embedder": label, "build_s": round(build_s, 1)}
        for predictor in ("knn", "auto"):
            row[predictor] = annotate_once(out, stim, predictor, classes)
        log.info("%s: %s", label, json.dumps(row))
        if name == "scvi":
            with AtlasIndex.open(out) as idx:
                source = open_h5ad(stim)
                try:
                    record = idx.embedder.prepare_query(  # type: ignore[attr-defined]
                        lambda src=source: iter_cell_chunks(src, chunk_size=20_000))
                finally:
                    source.close()
                row["query_update"] = record
                for predictor in ("knn", "auto"):
                    row[f"{predictor}+update"] = annotate_once(idx, stim, predictor, classes)
            log.info("%s with the query update: %s", label, json.dumps(row))
        rows.append(row)
    return {"atlas": f"{KANG} sample=CTRL", "query": f"{KANG} sample=STIM", "rows": rows}


def table(result: dict) -> str:
    lines = ["| embedder | build s | kNN vote: macro-F1 (accuracy) | heads: macro-F1 (accuracy) |", "|---|---|---|---|"]
    for r in result["rows"]:
        for tag in ("", "+update"):
            if f"knn{tag}" not in r:
                continue
            k, h = r[f"knn{tag}"], r[f"auto{tag}"]
            name = r["embedder"] + (f" + query update ({r['query_update'].get('seconds')} s)" if tag else "")
            lines.append(f"| {name} | {r['build_s'] if not tag else ''} | {k['macro_f1']} ({k['accuracy']}) | "
                         f"{h['macro_f1']} ({h['accuracy']}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", action="append", help="NAME[:k=v,...] (repeatable; default: pca and scvi)")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    specs = args.embedder or ["pca", "scvi"]
    with tempfile.TemporaryDirectory(prefix="bench_embedders-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(work, specs)
    print(table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
