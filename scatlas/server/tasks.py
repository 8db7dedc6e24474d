"""What the server's jobs do: parse and check a job's form fields before it is queued (bad input is a 400), then
run ``annotate``, ``search`` or the hunt (train, sweep, report) on the shared index, writing fixed file names into
the job's directory, and return the summary the page shows.

The calls are the CLI's (same functions, same defaults), so a job gives what the command gives on the same input.
"""

from __future__ import annotations

import base64
import html
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.outputs import csv_safe
from scatlas.index import AtlasIndex
from scatlas.server.jobs import Job, hide_paths, server_paths
from scatlas.server.uploads import read_obs

QUERY_FILE = "query.h5ad"
"""The name every upload is stored under in its job's directory."""
HIST_BINS = 20
MAX_K = 1000
FILES = {
    "annotate": ("predictions.csv", "annotated.h5ad", "report.json", "umap.png"),
    "search": ("hits.csv", "enrichment.csv", "report.json", "umap.png"),
    "hunt": ("hits.csv", "report.html", "enrichment.csv", "enrichment.png", "scores.png", "de.csv", "report.json"),
}
"""The files a job of each kind may offer (``umap.png`` only when the index has a reference map)."""

Stage = Callable[[str, float, float, float], None]


# -- form fields ---------------------------------------------------------------------------------------------------


def _check_names(fields: dict[str, list[str]], allowed: tuple[str, ...], repeatable: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise InputError(f"unknown form field(s) {', '.join(repr(u[:40]) for u in unknown)}; this route takes: "
                         f"file, {', '.join(allowed)}")
    for name, values in fields.items():
        if len(values) > 1 and name not in repeatable:
            raise InputError(f"the form field {name!r} was given {len(values)} times; give it once")


def _text(fields: dict[str, list[str]], name: str) -> str | None:
    values = [v.strip() for v in fields.get(name, []) if v.strip()]
    return values[0] if values else None


def _number(fields: dict[str, list[str]], name: str, cast: Callable[[str], Any], low: float, high: float,
            default: Any = None) -> Any:
    text = _text(fields, name)
    if text is None:
        return default
    try:
        value = cast(text)
    except ValueError:
        raise InputError(f"{name} must be a number between {low:g} and {high:g} (got {text[:40]!r})") from None
    if not low <= value <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g} (got {value})")
    return value


def _where(view: AtlasIndex, where: str | None) -> None:
    """Check an atlas predicate now (the index's whitelist, then a run on the locked-down connection)."""
    if where is not None:
        view.filter_ids(where)


@dataclass
class AnnotateParams:
    label_keys: list[str]
    where: str | None
    min_confidence: float | None


@dataclass
class SearchParams:
    k: int
    mode: str
    where: str | None
    cells_where: str | None
    selected: int | None = None  # the upload's cells cells_where selects (None: all)


@dataclass
class HuntParams:
    positive: str
    where: str | None
    background: int


def parse_annotate(fields: dict[str, list[str]], view: AtlasIndex, query: Path) -> AnnotateParams:
    _check_names(fields, ("label_key", "where", "min_confidence"), repeatable=("label_key",))
    keys = list(dict.fromkeys(v.strip() for v in fields.get("label_key", []) if v.strip())) or ["cell_type"]
    columns = view.columns()
    for key in keys:
        if key not in columns:
            labels = [c for c in columns if c != "soma_joinid"]
            raise InputError(f"unknown label key {key[:80]!r}: not a column of the atlas cells table ("
                             f"{', '.join(labels[:40])})")
    where = _text(fields, "where")
    _where(view, where)
    return AnnotateParams(keys, where, _number(fields, "min_confidence", float, 0.0, 1.0))


def parse_search(fields: dict[str, list[str]], view: AtlasIndex, query: Path) -> SearchParams:
    from scatlas.query.hunt.sql_predicate import evaluate_sql_predicate

    _check_names(fields, ("k", "mode", "where", "cells_where"))
    k = _number(fields, "k", int, 1, MAX_K, default=30)
    mode = _text(fields, "mode") or "cells"
    if mode not in ("cells", "centroid"):
        raise InputError(f"mode must be 'cells' or 'centroid' (got {mode[:40]!r})")
    where, cells_where = _text(fields, "where"), _text(fields, "cells_where")
    _where(view, where)
    selected = None
    if cells_where is not None:
        mask = evaluate_sql_predicate(read_obs(query), cells_where, what="cells_where predicate")
        if not mask.any():
            raise InputError(f"the cells_where predicate {cells_where[:200]!r} matches none of the uploaded cells")
        selected = int(mask.sum())
    return SearchParams(k, mode, where, cells_where, selected)


def parse_hunt(fields: dict[str, list[str]], view: AtlasIndex, query: Path) -> HuntParams:
    from scatlas.query.hunt.predicate import evaluate_predicate
    from scatlas.query.hunt.train import MIN_POSITIVES

    _check_names(fields, ("positive", "where", "background"))
    positive = _text(fields, "positive")
    if positive is None:
        raise InputError("give the positive predicate: which uploaded cells are the ones to hunt, e.g. "
                         "\"cell_type = 'pDC'\"")
    n = int(evaluate_predicate(read_obs(query), positive).sum())
    if n < MIN_POSITIVES:
        raise InputError(f"the positive predicate {positive[:200]!r} matches {n} of the uploaded cells; at least "
                         f"{MIN_POSITIVES} are needed")
    where = _text(fields, "where")
    _where(view, where)
    return HuntParams(positive, where, _number(fields, "background", int, 0, 1_000_000, default=20_000))


# -- running -------------------------------------------------------------------------------------------------------


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    csv_safe(frame).to_csv(tmp, index=False)
    os.replace(tmp, path)


def _histogram(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values[np.isfinite(values)], bins=HIST_BINS, range=(0.0, 1.0))
    return {"edges": [round(float(e), 3) for e in edges], "counts": [int(c) for c in counts]}


def _offered(job: Job, names: tuple[str, ...]) -> None:
    job.files = {name: name for name in names if (job.directory / name).is_file()}


def run_annotate(job: Job, view: AtlasIndex, p: AnnotateParams, expected_s: float) -> dict[str, Any]:
    """``scatlas annotate`` on the upload: predictions.csv (``cell`` = the query's obs names, then the annotate
    columns), annotated.h5ad, report.json and, with a reference map, umap.png."""
    from scatlas.query import annotate

    t0 = time.perf_counter()
    job.stage("annotate", 0.02, 0.9, expected_s)
    optional: dict[str, Any] = {"min_confidence": p.min_confidence} if p.min_confidence is not None else {}
    result = annotate(job.directory / QUERY_FILE, view, label_keys=p.label_keys, where=p.where, progress=False,
                      **optional)
    job.stage("writing", 0.9, 0.99, 1.0 + expected_s / 10)
    d = job.directory
    result.report["query"]["source"] = job.upload_name  # not the server's path
    _hide_index_path(result.report, view)
    result.write(d / "annotated.h5ad", report_json=d / "report.json",
                 map_png=d / "umap.png" if result.placement is not None else None)
    predictions = result.predictions.copy()
    predictions.insert(0, "cell", predictions.index.astype(str))
    _write_csv(predictions, d / "predictions.csv")
    _offered(job, FILES["annotate"])
    report = result.report
    labels = {}
    for key, lab in report.get("labels", {}).items():
        counts = sorted(lab.get("counts", {}).items(), key=lambda kv: -kv[1])
        labels[key] = {
            "predicted_by": lab.get("predicted_by"), "unknown_rate": lab.get("unknown_rate"),
            "levels": lab.get("levels", {}), "top": [[str(k), int(n)] for k, n in counts[:20]],
            "confidence_histogram": _histogram(predictions[f"{key}_confidence"].to_numpy()),
            "median_confidence": round(float(np.nanmedian(predictions[f"{key}_confidence"])), 4)
            if len(predictions) else None,
        }
    mapping = report.get("mapping") or {}
    warnings = []
    if mapping.get("verdict") != "maps_poorly" and mapping.get("caveat"):  # (maps_poorly: annotate's own warning)
        warnings.append(f"the query maps onto the atlas, but: {mapping['caveat']}")
    return {
        "cells": int(len(predictions)), "label_keys": p.label_keys, "where": p.where,
        "gene_overlap": report.get("gene_overlap"), "mapping": {k: mapping.get(k) for k in ("verdict", "score")},
        "labels": labels, "map": result.placement is not None, "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _hide_index_path(report: dict[str, Any], view: AtlasIndex) -> None:
    """The report names the index, and any path of it or of its atlas store, by its directory's name: clients need
    not learn the server's paths."""
    if isinstance(report.get("index"), dict) and "path" in report["index"]:
        report["index"]["path"] = view.path.name
    report.update(_public(report, view))


def _public(value: Any, view: AtlasIndex) -> Any:
    """``value`` (text or JSON-like) with the paths of the index and its atlas store replaced by their names."""
    return hide_paths(value, server_paths(view.path, view.atlas_path))


def run_search(job: Job, view: AtlasIndex, p: SearchParams, expected_s: float) -> dict[str, Any]:
    """``scatlas search`` on the upload: hits.csv, enrichment.csv, report.json and, with a map, umap.png."""
    from scatlas.query.search import search_cells, write_search

    t0 = time.perf_counter()
    job.stage("search", 0.02, 0.9, expected_s)
    result = search_cells(job.directory / QUERY_FILE, view, k=p.k, mode=p.mode,  # type: ignore[arg-type]
                          where=p.where, cells_where=p.cells_where, progress=False)
    job.stage("writing", 0.9, 0.99, 1.0 + expected_s / 10)
    d = job.directory
    result.report["query"]["source"] = job.upload_name  # not the server's path
    _hide_index_path(result.report, view)
    has_map = bool(result.report.get("map", {}).get("available"))
    write_search(result, view, d / "hits.csv", enrichment_out=d / "enrichment.csv", report_out=d / "report.json",
                 map_png=d / "umap.png" if has_map else None, inputs=(d / QUERY_FILE,))
    _offered(job, FILES["search"])
    report = result.report
    top_labels: list[list[Any]] = []
    if "cell_type" in result.hits.columns:
        distinct = result.hits.drop_duplicates("soma_joinid")
        counts = distinct["cell_type"].astype(object).fillna("(missing)").astype(str).value_counts()
        top_labels = [[str(k), int(n)] for k, n in counts.head(15).items()]
    return {
        "query": {k: report["query"].get(k) for k in ("n_cells", "cells_selected", "cells_used", "cells_no_expression")},
        "params": report["params"], "hits": report["hits"], "enriched": report.get("enriched", {}),
        "hit_labels": top_labels, "map": has_map, "seconds": round(time.perf_counter() - t0, 2),
    }


def _inline_images(page: str, directory: Path) -> str:
    """The hunt report's HTML with its PNGs (``src="NAME.png"`` beside it) inlined as data URIs, so that the page
    stands alone; other sources are dropped."""

    def inline(m: re.Match[str]) -> str:
        name = html.unescape(m.group(1))
        path = directory / name
        if "/" in name or not name.endswith(".png") or not path.is_file():
            return 'src=""'
        return 'src="data:image/png;base64,' + base64.b64encode(path.read_bytes()).decode("ascii") + '"'

    return re.sub(r'src="([^"]*)"', inline, page)


def run_hunt(job: Job, view: AtlasIndex, p: HuntParams, expected_s: float) -> dict[str, Any]:
    """``scatlas hunt train``, ``sweep`` and ``report`` on the upload: hits.csv (the hits with their atlas
    metadata; only those matching ``where`` when given), report.html (standalone), enrichment.csv/.png, report.json."""
    from scatlas.atlas.atomic import write_json_atomic
    from scatlas.query.hunt import report, sweep, train

    t0 = time.perf_counter()
    d = job.directory
    job.stage("train", 0.02, 0.45, expected_s * 0.5)
    clf = train(view, d / QUERY_FILE, positive=p.positive, background=p.background, out=d / "classifier",
                progress=False)
    job.stage("sweep", 0.45, 0.7, 1.0 + expected_s * 0.2)
    swept = sweep(view, clf, d / "sweep", progress=False)
    hits = pd.read_parquet(swept.hits_path)
    n_swept_hits = len(hits)
    if p.where is not None:
        keep = view.filter_ids(p.where, allow_empty=True)
        hits = hits[hits["soma_joinid"].isin(keep)].reset_index(drop=True)
    job.stage("report", 0.7, 0.99, 2.0 + expected_s * 0.3)
    hits.attrs["source"] = "the sweep of this job"
    rep = report(hits, view, d / "report", progress=False, where=p.where)  # group sizes within the filter too
    _write_csv(hits, d / "hits.csv")
    rdir = Path(rep.out_dir)
    page = _inline_images(_public((rdir / "report.html").read_text(encoding="utf-8"), view), rdir)  # paths first
    (d / "report.html").write_text(page, encoding="utf-8")
    for name in ("enrichment.csv", "enrichment.png", "scores.png", "de.csv"):  # what the report page names
        if (rdir / name).is_file():
            os.replace(rdir / name, d / name)
    m = clf.metrics
    by: dict[str, list[dict[str, Any]]] = {}
    for column in rep.by:
        sub = rep.enrichment[rep.enrichment["column"] == column].sort_values("n_hits", ascending=False,
                                                                             kind="stable").head(8)
        by[column] = [{"group": str(g), "n_hits": int(n), "n_cells": int(c), "fraction": float(f),
                       "qvalue": float(q)}
                      for g, n, c, f, q in zip(sub["group"], sub["n_hits"], sub["n_cells"], sub["fraction"],
                                               sub["qvalue"], strict=True)]
    genes_up: list[str] = []
    if rep.de is not None and not rep.de.empty:
        sig = rep.de[(rep.de["qvalue"] < 0.05) & (rep.de["log2fc"] > 0)].sort_values("log2fc", ascending=False)
        genes_up = [str(g) for g in sig["gene_symbol"].head(10)]
    metrics: dict[str, Any] = {k: round(float(m[k]), 4) for k in ("precision", "recall", "auprc") if k in m}
    summary: dict[str, Any] = {
        "classifier": {"positives": clf.counts.get("n_positive"), "negatives": clf.counts.get("n_negative"),
                       "threshold": round(float(clf.threshold), 4), **metrics},
        "sweep": {"cells": swept.n_cells, "hits": n_swept_hits, "cutoff": round(float(swept.cutoff), 4),
                  "stages": swept.stages, "training_positive_hits": swept.n_training_hits},
        "where": p.where, "hits": int(len(hits)), "by": by, "de_skipped": _public(rep.de_skipped, view), "genes_up": genes_up,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(d / "report.json", summary)
    _offered(job, FILES["hunt"])
    return summary
