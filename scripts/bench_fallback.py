"""The confidence cut of annotation's answers (``min_confidence``), chosen on the real same-tissue pairs.

    nice .venv/bin/python scripts/bench_annotate.py --methods scatlas --work /tmp/bench   # builds the pairs
    nice .venv/bin/python scripts/bench_fallback.py --work /tmp/bench --write-docs

For each pair of ``scripts/bench_annotate.py`` whose labels have Cell Ontology terms, annotate its query against
its index (left in ``--work`` by the bench) at each cut, with the defaults otherwise: ontology-aware accuracy of
the answers, the shares answered at the fine and ancestor levels, unknown, and the flat macro-F1 of the best class
(the same at every cut). The rule: the cut with the highest mean ontology-aware accuracy over the pairs whose
query maps onto the atlas, among the cuts that keep the mean fine share at least 0.85 and no pair over 3%
unknown.

Each pair's ceiling: the share of its cells whose best class is wrong when every cell is answered with it (cut 0),
and the highest ontology-aware accuracy any confidence rule could reach from those best classes within the targets
(at least 85% of cells at the fine level, at most 3% unknown): a perfect rule moves up to 12% of the cells, all of
them errors, to a right ancestor and 3% to ``unknown``, so 1 - max(errors - 0.15, 0) / 0.97.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from annotate_bench.pairs import PAIRS  # noqa: E402
from docs_block import write_bench_section  # noqa: E402

MIN_FINE, MAX_UNKNOWN = 0.85, 0.03


def ceiling(fine_errors: float) -> float:
    """The highest ontology-aware accuracy reachable from best classes wrong on ``fine_errors`` of the cells,
    keeping MIN_FINE of them fine and at most MAX_UNKNOWN unknown (see the module docstring)."""
    return 1.0 - max(fine_errors - (1.0 - MIN_FINE), 0.0) / (1.0 - MAX_UNKNOWN)


def sweep(work: Path, cuts: list[float], recalibrate: bool) -> dict[str, dict[float, dict]]:
    """Per pair and cut, the scores of the answers."""
    from scatlas.index import AtlasIndex, calibrate_mapping
    from scatlas.query import annotate

    rows: dict[str, dict[float, dict]] = {}
    for p in PAIRS:
        d = work / p.name
        if not p.query_terms or not (d / "index" / "manifest.json").is_file():
            continue
        if recalibrate:
            calibrate_mapping(d / "index")
        rows[p.name] = {}
        with AtlasIndex.open(d / "index") as idx:
            for cut in [0.0, *cuts]:
                r = annotate(d / "query.h5ad", idx, label_keys=["label"], truth_key="label",
                             ontology_map=p.query_terms, min_confidence=cut, progress=False, keep_neighbors=False)
                ev = r.report["evaluation"]["label"]
                o = ev["ontology"]
                rows[p.name][cut] = {
                    "verdict": r.report["mapping"]["verdict"], "macro_f1": ev["macro_f1"],
                    "ontology_accuracy": o["ontology_accuracy"], "fine": o["fine_rate"], "ancestor": o["ancestor_rate"],
                    "unknown": o["unknown_rate"], "ece": o["ece"],
                }
        every = rows[p.name].pop(0.0) if 0.0 not in cuts else rows[p.name][0.0]
        errors = (1.0 - (every["ontology_accuracy"] or 0.0)) * (1.0 - every["unknown"])
        for v in rows[p.name].values():
            v["fine_errors"], v["ceiling"] = round(errors, 4), round(ceiling(errors), 4)
    return rows


def pick(rows: dict[str, dict[float, dict]], cuts: list[float]) -> float | None:
    """The declared rule (module docstring) over the pairs whose query maps well at every cut."""
    pairs = [n for n, r in rows.items() if all(v["verdict"] == "maps_well" for v in r.values())]
    best, best_acc = None, -1.0
    for cut in cuts:
        fine = sum(rows[n][cut]["fine"] for n in pairs) / len(pairs)
        worst_unknown = max(rows[n][cut]["unknown"] for n in pairs)
        acc = sum(rows[n][cut]["ontology_accuracy"] for n in pairs) / len(pairs)
        if fine >= MIN_FINE and worst_unknown <= MAX_UNKNOWN and acc > best_acc:
            best, best_acc = cut, acc
    return best


def render(rows: dict[str, dict[float, dict]], cuts: list[float], chosen: float | None) -> str:
    lines = ["| pair | mapping | macro-F1 (best class) | best class wrong | ceiling | " + " | ".join(
        f"cut {c}: onto acc / fine / ancestor / unknown" for c in cuts) + " |",
        "|---|---|---|---|---|" + "---|" * len(cuts)]
    for name, r in rows.items():
        first = r[cuts[0]]
        cells = [f"{v['ontology_accuracy']:.3f} / {v['fine']:.3f} / {v['ancestor']:.3f} / {v['unknown']:.3f}"
                 for v in (r[c] for c in cuts)]
        lines.append(f"| {name} | {first['verdict']} | {first['macro_f1']:.3f} | {first['fine_errors']:.3f} | "
                     f"{first['ceiling']:.4f} | " + " | ".join(cells) + " |")
    lines.append("")
    short = [n for n, r in rows.items() if r[cuts[0]]["ceiling"] < 0.97]
    lines.append(f"Pairs whose ceiling is under 0.97 (no confidence rule meets the targets from their best classes): "
                 f"{', '.join(short) if short else 'none'}.")
    lines.append(f"Chosen by the rule: min_confidence = {chosen}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the --work directory of a bench_annotate.py run")
    ap.add_argument("--cuts", default="0.3,0.5,0.6,0.7")
    ap.add_argument("--recalibrate", action="store_true", help="recompute each index's mapping calibration first")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    cuts = [float(c) for c in args.cuts.split(",")]
    rows = sweep(args.work, cuts, args.recalibrate)
    chosen = pick(rows, cuts)
    table = render(rows, cuts, chosen)
    sys.stdout.write(table + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps({"cuts": cuts, "chosen": chosen, "rows": rows}, indent=2))
    if args.write_docs:
        doc = (__doc__ or "").split("\n\n", 2)[2].strip().replace("\n", " ")
        write_bench_section("bench_fallback", "bench_fallback.py", argv if argv is not None else sys.argv[1:], doc, table,
                            "Annotation: the confidence cut")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
