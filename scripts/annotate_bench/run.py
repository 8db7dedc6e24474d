"""One pair of the benchmark: prepare its files, build scatlas' index, run every method and score it."""

from __future__ import annotations

import argparse
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import log
from .evaluate import query_truth, score
from .methods import FINE_PRED, Prepared, build_scatlas, run_logreg, run_scatlas
from .pairs import PAIRS, SYN_HELD_OUT, prepare_pair, prepare_synthetic
from .peers import run_peer

ONTOLOGY_METRICS = (
    "ontology_accuracy", "fine_rate", "ancestor_rate", "unknown_rate", "answered_rate", "ece",
    "n_cells_with_truth_term", "truth_terms_by",
)
"""The ontology-aware scores of annotate's report copied into a scatlas method's metrics."""

Runner = Callable[[], tuple[np.ndarray | None, dict[str, Any]]]


def prepare(name: str, args: argparse.Namespace, pwork: Path) -> Prepared:
    """The files of pair ``name`` in ``pwork`` (emptied first) and scatlas' atlas and index built from them."""
    log.info("== %s", name)
    shutil.rmtree(pwork, ignore_errors=True)
    if name == "synthetic":
        refs, q, meta = prepare_synthetic(pwork, args.synthetic_cells)
        note = (
            f"synthetic counts ({meta['n_cells']} cells, {meta['n_genes']} genes, 4 datasets): "
            f"datasets 0-2 reference, 3 query; {' and '.join(SYN_HELD_OUT)} exist only in the query"
        )
        p = Prepared(name, refs, q, note, pwork)
    else:
        pair = next(p for p in PAIRS if p.name == name)
        refs, q = prepare_pair(pair, args.raw_dir, pwork)
        p = Prepared(name, refs, q, pair.note, pwork, ref_terms=dict(pair.ref_terms))
        p.annotate_kw = dict(pair.annotate_kw)
        if pair.query_terms:
            p.annotate_kw.setdefault("ontology_map", dict(pair.query_terms))
    build_scatlas(p)
    return p


def runners(p: Prepared, peer_python: str | None) -> dict[str, Runner]:
    """Each method by name: a call returning its predictions (None when it failed) and what it recorded."""
    from scatlas.query.annotate import FAR_QUANTILE_WHEN_ON

    return {
        "scatlas": lambda: run_scatlas(p),
        "scatlas_no_abstain": lambda: run_scatlas(p, min_confidence=0.0, far_quantile=None),
        "scatlas_abstain": lambda: run_scatlas(p, min_confidence=0.5, far_quantile=FAR_QUANTILE_WHEN_ON),
        "scatlas_knn": lambda: run_scatlas(p, predictor="knn"),
        "logreg": lambda: run_logreg(p),
        "celltypist": lambda: run_peer(p, "celltypist", peer_python),
        "scanpy_ingest": lambda: run_peer(p, "scanpy_ingest", peer_python),
    }


def run_method(p: Prepared, meth: str, by_name: dict[str, Runner]) -> dict[str, Any]:
    """The JSON entry of method ``meth`` (run from ``by_name``) on ``p``: its metrics and info, or its error."""
    try:
        pred, info = by_name[meth]()
        if pred is None:
            err = info.get("other_env_error") or info.get("project_env_error") or "failed"
            return {"error": err, "info": info}
        fine = info.pop(FINE_PRED, None)
        m = score(p, pred)
        if fine is not None:  # scatlas: its best class without abstention, scored like the peers' predictions
            m["fine"] = {k: v for k, v in score(p, fine).items() if k != "absent_types"}
            ev = info.get("annotate_eval", {})
            if ev.get("ontology") is not None:
                m["ontology"] = {k: ev["ontology"].get(k) for k in ONTOLOGY_METRICS}
        log.info(
            "%s %s: acc %s macro-F1 %s unknown %s abstain-absent %s (%.1f s)",
            p.name,
            meth,
            m["accuracy"],
            m["macro_f1"],
            m["unknown_rate_known"],
            m["abstention_rate_absent"],
            info.get("wall_s", float("nan")),
        )
        if fine is not None:
            o = m.get("ontology", {})
            log.info(
                "%s %s: fine macro-F1 %s; ontology accuracy %s fine %s ancestor %s unknown %s ECE %s",
                p.name, meth, m["fine"]["macro_f1"], o.get("ontology_accuracy"), o.get("fine_rate"),
                o.get("ancestor_rate"), o.get("unknown_rate"), o.get("ece"),
            )
        return {"metrics": m, "info": info}
    except Exception as exc:
        log.error("%s %s failed: %s", p.name, meth, exc)
        return {
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "traceback": traceback.format_exc()[-2000:],
        }


def run_pair(name: str, args: argparse.Namespace, pwork: Path) -> tuple[Prepared, dict[str, Any]]:
    """Pair ``name`` prepared in ``pwork`` and its JSON entry: sizes, labels and every method of ``args``."""
    from scatlas.atlas.sources import open_h5ad

    p = prepare(name, args, pwork)
    truth, ref_labels = query_truth(p)
    n_ref = 0
    for r in p.refs:
        s = open_h5ad(r)
        n_ref += s.n_obs
        s.close()
    entry: dict[str, Any] = {
        "name": name,
        "note": p.note,
        "n_ref": n_ref,
        "n_query": len(truth),
        "ref_labels": sorted(ref_labels),
        "methods": {},
    }
    by_name = runners(p, args.peer_python)
    for meth in args.methods:
        entry["methods"][meth] = run_method(p, meth, by_name)
    return p, entry


def peer_notes(results: dict[str, Any]) -> list[str]:
    """For each peer that failed in the project's environment: the errors, and where its results came from."""
    notes = []
    for meth in ("celltypist", "scanpy_ingest"):
        infos = [pr["methods"].get(meth, {}).get("info", {}) for pr in results["pairs"]]
        errs = {c.get("project_env_error") for c in infos if c.get("project_env_error")}
        envs = {c.get("env") for c in infos if c.get("env") and c.get("env") != "project"}
        if errs:
            notes.append(
                f"{meth} fails in the project environment ({'; '.join(sorted(errs))})"
                + (
                    f"; its results come from another interpreter with {', '.join(sorted(envs))} in front of "
                    "the project's packages (--peer-python)"
                    if envs
                    else ""
                )
            )
    return notes
