"""``hunt report``: where the hits are (by atlas label, donor, dataset ...) and what they express (DE).

By default hits are broken down by the atlas label (``cell_type``), ``donor_id`` and ``dataset_id``, those of them
the cells table has; a column that is missing (NULL) in every cell is left out, and the report says so.
The report is written into a temporary directory beside ``out_dir`` and moved into place only when complete, so a
failed run leaves ``out_dir`` as it was (absent, or the earlier complete report). Arguments (``by``, ``de_group``,
``de_reference``) are checked against the cells table before anything is written. Hits of a sweep (its
``summary.json`` beside them) of another index, or of another version of it, are refused: the sweep must have read
the build the report opens. Hits that are not cells of the index (from a sweep made before the atlas or index
changed) are left out of the whole report, with a warning. An atlas store for DE that does not hold the datasets
the index was built from as they were (id ranges, content fingerprints) is refused. The report holds:

* ``enrichment.csv``: per grouping column and group: cells, hits, hit fraction, fold over the atlas-wide hit
  rate, Fisher exact p and Benjamini-Hochberg q (see :mod:`query.hunt.enrichment`);
* ``enrichment.png``: bar charts of the hit fraction of the top groups per column, the atlas rate marked;
* ``scores.png``: a histogram of the hits' ``score`` (when the hits have one);
* ``de.csv``: differential expression (see :mod:`query.hunt.de`), when the atlas store is reachable;
* ``report.md`` and ``report.html``: a short summary of the above: the breakdowns, the genes up- and
  down-regulated in hits and what the non-hits were matched on, saying when and why DE was skipped.
"""

from __future__ import annotations

import contextlib
import errno
import html
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.atomic import read_json_object
from scatlas.atlas.errors import InputError, ScatlasError
from scatlas.atlas.outputs import (
    MARKER_FILE,
    REPORT,
    check_output_dir,
    claim_output_dir,
    csv_safe,
    missing_dirs,
    new_stage_dir,
    os_error_message,
    show,
    writing,
)
from scatlas.atlas.sql import quote_ident
from scatlas.atlas.validate import escaped, escaped_list
from scatlas.index import AtlasIndex, Progress
from scatlas.query.hunt.access import IndexLike, input_paths, open_index
from scatlas.query.hunt.de import MIN_CELLS_PER_SIDE as MIN_SIDE
from scatlas.query.hunt.de import DEMethod, differential_expression, group_comparisons, matched_background
from scatlas.query.hunt.enrichment import (
    DEFAULT_BY,
    MISSING,
    Alternative,
    all_missing,
    default_by,
    enrichment,
)
from scatlas.query.hunt.gene_reads import reach_index_store
from scatlas.query.hunt.sweep import HITS_FILE, SUMMARY_FILE, TRAINING_COLUMN, training_sentence

logger = logging.getLogger(__name__)

TOP_GROUPS = 15
TOP_GENES = 15
REPORT_FILES = ("enrichment.csv", "enrichment.png", "scores.png", "de.csv", "report.md", "report.html")
"""Every file a report may hold: those an earlier report left that this run does not write are removed."""
RESWEEP = "re-run `scatlas hunt sweep` on the current index for up-to-date hits"


@dataclass
class ReportResult:
    """What :func:`report` found and wrote. ``de`` is ``None`` when DE was skipped (``de_skipped`` says why)."""

    out_dir: str
    n_hits: int
    n_cells: int
    hit_rate: float
    enrichment: pd.DataFrame
    de: pd.DataFrame | None
    de_skipped: str | None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    by: list[str] = field(default_factory=list)
    """The columns the hits are broken down by (after leaving out ``left_out``)."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Breakdown columns left out -> why (missing in every cell; a default column the cells table lacks)."""
    de_matching: str | None = None
    """What the non-hits of the DE were matched on (a sentence), for hits vs matched non-hits."""
    n_dropped: int = 0
    """Hits left out of the whole report because they are not cells of the index (a sweep older than the index)."""
    n_training_hits: int | None = None
    """Hits that are cells the classifier learnt as positives (the hits' ``training_positive`` column); None when
    the hits do not say (a classifier that does not record them, or hits from elsewhere)."""

    def summary(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "n_hits": self.n_hits,
            "n_cells": self.n_cells,
            "hit_rate": self.hit_rate,
            "by": self.by,
            "left_out": self.left_out,
            "de_skipped": self.de_skipped,
            "de_matching": self.de_matching,
            "files": self.files,
            "n_dropped": self.n_dropped,
            "n_training_hits": self.n_training_hits,
        }

    def dropped_sentence(self) -> str:
        """Which hits were left out of the report and why ("" when none)."""
        if not self.n_dropped:
            return ""
        return (f"{self.n_dropped:,} hits are left out of this report: they are not cells of the index (the hits come "
                f"from a sweep made before the atlas or index changed); {RESWEEP}.")

    def training_sentence(self) -> str:
        """How many hits the classifier was trained on ("" when the hits do not say or none was)."""
        return training_sentence(self.n_training_hits, self.n_hits)

    def left_out_sentence(self) -> str:
        """Which breakdown columns were left out and why ("" when none)."""
        if not self.left_out:
            return ""
        return "Left out of the breakdown: " + "; ".join(f"{c} ({why})" for c, why in self.left_out.items()) + "."


def _read_hits(hits: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(hits, pd.DataFrame):
        frame = hits
    else:
        frame = _read_hits_file(_hits_file(hits))
    if "soma_joinid" not in frame.columns:
        raise InputError(f"the hits have no soma_joinid column (columns: {escaped_list(frame.columns)})")
    return frame


def _hits_file(hits: str | Path) -> Path:
    path = Path(hits)
    if path.is_dir():
        path = path / HITS_FILE
    if not path.is_file():
        raise InputError(f"no hits at {show(path)}; run `scatlas hunt sweep` first (it writes {HITS_FILE})")
    return path


def _read_hits_file(path: Path) -> pd.DataFrame:
    """A hits Parquet file; InputError when it is not one (never echoing what the file holds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    not_hits = (f"{show(path)} is not a hits Parquet file written by `scatlas hunt sweep`; give the sweep's "
                f"{HITS_FILE} (or its directory)")
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PAR1":
                raise InputError(not_hits)
            fh.seek(0)
            return pq.read_table(fh).to_pandas()
    except OSError as exc:
        if exc.errno is None:  # pyarrow reports a damaged file as an OSError without errno
            raise InputError(not_hits) from exc
        raise InputError(os_error_message(exc, "reading", path)) from exc
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(not_hits) from exc


def _check_swept_index(hits: str | Path | pd.DataFrame, idx: AtlasIndex) -> None:
    """InputError when ``hits`` come from a sweep (its ``summary.json`` beside the hits file) of another index than
    ``idx``, or of another version of it: the build the sweep read (its ``index_manifest_id``, the index's
    :attr:`~index.AtlasIndex.build_id`) must be the one ``idx`` opened. Hits without a sweep summary (a
    DataFrame, a file elsewhere) are not checked."""
    if isinstance(hits, pd.DataFrame):
        return
    path = _hits_file(hits).parent / SUMMARY_FILE
    if not path.is_file():
        logger.info("no sweep summary (%s) beside the hits: which index they come from is not checked", path)
        return
    try:
        summary = read_json_object(path, "sweep again")
        swept = summary["index_manifest_id"]
    except (ScatlasError, KeyError):
        logger.warning("the sweep summary %s is unreadable: which index the hits come from is not checked", path)
        return
    if swept == idx.build_id:
        return
    embedder, own = summary.get("embedder_fingerprint"), idx.manifest.embedder.fingerprint
    if embedder and own and embedder != own:
        which = (f"another index (the sweep read vectors of embedder {embedder}; {show(idx.path)} was built with "
                 f"embedder {own})")
    else:
        version = summary.get("index_version")
        read = f"build {swept}" + (f", version {version}" if isinstance(version, int) else "")
        which = (f"another index or another version of this one (the sweep read index {read}; {show(idx.path)} is "
                 f"build {idx.build_id}, version {idx.manifest.version})")
    raise InputError(
        f"the hits in {show(path.parent)} come from a sweep of {which}: the breakdown would count cells the sweep "
        "never scored as non-hits. Pass the index the sweep read (--index), or re-run `scatlas hunt sweep` on this "
        "index and report its hits"
    )


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plot(enr: pd.DataFrame, by: Sequence[str], rate: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(by), 1)
    fig = Figure(figsize=(7.5, 3.2 * n))
    FigureCanvasAgg(fig)
    if not by:
        fig.text(0.5, 0.5, "no column to break the hits down by", ha="center", va="center")
    for i, column in enumerate(by):
        ax = fig.add_subplot(n, 1, i + 1)
        sub = enr[enr["column"] == column].sort_values(["n_hits", "fold"], ascending=False).head(TOP_GROUPS)
        sub = sub.iloc[::-1]
        labels = [str(g)[:40] for g in sub["group"]]
        colors = ["#c0392b" if q < 0.05 and f > 1 else "#7f8c8d" for q, f in zip(sub["qvalue"], sub["fold"], strict=True)]
        ax.barh(range(len(sub)), 100 * sub["fraction"].to_numpy(), color=colors)
        ax.set_yticks(range(len(sub)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.axvline(100 * rate, color="black", linestyle="--", linewidth=1, label=f"atlas rate {100 * rate:.3g}%")
        ax.set_xlabel("hits (% of the group's cells)")
        ax.set_title(f"hits by {column} (red: enriched, q < 0.05)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)

    _atomic(path, save)


def _plot_scores(scores: np.ndarray, path: Path) -> None:
    """Histogram of the hits' scores (the sweep's raw classifier score), the lowest marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = scores[np.isfinite(scores)]
    ax.hist(finite, bins=min(50, max(5, len(finite) // 5)), color="#2c7fb8")
    if len(finite):
        ax.axvline(float(finite.min()), color="black", linestyle="--", linewidth=1,
                   label=f"lowest hit score {float(finite.min()):.3g}")
        ax.legend(fontsize=7)
    ax.set_xlabel("score")
    ax.set_ylabel("hits")
    ax.set_title(f"scores of the {len(finite):,} hits", fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)


def _md_table(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    if frame.empty:
        return "_(none)_\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float | np.floating) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _de_tables(sub: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The top genes up- and down-regulated in side A (q < 0.05), strongest change first."""
    sig = sub[sub["qvalue"] < 0.05]
    up = sig[sig["log2fc"] > 0].sort_values("log2fc", ascending=False, kind="stable").head(TOP_GENES)
    down = sig[sig["log2fc"] < 0].sort_values("log2fc", kind="stable").head(TOP_GENES)
    cols = ["gene_symbol", "log2fc", "pct_a", "pct_b", "qvalue"]
    return up[cols], down[cols]


def strongest_changes(sub: pd.DataFrame, n: int = TOP_GENES) -> pd.DataFrame:
    """The ``n`` genes of one comparison with the lowest q (then the largest change), whether or not significant:
    what to show when no gene reaches q < 0.05 (few cells a side give the test little power)."""
    order = sub.assign(_abs=sub["log2fc"].abs()).sort_values(["qvalue", "_abs"], ascending=[True, False], kind="stable")
    return order.head(n)[["gene_symbol", "log2fc", "pct_a", "pct_b", "qvalue"]]


def _no_significant(sub: pd.DataFrame) -> str:
    return (f"No gene reaches q < 0.05 ({int(sub['n_a'].iloc[0])} vs {int(sub['n_b'].iloc[0])} cells give the test "
            "little power); the strongest changes, not significant:")


def _de_counts(sub: pd.DataFrame) -> str:
    sig = sub["qvalue"] < 0.05
    n_up, n_down = int((sig & (sub["log2fc"] > 0)).sum()), int((sig & (sub["log2fc"] < 0)).sum())
    return f"{int(sig.sum())} genes at q < 0.05: {n_up} up-regulated, {n_down} down-regulated"


def _intro(res: ReportResult, hits_source: str) -> list[str]:
    """The opening lines (plain text): hits, breakdown columns, what was left out."""
    lines = [f"Hits: {res.n_hits:,} of {res.n_cells:,} atlas cells ({100 * res.hit_rate:.4g}%), from {hits_source}.",
             "Broken down by: " + (", ".join(res.by) if res.by else "nothing") + "."]
    if res.n_training_hits:
        lines.insert(1, res.training_sentence())
    if res.left_out:
        lines.append(res.left_out_sentence())
    if res.n_dropped:
        lines.append(res.dropped_sentence())
    return lines


def _markdown(res: ReportResult, by: Sequence[str], hits_source: str) -> str:
    parts = ["# Rare-cell hunt report\n\n"]
    parts.extend(line + "\n\n" for line in _intro(res, hits_source))
    parts.append("Enrichment: Fisher's exact test per group against the rest of the atlas, Benjamini-Hochberg q "
                 "within each column; fold = group hit fraction / atlas hit rate.\n")
    for column in by:
        sub = res.enrichment[res.enrichment["column"] == column].head(TOP_GROUPS)
        parts.append(f"\n## By {column}\n\n")
        parts.append(_md_table(sub[["group", "n_cells", "n_hits", "fraction", "fold", "qvalue"]]))
    if "scores_png" in res.files:
        parts.append(f"\n## Scores\n\nHistogram of the hits' scores: `{Path(res.files['scores_png']).name}`.\n")
    parts.append("\n## Differential expression\n\n")
    if res.de is None:
        parts.append(f"Skipped: {res.de_skipped}\n")
    elif res.de.empty:
        parts.append("No comparison had enough cells.\n")
    else:
        if res.de_matching:
            parts.append(res.de_matching + "\n")
        for name, sub in res.de.groupby("comparison", sort=False):
            up, down = _de_tables(sub)
            parts.append(f"\n### {name} ({int(sub['n_a'].iloc[0])} vs {int(sub['n_b'].iloc[0])} cells)\n\n")
            parts.append(f"{_de_counts(sub)}.\n\n")
            if up.empty and down.empty:
                parts.append(f"{_no_significant(sub)}\n\n" + _md_table(strongest_changes(sub)))
                continue
            parts.append("Top up-regulated:\n\n" + _md_table(up))
            parts.append("\nTop down-regulated:\n\n")
            parts.append(_md_table(down))
    parts.append("\nFiles: " + ", ".join(f"`{Path(p).name}`" for p in res.files.values()) + "\n")
    return "".join(parts)


def _html(res: ReportResult, by: Sequence[str], hits_source: str) -> str:
    esc = html.escape
    body = ["<h1>Rare-cell hunt report</h1>"]
    body.extend(f"<p>{esc(line)}</p>" for line in _intro(res, hits_source))
    if "png" in res.files:
        body.append(f'<img src="{esc(Path(res.files["png"]).name)}" style="max-width:100%">')
    for column in by:
        sub = res.enrichment[res.enrichment["column"] == column].head(TOP_GROUPS)
        body.append(f"<h2>By {esc(column)}</h2>")
        body.append(sub[["group", "n_cells", "n_hits", "fraction", "fold", "qvalue"]].to_html(index=False))
    if "scores_png" in res.files:
        body.append("<h2>Scores</h2>")
        body.append(f'<img src="{esc(Path(res.files["scores_png"]).name)}" style="max-width:100%">')
    body.append("<h2>Differential expression</h2>")
    if res.de is None:
        body.append(f"<p>Skipped: {esc(str(res.de_skipped))}</p>")
    else:
        if res.de_matching:
            body.append(f"<p>{esc(res.de_matching)}</p>")
        for name, sub in res.de.groupby("comparison", sort=False):
            up, down = _de_tables(sub)
            body.append(f"<h3>{esc(str(name))}</h3><p>{esc(_de_counts(sub))}.</p>")
            if up.empty and down.empty:
                body.append(f"<p>{esc(_no_significant(sub))}</p>" + strongest_changes(sub).to_html(index=False))
                continue
            body.append("<h4>Top up-regulated</h4>" + up.to_html(index=False))
            body.append("<h4>Top down-regulated</h4>" + down.to_html(index=False))
    return "<!doctype html><html><head><meta charset='utf-8'><title>hunt report</title></head><body>" + "".join(
        body
    ) + "</body></html>"


def _open_store(index: AtlasIndex, atlas: str | Path | None) -> tuple[Any, str | None]:
    """The atlas store for DE, or ``(None, reason)`` when it cannot be reached; InputError when it does not hold
    the datasets the index was built from as they were (:func:`~query.hunt.gene_reads.store_differences`)."""
    access = reach_index_store(index, atlas)
    if access.differences:
        path = Path(atlas) if atlas is not None else index.atlas_path
        raise InputError(
            f"the atlas store {show(path or '')} does not hold the cells the index was built from: "
            f"{'; '.join(access.differences)}; differential expression there would compare other cells. Pass the atlas "
            "store the index was built from (--atlas; atlas=), bring the index up to date with this store "
            "(`scatlas build --update`) and re-run `scatlas hunt sweep`, or leave differential expression out "
            "(--no-de; de=False)"
        )
    if access.store is None:
        return None, f"{access.reason}; pass atlas= (--atlas) to point at the store"
    return access.store, None


def report(
    hits: str | Path | pd.DataFrame,
    index: IndexLike,
    out_dir: str | Path,
    *,
    by: Sequence[str] | None = None,
    de_group: str | None = None,
    de_reference: str | None = None,
    atlas: str | Path | None = None,
    de: bool = True,
    de_method: DEMethod = "wilcoxon",
    max_cells: int = 5_000,
    alternative: Alternative = "two-sided",
    seed: int = 0,
    progress: Progress = True,
    where: str | None = None,
) -> ReportResult:
    """Enrichment of ``hits`` per group, a bar chart, and DE of the hits; written to ``out_dir``.

    The arguments are checked against the cells table first (an unknown ``by`` or ``de_group`` column, a
    ``de_reference`` that is no level among the hits, a ``by`` naming no column, hits of a sweep of another index
    or another version of it: :class:`InputError`, nothing written). The report is written
    into a temporary directory beside ``out_dir`` and moved into place when complete: a failed run leaves
    ``out_dir`` as it was. Hits that are not cells of the index are left out of the whole report with a warning
    (``ReportResult.n_dropped``); when none of them is, :class:`InputError` says to re-run the sweep.

    Parameters
    ----------
    hits: ``hits.parquet`` of a sweep, its output directory, or a DataFrame with a ``soma_joinid`` column (the
        report names it by ``hits.attrs["source"]`` when set).
    index: the index that was swept (its ``cells`` table gives the atlas-wide group sizes).
    by: columns of the cells table to break the hits down by (enrichment), each on its own; default: those of
        :data:`DEFAULT_BY` (``cell_type``, the atlas label; ``donor_id``; ``dataset_id``) the table has. A column
        missing in every cell is left out (``ReportResult.left_out`` says which).
    de_group: compare hits between the levels of this column (e.g. ``"disease"``) instead of against matched
        non-hits; ``de_reference`` is the level to compare against (default ``normal`` when present, else
        each level against the other hits).
    atlas: the atlas store for DE (default: the store recorded in the index manifest). When it is not reachable,
        DE is skipped with a logged message and ``de_skipped`` says why; when it holds other cells than the index
        was built from, :class:`InputError`. ``de=False`` skips DE on purpose.
    de_method: ``wilcoxon`` (rank-sum) or ``t-test`` (Welch), on log1p(CP10k) values.
    max_cells: at most this many cells per side of a DE comparison (sampled with ``seed``).
    alternative: of the Fisher tests: ``two-sided`` (default), ``greater`` (enrichment only) or ``less``.
    progress: a bar over the DE comparisons (:data:`index.progress.Progress`).
    where: an SQL predicate over the cells table: the report is about the atlas cells matching it (hits outside
        it left out; group sizes, the hit rate and DE's non-hits from those cells only), e.g. one dataset's. The
        hits alone filtered would be compared with the whole atlas' group sizes: a false enrichment of the
        groups the filter keeps.
    """
    t0 = time.perf_counter()
    if max_cells < MIN_SIDE:
        raise InputError(f"max_cells must be at least {MIN_SIDE}")
    if de_reference is not None and de_group is None:
        raise InputError("de_reference (--de-reference) needs de_group (--de): give the column whose levels to "
                         "compare with --de, or leave --de-reference out")
    inputs = input_paths(index, atlas, hits)
    out = check_output_dir(out_dir, REPORT, inputs=inputs)
    idx = open_index(index)
    frame = _read_hits(hits)
    _check_swept_index(hits, idx)
    hits_source = (show(hits) if not isinstance(hits, pd.DataFrame)
                   else str(hits.attrs.get("source") or "a DataFrame"))

    universe = idx.filter_ids(where, what="report filter (--where)") if where is not None else None
    if universe is not None:
        outside = int((~frame["soma_joinid"].isin(universe)).sum())
        frame = frame[frame["soma_joinid"].isin(universe)]
        hits_source += f", among the atlas cells where {where}"
        logger.info("hunt report: %d hit(s) outside the filter left out; %d atlas cells match it", outside,
                    len(universe))
    with idx.cursor() as con, _restricted(con, universe):
        names = [r[0] for r in con.execute("DESCRIBE cells").fetchall()]
        columns, left_out = _breakdown(con, names, by)
        _check_de_group(names, de_group)
        hit_ids, n_dropped = _known_hits(con, frame)
        if n_dropped:
            frame = frame[frame["soma_joinid"].isin(hit_ids)]
        if de and len(hit_ids) >= MIN_SIDE:  # DE runs: its reference must be a level among the hits
            _check_de_reference(con, hit_ids, de_group, de_reference)
        with _staged(out) as stage:
            result = _report(idx, con, frame, hit_ids, hits_source, stage, out, columns, left_out, de_group,
                             de_reference, atlas, de, de_method, max_cells, alternative, seed, progress)
            result.n_dropped = n_dropped
            result.n_training_hits = _training_hits(frame)
            _write_summaries(result, columns, hits_source, stage, out)
    result.seconds = time.perf_counter() - t0
    logger.info(
        "hunt report: %d hits of %d cells (%.4g%%), %d enrichment rows, DE %s; written to %s in %.1fs",
        result.n_hits, result.n_cells, 100 * result.hit_rate, len(result.enrichment),
        "skipped" if result.de is None else f"{len(result.de)} rows", out, result.seconds,
    )
    return result


@contextlib.contextmanager
def _restricted(con: Any, ids: np.ndarray | None) -> Iterator[None]:
    """Within the block, ``cells`` on the cursor ``con`` is the cells of ``ids`` only (a temporary view shadowing
    the table on this cursor alone; None: the whole table)."""
    import pyarrow as pa

    if ids is None:
        yield
        return
    database = con.execute("SELECT current_database()").fetchall()[0][0]
    con.register("_hunt_report_universe", pa.table({"soma_joinid": np.asarray(ids, dtype=np.int64)}))
    con.execute(f"CREATE TEMP VIEW cells AS SELECT * FROM {quote_ident(str(database))}.main.cells "
                "WHERE soma_joinid IN (SELECT soma_joinid FROM _hunt_report_universe)")
    try:
        yield
    finally:
        con.execute("DROP VIEW IF EXISTS temp.main.cells")
        con.unregister("_hunt_report_universe")


def _training_hits(frame: pd.DataFrame) -> int | None:
    """How many hits are marked as training positives (None when the hits have no such column)."""
    if TRAINING_COLUMN not in frame.columns:
        return None
    marked = frame[TRAINING_COLUMN]
    if marked.dtype != bool:
        logger.warning("the hits' %s column is not boolean: ignored", TRAINING_COLUMN)
        return None
    return int(marked.sum())


def _breakdown(con: Any, names: Sequence[str], by: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The columns to break hits down by, and those left out -> why; InputError for a given column the cells table
    (whose columns are ``names``) lacks."""
    left_out: dict[str, str] = {}
    if by is None:
        columns = default_by(names)
        left_out.update({c: "not a column of the cells table" for c in DEFAULT_BY if c not in names})
    else:
        if isinstance(by, str):
            raise InputError(f"by (--by) must be a list of column names, not a string; give e.g. by=[{by!r}]")
        columns = list(dict.fromkeys(by))
        blank = [c for c in columns if not isinstance(c, str) or not c.strip()]
        if blank or not columns:
            what = "names no column" if not columns else "holds a blank column name"
            raise InputError(
                f"by (--by) {what}; give columns of the cells table to break the hits down by (comma-separated with --by), or leave "
                f"it out for the default ({', '.join(DEFAULT_BY)}, those the table has): {escaped_list(names, 20)}"
            )
        unknown = [c for c in columns if c not in names]
        if unknown:
            what = "is not a column" if len(unknown) == 1 else "are not columns"
            raise InputError(
                f"by (--by): {', '.join(repr(c) for c in unknown)} {what} of the cells table; give columns of it "
                f"(comma-separated with --by): {escaped_list(names, 20)}"
            )
    for column in all_missing(con, columns):
        left_out[column] = "missing in every cell"
    kept = [c for c in columns if c not in left_out]
    if left_out:
        logger.info("breakdown columns left out: %s", left_out)
    return kept, left_out


def _known_hits(con: Any, frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """The distinct hit ids that are cells of the index (sorted), and how many distinct hit ids are not.

    Hits that are not cells of the index come from a sweep made before the atlas or index changed: they are left
    out of the whole report (enrichment, scores, DE) with a warning; InputError when none of the hits is left.
    """
    import pyarrow as pa

    try:
        ids = np.unique(frame["soma_joinid"].to_numpy(dtype=np.int64))
    except (TypeError, ValueError) as exc:
        raise InputError(f"the hits' soma_joinid column does not hold cell ids (integers; {type(exc).__name__}): "
                         "is the file a table `scatlas hunt sweep` wrote?") from None
    if not len(ids):
        return ids, 0
    con.register("_hunt_report_hits", pa.table({"soma_joinid": ids}))
    try:
        known = con.execute(
            "SELECT h.soma_joinid FROM _hunt_report_hits h JOIN cells c ON h.soma_joinid = c.soma_joinid "
            "ORDER BY 1"
        ).fetchnumpy()["soma_joinid"]
    finally:
        con.unregister("_hunt_report_hits")
    known = np.asarray(known, dtype=np.int64)
    dropped = len(ids) - len(known)
    if dropped and not len(known):
        raise InputError(
            f"none of the {len(ids):,} hits is a cell of this index: the hits come from a sweep made before the "
            f"atlas or index changed (or of another index); {RESWEEP}"
        )
    if dropped:
        logger.warning(
            "%d of the %d hits %s not cells of the index (the hits come from a sweep made before the atlas or "
            "index changed): they are left out of the whole report (enrichment, scores, DE); %s",
            dropped, len(ids), "is" if dropped == 1 else "are", RESWEEP,
        )
    return known, dropped


def _hit_levels(con: Any, hit_ids: np.ndarray, column: str) -> list[str]:
    """The levels of ``column`` among the hits, as :func:`~query.hunt.de.group_comparisons` names them."""
    import pyarrow as pa

    con.register("_hunt_report_levels", pa.table({"soma_joinid": hit_ids}))
    try:
        rows = con.execute(
            f"""SELECT DISTINCT COALESCE(CAST(c.{quote_ident(column)} AS VARCHAR), '{MISSING}') AS level
                FROM _hunt_report_levels h JOIN cells c ON h.soma_joinid = c.soma_joinid"""
        ).fetchall()
    finally:
        con.unregister("_hunt_report_levels")
    return sorted(str(r[0]) for r in rows)


def _check_de_group(names: Sequence[str], de_group: str | None) -> None:
    """InputError, before anything is written, for a ``de_group`` that is not a column of the cells table (whose
    columns are ``names``)."""
    if de_group is not None and de_group not in names:
        raise InputError(
            f"de_group (--de) {de_group!r} is not a column of the cells table; give one of its columns: "
            f"{escaped_list(names, 20)}"
        )


def _check_de_reference(con: Any, hit_ids: np.ndarray, de_group: str | None, de_reference: str | None) -> None:
    """InputError, before anything is written, for a ``de_reference`` that is no level of ``de_group`` among the
    hits."""
    if de_group is None or de_reference is None:
        return
    levels = _hit_levels(con, hit_ids, de_group)
    if de_reference not in levels:
        raise InputError(
            f"de_reference (--de-reference) {escaped(de_reference, 60)} is not a {escaped(de_group, 60)} value among "
            f"the hits (they hold {len(levels)}: the hits table's column lists them); give one of them, or leave it "
            "out (then each level is compared against 'normal' when present, else against the other hits)"
        )


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new temporary directory beside ``out`` to write the report into; moved into place when the block ends
    without an error, removed (with any parent directory created for it) when it raises, so that ``out`` stays as
    it was: absent, empty, or the earlier complete report."""
    existed = out.is_dir()
    created = missing_dirs(Path(os.path.abspath(out)).parent)  # deepest first
    real = Path(os.path.realpath(out))
    with writing(real.parent):
        real.parent.mkdir(parents=True, exist_ok=True)
        try:
            stage = new_stage_dir(real.parent, f".{real.name}.")
        except OSError:
            if not existed:
                raise
            # out exists in a directory we cannot write to: stage inside out (a hidden entry, removed at the end)
            stage = new_stage_dir(real, ".report.")
    published = False
    try:
        claim_output_dir(stage, REPORT)  # its marker
        yield stage
        with writing(out):
            _publish(stage, out)
        published = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not published:
            for parent in created:
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _publish(stage: Path, out: Path) -> None:
    """Move the complete report in ``stage`` to ``out``: a rename when ``out`` is absent; else each file replaces
    its namesake in ``out``, and report files of an earlier run that this run did not write are removed."""
    if not out.exists() and not out.is_symlink():
        os.rename(stage, out)
        return
    written = {p.name for p in stage.iterdir()}
    if (out / MARKER_FILE).exists():
        written.discard(MARKER_FILE)
    for name in [n for n in REPORT_FILES if n in written] + sorted(written - set(REPORT_FILES)):
        _move(stage / name, out / name)
    for name in REPORT_FILES:
        stale = out / name
        if name not in written and stale.is_file() and not stale.is_symlink():
            stale.unlink()
            logger.info("removed %s: a file of an earlier report that this run does not write", stale)


def _move(src: Path, dst: Path) -> None:
    """``src`` onto ``dst``, atomically (a copy to a temporary name beside ``dst`` when they are on different
    file systems)."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)


def _not_in_store(store: Any, ids: np.ndarray) -> np.ndarray:
    """Those of ``ids`` no dataset of the atlas store holds."""
    inside = np.zeros(len(ids), dtype=bool)
    for rec in store.cell_ranges_records():
        inside |= (ids >= rec.start) & (ids < rec.stop)
    return ids[~inside]


def _check_in_store(store: Any, comps: Sequence[Any], hit_ids: np.ndarray) -> None:
    """InputError, before any expression is read, when cells to compare are cells of the index but not of the
    atlas store (another store, or the index's store lost datasets after the index was built)."""
    parts = [np.asarray(c.ids_a, dtype=np.int64) for c in comps] + [np.asarray(c.ids_b, dtype=np.int64) for c in comps]
    if not parts:
        return
    missing = _not_in_store(store, np.unique(np.concatenate(parts)))
    if not len(missing):
        return
    n_hits = int(np.isin(missing, hit_ids).sum())
    raise InputError(
        f"{len(missing):,} cells to compare ({n_hits:,} hits, {len(missing) - n_hits:,} non-hits) are cells of the "
        f"index but not of the atlas store {show(store.path)}: it is not the store the index was built from, or that "
        "store lost datasets since. Pass the store the index was built from (--atlas; atlas=); if this is it, bring "
        "the index up to date with it (`scatlas build --update`) and re-run `scatlas hunt sweep`; or leave "
        "differential expression out (--no-de; de=False)"
    )


def _report(
    idx: AtlasIndex,
    con: Any,
    frame: pd.DataFrame,
    hit_ids: np.ndarray,
    hits_source: str,
    stage: Path,
    out: Path,
    by: list[str],
    left_out: dict[str, str],
    de_group: str | None,
    de_reference: str | None,
    atlas: str | Path | None,
    de: bool,
    de_method: DEMethod,
    max_cells: int,
    alternative: Alternative,
    seed: int,
    progress: Progress,
) -> ReportResult:
    """Compute the report and write its tables and plots into ``stage`` (the files named as in ``out``)."""
    enr, n_cells, _ = enrichment(con, hit_ids, by, alternative)
    n_hits = len(hit_ids)  # every one a cell of the index (see _known_hits)
    rate = n_hits / n_cells if n_cells else 0.0
    files: dict[str, str] = {}
    _atomic(stage / "enrichment.csv", lambda tmp: csv_safe(enr).to_csv(tmp, index=False))
    files["enrichment"] = str(out / "enrichment.csv")
    _plot(enr, by, rate, stage / "enrichment.png")
    files["png"] = str(out / "enrichment.png")
    if n_hits == 0:
        logger.warning("the hits table holds no hit: the report breaks down nothing (did the sweep find any?)")
    if "score" in frame.columns:
        scores = pd.to_numeric(frame["score"], errors="coerce").to_numpy(dtype=np.float64)
        if len(scores) and not np.isfinite(scores).any():
            logger.warning("the hits' scores are all missing or not numbers: no scores plot")
        else:
            _plot_scores(scores, stage / "scores.png")
            files["scores_png"] = str(out / "scores.png")

    de_frame: pd.DataFrame | None = None
    matching: str | None = None
    skipped: str | None = None
    if not de:
        skipped = "not requested (--no-de, de=False)"
    elif len(hit_ids) < MIN_SIDE:
        skipped = f"only {len(hit_ids)} hits (need at least {MIN_SIDE})"
    else:
        store, skipped = _open_store(idx, atlas)
        if store is not None:
            try:
                if de_group is not None:
                    comps = group_comparisons(con, hit_ids, de_group, de_reference, max_cells, seed)
                else:
                    comps = [matched_background(con, hit_ids, max_cells, seed)]
                    matching = comps[0].matching()
                _check_in_store(store, comps, hit_ids)
                de_frame = differential_expression(store, comps, de_method, progress)
            finally:
                store.close()
    if skipped is not None and de:  # skipped on request: nothing to warn about
        logger.warning("differential expression skipped: %s", skipped)
    if de_frame is not None:
        table = de_frame
        _atomic(stage / "de.csv", lambda tmp: csv_safe(table).to_csv(tmp, index=False))
        files["de"] = str(out / "de.csv")

    return ReportResult(
        out_dir=str(out), n_hits=n_hits, n_cells=n_cells, hit_rate=rate, enrichment=enr, de=de_frame,
        de_skipped=skipped, files=files, by=by, left_out=left_out, de_matching=matching,
    )


def _write_summaries(result: ReportResult, by: list[str], hits_source: str, stage: Path, out: Path) -> None:
    """``report.md`` and ``report.html`` of ``result`` into ``stage`` (named as in ``out``)."""
    result.files["markdown"], result.files["html"] = str(out / "report.md"), str(out / "report.html")
    md = _markdown(result, by, hits_source)
    page = _html(result, by, hits_source)
    _atomic(stage / "report.md", lambda tmp: Path(tmp).write_text(md))
    _atomic(stage / "report.html", lambda tmp: Path(tmp).write_text(page))
