"""``hunt report``: where the hits are (enrichment per dataset / tissue / disease) and what they express (DE).

Writes into ``out_dir`` (each file via a temporary name and rename):

* ``enrichment.csv``: per grouping column and group: cells, hits, hit fraction, fold over the atlas-wide hit
  rate, Fisher exact p and Benjamini-Hochberg q (see :mod:`query.hunt.enrichment`);
* ``enrichment.png``: bar charts of the hit fraction of the top groups per column, the atlas rate marked;
* ``de.csv``: differential expression (see :mod:`query.hunt.de`), when the atlas store is reachable;
* ``report.md`` and ``report.html``: a short summary of the above, saying when and why DE was skipped.
"""

from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError, ScatlasError
from scatlas.atlas.outputs import REPORT, check_output_dir, claim_output_dir, os_error_message, show, writing
from scatlas.index import AtlasIndex, Progress
from scatlas.query.hunt.access import IndexLike, input_paths, open_index
from scatlas.query.hunt.de import MIN_CELLS_PER_SIDE as MIN_SIDE
from scatlas.query.hunt.de import DEMethod, differential_expression, group_comparisons, matched_background
from scatlas.query.hunt.enrichment import Alternative, enrichment
from scatlas.query.hunt.sweep import HITS_FILE

logger = logging.getLogger(__name__)

DEFAULT_BY: tuple[str, ...] = ("dataset_id", "tissue", "disease")
TOP_GROUPS = 15
TOP_GENES = 15


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

    def summary(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "n_hits": self.n_hits,
            "n_cells": self.n_cells,
            "hit_rate": self.hit_rate,
            "de_skipped": self.de_skipped,
            "files": self.files,
        }


def _read_hits(hits: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(hits, pd.DataFrame):
        frame = hits
    else:
        frame = _read_hits_file(_hits_file(hits))
    if "soma_joinid" not in frame.columns:
        raise InputError(f"the hits have no soma_joinid column (columns: {list(frame.columns)})")
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
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)

    _atomic(path, save)


def _md_table(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    if frame.empty:
        return "_(none)_\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float | np.floating) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(res: ReportResult, by: Sequence[str], hits_source: str) -> str:
    parts = [
        "# Rare-cell hunt report\n",
        f"Hits: **{res.n_hits:,}** of {res.n_cells:,} atlas cells ({100 * res.hit_rate:.4g}%), from {hits_source}.\n",
        "Enrichment: Fisher's exact test per group against the rest of the atlas, Benjamini-Hochberg q within "
        "each column; fold = group hit fraction / atlas hit rate.\n",
    ]
    for column in by:
        sub = res.enrichment[res.enrichment["column"] == column].head(TOP_GROUPS)
        parts.append(f"\n## By {column}\n\n")
        parts.append(_md_table(sub[["group", "n_cells", "n_hits", "fraction", "fold", "qvalue"]]))
    parts.append("\n## Differential expression\n\n")
    if res.de is None:
        parts.append(f"Skipped: {res.de_skipped}\n")
    elif res.de.empty:
        parts.append("No comparison had enough cells.\n")
    else:
        for name, sub in res.de.groupby("comparison", sort=False):
            up = sub[(sub["qvalue"] < 0.05) & (sub["log2fc"] > 0)].head(TOP_GENES)
            parts.append(f"\n### {name} ({int(sub['n_a'].iloc[0])} vs {int(sub['n_b'].iloc[0])} cells)\n\n")
            parts.append(f"{int((sub['qvalue'] < 0.05).sum())} genes at q < 0.05; top up-regulated:\n\n")
            parts.append(_md_table(up[["gene_symbol", "log2fc", "pct_a", "pct_b", "qvalue"]]))
    parts.append("\nFiles: " + ", ".join(f"`{Path(p).name}`" for p in res.files.values()) + "\n")
    return "".join(parts)


def _html(res: ReportResult, by: Sequence[str], hits_source: str) -> str:
    esc = html.escape
    body = [
        "<h1>Rare-cell hunt report</h1>",
        f"<p>Hits: <b>{res.n_hits:,}</b> of {res.n_cells:,} atlas cells ({100 * res.hit_rate:.4g}%), from "
        f"{esc(hits_source)}.</p>",
    ]
    if "png" in res.files:
        body.append(f'<img src="{esc(Path(res.files["png"]).name)}" style="max-width:100%">')
    for column in by:
        sub = res.enrichment[res.enrichment["column"] == column].head(TOP_GROUPS)
        body.append(f"<h2>By {esc(column)}</h2>")
        body.append(sub[["group", "n_cells", "n_hits", "fraction", "fold", "qvalue"]].to_html(index=False))
    body.append("<h2>Differential expression</h2>")
    if res.de is None:
        body.append(f"<p>Skipped: {esc(str(res.de_skipped))}</p>")
    else:
        for name, sub in res.de.groupby("comparison", sort=False):
            body.append(f"<h3>{esc(str(name))}</h3>")
            body.append(sub.head(TOP_GENES)[["gene_symbol", "log2fc", "pct_a", "pct_b", "qvalue"]].to_html(index=False))
    return "<!doctype html><html><head><meta charset='utf-8'><title>hunt report</title></head><body>" + "".join(
        body
    ) + "</body></html>"


def _open_store(index: AtlasIndex, atlas: str | Path | None) -> tuple[Any, str | None]:
    """The atlas store for DE, or ``(None, reason)`` when it cannot be reached."""
    from scatlas.atlas.store import AtlasStore

    path = Path(atlas) if atlas is not None else index.atlas_path
    if path is None:
        return None, "the index manifest names no atlas store and no atlas= path was given"
    if not AtlasStore.exists(path):
        return None, f"the atlas store {path} is not reachable (no store.json there); pass atlas= to point at it"
    try:
        return AtlasStore.open(path), None
    except ScatlasError as exc:
        return None, f"the atlas store {path} could not be opened: {exc}"


def report(
    hits: str | Path | pd.DataFrame,
    index: IndexLike,
    out_dir: str | Path,
    *,
    by: Sequence[str] = DEFAULT_BY,
    de_group: str | None = None,
    de_reference: str | None = None,
    atlas: str | Path | None = None,
    de: bool = True,
    de_method: DEMethod = "wilcoxon",
    max_cells: int = 5_000,
    alternative: Alternative = "two-sided",
    seed: int = 0,
    progress: Progress = True,
) -> ReportResult:
    """Enrichment of ``hits`` per group, a bar chart, and DE of the hits; written to ``out_dir``.

    Parameters
    ----------
    hits: ``hits.parquet`` of a sweep, its output directory, or a DataFrame with a ``soma_joinid`` column.
    index: the index that was swept (its ``cells`` table gives the atlas-wide group sizes).
    by: columns of the cells table to test for enrichment, each on its own.
    de_group: compare hits between the levels of this column (e.g. ``"disease"``) instead of against matched
        non-hits; ``de_reference`` is the level to compare against (default ``normal`` when present, else
        each level against the other hits).
    atlas: the atlas store for DE (default: the store recorded in the index manifest). When it is not reachable,
        DE is skipped with a logged message and ``de_skipped`` says why. ``de=False`` skips DE on purpose.
    de_method: ``wilcoxon`` (rank-sum) or ``t-test`` (Welch), on log1p(CP10k) values.
    max_cells: at most this many cells per side of a DE comparison (sampled with ``seed``).
    alternative: of the Fisher tests: ``two-sided`` (default), ``greater`` (enrichment only) or ``less``.
    progress: a bar over the DE comparisons (:data:`index.progress.Progress`).
    """
    t0 = time.perf_counter()
    if max_cells < MIN_SIDE:
        raise InputError(f"max_cells must be at least {MIN_SIDE}")
    check_output_dir(out_dir, REPORT, inputs=input_paths(index, atlas, hits))
    idx = open_index(index)
    frame = _read_hits(hits)
    hits_source = show(hits) if not isinstance(hits, pd.DataFrame) else "a DataFrame"
    out = claim_output_dir(out_dir, REPORT)
    by = list(by)

    with idx.cursor() as con:
        return _report(idx, con, frame, hits_source, out, by, de_group, de_reference, atlas, de, de_method, max_cells,
                       alternative, seed, t0, progress)


def _report(
    idx: AtlasIndex,
    con: Any,
    frame: pd.DataFrame,
    hits_source: str,
    out: Path,
    by: list[str],
    de_group: str | None,
    de_reference: str | None,
    atlas: str | Path | None,
    de: bool,
    de_method: DEMethod,
    max_cells: int,
    alternative: Alternative,
    seed: int,
    t0: float,
    progress: Progress,
) -> ReportResult:
    hit_ids = np.unique(frame["soma_joinid"].to_numpy(dtype=np.int64))
    enr, n_cells, n_hits = enrichment(con, hit_ids, by, alternative)
    rate = n_hits / n_cells if n_cells else 0.0
    files: dict[str, str] = {}
    enr_path = out / "enrichment.csv"
    _atomic(enr_path, lambda tmp: enr.to_csv(tmp, index=False))
    files["enrichment"] = str(enr_path)
    png = out / "enrichment.png"
    _plot(enr, by, rate, png)
    files["png"] = str(png)

    de_frame: pd.DataFrame | None = None
    skipped: str | None = None
    if not de:
        skipped = "not requested (de=False)"
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
                de_frame = differential_expression(store, comps, de_method, progress)
            finally:
                store.close()
    if skipped is not None and de:  # skipped on request: nothing to warn about
        logger.warning("differential expression skipped: %s", skipped)
    if de_frame is not None:
        de_path = out / "de.csv"
        _atomic(de_path, lambda tmp: de_frame.to_csv(tmp, index=False))
        files["de"] = str(de_path)

    result = ReportResult(
        out_dir=str(out), n_hits=n_hits, n_cells=n_cells, hit_rate=rate, enrichment=enr, de=de_frame,
        de_skipped=skipped, files=files,
    )
    md_path, html_path = out / "report.md", out / "report.html"
    files["markdown"], files["html"] = str(md_path), str(html_path)
    md = _markdown(result, by, hits_source)
    page = _html(result, by, hits_source)
    _atomic(md_path, lambda tmp: Path(tmp).write_text(md))
    _atomic(html_path, lambda tmp: Path(tmp).write_text(page))
    result.seconds = time.perf_counter() - t0
    logger.info(
        "hunt report: %d hits of %d cells (%.4g%%), %d enrichment rows, DE %s; written to %s in %.1fs",
        n_hits, n_cells, 100 * rate, len(enr), "skipped" if de_frame is None else f"{len(de_frame)} rows", out,
        result.seconds,
    )
    return result

