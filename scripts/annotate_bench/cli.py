"""The command line of ``scripts/bench_annotate.py``: its options, and what each mode runs and writes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import BASELINE, DEFAULT_RAW, ENTRY, log
from .dropout import DROPOUT_PAIRS, gene_dropout
from .methods import Prepared
from .pairs import PAIRS, SKIPPED
from .peers import PEER_PINS, WORKERS, make_peer_venv
from .render import (
    PEERS,
    has_ontology,
    macro_f1,
    markdown,
    ontology_markdown,
    write_docs,
    write_ontology_docs,
)
from .run import peer_notes, run_pair
from .scale import prepare_scale, scale_worker
from .tuning import pick, tune

DOCS_BLOCKS = ("auto", "main", "ontology", "both")

DEFAULT_METHODS = [
    "scatlas",
    "scatlas_no_abstain",
    "scatlas_abstain",
    "scatlas_knn",
    "logreg",
    "celltypist",
    "scanpy_ingest",
]


def parser(description: str) -> argparse.ArgumentParser:
    """The options of the command line (``description``: the first line of ``--help``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--raw-dir", type=Path, default=DEFAULT_RAW)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    ap.add_argument(
        "--docs-blocks",
        choices=DOCS_BLOCKS,
        default="auto",
        help="with --write-docs: which blocks of docs/benchmarks.md to write: 'main' (the results table), "
        "'ontology' (the ontology-aware scores), 'both', or 'auto' (default: the ontology block when scatlas has "
        "ontology-aware scores, and the main block when the run has every peer (logreg, celltypist, "
        "scanpy_ingest), so that a run of some methods only does not drop the peers' rows)",
    )
    ap.add_argument("--pairs", nargs="*", default=None, help="pair names (default: all, plus synthetic)")
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    ap.add_argument(
        "--peer-python",
        default=None,
        help="interpreter for CellTypist / scanpy ingest when they fail in the project environment",
    )
    ap.add_argument(
        "--make-peer-venv",
        type=Path,
        default=None,
        help=f"create (or reuse) a venv here with {', '.join(PEER_PINS)} in front of the project's "
        "packages and use it as --peer-python",
    )
    ap.add_argument("--synthetic-cells", type=int, default=12_000)
    ap.add_argument("--tune", action="store_true", help="sweep voting parameters on the tuning pairs")
    ap.add_argument(
        "--gene-dropout",
        type=float,
        nargs="*",
        default=None,
        metavar="KEEP",
        help=f"also annotate {', '.join(DROPOUT_PAIRS)} with only these fractions of the embedder's genes in the "
        "query (e.g. 0.9 0.7 0.5 0.3): label heads refitted vs as trained, and logreg",
    )
    ap.add_argument("--gene-dropout-draws", type=int, default=5, help="random draws of the genes per fraction")
    ap.add_argument(
        "--scale-cells", type=int, default=0, help="also time annotating this many synthetic cells"
    )
    ap.add_argument("--scale-batch-size", type=int, default=10_000)
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only render the Markdown of an earlier --json-out file (with --write-docs: into the docs)",
    )
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "REF", "QUERY", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--scale-worker", nargs=3, metavar=("INDEX", "QUERY", "OUT"), help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None, description: str = "") -> int:
    """Run the command line ``argv`` (None: ``sys.argv[1:]``); ``description``: the first line of ``--help``."""
    ap = parser(description)
    args = ap.parse_args(argv)
    if args.worker:
        WORKERS[args.worker[0]](*args.worker[1:])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("atlas", "index", "query"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.scale_worker:
        index_dir, query, out = args.scale_worker
        Path(out).write_text(json.dumps(scale_worker(Path(index_dir), Path(query), args.scale_batch_size)))
        return 0
    if args.render:
        saved = json.loads(args.render.read_text())
        _publish(saved, saved["command"], args.write_docs, args.docs_blocks)
        return 0
    if args.make_peer_venv:
        args.peer_python = make_peer_venv(args.make_peer_venv)
    command = "nice .venv/bin/python scripts/bench_annotate.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_annotate_"))
    results = _run(ap, args, command, work)
    _save(results, args.json_out)
    _publish(results, command, args.write_docs, args.docs_blocks)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace, command: str, work: Path) -> dict[str, Any]:
    """Every pair asked for, then the peers' notes, the tuning grid and the scale run: the results JSON."""
    names = [*(p.name for p in PAIRS), "synthetic"] if args.pairs is None else args.pairs
    known = {p.name for p in PAIRS} | {"synthetic"}
    bad = [n for n in names if n not in known]
    if bad:
        ap.error(f"unknown pairs {bad}; choose from {sorted(known)}")
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.2f} (shared with other jobs: wall times are noisy)",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "pairs": [],
        "skipped": SKIPPED,
    }
    prepared: dict[str, Prepared] = {}
    for name in names:
        p, entry = run_pair(name, args, work / name)
        prepared[name] = p
        results["pairs"].append(entry)
        _save(results, args.json_out)  # after every pair, so that a failure later (tuning, scale) loses nothing measured
        if args.gene_dropout and name in DROPOUT_PAIRS:
            results.setdefault("gene_dropout", {})[name] = gene_dropout(
                p, list(args.gene_dropout), args.gene_dropout_draws
            )
            results["gene_dropout_command"] = command
    notes = peer_notes(results)
    if notes:
        results["peer_notes"] = notes
    if args.tune:
        _tune_all(prepared, results)
    if args.scale_cells:
        results["scale"] = _scale(work, args.scale_cells, args.scale_batch_size)
        log.info("scale: %s", results["scale"])
    return results


def _tune_all(prepared: dict[str, Prepared], results: dict[str, Any]) -> None:
    """The tuning grid over every prepared pair and the setting :func:`pick` chooses, into ``results``."""
    rows: list[dict[str, Any]] = []
    for prep in prepared.values():
        rows += tune(prep)
    baseline = {
        pr["name"]: m for pr in results["pairs"]
        if pr["name"] != "synthetic" and (m := macro_f1(pr, BASELINE)) is not None
    }
    if rows:
        results["tuning"] = {
            "pairs": list(prepared),
            "baseline": BASELINE,
            "chosen": pick(rows, baseline),
            "grid": rows,
        }
        log.info("tuning: best %s", results["tuning"]["chosen"])


def _scale(work: Path, n_cells: int, batch_size: int) -> dict[str, Any]:
    """Annotate ``n_cells`` synthetic cells in a fresh process (``--scale-worker``): its timings and peak RSS."""
    out = work / "scale.json"
    qpath = prepare_scale(work, n_cells)
    cmd = [sys.executable, str(ENTRY), "--scale-worker", str(work / "scale_index"), str(qpath), str(out)]
    subprocess.run([*cmd, "--scale-batch-size", str(batch_size)], check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _save(results: dict[str, Any], json_out: Path | None) -> None:
    """Write ``results`` to ``json_out`` (when given)."""
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2, default=str))


def _publish(results: dict[str, Any], command: str, into_docs: bool, blocks: str = "auto") -> None:
    """Print the Markdown blocks of ``results`` (the main table, and the ontology-aware scores when scatlas has
    them), and write into docs/benchmarks.md (``into_docs``) the ones ``blocks`` selects (see ``--docs-blocks``)."""
    main_block = markdown(results, command)
    onto = has_ontology(results)
    onto_block = ontology_markdown(results, command) if onto else None
    sys.stdout.write(main_block + "\n")
    if onto_block:
        sys.stdout.write("\n" + onto_block + "\n")
    if not into_docs:
        return
    if blocks == "auto":
        methods = {m for pr in results["pairs"] for m in pr["methods"]}
        write_main = set(PEERS) <= methods
        write_onto = onto
        if not write_main:
            log.info("docs: main block left as it is (this run lacks %s); --docs-blocks main writes it anyway",
                     ", ".join(sorted(set(PEERS) - methods)))
    else:
        write_main, write_onto = blocks in ("main", "both"), blocks in ("ontology", "both")
    if write_main:
        write_docs(main_block)
    if write_onto:
        if onto_block is None:
            log.warning("docs: no ontology-aware scores in these results; ontology block left as it is")
        else:
            write_ontology_docs(onto_block)
