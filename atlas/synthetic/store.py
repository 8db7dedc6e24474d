"""Generating a synthetic atlas straight into an atlas store, through temporary .h5ad files one dataset at a time."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from scatlas.atlas.errors import DatasetExistsError
from scatlas.atlas.ingest_args import normalised
from scatlas.atlas.ingestion import IngestMode, IngestReport, ingest
from scatlas.atlas.store import AtlasStore
from scatlas.atlas.synthetic.config import SyntheticAtlasConfig
from scatlas.atlas.synthetic.h5ad import write_h5ad_datasets
from scatlas.atlas.synthetic.plan import plan_atlas


def ingest_synthetic(
    config: SyntheticAtlasConfig, atlas: str | Path, *, mode: IngestMode = "append", progress: bool = True
) -> IngestReport:
    """Write each synthetic dataset to a temporary .h5ad, ingest it, delete it: disk use stays one dataset.

    ``atlas``: the store's directory; ``mode``: the ingest mode of the first dataset (the others append);
    ``progress``: show ingest's progress bars.
    """
    atlas = Path(atlas)
    _check_new_ids(config, atlas)
    parent = atlas.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    total = IngestReport(atlas=str(atlas))
    for i in range(config.n_datasets):
        tmp = Path(tempfile.mkdtemp(prefix=".scatlas-synth-", dir=parent))
        try:
            (path,) = write_h5ad_datasets(config, tmp, datasets=[i])
            report = ingest([path], atlas, mode=mode if i == 0 else "append", progress=progress)
            total.datasets.extend(report.datasets)
            total.n_cells_in_store = report.n_cells_in_store
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return total


def _check_new_ids(config: SyntheticAtlasConfig, atlas: Path) -> None:
    """Refuse, before writing anything, a store that already holds a dataset of the ids synth would give
    (``synth-000``, ...): every synthetic atlas names its datasets alike."""
    if not AtlasStore.exists(atlas):
        return
    planned = [ds.dataset_id for ds in plan_atlas(config).datasets]
    store = AtlasStore.open(atlas)
    try:
        present = {normalised(d.dataset_id) for d in store.datasets}
    finally:
        store.close()
    clash = [name for name in planned if normalised(name) in present]
    if clash:
        raise DatasetExistsError(
            f"{atlas} already holds synthetic dataset(s) {', '.join(clash)}: every `scatlas synth` run names its "
            "datasets synth-000, synth-001, ...; give a new store with --atlas, or write files with --out DIR and "
            "ingest them with `scatlas ingest --dataset-id` one at a time"
        )
