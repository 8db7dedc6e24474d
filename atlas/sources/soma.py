"""TileDB-SOMA experiments in the CELLxGENE Census layout as ingest sources (one source per ``dataset_id``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scatlas.atlas.errors import InputError
from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.sources.base import (
    ExpressionChoice,
    checked_block,
    expression_from_samples,
    genes_from_var,
)
from scatlas.atlas.sources.census_presence import PRESENCE_MATRIX, measured_by_dataset
from scatlas.atlas.sources.soma_uris import member_inside
from scatlas.atlas.validate import check_name, escaped

logger = logging.getLogger(__name__)

STREAM_CONTEXT_CONFIG = {"soma.init_buffer_bytes": 16 << 20}
"""Without this, ``X.read().tables()`` arrives as one huge table (see shared FACTS.md)."""


def _context() -> Any:
    import tiledbsoma

    return tiledbsoma.SOMATileDBContext(tiledb_config=STREAM_CONTEXT_CONFIG)


def is_soma_experiment(uri: str) -> bool:
    """Whether ``uri`` is a readable TileDB-SOMA experiment."""
    import tiledbsoma

    try:
        return tiledbsoma.Experiment.exists(uri)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an experiment
        return False


def check_members_inside(uri: str, members: dict[str, Any]) -> None:
    """InputError when any of the experiment's ``members`` (name -> object: what a read opens: obs, the measurement,
    var, X and its layer, obsm arrays) lies outside the experiment at ``uri``: a SOMA group's members are URIs, and
    one naming another experiment or a remote store would read data the user did not give."""
    for name, obj in members.items():
        if not member_inside(uri, str(obj.uri)):
            raise InputError(
                f"{uri}: its member {escaped(name)} lies outside the experiment (its URI names another location): "
                "scatlas reads only experiments that hold their own arrays; copy the experiment with its members "
                "inside it"
            )


DEFAULT_X_LAYER = "raw"
"""The X layer read when none is named and the experiment has several (the Census layout's raw counts)."""


def choose_x_layer(layers: list[str], requested: str | None, what: str) -> str:
    """The X layer to read: ``requested`` when given (InputError listing the layers when absent), else ``raw``
    when present, else the only layer (``tiledbsoma.io.from_anndata`` writes one named ``data``); several layers
    and no ``raw``: InputError naming them and saying to pass ``--x-layer``. Layer names come from the file:
    messages show them escaped, and the chosen one must pass :func:`check_name` (it is recorded in the store)."""
    names = ", ".join(escaped(name) for name in layers) or "none"
    if requested is not None:
        if requested not in layers:
            raise InputError(f"{what}: no X layer {escaped(requested)}; its X layers: {names}")
        chosen = requested
    elif DEFAULT_X_LAYER in layers:
        chosen = DEFAULT_X_LAYER
    elif len(layers) == 1:
        chosen = layers[0]
    elif not layers:
        raise InputError(f"{what}: the measurement has no X layer")
    else:
        raise InputError(f"{what}: X has {len(layers)} layers ({names}) and none is named 'raw'; choose the one "
                         "to ingest with --x-layer NAME")
    return check_name(chosen, f"{what}: X layer")


def arrow_to_csr(table: pa.Table, row_ids: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """COO Arrow table (soma_dim_0 = joinid, soma_dim_1, soma_data) -> CSR with rows in ``row_ids`` order."""
    if table.num_rows == 0:
        return sp.csr_matrix((len(row_ids), n_cols), dtype=np.float32)
    dim0 = table.column("soma_dim_0").to_numpy()
    rows = np.searchsorted(row_ids, dim0)
    cols = table.column("soma_dim_1").to_numpy()
    data = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
    return sp.csr_matrix((data, (rows, cols)), shape=(len(row_ids), n_cols))


class SomaExperimentSource:
    """The cells of one dataset in a SOMA experiment (Census layout), read by joinid in chunks."""

    def __init__(
        self,
        uri: str,
        joinids: np.ndarray,
        obs: pd.DataFrame,
        name: str,
        measurement: str = "RNA",
        layer: str = DEFAULT_X_LAYER,
    ) -> None:
        import tiledbsoma

        self.uri, self.name, self.measurement, self.layer = uri, name, measurement, layer
        self._joinids = np.asarray(joinids, dtype=np.int64)
        self.obs = obs
        self._exp = tiledbsoma.Experiment.open(uri, context=_context())
        ms = self._exp.ms[measurement]
        self.var = ms.var.read().concat().to_pandas().set_index("soma_joinid", drop=False)
        self._n_vars = int(self.var["soma_joinid"].max()) + 1 if len(self.var) else 0
        self._X = ms.X[layer]
        var_frame = self.var.drop(columns=["soma_joinid"]).reset_index(drop=True)
        var_frame.index = var_frame.get("feature_id", pd.Series(range(len(var_frame)))).astype(str).to_numpy()
        vocab = genes_from_var(var_frame, f"{uri} (dataset {name})")
        # Columns of X are var soma_joinids; build the vocabulary over 0..max joinid.
        keys = np.full(self._n_vars, "", dtype=object)
        fid, fname = keys.copy(), keys.copy()
        pos = self.var["soma_joinid"].to_numpy()
        keys[pos], fid[pos], fname[pos] = vocab.keys, vocab.feature_id, vocab.feature_name
        self.genes = GeneVocabulary(keys=keys, feature_id=fid, feature_name=fname)
        self.measured: np.ndarray | None = None
        """Bool per gene of :attr:`genes`: the genes this dataset measured (the Census' presence matrix); None: all."""
        sample = self._read(self._joinids[: min(len(self._joinids), 2000)])
        self.expression: ExpressionChoice = expression_from_samples({f"X/{layer}": sample}, f"{uri} ({name})")

    @property
    def n_obs(self) -> int:
        return len(self._joinids)

    @property
    def n_vars(self) -> int:
        """Columns of X: the var ``soma_joinid`` range (``0..max``)."""
        return self._n_vars

    def _read(self, ids: np.ndarray) -> sp.csr_matrix:
        if len(ids) == 0:
            return sp.csr_matrix((0, self._n_vars), dtype=np.float32)
        tables = list(self._X.read(coords=(ids,)).tables())
        table = pa.concat_tables(tables) if tables else pa.table({"soma_dim_0": [], "soma_dim_1": [], "soma_data": []})
        return arrow_to_csr(table, ids, self._n_vars)

    def iter_rows(self, rows: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        rows = np.asarray(rows, dtype=np.int64)
        for a in range(0, len(rows), chunk_size):
            pos = rows[a : a + chunk_size]
            block = self._read(self._joinids[pos])
            yield pos, checked_block(block, pos, f"{self.uri}: X[{escaped(self.layer)}]", self.expression)

    def obsm_keys(self) -> list[str]:
        ms = self._exp.ms[self.measurement]
        return list(ms["obsm"].keys()) if "obsm" in ms else []

    def read_obsm(self, key: str, rows: np.ndarray) -> np.ndarray:
        if key not in self.obsm_keys():
            raise InputError(f"{self.uri}: no obsm[{key!r}]; available: {self.obsm_keys() or 'none'}")
        arr = self._exp.ms[self.measurement]["obsm"][key]
        check_members_inside(self.uri, {f"ms/{self.measurement}/obsm/{key}": arr})
        ids = self._joinids[np.asarray(rows, dtype=np.int64)]
        dim = int(arr.shape[1])
        out = np.full((len(ids), dim), np.nan, dtype=np.float32)
        if len(ids):
            table = arr.read(coords=(ids,)).tables().concat()
            r = np.searchsorted(ids, table.column("soma_dim_0").to_numpy())
            out[r, table.column("soma_dim_1").to_numpy()] = table.column("soma_data").to_numpy()
        return out

    def close(self) -> None:
        self._exp.close()


def open_soma_experiment(
    uri: str,
    *,
    measurement: str = "RNA",
    layer: str | None = None,
    value_filter: str | None = None,
    dataset_id: str | None = None,
) -> list[SomaExperimentSource]:
    """One source per ``dataset_id`` in the experiment's obs (or one, named ``dataset_id``, when there is none).

    ``layer``: the X layer to read; default ``raw`` when present, else the only one (:func:`choose_x_layer`).
    """
    import tiledbsoma

    if not is_soma_experiment(uri):
        raise InputError(f"{uri}: not a TileDB-SOMA experiment (or not readable)")
    try:
        with tiledbsoma.Experiment.open(uri, context=_context()) as exp:
            if measurement not in exp.ms:
                raise InputError(f"{uri}: no measurement {measurement!r}; has: {[escaped(m) for m in exp.ms]}")
            chosen = choose_x_layer([str(k) for k in exp.ms[measurement].X], layer, uri)
            ms = exp.ms[measurement]
            check_members_inside(uri, {"obs": exp.obs, f"ms/{measurement}": ms, f"ms/{measurement}/var": ms.var,
                                       f"ms/{measurement}/X": ms.X, f"ms/{measurement}/X/{chosen}": ms.X[chosen]})
            obs = exp.obs.read(value_filter=value_filter).concat().to_pandas()
    except InputError:
        raise
    except (tiledbsoma.SOMAError, KeyError, ValueError, OSError) as exc:  # a member that cannot be opened or read
        raise InputError(f"{uri}: a member of the experiment (obs, the measurement, var or X) cannot be opened or "
                         f"read ({type(exc).__name__}): is the experiment complete and written by tiledbsoma?"
                         + (" Or the obs filter is not one TileDB-SOMA reads" if value_filter else "")) from None
    if len(obs) == 0:
        raise InputError(f"{uri}: no cells{' match ' + value_filter if value_filter else ''}")
    obs = obs.sort_values("soma_joinid")
    name_col = "obs_id" if "obs_id" in obs.columns else None
    obs.index = (obs[name_col] if name_col else obs["soma_joinid"]).astype(str).to_numpy()
    sources = []
    held = obs["dataset_id"].dropna().astype(str).unique() if "dataset_id" in obs.columns else []
    if dataset_id is not None and len(held) > 1:
        raise InputError(
            f"{uri}: the experiment holds {len(held)} datasets (its obs column dataset_id); --dataset-id would "
            "merge them into one store dataset and lose which cell came from which. Leave --dataset-id out: each "
            "becomes a store dataset under its own id"
        )
    if len(held) and dataset_id is None:
        groups = obs.groupby("dataset_id", sort=True, observed=True)
    else:
        groups = [(dataset_id or uri.rstrip("/").rsplit("/", 1)[-1], obs)]  # type: ignore[assignment]
    for ds, frame in groups:
        sub = frame.drop(columns=["soma_joinid", *([name_col] if name_col else [])])  # the names are the index
        sources.append(
            SomaExperimentSource(uri, frame["soma_joinid"].to_numpy(), sub, str(ds), measurement, chosen)
        )
    if len(held):
        # the Census' name of each source's dataset (a lone dataset renamed by --dataset-id keeps its row)
        census_ids = [source.name for source in sources] if dataset_id is None else [str(held[0])]
        try:
            with tiledbsoma.Experiment.open(uri, context=_context()) as exp:
                ms = exp.ms[measurement]
                if PRESENCE_MATRIX in ms:
                    check_members_inside(uri, {f"ms/{measurement}/{PRESENCE_MATRIX}": ms[PRESENCE_MATRIX]})
                measured = measured_by_dataset(uri, ms, sources[0].n_vars, census_ids, _context())
        except BaseException as exc:
            for source in sources:
                source.close()
            if isinstance(exc, InputError) or not isinstance(exc, Exception):
                raise
            raise InputError(f"{uri}: its {PRESENCE_MATRIX} cannot be read as the Census writes it (a sparse array "
                             f"of datasets x genes; {type(exc).__name__}); remove it or ingest a complete Census "
                             "experiment") from None
        for source, census_id in zip(sources, census_ids, strict=True):
            source.measured = measured.get(census_id)  # ingest adds the genes its cells have counts in
    return sources
