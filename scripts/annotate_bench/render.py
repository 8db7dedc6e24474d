"""The Markdown block of docs/benchmarks.md: results table, where peers win, tuning, gene dropout, scale."""

from __future__ import annotations

from typing import Any

import numpy as np
from docs_block import write_block

from .common import BASELINE, DOCS, MARK_END, MARK_START, ONTO_HEADING, ONTO_MARK_END, ONTO_MARK_START, TUNED
from .pairs import SKIPPED
from .tuning import tune_score


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


DEFAULT_DEVIATIONS: dict[str, str] = {}
"""Why a library default differs from the ``--tune`` pick (printed under the tuning grid)."""


def _defaults() -> dict[str, Any]:
    from scatlas.query.annotate import (
        DEFAULT_ALIGN,
        DEFAULT_CLASS_BALANCE,
        DEFAULT_FAR_QUANTILE,
        DEFAULT_K,
        DEFAULT_MIN_CONFIDENCE,
        DEFAULT_WEIGHTING,
    )

    return {
        "predictor": "heads",  # DEFAULT_PREDICTOR "auto" = the heads wherever the index has them (it does here)
        "k": DEFAULT_K,
        "weighting": DEFAULT_WEIGHTING,
        "class_balance": DEFAULT_CLASS_BALANCE,
        "align": DEFAULT_ALIGN,
        "min_confidence": DEFAULT_MIN_CONFIDENCE,
        "far_quantile": DEFAULT_FAR_QUANTILE,
    }


def _tuning_lines(tuning: dict[str, Any]) -> list[str]:
    t = tuning["chosen"]
    defaults = _defaults()
    differ = [c for c in TUNED if t[c] != defaults[c]]
    if differ:
        why = "; ".join(
            f"{c}={defaults[c]} instead of {t[c]}: {DEFAULT_DEVIATIONS.get(c, 'no recorded reason')}" for c in differ
        )
        verdict = f"The library defaults (query.annotate) follow this pick except {why}."
    else:
        verdict = "The library defaults (query.annotate) are this pick."
    out = [
        "",
        f"Voting parameters picked by `--tune` on all {len(tuning['pairs'])} pairs by the declared rule of "
        "`pick`: first the worst margin over the real pairs of macro-F1 minus logreg's (same genes, same run; "
        f"here {t.get('worst_margin_vs_baseline')}), then the mean open-set macro-F1 (macro-F1 with the cells of "
        "types absent from the reference as one more class, `unknown`, which is plain macro-F1 where there are "
        "none): "
        f"predictor={t.get('predictor', 'knn')}, k={t['k']}, weighting={t['weighting']}, class_balance={t['class_balance']}, align={t['align']}, "
        f"min_confidence={t['min_confidence']}, far_quantile={t['far_quantile']} (score {t['score']}). "
        f"{verdict} Best mean open-set macro-F1 reachable with each value held fixed:",
        "",
    ]
    best: dict[tuple[Any, ...], list[float]] = {}
    for r in tuning["grid"]:
        s = tune_score(r)
        key = tuple(r[c] for c in TUNED)
        best.setdefault(key, []).append(s)
    complete = max(len(v) for v in best.values())  # settings refused on some pair (the vote on a partial query) left out
    means = {k: float(np.mean(v)) for k, v in best.items() if len(v) == complete}
    left_out = sorted({str(k[0]) for k, v in best.items() if len(v) < complete})
    if left_out:
        out[-2] += (
            f" Predictor {', '.join(left_out)} was refused on some pairs (its gene-overlap floor on a partial query), "
            "so its settings are out of the pick and of this summary."
        )
    for i, col in enumerate(TUNED):
        values = sorted(
            {k[i] for k in means}, key=lambda v: (v is None, str(v) if isinstance(v, str) else v or 0)
        )
        cells = [f"{v}: {max(m for k, m in means.items() if k[i] == v):.3f}" for v in values]
        out.append(f"* {col}: " + ", ".join(cells))
    return out


PEERS = ("logreg", "celltypist", "scanpy_ingest")
WHY_PEER_WINS: dict[str, str] = {
    "symphony_3p_to_5p": "a tie at the resolution of this query: 0.0004 is less than one cell; classes of 1 and 2 "
    "query cells (HSC, MK) decide macro-F1 here. The neighbour vote scores 0.862 because it finds both MK cells "
    "(per-class F1 measured ad hoc)",
    "tian_celseq2_to_dropseq": "ingest centres the query on its own mean and searches by Euclidean distance, which "
    "removes the CEL-seq2/Drop-seq offset exactly when the query holds the same three cell lines in similar "
    "proportions; it fails where compositions differ (0.37 on zheng_sorted_to_kang_ctrl). scatlas' heads and "
    "logreg read the uncentred expression",
    "pancreas_b1b4_to_b5": "one cell of 128",
    "mesc_batch2_to_batch3": "100 reference and 100 query cells with the same three culture conditions, and a "
    "batch effect larger than the conditions' (the MNN shift has norm ~1 on unit vectors); centring the query on "
    "its own mean (ingest) removes it exactly when compositions match (ingest scores 0.37 on "
    "zheng_sorted_to_kang_ctrl, where they do not)",
    "kang_ctrl_to_pbmc3k": "the query holds 406 of the reference's 2,000 HVGs (scatlas' heads are refitted to those "
    "genes). Ingest builds its PCA on the 406 shared genes and centres the query on its own mean, which suits two "
    "unstimulated PBMC samples of similar composition; logreg on the same genes scores 0.713",
    "kang_stim_to_pbmc3k": "the query of kang_ctrl_to_pbmc3k against the stimulated cells (390 shared HVGs): the "
    "same bet of ingest's (a PCA on the shared genes, the query centred on its own mean) pays more here, where the "
    "reference is a stimulation apart; why it pays that much more was not measured. logreg on the same genes "
    "scores 0.710",
    "tian_dropseq_to_celseq2": "two cells of 274",
}
"""Per pair, why a peer beats scatlas (measured separately; written only where a peer wins in the results)."""


def macro_f1(pair: dict[str, Any], method: str) -> float | None:
    r = pair["methods"].get(method, {})
    return None if r.get("error") or "metrics" not in r else r["metrics"]["macro_f1"]


def _peer_lines(results: dict[str, Any]) -> list[str]:
    """Where a peer's macro-F1 beats scatlas': by how much, what abstaining cost, and why."""
    out: list[str] = []
    for pair in results["pairs"]:
        ours, raw = macro_f1(pair, "scatlas"), macro_f1(pair, "scatlas_no_abstain")
        peers = {m: f for m in PEERS if (f := macro_f1(pair, m)) is not None}
        if ours is None or not peers:
            continue
        best = max(peers, key=lambda m: peers[m])
        if peers[best] <= ours:
            continue
        line = f"* **{pair['name']}**: {best} {peers[best]:.3f} vs scatlas {ours:.3f} (-{peers[best] - ours:.3f})"
        if raw is not None and raw != ours:
            line += f"; without abstention scatlas gets {raw:.3f}"
        m_ours = pair["methods"]["scatlas"]["metrics"]
        m_peer = pair["methods"][best]["metrics"]
        if m_ours.get("n_absent") and m_ours.get("macro_f1_open") is not None and m_peer.get("macro_f1_open"):
            line += (
                f"; open-set macro-F1 (absent types scored as `unknown`): scatlas {m_ours['macro_f1_open']:.3f}, "
                f"{best} {m_peer['macro_f1_open']:.3f}"
            )
        why = WHY_PEER_WINS.get(pair["name"])
        out.append(line + (f". {why[:1].upper()}{why[1:]}." if why else "."))
    if out:
        out = ["", "Where a peer wins on macro-F1:", "", *out]
    return out


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        MARK_START,
        "## Annotation (label transfer)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}; run {results['date']}.",
        "",
        "Accuracy and macro-F1 are on query cells whose label the reference has (an `unknown` counts as a "
        "miss); *unknown*: the unknown rate on those cells; *abstain absent*: the fraction of cells of types "
        "absent from the reference called `unknown`. Peers never abstain. *scatlas* is `query.annotate` with its "
        "defaults: the index's label heads (trained by the build on the reference's labels) decide, abstaining "
        "below min_confidence 0.3 with the far-from-atlas rule off; *scatlas_no_abstain* is the same with no "
        "abstention (min_confidence=0), to separate the cost of abstaining from the quality of the predictions; "
        "*scatlas_abstain* is the setting for queries that may hold types the atlas lacks (min_confidence=0.5, "
        "far_quantile=0.001; the defaults until session 5); "
        "*scatlas_knn* is the neighbour vote alone (`predictor=\"knn\"`, the method before label heads). "
        "logreg is scikit-learn's `LogisticRegression(class_weight=\"balanced\")` on log1p CP10k of the same "
        "highly variable genes as scatlas' embedder (those the query has). Wall time: fit + predict (scatlas: ingest + index build, "
        "label heads included, + annotate). "
        "For scatlas' rows (runs since the Cell Ontology answers of issue 15; – before): *macro-F1 fine*: of its best "
        "class without abstention or ontology fallback (`label_pred_fine`); *onto acc*: ontology-aware accuracy of the "
        "answered cells (an answer, fine or ancestor, is right when its CL term is the truth's or one of the "
        "truth's ancestors); *fine*: the share of cells answered with a class; *ECE*: expected "
        "calibration error of `label_confidence` on the answered cells (the labels' CL terms: "
        "`scripts/annotate_bench/ontology_maps.py`; see *Annotation: ontology-aware scores*).",
        "",
        "| pair | method | accuracy | macro-F1 | unknown | abstain absent | macro-F1 fine | onto acc | fine | ECE | "
        "wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in results["pairs"]:
        for meth, r in pair["methods"].items():
            if r.get("error"):
                lines.append(f"| {pair['name']} | {meth} | failed: {r['error'][:90]} | | | | | | | | |")
                continue
            m = r["metrics"]
            onto = m.get("ontology") or {}
            cells = [m["accuracy"], m["macro_f1"], m["unknown_rate_known"], m["abstention_rate_absent"]]
            cells += [(m.get("fine") or {}).get("macro_f1"), onto.get("ontology_accuracy"), onto.get("fine_rate"),
                      onto.get("ece")]
            cells.append(r["info"].get("wall_s"))
            lines.append(f"| {pair['name']} | {meth} | " + " | ".join(_fmt(c) for c in cells) + " |")
    lines += ["", "Pairs:", ""]
    for pair in results["pairs"]:
        lines.append(
            f"* **{pair['name']}**: {pair['n_ref']} reference / {pair['n_query']} query cells; {pair['note']}"
        )
    lines += _peer_lines(results)
    for note in results.get("peer_notes", []):
        lines += ["", f"Note: {note}."]
    if results.get("tuning"):
        lines += _tuning_lines(results["tuning"])
    if results.get("gene_dropout"):
        commands = results.get("gene_dropout_commands") or [results.get("gene_dropout_command", command)]
        lines += _dropout_lines(results["gene_dropout"], commands, results.get("gene_dropout_note", ""))
    if results.get("scale"):
        s = results["scale"]
        lines += [
            "",
            f"Throughput: {s['n_cells']:,} synthetic query cells annotated in {s['annotate_s']} s "
            f"({s['cells_per_second']:,} cells/s, batch_size {s['batch_size']:,}, defaults) against a "
            f"{s['atlas_cells']:,}-cell index (keeping the {s['neighbors_rows']:,}-row neighbours table); "
            f"RSS {s['rss_before_annotate_mb']:,} MB before annotate (imports + open index), peak during "
            "annotate "
            f"{s['peak_rss_mb']:,} MB.",
        ]
    skipped = "; ".join(f"{k}: {v}" for k, v in SKIPPED.items())
    lines += ["", f"Not benchmarked: {skipped}.", MARK_END]
    return "\n".join(lines)


def _mean_range(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})"


def _dropout_lines(dropout: dict[str, list[dict[str, Any]]], commands: list[str], note: str = "") -> list[str]:
    """``commands``: the runs whose rows were merged (e.g. high fractions with 5 draws, low ones with 3); ``note``:
    what the reader should know about them (the JSON's ``gene_dropout_note``)."""
    lines = [
        "",
        f"Queries lacking genes ({', '.join(f'`{c}`' for c in commands)}): the query of each pair with only a random share of the "
        "embedder's genes kept, in several seeded draws of the genes; macro-F1 without abstention, mean (lowest-"
        "highest) over the draws. *refit*: the default, label heads refitted on their training sample without the "
        "missing genes (`missing_genes=\"refit\"`); *as trained*: `missing_genes=\"impute\"` (a missing gene reads "
        "as its atlas mean); logreg: trained on the genes kept. *refit - as trained*: the mean of the per-draw "
        "differences; *refit s*: annotate's mean wall time with the refit (as trained: *s*)." + (f" {note}" if note else ""),
        "",
        "| pair | genes kept | draws | scatlas refit | scatlas as trained | logreg | refit - as trained | refit s | "
        "as trained s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in dropout.items():
        for r in rows:
            diff = float(np.mean(np.subtract(r["scatlas_refit"], r["scatlas_impute"])))
            lines.append(
                f"| {name} | {r['genes_kept']} of {r['genes']} ({100 * r['keep_fraction']:.0f}%) | {r['draws']} | "
                f"{_mean_range(r['scatlas_refit'])} | {_mean_range(r['scatlas_impute'])} | "
                f"{_mean_range(r['logreg'])} | {diff:+.3f} | {np.mean(r['scatlas_refit_s']):.2f} | "
                f"{np.mean(r['scatlas_impute_s']):.2f} |"
            )
    return lines


def write_docs(block: str) -> None:
    """Put the Markdown ``block`` into docs/benchmarks.md, in place of the earlier one."""
    write_block(DOCS, MARK_START, MARK_END, block)


SAME_TISSUE = (
    "kang2018_ctrl_to_stim",
    "kang2018_stim_to_ctrl",
    "symphony_3p_to_5p",
    "symphony_5p_to_3p",
    "symphony_3pv1_to_3pv2",
    "zheng_sorted_to_kang_ctrl",
    "zheng_sorted_to_kang_stim",
    "kang_ctrl_to_pbmc3k",
    "kang_stim_to_pbmc3k",
)
"""Pairs of the same tissue (PBMC) from another donor, lab, chemistry or condition: the targets below apply."""
TARGET_UNKNOWN, TARGET_ONTOLOGY_ACCURACY, TARGET_FINE = 0.03, 0.97, 0.85
"""Targets on same-tissue pairs: unknown rate at most, ontology-aware accuracy and fine rate at least."""
ONTO_METHOD = "scatlas"


def ontology_rows(results: dict[str, Any], method: str = ONTO_METHOD) -> list[dict[str, Any]]:
    """Per pair with ``method`` scored: the flat and ontology-aware numbers of the ontology block, the margin over
    logreg and, on :data:`SAME_TISSUE` pairs, whether each target is met."""
    rows = []
    for pair in results["pairs"]:
        r = pair["methods"].get(method, {})
        if r.get("error") or "metrics" not in r:
            continue
        m, o = r["metrics"], r["metrics"].get("ontology") or {}
        fine = (m.get("fine") or {}).get("macro_f1")
        base = macro_f1(pair, BASELINE)
        row: dict[str, Any] = {
            "pair": pair["name"],
            "macro_f1_fine": fine,
            "logreg_macro_f1": base,
            "margin": None if fine is None or base is None else round(fine - base, 4),
            "macro_f1_with_abstention": m.get("macro_f1"),
            "ontology_accuracy": o.get("ontology_accuracy"),
            "fine_rate": o.get("fine_rate"),
            "ancestor_rate": o.get("ancestor_rate"),
            "unknown_rate": o.get("unknown_rate"),
            "ece": o.get("ece"),
            "n_with_term": o.get("n_cells_with_truth_term"),
            "mapping": (r.get("info", {}).get("mapping") or {}).get("verdict"),
            "absent": m.get("absent_types") or {},
        }
        if pair["name"] in SAME_TISSUE and o.get("n_cells_with_truth_term"):
            row["targets"] = {
                "unknown": o["unknown_rate"] is not None and o["unknown_rate"] <= TARGET_UNKNOWN,
                "ontology_accuracy": o["ontology_accuracy"] is not None
                and o["ontology_accuracy"] >= TARGET_ONTOLOGY_ACCURACY,
                "fine": o["fine_rate"] is not None and o["fine_rate"] >= TARGET_FINE,
            }
        rows.append(row)
    return rows


def _targets_cell(row: dict[str, Any]) -> str:
    t = row.get("targets")
    if t is None:
        return "–"
    if all(t.values()):
        return "met"
    return "missed: " + ", ".join(k.replace("_", " ") for k, ok in t.items() if not ok)


def _absent(name: str, a: Any) -> str:
    if isinstance(a, dict) and "n" in a:
        rate = a.get("unknown_rate")
        return f"{name} ({a['n']}; {_fmt(rate) if rate is not None else '–'})"
    return f"{name} ({a})"


def ontology_markdown(results: dict[str, Any], command: str) -> str:
    """The block of docs/benchmarks.md between :data:`ONTO_MARK_START` and :data:`ONTO_MARK_END`."""
    rows = ontology_rows(results)
    lines = [
        ONTO_MARK_START,
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}; run {results['date']}.",
        "",
        "scatlas (`query.annotate`, defaults) with Cell Ontology terms for every label that has one "
        "(`scripts/annotate_bench/ontology_maps.py`: passed to `atlas.ingest(ontology_map=...)` for the reference "
        "and to `annotate(ontology_map=...)` for the query's truth; the cell lines and mESC culture conditions have "
        "none and stay flat). *macro-F1 fine*: scatlas' best class without abstention or fallback "
        "(`label_pred_fine`), scored like logreg's predictions (logreg: the same genes, the same run; *margin* = "
        "fine - logreg); *with abstention*: macro-F1 of the answers (`label_pred`, where an ancestor or `unknown` "
        "counts as a miss); *onto acc*: ontology-aware accuracy of the answered cells (an answer, fine or ancestor, "
        "is right when its CL term is the truth's or one of the truth's ancestors); "
        "*fine* / *ancestor* / *unknown*: shares of the cells with a truth term answered with a class, a CL "
        "ancestor, or `unknown`; *ECE*: expected calibration error of `label_confidence` on the answered cells. "
        "Cells whose type the reference lacks count in the ontology columns (they can only be right at an "
        "ancestor). *mapping*: annotate's query-level verdict (`report[\"mapping\"]`); a query that maps poorly has "
        "its cells that do not map well on their own called `unknown` (`out_of_atlas`). *targets* (same-tissue pairs "
        "only): unknown <= "
        f"{TARGET_UNKNOWN:.0%}, onto acc >= {TARGET_ONTOLOGY_ACCURACY}, fine >= {TARGET_FINE:.0%}.",
        "",
        "| pair | macro-F1 fine | logreg | margin | with abstention | onto acc | fine | ancestor | unknown | ECE | "
        "cells with term | mapping | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["macro_f1_fine"], r["logreg_macro_f1"], r["margin"], r["macro_f1_with_abstention"],
                 r["ontology_accuracy"], r["fine_rate"], r["ancestor_rate"], r["unknown_rate"], r["ece"],
                 r["n_with_term"]]
        margin = r["margin"]
        shown = [_fmt(c) for c in cells]
        if margin is not None:
            shown[2] = f"{margin:+.3f}"
        lines.append(f"| {r['pair']} | " + " | ".join(shown) + f" | {r['mapping'] or '–'} | {_targets_cell(r)} |")
    behind = [r for r in rows if r["margin"] is not None and r["margin"] < 0]
    judged = [r for r in rows if r.get("targets")]
    met = [r["pair"] for r in judged if all(r["targets"].values())]
    lines += [
        "",
        "Flat macro-F1 at least logreg's: "
        + ("on every pair." if not behind else "not on " + ", ".join(
            f"{r['pair']} ({r['macro_f1_fine']:.3f} vs {r['logreg_macro_f1']:.3f})" for r in behind) + "."),
        f"Same-tissue targets met on {len(met)} of {len(judged)} pairs"
        + (f" ({', '.join(met)})." if met else "."),
    ]
    absent = {r["pair"]: r["absent"] for r in rows if r["absent"]}
    if absent:
        lines.append(
            "Query types absent from the reference (cells; share called `unknown`): "
            + "; ".join(f"{k}: {', '.join(_absent(t, a) for t, a in v.items())}" for k, v in absent.items()) + "."
        )
    lines.append(ONTO_MARK_END)
    return "\n".join(lines)


def write_ontology_docs(block: str) -> None:
    """Put the ontology ``block`` into docs/benchmarks.md (appended under its heading the first time)."""
    write_block(DOCS, ONTO_MARK_START, ONTO_MARK_END, block, heading=ONTO_HEADING)


def has_ontology(results: dict[str, Any]) -> bool:
    """Whether some pair has scatlas' ontology-aware metrics (runs since issue 15)."""
    return any(
        (pr["methods"].get(ONTO_METHOD, {}).get("metrics") or {}).get("ontology") for pr in results["pairs"]
    )
