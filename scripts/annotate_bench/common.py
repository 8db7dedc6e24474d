"""Paths, column names and the logger shared by the annotation benchmark's modules."""

from __future__ import annotations

import logging
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "scripts" / "bench_annotate.py"  # the command line; re-run in a subprocess for the workers
DEFAULT_RAW = REPO.parent / "shared" / "data" / "raw"
DOCS = REPO / "docs" / "benchmarks.md"
MARK_START, MARK_END = "<!-- bench_annotate:start -->", "<!-- bench_annotate:end -->"
ONTO_MARK_START, ONTO_MARK_END = "<!-- bench_annotate_ontology:start -->", "<!-- bench_annotate_ontology:end -->"
ONTO_HEADING = "Annotation: ontology-aware scores"  # the heading written above the ontology block the first time
LABEL = "label"  # the harmonised label column written into every reference and query file
BASELINE = "logreg"  # the method the tuning rule's worst-case margin is measured against
TUNED = ("predictor", "k", "weighting", "class_balance", "align", "min_confidence", "far_quantile")

log = logging.getLogger("bench_annotate")
