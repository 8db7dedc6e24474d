"""The atlas' reference map as a PNG for the page (``GET /api/map.png``): the sampled atlas cells, coloured by
their label (the most frequent :data:`COLOURS` labels; other labels dark grey, cells without one light grey)."""

from __future__ import annotations

import io

import numpy as np

from scatlas.index import AtlasIndex

COLOURS = 20
MISSING = "(no label)"


def atlas_map_png(idx: AtlasIndex, label_column: str | None) -> bytes | None:
    """PNG bytes of the index's reference map, or None when it has none."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    refmap = idx.reference_map()
    if refmap is None:
        return None
    xy = np.asarray(refmap.coords, dtype=np.float64)
    fig = Figure(figsize=(7.5, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    size = float(np.clip(4000.0 / max(len(xy), 1), 0.3, 10.0))
    if label_column is not None and label_column in idx.columns():
        labels = idx.cells(refmap.ids, [label_column])[label_column].astype(object).fillna(MISSING).astype(str)
        counts = labels[labels != MISSING].value_counts()
        shown = list(counts.index[:COLOURS])
        missing = (labels == MISSING).to_numpy()
        rest = ~labels.isin(shown).to_numpy() & ~missing
        for mask, colour, name in ((missing, "#dedede", MISSING), (rest, "#9a9a9a", "other")):
            if mask.any():
                ax.scatter(xy[mask, 0], xy[mask, 1], s=size, c=colour, linewidths=0, rasterized=True,
                           label=f"{name} ({int(mask.sum())})")
        cmap = matplotlib.colormaps["tab20"]
        for i, name in enumerate(shown):
            mask = (labels == name).to_numpy()
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=cmap(i % 20), linewidths=0, rasterized=True,
                       label=f"{name[:30]} ({int(mask.sum())})")
        ax.legend(fontsize=6, markerscale=max(1.0, 6 / size), loc="center left", bbox_to_anchor=(1.0, 0.5),
                  frameon=False)
        title = f"atlas map: {len(xy):,} sampled cells by {label_column}"
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#808080", linewidths=0, rasterized=True)
        title = f"atlas map: {len(xy):,} sampled cells"
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("atlas UMAP 1", fontsize=7)
    ax.set_ylabel("atlas UMAP 2", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


__all__ = ["atlas_map_png"]
