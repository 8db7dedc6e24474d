"""Writing the atlas store (:mod:`atlas.store` describes the layout): the store lock, a new store's layout, and
:class:`StoreWriter`, which reserves id ranges (journalled), writes and commits ``store.json`` last."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from scatlas.atlas.atomic import write_json_atomic
from scatlas.atlas.errors import StoreError
from scatlas.atlas.locks import holding
from scatlas.atlas.schema import STANDARD_OBS_COLUMNS, obs_arrow_schema, var_arrow_schema
from scatlas.atlas.sql import table_exists, transaction
from scatlas.atlas.store import (
    CELLS_DB,
    CREATING_FILE,
    EXPERIMENT_DIR,
    JOURNAL_FILE,
    LOCK_FILE,
    MEASURED_TABLE,
    MEASUREMENT,
    STATE_FILE,
    X_LAYER,
    AtlasStore,
    DatasetRecord,
    StoreState,
    now,
)

logger = logging.getLogger(__name__)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    with holding(open(path / LOCK_FILE, "w"),
                 StoreError(f"{path}: another process is writing to this atlas store; wait for it to finish")):
        yield


def _create_layout(path: Path) -> None:
    import tiledbsoma

    exp_uri = str(path / EXPERIMENT_DIR)
    if Path(exp_uri).exists():
        shutil.rmtree(exp_uri)
    with tiledbsoma.Experiment.create(exp_uri) as exp:
        exp.add_new_dataframe("obs", schema=obs_arrow_schema(), index_column_names=["soma_joinid"], domain=[(0, 0)])
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(MEASUREMENT, tiledbsoma.Measurement)
        rna.add_new_dataframe("var", schema=var_arrow_schema(), index_column_names=["soma_joinid"], domain=[(0, 0)])
        X = rna.add_new_collection("X")
        X.add_new_sparse_ndarray(X_LAYER, type=pa.float32(), shape=(1, 1))
        rna.add_new_collection("obsm")
    db = path / CELLS_DB
    if db.exists():
        db.unlink()
    with duckdb.connect(str(db)) as con:
        std = ", ".join(
            f'"{c}" {"BOOLEAN" if c == "is_primary_data" else "VARCHAR"}' for c in STANDARD_OBS_COLUMNS
        )
        con.execute(f"CREATE TABLE cells (soma_joinid BIGINT PRIMARY KEY, {std})")
        con.execute(
            "CREATE TABLE genes (var_joinid BIGINT PRIMARY KEY, gene_key VARCHAR UNIQUE, feature_id VARCHAR, "
            "feature_name VARCHAR, added_by VARCHAR)"
        )
        con.execute(
            "CREATE TABLE datasets (dataset_id VARCHAR PRIMARY KEY, start_id BIGINT, stop_id BIGINT, n_cells BIGINT, "
            "x_kind VARCHAR, x_source VARCHAR, source VARCHAR)"
        )


class StoreWriter:
    """Holds the store lock; reserves id ranges, writes SOMA arrays and DuckDB rows, commits ``store.json`` last."""

    def __init__(self, path: Path, state: StoreState) -> None:
        self.path = path
        self.state = state
        self._reservations: list[dict[str, Any]] = []  # this command's, journalled, published by commit()
        self.obs_next = state.obs_high_water  # next free ids, beyond every reservation
        self.var_next = state.var_high_water
        self.cleaned_datasets: list[str] = []  # datasets whose uncommitted rows opening this writer deleted

    @classmethod
    @contextmanager
    def open(cls, path: str | Path, *, create: bool) -> Iterator[StoreWriter]:
        """Lock the store at ``path`` (created when absent and ``create``), recover an interrupted ingest, yield."""
        path = Path(path)
        with _locked(path):
            if AtlasStore.exists(path):
                state = AtlasStore.open(path).state
            elif create:
                creating = path / CREATING_FILE
                if (path / EXPERIMENT_DIR).exists() and not (path / JOURNAL_FILE).exists() and not creating.exists():
                    raise StoreError(f"{path}: holds an experiment/ but no store.json; not a scatlas store")
                creating.touch()  # a rerun of an interrupted creation starts it anew (_create_layout clears it)
                _create_layout(path)
                state = StoreState()
                write_json_atomic(path / STATE_FILE, state.to_json())
                creating.unlink()
            else:
                raise StoreError(f"{path}: no atlas store to append to; use --mode write to create one")
            writer = cls(path, state)
            writer._recover()
            writer.obs_next, writer.var_next = writer.state.obs_high_water, writer.state.var_high_water
            yield writer

    # -- recovery ---------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Make the DuckDB tables match ``store.json``: delete rows of uncommitted datasets (every open: a remove or
        an ingest interrupted after its DuckDB step), and after an interrupted ingest (its journal) keep its
        reserved id ranges unused by raising the high-water marks past them."""
        journal = self.path / JOURNAL_FILE
        reservations: list[dict[str, Any]] = []
        obs_stop = var_stop = 0
        if journal.is_file():
            try:
                j = json.loads(journal.read_text())
                reservations = j.get("reservations", [j])  # one dataset a journal before
                obs_stop = max(int(r.get("obs_stop", 0)) for r in reservations)
                var_stop = max(int(r.get("var_stop", 0)) for r in reservations)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreError(
                    f"{journal}: the journal of an interrupted ingest is damaged; the store's committed datasets are "
                    "intact, but it cannot be appended to safely: ingest into a new store"
                ) from exc
        self.cleaned_datasets = self.delete_uncommitted_rows()
        if self.cleaned_datasets:
            logger.warning("%s: finished an interrupted ingest or remove: deleted the rows of %d dataset(s) that "
                           "store.json does not hold", self.path, len(self.cleaned_datasets))
        if not reservations:
            return
        logger.warning(
            "%s: recovering from an interrupted ingest of %s: its cell ids up to %d stay unused",
            self.path, [r.get("dataset_id") for r in reservations], obs_stop,
        )
        self.state.obs_high_water = max(self.state.obs_high_water, obs_stop)
        self.state.var_high_water = max(self.state.var_high_water, var_stop)
        write_json_atomic(self.path / STATE_FILE, self.state.to_json())
        journal.unlink()

    def delete_uncommitted_rows(self) -> list[str]:
        """Delete, in one DuckDB transaction, the ``cells``, ``datasets`` and ``dataset_genes`` rows of datasets not
        in this writer's state (removed, or staged by an ingest that never committed) and ``genes`` rows at or beyond
        the gene high-water mark (added by such an ingest). Returns the ids of the datasets whose rows were deleted (the
        counts per table are logged)."""
        db = self.path / CELLS_DB
        if not db.is_file():
            return []
        committed = pa.table({"dataset_id": pa.array([d.dataset_id for d in self.state.datasets], pa.string())})
        deleted: dict[str, int] = {}
        with duckdb.connect(str(db)) as con:
            con.register("committed", committed)
            with transaction(con):
                gone = [str(r[0]) for r in con.execute(
                    "SELECT DISTINCT dataset_id FROM datasets WHERE dataset_id NOT IN (SELECT dataset_id FROM committed)"
                ).fetchall()]
                for table in ("cells", "datasets", *([MEASURED_TABLE] if table_exists(con, MEASURED_TABLE) else [])):
                    row = con.execute(
                        f"DELETE FROM {table} WHERE dataset_id NOT IN (SELECT dataset_id FROM committed)"
                    ).fetchone()
                    deleted[table] = int(row[0]) if row else 0
                row = con.execute("DELETE FROM genes WHERE var_joinid >= ?", [self.state.var_high_water]).fetchone()
                deleted["genes"] = int(row[0]) if row else 0
        if any(deleted.values()):
            logger.info("%s: deleted the rows of %d dataset(s) not in store.json: %s", self.path, len(gone), deleted)
        return gone

    # -- writing one dataset ------------------------------------------------------------------------------------
    def reserve(self, dataset_id: str, n_cells: int, n_new_genes: int, obsm_dims: dict[str, int]) -> tuple[int, int]:
        """Reserve id ranges (journalled first), grow the SOMA arrays; returns (first cell id, first new gene id).

        Reservations of one command accumulate until :meth:`commit` publishes them all; until then no reader sees
        them, and an interruption leaves their ranges unused.
        """
        import tiledbsoma

        obs_start, var_start = self.obs_next, self.var_next
        obs_stop, var_stop = obs_start + n_cells, var_start + n_new_genes
        self._reservations.append(
            {"dataset_id": dataset_id, "obs_start": obs_start, "obs_stop": obs_stop, "var_start": var_start,
             "var_stop": var_stop, "started_at": now()}
        )
        write_json_atomic(self.path / JOURNAL_FILE, {"reservations": self._reservations})
        self.obs_next, self.var_next = obs_stop, var_stop
        uri = str(self.path / EXPERIMENT_DIR)
        n_obs, n_var = max(obs_stop, 1), max(var_stop, 1)
        with tiledbsoma.Experiment.open(uri, "w") as exp:
            if exp.obs.domain[0][1] < n_obs - 1:
                exp.obs.change_domain([(0, n_obs - 1)])
            rna = exp.ms[MEASUREMENT]
            if rna.var.domain[0][1] < n_var - 1:
                rna.var.change_domain([(0, n_var - 1)])
            x = rna.X[X_LAYER]
            if x.shape[0] < n_obs or x.shape[1] < n_var:
                x.resize((max(x.shape[0], n_obs), max(x.shape[1], n_var)))
            for key, dim in obsm_dims.items():
                if key not in rna["obsm"]:
                    rna["obsm"].add_new_sparse_ndarray(key, type=pa.float32(), shape=(n_obs, dim))
                elif rna["obsm"][key].shape[0] < n_obs:
                    rna["obsm"][key].resize((n_obs, dim))
        return obs_start, var_start

    def experiment(self, mode: str = "w") -> Any:
        """The SOMA experiment opened in ``mode`` (the caller closes it)."""
        import tiledbsoma

        return tiledbsoma.Experiment.open(str(self.path / EXPERIMENT_DIR), mode)

    def commit(self, records: Sequence[DatasetRecord], obsm_dims: dict[str, int], con: duckdb.DuckDBPyConnection) -> None:
        """Publish every dataset of this command at once: the DuckDB transaction, then ``store.json`` (the commit
        point), then drop the journal."""
        for record in records:
            con.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
                [record.dataset_id, record.start, record.stop, record.n_cells, record.x_kind, record.x_source,
                 record.source],
            )
        con.execute("COMMIT")
        self.state.datasets.extend(records)
        self.state.obs_high_water = max(self.state.obs_high_water, self.obs_next)
        self.state.var_high_water = max(self.state.var_high_water, self.var_next)
        self.state.obsm_dims.update(obsm_dims)
        write_json_atomic(self.path / STATE_FILE, self.state.to_json())
        (self.path / JOURNAL_FILE).unlink(missing_ok=True)
        self._reservations = []
